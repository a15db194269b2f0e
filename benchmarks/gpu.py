"""The GPU check, one script for a session lent a CUDA machine: parity with diffusers on the device, and the
UNet-forward, training-step and generation benchmarks against diffusers, fp32 / fp16 / bf16. Nothing in CI
depends on it.

    python benchmarks/gpu.py --out $OUT/gpu.json                 # on the GPU machine (about 5 minutes on an H100)
    python benchmarks/gpu.py --device cpu --small --out /tmp/g.json   # the same code on a CPU, small shapes (a smoke run)

Parts (each timed alternately against diffusers, median of --repeats, with torch.cuda.synchronize()):
  1. parity: an SD 1.5-size UNet (random weights, 859.5 M parameters; --small: a tiny one) and an SD VAE decoder
     in diffusers and in Chorus with the same weights, on the device: max |Δ| in fp32 (TF32 off) and fp16;
  2. UNet forward: that UNet, batch 2 (guidance's two halves) × 4 × 64 × 64, 77 tokens, fp16 and fp32;
  3. training step: the default preset's UNet (batch 64) and the SD 1.5 UNet (batch 4, --small: tiny),
     benchmarks/train_step.py's two steppers (Chorus's backward_loss + fused AdamW + EMA; diffusers'
     train_text_to_image loop) under bf16 autocast and in fp32;
  4. generation: a plain SD folder (--model; default runs/stage2/weights/default, else the tiny test folder
     built here), 16 images × 20 DPM++ 2M steps, guidance 5, fp16 and fp32, images compared.
Writes every figure to --out (JSON) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from unet_forward import SD15  # noqa: E402
from unet_forward import build as unet_pair  # noqa: E402  (diffusers' UNet, seeded, and Chorus's with its weights)

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable, run alternately (order flipping each repeat) after one warm-up each."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def parity_and_forward(args, device) -> list[dict]:
    config = TINY if args.small else SD15
    side, tokens = (16, 8) if args.small else (64, 77)
    rows = []
    for dtype in ([torch.float32, torch.float16] if device.type == "cuda" else [torch.float32, torch.bfloat16]):
        ref, ours = (m.to(device, dtype) for m in unet_pair(config))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
        ctx = torch.randn(2, tokens, config["cross_attention_dim"], generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        with torch.inference_mode():
            a, b = ref(x, t, ctx, return_dict=False)[0].float(), ours(x, t, ctx).float()
            times = alternate({"diffusers": lambda: ref(x, t, ctx, return_dict=False),
                               "chorus": lambda: ours(x, t, ctx)}, args.repeats, device)
        rows.append({"part": "unet", "dtype": str(dtype).split(".")[-1], "params": sum(p.numel() for p in ours.parameters()),
                     "max_abs_diff": (a - b).abs().max().item(), "max_abs": a.abs().max().item(),
                     "diffusers_s": times["diffusers"], "chorus_s": times["chorus"],
                     "ratio": times["diffusers"] / times["chorus"]})
        del ref, ours
    from diffusers import AutoencoderKL

    from chorus.models.vae import VAE
    torch.manual_seed(0)
    vcfg = TINY_VAE if args.small else SD_VAE
    ref = AutoencoderKL(**vcfg).eval()
    ours = VAE.from_config(dict(ref.config)).eval()
    ours.load_weights(ref.state_dict())
    ref = ref.to(device)
    ours.to(device)
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.inference_mode():
        a, b = ref.decode(z).sample, ours.decode(z)
        b = getattr(b, "sample", b)
    rows.append({"part": "vae decode", "dtype": "float32", "max_abs_diff": (a - b).abs().max().item(),
                 "max_abs": a.abs().max().item()})
    return rows


def training(args, device) -> list[dict]:
    import train_step as T
    rows = []
    names = ["tiny"] if args.small else ["default", "sd15"]
    for name in names:
        if name == "sd15":
            T.CONFIGS["sd15"] = (SD15, 64, 768)
        fields, side, width = T.CONFIGS[name]
        batch = 4 if name == "sd15" else (8 if args.small else 64)
        for mode in ("fp32", "bf16"):
            ref, ours = T.build(name)
            ref, ours = ref.to(device), ours.to(device)
            g = torch.Generator().manual_seed(1)
            z0, noise = (torch.randn(batch, 4, side, side, generator=g).to(device) for _ in range(2))
            t = torch.randint(0, 1000, (batch,), generator=g).to(device)
            ctx = torch.randn(batch, 32 if name != "sd15" else 77, width, generator=g).to(device)
            steps = {"diffusers": T.diffusers_stepper(ref, mode), "chorus": T.chorus_stepper(ours, mode, fused=True)}
            times = alternate({k: (lambda f=f: f(z0, t, noise, ctx)) for k, f in steps.items()}, args.repeats, device)
            rows.append({"part": f"train step {name}", "dtype": mode, "batch": batch,
                         **{f"{k}_samples_per_s": batch / v for k, v in times.items()},
                         "ratio": times["diffusers"] / times["chorus"]})
            del ref, ours, steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def generation(args, device) -> list[dict]:
    import diffusers
    import numpy as np

    from chorus.pipeline import Pipeline
    folder = args.model
    if not folder or not Path(folder, "model_index.json").is_file():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny import make_sd_folder   # the tests' tiny SD folder
        folder = str(make_sd_folder(Path(args.work) / "chorus-gpu-sd-tiny"))
    texts = [f"a red circle and {i} blue squares" for i in range(4 if args.small else 16)]
    rows = []
    for dtype in ([torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]):
        ours = Pipeline.from_pretrained(folder).to(device=device, dtype=dtype)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                requires_safety_checker=False, torch_dtype=dtype).to(device)
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=20, guidance_scale=5.0)
        out = {}

        def run_chorus(ours=ours):
            out["chorus"] = ours(prompt=texts, generator=torch.Generator().manual_seed(0), progress=False, **kw).images

        def run_diffusers(ref=ref):
            with torch.no_grad():
                out["diffusers"] = ref(prompt=texts, generator=torch.Generator().manual_seed(0), **kw).images
        times = alternate({"diffusers": run_diffusers, "chorus": run_chorus}, args.repeats, device)
        a, b = (np.stack([np.asarray(im, dtype=np.int16) for im in out[k]]) for k in ("chorus", "diffusers"))
        rows.append({"part": f"generate {len(texts)} images", "dtype": str(dtype).split(".")[-1], "model": folder,
                     "diffusers_s": times["diffusers"], "chorus_s": times["chorus"],
                     "ratio": times["diffusers"] / times["chorus"], "pixel_max_abs_diff": int(np.abs(a - b).max()),
                     "pixel_mean_abs_diff": float(np.abs(a - b).mean())})
        del ours, ref
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run of the code, e.g. on a CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--model", default=str(HERE.parent / "runs/stage2/weights/default"))
    p.add_argument("--parts", nargs="+", default=["parity", "train", "generate"], choices=["parity", "train", "generate"])
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp"), help="where a tiny test model is built")
    p.add_argument("--out", default="gpu.json")
    args = p.parse_args(argv)
    from chorus.devices import resolve_device
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False      # parity in true fp32
        torch.backends.cudnn.allow_tf32 = False
    info = {"torch": torch.__version__, "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "rows": []}
    parts = {"parity": parity_and_forward, "train": training, "generate": generation}
    for name in args.parts:
        t0 = time.time()
        try:
            rows = parts[name](args, device)
        except Exception as e:  # one part failing must not lose the others' figures
            rows = [{"part": name, "error": f"{type(e).__name__}: {e}"}]
        info["rows"] += rows
        Path(args.out).write_text(json.dumps(info, indent=1))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    print(f"\n{info['name']}, torch {info['torch']}\n\n| part | dtype | diffusers | Chorus | ratio | max abs diff |\n"
          "|---|---|---|---|---|---|")
    for r in info["rows"]:
        if "error" in r:
            print(f"| {r['part']} | – | – | – | – | {r['error'][:80]} |")
            continue
        d = r.get("diffusers_s", r.get("diffusers_samples_per_s"))
        c = r.get("chorus_s", r.get("chorus_samples_per_s"))
        unit = " samples/s" if "chorus_samples_per_s" in r else " s"
        diff = r.get("max_abs_diff", r.get("pixel_max_abs_diff"))
        cells = ["" if d is None else f"{d:.4g}{unit}", "" if c is None else f"{c:.4g}{unit}",
                 f"{r['ratio']:.2f}×" if "ratio" in r else "", "" if diff is None else f"{diff:.3g}"]
        print(f"| {r['part']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
