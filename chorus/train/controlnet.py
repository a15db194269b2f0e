"""ControlNet training: the UNet trainer with the base frozen and a ControlNet made from it trained.

    chorus train --part controlnet --condition layout --base default --out runs/controlnet-layout

The UNet part (chorus.train.unet) runs as it is — the same loss, data, seeded draws, logs, checkpoints
and exact --resume — with one change of what is trained (ControlNet, Zhang et al. 2023):

    r = ControlNet(x_t, t, c, c_img)          a copy of the base UNet's encoder + zero convolutions
    L = w(t)·‖target − UNet_frozen(x_t, t, c; skips + r)‖²

The ControlNet starts from the base UNet's encoder weights with every zero convolution at 0, so step 0 is
exactly the base. The condition image (`canny`, `layout` or `boxes`) is rendered from the same world
scene as the training image (chorus.world.conditions). As the paper trains it, the prompt is replaced
by the empty prompt for `prompt_dropout` (50 %) of the examples — all text embedders of an example at
once; micro-conditioning is never dropped.

Sudden convergence is watched while training: every `probe_every` steps the EMA ControlNet draws the
`probe_items` held-out scenes (a world seed the training never sees, fixed noise, their true captions)
and the world evaluator's detections are matched to the scenes' objects (chorus.world.fidelity); the
fidelity goes to logs/train.jsonl as {"event": "probe", …} beside the loss.

Outputs: OUT/controlnet (a diffusers ControlNetModel folder: `chorus generate --controlnet OUT/controlnet`),
OUT/checkpoints/step-N/ (the base's parts, its unet/, controlnet/ = EMA weights, trainer/ for --resume).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chorus.errors import ChorusError
from chorus.train import checkpoint as ckpt
from chorus.train.config import UNetTrainConfig, load_config
from chorus.train.core import StepDraws
from chorus.train.parts import adopt_base
from chorus.train.unet import RESUME_FIXED, UNetTrainer

PROBE_SEED = 0xC0DE5   # the world seed of the held-out probe scenes (training uses data_seed / seed)


@dataclass
class ControlNetTrainConfig(UNetTrainConfig):
    """UNetTrainConfig on a frozen `base`, plus the condition and the ControlNet's own settings."""

    condition: str = "layout"           # canny | layout | boxes (chorus.world.conditions)
    init_from_base: bool = True
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4                    # SD's ControlNets use 1e-5; a 7 M model on a CPU budget takes 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    prompt_dropout: float = 0.5         # share of examples trained with the empty prompt (the paper: 50 %)
    epoch_size: int | None = None       # endless world (each condition image is rendered with its scene)
    hint_channels: tuple | None = None  # the condition encoder's widths; None: (16, 32, 96, 256) cut to the VAE factor
    save_every: int = 250
    sample_prompts: tuple = ()
    probe_every: int = 100              # 0: no probes
    probe_items: int = 48
    probe_steps: int = 20
    probe_guidance: float | None = None  # None: the base's recommended guidance (sampling_defaults.json, else 5)

    def __post_init__(self):
        super().__post_init__()
        from chorus.world.conditions import CONDITION_KINDS
        if self.condition not in CONDITION_KINDS:
            raise ChorusError(f"--condition must be one of {', '.join(CONDITION_KINDS)}, got {self.condition!r}.")
        if not self.base:
            raise ChorusError("ControlNet training needs a frozen base model: --base FOLDER (or --base default).")
        if not self.init_from_base or self.unet:
            raise ChorusError("A ControlNet steers the base's own UNet: init_from_base must stay true and `unet` "
                              "empty.")
        if self.data is not None:
            raise ChorusError("ControlNet training renders its conditions from the Shapes world: leave data empty.")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ChorusError(f"prompt_dropout must be in [0, 1], got {self.prompt_dropout}.")
        if self.hint_channels is not None:
            self.hint_channels = tuple(int(c) for c in self.hint_channels)
        adopt_base(self)
        # the paper's prompt dropout replaces the per-embedder rates: text embedders get the one rate (their
        # draws are then tied per example), micro-conditioning none
        if self.embedders is not None:
            self.embedders = [{**e, "dropout": self.prompt_dropout if "dropout" in e and _is_text(e) else 0.0}
                              for e in self.embedders]
        self.text_dropout, self.micro_dropout = min(self.prompt_dropout, 0.999), 0.0


