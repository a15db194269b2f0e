"""The DDPM mathematics: schedules against diffusers, the forward process, prediction types, the loss."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.errors import ChorusError
from chorus.schedule import (PREDICTION_TYPES, NoiseSchedule, convert, diffusion_loss, min_snr_weight,
                             to_eps, to_v, to_x0)

torch.set_num_threads(1)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("cfg", [dict(beta_schedule="linear"), SD, dict(beta_schedule="squaredcos_cap_v2")],
                         ids=["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(cfg, zero_snr):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**cfg, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule(**cfg, rescale_betas_zero_snr=zero_snr)
    assert ours.betas.dtype == torch.float32 and ours.betas64.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-4, atol=1e-6)
    if not zero_snr:
        torch.testing.assert_close(ours.betas, ref.betas, rtol=2e-5, atol=1e-7)
    else:   # diffusers rescales in float32, which costs β its digits; its function in float64 is the reference
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
        plain = NoiseSchedule(**cfg).betas64
        torch.testing.assert_close(ours.betas64, rescale_zero_terminal_snr(plain), rtol=1e-10, atol=1e-12)


def test_zero_terminal_snr():
    s = NoiseSchedule(**SD, rescale_betas_zero_snr=True)
    plain = NoiseSchedule(**SD)
    assert s.alphas_cumprod64[-1] == 0.0 and s.snr(torch.tensor([999])).item() == 0.0
    assert math.isinf(s.sigmas[-1].item())
    torch.testing.assert_close(s.alphas_cumprod64[0], plain.alphas_cumprod64[0])   # ᾱ_0 kept
    assert plain.snr(torch.tensor([999])).item() > 1e-3                              # the flaw it fixes


def test_trained_betas_and_config_round_trip():
    betas = torch.linspace(1e-4, 0.02, 50).tolist()
    s = NoiseSchedule(num_train_timesteps=50, trained_betas=betas, prediction_type="v_prediction")
    torch.testing.assert_close(s.betas, torch.tensor(betas))
    again = NoiseSchedule.from_config(s.to_config())
    assert again == s


def test_from_config_reads_diffusers_and_diffusers_reads_to_config(tmp_path):
    import json

    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    EulerDiscreteScheduler(**SD, prediction_type="v_prediction", timestep_spacing="trailing",
                           use_karras_sigmas=True).save_config(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg["some_future_key"] = 3                                          # unknown keys are ignored
    s = NoiseSchedule.from_config(cfg)
    assert (s.sampler, s.prediction_type, s.timestep_spacing, s.use_karras_sigmas) == (
        "euler", "v_prediction", "trailing", True)
    back = DDIMScheduler.from_config(NoiseSchedule(**SD, sampler="ddim").to_config())
    torch.testing.assert_close(back.alphas_cumprod, NoiseSchedule(**SD).alphas_cumprod, rtol=1e-4, atol=0)
    assert back.config.clip_sample is False


@pytest.mark.parametrize("bad", [dict(clip_sample=True), dict(thresholding=True), dict(variance_type="learned_range"),
                                 dict(beta_schedule="sigmoid"), dict(prediction_type="flow_prediction"),
                                 dict(timestep_spacing="karras"), dict(_class_name="DPMSolverMultistepScheduler",
                                                                       algorithm_type="dpmsolver")])
def test_from_config_rejects_what_it_does_not_implement(bad):
    with pytest.raises(ChorusError):
        NoiseSchedule.from_config({**SD, **bad})


def test_forward_process_ends():
    s = NoiseSchedule(**SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t0, tT = torch.zeros(4, dtype=torch.long), torch.full((4,), 999)
    clean = s.forward_process(x0, t0, noise)
    assert (clean - x0).pow(2).mean() < 1e-3 and torch.corrcoef(torch.stack([clean.flatten(), x0.flatten()]))[0, 1] > 0.999
    noisy = s.forward_process(x0, tT, noise)
    assert torch.corrcoef(torch.stack([noisy.flatten(), noise.flatten()]))[0, 1] > 0.995
    assert torch.corrcoef(torch.stack([noisy.flatten(), x0.flatten()]))[0, 1] < 0.1
    zsnr = NoiseSchedule(**SD, rescale_betas_zero_snr=True)
    assert torch.equal(zsnr.forward_process(x0, tT, noise), noise)             # exactly pure noise at t = T


def test_forward_process_is_one_jump_per_item_and_matches_diffusers():
    from diffusers import DDPMScheduler
    s, ref = NoiseSchedule(**SD), DDPMScheduler(**SD)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    torch.testing.assert_close(s.forward_process(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.training_target(x0, noise, t, "v_prediction"), ref.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    # one jump from x_0 equals the Markov chain x_t = √(1−β_t)·x_{t−1} + √β_t·z run step by step (in law: variances)
    abar_chain = torch.cumprod(1 - s.betas64, 0)
    torch.testing.assert_close(s.alpha_bar(t), abar_chain[t])


def test_empirical_variance_of_x_t():
    """Var(x_t) = ᾱ_t·Var(x_0) + (1 − ᾱ_t) for independent x_0 and ε."""
    s = NoiseSchedule(**SD)
    g = torch.Generator().manual_seed(2)
    n = 100_000
    for step in (0, 100, 400, 800, 999):
        x0 = 3.0 + 2.0 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        t = torch.full((n,), step)
        xt = s.forward_process(x0, t, noise)
        abar = s.alphas_cumprod64[step].item()
        expected = abar * 4.0 + (1 - abar)
        assert abs(xt.var().item() - expected) < 5 * expected * math.sqrt(2 / n)
        assert abs(xt.mean().item() - math.sqrt(abar) * 3.0) < 5 * math.sqrt(expected / n)


def test_snr_and_sigma():
    s = NoiseSchedule(**SD)
    t = torch.arange(1000)
    snr = s.snr(t)
    assert torch.all(snr[1:] < snr[:-1])
    torch.testing.assert_close(s.sigma(t), snr.rsqrt())
    torch.testing.assert_close(s.sigma(t).float(), s.sigmas)


@settings(max_examples=60, deadline=None)
@given(src=st.sampled_from(PREDICTION_TYPES), dst=st.sampled_from(PREDICTION_TYPES),
       abar=st.floats(1e-3, 0.999), seed=st.integers(0, 2 ** 16))
def test_conversions_round_trip_and_agree(src, dst, abar, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    truth = {"epsilon": eps, "v_prediction": v, "sample": x0}
    out = convert(truth[src], src, dst, xt, abar)
    torch.testing.assert_close(out, truth[dst], rtol=1e-7, atol=1e-7 / math.sqrt(min(abar, 1 - abar)))
    torch.testing.assert_close(convert(out, dst, src, xt, abar), truth[src], rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(to_x0(truth[src], src, xt, abar), x0, atol=1e-6, rtol=1e-7)
    torch.testing.assert_close(to_eps(truth[src], src, xt, abar), eps, atol=1e-6, rtol=1e-7)
    torch.testing.assert_close(to_v(truth[src], src, xt, abar), v, atol=1e-6, rtol=1e-7)


def test_conversion_with_per_item_alpha_bar():
    g = torch.Generator().manual_seed(3)
    abar = torch.tensor([0.1, 0.9], dtype=torch.float64)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    xt = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    torch.testing.assert_close(to_x0(eps, "epsilon", xt, abar), x0)


def test_loss_is_the_seminars_epsilon_loss():
    s = NoiseSchedule(**SD)
    g = torch.Generator().manual_seed(4)
    x0, noise, out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([5, 500, 990])
    torch.testing.assert_close(diffusion_loss(out, x0, noise, t, s), torch.nn.functional.mse_loss(out, noise))
    per = diffusion_loss(out, x0, noise, t, s, reduction="none")
    torch.testing.assert_close(per, (out - noise).pow(2).mean((1, 2, 3)))
    with pytest.raises(ChorusError):
        diffusion_loss(out, x0, noise, t, s, reduction="max")


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    gamma = 5.0
    torch.testing.assert_close(min_snr_weight(snr, "epsilon", gamma), torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, "v_prediction", gamma),
                               torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, "sample", gamma), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_min_snr_losses_agree_across_parameterisations(gamma):
    """min(SNR,γ)·‖Δx_0‖² = min(SNR,γ)/SNR·‖Δε‖² = min(SNR,γ)/(SNR+1)·‖Δv‖² for the same prediction."""
    s = NoiseSchedule(**SD)
    g = torch.Generator().manual_seed(5)
    x0, noise, eps_hat = (torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3, 250, 600, 999])
    xt = s.forward_process(x0, t, noise)
    abar = s.alpha_bar(t)
    preds = {k: convert(eps_hat, "epsilon", k, xt, abar) for k in PREDICTION_TYPES}
    losses = {k: diffusion_loss(p, x0, noise, t, s, k, min_snr_gamma=gamma, reduction="none") for k, p in preds.items()}
    if gamma is None:   # unweighted losses differ by exactly the weights SNR and SNR+1
        torch.testing.assert_close(losses["epsilon"], losses["sample"] * s.snr(t).float())
        torch.testing.assert_close(losses["v_prediction"], losses["sample"] * (s.snr(t) + 1).float())
    else:
        torch.testing.assert_close(losses["epsilon"], losses["sample"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses["v_prediction"], losses["sample"], rtol=1e-4, atol=1e-6)


def test_min_snr_is_finite_with_zero_terminal_snr():
    s = NoiseSchedule(**SD, rescale_betas_zero_snr=True)
    x0, noise, out = torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    loss = diffusion_loss(out, x0, noise, torch.tensor([999, 999]), s, "epsilon", min_snr_gamma=5.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1.0)
