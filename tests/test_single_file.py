"""Single-file checkpoints (chorus.formats): detection, LDM ↔ diffusers maps, configs from shapes, loading.

Parity is proven against diffusers itself on tiny random models, in both directions:
  * Chorus writes a diffusers folder as one original-layout file; diffusers' own `from_single_file`
    (`config=` the local folder, offline) reads it back to identical tensors and the same latents —
    so the file really is the LDM layout, not only self-consistent;
  * Chorus reads that file (`Pipeline.from_single_file`) and makes the latents the original folder
    makes in diffusers; `chorus export FILE --diffusers DIR` gives a folder diffusers loads.
"""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from chorus.errors import ChorusError
from chorus.formats import keymap as K
from chorus.formats import single_file as SF
from chorus.pipeline import Pipeline

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_ambient_tokenizer(monkeypatch):
    monkeypatch.delenv("CHORUS_TOKENIZER", raising=False)


def _export(folder, tmp_path_factory, name) -> Path:
    out = tmp_path_factory.mktemp(f"file-{name}") / f"{name}.safetensors"
    SF.export_single_file(folder, out)
    return out


@pytest.fixture(scope="module")
def sd_file(sd_folder, tmp_path_factory):
    return _export(sd_folder, tmp_path_factory, "sd")


@pytest.fixture(scope="module")
def sd2v_file(sd2v_folder, tmp_path_factory):
    return _export(sd2v_folder, tmp_path_factory, "sd2v")


@pytest.fixture(scope="module")
def sdxl_file(sdxl_folder, tmp_path_factory):
    return _export(sdxl_folder, tmp_path_factory, "sdxl")


@pytest.fixture(scope="module")
def refiner_file(refiner_folder, tmp_path_factory):
    return _export(refiner_folder, tmp_path_factory, "refiner")


@pytest.fixture(scope="module")
def controlnet_folder(sd_folder, tmp_path_factory):
    return tiny.make_controlnet_folder(tmp_path_factory.mktemp("cn") / "controlnet", sd_folder)


