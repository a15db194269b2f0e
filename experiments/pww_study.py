"""Paint-with-words on the world model: placement success and position pass against the weight w′, and the
FID-world cost (claims_protocols.md §9.2, the lean version).

    python experiments/pww_study.py [--seeds 2] [--weights 0 0.1 0.2 0.4 0.8 1.6]

Prompts: the two_object, position and color_attr specs of my own validation set
(docs/records/default-grow/val_specs.jsonl, never the benchmark's). Regions: the object boxes of a render of
the spec (render_spec, a layout that satisfies it; the "box" masks of the protocol), each shape word —
with its colour word when the prompt has one — painted on its object's box. Per weight, with 20 steps and
the model's guidance, paired seeds across arms:
    placement  each painted object detected with its shape, its centre inside its painted box
    pass       the evaluator's verdict on the spec (position prompts: the seminar's weakest task)
    FID-world  of all images of the arm against renders of the same specs (chorus.world.eval_cli)
Writes docs/records/pww_study.json, docs/records/pww_study.md and docs/images/pww_study.png.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chorus.controls import PaintWithWords  # noqa: E402
from chorus.pipeline import Pipeline  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.evaluator import Evaluator  # noqa: E402
from chorus.world.render import render_spec  # noqa: E402
from chorus.world.scoring import evaluate_spec  # noqa: E402


def regions_for(spec: dict, seed: int) -> tuple[dict, list]:
    """{phrase: box} from a render of the spec, and the painted objects' (shape, box)."""
    from chorus.world.evaluator import visible_boxes
    s = render_spec(spec, seed, size=64, with_instances=True)
    boxes = visible_boxes(s.instance_map, len(s.objects), 1)
    prompt = spec["prompt"]
    regions, painted = {}, []
    for req in spec["include"]:
        shape = req["class"]
        k = next(i for i, o in enumerate(s.objects) if o.shape == shape and boxes[i] is not None)
        color = req.get("color")
        phrase = f"{color} {shape}" if color and re.search(rf"\b{color} {shape}\b", prompt) else shape
        if not re.search(rf"\b{re.escape(phrase)}\b", prompt):
            continue
        box = [float(v) for v in boxes[k]]
        regions[phrase] = box
        painted.append((shape, box))
    return regions, painted


def placement(dets, painted) -> bool:
    for shape, (x0, y0, x1, y1) in painted:
        ok = any(d.shape == shape and x0 <= d.center[0] <= x1 and y0 <= d.center[1] <= y1 for d in dets)
        if not ok:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.8, 1.6])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/records/pww_study.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")
    specs = [s for s in specs if s["tag"] in ("two_object", "position", "color_attr")]
    pipe = Pipeline.from_pretrained("default")
    ev = Evaluator.load()
    from chorus.world.eval_cli import fid_against_renders
    guidance = pipe.default_guidance
    items = []
    for i, spec in enumerate(specs):
        regions, painted = regions_for(spec, 500 + i)
        items.append({"spec": spec, "regions": regions, "painted": painted})
    results = {}
    examples = {}
    for w in args.weights:
        t0 = time.time()
        images, rows = [], []
        for seed in range(args.seeds):
            for i, it in enumerate(items):
                controls = [PaintWithWords(it["regions"], weight=w)] if w > 0 and it["regions"] else []
                im = pipe(it["spec"]["prompt"], seed=1000 * seed + i, num_inference_steps=args.steps,
                          guidance_scale=guidance, controls=controls, progress=False).images[0]
                images.append(im)
                rows.append((it, seed))
        dets = ev.detect(images)
        per_tag: dict[str, list] = {}
        place, passed = [], []
        for d, (it, seed) in zip(dets, rows):
            p = placement(d, it["painted"])
            v = bool(evaluate_spec(d, it["spec"]).correct)
            place.append(p)
            passed.append(v)
            per_tag.setdefault(it["spec"]["tag"], []).append(v)
        fid = fid_against_renders(ev, images, [it['spec'] for it, _ in rows])['fid']
        per_seed = [float(np.mean(place[s * len(items):(s + 1) * len(items)])) for s in range(args.seeds)]
        results[str(w)] = {"placement": float(np.mean(place)), "placement_per_seed": per_seed,
                           "pass": float(np.mean(passed)),
                           "pass_per_tag": {k: float(np.mean(v)) for k, v in per_tag.items()},
                           "fid_world": fid, "images": len(images), "seconds": time.time() - t0}
        examples[w] = images[:6]
        r = results[str(w)]
        print(f"w'={w}: placement {r['placement']:.3f} ({' / '.join(f'{x:.2f}' for x in per_seed)}), pass {r['pass']:.3f} "
              f"{r['pass_per_tag']}, FID-world {fid:.3f} ({r['seconds']:.0f} s)", flush=True)
    record = {"command": "python experiments/pww_study.py " + " ".join(sys.argv[1:]), "prompts": len(items),
              "seeds": args.seeds, "steps": args.steps, "guidance": guidance, "regions": "object boxes of a render "
              "of the spec", "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    lines = [f"Paint-with-words, {len(items)} validation prompts × {args.seeds} seeds, {args.steps} steps, guidance "
             f"{guidance} (`{record['command']}`)", "",
             "| w′ | placement ↑ | pass (all) | two_object | position | color_attr | FID-world ↓ |", "|---|---|---|---|---|---|---|"]
    for w, r in results.items():
        t = r["pass_per_tag"]
        lines.append(f"| {w} | {r['placement']:.3f} ± {np.std(r['placement_per_seed']):.3f} | {r['pass']:.3f} | "
                     f"{t.get('two_object', float('nan')):.3f} | {t.get('position', float('nan')):.3f} | "
                     f"{t.get('color_attr', float('nan')):.3f} | {r['fid_world']:.3f} |")
    (ROOT / "docs/records/pww_study.md").write_text("\n".join(lines) + "\n")
    figure(results, examples, items, ROOT / "docs/images/pww_study.png")
    return 0


def figure(results, examples, items, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws = [float(w) for w in results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(ws, [results[str(w)]["placement"] for w in ws], "o-", label="placement")
    axes[0].plot(ws, [results[str(w)]["pass_per_tag"].get("position", np.nan) for w in ws], "s-", label="position pass")
    axes[0].plot(ws, [results[str(w)]["pass"] for w in ws], "^-", label="pass (all)")
    axes[0].set_xlabel("w′")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(ws, [results[str(w)]["fid_world"] for w in ws], "o-", color="tab:red")
    axes[1].set_xlabel("w′")
    axes[1].set_ylabel("FID-world")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    from PIL import Image, ImageDraw
    keys = list(examples)
    im = Image.new("RGB", ((len(keys) + 1) * 68 + 260, 6 * 68 + 16), "white")
    d = ImageDraw.Draw(im)
    d.text((2, 2), "regions", fill="black")
    for r in range(6):
        canvas = Image.new("RGB", (64, 64), "white")
        cd = ImageDraw.Draw(canvas)
        for (shape, box), colour in zip(items[r]["painted"], ("red", "blue", "green")):
            cd.rectangle(box, outline=colour)
        im.paste(canvas, (0, 16 + r * 68))
        d.text(((len(keys) + 1) * 68 + 4, 16 + r * 68 + 28), items[r]["spec"]["prompt"][:42], fill="black")
    for c, w in enumerate(keys):
        d.text(((c + 1) * 68 + 2, 2), f"w'={w}", fill="black")
        for r in range(6):
            im.paste(examples[w][r], ((c + 1) * 68, 16 + r * 68))
    im.save(path.with_name("pww_examples.png"))


if __name__ == "__main__":
    sys.exit(main())
