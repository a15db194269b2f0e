"""The trainer core: the one loop every trainable part runs in (DESIGN.md, "the trainer core").

A run is *what is trained* × *the noise interval it sees* × *the conditioning inputs*. A part (the
UNet today; a ControlNet, an expert or a refiner reuse it) subclasses `Trainer` and supplies

    setup()        build the model, its frozen neighbours, data and optimiser; sets `trainable`, `ema`,
                   `optimizer`, `parts` (the model folder being trained) and `step` (resumed or 0)
    train_step()   one optimiser step → {"loss", "grad_norm", "lr"}
    describe()     one line for the log;  periodic()  samples / evaluations between steps
    finish()       export the final model folder (rank 0) → its path

and the core does the rest once: the loop, progress bar and logs (RunLog: logs/train.jsonl and
TensorBoard), atomic checkpoints every `save_every` steps with exact `--resume`, the stop on a
non-finite loss, DDP set-up and tear-down. Also here, shared by every part: the learning-rate
schedule, EMA, AdamW, and the random draws of a step — timesteps from the part's noise interval
`timestep_interval` (fractions of [0, T): all of it for a base model, a sub-interval for an expert
or the refiner), noise, offsets and per-embedder dropout, all seeded by (seed, step).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chorus.errors import ChorusError
from chorus.train import checkpoint as ckpt
from chorus.train import distributed as D
from chorus.train.config import to_dict
from chorus.train.data import mix_seed


# --- the learning-rate schedule ----------------------------------------------------------------------

def lr_at(step: int, cfg) -> float:
    """Linear warm-up to lr, then constant or cosine: lr_min + ½(lr − lr_min)(1 + cos(π·progress))."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def ema_decay_at(updates: int, decay: float) -> float:
    """β_n = min(β, n/(n + 1)): the plain mean of all weights so far until that mean's memory reaches the
    configured β (after 1/(1 − β) − 1 updates: 999 for 0.999), then β — so the EMA is never stuck at
    the init, and it does reach its decay (the earlier (1 + n)/(10 + n) was still 0.997 after 3000)."""
    return min(decay, updates / (updates + 1))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_EMA ← β θ_EMA + (1 − β) θ."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def apply_update(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: torch.nn.Module | None,
                 decay: float) -> None:
    """θ ← AdamW(θ, ∇); grads cleared; θ_EMA ← β θ_EMA + (1 − β) θ."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, unet, decay)


def make_optimizer(unet: torch.nn.Module, cfg) -> torch.optim.Optimizer:
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


def timestep_range(num_train_timesteps: int, interval: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:
    """The integer timesteps [lo, hi) of an interval given as fractions of the schedule (t = 0 is clean)."""
    lo = int(round(interval[0] * num_train_timesteps))
    hi = max(lo + 1, int(round(interval[1] * num_train_timesteps)))
    return lo, min(hi, num_train_timesteps)


def step_draws(seed: int, step: int, batch: int, latent_shape: tuple[int, int, int], num_train_timesteps: int,
               dropout: list[float], interval: tuple[float, float] = (0.0, 1.0)) -> StepDraws:
    g = torch.Generator().manual_seed(mix_seed(seed, step, 0x7EA1))
    lo, hi = timestep_range(num_train_timesteps, interval)
    t = torch.randint(lo, hi, (batch,), generator=g)
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


# --- the loop ------------------------------------------------------------------------------------------

class Trainer:
    """The loop, checkpoints, resume and logs of one training run; a part subclasses it (see the module)."""

    part_name = "model"
    component = "unet"         # the folder of a checkpoint that holds the trained model
    resume_fixed: tuple = ()   # config fields that change the mathematics of a run: a resume must keep them

    def __init__(self, cfg, out_dir, progress: bool = True, resume: bool | str = False, log=print):
        self.cfg, self.out, self.progress, self.resume, self.log = cfg, Path(out_dir), progress, resume, log
        self.d = D.Dist()

    # -- what a part provides --------------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.part_name}"

    def describe_record(self) -> dict:
        return {}

    def periodic(self) -> None:
        """Between steps (after any checkpoint): sample grids, evaluations."""

    def finish(self) -> Path:
        raise NotImplementedError

    # -- what the core does ----------------------------------------------------------------------------
    def _check_resume_config(self, saved: dict) -> None:
        now = to_dict(self.cfg)
        changed = [k for k in self.resume_fixed if k in saved and saved[k] != now.get(k)]
        if changed:
            raise ChorusError(f"--resume continues a run exactly, but these settings differ from the checkpoint's: "
                              f"{', '.join(changed)}. Resume with the same settings (its config is in "
                              f"{self.out / 'config.json'}), or start a new run in another --out folder.")

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
                           **self.describe_record()})
        if d.is_main:
            self.log(f"train: {self.describe()}, {d.world_size} process(es), steps {start} → {cfg.steps}")
        bar = progress_bar(cfg.steps, start, self.progress and d.is_main, f"train {self.part_name}")
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
                self.periodic()
        except NonFiniteLoss as e:
            last = ckpt.checkpoints(self.out)
            kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
            raise ChorusError(f"Training stopped at step {e.step}: the loss became {e.loss} (grad norm {e.norm}); "
                              f"{kept}, untouched. Lower the learning rate (lr={cfg.lr}), keep grad_clip on, or "
                              "check the data, then --resume.") from None
        finally:
            if bar is not None:
                bar.close()
        final = self.finish()
        if d.is_main:
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
                path = ckpt.save_checkpoint(self.out, self.step, self.parts, self.ema, self.trainable, self.optimizer,
                                            state, states, self.cfg.keep_last, self.component)
                self.logger.write({"event": "checkpoint", "step": self.step, "path": str(path)})
            except ChorusError as e:
                error = str(e)
        error = D.broadcast_object(error, d)
        if error:
            raise ChorusError(error)
        return path



class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float, norm: float | None):
        super().__init__(step, loss, norm)
        self.step, self.loss, self.norm = step, loss, norm



def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


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
