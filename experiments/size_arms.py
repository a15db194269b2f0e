"""SDXL's size-conditioning ablation in miniature: on a *finite* pool where small images are half the data, drop
them, keep them unconditioned (they are upscaled, blurry), or keep them with their original size as a
condition (SDXL §2.2, the CIN-512-only / CIN-nocond / CIN-size-cond table; claims_protocols.md).

    python experiments/size_arms.py [--steps 1000] [--threads 1]

The world draws each scene at a native size log-uniform in [32, 128] px and resamples it to 64 × 64 (no crop,
to isolate size), so half the pool is smaller than the 64-px output: the analogue of SDXL's images under 512.
Three UNets, each trained from scratch the same way (a 1.8 M-parameter UNet, the shipped VAE and world CLIP,
v-prediction, batch 32, the same steps and seed) on the same budget:
- drop:   only scenes drawn at ≥ 64 px (native_min 64), a pool half the size (1,500 of 3,000 scenes);
- nocond: all 3,000 scenes, no size condition;
- cond:   all 3,000 scenes with `original_size` as a micro-condition, sampled asking for 64 × 64.
Measured on my own validation prompts × 4 images (20 steps, guidance 5): FID-world and KID-world against sharp
renders of the same specs (drawn at 64 px) and the IS analogue (the evaluator's shape classifier), beside the
seminar's 43.84 / 39.76 / 36.53 (FID) and 110.64 / 211.50 / 215.34 (IS). Runs go to runs/size-arms/<arm>
(checkpoints: an interrupted run resumes). Writes docs/records/size_arms.json / .md.
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
from chorus.train import checkpoint as ckpt  # noqa: E402
from chorus.train.unet import train_unet  # noqa: E402
from chorus.world.benchmark import load_specs  # noqa: E402
from chorus.world.eval_cli import fid_against_renders  # noqa: E402
from chorus.world.evaluator import Evaluator  # noqa: E402

UNET = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
ARMS = {"drop": {"native_min": 64, "epoch_size": 1500, "embedders": ["text"]},
        "nocond": {"native_min": 32, "epoch_size": 3000, "embedders": ["text"]},
        "cond": {"native_min": 32, "epoch_size": 3000, "embedders": ["text", "original_size"]}}
SEMINAR = {"drop": (43.84, 110.64), "nocond": (39.76, 211.50), "cond": (36.53, 215.34)}


def config(arm: str, steps: int, seed: int) -> dict:
    return {"base": str(ROOT / "weights/default"), "unet": UNET, "prediction_type": "v_prediction", "world_crop": False,
            "steps": steps, "batch_size": 32, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 50, "ema_decay": 0.999,
            "save_every": 100, "keep_last": 2, "log_every": 10, "sample_prompts": [], "mixed_precision": "no",
            "seed": seed, "text_cache_mb": 2048, **ARMS[arm]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (each trains the 3 arms)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=None, help="only the first N validation prompts (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=str(ROOT / "runs/size-arms"))
    ap.add_argument("--out", default=str(ROOT / "docs/records/size_arms.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")
    specs = specs[:args.prompts]
    flat = [s for s in specs for _ in range(args.images_per_prompt)]
    ev = Evaluator.load()
    per_seed: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            run = Path(args.runs) / (arm if seed == 0 else f"seed{seed}/{arm}")
            if not (run / "model" / "model_index.json").is_file():
                again = run.is_dir() and bool(ckpt.checkpoints(run))
                train_unet(config(arm, args.steps, seed), run, progress=False, resume=again)
            pipe = Pipeline.from_pretrained(run / "model")
            kw = {"original_size": (64, 64)} if arm == "cond" else {}
            images = []
            for i in range(0, len(specs), 8):
                images += pipe([s["prompt"] for s in specs[i:i + 8]], num_images_per_prompt=args.images_per_prompt,
                               num_inference_steps=20, guidance_scale=5.0, seed=i, progress=False, **kw).images
            fid = fid_against_renders(ev, images, flat)
            log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
            loss = [r["loss_smooth"] for r in log if "loss_smooth" in r]
            per_seed[arm].append({"seed": seed, "fid_world": fid["fid"], "kid_world": fid["kid"], "is": fid["is"],
                                  "is_renders": fid["is_real"], "fid_floor": fid["fid_floor"],
                                  "fid_blur": fid["fid_blur"], "final_loss": loss[-1] if loss else None})
            print(f"seed {seed} {arm}: {per_seed[arm][-1]} ({time.time() - t0:.0f} s)", flush=True)
    results = {}
    for arm, rows in per_seed.items():
        results[arm] = {k: float(np.mean([r[k] for r in rows])) for k in ("fid_world", "kid_world", "is", "is_renders",
                                                                         "fid_floor", "fid_blur")}
        results[arm].update(fid_world_std=float(np.std([r["fid_world"] for r in rows])),
                            is_std=float(np.std([r["is"] for r in rows])), per_seed=rows)
    f = {a: results[a]["fid_world"] for a in ARMS}
    order_ok = f["cond"] < f["nocond"] < f["drop"]
    cond_best = f["cond"] < min(f["drop"], f["nocond"])
    verdict = (f"{'reproduced' if order_ok else 'mixed' if cond_best else 'not reproduced'}: FID-world drop "
               f"{f['drop']:.3f} / nocond {f['nocond']:.3f} / cond {f['cond']:.3f} (the seminar: 43.84 / 39.76 / 36.53, "
               f"size-conditioning best, dropping worst); IS " + " / ".join(f"{results[a]['is']:.2f}" for a in ARMS) +
               f"; {len(args.seeds)} training seeds at {args.steps} steps")
    record = {"command": "python experiments/size_arms.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "seeds": args.seeds, "prompts": len(specs), "images_per_prompt": args.images_per_prompt,
              "arms": {a: config(a, args.steps, args.seeds[0]) for a in ARMS}, "results": results, "seminar": SEMINAR,
              "verdict": verdict, "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(record, indent=1))
    lines = [f"SDXL's size-conditioning arms in miniature: three 1.8 M-parameter UNets from scratch, {args.steps} steps × "
             f"32, seeds {', '.join(map(str, args.seeds))} (mean ± std); {len(specs)} validation prompts × {args.images_per_prompt} images (`{record['command']}`, "
             f"{record['seconds'] / 60:.0f} min). FID/KID against sharp renders of the same specs (real-vs-real floor "
             f"{results['cond']['fid_floor']:.3f}; renders blurred at σ 1: {results['cond']['fid_blur']:.3f}).", "",
             "| arm | FID-world ↓ | KID-world ↓ | IS analogue ↑ (renders " f"{results['cond']['is_renders']:.2f}) | the seminar: "
             "FID-5k / IS-5k |", "|---|---|---|---|---|"]
    for a in ARMS:
        r = results[a]
        lines.append(f"| {a} | {r['fid_world']:.3f} ± {r['fid_world_std']:.3f} | {r['kid_world']:.4f} | {r['is']:.2f} ± "
                     f"{r['is_std']:.2f} | {SEMINAR[a][0]} / "
                     f"{SEMINAR[a][1]} |")
    lines += ["", f"**Verdict:** {verdict}", ""]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