def _is_text(entry: dict) -> bool:
    from chorus.conditioning import MICRO_WIDTHS
    return entry.get("name") not in MICRO_WIDTHS


class ControlledUNet(torch.nn.Module):
    """UNet_frozen(x, t, c; skips + ControlNet(x, t, c, image)): the module a training step calls."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x, t, encoder_hidden_states, controlnet_cond, added_cond_kwargs=None, **kwargs):
        down, mid = self.controlnet(x, t, encoder_hidden_states, controlnet_cond, added_cond_kwargs=added_cond_kwargs,
                                    encoder_attention_mask=kwargs.get("encoder_attention_mask"))
        return self.unet(x, t, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)


def base_guidance(base) -> float:
    """The base folder's recommended guidance scale (sampling_defaults.json), else 5."""
    path = Path(base) / "sampling_defaults.json"
    return float(json.loads(path.read_text()).get("guidance_scale", 5.0)) if path.is_file() else 5.0


def hint_channels_for(factor: int, given: tuple | None = None) -> tuple[int, ...]:
    """The condition encoder's widths: one stride-2 conv per level after the first, so 1 + log2(factor) levels."""
    levels = int(round(np.log2(factor))) + 1
    if given is not None:
        if len(given) != levels:
            raise ChorusError(f"hint_channels {given} has {len(given)} levels; a VAE of factor {factor} needs "
                              f"{levels} (one stride-2 conv per level after the first).")
        return given
    return (16, 32, 96, 256)[:levels] if levels <= 4 else (16, 32, 96, 256) + (256,) * (levels - 4)


