"""LoRA files (kohya and diffusers/peft) merged into Chorus pipelines, against diffusers + peft on the
same tiny random models, and against a merge computed here; fuse/unfuse, prompt tags, errors, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import attention_only, kohya_lora, manual_merge, module_shapes, peft_lora, save
from safetensors.torch import save_file

from chorus.errors import ChorusError
from chorus.formats.lora import parse_lora_tags, read_lora
from chorus.pipeline import Pipeline

KW = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, height=32, width=32)


def diffusers_pipe(folder, xl=False):
    import diffusers
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe: Pipeline, **kw) -> torch.Tensor:
    return pipe(sampler="euler", seed=0, output_type="latent", progress=False, **{**KW, **kw}).latents


def theirs(pipe, **kw) -> torch.Tensor:
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **{**KW, **kw}).images


def sd_parts(folder, attention=False):
    """The module shapes of the tiny SD pipeline, read from diffusers' own models."""
    import diffusers
    keep = attention_only if attention else (lambda n: True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    from transformers import CLIPTextModel
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    return module_shapes(unet, keep=keep), clip_names(module_shapes(te, convs=False))


def clip_names(shapes: dict) -> dict:
    """LoRA files name CLIP layers text_model.encoder.… (transformers ≥ 5's CLIPTextModel drops text_model.)."""
    return {(n if n.startswith("text_model.") or n == "text_projection" else "text_model." + n): s
            for n, s in shapes.items()}


@pytest.fixture(scope="module")
def sd_kohya(sd_folder, tmp_path_factory):
    """A kohya LoRA on every Linear/Conv2d of the tiny SD UNet (3×3 LoCon included) and every text-encoder
    Linear, α = 2 at rank 4 (scale ½). One α for all: diffusers 0.42 drops per-layer α of kohya SD 1.x
    attention layers (its alpha_pattern keys keep `processor.to_q_lora.down.weight` and match nothing)."""
    unet, te = sd_parts(sd_folder)
    path = tmp_path_factory.mktemp("lora") / "kohya_sd.safetensors"
    return save(kohya_lora({"lora_unet_": unet, "lora_te_": te}, alpha=2.0, seed=1), path,
                {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})


# --- parity with diffusers + peft ---------------------------------------------------------------------

def test_kohya_sd_matches_diffusers_fused_and_scaled(sd_folder, sd_kohya):
    pytest.importorskip("peft")
    pipe = Pipeline.from_pretrained(sd_folder)
    base = ours(pipe)
    pipe.load_lora(sd_kohya, 0.7)
    mine = ours(pipe)
    ref = diffusers_pipe(sd_folder)
    ref.load_lora_weights(str(sd_kohya.parent), weight_name=sd_kohya.name)
    scaled = theirs(ref, cross_attention_kwargs={"scale": 0.7})
    ref.fuse_lora(lora_scale=0.7)
    fused = theirs(ref)
    assert (mine - base).abs().max() > 0.1              # the LoRA does something
    torch.testing.assert_close(mine, scaled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine, fused, atol=1e-4, rtol=1e-4)


def test_peft_format_with_metadata_alphas_matches_diffusers(sd_folder, tmp_path):
    pytest.importorskip("peft")
    unet, te = sd_parts(sd_folder, attention=True)
    tensors = peft_lora({"unet": unet, "text_encoder": te}, rank=4, seed=2)
    targets = sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in unet})
    te_targets = sorted({n.rsplit(".", 1)[-1] for n in te})
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": targets,
            "unet.alpha_pattern": {"attn2.to_k": 2}, "unet.rank_pattern": {},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 3, "text_encoder.target_modules": te_targets}
    path = save(tensors, tmp_path / "peft.safetensors", {"lora_adapter_metadata": json.dumps(meta)})
    lora = read_lora(path)
    assert lora.format == "diffusers"
    some = lora.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert some.alpha == 2.0 and lora.layers["unet.mid_block.attentions.0.proj_in"].alpha == 8.0
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.load_lora(path, 0.6)
    ref = diffusers_pipe(sd_folder)
    ref.load_lora_weights(str(tmp_path), weight_name=path.name)
    torch.testing.assert_close(ours(pipe), theirs(ref, cross_attention_kwargs={"scale": 0.6}), atol=1e-4, rtol=1e-4)


