"""Steps to quality: the shipped default model's world-benchmark score and FID-world as a function of the number
of sampling steps, for each sampler, with and without Karras σ (the issue "Faster than diffusers…", item 4).

    python experiments/steps_to_quality.py [--images-per-prompt 2] [--threads 2]
    python experiments/steps_to_quality.py --apply     # write the chosen --steps into weights/default

My own validation prompts (docs/records/default-grow/val_specs.jsonl: build_benchmark(seed=424242) minus every
benchmark prompt; never the benchmark), k images each, the model's guidance, paired noise: every (sampler,
steps) starts from the same initial latents, so a difference between two step counts is the steps' doing.
For each configuration the 50-step run is the reference: the fewest steps from which on the overall score is
within 5 % below it and FID-world within 5 % above it (point estimates; the paired bootstrap SE of the score's
difference is beside it) is that sampler's steps to quality, and the default sampler's becomes the model's `num_inference_steps` in sampling_defaults.json
(`--apply`). Also recorded: FID-world and the mean |Δ| in pixels from the same configuration's 50-step image
(how far from converged). NFE counts UNet evaluations per image (Heun: 2 per step but the last).

Raw records (every configuration's per-image verdicts) go to docs/records/steps_to_quality.json after each
configuration (an interrupted run resumes); the table to .md, the figure to docs/images/steps_to_quality.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chorus.pipeline import Pipeline  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.eval_cli import fid_against_renders, generate_images  # noqa: E402
from chorus.world.evaluator import Evaluator, score_images  # noqa: E402
from chorus.world.scoring import overall_standard_error, paired_difference_standard_error, summarize  # noqa: E402

FULL = [50, 30, 20, 15, 10, 5]          # the reference first: the others are measured against it
SHORT = [50, 20, 10]
# (sampler, karras, steps grid): every sampler on the full grid without Karras σ and DPM++ 2M with it (A1111's
# most used pair); the other Karras variants on the short grid (CPU budget)
CONFIGS = [("dpmpp_2m", False, FULL), ("dpmpp_2m", True, FULL), ("euler", False, FULL), ("euler_a", False, FULL),
           ("ddim", False, FULL), ("heun", False, FULL), ("dpmpp_2m_sde", False, FULL),
           ("euler", True, SHORT), ("euler_a", True, SHORT), ("heun", True, SHORT), ("dpmpp_2m_sde", True, SHORT)]
DEFAULT_SAMPLER = "dpmpp_2m"
WITHIN = 0.05


def label(sampler: str, karras: bool) -> str:
    return sampler + (" karras" if karras else "")


def nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def steps_to_quality(rows: list[dict]) -> dict | None:
    """The fewest steps from which on (it and every larger count measured) the overall score is within WITHIN
    below the 50-step one and FID-world within WITHIN above it, among one configuration's rows."""
    ref = next((r for r in rows if r["steps"] == 50), None)
    if ref is None:
        return None
    good = lambda r: (r["overall"] >= (1 - WITHIN) * ref["overall"]  # noqa: E731
                      and r["fid_world"] <= (1 + WITHIN) * ref["fid_world"])
    rows = sorted(rows, key=lambda r: r["steps"])
    best = next(r for i, r in enumerate(rows) if all(good(q) for q in rows[i:]))
    return {"steps": best["steps"], "nfe": best["nfe"], "overall": best["overall"], "overall_50": ref["overall"],
            "fid": best["fid_world"], "fid_50": ref["fid_world"]}


