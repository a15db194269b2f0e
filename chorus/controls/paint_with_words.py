"""Paint-with-words (eDiff-I, Balaji et al. 2022): a phrase of the prompt painted onto a region of the image.

In every cross-attention layer of the UNet, the logits of the painted phrase's tokens get a bonus inside its
region:

    Attention = softmax((QKᵀ + w·A) / √d) V,     w = w′ · log(1 + σ) · max(QKᵀ)

A (N_pixels × N_tokens) holds each phrase's mask, area-averaged to the layer's resolution, in the columns of the
phrase's tokens; σ is the step's noise level (large at the start, where the layout forms), max(QKᵀ) matches
the bonus to the logits' scale. Only the conditional half of the guidance batch is painted (the
reference code gives the unconditional branch weight 0); self-attention is untouched; training-free.

A region is a box [x0, y0, x1, y1] in pixels of the output image or the path of a mask image of the output's
size (white = painted). A phrase's tokens are found with each tokenizer's character offsets, for every text
encoder of the ensemble: their contexts are concatenated on the feature axis, so a context position holds
token k of every encoder, and a phrase paints the union of its positions.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chorus import samplers as S
from chorus.controls.base import Control, ControlRun
from chorus.errors import ChorusError


def region_mask(region, height: int, width: int) -> torch.Tensor:
    """(H, W) float mask in [0, 1] of a box [x0, y0, x1, y1] (pixels) or a mask image path / PIL / array."""
    from PIL import Image
    if isinstance(region, (list, tuple)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ChorusError(f"The box {list(region)} is not inside the {width}×{height} image (it must satisfy "
                              f"0 ≤ x0 < x1 ≤ {width} and 0 ≤ y0 < y1 ≤ {height}).")
        m = torch.zeros(height, width)
        m[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = 1.0
        return m
    if isinstance(region, (str, Path)):
        path = Path(region)
        if not path.is_file():
            raise ChorusError(f"The region mask {path} does not exist.")
        try:
            region = Image.open(path)
            region.load()
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's bad input
            raise ChorusError(f"The region mask {path} is not an image ({e}).") from None
    if isinstance(region, Image.Image):
        if region.size != (width, height):
            raise ChorusError(f"A region mask must be the output's size {width}×{height}; this one is "
                              f"{region.size[0]}×{region.size[1]}.")
        region = np.asarray(region.convert("L"), dtype=np.float32) / 255.0
    arr = torch.as_tensor(np.asarray(region, dtype=np.float32))
    if arr.shape != (height, width):
        raise ChorusError(f"A region mask must be {height}×{width} (H×W); got {tuple(arr.shape)}.")
    return arr.clamp(0, 1)


def phrase_chars(prompt: str, phrase: str) -> tuple[int, int]:
    """The character span of `phrase` in `prompt` (whole words, case-insensitive, the first occurrence)."""
    m = re.search(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", prompt, flags=re.IGNORECASE)
    if m is None:
        raise ChorusError(f"The region's phrase {phrase!r} is not in the prompt {prompt!r}; a region must name words "
                          "of the prompt.")
    return m.span()


def token_positions(tokenizer, prompt: str, span: tuple[int, int], max_length: int) -> list[int]:
    """Positions (in the encoder's padded window) of the tokens whose characters overlap `span`."""
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    positions = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < span[1] and e > span[0]]
    kept = [i for i in positions if i < max_length - 1]   # the window keeps max_length − 1 tokens and the end token
    if positions and not kept:
        raise ChorusError(f"The phrase at characters {span[0]}–{span[1]} lies past the text encoder's window of "
                          f"{max_length} tokens; shorten the prompt.")
    return kept


def phrase_tokens(conditioner, prompt: str, phrase: str) -> list[int]:
    """Context positions of a phrase: the union over the conditioner's text encoders that give a context."""
    from chorus.conditioning import TextEmbedder
    span = phrase_chars(prompt, phrase)
    out: set[int] = set()
    for e in conditioner.embedders:
        if isinstance(e, TextEmbedder) and e.context and getattr(e, "tokenizer", None) is not None:
            out |= set(token_positions(e.tokenizer, prompt, span, e.max_length))
    if not out:
        raise ChorusError(f"No text encoder of this model gives tokens for {phrase!r}.")
    return sorted(out)


