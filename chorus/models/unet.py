"""The denoiser ε_θ(x_t, t, c): the cross-attention UNet of Stable Diffusion 1.x/2.x and SDXL.

Layout and state-dict keys are those of diffusers' `UNet2DConditionModel`:

    conv_in → time_embedding (+ add_embedding for SDXL micro-conditioning)
    down_blocks[i]: [ResnetBlock2D (→ Transformer2D)] × layers_per_block, then a stride-2 conv
    mid_block:      ResnetBlock2D → Transformer2D → ResnetBlock2D
    up_blocks[i]:   [concat skip → ResnetBlock2D (→ Transformer2D)] × (layers_per_block + 1), then ×2
    conv_norm_out → SiLU → conv_out

Every output of a down-block layer (and of conv_in) is a *skip connection*; a ControlNet adds one
residual per skip (`down_block_additional_residuals`) and one after the mid block.
The encoder half (conv_in, embeddings, down blocks, mid block) is `UNetEncoder`, which the
ControlNet reuses as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from chorus.errors import ChorusError
from chorus.models.attention import Transformer2D
from chorus.models.io import ModelBase
from chorus.models.layers import (Downsample2D, HooksMixin, ResnetBlock2D, Upsample2D, group_norm_silu,
                                  without_slow_cpu_autocast)

IntOrTuple = Any  # int | tuple[int, ...] (diffusers configs use both)


@dataclass
class UNetConfig:
    """diffusers' `UNet2DConditionModel` config.json fields, with diffusers' defaults."""

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64


# Config values Chorus implements for fields where diffusers offers more variants.
ENCODER_SUPPORTED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
}
UNET_SUPPORTED = {
    **ENCODER_SUPPORTED,
    "dual_cross_attention": (False,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def check_supported(config, supported: Mapping[str, tuple], what: str) -> None:
    """Raise ChorusError naming the first config field whose value Chorus does not implement."""
    for name, allowed in supported.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ChorusError(
                f"{what} config field {name}={value!r} is not supported by Chorus "
                f"(supported: {', '.join(repr(a) for a in allowed)})."
            )
    only_cross = config.only_cross_attention
    if any(only_cross) if isinstance(only_cross, (tuple, list)) else only_cross:
        raise ChorusError(f"{what} config field only_cross_attention={only_cross!r} is not supported (only False).")
    if config.norm_num_groups is None:
        raise ChorusError(f"{what} config field norm_num_groups=None is not supported (GroupNorm is required).")


def per_level(value, n: int, name: str, what: str) -> tuple:
    """An int (or None) broadcast to n levels, or a tuple of exactly n entries."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ChorusError(f"{what} config field {name} has {len(value)} entries for {n} down blocks.")
        return tuple(value)
    return (value,) * n


