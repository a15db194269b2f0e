"""The world ControlNet: sudden convergence from its training log, and fidelity / prompt adherence with and
without it (claims_protocols.md §7.2).

    python experiments/controlnet_study.py --run runs/controlnet-layout [--controlnet weights/controlnet-layout]

Part 1 reads the run's logs/train.jsonl: the probe fidelity every ~100 steps (48 held-out scenes, fixed
noise, true captions; chorus.train.controlnet) beside the smoothed loss and the zero convolutions' norm;
a 4-parameter logistic F(s) = a + (b − a)/(1 + exp(−(s − s*)/τ)) is fitted by least squares (grid over
s*, τ), and the rise is called *sudden* when its 10–90 % width Δ = 4.39 τ is under 0.3 s* and the logistic
beats a line by ΔBIC > 10 (the protocol's pre-registered rule), with a rise of at least 0.1.
Part 2 evaluates the final ControlNet on conditions rendered from my own validation specs
(docs/records/default-grow/val_specs.jsonl; never the benchmark): no ControlNet; scale 0.5 / 1 / 2; guess
mode; and with the empty prompt (scale 1, plain and guess mode). Per arm, 2 seeds: fidelity to the
condition's objects (box IoU, all-objects success, shape accuracy; chorus.world.fidelity), prompt adherence
(the evaluator's pass on the spec) and FID-world against renders of the same specs.
Writes docs/records/controlnet_study.json / .md and docs/images/controlnet_convergence.png, controlnet_examples.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MIN_RISE = 0.1   # a jump smaller than this (in the metric's units) is no convergence at all


def logistic_fit(steps: np.ndarray, values: np.ndarray) -> dict:
    """Least-squares fit of a + (b − a)·σ((s − s*)/τ) over a grid of (s*, τ); a, b by linear least squares."""
    best = None
    span = steps.max() - steps.min()
    for s_star in np.linspace(steps.min(), steps.max(), 200):
        for tau in np.geomspace(max(span / 2000, 1.0), span, 120):
            g = 1.0 / (1.0 + np.exp(-(steps - s_star) / tau))
            A = np.stack([1 - g, g], 1)
            coef, *_ = np.linalg.lstsq(A, values, rcond=None)
            sse = float(((A @ coef - values) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, s_star, tau, coef)
    sse, s_star, tau, (a, b) = best
    n = len(values)
    lin = np.polyfit(steps, values, 1)
    sse_lin = float(((np.polyval(lin, steps) - values) ** 2).sum())
    bic = lambda sse_, k: n * np.log(max(sse_, 1e-12) / n) + k * np.log(n)  # noqa: E731
    width = 4.39 * tau
    ratio = float(width / s_star) if s_star > 0 else float("inf")
    dbic = float(bic(sse_lin, 2) - bic(sse, 4))
    sudden = ratio < 0.3 and dbic > 10 and (b - a) >= MIN_RISE
    return {"a": float(a), "b": float(b), "s_star": float(s_star), "tau": float(tau), "rise_width": float(width),
            "width_over_s_star": ratio, "delta_bic_vs_linear": dbic, "rise": float(b - a),
            "verdict": "sudden" if sudden else ("no rise" if (b - a) < MIN_RISE else "gradual")}


def part1(run: Path) -> dict:
    log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    probes = [r for r in log if r.get("event") == "probe"]
    losses = [(r["step"], r["loss_smooth"]) for r in log if "loss_smooth" in r]
    steps = np.array([p["step"] for p in probes], dtype=float)
    out = {"probes": probes, "loss": losses}
    for key in ("mean_iou", "success", "shape_accuracy"):
        out[f"fit_{key}"] = logistic_fit(steps, np.array([p[key] for p in probes]))
    return out


def part2(controlnet: str, seeds: int, steps: int) -> dict:
    from chorus.pipeline import Pipeline
    from chorus.world.benchmark import load_specs
    from chorus.world.conditions import condition_image
    from chorus.world.eval_cli import fid_against_renders
    from chorus.world.evaluator import Evaluator
    from chorus.world.fidelity import Reference, match, summarize
    from chorus.world.render import render_spec
    from chorus.world.scoring import evaluate_spec
    condition = json.loads((Path(controlnet) / "chorus_control.json").read_text())["condition"]
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")
    renders = [render_spec(s, 700 + i, size=64, with_instances=True) for i, s in enumerate(specs)]
    conds = torch.from_numpy(np.stack([condition_image(r, condition) for r in renders])).permute(0, 3, 1, 2) / 255.0
    refs = [Reference.of_sample(r) for r in renders]
    ev = Evaluator.load()
    plain = Pipeline.from_pretrained("default")
    with_cn = Pipeline.from_pretrained("default", controlnet=controlnet)
    g = plain.default_guidance
    arms = {"no ControlNet": dict(pipe=plain), "scale 0.5": dict(scale=0.5), "scale 1": dict(scale=1.0),
            "scale 2": dict(scale=2.0), "guess mode": dict(scale=1.0, guess=True),
            "empty prompt, scale 1": dict(scale=1.0, empty=True),
            "empty prompt, guess mode": dict(scale=1.0, guess=True, empty=True)}
    results, examples = {}, {}
    for name, arm in arms.items():
        t0 = time.time()
        images = []
        for seed in range(seeds):
            for i in range(0, len(specs), 16):
                prompts = ["" if arm.get("empty") else s["prompt"] for s in specs[i:i + 16]]
                kw = dict(num_inference_steps=steps, guidance_scale=g, seed=1000 * seed + i, progress=False)
                if "pipe" in arm:
                    images += arm["pipe"](prompts, **kw).images
                else:
                    images += with_cn(prompts, control_image=conds[i:i + 16], controlnet_conditioning_scale=arm["scale"],
                                      guess_mode=arm.get("guess", False), **kw).images
        dets = ev.detect(images)
        items = [match(refs[k % len(specs)], d) for k, d in enumerate(dets)]
        passed = [bool(evaluate_spec(d, specs[k % len(specs)]).correct) for k, d in enumerate(dets)]
        per_seed = [float(np.mean([it["mean_iou"] for it in items[s * len(specs):(s + 1) * len(specs)]]))
                    for s in range(seeds)]
        fid = fid_against_renders(ev, images, specs * seeds)["fid"]
        results[name] = {**summarize(items), "iou_per_seed": per_seed, "prompt_pass": float(np.mean(passed)),
                         "fid_world": fid, "seconds": time.time() - t0}
        examples[name] = images[:6]
        r = results[name]
        print(f"{name:>26}: IoU {r['mean_iou']:.3f} success {r['success']:.3f} shape {r['shape_accuracy']:.3f} "
              f"prompt pass {r['prompt_pass']:.3f} FID {fid:.3f} ({r['seconds']:.0f} s)", flush=True)
    oracle_items = [match(ref, d) for ref, d in zip(refs, ev.detect([Image.fromarray(r.image) for r in renders]))]
    results["renders themselves (oracle)"] = {**summarize(oracle_items), "prompt_pass": float(np.mean(
        [evaluate_spec(d, s).correct for d, s in zip(ev.detect([Image.fromarray(r.image) for r in renders]), specs)]))}
    return {"condition": condition, "specs": len(specs), "seeds": seeds, "steps": steps, "guidance": g,
            "results": results, "_examples": examples, "_conds": conds[:6], "_renders": renders[:6]}


def figures(p1: dict | None, p2: dict | None, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if p1:
        fig, ax = plt.subplots(figsize=(7, 4))
        pr = p1["probes"]
        s = [p["step"] for p in pr]
        ax.plot(s, [p["mean_iou"] for p in pr], "o-", label="box IoU with the condition's objects")
        ax.plot(s, [p["success"] for p in pr], "s-", label="all objects placed (IoU ≥ 0.5, shape)")
        ax.plot(s, [p["shape_accuracy"] for p in pr], "^-", label="shape accuracy")
        ax.set_xlabel("training step (batch 32)")
        ax.set_ylabel("fidelity on 48 held-out conditions")
        ax2 = ax.twinx()
        ls = p1["loss"]
        ax2.plot([a for a, _ in ls], [b for _, b in ls], color="gray", alpha=0.5, label="loss (smoothed)")
        ax2.set_ylabel("loss", color="gray")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "controlnet_convergence.png", dpi=120)
    if p2:
        from PIL import ImageDraw
        cols = [("render", [Image.fromarray(r.image) for r in p2["_renders"]]),
                ("condition", [Image.fromarray((c.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for c in p2["_conds"]])]
        cols += [(k, p2["_examples"][k]) for k in ("no ControlNet", "scale 1", "guess mode", "empty prompt, scale 1")]
        im = Image.new("RGB", (len(cols) * 100, 6 * 68 + 16), "white")
        d = ImageDraw.Draw(im)
        for c, (name, ims) in enumerate(cols):
            d.text((c * 100 + 2, 2), name[:16], fill="black")
            for r in range(6):
                im.paste(ims[r], (c * 100, 16 + r * 68))
        im.save(out / "controlnet_examples.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs/controlnet-layout"))
    ap.add_argument("--controlnet", default=None, help="the ControlNet to evaluate (default: RUN/controlnet)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    p1 = part1(run) if (run / "logs" / "train.jsonl").is_file() else None
    p2 = None if args.skip_eval else part2(args.controlnet or str(run / "controlnet"), args.seeds, args.steps)
    img = ROOT / "docs" / "images"
    img.mkdir(parents=True, exist_ok=True)
    figures(p1, p2, img)
    record = {"command": "python experiments/controlnet_study.py " + " ".join(sys.argv[1:]),
              "convergence": p1, "evaluation": {k: v for k, v in (p2 or {}).items() if not k.startswith("_")}}
    (ROOT / "docs/records").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs/records/controlnet_study.json").write_text(json.dumps(record, indent=1))
    lines = [f"`{record['command']}`", ""]
    if p1:
        for key in ("mean_iou", "success", "shape_accuracy"):
            f = p1[f"fit_{key}"]
            lines.append(f"- {key}: logistic rise {f['a']:.3f} → {f['b']:.3f} centred at step {f['s_star']:.0f}, "
                         f"10–90 % width {f['rise_width']:.0f} steps (Δ/s* = {f['width_over_s_star']:.2f}; sudden if "
                         f"< 0.3), ΔBIC vs linear {f['delta_bic_vs_linear']:.1f}: **{f['verdict']}**")
        lines.append("")
    if p2:
        lines += ["| arm | box IoU ↑ | success ↑ | shape acc. ↑ | prompt pass ↑ | FID-world ↓ |", "|---|---|---|---|---|---|"]
        for k, r in p2["results"].items():
            fid = f"{r['fid_world']:.3f}" if "fid_world" in r else "–"
            lines.append(f"| {k} | {r['mean_iou']:.3f} | {r['success']:.3f} | {r['shape_accuracy']:.3f} | "
                         f"{r['prompt_pass']:.3f} | {fid} |")
    (ROOT / "docs/records/controlnet_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
