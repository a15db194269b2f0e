"""The ControlNet control: residuals r = ControlNet(x_t, t, c, image) added to the UNet's skips and mid block.

One control per ControlNet, built for one run with its condition image and scale; in guess mode (the
repository's, diffusers' `guess_mode`) the residuals go to the conditional half of the guidance batch
only, ramped 0.1 → 1 from the first skip to the mid block.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chorus.controls.base import Control, ControlRun, merge_residuals  # noqa: F401
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
        w0, h0 = image.size
        if abs(w0 / h0 - width / height) > 0.02 * (width / height):
            raise ChorusError(f"The control image is {w0}×{h0} pixels, which cannot be brought to the output's "
                              f"{width}×{height} without distorting it (the aspect ratios differ); crop it to "
                              f"{width}:{height} or generate at its own aspect ratio.")
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


class ControlNetControl(Control):
    """ControlNet: r = ControlNet(x, t, context, image); UNet(x, …, skips + r·scale)."""

    def __init__(self, controlnet, image, scale: float = 1.0, guess_mode: bool = False):
        self.controlnet, self.image, self.scale, self.guess_mode = controlnet, image, float(scale), guess_mode
        self._image = None

    def bind(self, run: ControlRun, stack) -> None:
        check_controlnet_fits(self.controlnet, run.unet)
        self._image = control_image_tensor(self.image, run.height, run.width, run.batch)
        self._guided = run.guidance

    def release(self) -> None:
        self._image = None

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        cn = self.controlnet
        image = (self._image if self._image is not None else self.image).to(x.device, cn.dtype)
        context = unet_kwargs["encoder_hidden_states"]
        added = unet_kwargs.get("added_cond_kwargs")
        if self.guess_mode and self._guided:   # the conditional half only; the unconditional one sees no control
            half = x.shape[0] // 2
            cond_added = {k: v[half:] for k, v in added.items()} if added else None
            down, mid = cn(x[half:].to(cn.dtype), t[half:], context[half:].to(cn.dtype), image,
                           conditioning_scale=self.scale, added_cond_kwargs=cond_added, guess_mode=True)
            down = tuple(torch.cat([torch.zeros_like(r), r]) for r in down)
            mid = torch.cat([torch.zeros_like(mid), mid])
        else:
            if image.shape[0] != x.shape[0]:  # the [uncond, cond] batch of guidance sees the image twice
                image = image.repeat(x.shape[0] // image.shape[0], 1, 1, 1)
            down, mid = cn(x.to(cn.dtype), t, context.to(cn.dtype), image, conditioning_scale=self.scale,
                           added_cond_kwargs=added, guess_mode=self.guess_mode)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


CONTROLNET_MATCHED = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                      "down_block_types", "transformer_layers_per_block", "addition_embed_type",
                      "projection_class_embeddings_input_dim")


def check_controlnet_fits(controlnet, unet) -> None:
    """A ControlNet steers only a UNet whose encoder it copies: the fields that fix the residuals' shapes
    and the context must agree (the ones that differ are named)."""
    diffs = []
    for name in CONTROLNET_MATCHED:
        a, b = getattr(controlnet.config, name, None), getattr(unet.config, name, None)
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        if a is not None and b is not None and norm(a) != norm(b):
            diffs.append(f"{name}: ControlNet {norm(a)} vs UNet {norm(b)}")
    if diffs:
        raise ChorusError("This ControlNet was made for a different base model; it cannot steer this UNet. "
                          "Fields that differ: " + "; ".join(diffs) + ".")
