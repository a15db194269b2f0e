"""Training-step speed: Chorus's UNet trainer step vs the same UNet in diffusers, samples/s.

    python benchmarks/train_step.py                        # the default preset's UNet, batch 64
    python benchmarks/train_step.py --config tiny --batch 16 --repeats 5
    python benchmarks/train_step.py --modes fp32 bf16      # bf16 = torch.autocast("cpu", bfloat16)

One step on each side, from the same latents, noise, timesteps and text context:
    Chorus     chorus.train.unet.backward_loss + clip_grad_norm_ + apply_update (AdamW as the trainer
               makes it, i.e. fused where torch has it, and the EMA)
    diffusers  UNet2DConditionModel with the same weights, the loop of diffusers' train_text_to_image.py:
               DDPMScheduler.add_noise, F.mse_loss, clip_grad_norm_, torch.optim.AdamW (its default
               implementation), EMAModel.step
Runs alternate between the two (order flipping each repeat) after a warm-up; the median is taken,
so load from other processes hits both alike. Prints samples/s and the ratio Chorus / diffusers,
and, as a control, Chorus's step with the same AdamW implementation as diffusers ("same optimizer").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from efficiency import count_flops, cpu_flags, peaks, rate  # noqa: E402

from chorus.train.config import DEFAULT_UNET, GROWN_UNET, TINY_UNET, UNetTrainConfig  # noqa: E402

# name: (UNet fields, latent side, context width); the presets' UNets on their VAE's latents
CONFIGS = {"default": (DEFAULT_UNET, 16, 128), "tiny": (TINY_UNET, 16, 128),
           "grown": (GROWN_UNET, 16, 128)}   # grown: the shipped model's and default-scratch's UNet (attention at 16×16)


def unet_config(name: str) -> dict:
    fields, side, width = CONFIGS[name]
    return dict(fields, in_channels=4, out_channels=4, sample_size=side, cross_attention_dim=width)


def build(name: str):
    from diffusers import UNet2DConditionModel

    from chorus.models import UNet
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**unet_config(name)).train()
    ours = UNet.from_config(unet_config(name))
    ours.load_weights(ref.state_dict())
    return ref, ours.train()


def precision(mode: str, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def chorus_stepper(unet, mode: str, fused: bool):
    from chorus.schedule import NoiseSchedule
    from chorus.train.unet import (
        apply_update,
        backward_loss,
        ema_decay_at,
        make_optimizer,
    )
    cfg = UNetTrainConfig(min_snr_gamma=None, lr=1e-4, weight_decay=1e-2, ema_decay=0.999)
    schedule = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    opt = make_optimizer(unet, cfg) if fused else torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    ema = copy.deepcopy(unet).requires_grad_(False)
    state = {"n": 0}

    def step(z0, t, noise, ctx):
        backward_loss(unet, schedule, z0, t, noise, {"encoder_hidden_states": ctx}, cfg, precision(mode, z0.device.type))
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        apply_update(unet, opt, ema, ema_decay_at(state["n"], cfg.ema_decay))
        state["n"] += 1
    return step


def diffusers_stepper(unet, mode: str):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    ema = EMAModel(unet.parameters(), decay=0.999)

    def step(z0, t, noise, ctx):
        x_t = sched.add_noise(z0, noise, t)
        with precision(mode, z0.device.type):
            pred = unet(x_t, t, ctx, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    return step


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench(name: str, mode: str, batch: int, tokens: int, repeats: int) -> dict:
    ref, ours = build(name)
    _, side, width = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(batch, 4, side, side, generator=g)
    noise = torch.randn(batch, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, width, generator=g)
    steppers = {"diffusers": diffusers_stepper(ref, mode), "chorus": chorus_stepper(ours, mode, fused=True),
                "chorus_same_adamw": chorus_stepper(copy.deepcopy(ours), mode, fused=False)}
    for fn in steppers.values():  # warm-up
        fn(z0, t, noise, ctx)
    times = {k: [] for k in steppers}
    for r in range(repeats):
        order = list(steppers.items())
        for who, fn in (order if r % 2 == 0 else order[::-1]):
            times[who].append(timed(fn, z0, t, noise, ctx))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    flops = count_flops(lambda: steppers["chorus"](z0, t, noise, ctx))   # forward + backward of one step
    return {"config": name, "mode": mode, "batch": batch, "params": params, "latent": f"4×{side}×{side}",
            "flops": flops, **{f"{k}_sps": batch / v for k, v in med.items()},
            **{f"{k}_gflops": rate(flops, v) for k, v in med.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["default"], choices=list(CONFIGS))
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32, help="context length (the world tokenizer: 32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from chorus.models.layers import cpu_has_bf16_kernels
    peak = peaks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 kernels: {cpu_has_bf16_kernels()}, "
          f"CPU flags: {cpu_flags()}, matmul peak " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()) +
          f", batch {args.batch}, {args.tokens} tokens, {args.repeats} repeats (median)")
    rows = []
    for name in args.config:
        for mode in args.modes:
            r = bench(name, mode, args.batch, args.tokens, args.repeats)
            rows.append(r)
            print(f"  {name} {mode}: chorus {r['chorus_sps']:.1f}  diffusers {r['diffusers_sps']:.1f} samples/s", flush=True)
    print("\n| UNet | params | latent | precision | diffusers samples/s | Chorus samples/s | ratio | Chorus, same AdamW | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['latent']} | {r['mode']} | {r['diffusers_sps']:.1f} | "
              f"{r['chorus_sps']:.1f} | {r['chorus_sps'] / r['diffusers_sps']:.2f}× | {r['chorus_same_adamw_sps']:.1f} | "
              f"{r['chorus_same_adamw_sps'] / r['diffusers_sps']:.2f}× |")
    print("\n| UNet | precision | GFLOP per step | diffusers GFLOP/s | Chorus GFLOP/s | Chorus / fp32 peak |"
          + (" Chorus / bf16 peak |" if "bf16" in peak else ""))
    print("|---|---|---|---|---|---|" + ("---|" if "bf16" in peak else ""))
    for r in rows:
        ours = r["chorus_gflops"]
        print(f"| {r['config']} | {r['mode']} | {r['flops'] / 1e9:.1f} | {r['diffusers_gflops']:.1f} | {ours:.1f} | "
              f"{ours / peak['fp32']:.0%} |" + (f" {ours / peak['bf16']:.0%} |" if "bf16" in peak else ""))


if __name__ == "__main__":
    main()
