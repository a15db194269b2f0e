"""The conditioner's one semantics, the eDiff-I ensemble of text encoders, SDXL micro-conditioning with
one text encoder, and growing a trained UNet into one with new conditioning paths."""
import json
import shutil

import numpy as np
import pytest
import torch

from chorus.conditioning import (EMBEDDER_NAMES, Conditioner, NumberEmbedder, embedder_entry,
                                 read_conditioner_spec)
from chorus.errors import ChorusError
from chorus.models import UNet
from chorus.train.grow import grow_unet

BASE = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
            sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=24,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
GROWN = dict(BASE, cross_attention_dim=24 + 40, attention_head_dim=[1, 4],
             down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2,
             addition_embed_type="text_time", addition_time_embed_dim=8,
             projection_class_embeddings_input_dim=40 + 6 * 8)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_grown_unet_starts_as_exactly_the_base_function():
    base = _randomise(UNet.from_config(BASE), 0).eval()
    grown = UNet.from_config(GROWN)
    counts = grow_unet(grown, base.state_dict())
    assert counts["widened"] > 0 and counts["zeroed"] > 0 and counts["new"] > 0
    g = torch.Generator().manual_seed(1)
    x, ctx_old, ctx_new = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 24, generator=g), \
        torch.randn(3, 5, 40, generator=g)
    t = torch.tensor([3, 400, 999])
    added = {"text_embeds": torch.randn(3, 40, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 3)}
    with torch.no_grad():
        want = base(x, t, ctx_old)
        got = grown.eval()(x, t, torch.cat([ctx_old, ctx_new], -1), added_cond_kwargs=added)
    assert torch.equal(got, want)
    # and the new paths are live: a gradient reaches the zero-initialised projections and new columns
    grown.train()
    out = grown(x, t, torch.cat([ctx_old, ctx_new], -1), added_cond_kwargs=added)
    out.square().mean().backward()
    assert grown.add_embedding.linear_2.weight.grad.abs().sum() > 0
    # (inside a new transformer nothing but proj_out has a gradient before proj_out leaves zero; an old
    # cross-attention's new context columns do)
    k = dict(grown.named_parameters())["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    assert k.grad[:, 24:].abs().sum() > 0


def test_grow_refuses_a_smaller_model():
    base = UNet.from_config(GROWN)
    with pytest.raises(ChorusError, match="grow"):
        grow_unet(UNet.from_config(BASE), base.state_dict())


def test_unknown_embedder_lists_the_valid_names():
    with pytest.raises(ChorusError) as e:
        embedder_entry("t5")
    for name in EMBEDDER_NAMES:
        assert name in str(e.value)
    with pytest.raises(ChorusError, match="dropout"):
        embedder_entry({"name": "minilm", "dropout": 1.5})
    with pytest.raises(ChorusError, match="does not know"):
        embedder_entry({"name": "minilm", "drop": 0.1})


def test_dropped_embedder_gets_exactly_the_unconditional_branch():
    """Conditioner(dropout=True) at rate ~1 gives what guidance's unconditional branch gives, for numbers
    trained with dropout (zeros) and without (the values stay, as diffusers' SDXL pipelines keep them)."""
    inputs = {"original_size": [(64, 32), (16, 16)], "crop_top_left": [(3, 4), (0, 1)]}
    cond = Conditioner([NumberEmbedder("original_size", 2, dropout=0.999999), NumberEmbedder("crop_top_left", 2)])
    dropped = cond(inputs, dropout=True, generator=torch.Generator().manual_seed(0))
    uncond = cond.unconditional(inputs)
    assert torch.equal(dropped.time_ids, uncond.time_ids)
    assert torch.equal(uncond.time_ids, torch.tensor([[0., 0, 3, 4], [0, 0, 0, 1]]))
    kept = cond(inputs)
    assert torch.equal(kept.time_ids, torch.tensor([[64., 32, 3, 4], [16, 16, 0, 1]]))


def test_training_conditioner_uses_the_same_rule():
    from chorus.train.config import UNetTrainConfig
    from chorus.train.unet import TrainingConditioner
    cfg = UNetTrainConfig(embedders=["original_size", {"name": "crop_top_left", "dropout": 0.5}])
    cond = Conditioner([NumberEmbedder("original_size", 2), NumberEmbedder("crop_top_left", 2, dropout=0.5)])
    tc = TrainingConditioner(cond, cfg, torch.float32, torch.device("cpu"))
    assert tc.rates == [0.0, 0.5]
    inputs = {"original_size": [(64, 32), (16, 16)], "crop_top_left": [(3, 4), (5, 6)]}
    keep = torch.tensor([[True, True], [True, False]])
    out = tc(inputs, keep).time_ids
    assert torch.equal(out, torch.tensor([[64., 32, 3, 4], [16, 16, 0, 0]]))


def test_ema_reaches_its_configured_decay():
    from chorus.train.unet import ema_decay_at
    assert ema_decay_at(0, 0.999) == 0.0            # the first update copies the weights
    assert ema_decay_at(999, 0.999) == pytest.approx(0.999)
    assert ema_decay_at(3000, 0.999) == 0.999
    assert all(ema_decay_at(n, 0.999) <= ema_decay_at(n + 1, 0.999) for n in range(2000))


def test_timestep_interval_bounds_every_draw():
    from chorus.train.config import UNetTrainConfig
    from chorus.train.unet import step_draws, timestep_range
    assert timestep_range(1000, (0.0, 1.0)) == (0, 1000)
    assert timestep_range(1000, (0.0, 0.2)) == (0, 200)
    d = step_draws(0, 5, 4096, (4, 2, 2), 1000, [0.1], (0.8, 1.0))
    assert d.t.min() >= 800 and d.t.max() <= 999 and d.t.unique().numel() > 150
    for bad in ((0.5, 0.5), (-0.1, 1.0), (0.2, 1.2), (0.1,)):
        with pytest.raises(ChorusError, match="timestep_interval"):
            UNetTrainConfig(timestep_interval=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_caption_policy_ratio_outside_unit_interval_is_refused(bad):
    from chorus.train.config import UNetTrainConfig
    with pytest.raises(ChorusError, match="descriptive_captions"):
        UNetTrainConfig(descriptive_captions=bad)


def test_caption_policy_mixes_at_its_ratio_and_repeats():
    from chorus.train.config import UNetTrainConfig
    from chorus.train.data import Stream, WorldSource
    cfg = UNetTrainConfig(descriptive_captions=0.3, batch_size=50, epoch_size=50)
    src = WorldSource(0, 64, True, 50, descriptive=True)
    stream = Stream(src, cfg, 0, 1)
    shares = []
    for step in range(8):
        examples, _ = stream.micro_batch(step, 0)
        shares.append(np.mean([e.text == e.alt_text for e in examples]))
    assert 0.2 < np.mean(shares) < 0.4
    again, _ = Stream(src, cfg, 0, 1).micro_batch(3, 0)
    first, _ = stream.micro_batch(3, 0)
    assert [e.text for e in again] == [e.text for e in first]


def test_descriptive_captions_are_true_of_the_render():
    """Every visible object's colour and shape word is named, and each relation clause holds for the
    objects' centres (checked here from the renderer's boxes, not with the caption code's own rule)."""
    from chorus.world.captions import TRAIN_NOUNS, TRAIN_RELATIONS, describe_scene
    from chorus.world.render import make_sample
    checked = 0
    for i in range(120):
        s = make_sample(3, i, crop=True)
        text = describe_scene(np.random.default_rng(i), s.objects)
        visible = [o for o in s.objects if o.visible_fraction >= 0.3]
        for o in visible:
            nouns = [w for pair in TRAIN_NOUNS[o.shape] for w in pair]
            assert o.color in text and any(n in text for n in nouns), (text, o)
        if ";" not in text:
            continue
        clause = text.split("; ")[1]
        a_txt, b_txt = clause[len("the "):].split(" is ")[0], clause.split(" the ")[-1]
        rel = next(r for r, words in TRAIN_RELATIONS.items()
                   if any(f" is {w} the " in clause for w in words))
        def find(phrase):
            color, noun = phrase.split(" ", 1)
            shape = next(sh for sh, pairs in TRAIN_NOUNS.items() if any(noun == p[0] for p in pairs))
            matches = [o for o in visible if o.color == color and o.shape == shape]
            assert len(matches) == 1, (text, phrase)   # relations name only unique objects
            return matches[0]
        a, b = find(a_txt), find(b_txt)
        (ax, ay), (bx, by) = a.center, b.center
        assert {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel], text
        checked += 1
    assert checked > 20


# --- a folder whose conditioner only Chorus expresses ---------------------------------------------------
@pytest.fixture(scope="module")
def ensemble_folder(sd_folder, tmp_path_factory):
    """The tiny SD folder grown into a CLIP + MiniLM ensemble with micro-conditioning (random new paths)."""
    from chorus.conditioning import embedder_widths
    folder = tmp_path_factory.mktemp("ens") / "model"
    shutil.copytree(sd_folder, folder)
    entries = [embedder_entry("text"), embedder_entry({"name": "minilm", "max_length": 77}),
               embedder_entry("original_size"), embedder_entry("crop_top_left"), embedder_entry("target_size")]
    (folder / "conditioner.json").write_text(json.dumps({"embedders": entries}))
    base = UNet.from_pretrained(folder / "unet")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    mini = embedder_widths(entries[1])
    cfg.update(cross_attention_dim=cfg["cross_attention_dim"] + mini[0], addition_embed_type="text_time",
               addition_time_embed_dim=8, projection_class_embeddings_input_dim=mini[1] + 6 * 8)
    grown = UNet.from_config(cfg)
    grow_unet(grown, base.state_dict())
    from chorus.train.checkpoint import write_unet
    write_unet(grown, folder / "unet")
    return folder


def test_ensemble_folder_loads_whole_and_samples(ensemble_folder, sd_folder):
    from chorus.pipeline import Pipeline, load_stage
    stage, _ = load_stage(ensemble_folder)
    names = [type(e).__name__ for e in stage.conditioner.embedders]
    assert names == ["TextEmbedder", "MeanPooledTextEmbedder", "NumberEmbedder", "NumberEmbedder", "NumberEmbedder"]
    pipe = Pipeline.from_pretrained(ensemble_folder)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="latent", progress=False,
              seed=0)
    a = pipe("a red circle", **kw).latents
    # the new paths start at zero: the micro-conditioning values cannot change the result yet, and the
    # grown model samples what the SD folder it grew from samples
    b = pipe("a red circle", original_size=(8, 8), crops_coords_top_left=(4, 4), **kw).latents
    ref = Pipeline.from_pretrained(sd_folder)("a red circle", **kw).latents
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_ensemble_folder_with_the_wrong_context_width_is_refused(ensemble_folder, tmp_path):
    from chorus.pipeline import load_stage
    bad = tmp_path / "bad"
    shutil.copytree(ensemble_folder, bad)
    spec = json.loads((bad / "conditioner.json").read_text())
    spec["embedders"] = [e for e in spec["embedders"] if e["name"] != "minilm"]
    (bad / "conditioner.json").write_text(json.dumps(spec))
    with pytest.raises(ChorusError, match="cross_attention_dim"):
        load_stage(bad)
    spec["embedders"][0]["name"] = "t5"
    (bad / "conditioner.json").write_text(json.dumps(spec))
    with pytest.raises(ChorusError, match="Valid names are"):
        read_conditioner_spec(bad)


def test_one_encoder_of_the_ensemble_alone(ensemble_folder):
    """Conditioner.dropped: the dropped encoder's features are its unconditional embedding in both branches of
    guidance (what per-embedder dropout trained), the other encoder's are untouched; the next call is whole."""
    from chorus.pipeline import load_stage, micro_inputs
    stage, _ = load_stage(ensemble_folder)
    cond = stage.conditioner
    inputs = {"prompt": ["a red circle"], **micro_inputs(1, (32, 32))}
    whole, null = cond(inputs), cond.unconditional(inputs, ["blurry"])
    clip = cond.embedders[0].encode(["a red circle"])["context"].shape[-1]
    empty = cond.unconditional(inputs)
    with cond.dropped(["minilm"]):
        only_clip, only_clip_null = cond(inputs), cond.unconditional(inputs, ["blurry"])
    assert torch.equal(only_clip.context[..., :clip], whole.context[..., :clip])
    assert torch.equal(only_clip.context[..., clip:], empty.context[..., clip:])
    assert torch.equal(only_clip_null.context[..., clip:], empty.context[..., clip:])   # the negative is dropped too
    assert torch.equal(only_clip_null.context[..., :clip], null.context[..., :clip])
    assert torch.equal(only_clip.pooled, empty.pooled) and not torch.equal(whole.pooled, empty.pooled)
    with cond.dropped(["text_encoder"]):
        only_lm = cond(inputs)
    assert torch.equal(only_lm.context[..., clip:], whole.context[..., clip:])
    assert torch.equal(only_lm.context[..., :clip], empty.context[..., :clip])
    assert torch.equal(cond(inputs).context, whole.context)
    with pytest.raises(ChorusError, match="minilm"):
        with cond.dropped(["t5"]):
            pass
