"""ControlNet as a control of the UNet call, against diffusers' ControlNet pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image

from chorus.errors import ChorusError
from chorus.pipeline import Pipeline


@pytest.fixture(scope="module")
def cn_folder(sd_folder, tmp_path_factory):
    import tiny
    return tiny.make_controlnet_folder(tmp_path_factory.mktemp("cn") / "controlnet", sd_folder)


def edge_image():
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[8:24, 8] = a[8:24, 23] = a[8, 8:24] = a[23, 8:24] = 255
    return Image.fromarray(a)


def test_controlnet_pipeline_matches_diffusers(sd_folder, cn_folder):
    import diffusers
    ref_pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(sd_folder), controlnet=diffusers.ControlNetModel.from_pretrained(str(cn_folder)),
        safety_checker=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red square", "a blue circle"], num_inference_steps=5, guidance_scale=4.0, height=32, width=32,
              controlnet_conditioning_scale=0.7)
    ref = ref_pipe(image=edge_image(), generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    pipe = Pipeline.from_pretrained(sd_folder, controlnet=cn_folder)
    ours = pipe(control_image=edge_image(), sampler="euler", seed=0, output_type="latent", progress=False, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    plain = Pipeline.from_pretrained(sd_folder)(sampler="euler", seed=0, output_type="latent", progress=False,
                                               **{k: v for k, v in kw.items() if k != "controlnet_conditioning_scale"})
    assert (plain.latents - ours).abs().max() > 1e-3  # the control really steers


def test_zero_initialised_controlnet_changes_nothing(sd_folder, tmp_path):
    from chorus.models import ControlNet, UNet
    unet = UNet.from_pretrained(sd_folder / "unet")
    ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(tmp_path / "cn")
    kw = dict(prompt="a red square", num_inference_steps=3, guidance_scale=4.0, height=32, width=32, sampler="euler",
              seed=0, output_type="latent", progress=False)
    with_cn = Pipeline.from_pretrained(sd_folder, controlnet=tmp_path / "cn")(control_image=edge_image(), **kw).latents
    without = Pipeline.from_pretrained(sd_folder)(**kw).latents
    torch.testing.assert_close(with_cn, without, atol=1e-6, rtol=0)


def test_missing_control_image_is_a_clear_error(sd_folder, cn_folder):
    pipe = Pipeline.from_pretrained(sd_folder, controlnet=cn_folder)
    with pytest.raises(ChorusError, match="control_image"):
        pipe("x", num_inference_steps=1, height=32, width=32, progress=False)


def test_guess_mode_pipeline_matches_diffusers(sd_folder, cn_folder):
    """Guess mode: the control on the conditional half only, ramped — diffusers' pipeline(guess_mode=True)."""
    import diffusers
    ref_pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(sd_folder), controlnet=diffusers.ControlNetModel.from_pretrained(str(cn_folder)),
        safety_checker=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red square", num_inference_steps=4, guidance_scale=4.0, height=32, width=32)
    ref = ref_pipe(image=edge_image(), generator=torch.Generator().manual_seed(0), output_type="latent",
                   guess_mode=True, **kw).images
    pipe = Pipeline.from_pretrained(sd_folder, controlnet=cn_folder)
    ours = pipe(control_image=edge_image(), sampler="euler", seed=0, output_type="latent", progress=False,
                guess_mode=True, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_controlnet_of_another_base_names_the_fields_that_differ(sd_folder, sdxl_folder, tmp_path):
    from chorus.models import ControlNet, UNet
    ControlNet.from_unet(UNet.from_pretrained(sdxl_folder / "unet"), (8, 16)).save_pretrained(tmp_path / "cn")
    pipe = Pipeline.from_pretrained(sd_folder, controlnet=tmp_path / "cn")
    with pytest.raises(ChorusError, match="different base model.*cross_attention_dim"):
        pipe("x", control_image=edge_image(), num_inference_steps=1, height=32, width=32, progress=False)


def test_control_image_that_cannot_be_brought_to_the_output_size(sd_folder, cn_folder):
    pipe = Pipeline.from_pretrained(sd_folder, controlnet=cn_folder)
    wide = Image.new("RGB", (64, 32))
    with pytest.raises(ChorusError, match="aspect ratios differ"):
        pipe("x", control_image=wide, num_inference_steps=1, height=32, width=32, progress=False)


def test_hooks_compose_and_each_module_gets_its_own_back(sd_folder):
    from chorus.models import UNet
    unet = UNet.from_pretrained(sd_folder / "unet")
    calls = []
    first = lambda name, kind, t: calls.append(("a", kind)) or t * 2  # noqa: E731
    second = lambda name, kind, t: calls.append(("b", kind)) or t + 1  # noqa: E731
    resnet = unet.up_blocks[0].resnets[0]
    x = torch.randn(1, resnet.norm1.num_channels, 4, 4)
    plain = resnet(x)
    with unet.hooks(first, names=lambda n: n == "up_blocks.0.resnets.0"):
        with unet.hooks(second, names=lambda n: n == "up_blocks.0.resnets.0"):
            both = resnet(x)
        assert resnet.hook is first
        one = resnet(x)
    assert "hook" not in resnet.__dict__
    torch.testing.assert_close(resnet(x), plain)
    assert calls[:4] == [("a", "resnet_branch"), ("b", "resnet_branch"), ("a", "resnet"), ("b", "resnet")]
    assert not torch.allclose(both, one)