def per_layer(value, layers: int) -> tuple[int, ...]:
    """Transformer depth for each layer of one block: an int broadcast, or a tuple per layer."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * layers


# --------------------------------------------------------------------------------------------------
# Architecture spec: the per-level numbers both the UNet and the ControlNet build their encoder from.
@dataclass(frozen=True)
class EncoderSpec:
    in_channels: int
    channels: tuple[int, ...]  # block_out_channels, per level
    attention: tuple[bool, ...]  # does level i have cross-attention transformers
    layers: tuple[int, ...]  # resnets per down block
    depth: tuple[tuple[int, ...], ...]  # transformer layers per (level, layer)
    heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    groups: int
    eps: float
    dropout: float
    linear_projection: bool
    upcast_attention: bool
    downsample_padding: int
    mid_scale: float
    mid_depth: int
    flip_sin_to_cos: bool
    freq_shift: float
    time_embed_dim: int
    conv_in_kernel: int
    addition_time_embed_dim: int | None  # SDXL micro-conditioning: sinusoid width per time id
    addition_input_dim: int | None  # projection_class_embeddings_input_dim


def encoder_spec(config, what: str) -> EncoderSpec:
    """Normalise a UNet or ControlNet config into per-level tuples, checking lengths and block types."""
    n = len(config.block_out_channels)
    if len(config.down_block_types) != n:
        raise ChorusError(f"{what} config has {len(config.down_block_types)} down_block_types for {n} block_out_channels.")
    unknown = [t for t in config.down_block_types if t not in DOWN_TYPES]
    if unknown:
        raise ChorusError(f"{what} config down_block_types {unknown} are not supported (use {', '.join(DOWN_TYPES)}).")
    layers = tuple(int(v) for v in per_level(config.layers_per_block, n, "layers_per_block", what))
    depth_cfg = per_level(config.transformer_layers_per_block, n, "transformer_layers_per_block", what)
    heads = per_level(config.num_attention_heads or config.attention_head_dim, n, "attention_head_dim", what)
    text_time = config.addition_embed_type == "text_time"
    if text_time and (config.addition_time_embed_dim is None or config.projection_class_embeddings_input_dim is None):
        raise ChorusError(f"{what} config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                          "projection_class_embeddings_input_dim.")
    last_depth = per_layer(depth_cfg[-1], 1)[0]
    return EncoderSpec(
        in_channels=config.in_channels, channels=tuple(config.block_out_channels),
        attention=tuple(DOWN_TYPES[t] for t in config.down_block_types), layers=layers,
        depth=tuple(per_layer(d, layers[i]) for i, d in enumerate(depth_cfg)), heads=tuple(heads),
        cross_attention_dim=per_level(config.cross_attention_dim, n, "cross_attention_dim", what),
        groups=config.norm_num_groups, eps=config.norm_eps, dropout=getattr(config, "dropout", 0.0),
        linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention,
        downsample_padding=config.downsample_padding, mid_scale=config.mid_block_scale_factor, mid_depth=last_depth,
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift,
        time_embed_dim=getattr(config, "time_embedding_dim", None) or config.block_out_channels[0] * 4,
        conv_in_kernel=getattr(config, "conv_in_kernel", 3),
        addition_time_embed_dim=config.addition_time_embed_dim if text_time else None,
        addition_input_dim=config.projection_class_embeddings_input_dim if text_time else None,
    )


# --------------------------------------------------------------------------------------------------
# Time embedding
def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """e(t) = [sin(t·ω_j), cos(t·ω_j)]_j with ω_j = max_period^(−j/(dim/2 − freq_shift)); (N,) → (N, dim)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / (half - freq_shift))
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def batch_timesteps(timestep, batch: int, device: torch.device) -> Tensor:
    """An int, a float, a 0-d or a (B,) tensor → a (B,) tensor on `device`."""
    if not torch.is_tensor(timestep):
        float_dtype = torch.float32 if device.type == "mps" else torch.float64
        dtype = float_dtype if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif timestep.dim() == 0:
        timestep = timestep[None].to(device)
    if timestep.shape[0] not in (1, batch):
        raise ChorusError(f"timestep has {timestep.shape[0]} entries for a batch of {batch}.")
    return timestep.to(device).expand(batch)


