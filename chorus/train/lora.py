"""LoRA training: the UNet trainer with the base frozen and low-rank updates on its attention projections.

    chorus train --part lora --base default --rank 4 --steps 500 --out runs/lora

The UNet part (chorus.train.unet) runs as it is — the same loss, data, conditioning dropout, seeded
draws, logs, checkpoints and exact --resume — on the base UNet with a `LoRAWeight` parametrization
on each target weight (default to_q, to_k, to_v, to_out.0 of every attention, as diffusers' LoRA
script), so the trained parameters are only the up/down matrices:

    W = W₀ + (α/r) · up · down      up starts at 0 (step 0 is exactly the base), down Kaiming-uniform

Outputs:
    OUT/lora.safetensors             kohya format (lora_unet_….lora_down/lora_up.weight, .alpha; LDM names for
                                     SDXL-style UNets), which Chorus (`--lora`, `<lora:…>`), A1111, ComfyUI
                                     and diffusers' load_lora_weights read
    OUT/checkpoints/step-N/          the base with the LoRA merged (unet/: a model folder `chorus generate`
                                     loads), lora.safetensors, and trainer/ (unet.safetensors holds the LoRA
                                     parameters, with the optimiser and RNG states for --resume)

No EMA (ema_decay must be 0): the LoRA is small and trained briefly, as in diffusers' and kohya's scripts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from chorus.errors import ChorusError
from chorus.formats.lora import DEFAULT_TARGETS, inject_lora, kohya_metadata, merged_state_dict, save_lora
from chorus.train import checkpoint as ckpt
from chorus.train.config import UNetTrainConfig, load_config
from chorus.train.core import make_optimizer
from chorus.train.parts import adopt_base
from chorus.train.unet import RESUME_FIXED, UNetTrainer


@dataclass
class LoRATrainConfig(UNetTrainConfig):
    """UNetTrainConfig on a frozen `base`, plus the LoRA's rank, α and target layers."""

    init_from_base: bool = True
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-4                   # LoRA takes ~10× the fine-tuning rate (diffusers' README)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    ema_decay: float = 0.0
    save_every: int = 100
    rank: int = 4
    alpha: float | None = None         # None: α = rank (scale 1, diffusers' default); kohya's default is 1
    targets: tuple = DEFAULT_TARGETS   # module-name endings (to_q, to_k, to_v, to_out.0; also proj_in, ff.net.2, …)

    def __post_init__(self):
        super().__post_init__()
        self.targets = tuple(self.targets)
        if not self.base:
            raise ChorusError("LoRA training needs a base model: --base FOLDER (or --base default, the shipped model).")
        if not self.init_from_base or self.unet:
            raise ChorusError("LoRA training adapts the base's own UNet: init_from_base must stay true and `unet` "
                              "empty.")
        if int(self.rank) < 1:
            raise ChorusError(f"rank must be at least 1, got {self.rank}.")
        if self.alpha is not None and float(self.alpha) <= 0:
            raise ChorusError(f"alpha must be positive (or null for alpha = rank), got {self.alpha}.")
        if self.ema_decay:
            raise ChorusError("LoRA training keeps no EMA: set ema_decay to 0.")
        if not self.targets:
            raise ChorusError("targets must name at least one kind of layer (e.g. to_q, to_k, to_v, to_out.0).")
        adopt_base(self)   # the base's own conditioner and prediction type (ε or v)


