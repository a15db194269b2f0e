"""Text-to-image speed: Chorus's Pipeline vs diffusers' StableDiffusionPipeline on the same model folder.

    python benchmarks/generate.py                            # the shipped default model, 16 images, 20 steps
    python benchmarks/generate.py --model runs/default/model --threads 1 --repeats 5
    python benchmarks/generate.py --model runs/stage2/weights/default --chorus-dtype bf16   # Chorus in bf16, diffusers fp32
    python benchmarks/generate.py --model runs/stage2/weights/default --compile both        # torch.compile'd UNets

Both sides load the same exported folder (safetensors) and make the same 16 images: 16 prompts of the
world benchmark, 20 DPM-Solver++ 2M steps (diffusers: DPMSolverMultistepScheduler from the folder's
scheduler config), classifier-free guidance 5, one CPU generator seeded 0, PIL images out. A call is
timed whole: tokenizing, text encoding, sampling and VAE decoding. Calls alternate between the two
(order flipping each repeat) after one warm-up call each, and the median is taken, so load from other
processes hits both alike. Prints wall-clock and process-CPU medians, the ratio diffusers / Chorus
(> 1: Chorus is faster) and how far the images differ (0-255 pixel values).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from efficiency import count_flops, cpu_flags, peaks, rate  # noqa: E402


def prompts(n: int) -> list[str]:
    from chorus.world.benchmark import load_specs
    specs = load_specs(None)
    step = max(1, len(specs) // n)
    return [specs[i * step]["prompt"] for i in range(n)]


def load_both(folder: str):
    import diffusers

    from chorus.errors import ChorusError
    from chorus.pipeline import Pipeline, default_model_path
    root = default_model_path() if folder == "default" else os.path.abspath(folder)
    if os.path.isfile(os.path.join(root, "conditioner.json")):
        raise ChorusError(f"{root} holds a conditioner diffusers' pipelines cannot express (conditioner.json: an "
                          "ensemble of text encoders); diffusers cannot load it whole, so there is no peer to time. "
                          "Give --model a plain SD folder (e.g. the stage-2 model, runs/default/stage-2/model).")
    ours = Pipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                            torch_dtype=torch.float32)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model folder or 'default' (the shipped model)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--chorus-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="Chorus's precision (Pipeline.to(dtype=…)); diffusers stays fp32, so with bf16 the ratio is "
                        "Chorus's bf16 path against diffusers' fp32 one and the pixel figures are bf16's error")
    p.add_argument("--compile", default="none", choices=["none", "chorus", "both"],
                   help="torch.compile the UNet of Chorus (Pipeline.compile) or of both (diffusers: "
                        "pipe.unet = torch.compile(pipe.unet)); the compile happens in the warm-up call, timed apart")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from chorus.pipeline import default_model_path
    folder = str(default_model_path()) if args.model == "default" else args.model
    peak = peaks()
    ours, ref = load_both(folder)
    if args.chorus_dtype == "bf16":
        ours.to(dtype=torch.bfloat16)
    texts = prompts(args.images)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)

    def run_chorus():
        return ours(prompt=texts, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0), progress=False,
                    **kw).images

    def run_diffusers():
        with torch.no_grad():
            return ref(prompt=texts, generator=torch.Generator().manual_seed(0), **kw).images

    flops = count_flops(run_chorus)   # eager (what a compiled call computes too)
    if args.compile != "none":
        ours.compile()
    if args.compile == "both":
        ref.unet = torch.compile(ref.unet)
    runs = {"chorus": run_chorus, "diffusers": run_diffusers}
    images, warm_s = {}, {}
    for name, fn in runs.items():   # warm-up (and the compile), and the images to compare
        images[name], warm_s[name], _ = timed(fn)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (("chorus", "diffusers") if r % 2 == 0 else ("diffusers", "chorus")):
            _, w, c = timed(runs[name])
            wall[name].append(w)
            cpu[name].append(c)
    a = np.stack([np.asarray(im, dtype=np.int16) for im in images["chorus"]])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in images["diffusers"]])
    diff = np.abs(a - b)
    res = {"model": folder, "chorus_dtype": args.chorus_dtype, "compile": args.compile,
           **{f"{n}_first_call_s": warm_s[n] for n in runs}, "images": args.images, "steps": args.steps, "guidance": args.guidance,
           "threads": torch.get_num_threads(), "repeats": args.repeats,
           **{f"{n}_wall_s": statistics.median(wall[n]) for n in runs},
           **{f"{n}_cpu_s": statistics.median(cpu[n]) for n in runs},
           "pixel_max_abs_diff": int(diff.max()), "pixel_mean_abs_diff": float(diff.mean()),
           "pixels_differing": float((diff > 1).mean())}
    res.update(flops=flops, cpu_flags=cpu_flags(), **{f"peak_{k}_gflops": v for k, v in peak.items()},
               **{f"{n}_gflops": rate(flops, res[f"{n}_wall_s"]) for n in runs})
    res["ratio_wall"] = res["diffusers_wall_s"] / res["chorus_wall_s"]
    res["ratio_cpu"] = res["diffusers_cpu_s"] / res["chorus_cpu_s"]
    print(f"| pipeline | wall s (median of {args.repeats}) | images/s | CPU s |")
    print("|---|---|---|---|")
    for n in runs:
        print(f"| {n} | {res[f'{n}_wall_s']:.2f} | {args.images / res[f'{n}_wall_s']:.1f} | {res[f'{n}_cpu_s']:.2f} |")
    print(f"\ndiffusers fp32 / Chorus {args.chorus_dtype}: {res['ratio_wall']:.2f}× wall, {res['ratio_cpu']:.2f}× CPU "
          f"({args.images} images, {args.steps} steps, guidance {args.guidance}, {res['threads']} threads)")
    if args.compile != "none":
        print("first call (with the compile): " + ", ".join(f"{n} {warm_s[n]:.1f} s" for n in runs))
    print(f"images: max |Δ| {res['pixel_max_abs_diff']}/255, mean |Δ| {res['pixel_mean_abs_diff']:.3f}, "
          f"{100 * res['pixels_differing']:.2f}% of values differ by more than 1")
    print(f"arithmetic: {flops / 1e9:.0f} GFLOP per call (text encoders, UNet steps, VAE decode); achieved "
          + ", ".join(f"{n} {res[f'{n}_gflops']:.1f} GFLOP/s" for n in runs)
          + f" against this machine's fp32 matmul peak {peak['fp32']:.0f} GFLOP/s (Chorus at "
          f"{res['chorus_gflops'] / peak['fp32']:.0%}); CPU: {res['cpu_flags']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
