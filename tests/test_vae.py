"""The VAE (AutoencoderKL): parity with diffusers' own model, folders both ways, the posterior's
mathematics, tiled decoding/encoding, and the errors a user can cause."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from chorus.errors import ChorusError
from chorus.models.vae import VAE, DiagonalGaussian, VAEConfig, tiled_apply

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

torch.set_num_threads(1)

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
            norm_num_groups=32, sample_size=32)
VARIANTS = {
    "base": {},
    "two_layers": dict(layers_per_block=2),
    "no_attn_no_quant": dict(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
              norm_num_groups=32, sample_size=512)


def reference(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY, **overrides}).eval()


def chorus_copy(ref: AutoencoderKL) -> VAE:
    ours = VAE.from_config(dict(ref.config)).eval()
    ours.load_weights(ref.state_dict())
    return ours


def image(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def smooth_latent(size: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(1, 4, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic")


def assert_close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


# --- parity with diffusers ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_diffusers(variant):
    ref = reference(**VARIANTS[variant])
    ours = chorus_copy(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x, z = image(), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert_close(post.mean, ref_post.mean)
        assert_close(post.logvar, ref_post.logvar)
        assert_close(post.std, ref_post.std)
        assert_close(ours.decode(z), ref.decode(z).sample)
        assert_close(ours(x), ref(x).sample)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert_close(ours(x, sample_posterior=True, generator=g1), ref(x, sample_posterior=True, generator=g2).sample)


def test_posterior_sample_draws_noise_like_diffusers():
    ref = reference()
    ours = chorus_copy(ref)
    x = image(b=3)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    for make in (lambda: torch.Generator().manual_seed(11),
                 lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]):
        assert_close(post.sample(make()), ref_post.sample(make()), tol=1e-5)
    assert (post.sample(torch.Generator().manual_seed(1)) - post.mean).abs().max() > 1e-3  # it is noisy


def test_folders_load_both_ways(tmp_path):
    ref = reference(**VARIANTS["two_layers"])
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = VAE.from_pretrained(tmp_path / "from_diffusers")
    x = image()
    with torch.no_grad():
        assert_close(ours(x), ref(x).sample)
    torch.manual_seed(5)
    mine = VAE.from_config(VAEConfig(**{**TINY, "scaling_factor": 0.13025, "shift_factor": 0.1})).eval()
    mine.save_pretrained(tmp_path / "from_chorus")
    theirs = AutoencoderKL.from_pretrained(tmp_path / "from_chorus").eval()
    assert theirs.config.scaling_factor == 0.13025 and theirs.config.shift_factor == 0.1
    with torch.no_grad():
        assert_close(theirs(x).sample, mine(x))
    assert json.loads((tmp_path / "from_chorus" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert mine.scaling_factor == 0.13025 and mine.shift_factor == 0.1


def test_full_size_sd_vae_on_meta_matches_diffusers():
    with torch.device("meta"):
        ref = AutoencoderKL(**SD_VAE)
        ours = VAE.from_config(SD_VAE)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.num_parameters() == 83_653_863
    assert ours.downsampling_factor == 8


# --- the posterior's mathematics ---------------------------------------------------------------
def test_diagonal_gaussian_identities():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 3, generator=g)
    moments[0, 4, 0, 0] = 50.0  # logvar is clamped to [-30, 20]
    q = DiagonalGaussian(moments)
    assert q.logvar.max() == 20.0 and torch.equal(q.mode(), moments[:, :4])
    normal = torch.distributions.Normal(q.mean, q.std)
    standard = torch.distributions.Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean))
    kl = torch.distributions.kl_divergence(normal, standard).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), kl, rtol=1e-5)
    assert torch.allclose(q.kl(q), torch.zeros(2), atol=1e-5)
    z = q.sample(g)
    assert torch.allclose(q.nll(z), -normal.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.allclose(q.var, q.std ** 2, rtol=1e-5)


# --- tiling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tile,overlap,step,scale,fn", [
    (37, 16, 0.25, 1, 1.0, lambda t: t * 3 + 1),                                 # pointwise
    (40, 16, 0.5, 1, 2.0, lambda t: F.interpolate(t, scale_factor=2.0)),          # like decode
    (48, 16, 0.25, 4, 0.25, lambda t: F.avg_pool2d(t, 4)),                        # like encode
])
def test_tile_blending_is_a_partition_of_unity(size, tile, overlap, step, scale, fn):
    """For a tile-local fn the blended result equals fn on the whole input exactly."""
    x = torch.randn(2, 3, size, size - step * 2, generator=torch.Generator().manual_seed(0))
    assert_close(tiled_apply(fn, x, tile, overlap, step, scale), fn(x), tol=1e-5)


def column_steps(img: torch.Tensor, margin: int) -> torch.Tensor:
    """Mean |difference| between neighbouring columns and rows, away from the image border."""
    cols = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))[margin:-margin]
    rows = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(0, 1, 3))[margin:-margin]
    return torch.cat([cols, rows])


def test_tiled_decode_is_seamless_and_close():
    """Tiles disagree (each GroupNorm sees only its tile), but the blend hides the seams.

    The probe VAE has its residual branches zeroed so its receptive field is local: then the only
    disagreement between tiles is their GroupNorm statistics, which is what pasting tiles shows
    as steps. Tiled output must step no more than the untiled image's own largest local step;
    pasted tiles (the control) must, or this test could not fail. (Over 5 init seeds x 2 latents
    tiled/own ranged 0.86-1.69 and pasted/own 3.0-6.9; this seed gives 1.00 and 4.0.)
    """
    torch.manual_seed(1)
    vae = VAE.from_config(TINY).eval()
    with torch.no_grad():
        for name, p in vae.decoder.named_parameters():
            if ".conv2." in name or ".to_out." in name:
                p.zero_()
        z = smooth_latent(48)
        whole = vae.decode(z)
        tiled = vae.decode(z, tiled=True, tile_latent_size=16, overlap=0.25)
        pasted = torch.cat([torch.cat([vae.decode(z[..., i:i + 16, j:j + 16]) for j in (0, 16, 32)], dim=-1)
                            for i in (0, 16, 32)], dim=-2)
    own = column_steps(whole, 8).max()
    assert column_steps(tiled, 8).max() <= 1.5 * own
    assert column_steps(pasted, 8).max() > 2.5 * own
    assert (tiled - whole).abs().mean() < (pasted - whole).abs().mean()


def test_tiled_decode_bounds_activation_memory():
    """Tiles of 8 latent pixels over a 64x64 latent: no activation larger than an 8x8 decode's."""
    vae = VAE.from_config({**TINY, "layers_per_block": 1}).eval()
    largest = []
    hooks = [m.register_forward_hook(lambda m, i, o: largest.append(o.numel()))
             for m in vae.decoder.modules() if not list(m.children())]

    def peak(z, **kw):
        largest.clear()
        with torch.no_grad():
            out = vae.decode(z, **kw)
        return max(largest), out

    tile_peak, _ = peak(torch.randn(1, 4, 8, 8))
    tiled_peak, out = peak(torch.randn(1, 4, 64, 64), tiled=True, tile_latent_size=8, overlap=0.25)
    for h in hooks:
        h.remove()
    assert tiled_peak == tile_peak and out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    vae.enable_tiling(tile_latent_size=8)
    assert vae.decode(torch.randn(1, 4, 8, 8)).shape == (1, 3, 16, 16)  # not larger than a tile: untiled


