"""The VAE of latent diffusion (AutoencoderKL): images <-> latents, 2^(levels-1) times smaller.

Stable Diffusion runs its diffusion in the latent space of a KL-regularised autoencoder: the
encoder maps an image x to a diagonal Gaussian q(z|x) = N(mu, sigma^2), the decoder maps a latent z
back to an image. The layout, config fields and state-dict keys are diffusers' `AutoencoderKL`, so
a diffusers `vae/` folder loads without conversion and Chorus's VAE saves in the same layout.

Large images decode (and encode) in overlapping tiles blended linearly across the overlap, which
bounds activation memory by the tile size instead of the image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chorus.errors import ChorusError
from chorus.models.io import ModelBase
from chorus.models.layers import Downsample2D, ResnetBlock2D, Upsample2D

Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per sample


@dataclass
class VAEConfig:
    """diffusers' AutoencoderKL `config.json` fields, with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"  # only silu (alias swish): diffusers' conv_act is SiLU whatever this says
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # read by pipelines: run this VAE in fp32 when the UNet is fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


def check_vae_config(c: VAEConfig) -> None:
    """Refuse the AutoencoderKL variants Chorus does not build, with the field to change."""
    levels = len(c.block_out_channels)
    problems = []
    if levels == 0:
        problems.append("block_out_channels is empty")
    if len(c.down_block_types) != levels or len(c.up_block_types) != levels:
        problems.append(f"down_block_types ({len(c.down_block_types)}) and up_block_types "
                        f"({len(c.up_block_types)}) must have one entry per block_out_channels ({levels})")
    if any(t != "DownEncoderBlock2D" for t in c.down_block_types):
        problems.append(f"down_block_types {list(c.down_block_types)}: only 'DownEncoderBlock2D' is supported")
    if any(t != "UpDecoderBlock2D" for t in c.up_block_types):
        problems.append(f"up_block_types {list(c.up_block_types)}: only 'UpDecoderBlock2D' is supported")
    if c.act_fn not in ("silu", "swish"):
        problems.append(f"act_fn '{c.act_fn}': only 'silu' is supported")
    if any(ch % c.norm_num_groups for ch in c.block_out_channels):
        problems.append(f"block_out_channels {list(c.block_out_channels)} must all be divisible by "
                        f"norm_num_groups ({c.norm_num_groups})")
    if c.layers_per_block < 1 or c.latent_channels < 1:
        problems.append("layers_per_block and latent_channels must be at least 1")
    if problems:
        raise ChorusError("Chorus cannot build this VAE (AutoencoderKL) config: " + "; ".join(problems) + ".")


