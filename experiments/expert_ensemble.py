"""eDiff-I's ensemble of expert denoisers at equal training samples and equal inference cost: the shared model,
the shared model continued, 2 experts and 3 experts branched from it (claims_protocols.md §6.2).

    # the systems (chorus train --part experts; --steps is the total budget, shared evenly):
    chorus train --part experts --base default --splits 0.5     --steps 600 --out runs/experts-2
    chorus train --part experts --base default --splits 0.2,0.8 --steps 600 --out runs/experts-3
    chorus train --part experts --base default --splits none    --steps 600 --out runs/experts-1
    python experiments/expert_ensemble.py [--guidance 1 2 4 8] [--threads 1]

Each system is sampled with 20 DPM++ 2M steps — one UNet call per step whichever expert owns it, so the
inference cost is equal — over classifier-free guidance scales (the curve of eDiff-I's Fig. 7, not one point):
the world benchmark (every 2nd of its 553 prompts × 1 image, per task) against FID-world. The continuation is eDiff-I's control:
the shared model trained on for the same total samples on the whole schedule. Results are kept per (system,
guidance) in the record as they finish, so an interrupted run resumes where it stopped.
Writes docs/records/expert_ensemble.json / .md and docs/images/expert_ensemble.png.
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
from chorus.world.scoring import overall_standard_error, summarize  # noqa: E402

SYSTEMS = {"shared model": "default", "continued (600 steps, whole schedule)": "runs/experts-1/model",
           "2 experts (0.5; 300 + 300 steps)": "runs/experts-2/model",
           "3 experts (0.2, 0.8; 200 × 3 steps)": "runs/experts-3/model"}
CONTROL = "continued (600 steps, whole schedule)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=2, help="every k-th benchmark prompt (2: 277 of 553, each task's "
                    "share kept; a CPU budget)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N benchmark prompts (a smoke run)")
    ap.add_argument("--systems", nargs="+", default=None, help="a subset of the systems, by folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/records/expert_ensemble.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"results": {}}
    record.update(command="python experiments/expert_ensemble.py " + " ".join(sys.argv[1:]), steps=args.steps,
                  sampler="dpmpp_2m", images_per_prompt=1, every=args.every)
    specs = load_specs()[::args.every][:args.limit]
    record["prompts"] = len(specs)
    ev = Evaluator.load()
    for name, folder in SYSTEMS.items():
        if args.systems and folder not in args.systems:
            continue
        if folder != "default" and not (ROOT / folder / "model_index.json").is_file():
            print(f"{name}: {folder} is not trained yet; skipped", flush=True)
            continue
        pipe = None
        for g in args.guidance:
            key = f"{g:g}"
            if key in record["results"].get(name, {}):
                continue
            pipe = pipe or Pipeline.from_pretrained(folder if folder == "default" else ROOT / folder)
            t0 = time.time()
            images = generate_images(pipe, specs, 1, args.steps, g, 0, progress=False)
            records = score_images(images, specs, ev)
            summary = summarize(records)
            fid = fid_against_renders(ev, images, specs)
            record["results"].setdefault(name, {})[key] = {
                "overall": summary["overall"], "tasks": summary["tasks"], "fid_world": fid["fid"],
                "fid_floor": fid["fid_floor"], "experts": [e.name for e in pipe.experts],
                "correct": [bool(r["correct"]) for r in records], "seconds": time.time() - t0}
            out.write_text(json.dumps(record, indent=1))
            print(f"{name}, guidance {key}: overall {summary['overall']:.3f}, FID-world {fid['fid']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    # attribution (expert swaps): the 2-expert ensemble with one of its experts replaced by the continuation
    swaps = {"2 experts, high-noise expert swapped for the continuation": ("runs/experts-1/model", "runs/experts-2/low/model"),
             "2 experts, low-noise expert swapped for the continuation": ("runs/experts-2/high/model", "runs/experts-1/model")}
    for name, (high, low) in swaps.items():
        if name in record["results"] or not all((ROOT / f / "model_index.json").is_file() for f in (high, low)):
            continue
        from chorus.train.experts import assemble
        folder = ROOT / "runs/expert-swaps" / name.split(", ")[1].split(" ")[0]
        experts = [{"name": "high", "start": 0.0, "end": 0.5, "timestep_interval": (0.5, 1.0), "steps": 300},
                   {"name": "low", "start": 0.5, "end": 1.0, "timestep_interval": (0.0, 0.5), "steps": 300}]
        folder.parent.mkdir(parents=True, exist_ok=True)
        assemble([ROOT / high, ROOT / low], experts, folder)
        pipe = Pipeline.from_pretrained(folder)
        t0 = time.time()
        images = generate_images(pipe, specs, 1, args.steps, 2.0, 0, progress=False)
        summary = summarize(score_images(images, specs, ev))
        fid = fid_against_renders(ev, images, specs)
        record["results"][name] = {"2": {"overall": summary["overall"], "tasks": summary["tasks"],
                                         "fid_world": fid["fid"], "fid_floor": fid["fid_floor"],
                                         "experts": [high, low], "seconds": time.time() - t0}}
        out.write_text(json.dumps(record, indent=1))
        print(f"{name}, guidance 2: overall {summary['overall']:.3f}, FID-world {fid['fid']:.3f}", flush=True)
    record["verdict"] = verdict(record["results"], args.guidance)
    out.write_text(json.dumps(record, indent=1))
    write_table(record, out.with_suffix(".md"), args.guidance)
    figure(record["results"], ROOT / "docs/images/expert_ensemble.png")
    print(record["verdict"])
    return 0


def verdict(results: dict, guidance: list[float]) -> str:
    control = results.get(CONTROL, {})
    bits, wins, gains = [], [], []
    for name in SYSTEMS:
        if "expert" not in name or name not in results:
            continue
        shared = [f"{g:g}" for g in guidance if f"{g:g}" in results[name] and f"{g:g}" in control]
        if not shared:
            continue
        d_score = [results[name][g]["overall"] - control[g]["overall"] for g in shared]
        d_fid = [results[name][g]["fid_world"] - control[g]["fid_world"] for g in shared]
        better = sum(s >= 0 and f <= 0 for s, f in zip(d_score, d_fid))
        wins.append(better == len(shared))
        gains.append(np.mean(d_score) > 0 or np.mean(d_fid) < 0)
        bits.append(f"{name.split(' (')[0]}: overall {np.mean(d_score):+.3f} and FID-world {np.mean(d_fid):+.3f} on "
                    f"average against the continuation, better on both at {better} of {len(shared)} guidance scales")
    if not bits:
        return "not measured yet"
    word = "reproduced" if all(wins) else "mixed" if any(gains) else "not reproduced"
    return word + ": " + "; ".join(bits) + " (the claim: experts beat the single model trained on for the same " \
        "samples along the whole guidance curve)"


def write_table(record: dict, path: Path, guidance: list[float]) -> None:
    lines = [f"Expert ensembles at equal training samples and equal inference cost, the world benchmark ({record['prompts']} "
             f"prompts × 1 image, {record['steps']} DPM++ 2M steps) and FID-world per guidance scale "
             f"(`{record['command']}`).", "",
             "| system | " + " | ".join(f"g = {g:g}: overall / FID" for g in guidance) + " | best overall |",
             "|---|" + "---|" * (len(guidance) + 1)]
    tags_of = [s["tag"] for s in load_specs()[::record.get("every", 1)]][:record["prompts"]]
    ses = [overall_standard_error(r["correct"], tags_of) for per in record["results"].values() for r in per.values()
           if "correct" in r]
    lines[0] += (f" Overall ± {np.mean(ses):.3f} (bootstrap standard error over prompts, the mean over cells); one "
                 "branch seed per system.") if ses else ""
    for name, per in record["results"].items():
        cells = [f"{per[f'{g:g}']['overall']:.3f} / {per[f'{g:g}']['fid_world']:.3f}" if f"{g:g}" in per else "–"
                 for g in guidance]
        best = max(per.values(), key=lambda r: r["overall"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best['overall']:.3f} |")
    tags = None
    for per in record["results"].values():
        for r in per.values():
            tags = tags or list(r["tasks"])
    if tags:
        lines += ["", "Per task at guidance 2 (the shipped model's recommended scale):", "",
                  "| system | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
        for name, per in record["results"].items():
            if "2" in per:
                lines.append(f"| {name} | " + " | ".join(f"{per['2']['tasks'][t]:.3f}" for t in tags) + " |")
    lines += ["", f"**Verdict:** {record['verdict']}", ""]
    path.write_text("\n".join(lines))


def figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, per in results.items():
        if name not in SYSTEMS:
            continue
        gs = sorted(per, key=float)
        ax.plot([per[g]["fid_world"] for g in gs], [per[g]["overall"] for g in gs], "o-", label=name)
        for g in gs:
            ax.annotate(g, (per[g]["fid_world"], per[g]["overall"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("FID-world ↓")
    ax.set_ylabel("benchmark overall ↑")
    ax.set_title("guidance sweep (numbers: guidance scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
