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
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chorus.conditioning import Conditioner, Conditioning, TextEmbedder
from chorus.errors import ChorusError
from chorus.schedule import NoiseSchedule, diffusion_loss
from chorus.train import checkpoint as ckpt
from chorus.train import distributed as D
from chorus.train.config import UNetTrainConfig, load_config, save_config, to_dict
from chorus.train.data import Stream, conditioner_inputs, mix_seed, open_source, pixels

# the scheduler of a fresh model when no base folder gives one: Stable Diffusion's
DEFAULT_SCHEDULE = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
                    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
# config fields that change the mathematics of a run: a resume must keep them
RESUME_FIXED = ("base", "vae", "text_encoder", "unet", "init_from_base", "prediction_type", "schedule", "data",
                "resolution", "data_seed", "world_crop", "epoch_size", "min_snr_gamma", "offset_noise",
                "text_dropout", "micro_dropout", "batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps",
                "min_lr", "weight_decay", "adam_betas", "adam_eps", "grad_clip", "ema_decay", "mixed_precision", "seed")


# --- the learning-rate schedule ----------------------------------------------------------------------

def lr_at(step: int, cfg: UNetTrainConfig) -> float:
    """Linear warm-up to lr, then constant or cosine: lr_min + ½(lr − lr_min)(1 + cos(π·progress))."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def ema_decay_at(updates: int, decay: float) -> float:
    """β_n = min(β, (1 + n)/(10 + n)): a short memory early on, so the EMA is not stuck at the init."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_EMA ← β θ_EMA + (1 − β) θ."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


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