# --- the posterior q(z|x) ------------------------------------------------------------------------
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's 2*latent_channels moments."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments  # (B, 2L, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, L, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        """sigma = exp(logvar / 2)."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """sigma^2 = exp(logvar)."""
        return torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """z = mean + sigma * eps, eps ~ N(0, I) drawn on the generator's device (one per sample for a list)."""
        return self.mean + self.std * randn_like_on(self.mean, generator)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) over non-batch dims, per sample."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=dims)
        return 0.5 * ((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                      - 1.0 - self.logvar + other.logvar).sum(dim=dims)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z|x) = 0.5 * sum(log 2pi + logvar + (z - mu)^2 / sigma^2) over non-batch dims."""
        dims = tuple(range(1, self.mean.ndim))
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=self.mean.dtype))
        return 0.5 * (log_two_pi + self.logvar + (z - self.mean).pow(2) / self.var).sum(dim=dims)


def randn_like_on(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn where the generator lives (CPU generator -> CPU), moved to x's device."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ChorusError(f"Got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample.")
        return torch.cat([randn_like_on(x[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


# --- building blocks -----------------------------------------------------------------------------
class SpatialSelfAttention(nn.Module):
    """One-head self-attention over the h*w positions, with a residual: x + W_o softmax(QK^T/sqrt(C)) V."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, h*w, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, h*w, C)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """resnet -> self-attention -> resnet at the lowest resolution (attention optional)."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=1e-6)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """`num_layers` resnets, then a stride-2 conv (pad right/bottom by one) unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None,
                                                    groups=groups, eps=1e-6) for i in range(num_layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, use_conv=True, out_channels=out_ch, padding=0)])
        else:
            self.downsamplers = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class DecoderBlock(nn.Module):
    """`num_layers` resnets, then nearest x2 upsampling and a conv unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None,
                                                    groups=groups, eps=1e-6) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, use_conv=True, out_channels=out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


def _run(module: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """module(x), recomputed in the backward pass instead of stored when `checkpointed`."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """x (B, in, H, W) -> moments (B, 2L, H/f, W/f): conv_in, down blocks, mid block, norm-SiLU-conv_out."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            h = _run(block, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, L, h, w) -> image (B, out, h*f, w*f): conv_in, mid block, up blocks, norm-SiLU-conv_out."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            h = _run(block, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


# --- tiling --------------------------------------------------------------------------------------
def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of length `tile` that cover [0, size) every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def blend_ramp(length: int, ramp: int, head: bool, tail: bool) -> torch.Tensor:
    """Per-pixel tile weight: rises linearly (i + 1/2) / ramp over `ramp` pixels at a side with a neighbour, else 1."""
    w = torch.ones(length)
    if ramp > 0:
        rise = (torch.arange(min(ramp, length)) + 0.5) / ramp
        if head:
            w[:len(rise)] = torch.minimum(w[:len(rise)], rise)
        if tail:
            w[length - len(rise):] = torch.minimum(w[length - len(rise):], rise.flip(0))
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: float,
                step: int, scale: float) -> torch.Tensor:
    """Apply fn to overlapping tiles of x and blend: out = sum_t w_t fn(x_t) / sum_t w_t, w_t linear ramps.

    `tile` and `step` are in input pixels (tile starts are multiples of `step`); fn maps an input tile
    of side s to an output tile of side s * scale.
    """
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    stride = max(step, int(round(tile * (1 - overlap) / step)) * step)
    ramp = int(round((tile - stride) * scale))  # blend width in output pixels
    ys, xs = tile_starts(height, th, stride), tile_starts(width, tw, stride)
    out = weight = None
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[..., y:y + th, x0:x0 + tw])  # (B, C', th*scale, tw*scale)
            if out is None:
                out = part.new_zeros(*part.shape[:2], int(height * scale), int(width * scale))
                weight = part.new_zeros(int(height * scale), int(width * scale))
            oy, ox, (ph, pw) = int(y * scale), int(x0 * scale), part.shape[-2:]
            wy = blend_ramp(ph, ramp, head=i > 0, tail=i < len(ys) - 1)
            wx = blend_ramp(pw, ramp, head=j > 0, tail=j < len(xs) - 1)
            w = (wy[:, None] * wx[None, :]).to(part)  # (ph, pw)
            out[..., oy:oy + ph, ox:ox + pw] += part * w
            weight[oy:oy + ph, ox:ox + pw] += w
    return out / weight


