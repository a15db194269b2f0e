"""Samplers as plain functions over a denoiser (k-diffusion's shape), and their sampling schedules.

Every sampler is `sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None,
generator=None, **knobs) -> x`, where `model(x, sigma, **extra_args)` is a *denoiser*: it returns
the clean estimate D(x; σ) in the variance-exploding (VE) form

    x = x_vp / √ᾱ = x_0 + σ·ε,    σ = √((1 − ᾱ)/ᾱ),    x_vp = x / √(1 + σ²),

and `sigmas` descend to 0 (or to the schedule's smallest σ). A network that predicts ε, v or x_0
from (x_vp, t) becomes a denoiser through `Denoiser`. Stochastic samplers draw their noise on the
generator's device (the CPU for a CPU generator) in the same order and shapes as diffusers'
matching scheduler, so a seed carries over from diffusers. The equations and the table of
equivalences (DDIM η=0 ≡ Euler, DDIM η=1 ≡ DDPM ≡ Euler ancestral, …) are in docs/ddpm.md.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

from chorus.errors import ChorusError
from chorus.schedule import TIMESTEP_SPACINGS, NoiseSchedule

# which diffusers set_timesteps() grid each sampler follows, and which keep diffusers' latents in VP form
SAMPLER_GRID = {"ddpm": "ddim", "ddim": "ddim", "euler": "euler", "euler_a": "euler", "heun": "euler",
                "dpmpp_2m": "dpmsolver", "dpmpp_2m_sde": "dpmsolver"}
VP_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
# ᾱ_T of a zero-terminal-SNR schedule when sampling: σ_T = ∞ has no VE form, so ᾱ_T is floored —
# at 2⁻²⁴ (σ_T = 4096) as diffusers' Euler and DPM-Solver do, at 1e-12 (σ_T = 10⁶) to stand for
# diffusers' DDPM/DDIM, which keep ᾱ_T = 0 exactly (their v-prediction x̂_0 = −v at t = T).
ZERO_SNR_ALPHA_BAR = 2.0 ** -24
VP_ZERO_SNR_ALPHA_BAR = 1e-12


# --- sampling schedules ---------------------------------------------------------------------------

def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0,
                     grid: str = "euler") -> np.ndarray:
    """The descending timesteps of diffusers' set_timesteps (Lin et al. 2023, Table 2), per scheduler family."""
    T, n = num_train_timesteps, num_steps
    if spacing not in TIMESTEP_SPACINGS:
        raise ChorusError(f"timestep spacing {spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}.")
    if not 1 <= n <= T:
        raise ChorusError(f"The number of sampling steps must be between 1 and {T}, got {n}.")
    extra = 1 if grid == "dpmsolver" else 0          # DPM-Solver spaces n+1 points and drops the last
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "leading":
        ts = (np.arange(0, n + extra) * (T // (n + extra))).round()[::-1][: n] + steps_offset
    elif grid == "euler":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    else:
        ts = np.linspace(0, T - 1, n + extra).round()[::-1][: n]
    return ts.astype(np.float32 if grid == "euler" else np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ  (Karras et al. 2022, ρ = 7)."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep of σ by linear interpolation of log σ over the training timesteps."""
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low + w


def training_sigmas(schedule: NoiseSchedule, zero_snr_alpha_bar: float = ZERO_SNR_ALPHA_BAR) -> torch.Tensor:
    """σ_t of every training timestep, float64 (T,), with a zero-SNR ᾱ_T floored so σ_T is finite."""
    abar = schedule.alphas_cumprod64.clone()
    if schedule.rescale_betas_zero_snr or abar[-1] <= 0:
        abar[-1] = zero_snr_alpha_bar
    return ((1 - abar) / abar).sqrt()


def get_schedule(schedule: NoiseSchedule, num_steps: int, sampler: str = "euler", spacing: str | None = None,
                 steps_offset: int | None = None, karras: bool | None = None, final_sigma_zero: bool | None = None,
                 set_alpha_to_one: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (n+1,), timesteps (n,)) exactly as diffusers' scheduler for `sampler` sets them.

    Unset arguments come from the schedule's config. `final_sigma_zero` ends on σ = 0 (else on the
    smallest training σ); for "ddim" it defaults to `set_alpha_to_one`, for the others to
    `final_sigmas_type == "zero"`; "ddpm" always ends on 0.
    """
    grid = _grid_of(sampler)
    spacing = spacing or schedule.timestep_spacing
    offset = schedule.steps_offset if steps_offset is None else steps_offset
    karras = schedule.use_karras_sigmas if karras is None else karras
    final_zero = _final_zero(schedule, sampler, final_sigma_zero, set_alpha_to_one)
    train = training_sigmas(schedule, VP_ZERO_SNR_ALPHA_BAR if grid == "ddim" else ZERO_SNR_ALPHA_BAR)
    ts = spaced_timesteps(schedule.num_train_timesteps, num_steps, spacing, offset, grid)
    sig = np.interp(ts, np.arange(len(train)), train.numpy())
    if karras:
        sig, ts = _karras_grid(schedule, sig, train, num_steps, grid)
    last = 0.0 if final_zero else float(train[0])
    sigmas = torch.from_numpy(np.append(sig, last).astype(np.float32))
    return sigmas, torch.from_numpy(np.ascontiguousarray(ts))


def _karras_grid(schedule, sig, train, num_steps, grid):
    """Karras σs between the grid's ends (DPM-Solver: the training range), timesteps by log-σ interpolation."""
    lo, hi = (float(train[0]), float(train[-1])) if grid == "dpmsolver" else (float(sig[-1]), float(sig[0]))
    sig = karras_sigmas(lo, hi, num_steps)
    ts = sigma_to_t(torch.from_numpy(sig), train.log()).numpy()
    if grid == "dpmsolver":   # diffusers rounds (truncates for the cosine schedule) to integer timesteps
        return sig, (ts if schedule.beta_schedule == "squaredcos_cap_v2" else ts.round()).astype(np.int64)
    return sig, ts.astype(np.float32)


def get_sigmas(schedule: NoiseSchedule, num_steps: int, sampler: str = "euler", spacing: str | None = None,
               steps_offset: int | None = None, karras: bool | None = None,
               final_sigma_zero: bool | None = None) -> torch.Tensor:
    """The descending noise levels σ_0 > … > σ_{n−1} > σ_n (= 0), float32 (n+1,); see get_schedule."""
    return get_schedule(schedule, num_steps, sampler, spacing, steps_offset, karras, final_sigma_zero)[0]


def get_timesteps(schedule: NoiseSchedule, num_steps: int, sampler: str = "euler", spacing: str | None = None,
                  steps_offset: int | None = None, karras: bool | None = None) -> torch.Tensor:
    """The network timesteps t_i of σ_0..σ_{n−1} (n,): int64, or float32 for the Euler/Heun family."""
    return get_schedule(schedule, num_steps, sampler, spacing, steps_offset, karras)[1]


def ddim_landing_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor, num_steps: int | None = None,
                        final_sigma_zero: bool = True) -> torch.Tensor:
    """σ(t − T//n) per step: where diffusers' DDIMScheduler lands (not the next σ for 'linspace', or n∤T)."""
    T = schedule.num_train_timesteps
    n = num_steps or len(timesteps)
    train = training_sigmas(schedule, VP_ZERO_SNR_ALPHA_BAR)
    prev = timesteps.long() - T // n
    last = 0.0 if final_sigma_zero else float(train[0])
    out = torch.where(prev >= 0, train[prev.clamp(min=0)], torch.full_like(train[:1], last).expand(len(prev)))
    return out.float()


def img2img_schedule(sigmas: torch.Tensor, timesteps: torch.Tensor, strength: float):
    """The tail of the schedule img2img runs: the last min(int(n·strength), n) steps (diffusers' get_timesteps)."""
    if not 0.0 <= strength <= 1.0:
        raise ChorusError(f"strength must be between 0 and 1, got {strength}.")
    n = len(timesteps)
    start = max(n - min(int(n * strength), n), 0)
    return sigmas[start:], timesteps[start:]


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of `sigmas` img2img runs at `strength` (start at index n − min(int(n·strength), n))."""
    return img2img_schedule(sigmas, torch.zeros(len(sigmas) - 1), strength)[0]


def split_schedule(sigmas: torch.Tensor, timesteps: torch.Tensor, denoising_start: float | None = None,
                   denoising_end: float | None = None, num_train_timesteps: int = 1000):
    """The steps between two fractions of denoising: cut at t = int(round(T − f·T)); steps with t ≥ cut before it."""
    keep = torch.ones(len(timesteps), dtype=torch.bool)
    if denoising_end is not None:
        keep &= timesteps >= _cutoff(denoising_end, num_train_timesteps)
    if denoising_start is not None:
        keep &= timesteps < _cutoff(denoising_start, num_train_timesteps)
    idx = keep.nonzero().flatten()
    if len(idx) == 0:
        raise ChorusError(f"No sampling step lies between denoising_start={denoising_start} and "
                          f"denoising_end={denoising_end}; use more steps or a wider interval.")
    first, last = int(idx[0]), int(idx[-1])
    return sigmas[first:last + 2], timesteps[first:last + 1]


def split_sigmas(sigmas: torch.Tensor, timesteps: torch.Tensor, denoising_start: float | None = None,
                 denoising_end: float | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The σs of the steps between denoising_start and denoising_end (see split_schedule)."""
    return split_schedule(sigmas, timesteps, denoising_start, denoising_end, num_train_timesteps)[0]


def _cutoff(fraction: float, num_train_timesteps: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ChorusError(f"denoising_start/denoising_end must be fractions between 0 and 1, got {fraction}.")
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def _grid_of(sampler: str) -> str:
    if sampler not in SAMPLER_GRID:
        get_sampler(sampler)
    return SAMPLER_GRID[sampler]


def _final_zero(schedule, sampler, final_sigma_zero, set_alpha_to_one) -> bool:
    if final_sigma_zero is not None:
        return final_sigma_zero
    if sampler == "ddpm":
        return True
    if sampler == "ddim":
        return schedule.set_alpha_to_one if set_alpha_to_one is None else set_alpha_to_one
    return schedule.final_sigmas_type == "zero"


# --- initial and final latents --------------------------------------------------------------------

def noise_to_sigma(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The forward process in VE form, x = x_0 + σ·ε  (= forward_process(x_0, t, ε)/√ᾱ_t); img2img's start."""
    return x0 + torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device) * noise.to(x0)


def init_noise_sigma(sigmas: torch.Tensor, sampler: str = "euler", spacing: str = "leading") -> float:
    """The factor from N(0, I) noise to the VE x_T: √(1+σ_max²), or σ_max for Euler/Heun with 'linspace'/'trailing'."""
    sigma_max = float(sigmas.max())
    if sampler not in VP_SAMPLERS and spacing in ("linspace", "trailing"):
        return sigma_max
    return math.sqrt(1 + sigma_max ** 2)


def initial_latents(noise: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler",
                    spacing: str = "leading") -> torch.Tensor:
    """x_T in VE form from unit noise, as diffusers starts the scheduler of `sampler` (docs/ddpm.md)."""
    return noise * init_noise_sigma(sigmas, sampler, spacing)


def final_latents(x: torch.Tensor, sigmas: torch.Tensor, sampler: str | None = None) -> torch.Tensor:
    """The latent diffusers returns: x/√(1+σ_n²) for its VP schedulers (and by default), x for Euler/Heun."""
    sigma_last = float(sigmas[-1])
    if sigma_last == 0.0 or (sampler is not None and sampler not in VP_SAMPLERS):
        return x
    return x / math.sqrt(1 + sigma_last ** 2)


# --- the denoiser ---------------------------------------------------------------------------------

class Denoiser:
    """D(x; σ) from a network net_fn(x_vp, t) that predicts ε, v or x_0 (Karras et al.'s c_skip, c_out, c_in).

    The input is scaled to x_vp = x/√(1+σ²) and σ mapped to the network's timestep t: through the
    sampling schedule's (sigmas, timesteps) pairs when given (exact parity with diffusers), else the
    integer t whose training σ it is, else log-σ interpolation (fractional t).
    """

    def __init__(self, net_fn: Callable, schedule: NoiseSchedule, prediction_type: str | None = None,
                 sigmas: torch.Tensor | None = None, timesteps: torch.Tensor | None = None):
        self.net_fn, self.schedule = net_fn, schedule
        self.prediction_type = prediction_type or schedule.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ChorusError(f"prediction_type {self.prediction_type!r} is not supported; choose 'epsilon', "
                              "'v_prediction' or 'sample'.")
        self.train_sigmas = training_sigmas(schedule)
        self.log_sigmas = self.train_sigmas.log()
        self.table = None
        if timesteps is not None and sigmas is not None:
            self.table = (sigmas[: len(timesteps)].double().cpu(), timesteps.double().cpu())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """t for each σ (B,): from the table, else an exact training σ, else log-σ interpolation."""
        s = sigma.detach().double().cpu().reshape(-1)
        t = sigma_to_t(s, self.log_sigmas)
        on_train = torch.isclose(s[:, None], self.train_sigmas[None, :], rtol=1e-6, atol=0.0)
        t = torch.where(on_train.any(1), on_train.double().argmax(1).double(), t)
        if self.table is not None:
            hit = torch.isclose(s[:, None], self.table[0][None, :], rtol=1e-6, atol=0.0)
            t = torch.where(hit.any(1), self.table[1][hit.double().argmax(1)], t)
        t = t.to(sigma.device)
        return t.long() if bool((t == t.round()).all()) else t.float()

    def __call__(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        """D(x; σ) = c_skip(σ)·x + c_out(σ)·net(c_in(σ)·x, t(σ)),  c_in = 1/√(1+σ²)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        c_in = 1 / (s ** 2 + 1) ** 0.5
        out = self.net_fn(x * c_in, self.sigma_to_t(sigma), **extra_args)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return out * (-s * c_in) + x / (s ** 2 + 1)
        return out


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """ε̃ = ε_u + s·(ε_c − ε_u); with φ > 0, ε̃ ← φ·ε̃·std(ε_c)/std(ε̃) + (1−φ)·ε̃  (Lin et al. 2023, §3.4).

    Apply it to the network's raw output (ε or v), as diffusers does, before the Denoiser turns it
    into x_0: plain guidance is the same in every space, the rescale is not.
    """
    guided = uncond + scale * (cond - uncond)
    if guidance_rescale <= 0.0:
        return guided
    dims = list(range(1, cond.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


# --- helpers of the samplers ----------------------------------------------------------------------

def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ = (x − D(x; σ))/σ: the probability-flow ODE in VE form (= the predicted ε)."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """σ_up = η·σ_next·√(1 − σ_next²/σ²) (capped at σ_next),  σ_down = √(σ_next² − σ_up²)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def randn_like(x: torch.Tensor, generator=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """N(0, I) noise of x's shape drawn on the generator's device (CPU by default), then moved to x's device."""
    dtype = dtype or x.dtype
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=dtype, device=g.device).to(x.device)
                          for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randn(x.shape, generator=generator, dtype=dtype, device=device).to(x.device)


def _report(callback, i, x, sigma, sigma_next, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def _batch(sigma, x):
    return sigma.to(x.device) * torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


# --- the samplers ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """x ← x + (σ_{i+1} − σ̂)·(x − D(x; σ̂))/σ̂,  σ̂ = σ_i(1+γ) with optional churn γ (Karras et al. 2022, Alg. 2)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + randn_like(x, generator) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        denoised = model(x, _batch(sigma_hat, x), **extra_args)
        _report(callback, i, x, sigma_hat, sigma_next, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """x ← x + (σ_down − σ_i)·(x − D)/σ_i + σ_up·z, one draw of z every step (diffusers' EulerAncestral)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None):
    """x ← x + (σ_{i+1} − σ_i)·(d(x, σ_i) + d(x̃, σ_{i+1}))/2, x̃ the Euler step; Euler into σ = 0 (Karras Alg. 1)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), **extra_args)
        d = to_d(x, sigma, denoised)
        _report(callback, i, x, sigma, sigma_next, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, _batch(sigma_next, x), **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                eta: float = 0.0, landing_sigmas: torch.Tensor | None = None):
    """x ← D + σ_down·(x − D)/σ_i + σ_up·z,  σ_up = η·σ_{i+1}√(1 − σ_{i+1}²/σ_i²)  (Song et al. 2021, VE form).

    `landing_sigmas` (see ddim_landing_sigmas) reproduces diffusers' DDIMScheduler where it steps
    to t − T//n instead of the next timestep: the step lands there and the same VP sample is then
    read at the next σ.
    """
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_to = sigma_next if landing_sigmas is None else landing_sigmas[i].to(sigma)
        denoised = model(x, _batch(sigma, x), **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
        x = denoised + to_d(x, sigma, denoised) * sigma_down
        if eta > 0:
            x = x + randn_like(x, generator) * sigma_up
        if sigma_to != sigma_next:
            x = x * ((1 + sigma_next ** 2) / (1 + sigma_to ** 2)) ** 0.5
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None):
    """x ~ q(x_{t−1} | x_t, x̂_0):  x ← (σ'²/σ²)·x + (1 − σ'²/σ²)·D + σ_up·z,  σ' = σ_{i+1}  (Ho et al. 2020, eq. 7)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        keep = sigma_next ** 2 / sigma ** 2
        x = keep * x + (1 - keep) * denoised
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_next * (1 - keep) ** 0.5
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                    lower_order_final: bool = False):
    """x ← (σ'/σ)·x − (e^{−h} − 1)·D̃,  D̃ = D_i + (D_i − D_{i−1})/2r,  h = log(σ/σ'), r = h_{i−1}/h  (Lu et al. 2022)."""
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma / sigma_next)
            d = _second_order(denoised, old_denoised, h_last, h, first=lower_order_final and i == len(sigmas) - 2)
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                        eta: float = 1.0, s_noise: float = 1.0, lower_order_final: bool = False):
    """x ← (σ'/σ)e^{−ηh}·x + (1 − e^{−(1+η)h})·D̃ + σ'√(1 − e^{−2ηh})·z  (DPM-Solver++(2M) SDE, midpoint)."""
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), **extra_args)
        _report(callback, i, x, sigma, sigma_next, denoised)
        noise = randn_like(x, generator, dtype=torch.float32).to(x.dtype)
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma / sigma_next)
            d = _second_order(denoised, old_denoised, h_last, h, first=lower_order_final and i == len(sigmas) - 2)
            x = (sigma_next / sigma) * torch.exp(-eta * h) * x - torch.expm1(-h - eta * h) * d
            x = x + sigma_next * (-torch.expm1(-2 * eta * h)) ** 0.5 * s_noise * noise
            h_last = h
        old_denoised = denoised
    return x


def _second_order(denoised, old_denoised, h_last, h, first: bool):
    """D̃ = D_i + (D_i − D_{i−1})/(2r), r = h_{i−1}/h_i; just D_i on the first (or a forced first-order) step."""
    if old_denoised is None or h_last is None or first:
        return denoised
    r = h_last / h
    return denoised + (denoised - old_denoised) / (2 * r)


@torch.no_grad()
def ddim_invert(model, x0, sigmas_ascending, extra_args=None, callback=None, disable=None) -> torch.Tensor:
    """DDIM inversion x_0 → x_T:  x ← x + (σ_{i+1} − σ_i)·ε̂,  ε̂ from the net at t(σ_{i+1}) on the current sample.

    As diffusers' DDIMInverseScheduler and Plug-and-Play: the network sees the current VP sample at
    the next (higher) timestep. `sigmas_ascending` is a sampling schedule reversed (0 first); the
    result, in VE form at σ_n, goes back to x_0 through `sample_ddim` on the flipped sigmas.
    """
    extra_args = extra_args or {}
    x = x0
    for i in trange(len(sigmas_ascending) - 1, disable=disable):
        sigma, sigma_next = sigmas_ascending[i], sigmas_ascending[i + 1]
        x_in = x * ((1 + sigma_next ** 2) / (1 + sigma ** 2)) ** 0.5     # the same VP sample, read at σ_{i+1}
        denoised = model(x_in, _batch(sigma_next, x), **extra_args)
        eps = to_d(x_in, sigma_next, denoised)
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = x + eps * (sigma_next - sigma)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def get_sampler(name: str) -> Callable:
    """The sampler function called `name`."""
    if name not in SAMPLERS:
        raise ChorusError(f"Unknown sampler {name!r}; the samplers are: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]