class PaintWithWords(Control):
    """Bias the cross-attention of painted phrases towards their regions (see the module)."""

    def __init__(self, regions: dict, weight: float = 0.4, schedule: str = "log_sigma", until: float = 1.0):
        if not isinstance(regions, dict) or not regions:
            raise ChorusError("Paint-with-words needs regions: {\"phrase\": [x0, y0, x1, y1] or \"mask.png\", …}.")
        self.regions, self.weight = regions, float(weight)
        if schedule not in ("log_sigma", "constant"):
            raise ChorusError(f"schedule must be log_sigma (eDiff-I's) or constant, got {schedule!r}.")
        self.schedule, self.until = schedule, float(until)

    def bind(self, run: ControlRun, stack: contextlib.ExitStack) -> None:
        self.run = run
        masks, columns = [], []
        for phrase, region in self.regions.items():
            masks.append(region_mask(region, run.height, run.width))
            columns.append([phrase_tokens(run.stage.conditioner, p, phrase) for p in run.prompts])
        self.masks = torch.stack(masks)                   # (R, H, W)
        self.columns = columns                            # [region][image] → token positions
        self.sigmas = S.training_sigmas(run.stage.schedule)
        self.cache: dict[int, torch.Tensor] = {}
        stack.enter_context(run.unet.hooks(self.hook, names=lambda n: n.endswith("attn2")))

    def release(self) -> None:
        self.cache, self.run = {}, None

    def unet_call(self, x, t, unet_kwargs):
        t0 = int(torch.as_tensor(t).flatten()[0].round().clamp(0, len(self.sigmas) - 1))
        self.sigma = float(self.sigmas[t0])
        self.active = self.run.fraction_done(t) < self.until
        return {}

    def bias(self, lq: int, lk: int, device) -> torch.Tensor:
        """A (batch, Lq, Lk) for a layer of Lq pixels: each region's mask at the layer's size in its columns."""
        if lq not in self.cache:
            run = self.run
            h = int(round(math.sqrt(lq * run.height / run.width)))
            w = lq // h
            # the share of each cell the region covers (area averaging: an aligned box stays exactly 1 inside)
            small = F.interpolate(self.masks[:, None], size=(h, w), mode="area")[:, 0].reshape(len(self.masks), h * w)
            a = torch.zeros(run.batch, lq, lk)
            for r, per_image in enumerate(self.columns):
                for b, cols in enumerate(per_image):
                    cols = [c for c in cols if c < lk]
                    a[b][:, cols] = torch.maximum(a[b][:, cols], small[r][:, None])
            self.cache[lq] = a
        return self.cache[lq].to(device)

    def hook(self, name: str, kind: str, tensor: torch.Tensor):
        if kind != "logits" or not self.active or self.weight == 0:
            return None
        b2, heads, lq, lk = tensor.shape
        b = self.run.batch
        cond = tensor[b2 - b:]   # the conditional half (all of it without guidance)
        strength = self.weight * (math.log1p(self.sigma) if self.schedule == "log_sigma" else 1.0)
        # the logits here are QKᵀ/√d; (QKᵀ + w·A)/√d adds w′·log(1+σ)·max(QKᵀ/√d)·A to them
        scale = strength * cond.max()
        out = tensor.clone()
        out[b2 - b:] = cond + scale * self.bias(lq, lk, tensor.device)[:, None].to(tensor.dtype)
        return out


def read_regions(path) -> dict:
    """regions.json: {"phrase": [x0, y0, x1, y1] | "mask.png", …}; mask paths relative to the file."""
    import json
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ChorusError(f"Cannot read the regions file {path}: {e.strerror or e}.") from None
    except json.JSONDecodeError as e:
        raise ChorusError(f"The regions file {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict) or not data:
        raise ChorusError(f"The regions file {path} must hold an object {{\"phrase\": [x0, y0, x1, y1] or "
                          "\"mask.png\", …}.")
    out = {}
    for phrase, region in data.items():
        if isinstance(region, str):
            region = str((path.parent / region)) if not Path(region).is_absolute() else region
        elif not (isinstance(region, list) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region)):
            raise ChorusError(f"The region of {phrase!r} must be a box [x0, y0, x1, y1] in pixels or a mask image "
                              f"path; got {region!r}.")
        out[phrase] = region
    return out


__all__ = ["PaintWithWords", "region_mask", "phrase_tokens", "read_regions"]
