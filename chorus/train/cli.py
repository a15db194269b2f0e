"""`chorus train`: a thin layer over chorus.train (presets, a config file, and the flags that matter).

    chorus train --preset tiny --out runs/tiny                 VAE → text encoder → UNet, minutes
    chorus train --preset default --out runs/default           the shipped model's recipe (3 UNet stages)
    chorus train --part unet --base MODEL --data DIR --out runs/ft --steps 2000
    chorus train --part lora --base default --rank 4 --out runs/lora      a LoRA (OUT/lora.safetensors)
    chorus train --part controlnet --condition layout --base default      a ControlNet (OUT/controlnet)
    chorus train --part experts --base default --splits 0.5 --steps 600  eDiff-I experts branched (OUT/model)
    chorus train --part refiner --base default --out runs/refiner          SDXL's refiner (OUT/model, --refiner)
    chorus train --out runs/default --resume                   continue after an interruption (even kill -9)
    torchrun --nproc_per_node 2 -m chorus train --preset tiny --part unet --base MODEL --out runs/ddp
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

from chorus.errors import ChorusError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the VAE, text encoder and UNet (a preset recipe or a config file)",
        description="Train Chorus's models on the built-in Shapes world (or an image folder / WebDataset shards). "
                    "A preset runs the whole recipe (VAE → text encoder → UNet) and writes OUT/model, a "
                    "diffusers-format folder that `chorus generate --model OUT/model` loads. Checkpoints in "
                    "OUT/checkpoints are model folders too; --resume continues exactly where a run stopped. "
                    "Runs under torchrun / accelerate launch (DDP).")
    p.add_argument("--preset", default=None, help="a preset recipe: tiny (minutes), default (the shipped model: VAE → text encoder → "
                        "3 UNet stages), default-v / default-grow (its stages 2 and 3 alone, on --base), "
                        "default-scratch (the one-stage recipe from scratch)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON config: a recipe {\"vae\": {...}, \"text\": {...}, \"unet\": {...}} or UNet fields")
    p.add_argument("--part", default=None, choices=["vae", "text", "unet", "lora", "controlnet", "experts", "refiner", "all"],
                   help="which part to train (default: all, or unet when --base is given); lora: a LoRA on the "
                        "frozen --base UNet, written to OUT/lora.safetensors (chorus.train.lora); controlnet: a "
                        "ControlNet on the frozen --base, written to OUT/controlnet (chorus.train.controlnet); experts: "
                        "eDiff-I's expert denoisers branched from --base, one per noise interval of --splits, written "
                        "to OUT/model (chorus.train.experts); refiner: SDXL's refiner, one expert on the lowest-noise 20 %% "
                        "of --base's schedule with the aesthetic (quality) score, written to OUT/model")
    p.add_argument("--condition", default=None, choices=["canny", "layout", "boxes"],
                   help="--part controlnet: the world condition it learns (layout)")
    p.add_argument("--splits", default=None, metavar="S1,S2,…",
                   help="--part experts: where one expert hands over to the next, as fractions of the sampling "
                        "schedule (0 = pure noise, diffusers' denoising_end): 0.5 → 2 experts, 0.2,0.8 → 3; none → "
                        "one model continued on the whole schedule (the equal-samples control). --steps is the "
                        "total, shared evenly")
    p.add_argument("--rank", type=int, default=None, help="--part lora: the LoRA's rank (4)")
    p.add_argument("--alpha", type=float, default=None, help="--part lora: the LoRA's alpha (default: the rank)")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of the part trained (UNet for all)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=None, help="keep the last K checkpoints")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the newest checkpoint in --out (or from CKPT)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (data, init, noise)")
    p.add_argument("--data", default=None, help="image folder or WebDataset shards (default: the on-the-fly world)")
    p.add_argument("--base", default=None, help="a pipeline folder giving the frozen VAE / text encoder / scheduler "
                                               "('default': the shipped model)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--sample-every", type=int, default=None, help="sample grid every N steps (0: at the end)")
    p.add_argument("--eval-every", type=int, default=None, help="benchmark score every N steps (0: off)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                   help="where to train: cuda (default when a GPU is there; under torchrun each rank takes "
                        "cuda:LOCAL_RANK) or cpu; mps is refused (the trainer runs on cpu or cuda)")
    p.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                   help="UNet-side training precision: auto (the presets' default unless they fix it: bf16 autocast "
                        "where the device has fast bf16 kernels, e.g. AMX / AVX512-BF16 CPUs and GPUs, else fp32), "
                        "bf16 (autocast) or fp32; the run's log says which it uses")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to OUT/logs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run_train)


def resolve(args):
    """(recipe, parts, out) from the flags: preset or config file, then the overrides."""
    from chorus.train.config import RecipeConfig, UNetTrainConfig, load_config, override, preset, read_config_file
    if args.preset and args.config:
        raise ChorusError("Give either --preset or --config, not both (a config file can start from a preset's "
                          "printout: chorus train --preset tiny --print-config > my.json).")
    if args.config:
        raw = read_config_file(args.config)
        if raw and set(raw) <= {"vae", "text", "unet", "stages"}:   # a recipe; anything else is a UNet config
            recipe = load_config(RecipeConfig, raw, "recipe")
        else:
            recipe = RecipeConfig(unet=load_config(UNetTrainConfig, raw, "UNet training"))
        name = Path(args.config).stem
    else:
        name = args.preset or "default"
        recipe = preset(name)
    unet = override(recipe.unet, steps=args.steps if _part(args, recipe) in ("unet", "all") else None,
                    save_every=args.save_every, keep_last=args.keep, seed=args.seed, data=args.data,
                    base=args.base, batch_size=args.batch_size, lr=args.lr, sample_every=args.sample_every,
                    eval_every=args.eval_every, mixed_precision=_precision(args))
    recipe = dataclasses.replace(recipe, unet=unet)
    part = _part(args, recipe)
    for key, value in (("steps", args.steps if part in ("vae", "text") else None), ("seed", args.seed)):
        if value is not None:
            recipe.vae = {**recipe.vae, key: value} if part in ("vae", "all") else recipe.vae
            recipe.text = {**recipe.text, key: value} if part in ("text", "all") else recipe.text
    parts = ("vae", "text", "unet") if part == "all" else (part,)
    out = Path(args.out) if args.out else _run_folder(args.resume) or Path(f"runs/{name}")
    return recipe, parts, out


def _precision(args) -> str | None:
    """--precision as the configs' mixed_precision field (fp32 → "no", accelerate's name)."""
    value = getattr(args, "precision", None)
    return {"fp32": "no"}.get(value, value)


def adapter_config_from_args(args, config_cls, what: str, flags: dict, default_out):
    """The config of a part trained on a frozen --base (a LoRA, a ControlNet) from --config / --base and the
    flags, or on --resume the checkpoint's own (only bookkeeping flags may change); → (config, out folder).
    `default_out(cfg)` names the folder when --out is not given."""
    from chorus.train import checkpoint as ckpt
    from chorus.train.config import load_config, override, read_config_file
    out = Path(args.out) if args.out else None
    if args.resume:
        where = out or _run_folder(args.resume)
        if where is None:
            raise ChorusError(f"--resume needs the run's folder: give --out FOLDER of the earlier {what} run.")
        state = ckpt.read_state(ckpt.latest_checkpoint(where if args.resume is True else Path(args.resume)))
        cfg = load_config(config_cls, state["config"], "checkpoint")
        return override(cfg, steps=args.steps, save_every=args.save_every, keep_last=args.keep,
                        sample_every=args.sample_every, eval_every=args.eval_every), where
    fields = read_config_file(args.config) if args.config else {}
    flags = {"base": args.base, "steps": args.steps, "save_every": args.save_every, "keep_last": args.keep,
             "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "sample_every": args.sample_every,
             "eval_every": args.eval_every, "mixed_precision": _precision(args), **flags}
    fields.update({k: v for k, v in flags.items() if v is not None})
    cfg = load_config(config_cls, fields, what)
    return cfg, out or Path(default_out(cfg))


def run_adapter(args, config_from_args, train) -> int:
    """`chorus train --part lora|controlnet`: resolve the config, print it or train; rank 0 prints the result."""
    from chorus.train.config import to_dict
    from chorus.train.distributed import env_world
    cfg, out = config_from_args(args)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    rank = env_world()[0]
    result = train(cfg, out, progress=not args.no_progress and rank == 0, resume=args.resume)
    if rank == 0:
        print(result)
    return 0


def _run_folder(resume) -> Path | None:
    """The run folder a `--resume PATH` points into (PATH itself, or the folder above checkpoints/)."""
    if resume in (None, False, True):
        return None
    p = Path(resume)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def _part(args, recipe) -> str:
    if args.part:
        return args.part
    u = recipe.unet
    return "unet" if (args.base or u.base or u.vae or u.text_encoder) else "all"


def resumed_unet_config(args, out: Path):
    """On --resume the checkpoint's own config is used; only bookkeeping flags may change."""
    from chorus.train.checkpoint import latest_checkpoint, read_state
    from chorus.train.config import UNetTrainConfig, load_config, override
    where = out if args.resume is True else Path(args.resume)
    state = read_state(latest_checkpoint(where))
    cfg = load_config(UNetTrainConfig, state["config"], "checkpoint")
    return override(cfg, steps=args.steps, save_every=args.save_every, keep_last=args.keep,
                    sample_every=args.sample_every, eval_every=args.eval_every)