def test_tiled_decode_and_encode_of_a_random_vae(capsys):
    """A random VAE (attention and GroupNorm see only a tile) is not tiling-invariant: report how far."""
    vae = chorus_copy(reference())
    with torch.no_grad():
        z = smooth_latent(48)
        whole, tiled = vae.decode(z), vae.decode(z, tiled=True, tile_latent_size=24)
        x = torch.tanh(whole)
        mean, tiled_mean = vae.encode(x).mean, vae.encode(x, tiled=True, tile_latent_size=24).mean
        assert torch.equal(vae.encode(x, tiled=True, tile_latent_size=48).mean, mean)  # one tile: untiled
    assert tiled.shape == whole.shape and tiled_mean.shape == mean.shape
    dec, enc = (tiled - whole).abs(), (tiled_mean - mean).abs()
    with capsys.disabled():
        print(f"\n[vae tiling, random tiny VAE, 48^2 latent, tile 24] decode |diff| max {dec.max():.3f} "
              f"mean {dec.mean():.3f} (image std {whole.std():.3f}); encode mean |diff| max {enc.max():.3f} "
              f"mean {enc.mean():.3f} (latent std {mean.std():.3f})")
    assert dec.mean() < whole.std() and enc.mean() < mean.std()


# --- training support --------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients():
    vae = VAE.from_config(TINY)
    x = image(b=1, size=16)

    def grads():
        vae.zero_grad()
        post = vae.encode(x)
        ((vae.decode(post.mode()) - x).pow(2).mean() + 1e-3 * post.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    vae.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-6)


