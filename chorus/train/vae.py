"""Training the VAE of latent diffusion (AutoencoderKL) on the Shapes world or an image folder.

The loss of Stable Diffusion's first stage, with each term optional beyond the first two:

    L = |x - D(z)|_1 (or squared)  +  w_kl KL(q(z|x) || N(0, I))  +  w_p |phi(x) - phi(D(z))|^2
        + w_d * (-d(D(z)))   [generator side of a hinge-loss patch discriminator d, from step N on]

with z ~ q(z|x) = N(mu, sigma^2) sampled by reparameterisation, phi the frozen feature maps of the
world evaluator (chorus/world/evaluator.py, a "perceptual" distance that knows shapes and colours)
and d a small PatchGAN trained with the hinge loss. After training, `scaling_factor` is set to
1/std of the latents of training images, so the diffusion model sees unit-variance latents.

Progress (`progress`): reconstruction PSNR on held-out world images whose seeds are disjoint
from the training seeds. A CPU-time budget (`cpu_budget_s`) ends a run fairly on a shared host:
the learning rate follows progress = max(step / steps, cpu_used / cpu_budget), so the cosine decay
finishes when the budget does.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chorus.errors import ChorusError
from chorus.models.io import atomic_write
from chorus.models.vae import VAE

SPLITS = ("train", "heldout_pairs", "heldout_words")


def small_vae_config(factor: int = 4, widths: tuple[int, ...] | None = None, groups: int = 16,
                     latent_channels: int = 4) -> dict:
    """An AutoencoderKL config of log2(factor) downsamplings for 64x64 world images (no mid attention)."""
    if factor not in (2, 4, 8, 16):
        raise ChorusError(f"The latent factor must be 2, 4, 8 or 16 (one level per halving); got {factor}.")
    levels = int(math.log2(factor)) + 1
    widths = tuple(widths or (16, 32, 64, 64, 64)[:levels])
    if len(widths) != levels:
        raise ChorusError(f"A factor-{factor} VAE has {levels} levels; got {len(widths)} widths {list(widths)}.")
    return {"block_out_channels": list(widths), "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "layers_per_block": 1, "norm_num_groups": groups,
            "latent_channels": latent_channels, "sample_size": 64, "mid_block_add_attention": False,
            "scaling_factor": 1.0}


@dataclass
class VAETrainConfig:
    """The recipe of `train_vae`; every field is a JSON value (see docs/training.md, "VAE")."""

    vae: dict = field(default_factory=small_vae_config)  # AutoencoderKL config.json fields (default: f4, 16-32-64)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    recon: str = "l2"  # "l2" (what PSNR measures) or "l1"
    kl_weight: float = 1e-6  # per pixel value, i.e. SD's summed KL / summed reconstruction
    perceptual_weight: float = 0.0  # > 0: LPIPS-style distance on the world evaluator's features
    evaluator: str | None = None  # evaluator weights folder for the perceptual term (None: shipped)
    disc_weight: float = 0.0  # > 0: hinge-loss patch discriminator
    disc_start: int = 1000  # the discriminator joins after this many steps
    disc_lr: float = 2e-4
    image_size: int = 64
    crop_size: int | None = None  # train on random crops of this side (fully convolutional); None: whole images
    data: str | None = None  # image folder / WebDataset shards; None: render the Shapes world on the fly
    data_seed: int = 0  # world data set seed of the training images
    heldout_seed: int = 7_777_777  # world seed of the held-out images (PSNR); must differ from data_seed
    heldout_images: int = 192  # a third from each split
    scale_images: int = 512  # training images whose latents set scaling_factor = 1 / std
    eval_every: int = 250
    save_every: int = 250  # 0: save only at the end
    log_every: int = 25
    cpu_budget_s: float | None = None  # stop after this much process CPU time (all threads)
    bf16: bool = False  # bf16 autocast; only pays on CPUs with native bf16 (AVX512-BF16/AMX)
    channels_last: bool = True  # NHWC memory format: ~20% faster convolutions on CPU
    save_dtype: str = "float32"  # "float16" for shipped weights
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves it

    def __post_init__(self):
        self.betas = tuple(self.betas)
        problems = []
        if self.recon not in ("l1", "l2"):
            problems.append(f"recon must be 'l1' or 'l2', not {self.recon!r}")
        if self.data is None and self.data_seed == self.heldout_seed:
            problems.append(f"heldout_seed ({self.heldout_seed}) must differ from data_seed so PSNR is measured "
                            "on images training never saw")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"save_dtype must be float32, float16 or bfloat16, not {self.save_dtype!r}")
        if self.crop_size is not None and not 0 < self.crop_size <= self.image_size:
            problems.append(f"crop_size ({self.crop_size}) must be in (0, image_size={self.image_size}]")
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be at least 1")
        if problems:
            raise ChorusError("Bad VAE training config: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, values: dict) -> "VAETrainConfig":
        """Build from JSON values; unknown fields raise an error that lists the valid ones."""
        from chorus.models.io import config_from_dict
        return config_from_dict(cls, values, "VAE training")


# --- data --------------------------------------------------------------------------------------
def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def world_images(seed: int, start: int, count: int, size: int, splits: tuple[str, ...] = ("train",)) -> torch.Tensor:
    """Images start..start+count-1 of the world data set `seed`, image i from splits[i % len(splits)]."""
    from chorus.world.render import make_sample
    return to_tensor([make_sample(seed, i, size, split=splits[i % len(splits)]).image
                      for i in range(start, start + count)])


def folder_images(path: str, size: int) -> Iterator[np.ndarray]:
    """Endless pass over an image folder / shards (corrupt files skipped by the loader)."""
    from chorus.world.formats import open_dataset
    data = open_dataset(path, size=size)
    while True:
        n = 0
        for item in data:
            n += 1
            yield item["image"]
        if n == 0:
            raise ChorusError(f"The data at {path} holds no readable images.")


def random_crops(x: torch.Tensor, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random size x size window per image (the whole image when size is None)."""
    if size is None or size >= x.shape[-1]:
        return x
    h, w = x.shape[-2:]
    tops = torch.randint(0, h - size + 1, (len(x),), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (len(x),), generator=generator).tolist()
    return torch.stack([xi[:, t:t + size, l:l + size] for xi, t, l in zip(x, tops, lefts)])


