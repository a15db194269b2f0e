"""The VAE trainer: it learns, writes a folder Chorus and diffusers both load, sets the latent scale,
and its losses and PSNR obey their definitions."""
import json
import math

import pytest
import torch

from chorus.errors import ChorusError
from chorus.models.vae import VAE
from chorus.train import vae as tv

TINY = dict(vae=tv.small_vae_config(2, (8, 16), groups=8), steps=24, batch_size=4, lr=3e-3, warmup_steps=2,
            recon="l2", image_size=32, crop_size=None, heldout_images=6, scale_images=8, eval_every=12,
            save_every=12, log_every=1, threads=1, seed=0)


def _log(folder):
    return [json.loads(line) for line in (folder / "vae_train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    return tv.train_vae(tv.VAETrainConfig(**TINY), out, progress=False)


def test_loss_falls_and_report_has_heldout_psnr(trained):
    losses = [r["loss"] for r in _log(trained) if "loss" in r]
    assert len(losses) == TINY["steps"]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:3]) / 3
    report = json.loads((trained / "vae_train_report.json").read_text())
    assert set(report["psnr_heldout"]) == {"train", "heldout_pairs", "heldout_words", "all"}
    assert report["latent_shape"] == [4, 16, 16] and report["factor"] == 2


def test_folder_loads_in_chorus_and_diffusers_with_same_outputs(trained):
    from diffusers import AutoencoderKL
    ours = VAE.from_pretrained(trained)
    theirs = AutoencoderKL.from_pretrained(str(trained)).eval()
    assert theirs.config.scaling_factor == pytest.approx(ours.config.scaling_factor)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = ours.decode(ours.encode(x).mode())
        b = theirs.decode(theirs.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scaling_factor_gives_unit_variance_latents(trained):
    vae = VAE.from_pretrained(trained)
    images = tv.world_images(tv.VAETrainConfig().data_seed, 0, TINY["scale_images"], 32)
    std = tv.latent_std(vae, images)
    assert std * vae.config.scaling_factor == pytest.approx(1.0, rel=1e-3)


def test_psnr_definition():
    x = torch.rand(3, 3, 8, 8) * 1.8 - 1  # in [-1, 0.8]
    delta = 0.05  # in [0, 1] units, i.e. 0.1 in [-1, 1]
    assert tv.psnr(x, x + 2 * delta) == pytest.approx(torch.full((3,), 10 * math.log10(1 / delta ** 2)), rel=1e-4)
    assert tv.psnr(x, x + 5.0) == pytest.approx(tv.psnr(x, torch.ones_like(x)))  # the reconstruction is clamped
    assert (tv.psnr(x, x) > 90).all()


def test_hinge_losses_and_perceptual_distance(tmp_path):
    assert float(tv.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(tv.hinge_d_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(1.0)
    assert float(tv.hinge_g_loss(torch.full((4,), 3.0))) == -3.0
    from chorus.world.evaluator import Evaluator, EvaluatorConfig, ShapesEvaluator
    torch.manual_seed(0)
    Evaluator(ShapesEvaluator(EvaluatorConfig(stem_width=8, widths=[8, 16, 16]))).save(tmp_path / "ev")
    dist = tv.PerceptualDistance(str(tmp_path / "ev"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(dist(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(dist(x, -x)) > 0.01


def test_perceptual_and_discriminator_terms_train(tmp_path):
    from chorus.world.evaluator import Evaluator, EvaluatorConfig, ShapesEvaluator
    Evaluator(ShapesEvaluator(EvaluatorConfig(stem_width=8, widths=[8, 16, 16]))).save(tmp_path / "ev")
    cfg = tv.VAETrainConfig(**{**TINY, "steps": 3, "eval_every": 100, "save_every": 0, "perceptual_weight": 0.1,
                               "evaluator": str(tmp_path / "ev"), "disc_weight": 0.1, "disc_start": 1})
    out = tv.train_vae(cfg, tmp_path / "vae", progress=False)
    rows = [r for r in _log(out) if "loss" in r]
    assert "perc" in rows[0] and "g" not in rows[0]
    assert {"perc", "g", "d"} <= set(rows[-1])


def test_bad_configs_and_nan_loss(tmp_path, monkeypatch):
    with pytest.raises(ChorusError, match="Valid fields are: .*batch_size"):
        tv.VAETrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ChorusError, match="heldout_seed"):
        tv.VAETrainConfig(data_seed=5, heldout_seed=5)
    with pytest.raises(ChorusError, match="recon"):
        tv.VAETrainConfig(recon="l3")
    monkeypatch.setattr(tv, "reconstruction_loss", lambda x, y, kind: torch.tensor(float("nan")))
    with pytest.raises(ChorusError, match="loss became nan at step 0"):
        tv.train_vae(tv.VAETrainConfig(**{**TINY, "steps": 2}), tmp_path / "nan", progress=False)


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[2] / "weights" / "vae-world-f4"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped world VAE")
def test_shipped_vae_reconstructs_heldout_world_images_above_30db():
    vae = VAE.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    cfg = tv.VAETrainConfig()
    images = tv.world_images(cfg.heldout_seed, 0, 24, 64, tv.SPLITS)  # seeds training never used
    assert vae.downsampling_factor == 4
    assert tv.heldout_psnr(vae, images)["all"] >= 30.0
    with torch.no_grad():
        z = vae.encode(images).mode() * vae.config.scaling_factor
    assert 0.7 < float(z.std()) < 1.4  # scaled latents are about unit variance on world images
