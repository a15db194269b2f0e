"""UNet forward time: Chorus vs diffusers' UNet2DConditionModel, same weights and inputs, one run.

    python benchmarks/unet_forward.py --quick                 # tiny config, fp32 and bf16 autocast
    python benchmarks/unet_forward.py --configs tiny sd15     # adds SD 1.5 (64×64 latent, batch 2)

Runs of the two models are interleaved (order alternating) after a warm-up, and the median is taken,
so load from other processes hits both alike. Prints a markdown table of wall-clock and process-CPU medians;
ratio = diffusers / Chorus (> 1 means Chorus is faster). With --threads 1 on a shared machine the CPU-time
ratio is the robust one. Random weights: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from efficiency import count_flops, cpu_flags, peaks, rate

TINY = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64)
# name: (config, latent side, batch, context tokens)
CONFIGS = {"tiny": (TINY, 32, 2, 77), "sd15": (SD15, 64, 2, 77)}


def build(config: dict):
    from diffusers import UNet2DConditionModel

    from chorus.models import UNet

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**config).eval()
    ours = UNet.from_config(config).eval()
    ours.load_weights(ref.state_dict())
    return ref, ours


@contextlib.contextmanager
def precision(mode: str):
    """fp32; bf16 = CPU autocast with Chorus's default policy (fp32 where the CPU lacks bf16 kernels);
    bf16-forced = CPU autocast with that fallback off, i.e. bf16 kernels in both models."""
    from chorus.models import layers

    if mode == "fp32":
        yield
        return
    saved = layers.CPU_AUTOCAST_FALLBACK
    layers.CPU_AUTOCAST_FALLBACK = mode == "bf16"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        layers.CPU_AUTOCAST_FALLBACK = saved


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, modes: list[str], repeats: int) -> list[dict]:
    config, side, batch, tokens = CONFIGS[name]
    ref, ours = build(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=g)
    ctx = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    t = torch.tensor([500] * batch)
    rows = []
    for mode in modes:
        with torch.inference_mode(), precision(mode):
            run_ref = lambda: ref(x, t, ctx, return_dict=False)[0]  # noqa: E731
            run_ours = lambda: ours(x, t, ctx)  # noqa: E731
            diff = (run_ref().float() - run_ours().float()).abs().max().item()  # also the warm-up
            times = {"diffusers": [], "chorus": []}
            for r in range(repeats):
                order = [("diffusers", run_ref), ("chorus", run_ours)]
                for who, fn in (order if r % 2 == 0 else order[::-1]):
                    times[who].append(timed(fn))
        d, c = (statistics.median(w for w, _ in times[k]) for k in ("diffusers", "chorus"))
        d_cpu, c_cpu = (statistics.median(u for _, u in times[k]) for k in ("diffusers", "chorus"))
        with torch.inference_mode():
            flops = count_flops(run_ours)
        rows.append(dict(config=name, mode=mode, shape=f"{batch}×4×{side}×{side}", diffusers=d, chorus=c,
                         diffusers_cpu=d_cpu, chorus_cpu=c_cpu, max_diff=diff, repeats=repeats, flops=flops))
        print(f"  {name} {mode}: wall diffusers {d:.3f}s chorus {c:.3f}s ratio {d / c:.2f} | "
              f"cpu diffusers {d_cpu:.3f}s chorus {c_cpu:.3f}s ratio {d_cpu / c_cpu:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "bf16-forced"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 10, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    from chorus.models.layers import cpu_has_bf16_kernels

    peak = peaks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats (median), "
          f"CPU bf16 kernels: {cpu_has_bf16_kernels()}, CPU flags: {cpu_flags()}, matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    rows = [row for name in args.configs for row in bench(name, args.modes, repeats)]
    print("\n| config | latent | precision | diffusers wall s | Chorus wall s | ratio | diffusers CPU s | "
          "Chorus CPU s | CPU ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['shape']} | {r['mode']} | {r['diffusers']:.3f} | {r['chorus']:.3f} | "
              f"{r['diffusers'] / r['chorus']:.2f}× | {r['diffusers_cpu']:.3f} | {r['chorus_cpu']:.3f} | "
              f"{r['diffusers_cpu'] / r['chorus_cpu']:.2f}× | {r['max_diff']:.1e} |")
    print("\n| config | precision | GFLOP per forward | diffusers GFLOP/s | Chorus GFLOP/s | Chorus / fp32 peak |"
          + (" Chorus / bf16 peak |" if "bf16" in peak else ""))
    print("|---|---|---|---|---|---|" + ("---|" if "bf16" in peak else ""))
    for r in rows:
        ours = rate(r["flops"], r["chorus"])
        print(f"| {r['config']} | {r['mode']} | {r['flops'] / 1e9:.2f} | {rate(r['flops'], r['diffusers']):.1f} | "
              f"{ours:.1f} | {ours / peak['fp32']:.0%} |" + (f" {ours / peak['bf16']:.0%} |" if "bf16" in peak else ""))


if __name__ == "__main__":
    main()
