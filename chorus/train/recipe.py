"""A whole recipe in order: the VAE, the text encoder, then the UNet on top of both.

    OUT/vae/        the trained AutoencoderKL           (chorus.train.vae.train_vae)
    OUT/text/       text_encoder/ + tokenizer/          (chorus.train.text.train_text_encoder)
    OUT/parts/ OUT/checkpoints/ OUT/logs/ OUT/samples/  the UNet run (chorus.train.unet)
    OUT/model/      the final diffusers-format model folder (EMA UNet + the frozen parts)

With `resume`, parts whose output is already complete are not trained again and the UNet continues
from its newest checkpoint.
"""
from __future__ import annotations

import dataclasses
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


def run_recipe(recipe: RecipeConfig, out_dir, parts=PARTS, progress: bool = True, resume: bool = False) -> Path:
    """Train the named parts in order; returns OUT/model (or the last part's folder)."""
    out = Path(out_dir)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ChorusError(f"Unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}.")
    from chorus.train.distributed import env_world
    if env_world()[1] > 1 and ({"vae", "text"} & set(parts)):
        raise ChorusError("The VAE and text-encoder trainers run in one process; under torchrun / accelerate launch "
                          "give --part unet (train the other parts first with plain `chorus train --part vae` and "
                          "`--part text` into the same --out).")
    result = out
    if "vae" in parts:
        result = out / "vae" if resume and _vae_done(out / "vae") else run_vae(recipe, out, progress)
    if "text" in parts:
        result = out / "text" if resume and _text_done(out / "text") else run_text(recipe, out, progress)
    if "unet" in parts:
        from chorus.train.checkpoint import checkpoints
        from chorus.train.unet import train_unet
        resume_unet = resume and bool(checkpoints(out))
        result = train_unet(unet_config_for(recipe, out), out, progress=progress, resume=resume_unet)
    return result
