"""Chorus's ControlNet against diffusers' ControlNetModel, and a UNet taking its residuals."""
from __future__ import annotations

import pytest
import torch

from chorus.errors import ChorusError
from chorus.models import ControlNet

diffusers = pytest.importorskip("diffusers")
from test_unet import SD1, SDXL, TOL, inputs, one_thread, pair  # noqa: E402,F401  (one_thread: autouse fixture)

SMALL_COND = (8, 16)  # one stride-2 conv: control images are 2× the latent (the real (16, 32, 96, 256) is 8×)


def randomise_zero_convs(model: torch.nn.Module, seed: int = 5) -> None:
    """Give the zero-initialised convs random weights so the ControlNet is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def controlnet_pair(config: dict, cond_channels=SMALL_COND, **kwargs):
    ref_unet, unet = pair(config)
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=cond_channels, **kwargs)
    randomise_zero_convs(ref)
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=cond_channels, **kwargs)
    ours.load_weights(ref.state_dict())
    return ref_unet.eval(), unet, ref.eval(), ours.eval()


def control_image(batch: int = 2, size: int = 16, seed: int = 9) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name, guess_mode", [("sd1", False), ("sd1", True), ("sdxl", False)])
def test_matches_diffusers_and_drives_the_unet(name, guess_mode):
    config = {"sd1": SD1, "sdxl": SDXL}[name]
    ref_unet, unet, ref, ours = controlnet_pair(config)
    assert set(ours.state_dict()) == set(ref.state_dict())
    args, cond = inputs(config), control_image()
    with torch.no_grad():
        r_down, r_mid = ref(timestep=40, controlnet_cond=cond, conditioning_scale=0.7, guess_mode=guess_mode,
                            return_dict=False, **args)
        down, mid = ours(timestep=40, controlnet_cond=cond, conditioning_scale=0.7, guess_mode=guess_mode, **args)
        assert len(down) == len(r_down) == 6  # conv_in, 2 layers + downsampler, 2 layers
        assert max_diff(down, r_down) < TOL and (mid - r_mid).abs().max().item() < TOL
        expected = ref_unet(timestep=40, down_block_additional_residuals=r_down, mid_block_additional_residual=r_mid,
                            return_dict=False, **args)[0]
        got = unet(timestep=40, down_block_additional_residuals=down, mid_block_additional_residual=mid, **args)
        plain = unet(timestep=40, **args)
    assert (got - expected).abs().max().item() < TOL
    assert (got - plain).abs().max().item() > 1e-3  # the control does something


def test_fresh_controlnet_changes_nothing():
    """Zero convolutions: a ControlNet made from a UNet adds exactly zero to every skip."""
    _, unet = pair(SD1)
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=SMALL_COND).eval()
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        mine, theirs = getattr(controlnet, name).state_dict(), getattr(unet, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    args = inputs(SD1)
    with torch.no_grad():
        down, mid = controlnet(timestep=3, controlnet_cond=control_image(), **args)
        assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))
        with_control = unet(timestep=3, down_block_additional_residuals=down, mid_block_additional_residual=mid, **args)
        assert torch.equal(with_control, unet(timestep=3, **args))


def test_bgr_and_global_pool_match_diffusers():
    ref_unet, unet = pair(SD1)
    config = dict(ControlNet.from_unet(unet, conditioning_embedding_out_channels=SMALL_COND).config_dict(),
                  controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(2)
    ref = diffusers.ControlNetModel(**config).eval()
    randomise_zero_convs(ref)
    ours = ControlNet.from_config(config).eval()
    ours.load_weights(ref.state_dict())
    args, cond = inputs(SD1), control_image()
    with torch.no_grad():
        r_down, r_mid = ref(timestep=7, controlnet_cond=cond, return_dict=False, **args)
        down, mid = ours(timestep=7, controlnet_cond=cond, **args)
    assert down[0].shape[-2:] == (1, 1)
    assert max_diff(down, r_down) < TOL and (mid - r_mid).abs().max().item() < TOL


def test_folders_both_ways(tmp_path):
    _, _, ref, _ = controlnet_pair(SD1)
    args, cond = inputs(SD1), control_image()
    with torch.no_grad():
        r_down, r_mid = ref(timestep=9, controlnet_cond=cond, return_dict=False, **args)
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = ControlNet.from_pretrained(tmp_path / "from_diffusers")
    with torch.no_grad():
        down, mid = ours(timestep=9, controlnet_cond=cond, **args)
    assert max_diff(down, r_down) < TOL and (mid - r_mid).abs().max().item() < TOL
    ours.save_pretrained(tmp_path / "from_chorus")
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "from_chorus").eval()
    with torch.no_grad():
        b_down, b_mid = back(timestep=9, controlnet_cond=cond, return_dict=False, **args)
    assert max_diff(b_down, r_down) < TOL and (b_mid - r_mid).abs().max().item() < TOL


def test_hooks_see_the_controlnet_encoder():
    _, _, _, ours = controlnet_pair(SD1)
    args, cond = inputs(SD1), control_image()
    with torch.no_grad():
        down, mid = ours(timestep=2, controlnet_cond=cond, **args)
        names = set()
        with ours.hooks(lambda name, kind, t: names.add(name)):
            h_down, h_mid = ours(timestep=2, controlnet_cond=cond, **args)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in names and "down_blocks.1.resnets.0" in names
    assert max_diff(h_down, down) < 1e-5 and (h_mid - mid).abs().max().item() < 1e-5


def test_errors():
    _, unet = pair(SD1)
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=SMALL_COND)
    args = inputs(SD1)
    with pytest.raises(ChorusError, match="2× the latent size"):
        controlnet(timestep=1, controlnet_cond=control_image(size=8), **args)
    with pytest.raises(ChorusError, match=r"ControlNet config field class_embed_type"):
        ControlNet.from_config(dict(controlnet.config_dict(), class_embed_type="timestep"))
    with pytest.raises(ChorusError, match=r"ControlNet.*Unexpected 1 keys: add_embedding"):
        controlnet.load_weights({**controlnet.state_dict(), "add_embedding.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ChorusError, match=r"controlnet_.*looks like a Stable Diffusion UNet"):
        controlnet.load_weights(unet.state_dict())
