"""A whole recipe in order: the VAE, the text encoder, then the UNet on top of both.

    OUT/vae/        the trained AutoencoderKL           (chorus.train.vae.train_vae)
    OUT/text/       text_encoder/ + tokenizer/          (chorus.train.text.train_text_encoder)
    OUT/parts/ OUT/checkpoints/ OUT/logs/ OUT/samples/  the UNet run (chorus.train.unet)
    OUT/model/      the final diffusers-format model folder (EMA UNet + the frozen parts)

With `resume`, parts whose output is already complete are not trained again and the UNet continues
from its newest checkpoint. Every part trains under torchrun / accelerate launch: the UNet on every
rank (DDP), the VAE and the text encoder on rank 0 while the others wait.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from chorus.errors import ChorusError
from chorus.train.config import RecipeConfig, UNetTrainConfig, load_config

PARTS = ("vae", "text", "unet")


def _vae_done(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _text_done(folder: Path) -> bool:
    return (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()


def run_vae(recipe: RecipeConfig, out: Path, progress: bool) -> Path:
    try:
        from chorus.train.vae import VAETrainConfig, train_vae
    except ImportError as e:
        raise ChorusError(f"The VAE trainer (chorus.train.vae) is not available in this build ({e}); "
                          "train the UNet on an existing VAE with --base or a `vae` folder.") from None
    return Path(train_vae(load_config(VAETrainConfig, recipe.vae, "vae"), out / "vae", progress=progress))


def run_text(recipe: RecipeConfig, out: Path, progress: bool) -> Path:
    try:
        from chorus.train.text import TextTrainConfig, train_text_encoder
    except ImportError as e:
        raise ChorusError(f"The text-encoder trainer (chorus.train.text) is not available in this build ({e}); "
                          "train the UNet on an existing text encoder with --base or a `text_encoder` folder.") from None
    cfg = load_config(TextTrainConfig, recipe.text, "text")
    try:
        return Path(train_text_encoder(cfg, out / "text", progress=progress))
    except TypeError:  # a trainer without a progress switch
        return Path(train_text_encoder(cfg, out / "text"))


def unet_config_for(recipe: RecipeConfig, out: Path) -> UNetTrainConfig:
    """The UNet part reads the VAE and text encoder the earlier parts wrote (unless it names its own)."""
    cfg = recipe.unet
    changes = {}
    if not cfg.base and not cfg.vae:
        changes["vae"] = str(out / "vae")
    if not cfg.base and not cfg.text_encoder:
        changes["text_encoder"] = str(out / "text")
    return dataclasses.replace(cfg, **changes)


def _one_process(name: str, done, train, out: Path, log=print):
    """Run a one-process part (the VAE, the text encoder) under torchrun / accelerate launch: rank 0 trains
    it while the other ranks wait for its output folder (polling the shared --out, so a part that takes
    longer than the process group's timeout is no problem); a failure on rank 0 stops every rank."""
    from chorus.train.distributed import env_world
    rank, world, _ = env_world()
    if world == 1:
        return train()
    failed = out / f".{name}-failed"
    if rank == 0:
        failed.unlink(missing_ok=True)
        log(f"train: the {name} part runs in one process (rank 0 of {world}); the other ranks wait for it")
        try:
            return train()
        except BaseException as e:
            out.mkdir(parents=True, exist_ok=True)
            failed.write_text(str(e) or type(e).__name__)
            raise
    while not done():
        if failed.is_file():
            raise ChorusError(f"The {name} part failed on rank 0: {failed.read_text()}")
        time.sleep(2.0)
    return out / name


def run_recipe(recipe: RecipeConfig, out_dir, parts=PARTS, progress: bool = True, resume: bool = False) -> Path:
    """Train the named parts in order; returns OUT/model (or the last part's folder).

    Under torchrun / accelerate launch the UNet runs data-parallel on every rank and the small VAE and
    text-encoder parts run on rank 0 (`_one_process`). A UNet part whose recipe trains its own VAE and
    text encoder into --out trains them first when they are not there yet (a fresh --out)."""
    out = Path(out_dir)
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ChorusError(f"Unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}.")
    if "unet" in parts and not recipe.unet.base:
        needed = tuple(p for p, folder, done, own in (("vae", out / "vae", _vae_done, recipe.unet.vae),
                                                       ("text", out / "text", _text_done, recipe.unet.text_encoder))
                       if not own and not done(folder) and p not in parts)
        if needed:
            print(f"train: {out} has no trained {' or '.join(needed)} yet; training {'/'.join(needed)} first "
                  "(the UNet part trains on them)")
            parts = tuple(p for p in PARTS if p in parts or p in needed)
    result = out
    if "vae" in parts:
        result = out / "vae" if resume and _vae_done(out / "vae") else \
            _one_process("vae", lambda: _vae_done(out / "vae"), lambda: run_vae(recipe, out, progress), out)
    if "text" in parts:
        result = out / "text" if resume and _text_done(out / "text") else \
            _one_process("text", lambda: _text_done(out / "text"), lambda: run_text(recipe, out, progress), out)
    if "unet" in parts:
        from chorus.train.checkpoint import checkpoints
        from chorus.train.unet import train_unet
        done = (out / "model" / "unet" / "config.json").is_file() and recipe.stages
        if done and resume:
            result = out / "model"
        else:
            result = train_unet(unet_config_for(recipe, out), out, progress=progress,
                                resume=resume and bool(checkpoints(out)))
        result = run_stages(recipe, out, result, progress, resume)
    return result


def run_stages(recipe: RecipeConfig, out: Path, model: Path, progress: bool, resume: bool) -> Path:
    """The recipe's later UNet stages, each on the previous stage's model folder (its base)."""
    from chorus.train.checkpoint import checkpoints
    from chorus.train.config import UNetTrainConfig, load_config
    from chorus.train.unet import train_unet
    for k, fields in enumerate(recipe.stages, start=2):
        stage_out = out / f"stage-{k}"
        if resume and (stage_out / "model" / "unet" / "config.json").is_file():
            model = stage_out / "model"
            continue
        cfg = load_config(UNetTrainConfig, {**fields, "base": str(model)}, f"stage {k}")
        print(f"train: stage {k} of {len(recipe.stages) + 1} on {model} → {stage_out}")
        model = train_unet(cfg, stage_out, progress=progress, resume=resume and bool(checkpoints(stage_out)))
    return model
