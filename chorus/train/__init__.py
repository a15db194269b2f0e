"""Training Chorus's models on one CPU or many GPUs (issue 4).

    config      typed dataclass configs, JSON I/O with unknown-field errors, PRESETS ("tiny", "default")
    data        the training stream: the on-the-fly Shapes world (deterministic in seed, step, rank),
                image folders and WebDataset shards; micro-conditioning from metadata; latent/text caches
    unet        the UNet trainer: ε/v prediction, min-SNR-γ, offset noise, EMA, per-embedder dropout
    checkpoint  atomic diffusers-format checkpoints, keep-last-K, exact resume
    distributed torchrun / accelerate environment → torch.distributed (gloo on CPU, NCCL on GPU), DDP
    recipe      a whole recipe in order: VAE → text encoder → UNet
    vae, text   the VAE and the world text encoders (their own trainers)
    cli         `chorus train`

`train_unet(cfg, out_dir)` is the Python entry point; `run_recipe(recipe, out_dir)` runs VAE → text
encoder → UNet in order and writes one model folder that `chorus generate --model DIR` and diffusers load.
"""
from __future__ import annotations


def __getattr__(name):  # lazy: `chorus train --help` stays cheap
    if name in ("UNetTrainConfig", "RecipeConfig", "PRESETS", "load_config", "preset"):
        from chorus.train import config
        return getattr(config, name)
    if name in ("train_unet", "UNetTrainer"):
        from chorus.train import unet
        return getattr(unet, name)
    if name == "run_recipe":
        from chorus.train.recipe import run_recipe
        return run_recipe
    raise AttributeError(name)