def test_two_loras_with_weights_match_diffusers_set_adapters(sd_folder, sd_kohya, tmp_path):
    pytest.importorskip("peft")
    unet, te = sd_parts(sd_folder, attention=True)
    second = save(kohya_lora({"lora_unet_": unet, "lora_te_": te}, alpha=4.0, seed=7), tmp_path / "second.safetensors")
    pipe = Pipeline.from_pretrained(sd_folder)
    assert pipe.load_lora(sd_kohya, 0.8) == "kohya_sd"
    assert pipe.load_lora(second, 0.5) == "second"
    ref = diffusers_pipe(sd_folder)
    ref.load_lora_weights(str(sd_kohya.parent), weight_name=sd_kohya.name, adapter_name="a")
    ref.load_lora_weights(str(tmp_path), weight_name=second.name, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    torch.testing.assert_close(ours(pipe), theirs(ref), atol=1e-4, rtol=1e-4)


def ldm_name(layout):
    def rename(name: str) -> str:
        return layout.ldm_key(name + ".weight")[:-len(".weight")]
    return rename


def test_kohya_sdxl_ldm_names_both_text_encoders_match_diffusers(sdxl_folder, tmp_path):
    """sd-scripts writes SDXL UNet names in the LDM layout (lora_unet_input_blocks_…) and lora_te1_/lora_te2_."""
    pytest.importorskip("peft")
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from chorus.formats.keymap import UNetLayout
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sdxl_folder / "unet"))
    keep = lambda n: ".attentions." in n or ".resnets." in n  # noqa: E731
    shapes = module_shapes(unet, keep=keep)
    te1 = clip_names(module_shapes(CLIPTextModel.from_pretrained(str(sdxl_folder / "text_encoder")), convs=False))
    te2 = clip_names(module_shapes(CLIPTextModelWithProjection.from_pretrained(str(sdxl_folder / "text_encoder_2")),
                                   convs=False, keep=lambda n: n != "text_projection"))
    layout = UNetLayout((1, 1), (True, False))
    tensors = kohya_lora({"lora_unet_": shapes}, alpha=2.0, seed=3, names=ldm_name(layout))
    tensors.update(kohya_lora({"lora_te1_": te1, "lora_te2_": te2}, alpha=2.0, seed=4))
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k") for k in tensors)
    path = save(tensors, tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    kw = dict(prompt="a red circle above a blue square")
    pipe = Pipeline.from_pretrained(sdxl_folder)
    base = ours(pipe, **kw)
    pipe.load_lora(path, 0.9)
    mine = ours(pipe, **kw)
    ref = diffusers_pipe(sdxl_folder, xl=True)
    ref.load_lora_weights(str(tmp_path), weight_name=path.name)
    ref.fuse_lora(lora_scale=0.9)
    assert (mine - base).abs().max() > 0.05
    torch.testing.assert_close(mine, theirs(ref, **kw), atol=1e-4, rtol=1e-4)


# --- the merge itself, fuse / unfuse ---------------------------------------------------------------

def test_merge_is_kohyas_formula_and_unfuse_restores_exactly(sd_folder, tmp_path):
    """Per-layer α (some 1, some 2, one missing → α = r), 3×3 LoCon, 1×1 convs, linears, the text encoder."""
    from safetensors.torch import load_file
    unet_shapes, te_shapes = sd_parts(sd_folder)
    alphas = {n: 1.0 for n in list(unet_shapes)[::3]}
    alphas["time_embedding.linear_1"] = None
    sd_kohya = save(kohya_lora({"lora_unet_": unet_shapes, "lora_te_": te_shapes}, alpha=alphas, seed=5),
                    tmp_path / "mixed.safetensors")
    pipe = Pipeline.from_pretrained(sd_folder)
    unet, te = pipe.base.unet, pipe.base.conditioner.embedders[0].encoder
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in te.state_dict().items()}
    pipe.load_lora(sd_kohya, 0.7, text_scale=0.3)
    f = load_file(str(sd_kohya))
    checks = [("down_blocks.0.resnets.0.conv1", 3), ("down_blocks.0.attentions.0.proj_in", 1),
              ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 0), ("up_blocks.0.upsamplers.0.conv", 3),
              ("time_embedding.linear_1", 0)]
    for name, _ in checks:
        k = "lora_unet_" + name.replace(".", "_")
        alpha = float(f[k + ".alpha"]) if k + ".alpha" in f else 4.0
        want = manual_merge(before[name + ".weight"], f[k + ".lora_down.weight"], f[k + ".lora_up.weight"], alpha, 0.7)
        torch.testing.assert_close(unet.state_dict()[name + ".weight"], want, atol=1e-6, rtol=1e-5)
    k = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    fc1 = next(n for n in te_before if n.endswith("encoder.layers.1.mlp.fc1.weight"))
    want = manual_merge(te_before[fc1], f[k + ".lora_down.weight"],
                        f[k + ".lora_up.weight"], float(f[k + ".alpha"]), 0.3)
    torch.testing.assert_close(te.state_dict()[fc1], want, atol=1e-6, rtol=1e-5)
    fused = {k: v.clone() for k, v in unet.state_dict().items()}

    pipe.unfuse_lora()   # bit-exact originals, the LoRA still loaded
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, te_before[k]) for k, v in te.state_dict().items())
    pipe.fuse_lora()     # again from the originals: the same fused weights
    assert all(torch.equal(v, fused[k]) for k, v in unet.state_dict().items())
    pipe.fuse_lora(lora_scale=0.0)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items()) and not pipe.loras.loaded


