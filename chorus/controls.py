"""Controls: things that hook into one UNet call (seminar: "additional-model" methods).

ControlNet adds residuals to the UNet's skip connections and mid block; Plug-and-Play injects
features and self-attention from a guidance pass (it uses the UNet's named hooks). A control is a
callable `control(x, t, unet_kwargs) -> extra UNet kwargs`, built for one generation call.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chorus.errors import ChorusError


def control_image_tensor(image, height: int, width: int, batch: int) -> torch.Tensor:
    """A condition image (PIL, array or tensor) as (batch, C, H, W) in [0, 1], resized to the output size."""
    from PIL import Image
    if isinstance(image, torch.Tensor):
        t = image.float()
        t = t[None] if t.dim() == 3 else t
    else:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ChorusError(f"A control image must be a PIL image, an array or a tensor, not {type(image).__name__}.")
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if t.shape[-2:] != (height, width):
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    if t.shape[0] == 1 and batch > 1:
        t = t.repeat_interleave(batch, 0)
    if t.shape[0] != batch:
        raise ChorusError(f"Got {t.shape[0]} control images for a batch of {batch}.")
    return t


class ControlNetControl:
    """ControlNet: r = ControlNet(x, t, context, image); UNet(x, …, skips + r·scale)."""

    def __init__(self, controlnet, image: torch.Tensor, scale: float = 1.0, guess_mode: bool = False):
        self.controlnet, self.image, self.scale, self.guess_mode = controlnet, image, float(scale), guess_mode

    def __call__(self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        cn = self.controlnet
        image = self.image.to(x.device, cn.dtype)
        if image.shape[0] != x.shape[0]:  # the [uncond, cond] batch of guidance sees the image twice
            image = image.repeat(x.shape[0] // image.shape[0], 1, 1, 1)
        down, mid = cn(x.to(cn.dtype), t, unet_kwargs["encoder_hidden_states"].to(cn.dtype), image,
                       conditioning_scale=self.scale, added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
                       guess_mode=self.guess_mode)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def merge_residuals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Several ControlNets at once: their residuals add (diffusers' MultiControlNet)."""
    if not a:
        return b
    return {"down_block_additional_residuals": tuple(x + y for x, y in zip(a["down_block_additional_residuals"],
                                                                              b["down_block_additional_residuals"])),
            "mid_block_additional_residual": a["mid_block_additional_residual"] + b["mid_block_additional_residual"]}