def report(record: dict, out: Path) -> None:
    rows = record["rows"]
    by_cfg: dict[str, list[dict]] = {}
    for r in rows:
        by_cfg.setdefault(label(r["sampler"], r["karras"]), []).append(r)
    lines = [f"# Steps to quality: the default model ({record['prompts']} validation prompts × "
             f"{record['images_per_prompt']}, guidance {record['guidance']:g}, paired noise)", "",
             f"`{record['command']}`; raw records in `{out.name}`. ± : the paired bootstrap SE of the difference from "
             "the same sampler's 50 steps. |Δ|: mean absolute pixel difference (0–255) from that 50-step image.", "",
             "| sampler | steps | NFE | overall | − 50 steps | FID-world | |Δ| | s |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in by_cfg.items():
        for r in sorted(rs, key=lambda r: r["steps"]):
            d = r.get("diff_vs_50")
            dd = f"{d:+.3f} ± {r['diff_se']:.3f}" if d is not None else "–"
            lines.append(f"| {name} | {r['steps']} | {r['nfe']} | {r['overall']:.3f} ± {r['overall_se']:.3f} | {dd} | "
                         f"{r['fid_world']:.3f} | {r['delta_px']:.1f} | {r['seconds']:.0f} |")
    lines += ["", f"## Steps to quality: the fewest steps from which on the overall is within {WITHIN:.0%} below and "
              f"FID-world within {WITHIN:.0%} above the same sampler's 50 steps", "",
              "| sampler | steps | NFE | overall | at 50 | FID-world | at 50 |", "|---|---|---|---|---|---|---|"]
    for name, rs in by_cfg.items():
        s = steps_to_quality(rs)
        if s:
            lines.append(f"| {name} | {s['steps']} | {s['nfe']} | {s['overall']:.3f} | {s['overall_50']:.3f} | "
                         f"{s['fid']:.3f} | {s['fid_50']:.3f} |")
    if record.get("choice"):
        lines += ["", f"**Default:** {record['choice']}"]
    lines += ["", "![steps to quality](../images/steps_to_quality.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    figure(by_cfg, ROOT / "docs/images/steps_to_quality.png")


def figure(by_cfg: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(dict.fromkeys(k.replace(" karras", "")
                                                                              for k in by_cfg))}
    for name, rs in by_cfg.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        style = "--" if "karras" in name else "-"
        x = [r["nfe"] for r in rs]
        axes[0].errorbar(x, [r["overall"] for r in rs], yerr=[r["overall_se"] for r in rs], fmt="o" + style,
                         ms=3, capsize=2, label=name, color=colours[name.replace(" karras", "")])
        axes[1].plot(x, [r["fid_world"] for r in rs], "o" + style, ms=3, label=name,
                     color=colours[name.replace(" karras", "")])
    for ax, title in zip(axes, ["world benchmark overall (validation prompts)", "FID-world (lower is better)"]):
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations per image (NFE)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2, title="dashed: Karras σ", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def choose(record: dict) -> tuple[int, str]:
    rows = [r for r in record["rows"] if r["sampler"] == DEFAULT_SAMPLER and not r["karras"]]
    s = steps_to_quality(rows)
    if s is None:
        raise SystemExit(f"no 50-step {DEFAULT_SAMPLER} run in the record yet")
    return s["steps"], (f"{s['steps']} {DEFAULT_SAMPLER} steps: overall {s['overall']:.3f} vs {s['overall_50']:.3f} at 50 "
                        f"(within {WITHIN:.0%}), FID-world {s['fid']:.3f} vs {s['fid_50']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=None, help="only the first N validation prompts (a smoke run)")
    ap.add_argument("--configs", nargs="+", default=None, help="only these, e.g. dpmpp_2m 'euler karras'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--apply", action="store_true", help="write the default sampler's steps to quality into "
                    "weights/default/sampling_defaults.json (from the record; generates nothing)")
    ap.add_argument("--out", default=str(ROOT / "docs/records/steps_to_quality.json"))
    ap.add_argument("--cache", default=str(ROOT / "runs/steps_to_quality"), help="the 50-step images (for |Δ|)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.apply:
        record = json.loads(out.read_text())
        steps, why = choose(record)
        path = ROOT / "weights/default/sampling_defaults.json"
        defaults = json.loads(path.read_text())
        defaults["num_inference_steps"] = steps
        defaults["steps_chosen_on"] = f"docs/records/{out.name}: {why}"
        path.write_text(json.dumps(defaults, indent=1) + "\n")
        record["choice"] = why
        out.write_text(json.dumps(record, indent=1))
        report(record, out)
        print(f"{path}: num_inference_steps = {steps} ({why})")
        return 0
    torch.set_num_threads(args.threads)
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")[:args.prompts]
    k = args.images_per_prompt
    flat = [s for s in specs for _ in range(k)]
    tags = [s["tag"] for s in flat]
    pipe = Pipeline.from_pretrained("default")
    ev = Evaluator.load()
    command = "python experiments/steps_to_quality.py " + " ".join(sys.argv[1:])
    record = json.loads(out.read_text()) if out.is_file() else {}
    if record.get("prompts") != len(specs) or record.get("images_per_prompt") != k:
        record = {"prompts": len(specs), "images_per_prompt": k, "guidance": pipe.default_guidance, "rows": []}
    record["command"] = command
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for sampler, karras, grid in CONFIGS:
        if args.configs and label(sampler, karras) not in args.configs:
            continue
        ref_file = cache / f"{sampler}{'_karras' if karras else ''}_{len(specs)}x{k}_50.npz"
        for steps in grid:
            done = [r for r in record["rows"] if (r["sampler"], r["karras"], r["steps"]) == (sampler, karras, steps)]
            if done:
                continue
            t = time.time()
            images = generate_images(pipe, specs, k, steps, None, 0, progress=False, sampler=sampler, karras=karras)
            seconds = time.time() - t
            px = pixels(images)
            if steps == 50:
                np.savez_compressed(ref_file, px=px)
            ref_px = np.load(ref_file)["px"]
            records = score_images(images, flat, ev)
            summary = summarize(records)
            fid = fid_against_renders(ev, images, flat)
            correct = [bool(r["correct"]) for r in records]
            row = {"sampler": sampler, "karras": karras, "steps": steps, "nfe": nfe(sampler, steps),
                   "overall": summary["overall"], "overall_se": overall_standard_error(correct, tags),
                   "tasks": summary["tasks"], "fid_world": fid["fid"], "fid_floor": fid["fid_floor"],
                   "delta_px": float(np.abs(px.astype(np.int16) - ref_px.astype(np.int16)).mean()),
                   "seconds": seconds, "correct": correct}
            ref = next((r for r in record["rows"] if (r["sampler"], r["karras"], r["steps"]) == (sampler, karras, 50)), None)
            if ref is not None and steps != 50:
                row["diff_vs_50"] = row["overall"] - ref["overall"]
                row["diff_se"] = paired_difference_standard_error(correct, ref["correct"], tags)
            record["rows"].append(row)
            out.write_text(json.dumps(record, indent=1))   # after every configuration: nothing lost
            report(record, out)
            print(f"{label(sampler, karras)} {steps} steps: overall {row['overall']:.3f}, FID {row['fid_world']:.3f}, "
                  f"|Δ| {row['delta_px']:.1f} ({seconds:.0f} s; {time.time() - t0:.0f} s in all)", flush=True)
    record["seconds_total"] = record.get("seconds_total", 0) + time.time() - t0
    out.write_text(json.dumps(record, indent=1))
    report(record, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