# --- errors ------------------------------------------------------------------------------------
def test_image_size_not_a_multiple_of_the_downsampling_factor():
    vae = VAE.from_config(TINY)
    with pytest.raises(ChorusError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ChorusError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ChorusError, match=r"\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ChorusError, match="overlap"):
        vae.decode(torch.zeros(1, 4, 16, 16), tiled=True, overlap=1.0)


def test_unsupported_config_is_refused():
    with pytest.raises(ChorusError, match="only 'DownEncoderBlock2D'"):
        VAE.from_config({**TINY, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ChorusError, match="act_fn"):
        VAE.from_config({**TINY, "act_fn": "gelu"})
    with pytest.raises(ChorusError, match="fields Chorus does not know"):
        VAE.from_config({**TINY, "norm_type": "spatial"})


def test_weights_of_another_architecture(tmp_path):
    from diffusers import UNet2DConditionModel
    VAE.from_config(TINY).save_pretrained(tmp_path / "vae")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ChorusError, match="looks like a Stable Diffusion UNet"):
        VAE.from_pretrained(tmp_path / "vae")
    with pytest.raises(ChorusError, match="other shapes"):
        VAE.from_config({**TINY, "block_out_channels": (32, 96)}).load_weights(VAE.from_config(TINY).state_dict())


def test_folded_latent_normalisation_whitens_and_still_loads_in_diffusers(tmp_path):
    """After folding μ, σ of the raw latents into quant_conv / post_quant_conv: diffusers' own AutoencoderKL
    loads the folder, its latents have per-channel mean 0 and std 1 on the images measured, and
    decode(encode(x)) is what it was before the fold."""
    ref = reference(seed=3, scaling_factor=1.0)
    ours = chorus_copy(ref)
    x = image(b=8, seed=4)
    with torch.no_grad():
        z = ours.encode(x).mode()
        mu, sd = z.mean((0, 2, 3)), z.std((0, 2, 3))
        before, std_before = ours.decode(z), ours.encode(x).std
        ours.fold_latent_normalisation(mu, sd)
        z2 = ours.encode(x).mode()
    assert ours.scaling_factor == 1.0 and ours.shift_factor is None
    torch.testing.assert_close(z2.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z2.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "folded")
    theirs = AutoencoderKL.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        zd = theirs.encode(x).latent_dist
        assert_close(zd.mode(), z2)
        assert_close(zd.std, std_before / sd[None, :, None, None])   # the posterior's width scales with z
        assert_close(theirs.decode(zd.mode()).sample, before)
    with pytest.raises(ChorusError, match="scaling_factor"):
        chorus_copy(reference(seed=3)).fold_latent_normalisation(mu, sd)   # 0.18215: statistics ambiguous