def training_batches(cfg: VAETrainConfig) -> Iterator[torch.Tensor]:
    """Batch `step` = images step*B .. step*B+B-1 of the data (world: rendered fresh), randomly cropped."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    source = folder_images(cfg.data, cfg.image_size) if cfg.data else None
    step = 0
    while True:
        if source is None:
            x = world_images(cfg.data_seed, step * cfg.batch_size, cfg.batch_size, cfg.image_size)
        else:
            x = to_tensor([next(source) for _ in range(cfg.batch_size)])
        yield random_crops(x, cfg.crop_size, gen)
        step += 1


# --- losses --------------------------------------------------------------------------------------
def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """mean |x - y| (l1) or mean (x - y)^2 (l2)."""
    d = (x.float() - y.float())
    return d.abs().mean() if kind == "l1" else d.square().mean()


def kl_loss(posterior, pixels_per_image: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dims, per pixel value of the image, batch mean."""
    return posterior.kl().float().mean() / pixels_per_image


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 (E relu(1 - d(x)) + E relu(1 + d(D(z))))."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: -E d(D(z))."""
    return -fake.mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image PSNR = 10 log10(1 / MSE) of images in [-1, 1] compared in [0, 1], reconstruction clamped."""
    a, b = (x.float() + 1) / 2, ((y.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


class PerceptualDistance(nn.Module):
    """LPIPS-style: sum over layers of mean_(c,h,w) (n(phi_l(x)) - n(phi_l(y)))^2, n = unit norm over channels."""

    def __init__(self, evaluator_folder: str | None = None):
        super().__init__()
        from chorus.world.evaluator import Evaluator
        self.net = Evaluator.load(evaluator_folder).model.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the feature extractor stays in eval mode (BatchNorm statistics)
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net.trunk((x.float() + 1) / 2)
        fy = self.net.trunk(((y.float() + 1) / 2).clamp(0, 1))
        unit = lambda f: f / (f.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731
        return sum((unit(a) - unit(b)).square().sum(1).mean() for a, b in zip(fx, fy))


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs to a map of real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(layers - 1):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods += [nn.Conv2d(ch, ch, 3, 1, 1), nn.GroupNorm(8, ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) -> logits (B, 1, H/2^layers, W/2^layers)."""
        return self.net(x)