class _MergedUNet:
    """What a checkpoint's unet/ holds: the base with the LoRA merged — a model folder that loads as is."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self):
        return merged_state_dict(self.unet)

    def config_dict(self):
        return self.unet.config_dict()


class LoRATrainer(UNetTrainer):
    """UNetTrainer whose trainable parameters are the LoRA layers of a frozen base UNet."""

    part_name = "lora"
    resume_fixed = RESUME_FIXED + ("rank", "alpha", "targets")

    @property
    def trainable(self) -> torch.nn.Module:
        return self.network

    def describe(self) -> str:
        return (f"LoRA rank {self.cfg.rank} (α {self.network_alpha:g}) on {len(self.network.layers)} layers "
                f"({', '.join(self.cfg.targets)}): {self.network.num_parameters():,} trainable parameters over a "
                f"frozen UNet of {sum(p.numel() for p in self.base_parameters()):,}, {self.source.describe()}")

    def describe_record(self) -> dict:
        return {"data": self.source.describe(), "lora_parameters": self.network.num_parameters(),
                "lora_layers": len(self.network.layers), "rank": self.cfg.rank, "timesteps": list(self.t_range)}

    @property
    def network_alpha(self) -> float:
        return float(self.cfg.alpha or self.cfg.rank)

    def base_parameters(self):
        ids = {id(p) for p in self.network.parameters()}
        return (p for p in self.unet.parameters() if id(p) not in ids)

    # -- set-up: UNetTrainer.setup, with the UNet frozen and the LoRA injected before the optimiser --------
    def setup_trainable(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            self.network = inject_lora(self.unet, self.cfg.rank, self.cfg.alpha, self.cfg.targets)  # freezes the base
        self.ema = None
        self.optimizer = make_optimizer(self.network, self.cfg)
        self.step = 0
        if self.resume_from is not None:
            self.step = self._load_checkpoint(self.resume_from)

    def _load_checkpoint(self, path: Path) -> int:
        state = ckpt.read_state(path)
        self.network.load_weights(load_file(str(path / "trainer" / "unet.safetensors")))
        ckpt.load_optimizer(self.optimizer, load_file(str(path / "trainer" / "optimizer.safetensors")),
                            state["optimizer"])
        ckpt.restore_rng(load_file(str(path / "trainer" / "rng.safetensors")), self.d.rank)
        return int(state["step"])

    # -- checkpoints and the export ---------------------------------------------------------------------
    def save(self) -> Path | None:
        """The core's atomic checkpoint with unet/ = the merged UNet (in the slot of the EMA weights) and
        trainer/unet.safetensors = the LoRA parameters; then the checkpoint's own lora.safetensors."""
        self.ema = _MergedUNet(self.unet)
        try:
            path = super().save()
        finally:
            self.ema = None
        if path is not None and self.d.is_main:
            self.export(path / "lora.safetensors")
        return path

    def export(self, path: Path) -> Path:
        meta = kohya_metadata(self.network, base=self.cfg.base, ss_steps=self.step, ss_learning_rate=self.cfg.lr,
                              ss_resolution=self.cfg.resolution, ss_training_comment="chorus train --part lora")
        return save_lora(self.network.kohya_state_dict(getattr(torch, self.cfg.export_dtype)), path, meta)

    def finish(self) -> Path:
        cfg = self.cfg
        if cfg.sample_prompts and not cfg.sample_every and self.d.is_main:
            self.sample_grid()
        final = self.out / "lora.safetensors"
        if self.d.is_main:
            self.export(final)
        return final


def train_lora(cfg: LoRATrainConfig | dict | str | Path, out_dir, progress: bool = True,
               resume: bool | str = False) -> Path:
    """Train a LoRA on a frozen base (see LoRATrainConfig); returns OUT/lora.safetensors."""
    if not isinstance(cfg, LoRATrainConfig):
        cfg = load_config(LoRATrainConfig, cfg, "LoRA training")
    return LoRATrainer(cfg, out_dir, progress=progress, resume=resume).run()


# --- `chorus train --part lora` ------------------------------------------------------------------------

def config_from_args(args) -> tuple[LoRATrainConfig, Path]:
    """The LoRA config from --config / --base and the flags (or, on --resume, the checkpoint's own)."""
    from chorus.train.cli import adapter_config_from_args
    if args.preset:
        raise ChorusError("--part lora trains on a --base model; a --preset is a whole recipe. Give --base FOLDER "
                          "(or --base default) and, if you like, a --config file of LoRA fields.")
    return adapter_config_from_args(args, LoRATrainConfig, "LoRA training",
                                    {"data": args.data, "rank": getattr(args, "rank", None),
                                     "alpha": getattr(args, "alpha", None)},
                                    lambda cfg: f"runs/{Path(args.config).stem if args.config else 'lora'}")


def run_from_args(args) -> int:
    from chorus.train.cli import run_adapter
    return run_adapter(args, config_from_args, train_lora)


__all__ = ["LoRATrainConfig", "LoRATrainer", "train_lora", "config_from_args", "run_from_args"]
