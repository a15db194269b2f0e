"""Plug-and-Play vs SDEdit on world edits: structure kept against edit success (claims_protocols.md §8.2).

    python experiments/pnp_study.py [--pairs 100] [--inversion-steps 200] [--steps 50]

Pairs: for each of my own validation specs with named objects (docs/records/default-grow/val_specs.jsonl,
never the benchmark's), a render of it (the guidance image) and a target prompt that changes the colour
(even pairs) or the shape (odd pairs) of one object; the oracle is the renderer's re-render of the target
spec with the same seed. Per system, on every pair:
    structure  mean box IoU and centre error (px) of the edited image's detected objects against the
               source scene's objects (chorus.world.fidelity: the renderer's truth vs the evaluator's reading)
    success    the evaluator's pass on the target spec (each object with its edited colour / shape)
Systems: PnP at (τ_f, τ_A) ∈ {(0.8, 0.5) paper, (0.5, 0.5) primitives, (1, 1), (0.8, 0) no attention,
(0, 0.5) no features, (0, 0) inversion only}; SDEdit at strengths 0.2 … 1.0; the oracle.
Writes docs/records/pnp_study.json, docs/plug-and-play-study.md (table) and docs/images/pnp_study.png (curve).
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

from chorus.controls.plug_and_play import ddim_inversion, edit, encode_mean  # noqa: E402
from chorus.pipeline import Pipeline  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.evaluator import Evaluator  # noqa: E402
from chorus.world.fidelity import Reference, match  # noqa: E402
from chorus.world.render import render_spec  # noqa: E402
from chorus.world.scene import COLORS, SHAPES  # noqa: E402
from chorus.world.scoring import evaluate_spec  # noqa: E402

PNP = [(0.8, 0.5), (0.5, 0.5), (1.0, 1.0), (0.8, 0.0), (0.0, 0.5), (0.0, 0.0)]
SDEDIT = [0.2, 0.4, 0.6, 0.75, 0.85, 1.0]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_pairs(n: int, size: int = 64) -> list[dict]:
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")
    specs = [s for s in specs if s["tag"] in ("single_object", "two_object", "colors", "color_attr", "position")]
    pairs, i = [], 0
    rng = np.random.default_rng(0x9E7)
    while len(pairs) < n:
        spec = specs[i % len(specs)]
        seed = 1000 + i
        src = render_spec(spec, seed, size=size, with_instances=True)
        objs = [(o.shape, o.color) for o in src.objects][:len(spec["include"])]
        k = i % len(objs)
        kind = "color" if i % 2 == 0 else "shape"
        edited = list(objs)
        if kind == "color":
            choices = [c for c in COLORS if c != objs[k][1] and c not in ("white",)]
            edited[k] = (objs[k][0], str(rng.choice(choices)))
        else:
            taken = {s for s, _ in objs}
            edited[k] = (str(rng.choice([s for s in SHAPES if s not in taken])), objs[k][1])
        words = [f"{article(c)} {c} {s}" for s, c in edited]
        prompt = words[0] if len(words) == 1 else " and ".join(words)
        target = {"prompt": prompt, "tag": "edit", "exclude": [], "split": "train",
                  "include": [{"class": s, "count": 1, "color": c} for s, c in edited]}
        pairs.append({"source": src, "target_spec": target, "kind": kind, "seed": seed, "spec": spec})
        i += 1
    return pairs


def score(images, pairs, ev) -> dict:
    dets = ev.detect(images)
    rows = []
    for d, p in zip(dets, pairs):
        m = match(Reference.of_sample(p["source"]), d)
        rows.append({"iou": m["mean_iou"], "centre": np.nanmean([o["centre"] if o["centre"] is not None else np.nan
                                                                 for o in m["objects"]]),
                     "success": bool(evaluate_spec(d, p["target_spec"]).correct), "kind": p["kind"]})
    out = {}
    for name, sel in (("all", rows), ("color", [r for r in rows if r["kind"] == "color"]),
                      ("shape", [r for r in rows if r["kind"] == "shape"])):
        out[name] = {"iou": float(np.mean([r["iou"] for r in sel])),
                     "centre_error": float(np.nanmean([r["centre"] for r in sel])),
                     "success": float(np.mean([r["success"] for r in sel])), "n": len(sel)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--inversion-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/records/pnp_study.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("default")
    ev = Evaluator.load()
    guidance = args.guidance or pipe.default_guidance
    pairs = make_pairs(args.pairs)
    sources = [Image.fromarray(p["source"].image) for p in pairs]
    prompts = [p["target_spec"]["prompt"] for p in pairs]
    chunks = [slice(i, i + args.batch) for i in range(0, len(pairs), args.batch)]
    t0 = time.time()
    inversions = []
    for sl in chunks:
        z0 = torch.cat([encode_mean(pipe, im) for im in sources[sl]])
        inversions.append(ddim_inversion(pipe, z0, args.inversion_steps, progress=False))
    print(f"inverted {len(pairs)} images with {args.inversion_steps} steps in {time.time() - t0:.0f} s", flush=True)
    results = {}

    def run(name, fn):
        t = time.time()
        images = []
        for sl, inv in zip(chunks, inversions):
            images += fn(sl, inv)
        results[name] = score(images, pairs, ev)
        results[name]["seconds"] = time.time() - t
        r = results[name]["all"]
        print(f"{name:>22}: IoU {r['iou']:.3f}  centre {r['centre_error']:.2f} px  success {r['success']:.3f}  "
              f"({time.time() - t:.0f} s)", flush=True)
        return images

    keep = {}
    for tf, ta in PNP:
        name = f"pnp tau_f={tf} tau_A={ta}"
        keep[name] = run(name, lambda sl, inv, tf=tf, ta=ta: edit(
            pipe, None, prompts[sl], tau_f=tf, tau_attn=ta, inversion=inv, num_inference_steps=args.steps,
            guidance_scale=guidance, progress=False).images)
    for s in SDEDIT:
        name = f"sdedit strength={s}"
        keep[name] = run(name, lambda sl, inv, s=s: pipe(
            prompts[sl], image=torch.cat([_pixels(im) for im in sources[sl]]), strength=s,
            num_inference_steps=args.steps, guidance_scale=guidance, seed=0, sampler="ddim", progress=False).images)
    oracle = [Image.fromarray(render_spec(p["target_spec"], p["seed"], size=64).image) for p in pairs]
    results["oracle re-render"] = score(oracle, pairs, ev)
    results["source (no edit)"] = score(sources, pairs, ev)
    record = {"pairs": len(pairs), "inversion_steps": args.inversion_steps, "steps": args.steps, "guidance": guidance,
              "model": "weights/default", "command": "python experiments/pnp_study.py " + " ".join(sys.argv[1:]),
              "results": results,
              "pair_prompts": prompts, "pair_kinds": [p["kind"] for p in pairs]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    figure(results, ROOT / "docs/images/pnp_study.png")
    grid(sources, keep, oracle, ROOT / "docs/images/pnp_examples.png", prompts)
    table(record, ROOT / "docs/records/pnp_study.md")
    return 0


def _pixels(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sd = [(k, v["all"]) for k, v in results.items() if k.startswith("sdedit")]
    ax.plot([v["success"] for _, v in sd], [v["iou"] for _, v in sd], "o-", color="tab:blue", label="SDEdit (strength)")
    for k, v in sd:
        ax.annotate(k.split("=")[1], (v["success"], v["iou"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for k, v in results.items():
        if k.startswith("pnp"):
            a = v["all"]
            ax.plot(a["success"], a["iou"], "s", color="tab:red")
            ax.annotate(k.replace("pnp ", "").replace("tau_f=", "τf ").replace(" tau_A=", ", τA "),
                        (a["success"], a["iou"]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    for k, m in (("oracle re-render", "*"), ("source (no edit)", "x")):
        a = results[k]["all"]
        ax.plot(a["success"], a["iou"], m, color="black", markersize=9, label=k)
    ax.plot([], [], "s", color="tab:red", label="Plug-and-Play (τ_f, τ_A)")
    ax.set_xlabel("edit success (evaluator pass on the target spec)")
    ax.set_ylabel("structure kept (box IoU with the source's objects)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def grid(sources, keep: dict, oracle, path: Path, prompts, n: int = 6) -> None:
    from PIL import ImageDraw
    cols = [("source", sources), ("PnP 0.8/0.5", keep["pnp tau_f=0.8 tau_A=0.5"]),
            ("PnP 0/0", keep["pnp tau_f=0.0 tau_A=0.0"]), ("SDEdit 0.6", keep["sdedit strength=0.6"]),
            ("SDEdit 0.85", keep["sdedit strength=0.85"]), ("oracle", oracle)]
    w = 64
    im = Image.new("RGB", (len(cols) * (w + 4) + 260, n * (w + 4) + 16), "white")
    d = ImageDraw.Draw(im)
    for c, (name, ims) in enumerate(cols):
        d.text((c * (w + 4) + 2, 2), name, fill="black")
        for r in range(n):
            im.paste(ims[r].resize((w, w)), (c * (w + 4), 16 + r * (w + 4)))
    for r in range(n):
        d.text((len(cols) * (w + 4) + 4, 16 + r * (w + 4) + 28), prompts[r][:42], fill="black")
    im.save(path)


def table(record: dict, path: Path) -> None:
    lines = [f"Plug-and-Play vs SDEdit, {record['pairs']} world edit pairs, {record['inversion_steps']} inversion "
             f"steps, {record['steps']} DDIM steps, guidance {record['guidance']} (`{record['command']}`)", "",
             "| system | IoU with source ↑ | centre error px ↓ | success ↑ | success (colour edits) | success (shape edits) |",
             "|---|---|---|---|---|---|"]
    for k, v in record["results"].items():
        a = v["all"]
        lines.append(f"| {k} | {a['iou']:.3f} | {a['centre_error']:.2f} | {a['success']:.3f} | "
                     f"{v['color']['success']:.3f} | {v['shape']['success']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