# --- prompt tags ----------------------------------------------------------------------------------------

def test_parse_tags():
    text, (t,) = parse_lora_tags("a cat, <lora:ink:0.8> sitting")
    assert text == "a cat, sitting" and (t.name, t.text_scale, t.unet_scale) == ("ink", 0.8, 0.8)
    _, (t,) = parse_lora_tags("<lora:ink>")
    assert (t.name, t.text_scale, t.unet_scale) == ("ink", 1.0, 1.0)
    _, (t,) = parse_lora_tags("x <lora:my style:0.5:0.9>")
    assert (t.name, t.text_scale, t.unet_scale) == ("my style", 0.5, 0.9)
    _, (t,) = parse_lora_tags("<lora:a:unet=0.4:te=0>")
    assert (t.text_scale, t.unet_scale) == (0.0, 0.4)
    with pytest.raises(ChorusError, match="not a number"):
        parse_lora_tags("<lora:a:strong>")


def test_prompt_tag_applies_for_one_call(sd_folder, sd_kohya, tmp_path):
    pipe = Pipeline.from_pretrained(sd_folder)
    before = {k: v.clone() for k, v in pipe.base.unet.state_dict().items()}
    plain = ours(pipe)
    pipe.lora_dirs = [sd_kohya.parent]
    out = pipe(sampler="euler", seed=0, output_type="latent", progress=False,
               **{**KW, "prompt": "a red circle <lora:kohya_sd:0.7>"})
    assert any("kohya_sd" in n for n in out.notes)
    assert all(torch.equal(v, before[k]) for k, v in pipe.base.unet.state_dict().items())   # restored after the call
    ref = Pipeline.from_pretrained(sd_folder)
    ref.load_lora(sd_kohya, 0.7)
    torch.testing.assert_close(out.latents, ours(ref), atol=0, rtol=0)   # the same as loading it, tag text removed
    assert not torch.equal(out.latents, plain)
    with pytest.raises(ChorusError, match="no missing.safetensors"):
        pipe(**{**KW, "prompt": "a <lora:missing:1>"}, progress=False)
    with pytest.raises(ChorusError, match="different <lora"):
        pipe(**{**KW, "prompt": ["a <lora:kohya_sd:1>", "b"]}, progress=False)


