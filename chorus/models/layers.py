"""Layers shared by the UNet, the ControlNet and the VAE: resnet blocks, down/up-sampling, hooks.

Submodule names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, ...) so state dicts match.

Hooks let a caller read or replace tensors inside one forward pass (Plug-and-Play feature
injection, paint-with-words attention edits): `with hooks(model, fn): model(...)` calls
`fn(name, kind, tensor)` from every `Hookable` module, where `name` is the module's qualified name.
When no hook is set a module pays one attribute check.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HookFn = Callable[[str, str, Tensor], Optional[Tensor]]
NamePredicate = Callable[[str], bool]


class Hookable:
    """Mixin for modules that report named tensors to a hook installed by `hooks()`."""

    hook: HookFn | None = None  # set per instance, only inside `hooks()`
    hook_name: str = ""

    def call_hook(self, kind: str, tensor: Tensor) -> Tensor:
        """tensor ← fn(name, kind, tensor), unless fn returns None."""
        out = self.hook(self.hook_name, kind, tensor)
        return tensor if out is None else out


def chain(first: HookFn, second: HookFn) -> HookFn:
    """A hook that runs `first`, then `second` on what `first` returned (hooks of several controls compose)."""
    def both(name: str, kind: str, tensor: Tensor) -> Tensor:
        out = first(name, kind, tensor)
        tensor = tensor if out is None else out
        out = second(name, kind, tensor)
        return tensor if out is None else out
    return both


@contextmanager
def hooks(model: nn.Module, fn: HookFn, names: NamePredicate | None = None) -> Iterator[nn.Module]:
    """Install `fn` on every Hookable submodule of `model` (whose name passes `names`) for a block. A module
    that already has a hook (an enclosing `hooks()`) runs both, the earlier first; on exit each module gets
    back exactly the hook it had."""
    installed = []
    for name, module in model.named_modules():
        if isinstance(module, Hookable) and (names is None or names(name)):
            old = module.__dict__.get("hook")
            installed.append((module, old, module.__dict__.get("hook_name")))
            object.__setattr__(module, "hook", fn if old is None else chain(old, fn))
            object.__setattr__(module, "hook_name", name)
    try:
        yield model
    finally:
        for module, old_fn, old_name in installed:
            for attr, old in (("hook", old_fn), ("hook_name", old_name)):
                if old is None:
                    module.__dict__.pop(attr, None)
                else:
                    object.__setattr__(module, attr, old)


class HooksMixin:
    """Gives a model `with model.hooks(fn, names=None):`."""

    def hooks(self, fn: HookFn, names: NamePredicate | None = None):
        """Context manager: call fn(name, kind, tensor) from attention layers and resnets inside."""
        return hooks(self, fn, names)


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Does oneDNN have native bf16 kernels on this CPU (AVX512-BF16 / AMX)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def slow_cpu_autocast(x: Tensor) -> bool:
    """Is bf16 CPU autocast on where the CPU has no bf16 kernels (its convs run 7-200x slower than fp32)?

    Autocast permits lower precision for speed; on such CPUs fp32 is both faster and more accurate, so
    Chorus's UNet and ControlNet run in fp32 there (`without_slow_cpu_autocast`).
    Set `chorus.models.layers.CPU_AUTOCAST_FALLBACK = False` to keep bf16 regardless.
    """
    return (CPU_AUTOCAST_FALLBACK and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not cpu_has_bf16_kernels())


def cast_floats(value, dtype: torch.dtype):
    """Floating tensors, also inside tuples, lists and dicts, cast to `dtype`; anything else unchanged."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def without_slow_cpu_autocast(fn: Callable, dtype: torch.dtype, *args):
    """fn(*args), in `dtype` with autocast off when `slow_cpu_autocast(args[0])` (inputs made under autocast
    may be bf16, so floating inputs are cast to the weights' dtype); otherwise fn(*args) unchanged."""
    if not slow_cpu_autocast(args[0]):
        return fn(*args)
    with torch.autocast("cpu", enabled=False):
        return fn(*cast_floats(args, dtype))


CPU_AUTOCAST_FALLBACK = True


def add_(out: Tensor, other: Tensor) -> Tensor:
    """out + other, in place on `out` (a fresh conv/linear output) when the dtypes agree."""
    return out.add_(other) if out.dtype == other.dtype and out.shape == torch.broadcast_shapes(out.shape, other.shape) \
        else out + other


def group_norm_silu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """SiLU(GroupNorm(x)), with the activation applied in place on the fresh normalised tensor."""
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), inplace=True)


class ResnetBlock2D(Hookable, nn.Module):
    """out = (shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + W·SiLU(temb))))) / output_scale_factor."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(group_norm_silu(x, self.norm1))  # (B, C_out, H, W)
        if temb is not None and self.time_emb_proj is not None:
            h = add_(h, self.time_emb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        if self.hook is not None:   # the residual branch, before the shortcut is added (Plug-and-Play's features)
            h = self.call_hook("resnet_branch", h)
        out = add_(h, x if self.conv_shortcut is None else self.conv_shortcut(x))
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        if self.hook is not None:
            out = self.call_hook("resnet", out)
        return out


class Downsample2D(nn.Module):
    """x ↦ conv_{3×3, stride 2}(x); padding=0 pads (0, 1, 0, 1) first (the VAE's asymmetric pad)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        else:
            if out_channels != channels:
                raise ValueError("Downsample2D without a conv cannot change the channel count.")
            self.conv = nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C_out, H/2, W/2)


class Upsample2D(nn.Module):
    """x ↦ conv_{3×3}(nearest_×2(x)), or nearest to `output_size` when the skip is odd-sized."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return x if self.conv is None else self.conv(x)  # (B, C_out, 2H, 2W)
