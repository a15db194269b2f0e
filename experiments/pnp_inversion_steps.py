"""How many DDIM inversion steps Plug-and-Play needs on the world model (PnP issue #9 as a measurement).

    python experiments/pnp_inversion_steps.py [--images 16] [--steps 50 200 1000]

For renders of my own validation specs: invert with the empty prompt over N steps, then (a) plain DDIM
reconstruction from z_T with the empty prompt and no guidance (the inversion's own error), and (b) PnP with
full injection (τ_f = τ_A = 1) and the empty target prompt; PSNR against the render and box IoU of the
detected objects against the render's (chorus.world.fidelity). 50 sampling steps throughout.
Writes docs/records/pnp_inversion_steps.json.
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


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = load_specs(ROOT / "docs/records/default-grow/val_specs.jsonl")
    specs = [s for s in specs if s["tag"] in ("two_object", "color_attr", "position")][:args.images]
    renders = [render_spec(s, 1000 + i, size=64, with_instances=True) for i, s in enumerate(specs)]
    images = [Image.fromarray(r.image) for r in renders]
    refs = [Reference.of_sample(r) for r in renders]
    pipe = Pipeline.from_pretrained("default")
    ev = Evaluator.load()
    z0 = torch.cat([encode_mean(pipe, im) for im in images])
    out = {}
    for n in args.steps:
        t0 = time.time()
        inv = ddim_inversion(pipe, z0, n, progress=False)
        t_inv = time.time() - t0
        row = {"inversion_seconds": t_inv}
        for name, tau in (("plain DDIM reconstruction", 0.0), ("PnP full injection", 1.0)):
            res = edit(pipe, None, [""] * len(images), tau_f=tau, tau_attn=tau, inversion=inv, num_inference_steps=50,
                       guidance_scale=1.0, progress=False).images
            dets = ev.detect(res)
            row[name] = {"psnr": float(np.mean([psnr(a, b) for a, b in zip(res, images)])),
                         "iou": float(np.mean([match(r, d)["mean_iou"] for r, d in zip(refs, dets)]))}
        out[str(n)] = row
        print(n, json.dumps(row), flush=True)
    record = {"command": "python experiments/pnp_inversion_steps.py " + " ".join(sys.argv[1:]),
              "images": len(images), "results": out,
              "render_iou": float(np.mean([match(r, d)["mean_iou"] for r, d in zip(refs, ev.detect(images))]))}
    (ROOT / "docs/records/pnp_inversion_steps.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
