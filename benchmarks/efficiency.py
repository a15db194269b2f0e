"""How close a workload runs to what the machine can do: its arithmetic (counted, not estimated) against the
machine's own matmul peak, measured in the same run.

    python benchmarks/efficiency.py                 # this machine's fp32 (and bf16) matmul peak, its CPU flags

- `matmul_peak(dtype)`: GFLOP/s of a large square matmul (2n³ flops), the median of a few, at the current
  torch thread count — the ceiling a convolution/attention network can approach on this CPU;
- `count_flops(fn)`: the flops of one call, counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls,
  convolutions and attention; elementwise work is not counted, so the achieved rate is a lower bound);
- `cpu_flags()`: the instruction sets that decide the peaks (AVX2, AVX-512, AVX-512-BF16, AMX), to print
  beside every figure (machines differ).
The benchmarks (unet_forward.py, train_step.py, generate.py) print achieved GFLOP/s and the share of the fp32
peak for both sides.
"""
from __future__ import annotations

import statistics
import time

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n×n @ n×n matmul in `dtype` (median of `repeats`, after a warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def count_flops(fn) -> int:
    """Flops of one call of fn(), as torch's flop counter sees them (forward and, if fn runs it, backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def cpu_flags() -> str:
    """The CPU's vector instruction sets that matter for the peaks, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(w for w in wanted if w in flags) or "no AVX2"


def peaks() -> dict[str, float]:
    """fp32 and, where the CPU has bf16 kernels, bf16 matmul peaks (GFLOP/s)."""
    from chorus.models.layers import cpu_has_bf16_kernels
    out = {"fp32": matmul_peak(torch.float32)}
    if cpu_has_bf16_kernels():
        out["bf16"] = matmul_peak(torch.bfloat16)
    return out


def rate(flops: int, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


def main() -> int:
    p = peaks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_flags()}")
    for k, v in p.items():
        print(f"{k} matmul peak: {v:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