# --- errors ---------------------------------------------------------------------------------------------

def test_wrong_base_is_a_clear_error_naming_module_and_shapes(sdxl_folder, sd_kohya):
    pipe = Pipeline.from_pretrained(sdxl_folder)
    before = {k: v.clone() for k, v in pipe.base.unet.state_dict().items()}
    with pytest.raises(ChorusError) as e:
        pipe.load_lora(sd_kohya)
    msg = str(e.value)
    assert "kohya_sd.safetensors" in msg and "sd_v1" in msg
    assert "name no module" in msg or "shape" in msg
    assert all(torch.equal(v, before[k]) for k, v in pipe.base.unet.state_dict().items())


def test_shape_mismatch_names_the_module_and_both_shapes(sd_folder, tmp_path):
    g = torch.Generator().manual_seed(0)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {f"{k}.lora_down.weight": torch.randn(4, 640, generator=g),
         f"{k}.lora_up.weight": torch.randn(640, 4, generator=g)}
    path = save(t, tmp_path / "big.safetensors")
    with pytest.raises(ChorusError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q has a "
                                          r"weight of shape \(64, 64\), but the LoRA's update is \(640, 640\)"):
        Pipeline.from_pretrained(sd_folder).load_lora(path)


def test_unknown_module_is_named(sd_folder, tmp_path):
    t = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
         "lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
         "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    path = save(t, tmp_path / "odd.safetensors")
    with pytest.raises(ChorusError, match="lora_unet_down_blocks_5_attentions_0_proj_in"):
        Pipeline.from_pretrained(sd_folder).load_lora(path)


