"""eDiff-I's ensemble of text encoders on the shipped model: the world CLIP alone, the pretrained MiniLM alone (the
role T5 plays in eDiff-I), and both (claims_protocols.md §6.3, the inference arms).

    python experiments/encoder_ensemble.py [--images-per-prompt 1] [--threads 1]

The shipped model was trained with each encoder dropped independently (20 % each, eDiff-I's per-embedder
dropout), so one model can be sampled with either encoder alone: the dropped encoder gives its unconditional
embedding in both branches of guidance (`Conditioner.dropped`). This is the dropout-inference version of the
claim, not separately trained single-encoder models (that is issue 8's ablation). Per arm: the world benchmark
(553 prompts × k images, 20 steps, the model's guidance), per task and per split (held-out words: paraphrases no
training caption used, where a pretrained encoder should help; held-out colour–shape pairs), and FID-world.
The long-caption suite of the protocol is not run: the shipped conditioner truncates both encoders to 32
tokens, so a long caption cannot separate them.
Writes docs/records/encoder_ensemble.json / .md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chorus.pipeline import Pipeline  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.eval_cli import fid_against_renders, generate_images  # noqa: E402
from chorus.world.evaluator import Evaluator, score_images  # noqa: E402
from chorus.world.scoring import overall_standard_error, summarize  # noqa: E402

ARMS = {"both": [], "CLIP only (MiniLM dropped)": ["minilm"], "MiniLM only (CLIP dropped)": ["text_encoder"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None, help="only the first N benchmark prompts (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/records/encoder_ensemble.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    specs = load_specs()[:args.limit]
    pipe = Pipeline.from_pretrained("default")
    ev = Evaluator.load()
    k = args.images_per_prompt
    results = {}
    for arm, drop in ARMS.items():
        ctx = pipe.base.conditioner.dropped(drop) if drop else contextlib.nullcontext()
        with ctx:
            images = generate_images(pipe, specs, k, args.steps, None, 0, progress=False)
        flat = [s for s in specs for _ in range(k)]
        records = score_images(images, flat, ev)
        summary = summarize(records)
        fid = fid_against_renders(ev, images, flat)
        results[arm] = {"overall": summary["overall"], "tasks": summary["tasks"],
                        "splits": {n: {"overall": v["overall"], "tasks": v["tasks"], "n_images": v["n_images"]}
                                   for n, v in summary["splits"].items()},
                        "fid_world": fid["fid"], "fid_floor": fid["fid_floor"], "n_images": len(images),
                        "correct": [bool(r["correct"]) for r in records]}
        print(f"{arm}: overall {summary['overall']:.3f}, held-out words "
              f"{summary['splits'].get('heldout_words', {}).get('overall', float('nan')):.3f}, FID {fid['fid']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    both, clip, lm = (results[a] for a in ARMS)
    # paired bootstrap over prompts of overall (mean of task accuracies) differences
    se = {a: overall_standard_error(results[a]["correct"], [s["tag"] for s in specs for _ in range(k)]) for a in ARMS}
    words = lambda r: r["splits"].get("heldout_words", {}).get("overall", float("nan"))  # noqa: E731
    best_single = max(clip["overall"], lm["overall"])
    holds = both["overall"] >= best_single - 2 * se["both"]
    lm_words = words(lm) > words(clip)
    verdict = (f"{'reproduced' if holds and lm_words else 'mixed' if holds or lm_words else 'not reproduced'}: "
               f"overall both {both['overall']:.3f} (± {se['both']:.3f}) vs CLIP only {clip['overall']:.3f} vs MiniLM only "
               f"{lm['overall']:.3f}; held-out words both {words(both):.3f}, CLIP only {words(clip):.3f}, MiniLM only "
               f"{words(lm):.3f} (the claim: each encoder alone loses something, the language model more so on "
               "unseen words; here by dropout-inference on one model)")
    record = {"command": "python experiments/encoder_ensemble.py " + " ".join(sys.argv[1:]), "prompts": len(specs),
              "images_per_prompt": k, "steps": args.steps, "guidance": pipe.default_guidance,
              "results": {a: {kk: v for kk, v in r.items() if kk != "correct"} for a, r in results.items()},
              "bootstrap_se_overall": se, "verdict": verdict, "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(record, indent=1))
    tags = list(both["tasks"])
    lines = [f"Text-encoder ensemble by dropout-inference on the shipped model: the world benchmark, {len(specs)} prompts "
             f"× {k}, {args.steps} steps, guidance {pipe.default_guidance} (`{record['command']}`, "
             f"{record['seconds'] / 60:.0f} min). ± : bootstrap standard error over prompts.", "",
             "| arm | " + " | ".join(tags) + " | overall | held-out words | held-out pairs | FID-world |",
             "|---|" + "---|" * (len(tags) + 4)]
    for a, r in results.items():
        pairs = r["splits"].get("heldout_pairs", {}).get("overall", float("nan"))
        lines.append(f"| {a} | " + " | ".join(f"{r['tasks'][t]:.3f}" for t in tags) +
                     f" | {r['overall']:.3f} ± {se[a]:.3f} | {words(r):.3f} | {pairs:.3f} | {r['fid_world']:.3f} |")
    lines += ["", f"**Verdict:** {verdict}", ""]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
