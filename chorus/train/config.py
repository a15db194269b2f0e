"""Typed training configs, their JSON form, and the presets.

A config is a dataclass; `load_config(cls, source)` reads one from a dict or a JSON file and refuses
unknown fields, naming the valid ones. `RecipeConfig` is a whole recipe (VAE → text encoder → UNet)
as `chorus train --preset NAME` runs it; `PRESETS` holds "tiny" (minutes, for tests and tutorials)
and "default" (the model that ships in weights/default).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chorus.errors import ChorusError

SAMPLE_PROMPTS = (
    "a red circle to the left of a blue square",
    "a green triangle",
    "three yellow stars",
    "a purple hexagon above an orange heart",
)


@dataclass
class UNetTrainConfig:
    """How to train a UNet: model, data, objective, optimiser and bookkeeping."""

    # -- the model: frozen parts come from folders, the UNet from a config (fresh) or from `base`
    base: str | None = None            # a pipeline folder (vae/, text_encoder/, tokenizer/, scheduler/, unet/)
    vae: str | None = None             # an AutoencoderKL folder (overrides base/vae)
    text_encoder: str | None = None    # a folder holding text_encoder/ and tokenizer/ (overrides base's)
    unet: dict = field(default_factory=dict)   # UNet config.json fields; {} = base's unet config
    init_from_base: bool = False       # start from base/unet weights (fine-tuning) instead of random; a `unet`
                                       # config that grows the base (new attention levels, a wider context, SDXL's
                                       # added embedding) keeps every matching weight and zero-initialises the
                                       # new paths, so the grown UNet starts as exactly the base's function
    embedders: list | None = None      # the conditioner, in order (names in chorus.conditioning.EMBEDDER_NAMES,
                                       # or {"name", "dropout", …}); None: the base's (or the text folder's)
    prediction_type: str = "epsilon"   # "epsilon" or "v_prediction"
    schedule: dict = field(default_factory=dict)  # scheduler_config.json fields over base's (or SD's)
    # -- data
    data: str | None = None            # image folder or WebDataset shards; None = the on-the-fly world
    resolution: int = 64
    data_seed: int | None = None       # world data set seed (None: `seed`)
    world_crop: bool = True            # world renders with random frames (original size / crop metadata)
    native_min: int | None = None      # world: smallest native render size (None: the renderer's 16)
    normalise_latents: int = 0         # N > 0: centre and whiten the latents per channel (statistics of N
                                       # training images) folded into the VAE's weights (scaling_factor 1)
    descriptive_captions: float = 0.0  # share of training captions that describe every object, its colour,
                                       # size and relations (DALL-E 3's recaptioning); the rest: the short caption
    timestep_interval: tuple = (0.0, 1.0)  # the noise levels trained on, as fractions of [0, T): an expert or
                                           # a refiner trains on a sub-interval
    epoch_size: int | None = 20_000    # world: distinct samples (index < epoch_size), reshuffled each epoch
    cache_latents: bool = True         # encode each training image once (the VAE is frozen)
    cache_text: bool = True            # encode each caption once (text encoders are frozen)
    text_cache_mb: int = 1024          # memory cap of the caption cache
    shuffle_buffer: int = 1000         # WebDataset streams: per-rank shuffle buffer
    # -- objective
    min_snr_gamma: float | None = 5.0  # Min-SNR-γ loss weighting (None: plain MSE)
    offset_noise: float = 0.0          # ε += offset · N(0, 1) per (item, channel)
    text_dropout: float = 0.1          # per-embedder conditioning dropout of text embedders (for CFG)
    micro_dropout: float = 0.0         # the same for micro-conditioning embedders (SDXL sizes/crops)
    # -- optimisation
    steps: int = 1000
    batch_size: int = 64               # global batch per optimiser step (all ranks, all micro-batches)
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"        # "cosine" or "constant", after linear warm-up
    warmup_steps: int = 100
    min_lr: float = 0.0                # the floor of the cosine
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999           # 0 = no EMA; exported unet/ holds the EMA weights
    mixed_precision: str = "auto"      # "auto" (bf16 autocast where the device has fast bf16), "bf16" or "no"
    seed: int = 0
    # -- bookkeeping
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0              # sample grid every N steps (0: only at the end when > 0 prompts)
    sample_prompts: tuple = SAMPLE_PROMPTS
    sample_steps: int = 20
    eval_every: int = 0                # world-benchmark score on a prompt subset every N steps (0: off)
    eval_prompts: int = 24
    export_dtype: str = "float32"      # dtype of the final exported model ("float16" for weights/)

    def __post_init__(self):
        _choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        _choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "no"))
        _choice("export_dtype", self.export_dtype, ("float32", "float16", "bfloat16"))
        for name in ("steps", "batch_size", "grad_accum", "resolution", "save_every", "keep_last", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ChorusError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("text_dropout", "micro_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ChorusError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ChorusError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if isinstance(self.descriptive_captions, bool) or not isinstance(self.descriptive_captions, (int, float)) \
                or not 0.0 <= self.descriptive_captions <= 1.0:
            raise ChorusError(f"descriptive_captions is the share of descriptive captions and must be in [0, 1], "
                              f"got {self.descriptive_captions!r}.")
        lo_hi = tuple(self.timestep_interval)
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
            raise ChorusError(f"timestep_interval must be two fractions 0 ≤ lo < hi ≤ 1 of the schedule, got "
                              f"{self.timestep_interval!r}.")
        self.timestep_interval = tuple(float(v) for v in lo_hi)
        if int(self.normalise_latents) < 0:
            raise ChorusError(f"normalise_latents is a number of images (0: off), got {self.normalise_latents}.")
        if self.native_min is not None and not 8 <= int(self.native_min) <= 128:
            raise ChorusError(f"native_min must be between 8 and 128 pixels, got {self.native_min}.")
        if self.embedders is not None:
            from chorus.conditioning import embedder_entry
            if not isinstance(self.embedders, (list, tuple)) or not self.embedders:
                raise ChorusError("embedders must be a non-empty list of embedder names or objects.")
            self.embedders = [embedder_entry(e, self.text_dropout, self.micro_dropout) for e in self.embedders]
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ChorusError(f"epoch_size must be at least 1 (or null for an endless world), got {self.epoch_size}.")
        if self.base == "default":  # `--base default`: the model that ships in weights/default
            from chorus.pipeline import default_model_path
            self.base = str(default_model_path())
        self.adam_betas = tuple(self.adam_betas)
        self.sample_prompts = tuple(self.sample_prompts)

    @property
    def world_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


@dataclass
class RecipeConfig:
    """A whole recipe: the VAE, the text encoder, then the UNet on top of both.

    `vae` and `text` are the fields of `chorus.train.vae.VAETrainConfig` and
    `chorus.train.text.TextTrainConfig` (checked against those classes when the part runs).
    """

    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    # later UNet stages, each a dict of UNetTrainConfig fields trained on the previous stage's model folder
    # (its `base`), into OUT/stage-2, OUT/stage-3, …; the last stage's model is the recipe's model
    stages: list = field(default_factory=list)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ChorusError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


# --- JSON I/O ----------------------------------------------------------------------------------------

def read_config_file(path: str | Path) -> dict:
    """The JSON object of fields in a config file; a missing file or bad JSON raises ChorusError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChorusError(f"The config file {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ChorusError(f"The config file {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(raw, dict):
        raise ChorusError(f"The config file {path} must hold a JSON object of fields.")
    return raw


def load_config(cls: type, source: Mapping[str, Any] | str | Path, what: str | None = None):
    """A dataclass from a dict or a JSON file; unknown fields raise ChorusError naming the valid ones."""
    what = what or cls.__name__
    if not isinstance(source, Mapping):
        source = read_config_file(source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in source.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ChorusError(f"The {what} config has fields Chorus does not know: {', '.join(unknown)}. "
                          f"Valid fields are: {', '.join(sorted(fields))}.")
    kwargs = {}
    for k, v in values.items():
        sub = _dataclass_type(fields[k])
        kwargs[k] = load_config(sub, v, f"{what}.{k}") if sub is not None and isinstance(v, Mapping) else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ChorusError(f"The {what} config is malformed ({e}).") from None


def _dataclass_type(f: dataclasses.Field):
    t = f.type if not isinstance(f.type, str) else {"UNetTrainConfig": UNetTrainConfig}.get(f.type)
    return t if dataclasses.is_dataclass(t) else None


def to_dict(config) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config, path: Path) -> None:
    from chorus.models.io import atomic_write
    text = json.dumps(to_dict(config), indent=2) + "\n"
    atomic_write(Path(path), lambda p: Path(p).write_text(text, encoding="utf-8"))


def override(config, **changes):
    """A copy with some fields changed (None values are ignored); checks the field names."""
    changes = {k: v for k, v in changes.items() if v is not None}
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - valid)
    if unknown:
        raise ChorusError(f"Unknown {type(config).__name__} fields: {', '.join(unknown)}. "
                          f"Valid fields are: {', '.join(sorted(valid))}.")
    return dataclasses.replace(copy.deepcopy(config), **changes)


# --- presets -----------------------------------------------------------------------------------------

# The UNet of each preset; sample_size, in/out channels and cross_attention_dim are filled in from the
# VAE and text encoder it trains on (see unet.complete_unet_config).
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
DEFAULT_UNET = dict(block_out_channels=[32, 64, 128], layers_per_block=2, norm_num_groups=32,
                    attention_head_dim=4, use_linear_projection=True,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])

