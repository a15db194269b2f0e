"""Random LoRA files for the LoRA tests, named from diffusers' own modules (not from Chorus's key map)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def module_shapes(model: torch.nn.Module, convs: bool = True, keep=lambda name: True) -> dict[str, tuple]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, kinds) and keep(n)}


def random_pair(shape: tuple, rank: int, g: torch.Generator, std: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): kohya's layout — a k×k conv down and a 1×1 conv up for a conv, matrices for a linear."""
    if len(shape) == 4:
        out, inn, kh, kw = shape
        down = torch.randn((rank, inn, kh, kw), generator=g) * std
        up = torch.randn((out, rank, 1, 1), generator=g) * std
    else:
        out, inn = shape
        down, up = torch.randn((rank, inn), generator=g) * std, torch.randn((out, rank), generator=g) * std
    return down, up


def kohya_lora(parts: dict[str, dict[str, tuple]], rank: int = 4, alpha: float | dict | None = 2.0, seed: int = 0,
               names=None) -> dict[str, torch.Tensor]:
    """{prefix: {module name: weight shape}} → kohya keys `{prefix}{name with . → _}.lora_down/up.weight` + `.alpha`.
    `names` may rename a module (e.g. a diffusers name to its LDM name) before the underscores."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, shapes in parts.items():
        for name, shape in shapes.items():
            down, up = random_pair(shape, rank, g)
            key = prefix + (names(name) if names else name).replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
            a = alpha.get(name, 2.0) if isinstance(alpha, dict) else alpha
            if a is not None:
                out[f"{key}.alpha"] = torch.tensor(float(a))
    return out


def peft_lora(parts: dict[str, dict[str, tuple]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"unet" / "text_encoder": {module: shape}} → diffusers/peft keys `{part}.{module}.lora_A/B.weight`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, shapes in parts.items():
        for name, shape in shapes.items():
            down, up = random_pair(shape, rank, g)
            out[f"{part}.{name}.lora_A.weight"], out[f"{part}.{name}.lora_B.weight"] = down, up
    return out


def save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    meta = {"format": "pt"}
    if metadata:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def attention_only(name: str) -> bool:
    return ".attentions." in name


def manual_merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 scale: float) -> torch.Tensor:
    """kohya's merge, computed here: W + s·(α/r)·up·down; for a k×k conv via conv2d (networks/lora.py)."""
    r = down.shape[0]
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    elif weight.dim() == 4:
        delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        delta = up @ down
    return weight + scale * (alpha / r) * delta
