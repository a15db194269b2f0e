"""bf16 against fp32 in the real trainer: samples/s and the loss curve of the same run in both precisions.

    python benchmarks/train_precision.py                          # default-scratch's UNet recipe, 300 steps
    python benchmarks/train_precision.py --preset tiny --steps 200 --batch 16

Both runs are the same `chorus train` UNet run (preset's UNet recipe, same seed: the same data, timesteps and
noise at every step) except `mixed_precision` ("no" = fp32, "bf16" = autocast), into OUT/no-I and OUT/bf16-I
(I: the run's place in the order).
They run one after the other, twice in alternating order when --rounds 2, so load from other processes hits
both alike. Reported: samples/s (the median over the logged steps after the first `--skip`), and the loss
curves' agreement: the mean loss over each window of `--window` steps in both runs and their relative
difference. The CPU flags go beside the figures (machines differ).
Writes OUT/report.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from efficiency import cpu_flags  # noqa: E402


def run(preset: str, mode: str, steps: int, batch: int | None, out: Path) -> list[dict]:
    from chorus.train.config import preset as get_preset
    from chorus.train.unet import train_unet
    from chorus.paths import shipped_weights
    cfg = get_preset(preset).unet
    if not (cfg.base or cfg.vae):   # a preset whose recipe trains its own VAE / text encoder first: the shipped ones
        cfg = dataclasses.replace(cfg, vae=str(shipped_weights("vae-world-f4")), text_encoder=str(shipped_weights("text-world")))
    cfg = dataclasses.replace(cfg, steps=steps, mixed_precision=mode, log_every=1, save_every=steps, keep_last=1,
                              sample_every=0, sample_prompts=(), eval_every=0, warmup_steps=min(cfg.warmup_steps, steps // 5),
                              batch_size=batch or cfg.batch_size, seed=0)
    if out.exists():
        shutil.rmtree(out)
    train_unet(cfg, out, progress=False)
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()
            if '"loss"' in line and '"step"' in line]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default-scratch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--rounds", type=int, default=1, help="2: fp32, bf16, bf16, fp32 (speed medians over both)")
    p.add_argument("--skip", type=int, default=20, help="steps left out of the speed median (warm-up, caches)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/bench_precision")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from chorus.models.layers import cpu_has_bf16_kernels
    out = Path(args.out)
    order = ["no", "bf16", "bf16", "no"][:2 * args.rounds] if args.rounds > 1 else ["no", "bf16"]
    logs: dict[str, list[list[dict]]] = {"no": [], "bf16": []}
    for i, mode in enumerate(order):
        logs[mode].append(run(args.preset, mode, args.steps, args.batch, out / f"{mode}-{i}"))
    speed = {m: statistics.median(r["samples_per_s"] for rows in runs for r in rows if r["step"] > args.skip)
             for m, runs in logs.items()}
    curves = {m: [r["loss"] for r in runs[0]] for m, runs in logs.items()}
    windows = []
    for start in range(0, args.steps, args.window):
        a, b = (statistics.mean(curves[m][start:start + args.window]) for m in ("no", "bf16"))
        windows.append({"steps": f"{start + 1}-{min(start + args.window, args.steps)}", "fp32": a, "bf16": b,
                        "rel_diff": (b - a) / a})
    report = {"command": "python benchmarks/train_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
              "cpu_bf16_kernels": cpu_has_bf16_kernels(), "preset": args.preset, "steps": args.steps,
              "samples_per_s": speed, "speedup_bf16": speed["bf16"] / speed["no"], "windows": windows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"CPU flags: {report['cpu_flags']}; bf16 kernels: {report['cpu_bf16_kernels']}; torch {torch.__version__}, "
          f"{report['threads']} threads; {args.preset}, {args.steps} steps")
    print(f"\nsamples/s: fp32 {speed['no']:.1f}, bf16 {speed['bf16']:.1f} → {report['speedup_bf16']:.2f}×\n")
    print("| steps | fp32 mean loss | bf16 mean loss | bf16 − fp32 |\n|---|---|---|---|")
    for w in windows:
        print(f"| {w['steps']} | {w['fp32']:.4f} | {w['bf16']:.4f} | {w['rel_diff']:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