def resume(args, recipe, parts, out: Path, progress: bool) -> Path:
    """--resume: the UNet from its newest checkpoint (with the checkpoint's config), or else the recipe's
    unfinished parts; a folder with neither is an error."""
    from chorus.train.checkpoint import checkpoints, latest_checkpoint
    from chorus.train.recipe import run_recipe
    from chorus.train.unet import train_unet
    where = out if args.resume is True else Path(args.resume)
    if "unet" in parts and (args.resume is not True or checkpoints(where)):
        latest_checkpoint(where)  # names the problem when `where` holds none
        return train_unet(resumed_unet_config(args, out), out, progress=progress, resume=args.resume)
    if not any((out / p).exists() for p in ("vae", "text")):
        latest_checkpoint(where)  # raises: nothing to resume from
    return run_recipe(recipe, out, parts, progress=progress, resume=True)


def check_device(device: str | None) -> None:
    """--device: refuse a device that is not there, or one the trainer cannot use, before any work."""
    if device is None:
        return
    from chorus.devices import resolve_device
    if device == "mps":
        raise ChorusError("chorus train runs on cpu or cuda (torch.distributed and its trainers have no mps path); "
                          "use --device cpu on a Mac.")
    resolve_device(device)


@contextlib.contextmanager
def train_device(device: str | None):
    """The trainers call chorus.train.distributed.setup() with no arguments; for the run, --device is passed to
    it as setup(device=...) (which uses CUDA when it is there unless told "cpu")."""
    if device is None:
        yield
        return
    from chorus.train import distributed as D
    original = D.setup
    D.setup = functools.partial(original, device=device)
    try:
        yield
    finally:
        D.setup = original


def run_train(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", None)
    check_device(device)
    with train_device(device):
        return _run_train(args)


def _run_train(args) -> int:
    from chorus.train.config import to_dict
    from chorus.train.distributed import env_world
    from chorus.train.recipe import run_recipe
    if args.part == "controlnet":
        from chorus.train.controlnet import run_from_args as run_controlnet
        return run_controlnet(args)
    if args.part == "refiner":
        from chorus.train.experts import run_refiner_from_args
        return run_refiner_from_args(args)
    if args.part == "experts":
        from chorus.train.experts import run_from_args as run_experts
        return run_experts(args)
    if args.part == "lora":
        from chorus.train.lora import run_from_args
        return run_from_args(args)
    recipe, parts, out = resolve(args)
    if args.print_config:
        print(json.dumps({"vae": recipe.vae, "text": recipe.text, "unet": to_dict(recipe.unet),
                          **({"stages": recipe.stages} if recipe.stages else {})}, indent=2))
        return 0
    rank = env_world()[0]
    progress = not args.no_progress and rank == 0
    if args.resume:
        result = resume(args, recipe, parts, out, progress)
    else:
        result = run_recipe(recipe, out, parts, progress=progress)
    if rank == 0:
        print(result)
    return 0
