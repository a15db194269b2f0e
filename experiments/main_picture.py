"""The README's first picture: what the main command draws, with the evaluator's verdicts.

    python experiments/main_picture.py [--model default] [--out docs/images/main_command.png]

Generates exactly what `chorus generate "a red circle to the left of a blue square"` writes (seeds 0–3,
one image per call, DPM++ 2M at the model's recommended steps and guidance), scores each image against the prompt's spec with the
world evaluator (GenEval's rules: a red circle, a blue square, the circle left of the square) and saves
the four side by side, each captioned OK/NO with what the evaluator found. Prints a JSON record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle to the left of a blue square"
SPEC = {"prompt": PROMPT, "tag": "position", "split": "train", "exclude": [],
        "include": [{"class": "square", "count": 1, "color": "blue"},
                    {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}


def main(argv=None) -> int:
    import numpy as np
    import torch
    from chorus.pipeline import Pipeline
    from chorus.world.cli import _save_atomic, caption_grid
    from chorus.world.evaluator import Evaluator, score_images
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "main_command.png"))
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model)
    images = [pipe(PROMPT, num_inference_steps=pipe.default_steps, guidance_scale=pipe.default_guidance, sampler="dpmpp_2m", progress=False,
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0] for seed in range(args.n)]
    records = score_images(images, [SPEC] * args.n, Evaluator.load())
    captions = []
    for seed, rec in enumerate(records):
        found = ", ".join(f"{d['color']} {d['shape']}" for d in rec.get("detections", [])) or "nothing"
        captions.append(f"seed {seed}: {'OK' if rec['correct'] else 'NO'} ({found})")
    _save_atomic(caption_grid([np.asarray(im) for im in images], captions, cols=args.n), Path(args.out))
    print(json.dumps({"model": args.model, "prompt": PROMPT, "verdicts": [bool(r["correct"]) for r in records],
                      "found": captions}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