# --- schedule, clock, log ------------------------------------------------------------------------
def lr_at(cfg: VAETrainConfig, step: int, progress: float, base: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from base to base*min_lr_ratio over progress in [0, 1]."""
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


class Clock:
    """Progress of a run: max(step / steps, CPU seconds used / budget)."""

    def __init__(self, steps: int, cpu_budget_s: float | None):
        self.steps, self.budget = steps, cpu_budget_s
        self.cpu0, self.wall0 = time.process_time(), time.time()

    @property
    def cpu_s(self) -> float:
        return time.process_time() - self.cpu0

    @property
    def wall_s(self) -> float:
        return time.time() - self.wall0

    def progress(self, step: int) -> float:
        p = step / self.steps
        return max(p, self.cpu_s / self.budget) if self.budget else p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


class JsonlLog:
    """Append one JSON object per line (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda p: Path(p).write_text(text, encoding="utf-8"))


# --- measurement ---------------------------------------------------------------------------------
@torch.no_grad()
def heldout_psnr(vae: VAE, images: torch.Tensor, splits: tuple[str, ...] = SPLITS, batch: int = 64) -> dict:
    """Mean reconstruction PSNR (dB, posterior mode) per split and overall; image i is from splits[i % 3]."""
    was = vae.training
    vae.eval()
    values = torch.cat([psnr(images[i:i + batch], vae(images[i:i + batch]))
                        for i in range(0, len(images), batch)])
    vae.train(was)
    out = {s: round(float(values[k::len(splits)].mean()), 2) for k, s in enumerate(splits)}
    out["all"] = round(float(values.mean()), 2)
    return out


@torch.no_grad()
def latent_std(vae: VAE, images: torch.Tensor, seed: int = 0, batch: int = 64) -> float:
    """std of z ~ q(z|x) over all latent elements of the images (unscaled)."""
    gen = torch.Generator().manual_seed(seed)
    zs = [vae.encode(images[i:i + batch]).sample(gen) for i in range(0, len(images), batch)]
    return float(torch.cat(zs).float().std())


def set_scaling_factor(vae: VAE, images: torch.Tensor) -> float:
    """scaling_factor = 1 / std(z) on training images, so scaled latents have unit variance."""
    was = vae.training
    vae.eval()
    factor = 1.0 / max(latent_std(vae, images), 1e-8)
    vae.train(was)
    vae.config.scaling_factor = round(factor, 6)
    return vae.config.scaling_factor


def scaling_images(cfg: VAETrainConfig) -> torch.Tensor:
    """Training images for the latent statistics (the first scale_images of the training data, uncropped)."""
    if cfg.data:
        source = folder_images(cfg.data, cfg.image_size)
        return to_tensor([next(source) for _ in range(cfg.scale_images)])
    return world_images(cfg.data_seed, 0, cfg.scale_images, cfg.image_size)


# --- training ------------------------------------------------------------------------------------
def _save(vae: VAE, out: Path, cfg: VAETrainConfig, scale_x: torch.Tensor) -> None:
    set_scaling_factor(vae, scale_x)
    vae.save_pretrained(out, dtype=getattr(torch, cfg.save_dtype))


def _generator_loss(cfg, vae, x, step, perceptual, disc) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The VAE's loss on a batch: reconstruction + KL (+ perceptual) (+ generator hinge)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        posterior = vae.encode(x)
        y = vae.decode(posterior.sample())
        rec = reconstruction_loss(x, y, cfg.recon)
        kl = kl_loss(posterior, x[0].numel())
        loss = rec + cfg.kl_weight * kl
        terms = {"rec": rec, "kl": kl}
        if perceptual is not None:
            terms["perc"] = perceptual(x, y)
            loss = loss + cfg.perceptual_weight * terms["perc"]
        if disc is not None and step >= cfg.disc_start:
            terms["g"] = hinge_g_loss(disc(y))
            loss = loss + cfg.disc_weight * terms["g"]
    return loss, terms, y


def train_vae(cfg: VAETrainConfig, out_dir, progress: bool = True) -> Path:
    """Train an AutoencoderKL; write it (config.json + safetensors) and its logs to out_dir; return out_dir."""
    from tqdm import tqdm
    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    vae = VAE.from_config(dict(cfg.vae)).train()
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    vae = vae.to(memory_format=layout)
    if cfg.crop_size is not None and cfg.crop_size % vae.downsampling_factor:
        raise ChorusError(f"crop_size {cfg.crop_size} must be a multiple of the VAE's factor {vae.downsampling_factor}.")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    perceptual = PerceptualDistance(cfg.evaluator) if cfg.perceptual_weight > 0 else None
    disc = PatchDiscriminator() if cfg.disc_weight > 0 else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    heldout = world_images(cfg.heldout_seed, 0, cfg.heldout_images, cfg.image_size, SPLITS)
    scale_x = scaling_images(cfg)
    write_json(out / "vae_train_config.json", asdict(cfg))
    log = JsonlLog(out / "vae_train_log.jsonl")
    clock, batches = Clock(cfg.steps, cfg.cpu_budget_s), training_batches(cfg)
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train VAE", dynamic_ncols=True)
    step, scores, seen = 0, {}, 0
    while step < cfg.steps and not clock.done(step):
        frac = clock.progress(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, frac, cfg.lr)
        x = next(batches).contiguous(memory_format=layout)
        loss, terms, y = _generator_loss(cfg, vae, x, step, perceptual, disc)
        if not torch.isfinite(loss):
            raise ChorusError(f"The VAE loss became {float(loss.detach())} at step {step}; training stopped. The last "
                              f"good weights (if any were saved) are in {out}. Lower lr (now {cfg.lr}) or the "
                              "loss weights and start again.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        if disc is not None and step >= cfg.disc_start:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                terms["d"] = hinge_d_loss(disc(x), disc(y.detach()))
            d_opt.zero_grad(set_to_none=True)
            terms["d"].backward()
            d_opt.step()
        step, seen = step + 1, seen + len(x)
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            row = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                   "lr": opt.param_groups[0]["lr"], "img_per_s": round(seen / max(clock.wall_s, 1e-9), 2),
                   "cpu_s": round(clock.cpu_s, 1), "wall_s": round(clock.wall_s, 1)}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=row["img_per_s"], psnr=scores.get("all", "-"))
        if step % cfg.eval_every == 0:
            scores = heldout_psnr(vae, heldout)
            log.write({"step": step, "psnr": scores, "cpu_s": round(clock.cpu_s, 1)})
        if cfg.save_every and step % cfg.save_every == 0:
            _save(vae, out, cfg, scale_x)
    bar.close()
    _save(vae, out, cfg, scale_x)
    scores = heldout_psnr(vae, heldout)
    report = {"steps": step, "images_seen": seen, "cpu_s": round(clock.cpu_s, 1), "wall_s": round(clock.wall_s, 1),
              "psnr_heldout": scores, "scaling_factor": vae.config.scaling_factor,
              "latent_shape": [vae.config.latent_channels, cfg.image_size // vae.downsampling_factor,
                               cfg.image_size // vae.downsampling_factor],
              "factor": vae.downsampling_factor, "parameters": vae.num_parameters()}
    log.write({"step": step, "final": report})
    log.close()
    write_json(out / "vae_train_report.json", report)
    return out