@pytest.fixture(scope="module")
def controlnet4_folder(sd_folder, tmp_path_factory):
    """A ControlNet with the original 4-level hint block (diffusers' reader assumes conv_out at index 14)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(sd_folder / "unet"))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("cn4") / "controlnet"
    cn.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def wide_sdxl_folder(tmp_path_factory):
    """Tiny SDXL whose two text encoders differ in width: diffusers' from_single_file tells SDXL's CLIP-L from
    bigG by width, so the stock tiny SDXL (both 32 wide) cannot go through its pipeline-level reader."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    folder = tmp_path_factory.mktemp("sdxlwide") / "model"
    tok = tiny.write_clip_tokenizer(folder.parent / "tok")
    te1 = tiny.clip_text_model(len(tok), hidden=32, seed=2)
    te2 = tiny.clip_text_model(len(tok), hidden=48, projection=48, seed=3)
    torch.manual_seed(4)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
                                cross_attention_dim=80, attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 48, transformer_layers_per_block=(1, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    pipe = StableDiffusionXLPipeline(vae=tiny.tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(tiny.scheduler_config()))
    pipe.save_pretrained(str(folder))
    return folder


def _eq_state(a, b) -> bool:
    sa, sb = dict(a), dict(b)
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _folder_tensors(folder: Path) -> dict:
    (path,) = sorted(folder.glob("*.safetensors"))
    return load_file(str(path))


def _diffusers(folder_or_pipe, sampler="euler", xl=False):
    import diffusers
    if isinstance(folder_or_pipe, (str, Path)):
        cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(str(folder_or_pipe))
    else:
        pipe = folder_or_pipe
    names = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
    pipe.scheduler = getattr(diffusers, names[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_latents(pipe, **kw):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def _chorus_latents(pipe, sampler="euler", **kw):
    return pipe(sampler=sampler, seed=0, output_type="latent", progress=False, **kw).latents


SD_KW = dict(prompt=["a red circle", "two blue squares"], negative_prompt=["", "green"], num_inference_steps=4,
             guidance_scale=5.0, height=32, width=32)
XL_KW = dict(prompt="a red circle above a blue square", num_inference_steps=4, guidance_scale=5.0, height=32,
             width=32, original_size=(16, 24))


# --------------------------------------------------------------------------------------------------
# Detection
def test_detect_names_each_family(sd_file, sd2v_file, sdxl_file, refiner_file, controlnet_folder, tmp_path):
    cn_file = tmp_path / "cn.safetensors"
    SF.export_single_file(controlnet_folder, cn_file)
    got = {p.stem: SF.detect_file(p) for p in (sd_file, sd2v_file, sdxl_file, refiner_file, cn_file)}
    assert {k: d.family for k, d in got.items()} == {"sd": "sd1", "sd2v": "sd2", "sdxl": "sdxl",
                                                     "refiner": "sdxl_refiner", "cn": "controlnet"}
    assert got["sd2v"].prediction_type == "v_prediction" and got["sd2v"].prediction_source == "modelspec.prediction_type"
    assert got["sd"].prediction_type == "epsilon" and got["cn"].base == "sd1"
    assert got["sd2v"].name == "SD 2.x (v-prediction)"


def test_sd2_prediction_type_argument_metadata_and_diffusers_rule(sd2v_file):
    shapes, meta = SF.read_header(sd2v_file)
    assert SF.detect(shapes, meta, prediction_type="epsilon").prediction_type == "epsilon"
    assert SF.detect(shapes).prediction_type == "v_prediction"                    # no metadata: diffusers' v
    assert SF.detect(shapes, global_step=875000).prediction_type == "epsilon"     # SD 2.0-base's step
    assert SF.detect(shapes, {"modelspec.architecture": "stable-diffusion-v2-512"}).prediction_type == "epsilon"
    with pytest.raises(ChorusError, match="epsilon"):
        SF.detect(shapes, prediction_type="x0")


def test_a_foreign_file_names_the_closest_family(tmp_path):
    path = tmp_path / "gpt.safetensors"
    save_file({"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24), "transformer.wte.weight": torch.randn(50, 8)},
              str(path))
    with pytest.raises(ChorusError) as e:
        Pipeline.from_single_file(path)
    msg = str(e.value)
    assert "closest family is SD 1.x" in msg and "model.diffusion_model." in msg and "first_stage_model." in msg
    assert "transformer" in msg  # its own prefixes are named


def test_a_near_miss_says_what_differs(sd_file, sdxl_file):
    shapes, _ = SF.read_header(sd_file)
    wide = dict(shapes)
    wide["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (514, 48)
    with pytest.raises(ChorusError, match=r"closest family is SD 1\.x.*context width 32 equal to the CLIP width 48"):
        SF.detect(wide)
    no_vae = {k: v for k, v in shapes.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ChorusError, match="closest family is SD 1.x.*the VAE under `first_stage_model.`"):
        SF.detect(no_vae)
    xl, _ = SF.read_header(sdxl_file)
    no_g = {k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(ChorusError, match="closest family is SDXL base.*OpenCLIP bigG"):
        SF.detect(no_g)


def test_a_diffusers_layout_state_dict_is_named_as_such(sd_folder):
    with pytest.raises(ChorusError, match="diffusers' layout"):
        SF.detect(_folder_tensors(sd_folder / "unet"))


# --------------------------------------------------------------------------------------------------
# Keys and configs
@pytest.mark.parametrize("which", ["sd", "sd2v", "sdxl", "refiner"])
def test_the_file_converts_back_to_the_folder_exactly(which, request):
    folder = request.getfixturevalue({"sd": "sd_folder", "sd2v": "sd2v_folder", "sdxl": "sdxl_folder",
                                      "refiner": "refiner_folder"}[which])
    path = request.getfixturevalue(f"{which}_file")
    conv = SF.convert_checkpoint(SF.read_checkpoint(path))
    assert conv.notes == []
    index = json.loads((folder / "model_index.json").read_text())
    expected = {k for k in ("unet", "vae", "text_encoder", "text_encoder_2") if index.get(k) and index[k][0]}
    assert set(conv.components) == expected
    for name, comp in conv.components.items():
        ref = _folder_tensors(folder / name)
        if name.startswith("text_encoder"):
            ref = SF.canonical_text_keys(ref)
        assert _eq_state(comp.state, ref), name
        cfg = json.loads((folder / name / "config.json").read_text())
        for k, v in comp.config.items():
            if k in cfg:
                assert (list(v) if isinstance(v, tuple) else v) == cfg[k], (name, k)


@pytest.mark.parametrize("which", ["sd", "sd2v", "sdxl", "refiner"])
def test_configs_come_from_the_shapes_alone(which, request):
    """Without Chorus's recorded configs, every shape-determined field still matches the folder."""
    folder = request.getfixturevalue({"sd": "sd_folder", "sd2v": "sd2v_folder", "sdxl": "sdxl_folder",
                                      "refiner": "refiner_folder"}[which])
    shapes, _ = SF.read_header(request.getfixturevalue(f"{which}_file"))
    unet = SF.unet_config_from_ldm(SF._strip(shapes, SF.UNET))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    for k in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
              "up_block_types", "cross_attention_dim", "use_linear_projection", "addition_embed_type",
              "projection_class_embeddings_input_dim", "reverse_transformer_layers_per_block"):
        assert unet[k] == cfg[k], k
    n = len(cfg["block_out_channels"])
    per_level = lambda v: v if isinstance(v, list) else [v] * n  # noqa: E731
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]   # the depth of a level without
    assert [d for d, a in zip(per_level(unet["transformer_layers_per_block"]), attn) if a] == \
        [d for d, a in zip(per_level(cfg["transformer_layers_per_block"]), attn) if a]   # attention is a placeholder
    det = SF.detect(shapes)
    pooled = 32 if det.family.startswith("sdxl") else None
    if cfg["addition_time_embed_dim"]:
        assert SF.unet_defaults(det.family, unet, det.prediction_type, pooled)["addition_time_embed_dim"] == 8
    vae = SF.vae_config_from_ldm(SF._strip(shapes, SF.VAE))
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    assert all(vae[k] == vcfg[k] for k in vae)
    # text encoders, with the recorded configs dropped: width, depth, vocabulary, MLP, window
    ckpt = SF.read_checkpoint(request.getfixturevalue(f"{which}_file"))
    for name, kind, prefix in SF.TEXT_ENCODERS[det.family]:
        te, _, _ = SF._convert_text(ckpt.state, shapes, kind, prefix, None, name)
        tcfg = json.loads((folder / name / "config.json").read_text())
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"):
            assert te[k] == tcfg[k], (name, k)


def test_real_size_defaults_follow_diffusers():
    """What shapes cannot tell, for full-size models: heads, sample size, SDXL's 256-wide time ids."""
    sd1 = SF.unet_defaults("sd1", {"block_out_channels": [320, 640, 1280, 1280]}, "epsilon", None)
    assert sd1["attention_head_dim"] == 8 and sd1["sample_size"] == 64
    sd2 = SF.unet_defaults("sd2", {"block_out_channels": [320, 640, 1280, 1280]}, "v_prediction", None)
    assert sd2["attention_head_dim"] == [5, 10, 20, 20] and sd2["sample_size"] == 96 and sd2["upcast_attention"]
    xl = SF.unet_defaults("sdxl", {"block_out_channels": [320, 640, 1280], "addition_embed_type": "text_time",
                                   "projection_class_embeddings_input_dim": 2816}, "epsilon", 1280)
    assert xl["attention_head_dim"] == [5, 10, 20] and xl["addition_time_embed_dim"] == 256
    ref = SF.unet_defaults("sdxl_refiner", {"block_out_channels": [384, 768, 1536, 1536], "addition_embed_type":
                                            "text_time", "projection_class_embeddings_input_dim": 2560}, "epsilon", 1280)
    assert ref["addition_time_embed_dim"] == 256
    assert SF.text_defaults("clip", {"vocab_size": 49408, "hidden_size": 768})["hidden_act"] == "quick_gelu"
    g = SF.text_defaults("openclip", {"vocab_size": 49408, "hidden_size": 1280, "projection_dim": 1280})
    assert g["num_attention_heads"] == 20 and g["pad_token_id"] == 0


CA, DB, UB, CU = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
FULL_SIZE_UNETS = {  # the diffusers configs of the real models (stable-diffusion-v1-5, 2-1, xl-base-1.0, refiner)
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, down_block_types=(CA, CA, CA, DB), up_block_types=(UB, CU, CU, CU),
                sample_size=64),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, down_block_types=(CA, CA, CA, DB),
                up_block_types=(UB, CU, CU, CU), sample_size=96, upcast_attention=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, down_block_types=(DB, CA, CA),
                 up_block_types=(CU, CU, UB), transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128),
    "sdxl_refiner": dict(block_out_channels=(384, 768, 1536, 1536), layers_per_block=2, cross_attention_dim=1280,
                         attention_head_dim=[6, 12, 24, 24], use_linear_projection=True,
                         down_block_types=(DB, CA, CA, DB), up_block_types=(UB, CU, CU, UB),
                         transformer_layers_per_block=4, addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2560, sample_size=128),
}


@pytest.mark.parametrize("family", sorted(FULL_SIZE_UNETS))
def test_full_size_unets_round_trip_through_diffusers_converter(family):
    """On meta tensors (no memory): Chorus's LDM names for a full-size UNet are what diffusers' own LDM reader
    turns back into the same keys and shapes, and the config rebuilt from those shapes plus the family defaults
    is the real model's diffusers config."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from chorus.models.unet import UP_TYPES
    cfg = FULL_SIZE_UNETS[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    state = unet.state_dict()
    layout = K.UNetLayout((2,) * len(cfg["block_out_channels"]), tuple(UP_TYPES[t] for t in cfg["up_block_types"]))
    ldm = K.to_ldm(state, K.unet_rules(state, layout, SF.UNET), "UNet")
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    derived = SF.unet_config_from_ldm(SF._strip({k: tuple(v.shape) for k, v in ldm.items()}, SF.UNET))
    pred = "v_prediction" if family == "sd2" else "epsilon"
    merged = {**SF.unet_defaults(family, derived, pred, 1280 if family.startswith("sdxl") else None), **derived}
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    assert {k: plain(v) for k, v in merged.items()} == {k: plain(unet.config[k]) for k in merged}


def test_full_size_vae_and_text_encoders_round_trip_through_diffusers_converter():
    """SD's VAE, CLIP ViT-L/14, OpenCLIP ViT-H (SD 2.x: 23 of 24 blocks used) and bigG, on meta tensors."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    state = vae.state_dict()
    ldm = K.to_ldm(state, K.vae_rules(state, 4, SF.VAE), "VAE")
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    shapes = SF._strip({k: tuple(v.shape) for k, v in ldm.items()}, SF.VAE)
    assert all(SF.vae_config_from_ldm(shapes)[k] == (list(v) if isinstance(v, tuple) else v)
               for k, v in vae.config.items() if k in SF.vae_config_from_ldm(shapes))

    def clip(cls, **kw):
        cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
        with torch.device("meta"):
            return cls(cfg)

    large = clip(CLIPTextModel, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    canon = SF.canonical_text_keys(large.state_dict())
    ldm = K.to_ldm(canon, K.clip_rules(canon, SF.CLIP_SD1), "CLIP")
    back = convert_ldm_clip_checkpoint(ldm)
    assert set(back) == set(canon)
    for cls, prefix, layers, width, proj in ((CLIPTextModel, SF.OPENCLIP_SD2, 23, 1024, None),
                                             (CLIPTextModelWithProjection, SF.OPENCLIP_XL, 32, 1280, 1280)):
        kw = dict(projection_dim=proj) if proj else {}
        model = clip(cls, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                     num_attention_heads=width // 64, **kw)
        canon = SF.canonical_text_keys(model.state_dict())
        ldm = K.to_ldm(canon, K.openclip_rules(canon, prefix), "OpenCLIP")
        assert ldm[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
        if proj:
            assert ldm[prefix + "text_projection"].shape == (width, proj)
        back = SF.canonical_text_keys(convert_open_clip_checkpoint(model, ldm, prefix=prefix))
        assert set(back) == set(canon) and all(back[k].shape == canon[k].shape for k in canon)


def test_unet_map_numbers_sd15_like_the_original():
    """Spot checks of the full-size SD 1.5 numbering (2 resnets per level, 4 levels)."""
    layout = K.UNetLayout((2, 2, 2, 2), (False, True, True, True))
    assert layout.ldm_key("down_blocks.1.resnets.0.conv1.weight") == "input_blocks.4.0.in_layers.2.weight"
    assert layout.ldm_key("down_blocks.2.downsamplers.0.conv.bias") == "input_blocks.9.0.op.bias"
    assert layout.ldm_key("down_blocks.3.resnets.1.time_emb_proj.weight") == "input_blocks.11.0.emb_layers.1.weight"
    assert layout.ldm_key("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.1.conv.weight"
    assert layout.ldm_key("up_blocks.1.upsamplers.0.conv.weight") == "output_blocks.5.2.conv.weight"
    assert layout.ldm_key("up_blocks.3.attentions.2.proj_out.weight") == "output_blocks.11.1.proj_out.weight"
    assert layout.ldm_key("mid_block.resnets.1.conv_shortcut.weight") == "middle_block.2.skip_connection.weight"
    vae = K.vae_ldm_key("decoder.up_blocks.0.upsamplers.0.conv.weight", 4)
    assert vae == ("decoder.up.3.upsample.conv.weight", "copy")
    assert K.vae_ldm_key("encoder.mid_block.attentions.0.to_out.0.weight", 4) == \
        ("encoder.mid.attn_1.proj_out.weight", "conv1x1")


def test_old_clip_names_without_text_model_load(sd_file, sd_folder, tmp_path):
    """A1111's early SD 1.x files: cond_stage_model.transformer.encoder.* (no text_model. level)."""
    state = load_file(str(sd_file))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "old.safetensors"
    save_file(old, str(path), metadata=SF.read_header(sd_file)[1])  # tiny models: groups etc. as recorded
    conv = SF.convert_checkpoint(SF.read_checkpoint(path))
    ref = SF.canonical_text_keys(_folder_tensors(sd_folder / "text_encoder"))
    assert _eq_state(conv.components["text_encoder"].state, ref) and conv.notes == []


# --------------------------------------------------------------------------------------------------
# Pipelines: Chorus reads the file; diffusers reads the file; diffusers reads Chorus's folder
def test_sd1_chorus_reads_the_file_like_the_folder(sd_file, sd_folder):
    ref = _diffusers_latents(_diffusers(sd_folder), **SD_KW)
    pipe = Pipeline.from_single_file(sd_file, tokenizer=sd_folder)
    torch.testing.assert_close(_chorus_latents(pipe, **SD_KW), ref, **TOL)
    # from_pretrained delegates; the tokenizer from CHORUS_TOKENIZER
    os.environ["CHORUS_TOKENIZER"] = str(sd_folder)
    try:
        again = Pipeline.from_pretrained(str(sd_file))
    finally:
        del os.environ["CHORUS_TOKENIZER"]
    torch.testing.assert_close(_chorus_latents(again, **SD_KW), ref, **TOL)


def test_sd1_diffusers_reads_chorus_file(sd_file, sd_folder):
    from diffusers import StableDiffusionPipeline
    theirs = StableDiffusionPipeline.from_single_file(str(sd_file), config=str(sd_folder), local_files_only=True)
    orig = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    for name in ("unet", "vae", "text_encoder"):
        assert _eq_state(getattr(theirs, name).state_dict(), getattr(orig, name).state_dict()), name
    torch.testing.assert_close(_diffusers_latents(_diffusers(theirs), **SD_KW),
                               _diffusers_latents(_diffusers(orig), **SD_KW), **TOL)


def test_sd1_chorus_folder_from_the_file_loads_in_diffusers(sd_file, sd_folder, tmp_path):
    out = tmp_path / "converted"
    det = SF.export_diffusers(sd_file, out, tokenizer=sd_folder)
    assert det.family == "sd1"
    torch.testing.assert_close(_diffusers_latents(_diffusers(out), **SD_KW),
                               _diffusers_latents(_diffusers(sd_folder), **SD_KW), **TOL)


def test_sd2v_both_directions(sd2v_file, sd2v_folder):
    from diffusers import StableDiffusionPipeline
    kw = dict(prompt="a purple star", num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7, height=32,
              width=32, num_images_per_prompt=2)
    ref = _diffusers_latents(_diffusers(sd2v_folder, "ddim"), **kw)
    ours = Pipeline.from_single_file(sd2v_file, tokenizer=sd2v_folder)
    assert ours.base.prediction_type == "v_prediction"
    torch.testing.assert_close(_chorus_latents(ours, "ddim", **kw), ref, **TOL)
    theirs = StableDiffusionPipeline.from_single_file(str(sd2v_file), config=str(sd2v_folder), local_files_only=True)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(_diffusers_latents(_diffusers(theirs, "ddim"), **kw), ref, **TOL)
    # the OpenCLIP layout: fused q/k/v, and one pass-through block more than diffusers' encoder uses
    shapes, _ = SF.read_header(sd2v_file)
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)
    assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" in shapes
    assert SF.detect(shapes).family == "sd2"


def test_sd2_file_as_epsilon_on_request(sd2v_file, sd2v_folder):
    pipe = Pipeline.from_single_file(sd2v_file, prediction_type="epsilon", tokenizer=sd2v_folder)
    assert pipe.base.prediction_type == "epsilon" and pipe.scheduler_config["prediction_type"] == "epsilon"


def test_sdxl_chorus_reads_the_file_like_the_folder(sdxl_file, sdxl_folder):
    ref = _diffusers_latents(_diffusers(sdxl_folder, xl=True), **XL_KW)
    pipe = Pipeline.from_single_file(sdxl_file, tokenizer=sdxl_folder)
    torch.testing.assert_close(_chorus_latents(pipe, **XL_KW), ref, **TOL)


def test_sdxl_diffusers_reads_chorus_file_components(sdxl_file, sdxl_folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    unet = UNet2DConditionModel.from_single_file(str(sdxl_file), config=str(sdxl_folder), subfolder="unet",
                                                 local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(sdxl_file), config=str(sdxl_folder), subfolder="vae",
                                         local_files_only=True)
    assert _eq_state(unet.state_dict(), UNet2DConditionModel.from_pretrained(str(sdxl_folder / "unet")).state_dict())
    assert _eq_state(vae.state_dict(), AutoencoderKL.from_pretrained(str(sdxl_folder / "vae")).state_dict())


def test_sdxl_both_directions_through_diffusers_pipeline(wide_sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    path = tmp_path / "xl.safetensors"
    SF.export_single_file(wide_sdxl_folder, path)
    ref = _diffusers_latents(_diffusers(wide_sdxl_folder, xl=True), **XL_KW)
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(wide_sdxl_folder), local_files_only=True)
    orig = StableDiffusionXLPipeline.from_pretrained(str(wide_sdxl_folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _eq_state(getattr(theirs, name).state_dict(), getattr(orig, name).state_dict()), name
    torch.testing.assert_close(_diffusers_latents(_diffusers(theirs), **XL_KW), ref, **TOL)
    ours = Pipeline.from_single_file(path, tokenizer=wide_sdxl_folder)
    torch.testing.assert_close(_chorus_latents(ours, **XL_KW), ref, **TOL)


def test_sdxl_refiner_file(refiner_file, refiner_folder):
    from diffusers import UNet2DConditionModel
    kw = dict(prompt="a green triangle", num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    folder = _chorus_latents(Pipeline.from_pretrained(refiner_folder), **kw)
    single = Pipeline.from_single_file(refiner_file, tokenizer=refiner_folder)
    torch.testing.assert_close(_chorus_latents(single, **kw), folder, **TOL)
    unet = UNet2DConditionModel.from_single_file(str(refiner_file), config=str(refiner_folder), subfolder="unet",
                                                 local_files_only=True)
    assert _eq_state(unet.state_dict(),
                     UNet2DConditionModel.from_pretrained(str(refiner_folder / "unet")).state_dict())


def test_sdxl_with_a_single_file_refiner(sdxl_folder, refiner_file, refiner_folder):
    kw = dict(XL_KW, num_inference_steps=5)
    a = Pipeline.from_pretrained(sdxl_folder, refiner=refiner_folder, switch_at=0.6)
    os.environ["CHORUS_TOKENIZER"] = str(refiner_folder)
    try:
        b = Pipeline.from_pretrained(sdxl_folder, refiner=str(refiner_file), switch_at=0.6)
    finally:
        del os.environ["CHORUS_TOKENIZER"]
    torch.testing.assert_close(_chorus_latents(b, **kw), _chorus_latents(a, **kw), **TOL)


# --------------------------------------------------------------------------------------------------
# ControlNet
def _cn_inputs(cond_factor: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    cond = torch.rand(2, 3, 8 * cond_factor, 8 * cond_factor, generator=g)
    return x, torch.tensor([500, 20]), ctx, cond


def test_controlnet_file_matches_diffusers_controlnet(controlnet_folder, tmp_path):
    from diffusers import ControlNetModel
    path = tmp_path / "control_tiny.safetensors"
    SF.export_single_file(controlnet_folder, path)
    shapes, _ = SF.read_header(path)
    assert "control_model.input_hint_block.6.weight" in shapes and "control_model.zero_convs.0.0.weight" in shapes
    assert "control_model.middle_block_out.0.weight" in shapes
    ours = SF.load_controlnet(path)
    ref = ControlNetModel.from_pretrained(str(controlnet_folder)).eval()
    x, t, ctx, cond = _cn_inputs(2)
    with torch.no_grad():
        down, mid = ours(x, t, ctx, cond)
        rdown, rmid = ref(x, t, ctx, controlnet_cond=cond, return_dict=False)
    assert len(down) == len(rdown)
    for a, b in zip(down, rdown):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(mid, rmid, **TOL)


def test_controlnet_both_directions_with_diffusers(controlnet4_folder, tmp_path):
    from diffusers import ControlNetModel
    path = tmp_path / "control_sd15.safetensors"
    SF.export_single_file(controlnet4_folder, path)
    theirs = ControlNetModel.from_single_file(str(path), config=str(controlnet4_folder), local_files_only=True)
    assert _eq_state(theirs.state_dict(), ControlNetModel.from_pretrained(str(controlnet4_folder)).state_dict())
    ours = SF.load_controlnet(path)
    x, t, ctx, cond = _cn_inputs(8)
    with torch.no_grad():
        down, mid = ours(x, t, ctx, cond)
        rdown, rmid = theirs.eval()(x, t, ctx, controlnet_cond=cond, return_dict=False)
    assert len(down) == len(rdown)
    for a, b in zip(down, rdown):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(mid, rmid, **TOL)
    out = tmp_path / "cn_folder"
    assert SF.export_diffusers(path, out).family == "controlnet"
    assert _eq_state(ControlNetModel.from_pretrained(str(out)).state_dict(), theirs.state_dict())


def test_controlnet_variants_load(controlnet_folder, sd_folder, tmp_path):
    """No prefix (thibaud's SD 2.1 files), diffusers' names in one file (most SDXL ControlNets), and a
    ControlNet single file given to a folder pipeline."""
    from diffusers import ControlNetModel
    ref = ControlNetModel.from_pretrained(str(controlnet_folder)).state_dict()
    ldm = tmp_path / "cn.safetensors"
    SF.export_single_file(controlnet_folder, ldm)
    bare = tmp_path / "bare.safetensors"
    save_file({k[len("control_model."):]: v for k, v in load_file(str(ldm)).items()}, str(bare))
    named = tmp_path / "named.safetensors"
    save_file(_folder_tensors(controlnet_folder), str(named))
    for path in (bare, named):
        det = SF.detect_file(path)
        assert det.family == "controlnet" and det.base == "sd1"
        assert _eq_state(SF.load_controlnet(path).state_dict(), ref)
    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
              control_image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    a = Pipeline.from_pretrained(sd_folder, controlnet=controlnet_folder)
    b = Pipeline.from_pretrained(sd_folder, controlnet=str(ldm))
    torch.testing.assert_close(_chorus_latents(b, **kw), _chorus_latents(a, **kw), **TOL)
    with pytest.raises(ChorusError, match="not a whole pipeline"):
        Pipeline.from_single_file(ldm, tokenizer=sd_folder)


# --------------------------------------------------------------------------------------------------
# Safety, tokenizers, CLI
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_malicious_ckpt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "x": _Evil(str(marker))}, f)
    for load in (SF.read_checkpoint, SF.detect_file, lambda p: Pipeline.from_single_file(p)):
        with pytest.raises(ChorusError, match="never unpickles"):
            load(path)
    assert not marker.exists()
    path2 = tmp_path / "model2.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hook": _Evil(str(marker))}, path2)
    with pytest.raises(ChorusError, match="Refusing"):
        SF.read_checkpoint(path2)
    assert not marker.exists()


def test_a_plain_ckpt_loads_and_its_global_step_is_read(sd2v_file, sd2v_folder, tmp_path):
    """A .ckpt of plain tensors loads through weights_only; global_step 875000 (SD 2.0-base) means ε. A pickle
    has no metadata, so the tiny model's head counts and norm groups come from `config=` (as in diffusers)."""
    path = tmp_path / "v2-base.ckpt"
    torch.save({"state_dict": load_file(str(sd2v_file)), "global_step": 875000}, path)
    ckpt = SF.read_checkpoint(path)
    assert ckpt.global_step == 875000 and ckpt.metadata == {}
    assert SF.detect_file(path).prediction_type == "epsilon"
    with pytest.raises(ChorusError, match="norm_num_groups"):  # full-size defaults do not fit a tiny model
        Pipeline.from_single_file(path, tokenizer=sd2v_folder)
    pipe = Pipeline.from_single_file(path, prediction_type="epsilon", config=sd2v_folder)
    assert pipe.base.prediction_type == "epsilon"
    pipe = Pipeline.from_single_file(path, config=sd2v_folder)   # the folder's scheduler says v
    assert pipe.base.prediction_type == "v_prediction"
    kw = dict(prompt="a purple star", num_inference_steps=3, guidance_scale=6.0, height=32, width=32)
    ref = _diffusers_latents(_diffusers(sd2v_folder, "ddim"), **kw)
    torch.testing.assert_close(_chorus_latents(pipe, "ddim", **kw), ref, **TOL)


def test_without_a_tokenizer_the_error_says_what_to_pass(sd_file, monkeypatch):
    monkeypatch.setattr(SF, "_shipped_vocab", lambda: None)
    monkeypatch.setattr(SF, "_open_clip_vocab", lambda: None)
    with pytest.raises(ChorusError) as e:
        Pipeline.from_single_file(sd_file)
    msg = str(e.value)
    assert "no tokenizer" in msg and "--tokenizer DIR" in msg and "CHORUS_TOKENIZER" in msg
    assert "neither transformers nor diffusers ships one" in msg


def test_a_tokenizer_folder_beside_the_file_is_found(sd_file, sd_folder, tmp_path):
    import shutil
    path = tmp_path / "model.safetensors"
    shutil.copy(sd_file, path)
    shutil.copytree(sd_folder / "tokenizer", tmp_path / "tokenizer")
    pipe = Pipeline.from_single_file(path)
    assert len(pipe(prompt="a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                    progress=False, seed=0).latents) == 1


def test_vocab_and_merges_from_openclip_bpe(tmp_path):
    """OpenCLIP's bpe_simple_vocab_16e6.txt.gz → vocab.json + merges.txt a CLIPTokenizer reads."""
    import gzip
    from transformers import CLIPTokenizer
    gz = tmp_path / "bpe.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\nr e\nre d</w>\nc i\n")
    out = SF.clip_tokenizer_files_from_bpe(gz, tmp_path / "tok")
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 512 + 3 + 2 and vocab["red</w>"] == 513 and vocab["<|endoftext|>"] == 516
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    assert tok("red").input_ids == [515, 513, 516]


def test_cli_export_both_ways_and_generate(sd_folder, tmp_path, capsys, monkeypatch):
    from chorus.cli import main
    path = tmp_path / "m.safetensors"
    assert main(["export", str(sd_folder), "--single-file", str(path), "--dtype", "fp16"]) == 0
    assert "SD 1.x" in capsys.readouterr().out
    assert all(v.dtype == torch.float16 for v in load_file(str(path)).values())
    out = tmp_path / "folder"
    assert main(["export", str(path), "--diffusers", str(out), "--tokenizer", str(sd_folder)]) == 0
    assert (out / "model_index.json").is_file() and (out / "tokenizer").is_dir()
    assert main(["export", str(path), "--diffusers", str(out), "--tokenizer", str(sd_folder)]) == 2  # not empty
    assert "not empty" in " ".join(capsys.readouterr().err.split())   # the message is wrapped to the terminal
    monkeypatch.setenv("CHORUS_TOKENIZER", str(sd_folder))
    assert main(["generate", "a red circle", "--model", str(path), "--steps", "2", "--n", "1", "--size", "32x32",
                 "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1
    assert main(["export", str(tmp_path / "nothing.ckpt"), "--diffusers", str(tmp_path / "x")]) == 2