def apply_update(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: torch.nn.Module | None,
                 decay: float) -> None:
    """θ ← AdamW(θ, ∇); grads cleared; θ_EMA ← β θ_EMA + (1 − β) θ."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, unet, decay)


def make_optimizer(unet: torch.nn.Module, cfg: UNetTrainConfig) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all parameters) where torch has it for the device."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(unet.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(unet.parameters(), **kwargs)


# --- random draws of one step ------------------------------------------------------------------------

@dataclass
class StepDraws:
    """Everything random in one optimiser step, for the whole global batch (B items)."""

    t: torch.Tensor        # (B,) int64 timesteps
    noise: torch.Tensor    # (B, C, h, w)
    offset: torch.Tensor   # (B, C)
    keep: torch.Tensor     # (n_embedders, B) bool: embedder k conditions item i


def step_draws(seed: int, step: int, batch: int, latent_shape: tuple[int, int, int], num_train_timesteps: int,
               dropout: list[float]) -> StepDraws:
    g = torch.Generator().manual_seed(mix_seed(seed, step, 0x7EA1))
    t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
    noise = torch.randn((batch, *latent_shape), generator=g)
    offset = torch.randn((batch, latent_shape[0]), generator=g)
    u = torch.rand((len(dropout), batch), generator=g)
    keep = u >= torch.tensor(dropout, dtype=torch.float32)[:, None]
    return StepDraws(t, noise, offset, keep)


def training_noise(draws: StepDraws, items: slice, offset: float) -> torch.Tensor:
    """ε + offset · η with η ~ N(0, 1) per (item, channel), constant over pixels (offset noise)."""
    noise = draws.noise[items]
    if offset:
        noise = noise + offset * draws.offset[items][:, :, None, None]
    return noise


# --- conditioning with per-embedder dropout and a caption cache --------------------------------------

class TrainingConditioner:
    """The pipeline's conditioner, as training uses it: dropout per embedder, and cached text embeddings.

    A dropped text embedder gives its unconditional embedding (the empty prompt, or zeros for
    SDXL-style `zero_for_empty`), exactly the branch classifier-free guidance evaluates at sampling
    time; a dropped micro-conditioning embedder gives zeros (sgm's rule). Text embeddings are stored
    in `dtype` (bf16 under bf16 autocast, where the UNet's projections round them to bf16 anyway).
    """

    def __init__(self, conditioner: Conditioner, cfg: UNetTrainConfig, dtype: torch.dtype, device):
        self.conditioner, self.dtype, self.device = conditioner, dtype, device
        self.cache_text, self.budget = cfg.cache_text, cfg.text_cache_mb * 2 ** 20
        self.rates = [cfg.text_dropout if isinstance(e, TextEmbedder) else cfg.micro_dropout
                      for e in conditioner.embedders]
        self.cache: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in conditioner.embedders]
        self.uncond: list[dict[str, torch.Tensor] | None] = [None for _ in conditioner.embedders]
        self.bytes = 0
        for e in conditioner.embedders:
            e.requires_grad_(False).eval()

    @torch.no_grad()
    def _text(self, k: int, e: TextEmbedder, prompts: list[str]) -> dict[str, torch.Tensor]:
        cache = self.cache[k]
        todo = sorted({p for p in prompts if p not in cache}) if self.cache_text else list(dict.fromkeys(prompts))
        fresh = {}
        if todo:
            out = e(todo)
            e.notes = []
            for i, p in enumerate(todo):
                fresh[p] = {kind: v[i].to("cpu", self.dtype) for kind, v in out.items()}
                if self.cache_text and self.bytes < self.budget:
                    cache[p] = fresh[p]
                    self.bytes += sum(v.numel() * v.element_size() for v in fresh[p].values())
        rows = [cache.get(p) or fresh[p] for p in prompts]
        return {kind: torch.stack([r[kind] for r in rows]) for kind in rows[0]}

    @torch.no_grad()
    def _unconditional(self, k: int, e, n: int) -> dict[str, torch.Tensor]:
        if self.uncond[k] is None:
            out = e.unconditional([""], None)
            self.uncond[k] = {kind: v[0].to("cpu", self.dtype) for kind, v in out.items()}
        return {kind: v.expand(n, *v.shape) for kind, v in self.uncond[k].items()}

    def __call__(self, inputs: dict[str, list], keep: torch.Tensor) -> Conditioning:
        """keep: (n_embedders, b) bool for this micro-batch."""
        outputs = []
        for k, e in enumerate(self.conditioner.embedders):
            values = inputs[e.input_key]
            if isinstance(e, TextEmbedder):
                out = self._text(k, e, values)
                alt = self._unconditional(k, e, len(values)) if self.rates[k] > 0 else None
            else:
                out = {kind: v.float() for kind, v in e(values).items()}
                alt = {kind: torch.zeros_like(v) for kind, v in out.items()} if self.rates[k] > 0 else None
            if alt is not None:
                mask = keep[k]
                out = {kind: torch.where(mask.view(-1, *[1] * (v.dim() - 1)), v, alt[kind].to(v.dtype))
                       for kind, v in out.items()}
            outputs.append(out)
        cond = self.conditioner._route(outputs, device=self.device)
        return cond.map(lambda t: t.float())  # autocast, where it is on, rounds it back to bf16 exactly


def text_storage_dtype(cfg: UNetTrainConfig, device: torch.device) -> torch.dtype:
    """bf16 when the UNet really runs under bf16 autocast (GPU, or a CPU with bf16 kernels), else fp32."""
    if cfg.mixed_precision != "bf16":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    try:
        from chorus.models.layers import cpu_has_bf16_kernels
    except ImportError:
        return torch.float32
    return torch.bfloat16 if cpu_has_bf16_kernels() else torch.float32


# --- assembling the model folder ---------------------------------------------------------------------

def _component(cfg: UNetTrainConfig, name: str) -> Path | None:
    """Where a frozen component comes from: an explicit folder, else the base pipeline."""
    if name == "vae" and cfg.vae:
        p = Path(cfg.vae)
        return p / "vae" if (p / "vae" / "config.json").is_file() else p
    if name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") and cfg.text_encoder:
        p = Path(cfg.text_encoder) / name
        return p if p.is_dir() else None
    if cfg.base and (Path(cfg.base) / name).is_dir():
        return Path(cfg.base) / name
    return None


def _text_class(folder: Path) -> str:
    data = json.loads((folder / "config.json").read_text())
    return (data.get("architectures") or ["CLIPTextModel"])[0]


def _tokenizer_class(folder: Path) -> str:
    p = folder / "tokenizer_config.json"
    name = json.loads(p.read_text()).get("tokenizer_class", "CLIPTokenizer") if p.is_file() else "CLIPTokenizer"
    return name.replace("Fast", "")


def complete_unet_config(unet: dict, parts: Path, resolution: int) -> dict:
    """Fill the UNet fields its neighbours fix: latent channels and size (VAE), context width (text)."""
    vae = json.loads((parts / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    out = dict(unet)
    out.setdefault("in_channels", vae.get("latent_channels", 4))
    out.setdefault("out_channels", vae.get("latent_channels", 4))
    out.setdefault("sample_size", resolution // factor)
    widths, pooled = [], None
    for name in ("text_encoder", "text_encoder_2"):
        if (parts / name / "config.json").is_file():
            tc = json.loads((parts / name / "config.json").read_text())
            widths.append(tc["hidden_size"])
            pooled = tc.get("projection_dim", tc["hidden_size"]) if name == "text_encoder_2" else pooled
    out.setdefault("cross_attention_dim", sum(widths))
    if out.get("addition_embed_type") == "text_time":
        out.setdefault("addition_time_embed_dim", 256)
        n_ids = 6
        out.setdefault("projection_class_embeddings_input_dim",
                       (pooled or widths[-1]) + n_ids * out["addition_time_embed_dim"])
    return out


def prepare_parts(cfg: UNetTrainConfig, parts: Path) -> None:
    """OUT/parts: model_index.json, scheduler/, the frozen components and a freshly initialised unet/."""
    from chorus.models import UNet
    tmp = parts.parent / f".tmp-parts-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vae = _component(cfg, "vae")
    te = _component(cfg, "text_encoder")
    if vae is None or te is None or _component(cfg, "tokenizer") is None:
        raise ChorusError("The UNet trainer needs a frozen VAE and text encoder: give `base` (a pipeline folder "
                          "with vae/, text_encoder/, tokenizer/), or `vae` and `text_encoder` folders "
                          "(`chorus train --part vae|text` makes them).")
    ckpt.link_or_copy_tree(vae, tmp / "vae")
    index = {}
    if cfg.base and (Path(cfg.base) / "model_index.json").is_file():
        index = json.loads((Path(cfg.base) / "model_index.json").read_text())
    index.setdefault("_class_name", "StableDiffusionPipeline")
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        src = _component(cfg, name)
        if src is not None:
            ckpt.link_or_copy_tree(src, tmp / name)
            index[name] = ["transformers", _text_class(src) if name.startswith("text") else _tokenizer_class(src)]
        elif name in index:
            index[name] = [None, None]
    sched = dict(DEFAULT_SCHEDULE)
    if _component(cfg, "scheduler") is not None:
        sched = json.loads((_component(cfg, "scheduler") / "scheduler_config.json").read_text())
    sched.update(cfg.schedule)
    sched["prediction_type"] = cfg.prediction_type
    NoiseSchedule.from_config(sched)  # refuse what Chorus cannot sample before training on it
    (tmp / "scheduler").mkdir()
    ckpt.write_json(sched, tmp / "scheduler" / "scheduler_config.json")
    index["scheduler"] = ["diffusers", sched.get("_class_name", "EulerDiscreteScheduler")]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    for key, value in (("safety_checker", [None, None]), ("feature_extractor", [None, None]),
                       ("requires_safety_checker", False)):
        if index["_class_name"] == "StableDiffusionPipeline":
            index.setdefault(key, value)
    index["_diffusers_version"] = index.get("_diffusers_version", "0.42.1")
    if cfg.unet:
        unet_cfg = complete_unet_config(cfg.unet, tmp, cfg.resolution)
    elif _component(cfg, "unet") is not None:
        unet_cfg = json.loads((_component(cfg, "unet") / "config.json").read_text())
    else:
        raise ChorusError("No UNet to train: give a `unet` config (its fields in diffusers' names) or a `base` "
                          "folder with unet/.")
    if unet_cfg.get("addition_embed_type") == "text_time":
        index["_class_name"] = "StableDiffusionXLPipeline"
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            index.pop(key, None)
    if cfg.init_from_base:
        if _component(cfg, "unet") is None:
            raise ChorusError("init_from_base is set but the base folder has no unet/.")
        unet = UNet.from_pretrained(_component(cfg, "unet"), torch_dtype=torch.float32)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(mix_seed(cfg.seed, 0x1417))
            unet = UNet.from_config(unet_cfg)
    ckpt.write_unet(unet, tmp / "unet")
    ckpt.write_json(index, tmp / "model_index.json")
    if parts.exists():
        shutil.rmtree(parts)
    os.replace(tmp, parts)


# --- the trainer -------------------------------------------------------------------------------------

class UNetTrainer:
    """Trains a UNet on top of a frozen VAE and conditioner; `run()` returns the exported model folder."""

    def __init__(self, cfg: UNetTrainConfig, out_dir, progress: bool = True, resume: bool | str = False,
                 log=print):
        self.cfg, self.out, self.progress, self.resume, self.log = absolute_paths(cfg), Path(out_dir), progress, resume, log
        self.d = D.Dist()

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
            out.mkdir(parents=True, exist_ok=True)
            if not (self.resume_from and (self.parts / "model_index.json").is_file()):
                prepare_parts(cfg, self.parts)
            save_config(cfg, out / "config.json")
        D.barrier(d)
        from chorus.pipeline import load_stage
        stage, vae = load_stage(self.parts)
        # frozen parts in fp32 (they may be stored in fp16); each is run once per example thanks to the caches
        self.stage, self.vae = stage, vae.to(d.device, torch.float32).requires_grad_(False).eval()
        self.schedule: NoiseSchedule = stage.schedule
        self.unet = stage.unet.to(d.device, torch.float32).train().requires_grad_(True)
        for e in stage.conditioner.embedders:
            e.to(d.device, torch.float32)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
        self.optimizer = make_optimizer(self.unet, cfg)
        self.step = 0
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, self.unet, self.ema, self.optimizer, d.rank)
            self.step = int(state["step"])
            if state.get("world_size", d.world_size) != d.world_size:
                self.log(f"note: resuming a run of {state['world_size']} processes with {d.world_size}: the "
                         "global batch (and so the result) is the same; RNG states of extra ranks start fresh")
        self.model = D.wrap_ddp(self.unet, d)
        self.cond = TrainingConditioner(stage.conditioner, cfg, text_storage_dtype(cfg, d.device), d.device)
        self.source = open_source(cfg, d.rank, d.world_size)
        self.stream = Stream(self.source, cfg, d.rank, d.world_size)
        self.stream.start_at(self.step)
        self.latent_cache: dict[int, torch.Tensor] = {}
        f = vae.downsampling_factor
        self.latent_shape = (self.unet.config.in_channels, cfg.resolution // f, cfg.resolution // f)
        if cfg.resolution % (f * 2 ** (len(self.unet.config.block_out_channels) - 1)):
            raise ChorusError(f"resolution {cfg.resolution} is not a multiple of the VAE factor {f} times the "
                              "UNet's downsampling.")
        self.logger = RunLog(out, d.is_main)

    def _check_resume_config(self, saved: dict) -> None:
        now = to_dict(self.cfg)
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now.get(k)]
        if changed:
            raise ChorusError(f"--resume continues a run exactly, but these settings differ from the checkpoint's: "
                              f"{', '.join(changed)}. Resume with the same settings (its config is in "
                              f"{self.out / 'config.json'}), or start a new run in another --out folder.")

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
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimiser step over the global batch; returns its loss, grad norm and lr."""
        cfg, d = self.cfg, self.d
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        draws = step_draws(cfg.seed, self.step, cfg.batch_size, self.latent_shape,
                           self.schedule.num_train_timesteps, self.cond.rates)
        total = torch.zeros((), device=d.device)
        for m in range(cfg.grad_accum):
            examples, sl = self.stream.micro_batch(self.step, m, self._cached)
            z0 = self.latents(examples)
            t = draws.t[sl].to(d.device)
            noise = training_noise(draws, sl, cfg.offset_noise).to(d.device)
            cond = self.cond(conditioner_inputs(examples), draws.keep[:, sl])
            with D.no_sync(self.model, m < cfg.grad_accum - 1):
                total += backward_loss(self.model, self.schedule, z0, t, noise, cond.unet_kwargs(), cfg,
                                       self.autocast())
        loss = D.all_mean(total, d)
        bad = not torch.isfinite(loss).item()
        norm = None
        if not bad and cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
            bad = not torch.isfinite(norm).item()
        if D.all_any(bad, d):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(self.step, loss.item(), None if norm is None else norm.item())
        apply_update(self.unet, self.optimizer, self.ema, ema_decay_at(self.step, cfg.ema_decay))
        self.step += 1
        return {"loss": loss.item(), "grad_norm": None if norm is None else norm.item(), "lr": lr}

    def _cached(self, key) -> bool:
        return self.cfg.cache_latents and key in self.latent_cache

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to cfg.steps (from a checkpoint when resuming); save, sample, evaluate; export the model."""
        try:
            self.setup()
            return self._loop()
        finally:
            if hasattr(self, "logger"):
                self.logger.close()
            D.teardown()

    def _loop(self) -> Path:
        cfg, d = self.cfg, self.d
        start = self.step
        self.logger.write({"event": "resume" if start else "start", "step": start, "world_size": d.world_size,
                           "data": self.source.describe(), "unet_parameters": self.unet.num_parameters()})
        if d.is_main:
            self.log(f"train: UNet {self.unet.num_parameters() / 1e6:.2f}M parameters, latents "
                     f"{'×'.join(map(str, self.latent_shape))}, {self.source.describe()}, {d.world_size} "
                     f"process(es), steps {start} → {cfg.steps}")
        bar = _progress(cfg.steps, start, self.progress and d.is_main)
        t_last, n_last, smooth = time.perf_counter(), start, None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                stats = self.train_step()
                smooth = stats["loss"] if smooth is None else 0.95 * smooth + 0.05 * stats["loss"]
                rate = cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{smooth:.4f}", samples_s=f"{rate:.1f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    sps = (self.step - n_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    eta = (cfg.steps - self.step) * cfg.batch_size / max(sps, 1e-9)
                    self.logger.write({"step": self.step, "loss": stats["loss"], "loss_smooth": smooth,
                                       "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                                       "samples_per_s": sps, "eta_s": eta})
                    t_last, n_last = now, self.step
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and d.is_main:
                    self.sample_grid()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and d.is_main:
                    self.evaluate()
        except NonFiniteLoss as e:
            last = ckpt.checkpoints(self.out)
            kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
            raise ChorusError(f"Training stopped at step {e.step}: the loss became {e.loss} (grad norm {e.norm}); "
                              f"{kept}, untouched. Lower the learning rate (lr={cfg.lr}), keep grad_clip on, or "
                              "check the data, then --resume.") from None
        finally:
            if bar is not None:
                bar.close()
        if cfg.sample_prompts and not cfg.sample_every and d.is_main:
            self.sample_grid()
        final = self.out / "model"
        if d.is_main:
            dtype = getattr(torch, cfg.export_dtype)
            ckpt.export_model(self.parts, self.ema if self.ema is not None else self.unet, final, dtype)
            self.logger.write({"event": "done", "step": self.step, "model": str(final)})
            self.log(f"train: model written to {final}")
        D.barrier(d)
        return final

    def save(self) -> Path | None:
        d = self.d
        states = [ckpt.local_rng_state()]
        if d.enabled:
            gathered = [None] * d.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        path = None
        error = None
        if d.is_main:
            state = {"world_size": d.world_size, "samples_seen": self.step * self.cfg.batch_size,
                     "data_position": {"step": self.step, "per_rank": self.step * self.cfg.batch_size // d.world_size},
                     "config": to_dict(self.cfg)}
            try:
                path = ckpt.save_checkpoint(self.out, self.step, self.parts, self.ema, self.unet, self.optimizer,
                                            state, states, self.cfg.keep_last)
                self.logger.write({"event": "checkpoint", "step": self.step, "path": str(path)})
            except ChorusError as e:
                error = str(e)
        error = D.broadcast_object(error, d)
        if error:
            raise ChorusError(error)
        return path

    # -- progress: sample grids and benchmark scores ----------------------------------------------------
    def pipeline(self):
        """A text-to-image pipeline over the current EMA weights, in memory."""
        from chorus.experts import Expert, ExpertEnsemble
        from chorus.pipeline import Pipeline, Stage
        unet = self.ema if self.ema is not None else self.unet
        stage = Stage(unet, self.stage.conditioner, self.schedule, self.cfg.prediction_type)
        sched_cfg = json.loads((self.parts / "scheduler" / "scheduler_config.json").read_text())
        return Pipeline(self.vae, ExpertEnsemble([Expert("base", stage)]), sched_cfg, name=str(self.out))

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


def absolute_paths(cfg: UNetTrainConfig) -> UNetTrainConfig:
    """The config with its folders made absolute, so a checkpoint resumes from any working directory."""
    changes = {k: str(Path(v).resolve()) for k in ("base", "vae", "text_encoder", "data")
               if isinstance(v := getattr(cfg, k), str)}
    return dataclasses.replace(cfg, **changes)


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float, norm: float | None):
        super().__init__(step, loss, norm)
        self.step, self.loss, self.norm = step, loss, norm


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


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train unet", unit="step", dynamic_ncols=True, file=sys.stderr)


class RunLog:
    """logs/train.jsonl (and TensorBoard under logs/tb when it is installed), written by rank 0."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled, self.tb, self.file = enabled, None, None
        if not enabled:
            return
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.file = open(out / "logs" / "train.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "logs" / "tb"))
        except ImportError:
            self.tb = None
        self.t0 = time.time()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.t0, 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            prefix = record.get("event", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def train_unet(cfg: UNetTrainConfig | dict | str | Path, out_dir, progress: bool = True,
               resume: bool | str = False) -> Path:
    """Train a UNet (see UNetTrainConfig); returns the exported diffusers-format model folder."""
    if not isinstance(cfg, UNetTrainConfig):
        cfg = load_config(UNetTrainConfig, cfg)
    return UNetTrainer(cfg, out_dir, progress=progress, resume=resume).run()


__all__ = ["UNetTrainer", "train_unet", "lr_at", "ema_decay_at", "step_draws", "TrainingConditioner",
           "complete_unet_config", "prepare_parts", "caption_grid"]