class TimestepEmbedding(nn.Module):
    """MLP(e) = W₂ · SiLU(W₁ e + b₁) + b₂ (keys linear_1, linear_2)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------
# Blocks
class Checkpointable:
    """Blocks run their layers through torch.utils.checkpoint when `gradient_checkpointing` is on."""

    gradient_checkpointing: bool = False

    def run(self, layer: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


def make_transformer(spec: EncoderSpec, level: int, channels: int, depth: int) -> Transformer2D:
    heads = spec.heads[level]
    return Transformer2D(heads, channels // heads, channels, depth, spec.cross_attention_dim[level], spec.groups,
                         spec.linear_projection, spec.dropout, spec.upcast_attention)


class DownBlock(Checkpointable, nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: [resnet (→ transformer)] × layers, then ↓2; every output is a skip."""

    def __init__(self, spec: EncoderSpec, level: int, in_channels: int):
        super().__init__()
        out = spec.channels[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out, out, spec.time_embed_dim, spec.groups, spec.eps, spec.dropout)
            for i in range(spec.layers[level])
        )
        self.attentions = nn.ModuleList(
            make_transformer(spec, level, out, spec.depth[level][i]) for i in range(spec.layers[level])
        ) if spec.attention[level] else None
        last = level == len(spec.channels) - 1
        self.downsamplers = None if last else nn.ModuleList(
            [Downsample2D(out, use_conv=True, out_channels=out, padding=spec.downsample_padding)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, context_mask: Tensor | None):
        """x: (B, C_in, H, W) → (B, C, H/2, W/2) and the skips of this block."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.run(resnet, x, temb)
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, context, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(Checkpointable, nn.Module):
    """UNetMidBlock2DCrossAttn: resnet → transformer → resnet at the lowest resolution."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        c, level = spec.channels[-1], len(spec.channels) - 1
        make_resnet = lambda: ResnetBlock2D(c, c, spec.time_embed_dim, spec.groups, spec.eps, spec.dropout,  # noqa: E731
                                            output_scale_factor=spec.mid_scale)
        self.resnets = nn.ModuleList([make_resnet(), make_resnet()])
        self.attentions = nn.ModuleList([make_transformer(spec, level, c, spec.mid_depth)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        x = self.run(self.resnets[0], x, temb)
        x = self.run(self.attentions[0], x, context, context_mask)
        return self.run(self.resnets[1], x, temb)


class UpBlock(Checkpointable, nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: [cat(x, skip) → resnet (→ transformer)] × (layers + 1), then ↑2."""

    def __init__(self, spec: EncoderSpec, index: int, attention: bool, depth: tuple[int, ...]):
        super().__init__()
        n = len(spec.channels)
        level = n - 1 - index  # the down level this up block mirrors
        out, prev = spec.channels[level], spec.channels[min(level + 1, n - 1)]
        below = spec.channels[max(level - 1, 0)]  # channels of the skip coming from the level above
        layers = spec.layers[level] + 1
        self.resnets = nn.ModuleList()
        for i in range(layers):
            skip = below if i == layers - 1 else out
            x_in = prev if i == 0 else out
            self.resnets.append(ResnetBlock2D(x_in + skip, out, spec.time_embed_dim, spec.groups, spec.eps,
                                              spec.dropout))
        self.attentions = nn.ModuleList(
            make_transformer(spec, level, out, depth[i]) for i in range(layers)) if attention else None
        self.upsamplers = None if index == n - 1 else nn.ModuleList([Upsample2D(out, use_conv=True, out_channels=out)])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor, context_mask: Tensor | None,
                upsample_size: Sequence[int] | None = None) -> Tensor:
        """Consumes skips from the end of the list (the most recent first)."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = self.run(resnet, x, temb)
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, context, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# --------------------------------------------------------------------------------------------------
# The encoder half, shared with the ControlNet
def context_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A (B, L) keep-mask of 1/0 → an additive bias (B, 1, 1, L): 0 where kept, −10000 where dropped."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ChorusError(f"encoder_attention_mask must be (batch, tokens) of 1/0, got shape {tuple(mask.shape)}.")
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class UNetEncoder(HooksMixin, ModelBase):
    """conv_in, the time (and SDXL micro-conditioning) embedding, the down blocks and the mid block."""

    def build_encoder(self, spec: EncoderSpec) -> None:
        self.spec = spec
        c0 = spec.channels[0]
        self.conv_in = nn.Conv2d(spec.in_channels, c0, spec.conv_in_kernel, padding=(spec.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(c0, spec.time_embed_dim)
        if spec.addition_input_dim is not None:
            self.add_embedding = TimestepEmbedding(spec.addition_input_dim, spec.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(spec, i, spec.channels[max(i - 1, 0)]) for i in range(len(spec.channels)))
        self.mid_block = MidBlock(spec)

    def embed_time(self, sample: Tensor, timestep, added_cond_kwargs: Mapping[str, Tensor] | None) -> Tensor:
        """emb = MLP(e(t)) [+ MLP_add([pooled text, e(time_ids)])]  → (B, time_embed_dim)."""
        spec = self.spec
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        emb = self.time_embedding(timestep_embedding(t, spec.channels[0], spec.flip_sin_to_cos, spec.freq_shift)
                                  .to(sample.dtype))
        if spec.addition_input_dim is not None:
            emb = emb + self.add_embedding(self.micro_conditioning(added_cond_kwargs, sample.shape[0]).to(emb.dtype))
        return emb

    def micro_conditioning(self, added_cond_kwargs: Mapping[str, Tensor] | None, batch: int) -> Tensor:
        """SDXL's vector: [pooled text (B, P), e(time_id_k) for each k (B, K·D)] → (B, P + K·D)."""
        kwargs = added_cond_kwargs or {}
        if "text_embeds" not in kwargs or "time_ids" not in kwargs:
            raise ChorusError(f"{type(self).__name__} has addition_embed_type='text_time' (SDXL): pass "
                              "added_cond_kwargs={'text_embeds': pooled text (B, P), 'time_ids': (B, K)}.")
        text, time_ids = kwargs["text_embeds"], kwargs["time_ids"]
        spec = self.spec
        feats = timestep_embedding(time_ids.flatten(), spec.addition_time_embed_dim, spec.flip_sin_to_cos,
                                   spec.freq_shift).reshape(text.shape[0], -1)  # (B, K·D)
        vector = torch.cat([text, feats.to(text.dtype)], dim=-1)
        if vector.shape[-1] != spec.addition_input_dim:
            raise ChorusError(
                f"The micro-conditioning vector has {vector.shape[-1]} features (pooled text {text.shape[-1]} + "
                f"{time_ids.shape[-1]} time ids × {spec.addition_time_embed_dim}) but the model expects "
                f"{spec.addition_input_dim} (projection_class_embeddings_input_dim).")
        return vector

    def encode(self, h: Tensor, emb: Tensor, context: Tensor, context_mask: Tensor | None):
        """h = conv_in(x) (B, C0, H, W) → lowest-resolution features and all skips (the first is h itself)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, context_mask)
            skips.extend(block_skips)
        return h, skips

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each resnet/transformer in the backward pass instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, Checkpointable):
                module.gradient_checkpointing = enabled


def check_call_options(what: str, timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                       class_labels=None, return_dict=False) -> None:
    """Refuse diffusers call options Chorus does not implement, instead of silently ignoring them."""
    refused = {
        "timestep_cond": timestep_cond is not None, "class_labels": class_labels is not None,
        "attention_mask": attention_mask is not None, "cross_attention_kwargs": bool(cross_attention_kwargs),
        "return_dict=True": bool(return_dict),
    }
    bad = [name for name, flag in refused.items() if flag]
    if bad:
        raise ChorusError(
            f"{what}.forward does not support {', '.join(bad)}. Chorus models return plain tensors; masks over "
            "text tokens go in encoder_attention_mask; attention edits go through `with model.hooks(fn):`.")


class UNet(UNetEncoder):
    """ε_θ(x_t, t, c): the UNet2DConditionModel of SD 1.x/2.x and SDXL base/refiner."""

    config_class = UNetConfig
    diffusers_class_name = "UNet2DConditionModel"

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        check_supported(config, UNET_SUPPORTED, "UNet")
        spec = encoder_spec(config, "UNet")
        self.build_encoder(spec)
        self.up_blocks = nn.ModuleList(self.build_up_blocks(config, spec))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, spec.channels[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        k = config.conv_out_kernel
        self.conv_out = nn.Conv2d(spec.channels[0], config.out_channels, k, padding=(k - 1) // 2)

    @staticmethod
    def build_up_blocks(config: UNetConfig, spec: EncoderSpec) -> list[UpBlock]:
        n = len(spec.channels)
        if len(config.up_block_types) != n:
            raise ChorusError(f"UNet config has {len(config.up_block_types)} up_block_types for {n} levels.")
        unknown = [t for t in config.up_block_types if t not in UP_TYPES]
        if unknown:
            raise ChorusError(f"UNet config up_block_types {unknown} are not supported (use {', '.join(UP_TYPES)}).")
        reverse = config.reverse_transformer_layers_per_block
        depth_cfg = per_level(config.transformer_layers_per_block, n, "transformer_layers_per_block", "UNet")
        nested = any(isinstance(d, (tuple, list)) for d in depth_cfg)
        if nested and reverse is None:
            raise ChorusError("UNet config: a per-layer transformer_layers_per_block needs "
                              "reverse_transformer_layers_per_block for the up blocks.")
        layers = [spec.layers[n - 1 - i] + 1 for i in range(n)]
        if reverse is not None:
            depths = [per_layer(d, layers[i]) for i, d in enumerate(per_level(reverse, n, "reverse_transformer_"
                                                                               "layers_per_block", "UNet"))]
        else:
            depths = [(spec.depth[n - 1 - i][0],) * layers[i] for i in range(n)]
        return [UpBlock(spec, i, UP_TYPES[t], depths[i]) for i, t in enumerate(config.up_block_types)]

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor,
                added_cond_kwargs: Mapping[str, Tensor] | None = None,
                down_block_additional_residuals: Sequence[Tensor] | None = None,
                mid_block_additional_residual: Tensor | None = None, timestep_cond=None, attention_mask=None,
                cross_attention_kwargs=None, class_labels=None, return_dict: bool = False,
                encoder_attention_mask: Tensor | None = None) -> Tensor:
        """sample (B, C_in, H, W), t, context (B, L, D) → ε̂ (or v̂) (B, C_out, H, W)."""
        check_call_options("UNet", timestep_cond, attention_mask, cross_attention_kwargs, class_labels, return_dict)
        return without_slow_cpu_autocast(self.denoise, self.dtype, sample, timestep, encoder_hidden_states,
                                         added_cond_kwargs, down_block_additional_residuals,
                                         mid_block_additional_residual, encoder_attention_mask)

    def denoise(self, sample: Tensor, timestep, context: Tensor, added_cond_kwargs, down_residuals, mid_residual,
                context_mask: Tensor | None) -> Tensor:
        """embed t → encode (skips [+ control]) → mid [+ control] → decode → GN-SiLU-conv_out."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed_time(sample, timestep, added_cond_kwargs)
        mask = context_bias(context_mask, sample.dtype)
        h, skips = self.encode(self.conv_in(sample), emb, context, mask)
        if down_residuals is not None:
            skips = add_residuals(skips, down_residuals)
        h = self.mid_block(h, emb, context, mask)
        if mid_residual is not None:
            h = h + mid_residual
        h = self.decode(h, skips, emb, context, mask, sample.shape[-2:])
        return self.conv_out(group_norm_silu(h, self.conv_norm_out))

    def decode(self, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor, mask: Tensor | None,
               size: Sequence[int]) -> Tensor:
        """The up blocks; when H or W is not a multiple of 2^levels, upsample to each skip's exact size."""
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(s % factor for s in size)
        for block in self.up_blocks:
            n_used = len(block.resnets)
            upsample_size = skips[-n_used - 1].shape[2:] if odd and block.upsamplers is not None else None
            h = block(h, skips, emb, context, mask, upsample_size)
        return h


def add_residuals(skips: list[Tensor], residuals: Sequence[Tensor]) -> list[Tensor]:
    """skip_i + r_i for each skip connection (the ControlNet's contribution)."""
    if len(residuals) != len(skips):
        raise ChorusError(f"down_block_additional_residuals has {len(residuals)} tensors; this UNet has "
                          f"{len(skips)} skip connections (one per down-block layer, downsampler and conv_in).")
    return [s + r for s, r in zip(skips, residuals)]
