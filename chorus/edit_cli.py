"""`chorus edit`: edit an image towards a prompt with Plug-and-Play (feature injection) or SDEdit (img2img).

    chorus edit --image IN.png "a blue circle" [--method pnp|sdedit] [--strength S] [--tau-f 0.8]
                [--tau-attn 0.5] [--inversion-steps 1000] [--steps 50] [--out DIR]
    chorus edit --from-png outputs/000000-a-blue-circle.png       re-create an edit from its PNG settings
"""
from __future__ import annotations

import sys
from pathlib import Path

from chorus.errors import ChorusError

EDIT_DEFAULTS = {"prompt": None, "image": None, "method": "pnp", "strength": 0.75, "tau_f": 0.8, "tau_attn": 0.5,
                 "inversion_steps": 1000, "steps": 50, "guidance": None, "negative": None, "seed": 0,
                 "model": "default", "source_prompt": "", "sampler": "ddim"}


def register(sub) -> None:
    p = sub.add_parser("edit", help="edit an image towards a prompt (Plug-and-Play or SDEdit)",
                       description="Edit an image so that it shows the prompt while keeping its structure: "
                                   "Plug-and-Play (Tumanyan et al.) inverts the image with DDIM and injects its "
                                   "decoder features and self-attention into the generation; SDEdit noises it to "
                                   "--strength and denoises with the prompt. PNGs carry their settings.")
    p.add_argument("prompt", nargs="?", help="the target prompt")
    p.add_argument("--image", default=None, help="the image to edit (sides multiples of the VAE factor)")
    p.add_argument("--method", default=None, choices=["pnp", "sdedit"], help="pnp (default) or sdedit")
    p.add_argument("--strength", type=float, default=None, help="sdedit: how far the image is noised (0.75)")
    p.add_argument("--tau-f", type=float, default=None, help="pnp: fraction of the steps with feature injection (0.8)")
    p.add_argument("--tau-attn", type=float, default=None,
                   help="pnp: fraction of the steps with self-attention injection (0.5)")
    p.add_argument("--inversion-steps", type=int, default=None, help="pnp: DDIM inversion steps (1000, the paper's)")
    p.add_argument("--source-prompt", default=None, help="pnp: the prompt of the inversion and guidance pass (\"\")")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (50, DDIM)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (the model's recommended)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=None, help="seed (sdedit's noise; 0)")
    p.add_argument("--model", default=None, help="model folder or 'default'")
    p.add_argument("--out", default="outputs", help="output folder (outputs/)")
    p.add_argument("--from-png", default=None, metavar="FILE", help="re-create the edit a PNG's settings describe")
    p.set_defaults(func=run_edit)


def resolve_settings(args) -> dict:
    from chorus.generate_cli import read_png
    settings = dict(EDIT_DEFAULTS)
    if args.from_png:
        read, source, _ = read_png(args.from_png)
        if read.get("task") != "edit":
            raise ChorusError(f"{args.from_png} holds the settings of a generation, not of an edit; re-create it "
                              "with chorus generate --from-png.")
        settings.update({k: v for k, v in read.items() if k in settings})
    for key in ("prompt", "image", "method", "strength", "tau_f", "tau_attn", "inversion_steps", "steps", "guidance",
                "negative", "seed", "model", "source_prompt"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if not settings["prompt"]:
        raise ChorusError("Give the target prompt, e.g. chorus edit --image in.png \"a blue circle\".")
    if not settings["image"]:
        raise ChorusError("Give the image to edit: --image IN.png.")
    for key in ("tau_f", "tau_attn"):
        if not 0.0 <= float(settings[key]) <= 1.0:
            raise ChorusError(f"--{key.replace('_', '-')} is a fraction of the steps and must be in [0, 1], got "
                              f"{settings[key]}.")
    if int(settings["inversion_steps"]) < 1:
        raise ChorusError(f"--inversion-steps must be at least 1, got {settings['inversion_steps']}.")
    if int(settings["steps"]) < 1:
        raise ChorusError(f"--steps must be at least 1, got {settings['steps']}.")
    if not 0.0 < float(settings["strength"]) <= 1.0:
        raise ChorusError(f"--strength must be in (0, 1], got {settings['strength']}.")
    return settings


def load_image(path: str):
    from PIL import Image
    p = Path(path)
    if not p.is_file():
        raise ChorusError(f"The image {p} does not exist.")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ChorusError(f"Cannot read {p}: it is not an image ({e}).") from None


def run_edit(args) -> int:
    from chorus.generate_cli import _free_path, _save_png, _slug
    settings = resolve_settings(args)
    image = load_image(settings["image"])
    from chorus.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(settings["model"])
    from chorus.controls.plug_and_play import edit   # refuses a size that is not a multiple of the VAE factor
    if settings["guidance"] is None:
        settings["guidance"] = pipe.default_guidance
    out = edit(pipe, image, settings["prompt"], method=settings["method"], strength=float(settings["strength"]),
               tau_f=float(settings["tau_f"]), tau_attn=float(settings["tau_attn"]),
               inversion_steps=int(settings["inversion_steps"]), num_inference_steps=int(settings["steps"]),
               guidance_scale=float(settings["guidance"]), negative_prompt=settings["negative"],
               seed=int(settings["seed"]), source_prompt=settings["source_prompt"], progress=True)
    for note in out.notes:
        print(f"note: {note}", file=sys.stderr)
    result = out.images[0]
    s = dict(settings, task="edit", size=f"{result.height}x{result.width}", image=str(settings["image"]))
    path = _free_path(Path(args.out), f"edit-{int(settings['seed']):06d}-{_slug(settings['prompt'])}")
    _save_png(result, path, s)
    print(path)
    if args.from_png:
        import numpy as np
        from PIL import Image
        with Image.open(args.from_png) as ref:
            same = np.array_equal(np.asarray(ref.convert("RGB")), np.asarray(result))
        print(f"{'identical to' if same else 'DIFFERS from'} {args.from_png}")
    return 0
