"""Samplers: parity with diffusers' schedulers on a tiny UNet, and the identities of the mathematics."""
import math
from types import SimpleNamespace

import pytest
import torch

from chorus import samplers as S
from chorus.errors import ChorusError
from chorus.schedule import NoiseSchedule

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notes from diffusers' schedulers

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
           "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
           "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler"}
STOCHASTIC = ("ddim", "ddpm", "euler_a", "dpmpp_2m_sde")
N = 7   # steps: 1000 is not a multiple of 7, so 'trailing' and 'linspace' grids are not evenly spaced


def config(sampler, spacing="leading", pred="epsilon", karras=False, **kw):
    cfg = dict(SD, _class_name=CLASSES[sampler], timestep_spacing=spacing, prediction_type=pred,
               steps_offset=1 if spacing == "leading" else 0, use_karras_sigmas=karras, set_alpha_to_one=False)
    if sampler == "dpmpp_2m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    return {**cfg, **kw}


@pytest.fixture(scope="module")
def tiny():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                cross_attention_dim=32, sample_size=8, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 5, 32, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    return SimpleNamespace(unet=unet, context=context[:1], context2=context, noise=noise,
                           net=lambda x, t, **kw: unet(x, t, **kw).sample)


@torch.no_grad()
def run_diffusers(tiny, sampler, cfg, n=N, eta=0.0, seed=7):
    import diffusers
    sched = getattr(diffusers, CLASSES[sampler]).from_config(cfg)
    sched.set_timesteps(n)
    latents = tiny.noise * sched.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = tiny.unet(sched.scale_model_input(latents, t), t, encoder_hidden_states=tiny.context).sample
        kw = {"eta": eta} if sampler == "ddim" else {}
        if sampler in STOCHASTIC:
            kw["generator"] = g
        latents = sched.step(out, t, latents, **kw).prev_sample
    return latents


def run_chorus(tiny, sampler, cfg, n=N, eta=0.0, seed=7):
    schedule = NoiseSchedule.from_config(cfg)
    sigmas, timesteps = S.get_schedule(schedule, n, sampler=sampler)
    denoiser = S.Denoiser(tiny.net, schedule, sigmas=sigmas, timesteps=timesteps)
    knobs = {}
    if sampler == "ddim":
        knobs = dict(eta=eta, landing_sigmas=S.ddim_landing_sigmas(schedule, timesteps, n, schedule.set_alpha_to_one))
    x = S.initial_latents(tiny.noise, sigmas, sampler=sampler, spacing=cfg["timestep_spacing"])
    x = S.get_sampler(sampler)(denoiser, x, sigmas, extra_args={"encoder_hidden_states": tiny.context},
                               disable=True, generator=torch.Generator().manual_seed(seed), **knobs)
    return S.final_latents(x, sigmas, sampler=sampler)


SPACINGS = ("leading", "trailing", "linspace")
PARITY = [(s, sp, "epsilon", False, 0.0) for s in CLASSES for sp in SPACINGS]                   # every grid
PARITY += [(s, SPACINGS[i % 3], "v_prediction", False, 0.0) for i, s in enumerate(CLASSES)]   # v, each spacing
PARITY += [("ddim", sp, p, False, 1.0) for sp, p in zip(SPACINGS, ("epsilon", "v_prediction", "epsilon"))]
PARITY += [(s, sp, p, True, 0.0) for s, sp, p in (("euler", "leading", "epsilon"), ("heun", "linspace", "v_prediction"),
                                                  ("dpmpp_2m", "trailing", "epsilon"),
                                                  ("dpmpp_2m_sde", "leading", "v_prediction"))]


@pytest.mark.parametrize("sampler,spacing,pred,karras,eta", PARITY)
def test_parity_with_diffusers(tiny, sampler, spacing, pred, karras, eta):
    cfg = config(sampler, spacing, pred, karras)
    ref = run_diffusers(tiny, sampler, cfg, eta=eta)
    ours = run_chorus(tiny, sampler, cfg, eta=eta)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"])
