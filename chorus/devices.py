"""Devices and precisions by name (`--device cpu|cuda|mps`, `--dtype fp32|fp16|bf16`), checked up front.

A device this machine does not have is a ChorusError (one paragraph, exit status 2 on the command
line) before any model is loaded, rather than a torch traceback half-way through.
"""
from __future__ import annotations

import torch

from chorus.errors import ChorusError

DEVICES = ("cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def resolve_device(device) -> torch.device:
    """A torch.device from 'cpu', 'cuda', 'cuda:1', 'mps' (or a torch.device); refuses one that is not there."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):
            raise ChorusError(f"Unknown device {device!r}; use one of {', '.join(DEVICES)} (cuda:N for the N-th "
                              "GPU).") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible to it (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ChorusError(f"The device cuda is not available: {why} (torch {torch.__version__}). Use --device "
                              "cpu, or install a CUDA build of PyTorch on a machine with an NVIDIA GPU.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ChorusError(f"The device {dev} is not available: this machine has {count} CUDA GPU"
                              f"{'s' if count != 1 else ''} (cuda:0{f'–cuda:{count - 1}' if count > 1 else ''}).")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            built = mps is not None and mps.is_built()
            why = ("this machine has no Apple-silicon GPU (or macOS is older than 12.3)" if built
                   else "this PyTorch was built without MPS support")
            raise ChorusError(f"The device mps is not available: {why}. Use --device cpu.")
        return dev
    raise ChorusError(f"Chorus runs on {', '.join(DEVICES)}; got the device {device!r}.")


def resolve_dtype(dtype) -> torch.dtype:
    """torch.float32/float16/bfloat16 from 'fp32'/'fp16'/'bf16' (or 'float16', …, or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ChorusError(f"Chorus runs models in fp32, fp16 or bf16, not {dtype}.")
        return dtype
    name = str(dtype).strip().lower().replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ChorusError(f"Unknown precision {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def training_precision(mode: str, device: torch.device) -> tuple[str, str]:
    """The precision a training run uses: ("bf16" | "no", why). "auto" picks bf16 autocast where it is the
    faster path (a CUDA GPU with bf16, or a CPU with native bf16 kernels: AVX512-BF16 / AMX, measured by
    benchmarks/train_step.py) and fp32 elsewhere; "bf16" and "no" are kept as given."""
    if mode == "no":
        return "no", "fp32 (as configured)"
    if mode == "bf16":
        return "bf16", "bf16 autocast (as configured)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16 autocast (auto: this GPU supports bf16)"
        return "no", "fp32 (auto: this GPU has no bf16)"
    if device.type == "cpu":
        from chorus.models.layers import cpu_has_bf16_kernels
        if cpu_has_bf16_kernels():
            return "bf16", "bf16 autocast (auto: this CPU has native bf16 kernels)"
        return "no", "fp32 (auto: this CPU has no native bf16 kernels, where bf16 would be slower)"
    return "no", f"fp32 (auto: no bf16 path chosen for {device.type})"
