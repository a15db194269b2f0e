"""The text-to-image pipeline against diffusers' pipelines on the same tiny folders."""
import math

import numpy as np
import pytest
import torch

from chorus.errors import ChorusError
from chorus.pipeline import Pipeline

SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def diffusers_pipe(folder, sampler, xl=False, img2img=False):
    import diffusers
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else (
        diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline)
    pipe = cls.from_pretrained(str(folder))
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(folder, sampler, xl=False, **kw):
    ref = diffusers_pipe(folder, sampler, xl)(generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    ours = Pipeline.from_pretrained(folder)(sampler=sampler, generator=torch.Generator().manual_seed(0),
                                           output_type="latent", progress=False, **kw)
    return ref.images, ours.latents


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_sd_matches_diffusers(sd_folder, sampler):
    ref, ours = run_both(sd_folder, sampler, prompt=["a red circle", "two blue squares"], num_inference_steps=6,
                         guidance_scale=5.0, height=32, width=32, negative_prompt=["", "green"])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sd_images_match_diffusers(sd_folder):
    kw = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=4.0, height=32, width=32)
    ref = diffusers_pipe(sd_folder, "euler")(generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    ours = Pipeline.from_pretrained(sd_folder)(sampler="euler", seed=3, output_type="pil", progress=False, **kw).images
    diff = np.abs(np.asarray(ours[0]).astype(int) - (ref[0] * 255).round().astype(int)).max()
    assert diff <= 1


def test_sd2_v_prediction_guidance_rescale_matches(sd2v_folder):
    ref, ours = run_both(sd2v_folder, "ddim", prompt="a purple star", num_inference_steps=5, guidance_scale=6.0,
                         guidance_rescale=0.7, height=32, width=32, num_images_per_prompt=2)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_matches_diffusers(sdxl_folder, sampler):
    kw = dict(prompt="a red circle above a blue square", num_inference_steps=5, guidance_scale=5.0, height=32, width=32)
    ref = diffusers_pipe(sdxl_folder, sampler, xl=True)(generator=torch.Generator().manual_seed(0), output_type="latent",
                                                       original_size=(16, 24), crops_coords_top_left=(4, 2), **kw).images
    ours = Pipeline.from_pretrained(sdxl_folder)(sampler=sampler, seed=0, output_type="latent", progress=False,
                                                original_size=(16, 24), crop_top_left=(4, 2), **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sdxl_base_refiner_ensemble_matches_diffusers(sdxl_folder, refiner_folder):
    kw = dict(prompt="a green heart", num_inference_steps=10, guidance_scale=5.0)
    base = diffusers_pipe(sdxl_folder, "euler", xl=True)
    refiner = diffusers_pipe(refiner_folder, "euler", img2img=True)
    z = base(generator=torch.Generator().manual_seed(0), output_type="latent", denoising_end=0.8,
             height=32, width=32, **kw).images
    ref = refiner(image=z, generator=torch.Generator().manual_seed(0), output_type="latent", denoising_start=0.8, **kw).images
    pipe = Pipeline.from_pretrained(sdxl_folder, refiner=refiner_folder, switch_at=0.8)
    assert [e.name for e in pipe.experts] == ["base", "refiner"]
    ours = pipe(sampler="euler", seed=0, output_type="latent", progress=False, height=32, width=32, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_prompt_embeds_path_matches_diffusers(sd_folder):
    import diffusers
    torch.manual_seed(0)
    emb, neg = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    kw = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32)
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=lat.clone(), output_type="latent", **kw).images
    ours = Pipeline.from_pretrained(sd_folder)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=lat.clone(),
                                              sampler="euler", output_type="latent", progress=False, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_seed_is_reproducible_and_per_image_generators_match_single_runs(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="latent", progress=False,
              sampler="euler_a")
    a = pipe("a red circle", seed=5, **kw).latents
    b = pipe("a red circle", seed=5, **kw).latents
    assert torch.equal(a, b)
    batch = pipe("a red circle", num_images_per_prompt=2,
                 generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **kw).latents
    single = pipe("a red circle", generator=[torch.Generator().manual_seed(6)], **kw).latents
    torch.testing.assert_close(batch[1:], single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[:1], a, atol=1e-4, rtol=1e-4)


def test_long_prompt_reports_what_was_cut(sd_folder):
    """prompt_syntax="plain" (diffusers' reading) truncates and says what was cut; the default (A1111's)
    encodes the whole prompt in several windows and says so (tests/test_prompting.py)."""
    pipe = Pipeline.from_pretrained(sd_folder)
    long = "a red circle " * 10 + "THE END"
    kw = dict(num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="latent", progress=False)
    with pytest.warns(UserWarning, match="cut"):
        out = pipe(long, prompt_syntax="plain", **kw)
    assert any("END" in n.upper() for n in out.notes)
    out = pipe(long, **kw)
    assert any("2 windows" in n for n in out.notes) and not any("cut" in n for n in out.notes)


@pytest.mark.parametrize("kw, match", [
    (dict(height=30, width=32), "multiple"),
    (dict(num_inference_steps=0), "steps"),
    (dict(guidance_scale=math.nan), "finite"),
    (dict(sampler="nope"), "dpmpp_2m"),
])
def test_bad_input_is_a_clear_error(sd_folder, kw, match):
    pipe = Pipeline.from_pretrained(sd_folder)
    args = dict(prompt="x", num_inference_steps=2, height=32, width=32, progress=False)
    args.update(kw)
    with pytest.raises(ChorusError, match=match):
        pipe(**args)


def test_missing_folder_and_component(tmp_path, sd_folder):
    with pytest.raises(ChorusError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nothing")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ChorusError, match="vae"):
        Pipeline.from_pretrained(broken)


@pytest.mark.parametrize("sampler, spacing, karras", [("ddim", "trailing", False), ("ddim", "linspace", False),
                                                      ("dpmpp_2m", "leading", True), ("euler", "linspace", True)])
def test_spacings_and_karras_match_diffusers(sd_folder, sampler, spacing, karras):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    extra = {"use_karras_sigmas": True} if karras else {}
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config, timestep_spacing=spacing,
                                                                         **extra)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a yellow cross", num_inference_steps=7, guidance_scale=4.0, height=32, width=32)
    ref = pipe(generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    ours = Pipeline.from_pretrained(sd_folder)(sampler=sampler, timestep_spacing=spacing, karras=karras, seed=1,
                                              output_type="latent", progress=False, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_img2img_strength_matches_diffusers(sd_folder):
    import diffusers
    from PIL import Image
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a blue square", num_inference_steps=10, guidance_scale=4.0, strength=0.6)
    ref = pipe(image=init, generator=torch.Generator().manual_seed(2), output_type="latent", **kw).images
    ours = Pipeline.from_pretrained(sd_folder)(image=init, sampler="euler", seed=2, height=32, width=32,
                                              output_type="latent", progress=False, **kw).latents
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_prompt_embeds_without_negatives_encode_the_empty_prompt_as_diffusers(sd_folder):
    """SD 1.x: with prompt_embeds and no negative, the unconditional branch is the encoded "" (diffusers'
    encode_prompt), not zeros — so passing a prompt's own embeddings equals passing the prompt."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    kw = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32)
    ref = pipe(prompt_embeds=emb, latents=lat.clone(), output_type="latent", **kw).images
    ours = Pipeline.from_pretrained(sd_folder)
    got = ours(prompt_embeds=emb, latents=lat.clone(), sampler="euler", output_type="latent", progress=False, **kw).latents
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    by_prompt = ours("a red circle", latents=lat.clone(), sampler="euler", output_type="latent", progress=False,
                     **kw).latents
    torch.testing.assert_close(got, by_prompt, atol=1e-5, rtol=1e-5)


def test_img2img_takes_one_init_image_per_prompt(sd_folder):
    """A list of init images is one per prompt (diffusers' convention): the same image twice is that image
    broadcast (to float rounding: the VAE sees a contiguous batch instead of an expanded one); each item reads
    its own image; a wrong count is a clear error."""
    import numpy as np
    from PIL import Image as PILImage
    pipe = Pipeline.from_pretrained(sd_folder)
    rng = np.random.default_rng(0)
    im = PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=4, guidance_scale=3.0, strength=0.5, seed=0, output_type="latent", progress=False)
    one = pipe(["a red circle", "a blue star"], image=im, **kw).latents
    two = pipe(["a red circle", "a blue star"], image=[im, im], **kw).latents
    torch.testing.assert_close(one, two, atol=1e-4, rtol=0)
    other = PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mixed = pipe(["a red circle", "a blue star"], image=[im, other], **kw).latents
    torch.testing.assert_close(mixed[0], one[0], atol=1e-4, rtol=0)
    assert (mixed[1] - one[1]).abs().max() > 1e-2
    with pytest.raises(ChorusError, match="3 init images"):
        pipe(["a", "b"], image=[im, im, im], **kw)
