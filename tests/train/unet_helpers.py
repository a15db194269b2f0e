"""Shared pieces of the UNet-trainer tests: a tiny config over the tiny SD / SDXL folders of tests/tiny.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from chorus.train.config import UNetTrainConfig, to_dict

ROOT = Path(__file__).resolve().parents[2]

# 16×16 latents (the tiny VAE halves 32 px); attention only at the 8×8 level, so a step takes milliseconds
TINY_UNET = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def tiny_config(base, **changes) -> UNetTrainConfig:
    fields = dict(base=str(base), unet=dict(TINY_UNET), resolution=32, epoch_size=64, batch_size=8, steps=4,
                  save_every=2, keep_last=2, log_every=1, lr=1e-3, warmup_steps=2, sample_prompts=(),
                  mixed_precision="no", ema_decay=0.9)
    fields.update(changes)
    return UNetTrainConfig(**fields)


def write_config(cfg: UNetTrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(to_dict(cfg), indent=1))
    return path


def raw_weights(out: Path, step: int | None = None) -> dict:
    """The optimised (raw) UNet weights of the newest (or a given) checkpoint of a run."""
    from chorus.train.checkpoint import checkpoints
    found = dict(checkpoints(out))
    ckpt = found[step if step is not None else max(found)]
    f = ckpt / "trainer" / "unet.safetensors"
    return load_file(str(f if f.is_file() else ckpt / "unet" / "diffusion_pytorch_model.safetensors"))


def ema_weights(out: Path, step: int | None = None) -> dict:
    from chorus.train.checkpoint import checkpoints
    found = dict(checkpoints(out))
    return load_file(str(found[step if step is not None else max(found)] / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def chorus_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def chorus_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "chorus", *map(str, args)]


def run_chorus(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(chorus_cmd(*args), env=chorus_env(), capture_output=True, text=True, timeout=timeout)