# stage 3 of the default model: the default UNet with cross-attention at every level (one 32-d head at 16×16)
GROWN_UNET = dict(DEFAULT_UNET, attention_head_dim=[1, 4, 4],
                  down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3)


def _presets() -> dict[str, RecipeConfig]:
    tiny = RecipeConfig(
        vae={"steps": 150, "batch_size": 8, "eval_every": 75, "heldout_images": 48, "scale_images": 128},
        text={"steps": 150, "natural_scenes": 1000, "twin_pairs": 500, "eval_scenes": 64, "eval_every": 75},
        unet=UNetTrainConfig(unet=TINY_UNET, steps=300, batch_size=16, lr=2e-3, warmup_steps=20, epoch_size=2000,
                             save_every=100, keep_last=2, log_every=10, ema_decay=0.99, sample_every=0))
    default = RecipeConfig(
        # the parts shipped in weights/vae-world-f4 and weights/text-world (their *_train_config.json)
        vae={"save_dtype": "float16"},
        text={"steps": 1200, "save_dtype": "float16"},
        unet=UNetTrainConfig(unet=DEFAULT_UNET, steps=3000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200,
                             epoch_size=20_000, save_every=250, keep_last=3, log_every=10, ema_decay=0.999,
                             sample_every=500, eval_every=1000, eval_prompts=48, export_dtype="float16"))
    # The shipped model's second stage: the ε-prediction UNet above never learnt the latents' large
    # per-channel means (its samples drifted off the world), so it is fine-tuned to v-prediction, whose
    # target at high noise is ≈ −z₀ itself. Base: the first stage's output folder.
    default_v = RecipeConfig(
        vae={}, text={},
        unet=UNetTrainConfig(base="runs/default/model", init_from_base=True, prediction_type="v_prediction",
                             steps=1100, batch_size=64, lr=3e-4, min_lr=1e-5, warmup_steps=50, epoch_size=20_000,
                             ema_decay=0.995, save_every=100, keep_last=3, log_every=10, sample_every=500,
                             eval_every=0, eval_prompts=48, export_dtype="float16"))
    # Stage 3, the seminar's single-model improvements grown onto stage 2 (chorus.train.grow: the grown UNet
    # starts as exactly stage 2's function): eDiff-I's ensemble of text encoders (the world CLIP beside the
    # pretrained MiniLM, each dropped independently), SDXL's micro-conditioning (original size, crop corner,
    # target size, with MiniLM's pooled vector, into the added embedding) so the cropped and small scenes
    # stay in the data, descriptive captions for half of the visits, cross-attention at 16×16 too, zero
    # terminal SNR with trailing timesteps. Base: stage 2's output folder.
    default_grow = RecipeConfig(
        vae={}, text={},
        unet=UNetTrainConfig(base="runs/default-v/model", init_from_base=True, unet=GROWN_UNET,
                             embedders=[{"name": "text", "dropout": 0.2}, {"name": "minilm", "dropout": 0.2},
                                        "original_size", "crop_top_left", "target_size"],
                             prediction_type="v_prediction",
                             schedule={"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
                             descriptive_captions=0.5, steps=3000, batch_size=64, lr=5e-4, min_lr=1e-5,
                             warmup_steps=100, epoch_size=30_000, text_cache_mb=8192, ema_decay=0.999,
                             save_every=100, keep_last=2, log_every=10, sample_every=500, eval_every=0,
                             eval_prompts=48, mixed_precision="no", export_dtype="float16"))
    # The whole recipe in one stage, from scratch (issue "a default model that draws what the prompt
    # says", item 6): the shipped world VAE with its latents centred and whitened (folded into its
    # weights), the world CLIP beside MiniLM, micro-conditioning, descriptive captions, v-prediction with
    # zero terminal SNR and trailing timesteps, cross-attention at 16×16 too. The ablation arms of
    # experiments/ablate_default.py change one lever of it each. Not yet trained at full length.
    from chorus.paths import shipped_weights
    scratch = RecipeConfig(
        vae={}, text={},
        unet=UNetTrainConfig(vae=str(shipped_weights("vae-world-f4")), text_encoder=str(shipped_weights("text-world")),
                             unet=GROWN_UNET, normalise_latents=2048,
                             embedders=[{"name": "text", "dropout": 0.2}, {"name": "minilm", "dropout": 0.2},
                                        "original_size", "crop_top_left", "target_size"],
                             prediction_type="v_prediction",
                             schedule={"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
                             descriptive_captions=0.5, steps=6000, batch_size=64, lr=1e-3, min_lr=1e-5,
                             adam_betas=(0.9, 0.99), warmup_steps=300, epoch_size=40_000, text_cache_mb=8192,
                             ema_decay=0.999, save_every=200, keep_last=2, log_every=10, sample_every=500,
                             eval_every=0, eval_prompts=48, mixed_precision="auto", export_dtype="float16"))
    # the shipped model in one command: stage 1 (ε), then stage 2 (v) and stage 3 (grown) on top
    staged = lambda r: {k: v for k, v in to_dict(r.unet).items() if k != "base"}  # noqa: E731
    default.stages = [staged(default_v), staged(default_grow)]
    return {"tiny": tiny, "default": default, "default-v": default_v, "default-grow": default_grow,
            "default-scratch": scratch}


PRESETS = _presets()


def preset(name: str) -> RecipeConfig:
    """A fresh copy of a preset recipe."""
    if name not in PRESETS:
        raise ChorusError(f"Unknown preset {name!r}; the presets are: {', '.join(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])
