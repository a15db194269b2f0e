"""The UNet trainer: learning ε_θ(x_t, t, c) (seminar: DDPM's loss, in the latent space of a frozen VAE).

One optimiser step, for a global batch of B examples split over ranks and micro-batches:

    z_0 = s · (E(x) − shift)                      latent of the image (posterior mean; cached per example)
    t ~ U{0, T−1},  ε ~ N(0, I) [+ offset · N(0, I) per channel]
    x_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε              forward process
    c = conditioner(prompt, sizes, crop) with each embedder dropped at its rate (→ its unconditional
        embedding: the empty prompt, or zeros; this is what classifier-free guidance subtracts later)
    L = w(t) · ‖target − UNet(x_t, t, c)‖²         target ε or v; w = min-SNR-γ weight or 1
    θ ← AdamW(θ, clip(∇L)),  θ_EMA ← β θ_EMA + (1 − β) θ

Every random draw of a step (t, ε, offsets, dropout) comes from a generator seeded by (seed, step) for
the whole global batch, and each rank uses the slice of its examples, so the run is a function of
the seed alone — the same for 1 or N processes, and the same after a resume.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from chorus.errors import ChorusError
from chorus.schedule import NoiseSchedule, diffusion_loss
from chorus.train import checkpoint as ckpt
from chorus.train import distributed as D
from chorus.train.conditioning import TrainingConditioner, text_storage_dtype
from chorus.train.config import UNetTrainConfig, load_config, save_config
from chorus.train.core import (NonFiniteLoss, RunLog, StepDraws, Trainer, apply_update, ema_decay_at,  # noqa: F401
                               ema_update, lr_at, make_optimizer, step_draws, timestep_range, training_noise)
from chorus.train.data import Stream, conditioner_inputs, open_source, pixels
from chorus.train.parts import (DEFAULT_SCHEDULE, absolute_paths, check_embedders,  # noqa: F401
                                complete_unet_config, prepare_parts)

# config fields that change the mathematics of a run: a resume must keep them
RESUME_FIXED = ("base", "vae", "text_encoder", "unet", "init_from_base", "prediction_type", "schedule", "data",
                "resolution", "data_seed", "world_crop", "native_min", "normalise_latents", "descriptive_captions", "timestep_interval",
                "embedders", "epoch_size", "min_snr_gamma", "offset_noise",
                "text_dropout", "micro_dropout", "batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps",
                "min_lr", "weight_decay", "adam_betas", "adam_eps", "grad_clip", "ema_decay", "mixed_precision", "seed")


# --- the two halves of a step (also what benchmarks/train_step.py times) ---------------------------

def backward_loss(model, schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  unet_kwargs: dict, cfg: UNetTrainConfig, autocast) -> torch.Tensor:
    """L = w(t)·‖target − model(√ᾱ z_0 + √(1−ᾱ) ε, t, c)‖² / grad_accum; backpropagates it, returns it detached."""
    x_t = schedule.forward_process(z0, t, noise)
    with autocast:
        pred = model(x_t, t, **unet_kwargs)
    loss = diffusion_loss(pred.float(), z0, noise, t, schedule, cfg.prediction_type, cfg.min_snr_gamma)
    loss = loss / cfg.grad_accum
    loss.backward()
    return loss.detach()


# --- the trainer -------------------------------------------------------------------------------------

class UNetTrainer(Trainer):
    """Trains a UNet on top of a frozen VAE and conditioner (the core's loop); `run()` returns the
    exported model folder."""

    part_name = "unet"
    resume_fixed = RESUME_FIXED

    def __init__(self, cfg: UNetTrainConfig, out_dir, progress: bool = True, resume: bool | str = False,
                 log=print):
        super().__init__(absolute_paths(cfg), out_dir, progress, resume, log)

    @property
    def trainable(self) -> torch.nn.Module:
        return self.unet

    def describe(self) -> str:
        return (f"UNet {self.unet.num_parameters() / 1e6:.2f}M parameters, latents "
                f"{'×'.join(map(str, self.latent_shape))}, timesteps [{', '.join(map(str, self.t_range))}), "
                f"{self.source.describe()}")

    def describe_record(self) -> dict:
        return {"data": self.source.describe(), "unet_parameters": self.unet.num_parameters(),
                "timesteps": list(self.t_range)}

    def periodic(self) -> None:
        cfg = self.cfg
        if cfg.sample_every and self.step % cfg.sample_every == 0 and self.d.is_main:
            self.sample_grid()
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.d.is_main:
            self.evaluate()

    def finish(self) -> Path:
        cfg = self.cfg
        if cfg.sample_prompts and not cfg.sample_every and self.d.is_main:
            self.sample_grid()
        final = self.out / "model"
        if self.d.is_main:
            ckpt.export_model(self.parts, self.ema if self.ema is not None else self.unet, final,
                              getattr(torch, cfg.export_dtype))
        return final

    # -- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, out = self.cfg, self.out
        self.d = d = D.setup()
        self.resume_from = None
        if self.resume:
            self.resume_from = ckpt.latest_checkpoint(out if self.resume is True else Path(self.resume))
            self._check_resume_config(ckpt.read_state(self.resume_from).get("config", {}))
        self.parts = out / "parts"
        if not self.resume and ckpt.checkpoints(out):
            raise ChorusError(f"{out} already holds checkpoints of a run; continue it with --resume, or give "
                              "another --out folder for a new run.")
        if d.is_main:
            fresh = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            if not (self.resume_from and (self.parts / "model_index.json").is_file()):
                try:
                    prepare_parts(cfg, self.parts)
                except ChorusError:
                    if fresh and not any(out.iterdir()):
                        out.rmdir()   # a refused run leaves nothing behind
                    raise
            save_config(cfg, out / "config.json")
        D.barrier(d)
        from chorus.pipeline import load_stage
        stage, vae = load_stage(self.parts)
        # frozen parts in fp32 (they may be stored in fp16); each is run once per example thanks to the caches
        self.stage, self.vae = stage, vae.to(d.device, torch.float32).requires_grad_(False).eval()
        self.schedule: NoiseSchedule = stage.schedule
        self.unet = stage.unet.to(d.device, torch.float32).train()
        for e in stage.conditioner.embedders:
            e.to(d.device, torch.float32)
        self.setup_trainable()
        self.model = D.wrap_ddp(self.train_module(), d)
        from chorus.devices import training_precision
        self.precision, why = training_precision(cfg.mixed_precision, d.device)
        if d.is_main:
            self.log(f"train: precision {why}")
        self.cond = TrainingConditioner(stage.conditioner, cfg, text_storage_dtype(self.precision, d.device), d.device)
        self.source = open_source(cfg, d.rank, d.world_size)
        self.stream = Stream(self.source, cfg, d.rank, d.world_size)
        self.stream.start_at(self.step)
        self.latent_cache: dict[int, torch.Tensor] = {}
        f = vae.downsampling_factor
        self.latent_shape = (self.unet.config.in_channels, cfg.resolution // f, cfg.resolution // f)
        self.t_range = timestep_range(self.schedule.num_train_timesteps, cfg.timestep_interval)
        if cfg.resolution % (f * 2 ** (len(self.unet.config.block_out_channels) - 1)):
            raise ChorusError(f"resolution {cfg.resolution} is not a multiple of the VAE factor {f} times the "
                              "UNet's downsampling.")
        self.logger = RunLog(out, d.is_main)

    def setup_trainable(self) -> None:
        """What is trained and how it resumes: the whole UNet with its EMA (a LoRA part overrides this)."""
        self.unet.requires_grad_(True)
        self.start_training(self.unet)

    def start_training(self, model: torch.nn.Module) -> None:
        """The EMA copy, AdamW and (on --resume) the checkpoint's weights, moments, RNG and step, for the
        module being trained."""
        cfg, d = self.cfg, self.d
        self.ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, model, self.ema, self.optimizer, d.rank)
            self.step = int(state["step"])
            if state.get("world_size", d.world_size) != d.world_size:
                self.log(f"note: resuming a run of {state['world_size']} processes with {d.world_size}: the "
                         "global batch (and so the result) is the same; RNG states of extra ranks start fresh")

    def train_module(self) -> torch.nn.Module:
        """The module a step calls as model(x_t, t, **kwargs) (and DDP wraps): the UNet itself here."""
        return self.unet

    def step_kwargs(self, examples, cond) -> dict:
        """The keyword arguments of that call for a micro-batch: the conditioning (a ControlNet adds its images)."""
        return cond.unet_kwargs()

    def adjust_draws(self, draws: StepDraws) -> StepDraws:
        """A part may change a step's draws (a ControlNet drops all text embedders of an example together)."""
        return draws

    # -- one step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, examples) -> torch.Tensor:
        """z_0 = s · (mean of q(z | x) − shift), from the cache when the example was seen before."""
        use_cache = self.cfg.cache_latents and self.stream.cacheable()
        todo = [e for e in examples if not (use_cache and e.key in self.latent_cache)]
        fresh = {}
        if todo:
            x = pixels([e.image for e in todo]).to(self.d.device)
            z = self.vae.encode(x).mode()
            vc = self.vae.config
            z = ((z - (getattr(vc, "shift_factor", None) or 0.0)) * vc.scaling_factor).float().cpu()
            for e, zi in zip(todo, z):
                fresh[e.key] = zi
                if use_cache:
                    self.latent_cache[e.key] = zi
        rows = [fresh[e.key] if e.key in fresh else self.latent_cache[e.key] for e in examples]
        return torch.stack(rows).to(self.d.device)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimiser step over the global batch; returns its loss, grad norm and lr."""
        cfg, d = self.cfg, self.d
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        draws = step_draws(cfg.seed, self.step, cfg.batch_size, self.latent_shape,
                           self.schedule.num_train_timesteps, self.cond.rates, cfg.timestep_interval)
        draws = self.adjust_draws(draws)
        total = torch.zeros((), device=d.device)
        for m in range(cfg.grad_accum):
            examples, sl = self.stream.micro_batch(self.step, m, self._cached)
            z0 = self.latents(examples)
            t = draws.t[sl].to(d.device)
            noise = training_noise(draws, sl, cfg.offset_noise).to(d.device)
            cond = self.cond(conditioner_inputs(examples), draws.keep[:, sl])
            with D.no_sync(self.model, m < cfg.grad_accum - 1):
                total += backward_loss(self.model, self.schedule, z0, t, noise, self.step_kwargs(examples, cond),
                                       cfg, self.autocast())
        loss = D.all_mean(total, d)
        bad = not torch.isfinite(loss).item()
        norm = None
        if not bad and cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), cfg.grad_clip)
            bad = not torch.isfinite(norm).item()
        if D.all_any(bad, d):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(self.step, loss.item(), None if norm is None else norm.item())
        apply_update(self.trainable, self.optimizer, self.ema, ema_decay_at(self.step, cfg.ema_decay))
        self.step += 1
        return {"loss": loss.item(), "grad_norm": None if norm is None else norm.item(), "lr": lr}

    def _cached(self, key) -> bool:
        return self.cfg.cache_latents and key in self.latent_cache

    # -- progress: sample grids and benchmark scores ----------------------------------------------------
    def pipeline(self):
        """A text-to-image pipeline over the current EMA weights, in memory."""
        from chorus.experts import Expert, ExpertEnsemble
        from chorus.pipeline import Pipeline, Stage
        stage = Stage(self.sampling_unet(), self.stage.conditioner, self.schedule, self.cfg.prediction_type)
        sched_cfg = json.loads((self.parts / "scheduler" / "scheduler_config.json").read_text())
        return Pipeline(self.vae, ExpertEnsemble([Expert("base", stage)]), sched_cfg, name=str(self.out))

    def sampling_unet(self):
        """The UNet to sample from: the EMA weights when EMA is on."""
        return self.ema if self.ema is not None else self.unet

    @torch.no_grad()
    def sample_grid(self) -> Path:
        cfg = self.cfg
        was_training = self.unet.training
        self.unet.eval()
        try:
            out = self.pipeline()(list(cfg.sample_prompts), num_inference_steps=cfg.sample_steps, guidance_scale=5.0,
                                  seed=0, num_images_per_prompt=2, progress=False)
        finally:
            self.unet.train(was_training)
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        grid = caption_grid(out.images, list(cfg.sample_prompts), per_prompt=2)
        from chorus.models.io import atomic_write
        atomic_write(path, lambda p: grid.save(p, format="PNG"))
        self.logger.write({"event": "samples", "step": self.step, "path": str(path)})
        return path

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The world benchmark on an evenly spread subset of its prompts (one image each)."""
        from chorus.world.benchmark import load_specs
        from chorus.world.evaluator import score_images
        from chorus.world.scoring import summarize
        specs = load_specs()
        n = min(self.cfg.eval_prompts, len(specs))
        subset = [specs[round(i * len(specs) / n)] for i in range(n)]
        pipe = self.pipeline()
        images = []
        for i in range(0, n, 16):
            chunk = subset[i:i + 16]
            images += pipe([s["prompt"] for s in chunk], num_inference_steps=self.cfg.sample_steps,
                           guidance_scale=5.0, seed=i, progress=False).images
        summary = summarize(score_images(images, subset))
        record = {"event": "eval", "step": self.step, "prompts": n, **_flat_scores(summary)}
        self.logger.write(record)
        return record


def _flat_scores(summary: dict) -> dict:
    """The scalars of a scoring.summarize() result: overall, per task, per split."""
    out = {"overall": summary["overall"], "n_images": summary["n_images"]}
    out.update({f"task/{k}": v for k, v in summary.get("tasks", {}).items()})
    out.update({f"split/{k}": v["overall"] for k, v in summary.get("splits", {}).items()})
    return out


def caption_grid(images, prompts: list[str], per_prompt: int = 1):
    """A grid with one row per prompt (its images side by side) and the prompt written beside it."""
    from PIL import Image, ImageDraw
    w, h = images[0].size
    label = 6 * max(len(p) for p in prompts) + 8   # PIL's default bitmap font: ~6 px per character
    grid = Image.new("RGB", (per_prompt * w + label, len(prompts) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        for c in range(per_prompt):
            grid.paste(images[r * per_prompt + c], (c * w, r * h))
        draw.text((per_prompt * w + 4, r * h + h // 2 - 5), prompt, fill="black")
    return grid


def train_unet(cfg: UNetTrainConfig | dict | str | Path, out_dir, progress: bool = True,
               resume: bool | str = False) -> Path:
    """Train a UNet (see UNetTrainConfig); returns the exported diffusers-format model folder."""
    if not isinstance(cfg, UNetTrainConfig):
        cfg = load_config(UNetTrainConfig, cfg)
    return UNetTrainer(cfg, out_dir, progress=progress, resume=resume).run()


__all__ = ["UNetTrainer", "train_unet", "backward_loss", "caption_grid"]