def test_parity_zero_terminal_snr(tiny, sampler):
    cfg = config(sampler, "trailing", "v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True)
    torch.testing.assert_close(run_chorus(tiny, sampler, cfg, n=5), run_diffusers(tiny, sampler, cfg, n=5),
                               atol=1e-4, rtol=1e-5)


def test_parity_set_alpha_to_one_and_final_sigma_min(tiny):
    cfg = config("ddim", "leading", set_alpha_to_one=True)
    torch.testing.assert_close(run_chorus(tiny, "ddim", cfg), run_diffusers(tiny, "ddim", cfg), atol=1e-4, rtol=1e-5)
    cfg = config("euler", "trailing", final_sigmas_type="sigma_min")
    torch.testing.assert_close(run_chorus(tiny, "euler", cfg), run_diffusers(tiny, "euler", cfg), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_guidance_with_rescale_matches_diffusers(tiny):
    """CFG (scale 5) with guidance_rescale 0.7 on the raw ε output, as diffusers' pipelines apply it."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    cfg = config("euler", "leading")
    scale, phi = 5.0, 0.7
    sched = EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(N)
    latents = tiny.noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = tiny.unet(inp, t, encoder_hidden_states=tiny.context2).sample.chunk(2)
        guided = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
        latents = sched.step(guided, t, latents).prev_sample

    def net(x, t):
        uncond, cond = tiny.net(torch.cat([x, x]), t, encoder_hidden_states=tiny.context2).chunk(2)
        return S.cfg_combine(uncond, cond, scale, phi)

    schedule = NoiseSchedule.from_config(cfg)
    sigmas, timesteps = S.get_schedule(schedule, N, sampler="euler")
    x = S.initial_latents(tiny.noise, sigmas, sampler="euler", spacing="leading")
    x = S.sample_euler(S.Denoiser(net, schedule, sigmas=sigmas, timesteps=timesteps), x, sigmas, disable=True)
    torch.testing.assert_close(x, latents, atol=1e-4, rtol=1e-5)


def test_cfg_combine():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(S.cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(S.cfg_combine(u, c, 0.0), u)
    full = S.cfg_combine(u, c, 7.0, guidance_rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))    # φ = 1 matches the std of cond


# --- sampling schedules against diffusers -----------------------------------------------------------

GRIDS = [(s, k) for s in ("ddim", "ddpm", "euler", "heun", "dpmpp_2m") for k in (False, True)
         if not (k and s in ("ddim", "ddpm"))]        # diffusers' DDIM/DDPM have no Karras sigmas


@pytest.mark.parametrize("sampler,karras", GRIDS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [7, 10, 25])
def test_schedule_matches_set_timesteps(sampler, spacing, n, karras):
    import diffusers
    cfg = config(sampler, spacing, karras=karras)
    ref = getattr(diffusers, CLASSES[sampler]).from_config(cfg)
    ref.set_timesteps(n)
    sigmas, timesteps = S.get_schedule(NoiseSchedule.from_config(cfg), n, sampler=sampler)
    ref_t = ref.timesteps
    if sampler == "heun":   # diffusers repeats every timestep but the first for the second-order evaluations
        ref_t = torch.cat([ref_t[:1], ref_t[1::2]])
    assert timesteps.dtype == ref_t.dtype
    torch.testing.assert_close(timesteps.double(), ref_t.double(), atol=2e-3, rtol=0)   # fractional Karras t: fp32 σ
    if sampler in ("ddim", "ddpm"):
        abar = ref.alphas_cumprod[ref_t]
        ref_sigmas = ((1 - abar) / abar).sqrt()
        last = 0.0 if sampler == "ddpm" else ((1 - ref.alphas_cumprod[0]) / ref.alphas_cumprod[0]).sqrt()
        ref_sigmas = torch.cat([ref_sigmas, torch.tensor([last])])
    else:
        ref_sigmas = ref.sigmas if sampler != "heun" else torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
    torch.testing.assert_close(sigmas, ref_sigmas.float(), rtol=5e-5, atol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_initial_latents_match_init_noise_sigma(sampler, spacing):
    """diffusers starts from noise·init_noise_sigma in its own space; Chorus from the VE x_T."""
    import diffusers
    cfg = config(sampler, spacing)
    ref = getattr(diffusers, CLASSES[sampler]).from_config(cfg)
    ref.set_timesteps(10)
    sigmas = S.get_sigmas(NoiseSchedule.from_config(cfg), 10, sampler=sampler)
    noise = torch.ones(1, 1, 2, 2)
    x = S.initial_latents(noise, sigmas, sampler=sampler, spacing=spacing)
    vp = sampler in S.VP_SAMPLERS
    expected = noise * float(ref.init_noise_sigma) * (math.sqrt(1 + float(sigmas[0]) ** 2) if vp else 1.0)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=0)


def test_img2img_matches_diffusers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    for cls, sampler in ((DDIMScheduler, "ddim"), (EulerDiscreteScheduler, "euler")):
        cfg = config(sampler, "leading")
        ref = cls.from_config(cfg)
        sigmas, timesteps = S.get_schedule(NoiseSchedule.from_config(cfg), 20, sampler=sampler)
        for strength in (0.0, 0.3, 0.55, 1.0):
            ref.set_timesteps(20)
            ref_t, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), 20, strength, "cpu")
            sig, ts = S.img2img_schedule(sigmas, timesteps, strength)
            assert len(ts) == n and torch.equal(ts.to(ref_t.dtype), ref_t)
            torch.testing.assert_close(S.img2img_sigmas(sigmas, strength), sig)
        # the first latent: the forward process to the first step's σ, in VE form (diffusers: VP for DDIM)
        x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
        sig, ts = S.img2img_schedule(sigmas, timesteps, 0.6)
        ref.set_timesteps(20)
        if sampler == "euler":
            ref.set_begin_index(len(timesteps) - len(ts))
        noised = ref.add_noise(x0, noise, ts[:1])
        if sampler == "ddim":
            noised = noised * math.sqrt(1 + float(sig[0]) ** 2)
        torch.testing.assert_close(S.noise_to_sigma(x0, noise, sig[0]), noised, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", [0.3, 0.8])
def test_split_schedule_matches_sdxl_rule(start):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    cfg = config("euler", "leading")
    ref = EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(20)
    ref_t, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), 20, 0.3, "cpu",
                                                              denoising_start=start)
    sigmas, timesteps = S.get_schedule(NoiseSchedule.from_config(cfg), 20, sampler="euler")
    late_s, late_t = S.split_schedule(sigmas, timesteps, denoising_start=start)
    early_s, early_t = S.split_schedule(sigmas, timesteps, denoising_end=start)
    assert torch.equal(late_t, ref_t) and len(late_s) == n + 1
    cut = int(round(1000 - start * 1000))     # diffusers' SDXL base: the steps with t >= cut
    assert torch.equal(early_t, timesteps[timesteps >= cut])
    assert early_s[-1] == late_s[0] and len(early_t) + len(late_t) == 20      # the hand-off σ is shared
    torch.testing.assert_close(S.split_sigmas(sigmas, timesteps, start, None), late_s)
    mid_s, mid_t = S.split_schedule(sigmas, timesteps, 0.2, 0.6)
    assert torch.all(mid_t < 800) and torch.all(mid_t >= 400)
    with pytest.raises(ChorusError):
        S.split_schedule(sigmas, timesteps, 0.50, 0.501)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun"])
def test_split_run_equals_full_run(sampler):
    """Running the base part then the refiner part from the shared σ equals one run (deterministic samplers)."""
    den = GaussianDenoiser()
    schedule = NoiseSchedule(**{k: v for k, v in SD.items() if k != "clip_sample"})
    sigmas, timesteps = S.get_schedule(schedule, 12, sampler=sampler, spacing="leading")
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    full = S.get_sampler(sampler)(den, x, sigmas, disable=True)
    first, _ = S.split_schedule(sigmas, timesteps, denoising_end=0.6)
    second, _ = S.split_schedule(sigmas, timesteps, denoising_start=0.6)
    half = S.get_sampler(sampler)(den, S.get_sampler(sampler)(den, x, first, disable=True), second, disable=True)
    torch.testing.assert_close(half, full)


# --- the denoiser ---------------------------------------------------------------------------------

def test_denoiser_sigma_to_t():
    from diffusers import EulerDiscreteScheduler
    schedule = NoiseSchedule(**{k: v for k, v in SD.items() if k != "clip_sample"})
    den = S.Denoiser(lambda x, t: x, schedule)
    exact = den.sigma_to_t(schedule.sigmas[[0, 17, 500, 999]])
    assert exact.dtype == torch.long and exact.tolist() == [0, 17, 500, 999]
    ref = EulerDiscreteScheduler(**{k: v for k, v in SD.items() if k != "clip_sample"})
    log_sigmas = ref.sigmas.flip(0)[1:].log().numpy()
    between = torch.tensor([0.5, 1.234, 7.7])
    expected = torch.from_numpy(ref._sigma_to_t(between.numpy(), log_sigmas))
    torch.testing.assert_close(den.sigma_to_t(between).double(), expected.double(), atol=2e-3, rtol=0)
    table = S.Denoiser(lambda x, t: x, schedule, sigmas=torch.tensor([1.234, 0.5, 0.0]),
                       timesteps=torch.tensor([321.5, 12.25]))
    assert table.sigma_to_t(torch.tensor([0.5, 1.234])).tolist() == [12.25, 321.5]


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_from_a_perfect_network(pred):
    """If the network outputs the true ε / v / x_0 of x_t, the denoiser returns x_0 exactly."""
    schedule = NoiseSchedule(**{k: v for k, v in SD.items() if k != "clip_sample"}, prediction_type=pred)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 700])

    def oracle(x_vp, t_in):
        assert torch.equal(t_in, t)
        torch.testing.assert_close(x_vp, schedule.forward_process(x0, t, eps))
        return schedule.training_target(x0, eps, t, pred)

    sigma = schedule.sigma(t)
    x = x0 + sigma[:, None, None, None] * eps                                     # VE form
    torch.testing.assert_close(S.Denoiser(oracle, schedule)(x, sigma.float()), x0, atol=1e-5, rtol=1e-5)


# --- identities with an analytic denoiser -------------------------------------------------------------

class GaussianDenoiser:
    """The exact D(x; σ) = μ + s²/(s² + σ²)·(x − μ) for data x_0 ~ N(μ, s²)."""

    def __init__(self, mu=0.5, s=0.7):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma, **_):
        sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

    def ode_solution(self, x, sigma_from, sigma_to):
        """The probability-flow ODE moves x − μ in proportion to √(s² + σ²)."""
        return self.mu + (x - self.mu) * math.sqrt((self.s ** 2 + sigma_to ** 2) / (self.s ** 2 + sigma_from ** 2))


def karras(n):
    return torch.cat([torch.from_numpy(S.karras_sigmas(0.03, 15.0, n)).float(), torch.zeros(1)])


def test_ddim_eta0_is_euler():
    den = GaussianDenoiser()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 15
    torch.testing.assert_close(S.sample_ddim(den, x, karras(10), disable=True),
                               S.sample_euler(den, x, karras(10), disable=True))


def test_ddim_eta1_is_ddpm_is_euler_ancestral():
    den = GaussianDenoiser()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 15
    runs = [S.sample_ddim(den, x, karras(10), disable=True, eta=1.0, generator=torch.Generator().manual_seed(3)),
            S.sample_ddpm(den, x, karras(10), disable=True, generator=torch.Generator().manual_seed(3)),
            S.sample_euler_ancestral(den, x, karras(10), disable=True, generator=torch.Generator().manual_seed(3))]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs[0], runs[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
    den = GaussianDenoiser()
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 15
    fn = S.get_sampler(sampler)
    errors = []
    for n in (10, 20, 40):
        sig = karras(n).double()
        sig[-1] = 0.03 * 0.5            # stop at a small σ > 0, where the exact solution is known
        out = fn(den, x, sig, disable=True)
        errors.append((out - den.ode_solution(x, float(sig[0]), float(sig[-1]))).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < (0.1 if order == 1 else 0.01)
    assert min(rates) > order - 0.35, (errors, rates)


def ancestral_law(den, sigmas, mean_T, var_T):
    """Mean and variance after DDPM steps on Gaussian data: x' − μ = A·(x − μ) + σ_up·z, exactly."""
    m, v = mean_T - den.mu, var_T
    for sigma, nxt in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        keep, k = nxt ** 2 / sigma ** 2, den.s ** 2 / (den.s ** 2 + sigma ** 2)
        a = keep + (1 - keep) * k
        m, v = a * m, a * a * v + nxt ** 2 * (1 - keep)
    return den.mu + m, v


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "ddim"])
def test_ancestral_samplers_follow_the_exact_law(sampler):
    den = GaussianDenoiser(mu=0.5, s=0.7)
    g = torch.Generator().manual_seed(0)
    sig = karras(12)
    n = 40_000
    scale = math.sqrt(1 + float(sig[0]) ** 2)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    knobs = {"eta": 1.0} if sampler == "ddim" else {}
    out = S.get_sampler(sampler)(den, x, sig.double(), disable=True, generator=g, **knobs)
    mean, var = ancestral_law(den, sig.double(), 0.0, scale ** 2)
    assert abs(out.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(out.var().item() - var) < 4 * var * math.sqrt(2 / n)
    assert abs(math.sqrt(var) - 0.7) > 0.01     # 12 coarse steps really do differ from the data law


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpmpp_2m_sde"])
def test_stochastic_samplers_sample_the_data_distribution(sampler):
    den = GaussianDenoiser(mu=0.5, s=0.7)
    g = torch.Generator().manual_seed(0)
    sig = karras(300)
    x = torch.randn(20_000, generator=g) * math.sqrt(1 + float(sig[0]) ** 2)
    out = S.get_sampler(sampler)(den, x, sig, disable=True, generator=g)
    assert abs(out.mean().item() - 0.5) < 0.02 and abs(out.std().item() - 0.7) < 0.015


def test_ddim_inversion_round_trip_analytic():
    den = GaussianDenoiser()
    x0 = 0.5 + 0.7 * torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    schedule = NoiseSchedule(**{k: v for k, v in SD.items() if k != "clip_sample"})
    errors = []
    for n in (10, 50):
        sigmas = S.get_sigmas(schedule, n, sampler="ddim", spacing="leading", final_sigma_zero=True).double()
        xT = S.ddim_invert(den, x0, sigmas.flip(0), disable=True)
        back = S.sample_ddim(den, xT, sigmas, disable=True)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.1 and errors[1] < errors[0] / 3, errors        # first order in the step


@torch.no_grad()
def test_ddim_inversion_round_trip_tiny_unet(tiny):
    """x_0 → x_T → x_0 with the tiny UNet as a v-network (a random ε-network is no denoiser: its
    x̂_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ amplifies noise, and the round trip with it is poorly conditioned)."""
    cfg = config("ddim", "leading", "v_prediction", set_alpha_to_one=True)
    schedule = NoiseSchedule.from_config(cfg)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    args = {"encoder_hidden_states": tiny.context}
    errors = []
    for n in (25, 50):
        sigmas, timesteps = S.get_schedule(schedule, n, sampler="ddim")
        den = S.Denoiser(tiny.net, schedule, sigmas=sigmas, timesteps=timesteps)
        xT = S.ddim_invert(den, x0, sigmas.flip(0), extra_args=args, disable=True)
        back = S.sample_ddim(den, xT, sigmas, extra_args=args, disable=True)
        errors.append((back - x0).abs().mean().item())
        assert (xT / math.sqrt(1 + float(sigmas[0]) ** 2) - x0).abs().mean() > 0.3      # it did move
    assert errors[1] < 0.03 and errors[1] < 0.7 * errors[0], errors


@torch.no_grad()
def test_ddim_inversion_matches_diffusers_inverse_scheduler(tiny):
    from diffusers import DDIMInverseScheduler
    cfg = config("ddim", "leading", set_alpha_to_one=True)
    inv = DDIMInverseScheduler.from_config(cfg)
    inv.set_timesteps(N)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    latents = x0
    for t in inv.timesteps:
        latents = inv.step(tiny.unet(latents, t, encoder_hidden_states=tiny.context).sample, t, latents).prev_sample
    schedule = NoiseSchedule.from_config(cfg)
    sigmas, timesteps = S.get_schedule(schedule, N, sampler="ddim")
    den = S.Denoiser(tiny.net, schedule, sigmas=sigmas, timesteps=timesteps)
    xT = S.ddim_invert(den, x0, sigmas.flip(0), extra_args={"encoder_hidden_states": tiny.context}, disable=True)
    torch.testing.assert_close(S.final_latents(xT, sigmas.flip(0), sampler="ddim"), latents, atol=1e-4, rtol=1e-5)


# --- the plumbing ---------------------------------------------------------------------------------

def test_registry_and_errors():
    assert set(S.SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde"}
    with pytest.raises(ChorusError, match="dpmpp_2m_sde"):
        S.get_sampler("plms")
    with pytest.raises(ChorusError):
        S.get_sigmas(NoiseSchedule(), 10, spacing="karras")
    with pytest.raises(ChorusError):
        S.get_sigmas(NoiseSchedule(), 2000)


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_callback_sees_every_step(sampler):
    seen = []
    sig = karras(6)
    S.get_sampler(sampler)(GaussianDenoiser(), torch.randn(2, 3) * 15, sig, disable=True,
                           callback=seen.append, generator=torch.Generator().manual_seed(0))
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert float(seen[-1]["sigma_next"]) == 0.0


def test_generator_list_draws_per_item_like_diffusers():
    from diffusers.utils.torch_utils import randn_tensor
    x = torch.zeros(3, 2, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ref = randn_tensor(x.shape, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    torch.testing.assert_close(S.randn_like(x, gens), ref)
    torch.testing.assert_close(S.randn_like(x, [torch.Generator().manual_seed(9)]),
                               torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))


def test_first_order_dpm_solver_steps_are_ddim_and_ddpm():
    """With two steps (a first step and the step into σ = 0) DPM-Solver++ is DDIM η=0 and its SDE form is DDPM."""
    den = GaussianDenoiser()
    sig = torch.tensor([9.0, 1.5, 0.0])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)) * 9
    torch.testing.assert_close(S.sample_dpmpp_2m(den, x, sig, disable=True), S.sample_ddim(den, x, sig, disable=True))
    torch.testing.assert_close(S.sample_dpmpp_2m_sde(den, x, sig, disable=True, generator=torch.Generator().manual_seed(1)),
                               S.sample_ddpm(den, x, sig, disable=True, generator=torch.Generator().manual_seed(1)))
