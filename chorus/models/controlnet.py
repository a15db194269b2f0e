"""ControlNet: a trainable copy of the UNet's encoder that steers a frozen UNet through zero convolutions.

    c_f = E(c_i)                                   condition image → latent-sized features
    h   = conv_in(x_t) + c_f                       then the copied down blocks and mid block
    r_k = Z_k(skip_k) · scale,  r_mid = Z_mid(h) · scale   (Z: 1×1 convs initialised to zero)

The UNet adds r_k to its k-th skip connection and r_mid after its mid block. Because every Z starts
at zero, a fresh ControlNet changes nothing; training grows the control from there.
Layout and keys are those of diffusers' `ControlNetModel`; the encoder is `UNetEncoder`, the very
classes the UNet is built from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chorus.errors import ChorusError
from chorus.models.layers import without_slow_cpu_autocast
from chorus.models.unet import (ENCODER_SUPPORTED, UNet, UNetEncoder, check_call_options, check_supported,
                                context_bias, encoder_spec)


@dataclass
class ControlNetConfig:
    """diffusers' `ControlNetModel` config.json fields, with diffusers' defaults."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple | None = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64


CONTROLNET_SUPPORTED = {**ENCODER_SUPPORTED, "controlnet_conditioning_channel_order": ("rgb", "bgr")}


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1×1 convolution whose weight and bias start at zero."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """E(c) = conv_out(SiLU(…SiLU(conv_in(c))…)): 3×3 convs, a stride-2 conv per level; conv_out starts at zero."""

    def __init__(self, embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: Tensor) -> Tensor:
        """(B, C_cond, 2^k·H, 2^k·W) → (B, C0, H, W)."""
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def skip_channels(config: ControlNetConfig) -> list[int]:
    """Channels of each UNet skip connection: conv_in, then every down-block layer and downsampler."""
    spec = encoder_spec(config, "ControlNet")
    out = [spec.channels[0]]
    for level, c in enumerate(spec.channels):
        out += [c] * spec.layers[level] + ([c] if level < len(spec.channels) - 1 else [])
    return out


class ControlNet(UNetEncoder):
    """Residuals for the UNet's skips and mid block from a condition image (diffusers' ControlNetModel)."""

    config_class = ControlNetConfig
    diffusers_class_name = "ControlNetModel"

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        check_supported(config, CONTROLNET_SUPPORTED, "ControlNet")
        if config.conditioning_embedding_out_channels is None:
            raise ChorusError("ControlNet config field conditioning_embedding_out_channels=None is not supported.")
        self.build_encoder(encoder_spec(config, "ControlNet"))
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.block_out_channels[0], config.conditioning_channels, tuple(config.conditioning_embedding_out_channels))
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c) for c in skip_channels(config))
        self.controlnet_mid_block = zero_conv(config.block_out_channels[-1])

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3,
                  controlnet_conditioning_channel_order: str = "rgb") -> "ControlNet":
        """A ControlNet shaped like `unet`'s encoder, optionally starting from its weights (zero convs at 0)."""
        copied = {name: getattr(unet.config, name) for name in ControlNetConfig.__dataclass_fields__
                  if hasattr(unet.config, name)}
        copied.update(conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                      conditioning_channels=conditioning_channels,
                      controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
        with torch.device(unet.device):
            controlnet = cls(ControlNetConfig(**copied)).to(unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
                if hasattr(unet, name):
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, controlnet_cond: Tensor,
                conditioning_scale: float = 1.0, added_cond_kwargs: Mapping[str, Tensor] | None = None,
                guess_mode: bool = False, return_dict: bool = False, timestep_cond=None, attention_mask=None,
                cross_attention_kwargs=None, class_labels=None, encoder_attention_mask: Tensor | None = None):
        """→ (residuals for each UNet skip, residual for the mid block), each multiplied by the scale."""
        check_call_options("ControlNet", timestep_cond, attention_mask, cross_attention_kwargs, class_labels,
                           return_dict)
        return without_slow_cpu_autocast(self.residuals, self.dtype, sample, timestep, encoder_hidden_states,
                                         controlnet_cond, conditioning_scale, added_cond_kwargs, guess_mode,
                                         encoder_attention_mask)

    def residuals(self, sample: Tensor, timestep, context: Tensor, cond: Tensor, scale: float,
                  added_cond_kwargs, guess_mode: bool, context_mask: Tensor | None):
        """h = conv_in(x) + E(c) → encoder → zero convs on every skip and on the mid-block output."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            cond = torch.flip(cond, dims=[1])
        emb = self.embed_time(sample, timestep, added_cond_kwargs)
        mask = context_bias(context_mask, sample.dtype)
        h = self.conv_in(sample)
        cond_features = self.controlnet_cond_embedding(cond)
        if cond_features.shape != h.shape:
            raise ChorusError(f"The control image {tuple(cond.shape)} embeds to {tuple(cond_features.shape)}, "
                              f"but the latent features are {tuple(h.shape)}: the control image must be "
                              f"{2 ** len(self.controlnet_cond_embedding.blocks[::2])}× the latent size.")
        h, skips = self.encode(h + cond_features, emb, context, mask)
        h = self.mid_block(h, emb, context, mask)
        down = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)]
        return self.scale_residuals(down, self.controlnet_mid_block(h), scale, guess_mode)

    def scale_residuals(self, down: list[Tensor], mid: Tensor, scale: float, guess_mode: bool):
        """r_k · scale; guess mode ramps the scale log-uniformly from 0.1 (first skip) to 1 (mid block)."""
        if guess_mode and not self.config.global_pool_conditions:
            ramp = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * scale
            down, mid = [r * s for r, s in zip(down, ramp)], mid * ramp[-1]
        else:
            down, mid = [r * scale for r in down], mid * scale
        if self.config.global_pool_conditions:
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid
