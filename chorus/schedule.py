"""The DDPM mathematics (seminar, Background): noise schedules, the forward process, prediction
types and the training loss.

    forward process   x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I),   ᾱ_t = Π_{s≤t} (1 − β_s)
    loss              L_t = ‖ε − ε_θ(x_t, t)‖²

Everything is computed in float64 and handed out in float32. The same numbers, seen from the
samplers' side, are the noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) of the variance-exploding form
x_t / √ᾱ_t = x_0 + σ_t · ε (see `chorus.samplers` and docs/ddpm.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import torch

from chorus.errors import ChorusError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler classes and the Chorus sampler that reproduces each one
SCHEDULER_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
SAMPLER_CLASSES = {v: k for k, v in SCHEDULER_CLASSES.items()} | {"dpmpp_2m_sde": "DPMSolverMultistepScheduler"}

# diffusers config keys that Chorus does not implement, with the values that mean "off"
_UNSUPPORTED = {
    "clip_sample": (False,),
    "thresholding": (False,),
    "variance_type": ("fixed_small", None),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "solver_order": (2,),
    "solver_type": ("midpoint",),
    "lambda_min_clipped": (-math.inf,),
    "euler_at_final": (False,),
}


# --- beta schedules ------------------------------------------------------------------------------

def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t = linspace(β_start, β_end, T)  (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t = linspace(√β_start, √β_end, T)²  (Stable Diffusion: 0.00085 → 0.012)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999),  ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)  (Nichol & Dhariwal)."""
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """√ᾱ ← (√ᾱ − √ᾱ_T) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_T): SNR(T) = 0, ᾱ_0 kept  (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# --- the schedule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseSchedule:
    """The noise schedule β_1..β_T and how its model was trained (a diffusers scheduler_config.json).

    `prediction_type` says what the network predicts (ε, v or x_0); `timestep_spacing`,
    `steps_offset`, `set_alpha_to_one`, `use_karras_sigmas`, `final_sigmas_type` and `sampler`
    are the defaults of the sampling schedule (see `chorus.samplers.get_schedule`).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    sampler: str = "ddim"

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.num_train_timesteps < 2:
            raise ChorusError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ChorusError(f"trained_betas has {len(self.trained_betas)} entries but num_train_timesteps "
                                  f"is {self.num_train_timesteps}; give one beta per training timestep.")

    # -- config I/O --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """Read a diffusers `scheduler/scheduler_config.json` dict; unknown keys are ignored."""
        for key, allowed in _UNSUPPORTED.items():
            value = config.get(key, allowed[0])
            if value not in allowed:
                raise ChorusError(f"The scheduler config sets {key}={value!r}, which Chorus does not implement "
                                  f"(it supports {key}={allowed[0]!r} only). Edit scheduler_config.json or pick "
                                  "another scheduler.")
        names = {f.name for f in fields(cls)} - {"sampler"}
        kwargs = {k: config[k] for k in names if k in config and config[k] is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        kwargs["sampler"] = _sampler_for(config)
        return cls(**kwargs)

    def to_config(self) -> dict[str, Any]:
        """A diffusers scheduler_config.json dict (diffusers' own class for `sampler`)."""
        cfg = {"_class_name": SAMPLER_CLASSES[self.sampler]}
        for f in fields(self):
            if f.name != "sampler":
                value = getattr(self, f.name)
                cfg[f.name] = list(value) if isinstance(value, tuple) else value
        cfg.update(clip_sample=False, thresholding=False)
        if self.sampler.startswith("dpmpp"):
            cfg.update(algorithm_type="sde-dpmsolver++" if self.sampler == "dpmpp_2m_sde" else "dpmsolver++",
                       solver_order=2)
        return cfg

    # -- the numbers ---------------------------------------------------------------------------------
    @cached_property
    def betas64(self) -> torch.Tensor:
        """β_t, float64, shape (T,)."""
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float64)
        elif self.beta_schedule == "linear":
            betas = linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        elif self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        else:
            betas = cosine_betas(self.num_train_timesteps)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    @cached_property
    def alphas_cumprod64(self) -> torch.Tensor:
        """ᾱ_t = Π_{s≤t} (1 − β_s), float64, shape (T,)."""
        return torch.cumprod(1 - self.betas64, 0)

    @property
    def betas(self) -> torch.Tensor:
        return self.betas64.float()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod64.float()

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t), shape (T,); infinite at t = T−1 for a zero-terminal-SNR schedule."""
        abar = self.alphas_cumprod64
        return ((1 - abar) / abar).sqrt().float()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps t (any shape), float64."""
        return self.alphas_cumprod64.to(t.device)[t.long()]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64."""
        abar = self.alpha_bar(t)
        return abar / (1 - abar)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) = 1/√SNR(t), float64."""
        abar = self.alpha_bar(t)
        return ((1 - abar) / abar).sqrt()

    def forward_process(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0):  x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, in one jump from x_0 (t: one int per batch item)."""
        abar = _per_item(self.alpha_bar(t), x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        prediction_type: str | None = None) -> torch.Tensor:
        """What the network learns to output: ε, v = √ᾱ·ε − √(1−ᾱ)·x_0, or x_0."""
        kind = prediction_type or self.prediction_type
        abar = _per_item(self.alpha_bar(t), x0)
        return _from_pair(x0, noise, abar, kind)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ChorusError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _sampler_for(config: dict) -> str:
    name = config.get("_class_name", "DDIMScheduler")
    if name == "DPMSolverMultistepScheduler":
        algo = config.get("algorithm_type", "dpmsolver++")
        if algo not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ChorusError(f"DPMSolverMultistepScheduler with algorithm_type={algo!r} is not implemented; "
                              "Chorus has 'dpmsolver++' (sampler dpmpp_2m) and 'sde-dpmsolver++' (dpmpp_2m_sde).")
        return "dpmpp_2m_sde" if algo == "sde-dpmsolver++" else "dpmpp_2m"
    return SCHEDULER_CLASSES.get(name, "ddim")   # other classes (e.g. PNDM) share the schedule; DDIM samples it


def _per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-batch-item value (B,) as (B, 1, 1, …) in like's dtype, for broadcasting."""
    values = values.reshape(-1, *([1] * (like.dim() - 1)))
    return values.to(like.device, like.dtype)


# --- prediction types -----------------------------------------------------------------------------

def to_x0(pred: torch.Tensor, prediction_type: str, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ  |  √ᾱ·x_t − √(1−ᾱ)·v̂  |  x̂_0."""
    a, s = _coeffs(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * pred) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * pred
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return pred


def to_eps(pred: torch.Tensor, prediction_type: str, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """ε̂ = ε̂  |  √ᾱ·v̂ + √(1−ᾱ)·x_t  |  (x_t − √ᾱ·x̂_0)/√(1−ᾱ)."""
    a, s = _coeffs(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a * pred + s * x_t
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return (x_t - a * pred) / s


def to_v(pred: torch.Tensor, prediction_type: str, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """v̂ = √ᾱ·ε̂ − √(1−ᾱ)·x̂_0  (Salimans & Ho 2022)."""
    if prediction_type == "v_prediction":
        return pred
    a, s = _coeffs(alpha_bar, x_t)
    return a * to_eps(pred, prediction_type, x_t, alpha_bar) - s * to_x0(pred, prediction_type, x_t, alpha_bar)


def convert(pred: torch.Tensor, from_type: str, to_type: str, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Re-express a prediction of one type (ε, v, x_0) as another, given x_t and ᾱ."""
    _check_choice("prediction_type", to_type, PREDICTION_TYPES)
    fn = {"epsilon": to_eps, "v_prediction": to_v, "sample": to_x0}[to_type]
    return fn(pred, from_type, x_t, alpha_bar)


def _coeffs(alpha_bar, like: torch.Tensor):
    """(√ᾱ, √(1−ᾱ)) broadcastable against like; alpha_bar is a float or a per-item tensor (B,)."""
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if abar.dim() > 0:
        abar = abar.reshape(-1, *([1] * (like.dim() - 1)))
    abar = abar.to(like.device)
    return abar.sqrt().to(like.dtype), (1 - abar).sqrt().to(like.dtype)


def _from_pair(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    _check_choice("prediction_type", kind, PREDICTION_TYPES)
    return x0


# --- the loss -------------------------------------------------------------------------------------

def min_snr_weight(snr: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): the x_0-loss weight min(SNR, γ), as min(SNR,γ)/SNR for ε, /(SNR+1) for v."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)      # = min(SNR, γ)/SNR, and 1 at SNR = 0
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return clipped


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: NoiseSchedule, prediction_type: str | None = None, min_snr_gamma: float | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """L_t = ‖target − output‖² (mean over non-batch dims), target = ε, v or x_0; optionally min-SNR-γ weighted."""
    kind = prediction_type or schedule.prediction_type
    target = schedule.training_target(x0, noise, t, kind)
    per_item = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)        # (B,)
    if min_snr_gamma is not None:
        per_item = per_item * min_snr_weight(schedule.snr(t), kind, min_snr_gamma).to(per_item)
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ChorusError(f"reduction={reduction!r} is not supported; choose 'mean', 'sum' or 'none'.")