class ControlNetTrainer(UNetTrainer):
    """UNetTrainer whose trainable model is a ControlNet over the frozen base UNet."""

    part_name = "controlnet"
    component = "controlnet"
    resume_fixed = RESUME_FIXED + ("condition", "prompt_dropout", "hint_channels")

    @property
    def trainable(self) -> torch.nn.Module:
        return self.controlnet

    def describe(self) -> str:
        return (f"ControlNet ({self.cfg.condition}) {self.controlnet.num_parameters() / 1e6:.2f}M parameters over a "
                f"frozen UNet of {self.unet.num_parameters() / 1e6:.2f}M, prompt dropout {self.cfg.prompt_dropout:g}, "
                f"{self.source.describe()}")

    def describe_record(self) -> dict:
        return {"data": self.source.describe(), "controlnet_parameters": self.controlnet.num_parameters(),
                "condition": self.cfg.condition, "timesteps": list(self.t_range)}

    def setup_trainable(self) -> None:
        from chorus.models import ControlNet
        cfg, d = self.cfg, self.d
        self.unet.requires_grad_(False).eval()
        factor = self.vae.downsampling_factor
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.controlnet = ControlNet.from_unet(self.unet, hint_channels_for(factor, cfg.hint_channels)).float()
        self.controlnet.to(d.device).train().requires_grad_(True)
        self.start_training(self.controlnet)
        self._probe = None

    def sampling_unet(self):
        return self.unet   # frozen; the EMA is the ControlNet's

    def train_module(self) -> torch.nn.Module:
        return ControlledUNet(self.unet, self.controlnet)

    def step_kwargs(self, examples, cond) -> dict:
        from chorus.train.data import pixels
        image = (pixels([e.control for e in examples]) + 1.0) / 2.0   # condition images in [0, 1]
        return {**cond.unet_kwargs(), "controlnet_cond": image.to(self.d.device)}

    def adjust_draws(self, draws: StepDraws) -> StepDraws:
        """The prompt is dropped as a whole: every text embedder follows the first one's draw."""
        from chorus.conditioning import TextEmbedder
        rows = [k for k, e in enumerate(self.stage.conditioner.embedders) if isinstance(e, TextEmbedder)]
        keep = draws.keep.clone()
        for k in rows[1:]:
            keep[k] = keep[rows[0]]
        return StepDraws(draws.t, draws.noise, draws.offset, keep)

    # -- probes of sudden convergence ---------------------------------------------------------------------
    def periodic(self) -> None:
        cfg = self.cfg
        if cfg.probe_every and self.d.is_main and (self.step % cfg.probe_every == 0 or self.step == 1):
            self.probe()

    def probe_set(self):
        if self._probe is None:
            from chorus.world.conditions import condition_image
            from chorus.world.fidelity import Reference
            from chorus.world.render import make_sample
            samples = [make_sample(PROBE_SEED, i, size=self.cfg.resolution, with_instances=True)
                       for i in range(self.cfg.probe_items)]
            images = torch.from_numpy(np.stack([condition_image(s, self.cfg.condition) for s in samples]))
            self._probe = ([s.caption for s in samples], images.permute(0, 3, 1, 2).float() / 255.0,
                           [Reference.of_sample(s) for s in samples])
        return self._probe

    @torch.no_grad()
    def probe(self, prompt: str | None = None) -> dict:
        """Condition fidelity of the EMA ControlNet on the held-out probe scenes (and the loss beside it)."""
        from chorus.world.fidelity import fidelity
        captions, images, refs = self.probe_set()
        pipe = self.pipeline()
        net = self.ema if self.ema is not None else self.controlnet
        pipe.base.controls = [net]
        guidance = self.cfg.probe_guidance or base_guidance(self.cfg.base)
        prompts = captions if prompt is None else [prompt] * len(captions)
        out = []
        for i in range(0, len(prompts), 16):
            out += pipe(prompts[i:i + 16], control_image=images[i:i + 16], num_inference_steps=self.cfg.probe_steps,
                        guidance_scale=guidance, seed=i, progress=False).images
        result = fidelity(out, refs)
        record = {"event": "probe", "step": self.step, "items": len(refs), "guidance": guidance,
                  "zero_conv_norm": float(sum(p.norm() ** 2 for n, p in net.named_parameters()
                                              if n.startswith("controlnet_") and "cond_embedding" not in n) ** 0.5),
                  **{k: v for k, v in result.items() if k != "items"}}
        self.logger.write(record)
        return record

    # -- export ---------------------------------------------------------------------------------------------
    def finish(self) -> Path:
        final = self.out / "controlnet"
        if self.d.is_main:
            net = self.ema if self.ema is not None else self.controlnet
            tmp = self.out / ".tmp-controlnet"
            ckpt.write_unet(net, tmp, getattr(torch, self.cfg.export_dtype))
            ckpt.write_json({"condition": self.cfg.condition, "base": self.cfg.base, "steps": self.step,
                             "prompt_dropout": self.cfg.prompt_dropout}, tmp / "chorus_control.json")
            ckpt.replace_folder(tmp, final)
        return final


def train_controlnet(cfg: ControlNetTrainConfig | dict | str | Path, out_dir, progress: bool = True,
                     resume: bool | str = False) -> Path:
    """Train a ControlNet on a frozen base (see ControlNetTrainConfig); returns OUT/controlnet."""
    if not isinstance(cfg, ControlNetTrainConfig):
        cfg = load_config(ControlNetTrainConfig, cfg, "ControlNet training")
    return ControlNetTrainer(cfg, out_dir, progress=progress, resume=resume).run()


# --- `chorus train --part controlnet` ------------------------------------------------------------------

def config_from_args(args) -> tuple[ControlNetTrainConfig, Path]:
    from chorus.train.cli import adapter_config_from_args
    if args.preset:
        raise ChorusError("--part controlnet trains on a --base model; a --preset is a whole recipe. Give --base "
                          "FOLDER (or --base default) and --condition canny|layout|boxes.")
    if args.data is not None:
        raise ChorusError("--part controlnet renders its conditions from the Shapes world; --data is not used.")
    return adapter_config_from_args(args, ControlNetTrainConfig, "ControlNet training",
                                    {"condition": getattr(args, "condition", None)},
                                    lambda cfg: f"runs/controlnet-{cfg.condition}")


def run_from_args(args) -> int:
    from chorus.train.cli import run_adapter
    return run_adapter(args, config_from_args, train_controlnet)


__all__ = ["ControlNetTrainConfig", "ControlNetTrainer", "ControlledUNet", "train_controlnet", "config_from_args",
           "run_from_args", "PROBE_SEED"]
