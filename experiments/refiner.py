"""SDXL's refiner: does a same-latent-space expert for the lowest-noise steps improve the base's samples?
(claims_protocols.md §5.2).

    chorus train --part refiner --base default --steps 300 --out runs/refiner     # the refiner (R-q)
    python experiments/refiner.py [--threads 1]

Arms, on the world benchmark (553 prompts × 1 image, seed 0, guidance 2 — the shipped model's), all with the
same sampler (DPM++ 2M):
- base alone, 20 steps;
- base → base at 0.8: the hand-over alone (the multistep sampler restarts at it), the control of the next;
- base → refiner, hand-over at 0.8 (diffusers' denoising_end / denoising_start): 20 steps in all, the last 4 by
  the refiner — equal inference cost;
- base → "R-all", the same hand-over to the low-noise expert of the 3-expert run (t < 200 on all data, no
  quality score): it separates the specialised interval from the refiner's data and conditioning;
- SDEdit refinement: the base's image noised to strength 0.2 (t ≈ 200, inside the refiner's interval) and
  denoised by the refiner alone — 4 more steps.
Measured: FID-world (against renders of the same specs), sharpness (the high-frequency share of
experiments/size_conditioning.py, beside renders'), and the benchmark (predicted not to move: a low-noise
expert cannot change the layout). Writes docs/records/refiner.json / .md and docs/images/refiner.png.
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
sys.path.insert(0, str(ROOT / "experiments"))

from size_conditioning import sharpness  # noqa: E402

from chorus.pipeline import Pipeline  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.eval_cli import fid_against_renders, render_specs  # noqa: E402
from chorus.world.evaluator import Evaluator, score_images  # noqa: E402
from chorus.world.scoring import summarize  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refiner", default=str(ROOT / "runs/refiner/model"))
    ap.add_argument("--r-all", default=str(ROOT / "runs/experts-3/low/model"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--switch-at", type=float, default=0.8)
    ap.add_argument("--strength", type=float, default=0.2)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/records/refiner.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    specs = load_specs()[:args.limit]
    prompts = [s["prompt"] for s in specs]
    ev = Evaluator.load()
    base = Pipeline.from_pretrained("default")
    g = args.guidance or base.default_guidance
    kw = dict(num_inference_steps=args.steps, guidance_scale=g, progress=False)

    def run(pipe, **extra):
        images = []
        for i in range(0, len(prompts), 16):
            images += pipe(prompts[i:i + 16], seed=i, **kw, **{k: (v[i:i + 16] if isinstance(v, list) else v)
                                                              for k, v in extra.items()}).images
        return images

    arms = {}
    arms["base alone"] = run(base)
    arms[f"base → base at {args.switch_at:g} (the hand-over alone)"] = run(
        Pipeline.from_pretrained("default", refiner="default", switch_at=args.switch_at))
    arms[f"base → refiner at {args.switch_at:g}"] = run(Pipeline.from_pretrained("default", refiner=args.refiner,
                                                                                 switch_at=args.switch_at))
    if Path(args.r_all).is_dir():
        arms[f"base → R-all (3-expert run's low expert) at {args.switch_at:g}"] = run(
            Pipeline.from_pretrained("default", refiner=args.r_all, switch_at=args.switch_at))
    refiner_alone = Pipeline.from_pretrained(args.refiner)
    arms[f"base, then SDEdit by the refiner (strength {args.strength:g})"] = run(
        refiner_alone, image=arms["base alone"], strength=args.strength)
    renders = render_specs(specs, 5_000_000)
    results = {"renders": {"sharpness": float(np.mean([sharpness(x) for x in renders]))}}
    for name, images in arms.items():
        summary = summarize(score_images(images, specs, ev))
        fid = fid_against_renders(ev, images, specs)
        results[name] = {"overall": summary["overall"], "tasks": summary["tasks"], "fid_world": fid["fid"],
                         "kid_world": fid["kid"], "fid_floor": fid["fid_floor"],
                         "sharpness": float(np.mean([sharpness(x) for x in images]))}
        print(f"{name}: {results[name]}", flush=True)
    b, r = results["base alone"], results[f"base → refiner at {args.switch_at:g}"]
    sharper, better_fid, same = r["sharpness"] > b["sharpness"], r["fid_world"] < b["fid_world"], \
        abs(r["overall"] - b["overall"]) <= 0.02
    word = "reproduced" if sharper and better_fid and same else "mixed" if sharper or better_fid else "not reproduced"
    verdict = (f"{word}: base → refiner FID-world {r['fid_world']:.3f} vs base {b['fid_world']:.3f}, sharpness "
               f"{r['sharpness']:.4f} vs {b['sharpness']:.4f} (renders {results['renders']['sharpness']:.4f}), "
               f"benchmark {r['overall']:.3f} vs {b['overall']:.3f} (the claim: a low-noise expert improves detail "
               "and leaves the composition alone)")
    record = {"command": "python experiments/refiner.py " + " ".join(sys.argv[1:]), "prompts": len(specs),
              "steps": args.steps, "guidance": g, "switch_at": args.switch_at, "strength": args.strength,
              "results": results, "verdict": verdict, "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(record, indent=1))
    lines = [f"Refiner, the world benchmark ({len(specs)} prompts × 1, seed 0), {args.steps} DPM++ 2M steps, guidance {g:g} "
             f"(`{record['command']}`, {record['seconds'] / 60:.0f} min).", "",
             "| arm | benchmark overall | FID-world ↓ | KID-world ↓ | sharpness (renders: "
             f"{results['renders']['sharpness']:.4f}) |", "|---|---|---|---|---|"]
    for name, x in results.items():
        if name != "renders":
            lines.append(f"| {name} | {x['overall']:.3f} | {x['fid_world']:.3f} | {x['kid_world']:.4f} | "
                         f"{x['sharpness']:.4f} |")
    lines += ["", f"**Verdict:** {verdict}", ""]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    from PIL import Image, ImageDraw
    names = list(arms)
    im = Image.new("RGB", (8 * 66 + 300, len(names) * 66), "white")
    d = ImageDraw.Draw(im)
    for r_, name in enumerate(names):
        for c, k in enumerate(np.linspace(0, len(arms[name]) - 1, 8).astype(int)):
            im.paste(arms[name][k], (c * 66, r_ * 66))
        d.text((8 * 66 + 4, r_ * 66 + 28), name, fill="black")
    im.save(ROOT / "docs/images/refiner.png")
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