# --- the model -----------------------------------------------------------------------------------
class VAE(ModelBase):
    """AutoencoderKL: encode(x) -> q(z|x), decode(z) -> x; the caller scales latents by `scaling_factor`."""

    config_class = VAEConfig
    diffusers_class_name = "AutoencoderKL"

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        check_vae_config(config)
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None
        self.use_tiling = False
        self.tile_latent_size = 64
        self.tile_overlap = 0.25

    # --- config views ---
    @property
    def downsampling_factor(self) -> int:
        """f: image side / latent side = 2^(levels - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.config.shift_factor

    @torch.no_grad()
    def fold_latent_normalisation(self, mean, std) -> None:
        """Centre and whiten the latent space per channel inside the weights (Lin et al.'s and SDXL's
        latents_mean/std, folded so the folder stays a plain diffusers AutoencoderKL).

        With μ_c, σ_c the per-channel mean and std of the posterior means z = mode(q(z|x)), the encoder's
        quant_conv is rewritten to give z' = (z − μ)/σ (its log-variance rows shifted by −2 log σ), the
        decoder's post_quant_conv to read z = σ z' + μ, and scaling_factor becomes 1 with no shift: the
        diffusion model then sees zero-mean, unit-variance latents and decode(encode(x)) is unchanged.
        """
        if self.quant_conv is None or self.post_quant_conv is None:
            raise ChorusError("Folding the latent normalisation needs quant_conv and post_quant_conv "
                              "(use_quant_conv / use_post_quant_conv); this VAE has none to fold into.")
        lat = self.config.latent_channels
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean.numel() != lat or std.numel() != lat or not bool((std > 0).all()):
            raise ChorusError(f"fold_latent_normalisation needs {lat} means and {lat} positive stds.")
        shift = self.config.shift_factor or 0.0
        if self.config.scaling_factor != 1.0 or shift:
            # the statistics are of the raw z; an earlier scale/shift would be applied on top: refuse to guess
            raise ChorusError("Fold into a VAE whose scaling_factor is 1 and shift_factor none: the statistics "
                              "are of its raw latents (set scaling_factor to 1 first).")
        q_w, q_b = self.quant_conv.weight.double(), self.quant_conv.bias.double()
        q_w[:lat] /= std[:, None, None, None]
        q_b[:lat] = (q_b[:lat] - mean) / std
        q_b[lat:] -= 2 * std.log()
        p_w, p_b = self.post_quant_conv.weight.double(), self.post_quant_conv.bias.double()
        p_b = p_b + (p_w[:, :, 0, 0] @ mean)
        p_w = p_w * std[None, :, None, None]
        for conv, w, b in ((self.quant_conv, q_w, q_b), (self.post_quant_conv, p_w, p_b)):
            conv.weight.copy_(w.to(conv.weight.dtype))
            conv.bias.copy_(b.to(conv.bias.dtype))
        self.config.scaling_factor = 1.0
        self.config.shift_factor = None

    # --- switches ---
    def enable_tiling(self, tile_latent_size: int = 64, overlap: float = 0.25) -> None:
        """Encode/decode in overlapping tiles of `tile_latent_size` latent pixels when the input is larger."""
        self.tile_latent_size, self.tile_overlap = self._check_tiling(tile_latent_size, overlap)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each encoder/decoder block in the backward pass (less memory when training)."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = on

    # --- encode / decode ---
    def encode(self, x: torch.Tensor, tiled: bool | None = None, tile_latent_size: int | None = None,
               overlap: float | None = None) -> DiagonalGaussian:
        """x (B, in, H, W) in [-1, 1] -> q(z|x) over latents (B, L, H/f, W/f)."""
        self._check_input(x, self.config.in_channels, "image", self.downsampling_factor)
        tile, overlap, tiled = self._tiling(tiled, tile_latent_size, overlap)
        f = self.downsampling_factor
        if tiled and max(x.shape[-2:]) > tile * f:
            moments = tiled_apply(self._moments, x, tile * f, overlap, step=f, scale=1 / f)
        else:
            moments = self._moments(x)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, tiled: bool | None = None, tile_latent_size: int | None = None,
               overlap: float | None = None) -> torch.Tensor:
        """z (B, L, h, w) (already divided by scaling_factor) -> image (B, out, h*f, w*f)."""
        self._check_input(z, self.config.latent_channels, "latent", 1)
        tile, overlap, tiled = self._tiling(tiled, tile_latent_size, overlap)
        if tiled and max(z.shape[-2:]) > tile:
            return tiled_apply(self._decode, z, tile, overlap, step=1, scale=self.downsampling_factor)
        return self._decode(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: Generators = None) -> torch.Tensor:
        """Reconstruction: decode(z), z = a sample of q(z|x) or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # --- checks ---
    def _tiling(self, tiled: bool | None, tile: int | None, overlap: float | None) -> tuple[int, float, bool]:
        tile, overlap = self._check_tiling(self.tile_latent_size if tile is None else tile,
                                           self.tile_overlap if overlap is None else overlap)
        return tile, overlap, self.use_tiling if tiled is None else tiled

    @staticmethod
    def _check_tiling(tile: int, overlap: float) -> tuple[int, float]:
        if int(tile) != tile or tile < 1 or not 0.0 <= overlap < 1.0:
            raise ChorusError(f"Tiling needs a whole tile_latent_size >= 1 (got {tile}) and an overlap "
                              f"fraction in [0, 1) (got {overlap}).")
        return int(tile), float(overlap)

    def _check_input(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ChorusError(f"The VAE expects a {what} batch of shape (B, {channels}, H, W); got {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            raise ChorusError(
                f"The image is {h}x{w} pixels, but this VAE downsamples by {multiple}: height and width must be "
                f"multiples of {multiple} (e.g. {h // multiple * multiple or multiple}x"
                f"{w // multiple * multiple or multiple}). Resize or crop the image first."
            )
