"""`chorus generate` and `chorus info`."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from chorus.errors import ChorusError
from chorus.formats.lora import TAG as LORA_TAG
from chorus.models.io import atomic_write, read_json

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}
SETTINGS = ("prompt", "negative", "seed", "steps", "sampler", "guidance", "size", "model")
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def register(sub) -> None:
    p = sub.add_parser("generate", help="make images from a prompt",
                       description="Generate images from a text prompt with a diffusers-format model folder "
                                   "(default: the model that ships with Chorus). Prompts are read as A1111 reads "
                                   "them: (word:1.2), (word), [word], long prompts in 75-token windows, BREAK. "
                                   "Each PNG carries its settings in PNG text chunks (Chorus's and A1111's "
                                   "`parameters`); --from-png re-creates one exactly, and reads a PNG that has "
                                   "only A1111's chunk too.")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("--model", default=None, help="model folder, or 'default' (the shipped model)")
    p.add_argument("--refiner", default=None, help="a refiner folder (SDXL's, or Chorus's world refiner: "
                   "default-refiner): one more expert, for the steps after --switch-at")
    p.add_argument("--switch-at", type=float, default=0.8, help="where the refiner takes over (fraction, 0.8)")
    p.add_argument("--controlnet", default=None, help="a ControlNet folder or single file (a control of the UNet); "
                   "default-layout: the shipped world ControlNet")
    p.add_argument("--control-image", default=None, help="the condition image for --controlnet (edges, layout, …)")
    p.add_argument("--control-scale", type=float, default=None, help="ControlNet conditioning scale (1.0)")
    p.add_argument("--guess-mode", action="store_true", default=None,
                   help="ControlNet's guess mode: the control on the conditional branch only, ramped 0.1 → 1")
    p.add_argument("--regions", default=None, metavar="FILE",
                   help="paint-with-words: a JSON file {\"phrase\": [x0, y0, x1, y1] | \"mask.png\", …} (boxes in pixels)")
    p.add_argument("--region-weight", type=float, default=None, help="paint-with-words strength w′ (0.4)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (.safetensors, kohya or diffusers format) at WEIGHT (1.0); repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where <lora:NAME:WEIGHT> prompt tags find NAME.safetensors (also looked for beside the model)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommended steps from "
                   "its sampling_defaults.json, else 20)")
    p.add_argument("--sampler", default=None, help="sampler (dpmpp_2m); see `chorus generate --list-samplers`")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's recommended "
                   "scale from its sampling_defaults.json, else 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (0)")
    p.add_argument("--n", type=int, default=4, help="number of images (4)")
    p.add_argument("--size", default=None, help="HxW in pixels (the model's default size)")
    p.add_argument("--original-size", default=None, metavar="HxW",
                   help="SDXL micro-conditioning: the original size to condition on (default: the output size)")
    p.add_argument("--crop", default=None, metavar="TOP,LEFT",
                   help="SDXL micro-conditioning: the crop corner to condition on (default 0,0)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="A1111's clip skip: 1 = the text encoder's last layer (default), 2 = the one below it "
                        "(diffusers' clip_skip is N-1)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet first (a minute or two on a CPU; pays for many images, not a few)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES),
                   help="precision of the models: fp32 (default), fp16 or bf16 (fp16 VAEs decode in fp32 when "
                        "their config says force_upcast)")
    p.add_argument("--out", default="outputs", help="output folder (outputs/)")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="re-create the image FILE from its settings (Chorus's chunk, or else A1111's `parameters`)")
    p.add_argument("--list-samplers", action="store_true", help="list the samplers and exit")
    p.set_defaults(func=run_generate)


def register_info(sub) -> None:
    p = sub.add_parser("info", help="say what a model folder holds")
    p.add_argument("path", help="a diffusers-format pipeline or component folder")
    p.set_defaults(func=run_info)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text) or re.fullmatch(r"\s*(\d+)\s*", text)
    if not m:
        raise ChorusError(f"--size must look like HxW (e.g. 64x64) or a single number, got {text!r}.")
    h = int(m.group(1))
    return h, int(m.group(2)) if m.lastindex == 2 else h


def read_png_settings(path: str) -> dict:
    """The settings a PNG carries: Chorus's `chorus` chunk, or else those of A1111's `parameters` chunk."""
    return read_png(path)[0]


def read_png(path: str) -> tuple[dict, str, list[str]]:
    """(settings, source 'chorus' | 'parameters', what of A1111's infotext could not be applied)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        raise ChorusError(f"Cannot read {path} as a PNG ({e}).") from None
    if "chorus" in text:
        try:
            return json.loads(text["chorus"]), "chorus", []
        except ValueError as e:
            raise ChorusError(f"The 'chorus' PNG text chunk of {path} is not valid JSON ({e}).") from None
    if text.get("parameters", "").strip():
        settings, unmapped = settings_from_parameters(text["parameters"])
        return settings, "parameters", unmapped
    raise ChorusError(f"{path} carries no generation settings: neither Chorus's 'chorus' PNG text chunk nor "
                      "A1111's 'parameters' chunk.")


def settings_from_parameters(info: str) -> tuple[dict, list[str]]:
    """A1111's infotext → Chorus settings (prompt, negative, steps, sampler, CFG scale, seed, size, clip skip,
    Karras schedule) and the fields that were not applied. A1111's Size is WxH, Chorus's size HxW."""
    from chorus.serve.metadata import parse_infotext, settings_from_a1111
    params = parse_infotext(info)
    form, unmapped = settings_from_a1111(params)
    settings: dict = {"prompt": form.get("prompt") or None, "negative": form.get("negative") or None}
    for key in ("steps", "seed", "guidance"):
        if form.get(key) is not None:
            settings[key] = form[key]
    if "Sampler" in params:
        settings["sampler"] = form.get("sampler")   # None: not a Chorus sampler (unmapped names it)
    if form.get("karras") is not None:
        settings["karras"] = form["karras"]
    if form.get("width") and form.get("height"):
        settings["size"] = f"{form['height']}x{form['width']}"
    if "Clip skip" in params:
        try:
            settings["clip_skip"] = int(params["Clip skip"])
            unmapped = [u for u in unmapped if u != "Clip skip"]
        except ValueError:
            pass
    if params.get("Model"):
        unmapped.append(f"Model: {params['Model']} (pass --model)")
    if "Denoising strength" in params:
        unmapped.append("Denoising strength (an img2img or hires-fix pass; chorus generate is text-to-image)")
    return settings, unmapped


def parse_pair(text, flag: str, sep: str, form: str) -> tuple[int, int]:
    """Two non-negative integers 'AxB' / 'A,B' (a micro-conditioning size or crop corner)."""
    parts = str(text).lower().replace(" ", "").split(sep)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ChorusError(f"{flag} must be two non-negative integers as {form}; got {text!r}.")
    return int(parts[0]), int(parts[1])


def parse_lora_flag(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] → (FILE, WEIGHT); a FILE with ':' in it (C:\\…) keeps it."""
    path, sep, weight = str(text).rpartition(":")
    if not sep or ("/" in weight or "\\" in weight) or not weight.strip():
        return str(text), 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ChorusError(f"--lora takes FILE[:WEIGHT] with a number as WEIGHT, got {text!r}.") from None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _save_png(image, path: Path, settings: dict) -> None:
    """Chorus's chunks (one per setting, and all of them as JSON) and A1111's `parameters` infotext."""
    from PIL.PngImagePlugin import PngInfo

    from chorus.serve.metadata import infotext
    info = PngInfo()
    for k in SETTINGS:
        info.add_text(k, "" if settings.get(k) is None else str(settings[k]))
    info.add_text("chorus", json.dumps(settings, sort_keys=True))
    info.add_itxt("parameters", infotext(settings, Path(str(settings.get("model") or "default")).stem))
    atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def _free_path(folder: Path, stem: str) -> Path:
    """A file name that overwrites nothing."""
    path, k = folder / f"{stem}.png", 1
    while path.exists():
        path, k = folder / f"{stem}-{k}.png", k + 1
    return path


def run_generate(args) -> int:
    from chorus import samplers
    if args.list_samplers:
        print("\n".join(sorted(samplers.SAMPLERS)))
        return 0
    settings = {"prompt": args.prompt, "negative": args.negative, "seed": 0, "steps": None, "sampler": "dpmpp_2m",
                "guidance": None, "size": None, "model": "default", "refiner": None, "controlnet": None,
                "control_image": None, "control_scale": 1.0, "original_size": None, "crop": None, "lora": [],
                "lora_dir": None, "clip_skip": 1, "karras": None, "device": "cpu", "dtype": "fp32",
                "guess_mode": False, "regions": None, "region_weight": 0.4}
    n = args.n
    source = None
    if args.from_png:
        read, source, unmapped = read_png(args.from_png)
        settings.update(read)
        n = 1
        if unmapped:
            print(f"note: these settings of {args.from_png}'s A1111 parameters were not applied: "
                  f"{', '.join(unmapped)}", file=sys.stderr)
    for key, value in (("prompt", args.prompt), ("negative", args.negative), ("seed", args.seed),
                       ("steps", args.steps), ("sampler", args.sampler), ("guidance", args.guidance),
                       ("size", args.size), ("model", args.model), ("refiner", args.refiner),
                       ("controlnet", args.controlnet), ("control_image", args.control_image),
                       ("control_scale", args.control_scale), ("original_size", args.original_size),
                       ("crop", args.crop), ("lora", args.lora), ("lora_dir", args.lora_dir),
                       ("clip_skip", args.clip_skip), ("device", args.device), ("dtype", args.dtype),
                       ("guess_mode", args.guess_mode), ("region_weight", args.region_weight)):
        if value is not None:
            settings[key] = value
    if not settings["prompt"]:
        raise ChorusError("Give a prompt, e.g. chorus generate \"a red circle to the left of a blue square\".")
    if n < 1:
        raise ChorusError(f"--n must be at least 1, got {n}.")
    if settings["sampler"] is None:
        raise ChorusError(f"The sampler of {args.from_png} is not one Chorus has; pick one with --sampler "
                          f"({', '.join(sorted(samplers.SAMPLERS))}).")
    samplers.get_sampler(settings["sampler"])  # fail before loading the model
    clip_skip = settings["clip_skip"]
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ChorusError(f"--clip-skip must be a whole number ≥ 1 (1 = the last layer), got {clip_skip!r}.")
    from chorus.devices import resolve_device, resolve_dtype
    device = resolve_device(settings["device"])   # before loading: an absent GPU is one clear error
    if settings["dtype"] not in DTYPE_NAMES:
        raise ChorusError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {settings['dtype']!r}.")
    dtype = resolve_dtype(settings["dtype"])
    size = parse_size(str(settings["size"])) if settings["size"] else None
    original = parse_pair(settings["original_size"], "--original-size", "x", "HxW, e.g. 64x64") \
        if settings["original_size"] else None
    crop = parse_pair(settings["crop"], "--crop", ",", "TOP,LEFT, e.g. 0,0") if settings["crop"] else None
    loras = [parse_lora_flag(t) for t in settings["lora"] or []]
    if args.regions:
        from chorus.controls import read_regions
        settings["regions"] = read_regions(args.regions)   # kept in the PNG: --from-png paints the same
    controls = []
    if settings["regions"]:
        from chorus.controls import PaintWithWords
        controls.append(PaintWithWords(settings["regions"], weight=float(settings["region_weight"])))

    import torch
    from chorus.pipeline import Pipeline
    control = None
    if settings["controlnet"]:
        if not settings["control_image"]:
            raise ChorusError("--controlnet needs --control-image (the condition image: edges, layout, …).")
        from PIL import Image
        try:
            control = Image.open(settings["control_image"]).convert("RGB")
        except (OSError, ValueError) as e:
            raise ChorusError(f"Cannot read the control image {settings['control_image']}: it is not an image "
                              f"({e}).") from None
    pipe = Pipeline.from_pretrained(settings["model"], refiner=settings["refiner"], switch_at=args.switch_at,
                                    controlnet=settings["controlnet"])
    for path, weight in loras:
        pipe.load_lora(path, weight)
    if settings["lora_dir"]:
        pipe.lora_dirs = [settings["lora_dir"]]
    pipe.to(device=device, dtype=dtype)
    if getattr(args, "compile", False):
        pipe.compile()
    h, w = size or (pipe.default_size, pipe.default_size)
    settings["size"] = f"{h}x{w}"
    if settings["guidance"] is None:   # the model's recommended scale (sampling_defaults.json), else 5
        settings["guidance"] = pipe.default_guidance
    if settings["steps"] is None:      # the model's recommended steps (sampling_defaults.json), else 20
        settings["steps"] = pipe.default_steps
    seed = int(settings["seed"])
    folder = Path(args.out)
    for i in range(n):
        # one image per call, seeded with seed+i: each PNG's settings re-create it bit for bit
        out = pipe(settings["prompt"], negative_prompt=settings["negative"], num_inference_steps=int(settings["steps"]),
                   guidance_scale=float(settings["guidance"]), height=h, width=w,
                   generator=torch.Generator("cpu").manual_seed(seed + i), sampler=settings["sampler"],
                   control_image=control, controlnet_conditioning_scale=float(settings["control_scale"]),
                   guess_mode=bool(settings["guess_mode"]), controls=controls, original_size=original, crop_top_left=crop, clip_skip=clip_skip, karras=settings["karras"])
        for note in out.notes if i == 0 else ():
            print(f"note: {note}", file=sys.stderr)
        image = out.images[0]
        s = dict(settings, seed=seed + i)
        path = _free_path(folder, f"{seed + i:06d}-{_slug(LORA_TAG.sub(' ', s['prompt']))}")
        _save_png(image, path, s)
        print(path)
        if args.from_png:
            import numpy as np
            from PIL import Image
            with Image.open(args.from_png) as ref:
                same = np.array_equal(np.asarray(ref.convert("RGB")), np.asarray(image))
            why = "" if same or source == "chorus" else \
                " (re-made from its A1111 parameters: A1111's noise and samplers are not Chorus's)"
            print(f"{'identical to' if same else 'DIFFERS from'} {args.from_png}{why}")
    return 0


# --- chorus info ------------------------------------------------------------------------------------
def _tensor_stats(folder: Path) -> tuple[int, set]:
    """Parameter count and dtypes from safetensors headers (no weights loaded)."""
    from safetensors import safe_open
    count, dtypes = 0, set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                count += n
                dtypes.add(SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    return count, dtypes


def describe_unet(cfg: dict) -> str:
    """Name the architecture a UNet config describes."""
    if cfg.get("addition_embed_type") == "text_time":
        n = cfg.get("projection_class_embeddings_input_dim")
        return {2816: "SDXL base UNet", 2560: "SDXL refiner UNet"}.get(n, f"SDXL-style UNet (added vector {n})")
    ctx = cfg.get("cross_attention_dim")
    if cfg.get("use_linear_projection") and ctx == 1024:
        return "Stable Diffusion 2.x UNet"
    if ctx == 768 and tuple(cfg.get("block_out_channels", ())) == (320, 640, 1280, 1280):
        return "Stable Diffusion 1.x UNet"
    return f"SD-style UNet (context {ctx}, channels {cfg.get('block_out_channels')})"


def run_info(args) -> int:
    root = Path(args.path)
    if str(args.path) == "default":
        from chorus.pipeline import default_model_path
        root = default_model_path()
    if not root.is_dir():
        raise ChorusError(f"{root} is not a folder.")
    components = [root] if (root / "config.json").is_file() else sorted(
        p for p in root.iterdir() if p.is_dir() and any((p / n).is_file() for n in ("config.json", "scheduler_config.json", "tokenizer_config.json", "vocab.json")))
    if not components:
        raise ChorusError(f"{root} holds no diffusers-format components (no config.json in it or its subfolders).")
    print(f"{root}")
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        print(f"  pipeline: {index.get('_class_name', '?')}")
        from chorus.conditioning import read_conditioner_spec
        spec = read_conditioner_spec(root)
        if spec is not None:
            names = ", ".join(f"{e['name']} (dropout {e['dropout']:g})" for e in spec)
            print(f"  conditioner: {names} — from conditioner.json; diffusers' pipelines cannot express this "
                  "ensemble, so only Chorus loads the folder whole (its unet/, vae/ and text_encoder/ load in "
                  "diffusers one by one)")
        from chorus.experts import read_experts_spec
        experts = read_experts_spec(root)
        if experts is not None:
            parts = ", ".join(f"{e['name']} [{e['start']:g}, {e['end']:g}) → {e['unet'] or e['folder']}" for e in experts)
            print(f"  experts: {parts} — from experts.json; Chorus samples each interval with its own expert, "
                  f"diffusers loads the folder as its first expert ({experts[0]['name']}) alone")
    total = 0
    for comp in components:
        cfg_path = next((comp / n for n in ("config.json", "scheduler_config.json") if (comp / n).is_file()), None)
        cfg = read_json(cfg_path) if cfg_path else {}
        cls = cfg.get("_class_name") or cfg.get("architectures", ["?"])[0] if cfg else "tokenizer"
        what = describe_unet(cfg) if cls == "UNet2DConditionModel" else cls
        count, dtypes = _tensor_stats(comp)
        total += count
        extra = f", {count:,} parameters, {'/'.join(sorted(dtypes))}" if count else ""
        print(f"  {comp.name if comp != root else '.'}: {what}{extra}")
    print(f"  total parameters: {total:,}")
    return 0
