"""eDiff-I's prompt switch on the shipped model: prompt A for the first fraction s of the steps, then prompt B —
does the text of the early, high-noise steps decide the image? (claims_protocols.md §6.4, the lean version).

    python experiments/prompt_switch.py [--pairs 16] [--seeds 2] [--threads 1]

Pairs (A, B) that differ in one attribute, drawn from the world's vocabulary with my own seed (never the
benchmark's prompts): colour ("a red star" / "a blue star"), shape ("a red star" / "a red heart"), count
("two red stars" / "three red stars") and layout ("a star to the left of a heart" / "… to the right of …").
The switch is the pipeline's own A1111 prompt editing, `a [red:blue:K] star` (A for steps 0…K), so for
k = round(s·n) steps of A the prompt is `[A:B:k−1]`; s = 0 is pure B, s = 1 pure A. A second arm drops
the text instead, `[A::k−1]` (A for the first s, then the empty prompt: "text only early"). Each pair and
seed shares one initial noise across all s (paired), with 20 DPM++ 2M steps at the model's guidance.

Per attribute and s: P(B's spec passes), P(A's spec passes) (the world evaluator), and the image's distance
from pure A relative to pure B's, d(s) = ‖x(s) − x_A‖ / ‖x_B − x_A‖ per pair and seed (1 at s = 0, 0 at
s = 1): how much of B is left. s₅₀ is where d falls to one half; the seminar's claim is that B stops
mattering once A has had the first ~40 % (d(0.4) small) and that a switch in the last ~7 % changes nothing.
Writes docs/records/prompt_switch.json / .md and docs/images/prompt_switch.png.
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
from chorus.world.captions import HELDOUT_PAIRS, TRAIN_COUNTS, TRAIN_NOUNS, TRAIN_RELATIONS, _pick_color  # noqa: E402
from chorus.world.evaluator import Evaluator  # noqa: E402
from chorus.world.scene import COLORS, SHAPES  # noqa: E402
from chorus.world.scoring import evaluate_spec  # noqa: E402

ATTRIBUTES = ("colour", "shape", "count", "layout")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def noun(shape: str, plural: bool = False) -> str:
    return TRAIN_NOUNS[shape][0][1 if plural else 0]


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def make_pair(rng: np.random.Generator, attribute: str) -> dict:
    """{template with one slot, word_a, word_b, spec_a, spec_b}."""
    s1, s2 = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    c1 = _pick_color(rng, s1, "train")
    if attribute == "colour":
        c2 = next(str(c) for c in rng.permutation(list(COLORS)) if c != c1 and (c, s1) not in HELDOUT_PAIRS)
        spec = lambda c: {"tag": "colors", "include": [{"class": s1, "count": 1, "color": c}], "exclude": []}  # noqa: E731
        return {"template": "{} " + noun(s1), "a": article(c1), "b": article(c2), "spec_a": spec(c1),
                "spec_b": spec(c2)}
    if attribute == "shape":
        spec = lambda s: {"tag": "colors", "include": [{"class": s, "count": 1, "color": c1}], "exclude": []}  # noqa: E731
        return {"template": article(c1) + " {}", "a": noun(s1), "b": noun(s2), "spec_a": spec(s1), "spec_b": spec(s2)}
    if attribute == "count":
        n1 = int(rng.integers(2, 4))
        n2 = n1 + 1 if rng.random() < 0.5 else max(2, n1 - 1) if n1 > 2 else 3
        spec = lambda n: {"tag": "counting", "include": [{"class": s1, "count": n, "color": c1}],  # noqa: E731
                          "exclude": [{"class": s1, "count": n + 1}]}
        return {"template": "{} " + f"{c1} {noun(s1, True)}", "a": TRAIN_COUNTS[n1][0], "b": TRAIN_COUNTS[n2][0],
                "spec_a": spec(n1), "spec_b": spec(n2)}
    rel = ("left of", "right of", "above", "below")[int(rng.integers(4))]
    spec = lambda r: {"tag": "position", "include": [{"class": s2, "count": 1},  # noqa: E731
                                                      {"class": s1, "count": 1, "position": [r, 0]}], "exclude": []}
    return {"template": f"{article(noun(s1))} {{}} {article(noun(s2))}", "a": TRAIN_RELATIONS[rel][0],
            "b": TRAIN_RELATIONS[OPPOSITE[rel]][0], "spec_a": spec(rel), "spec_b": spec(OPPOSITE[rel])}


def prompt_at(pair: dict, k: int, n: int, drop: bool) -> str:
    """A for k of n steps, then B (or, with drop, nothing: the empty prompt)."""
    a = pair["template"].format(pair["a"])
    if k >= n:
        return a
    if drop:
        return "" if k == 0 else f"[{a}::{k - 1}]"
    if k == 0:
        return pair["template"].format(pair["b"])
    return pair["template"].format(f"[{pair['a']}:{pair['b']}:{k - 1}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16, help="pairs per attribute")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fractions", type=float, nargs="+", default=[i / 10 for i in range(11)])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(ROOT / "docs/records/prompt_switch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(20261202)
    pairs = [dict(make_pair(rng, a), attribute=a) for a in ATTRIBUTES for _ in range(args.pairs)]
    pipe = Pipeline.from_pretrained(args.model)
    ev = Evaluator.load()
    n, guidance = args.steps, pipe.default_guidance
    ks = sorted({int(round(s * n)) for s in args.fractions})
    shape = (1, pipe.base.unet.config.in_channels, pipe.default_size // pipe.vae_scale_factor,
             pipe.default_size // pipe.vae_scale_factor)
    rows = []
    t0 = time.time()
    for arm in ("switch", "drop"):
        for pi, pair in enumerate(pairs):
            for seed in range(args.seeds):
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(7919 * pi + seed))
                prompts = [prompt_at(pair, k, n, arm == "drop") for k in ks]
                out = pipe(prompts, latents=noise.repeat(len(ks), 1, 1, 1), num_inference_steps=n,
                           guidance_scale=guidance, progress=False)
                arrays = [np.asarray(im, dtype=np.float32) / 255 for im in out.images]
                dets = ev.detect(out.images)
                pure_a, pure_b = arrays[-1], arrays[0]
                span = float(np.linalg.norm(pure_b - pure_a)) or float("nan")
                for k, p, x, d in zip(ks, prompts, arrays, dets):
                    rows.append({"arm": arm, "attribute": pair["attribute"], "pair": pi, "seed": seed, "k": k,
                                 "s": k / n, "prompt": p,
                                 "pass_a": bool(evaluate_spec(d, pair["spec_a"]).correct),
                                 "pass_b": bool(evaluate_spec(d, pair["spec_b"]).correct),
                                 "d": float(np.linalg.norm(x - pure_a)) / span})
        print(f"{arm}: {len(rows)} images so far, {time.time() - t0:.0f} s", flush=True)
    summary = summarize(rows, ks, n)
    record = {"command": "python experiments/prompt_switch.py " + " ".join(sys.argv[1:]), "model": args.model,
              "pairs_per_attribute": args.pairs, "seeds": args.seeds, "steps": n, "guidance": guidance,
              "sampler": "dpmpp_2m", "seconds": time.time() - t0, "summary": summary, "rows": rows,
              "pairs": pairs}
    Path(args.out).write_text(json.dumps(record, indent=1))
    write_table(record, Path(args.out).with_suffix(".md"))
    figure(summary, ROOT / "docs/images/prompt_switch.png")
    print(summary["verdict"])
    return 0


def s50(ss: list[float], ds: list[float]) -> float | None:
    """The first s where d falls to 0.5, linearly interpolated (d(0) = 1 by construction)."""
    for (s0, d0), (s1, d1) in zip(zip(ss, ds), zip(ss[1:], ds[1:])):
        if d0 > 0.5 >= d1:
            return s0 + (s1 - s0) * (d0 - 0.5) / (d0 - d1)
    return None


def summarize(rows: list[dict], ks: list[int], n: int) -> dict:
    out: dict = {"arms": {}}
    for arm in ("switch", "drop"):
        per = {}
        for attr in (*ATTRIBUTES, "all"):
            sel = [r for r in rows if r["arm"] == arm and (attr == "all" or r["attribute"] == attr)]
            curve = []
            for k in ks:
                at = [r for r in sel if r["k"] == k]
                seeds = sorted({r["seed"] for r in at})
                by_seed = lambda key: [np.mean([r[key] for r in at if r["seed"] == s]) for s in seeds]  # noqa: E731
                curve.append({"s": k / n, "pass_a": float(np.mean([r["pass_a"] for r in at])),
                              "pass_a_std": float(np.std(by_seed("pass_a"))),
                              "pass_b": float(np.mean([r["pass_b"] for r in at])),
                              "pass_b_std": float(np.std(by_seed("pass_b"))),
                              "d": float(np.nanmean([r["d"] for r in at])), "d_std": float(np.std(by_seed("d")))})
            per[attr] = {"curve": curve, "s50": s50([c["s"] for c in curve], [c["d"] for c in curve])}
        out["arms"][arm] = per
    sw = out["arms"]["switch"]["all"]["curve"]
    at = lambda s: min(sw, key=lambda c: abs(c["s"] - s))  # noqa: E731
    late, early = at(0.9), at(0.4)
    s50s = {a: out["arms"]["switch"][a]["s50"] for a in ATTRIBUTES}
    verdict_bits = [f"B's share of the image d = {early['d']:.2f} after a switch at s = 0.4 and {late['d']:.2f} at "
                    f"s = 0.9; s₅₀ " + ", ".join(f"{a} {v:.2f}" if v is not None else f"{a} –"
                                                 for a, v in s50s.items())]
    reproduced = early["d"] <= 0.25 and late["d"] <= 0.05
    mixed = early["d"] <= 0.5
    out["verdict"] = ("reproduced" if reproduced else "mixed" if mixed else "not reproduced") + \
        ": " + "; ".join(verdict_bits) + " (the claim: B stops mattering once A had the first ~40 %, and a late " \
        "switch changes nothing)"
    return out


def write_table(record: dict, path: Path) -> None:
    s = record["summary"]
    lines = [f"Prompt switch on `{record['model']}`: {record['pairs_per_attribute']} pairs per attribute × "
             f"{record['seeds']} seeds, {record['steps']} DPM++ 2M steps, guidance {record['guidance']} "
             f"(`{record['command']}`, {record['seconds'] / 60:.0f} min).", "",
             "Prompt A for the first s of the steps, then B. d: the image's distance from pure A relative to pure "
             "B's (1 = all B, 0 = all A); P(A), P(B): the evaluator's verdicts on A's and B's specs. Mean over pairs "
             "and seeds (± std over the seed means).", ""]
    for arm, title in (("switch", "A → B"), ("drop", "A → empty prompt (text only for the first s)")):
        lines += [f"**{title}**", "", "| s | " + " | ".join(f"{a}: d / P(A) / P(B)" for a in (*ATTRIBUTES, "all")) + " |",
                  "|---|" + "---|" * (len(ATTRIBUTES) + 1)]
        per = s["arms"][arm]
        for i, c in enumerate(per["all"]["curve"]):
            cells = []
            for a in (*ATTRIBUTES, "all"):
                x = per[a]["curve"][i]
                cells.append(f"{x['d']:.2f} / {x['pass_a']:.2f} / {x['pass_b']:.2f}")
            lines.append(f"| {c['s']:.2f} | " + " | ".join(cells) + " |")
        lines += ["", "s₅₀ (d = 0.5): " + ", ".join(
            f"{a} {per[a]['s50']:.2f}" if per[a]["s50"] is not None else f"{a} –" for a in (*ATTRIBUTES, "all")), ""]
    lines += [f"**Verdict:** {s['verdict']}", ""]
    path.write_text("\n".join(lines))


def figure(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for a in (*ATTRIBUTES, "all"):
        c = summary["arms"]["switch"][a]["curve"]
        style = dict(lw=2.5, color="black") if a == "all" else {}
        axes[0].plot([x["s"] for x in c], [x["d"] for x in c], "o-", label=a, **style)
        axes[1].plot([x["s"] for x in c], [x["pass_b"] for x in c], "o-", label=f"{a}", **style)
        cd = summary["arms"]["drop"][a]["curve"]
        axes[2].plot([x["s"] for x in cd], [x["pass_a"] for x in cd], "o-", label=a, **style)
    axes[0].set_title("A → B: share of B left in the image (d)")
    axes[1].set_title("A → B: P(B's spec passes)")
    axes[2].set_title("A → empty: P(A's spec passes)")
    for ax in axes:
        ax.axvline(0.4, color="gray", ls="--", lw=1)
        ax.set_xlabel("s (fraction of steps with prompt A)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