def test_pickles_lycoris_and_broken_files_are_refused(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not opened")
    with pytest.raises(ChorusError, match="never unpickles"):
        read_lora(tmp_path / "x.ckpt")
    (tmp_path / "y.pt").write_bytes(b"")
    with pytest.raises(ChorusError, match="never unpickles"):
        read_lora(tmp_path / "y.pt")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(ChorusError, match="LoHa"):
        read_lora(tmp_path / "loha.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ChorusError, match="lacks its up"):
        read_lora(tmp_path / "half.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2),
               "something.else": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ChorusError, match="something.else"):
        read_lora(tmp_path / "extra.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ChorusError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")


def test_old_diffusers_attention_processor_names(sd_folder, tmp_path):
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
    t = {base + "to_out_lora.down.weight": torch.ones(2, 32) * 0.1,
         base + "to_out_lora.up.weight": torch.ones(32, 2) * 0.1,
         "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.ones(2, 32) * 0.1,
         "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.ones(32, 2) * 0.1}
    path = save(t, tmp_path / "old.safetensors")
    pipe = Pipeline.from_pretrained(sd_folder)
    w = pipe.base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0].weight
    before = w.clone()
    pipe.load_lora(path)
    torch.testing.assert_close(w - before, torch.full_like(w, 0.02))   # α = r: 2 · 0.1 · 0.1
    q = dict(pipe.base.conditioner.embedders[0].encoder.named_modules())
    q = next(m for n, m in q.items() if n.endswith("encoder.layers.0.self_attn.q_proj")).weight
    q_lora = q.clone()
    pipe.unfuse_lora()
    assert torch.equal(w, before)
    torch.testing.assert_close(q_lora - q, torch.full_like(q, 0.02))


# --- the CLI --------------------------------------------------------------------------------------------

def test_generate_with_lora_flag_and_tag(sd_folder, sd_kohya, tmp_path):
    from PIL import Image

    from chorus.cli import main
    from chorus.generate_cli import read_png_settings
    common = ["--model", str(sd_folder), "--steps", "2", "--n", "1", "--size", "32", "--sampler", "euler"]
    assert main(["generate", "a red circle", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["generate", "a red circle", *common, "--lora", f"{sd_kohya}:0.7",
                 "--out", str(tmp_path / "flag")]) == 0
    assert main(["generate", "a red circle <lora:kohya_sd:0.7>", *common, "--lora-dir", str(sd_kohya.parent),
                 "--out", str(tmp_path / "tag")]) == 0
    (plain,), (flag,), (tag,) = (sorted((tmp_path / d).glob("*.png")) for d in ("plain", "flag", "tag"))
    settings = read_png_settings(str(flag))
    assert settings["lora"] == [f"{sd_kohya}:0.7"]
    arr = lambda p: torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB")).copy())  # noqa: E731
    assert not torch.equal(arr(plain), arr(flag))
    assert torch.equal(arr(flag), arr(tag))
    assert main(["generate", "--from-png", str(flag), "--out", str(tmp_path / "again")]) == 0   # the LoRA comes back
    with pytest.raises(ChorusError, match="WEIGHT"):
        from chorus.generate_cli import parse_lora_flag
        parse_lora_flag("x.safetensors:strong")


def test_trained_network_on_sdxl_exports_ldm_names_that_load_back(sdxl_folder, tmp_path):
    """inject_lora → kohya export with sd-scripts' SDXL (LDM) names → Pipeline.load_lora gives the same weights
    as the parametrized UNet, and diffusers reads the file too."""
    from chorus.formats.lora import inject_lora, kohya_metadata, merged_state_dict, save_lora
    from chorus.models import UNet
    unet = UNet.from_pretrained(sdxl_folder / "unet")
    network = inject_lora(unet, rank=2, alpha=1.0, targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.layers.values():
            p.up.copy_(torch.randn(p.up.shape, generator=g) * 0.2)
    tensors = network.kohya_state_dict()
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in tensors)
    path = save_lora(tensors, tmp_path / "xl_trained.safetensors", kohya_metadata(network))
    pipe = Pipeline.from_pretrained(sdxl_folder)
    base = ours(pipe)
    pipe.load_lora(path)
    want = merged_state_dict(unet)
    got = pipe.base.unet.state_dict()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6
    mine = ours(pipe)
    assert (mine - base).abs().max() > 1e-3
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs it; a test-only dependency)
    except ImportError:
        return
    ref = diffusers_pipe(sdxl_folder, xl=True)
    ref.load_lora_weights(str(tmp_path), weight_name=path.name)
    torch.testing.assert_close(mine, theirs(ref), atol=1e-4, rtol=1e-4)


def test_tags_apply_while_unfused_and_load_turns_the_stack_on(sd_folder, sd_kohya, tmp_path):
    pipe = Pipeline.from_pretrained(sd_folder)
    w = pipe.base.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
    original = w.clone()
    pipe.load_lora(sd_kohya, 0.5)
    half = w.clone()
    pipe.unfuse_lora()
    assert torch.equal(w, original)
    pipe.lora_dirs = [sd_kohya.parent]
    seen = []
    pipe("a <lora:kohya_sd:1>", num_inference_steps=1, height=32, width=32, output_type="latent", progress=False,
         callback=lambda *a, **k: seen.append(w.clone()))
    assert seen and not torch.equal(seen[0], original) and not torch.equal(seen[0], half)   # the tag at 1, alone
    assert torch.equal(w, original)                                                         # still unfused after
    other = save(kohya_lora({"lora_unet_": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}},
                            seed=9), tmp_path / "one.safetensors")
    pipe.load_lora(other, 0.0)       # loading turns the stack on again: kohya_sd at 0.5, `one` at 0
    assert torch.equal(w, half)
