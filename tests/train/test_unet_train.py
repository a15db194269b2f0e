"""The UNet trainer: its schedule and EMA maths, the data order, conditioning dropout that matches
guidance's unconditional branch, micro-conditioning from metadata, caches, and a run that learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from unet_helpers import TINY_UNET, ema_weights, max_diff, raw_weights, tiny_config

from chorus.errors import ChorusError
from chorus.train.data import Order, WorldSource, conditioner_inputs, local_positions
from chorus.train.unet import (UNetTrainer, ema_decay_at, ema_update, lr_at, step_draws, train_unet,
                               training_noise)

torch.set_num_threads(1)


# --- the mathematics -------------------------------------------------------------------------------

def test_lr_warmup_then_cosine_and_constant():
    cfg = tiny_config("x", lr=1e-3, warmup_steps=10, steps=110, min_lr=1e-5, lr_schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(1e-4)                      # (0 + 1)/10 of the peak
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)                     # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)        # halfway: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = tiny_config("x", lr=1e-3, warmup_steps=0, lr_schedule="constant")
    assert {lr_at(s, const) for s in (0, 5, 1000)} == {1e-3}


def test_ema_update_is_the_convex_combination():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m.detach())
    assert ema_decay_at(0, 0.999) == 0.0 and ema_decay_at(10 ** 6, 0.999) == 0.999


def test_step_draws_are_a_function_of_seed_and_step():
    a = step_draws(3, 7, 8, (4, 2, 2), 1000, [0.1, 0.0])
    b = step_draws(3, 7, 8, (4, 2, 2), 1000, [0.1, 0.0])
    c = step_draws(3, 8, 8, (4, 2, 2), 1000, [0.1, 0.0])
    assert torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.noise, c.noise)
    assert a.keep[1].all()                                             # rate 0 never drops
    many = step_draws(0, 0, 20000, (1, 1, 1), 1000, [0.1])
    assert abs((~many.keep[0]).float().mean().item() - 0.1) < 0.01     # rate 0.1 drops ~10 %
    assert many.t.min() >= 0 and many.t.max() <= 999


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_ranks_and_micro_batches_partition_the_global_batch(world, accum):
    batch, step = 16, 5
    seen = [p for r in range(world) for m in range(accum) for p in local_positions(step, batch, world, r, accum, m)]
    assert sorted(seen) == list(range(step * batch, (step + 1) * batch))


def test_order_is_a_permutation_per_epoch_and_differs_between_epochs():
    order = Order(seed=1, size=50)
    e0 = [order.index(p) for p in range(50)]
    e1 = [order.index(p) for p in range(50, 100)]
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    assert Order(seed=1, size=None).index(12345) == 12345


# --- conditioning ----------------------------------------------------------------------------------

def _trainer(base, tmp_path, **changes) -> UNetTrainer:
    t = UNetTrainer(tiny_config(base, **changes), tmp_path / "run", progress=False)
    t.setup()
    return t


def test_dropped_text_is_exactly_guidances_unconditional_branch(sd_folder, tmp_path):
    t = _trainer(sd_folder, tmp_path, text_dropout=0.5)
    examples = [WorldSource(0, 32, True, 8).get(i) for i in range(4)]
    inputs = conditioner_inputs(examples)
    keep = torch.tensor([[True, False, True, False]])
    cond = t.cond(inputs, keep)
    with torch.no_grad():
        full = t.stage.conditioner(inputs)                      # what sampling uses for the prompt
        empty = t.stage.conditioner.unconditional(inputs)       # and for the unconditional branch (SD: "")
    torch.testing.assert_close(cond.context[0::2], full.context[0::2])
    torch.testing.assert_close(cond.context[1::2], empty.context[1::2])
    assert not torch.allclose(empty.context[1], torch.zeros_like(empty.context[1]))  # "" is not zeros in SD 1.x


def test_micro_conditioning_comes_from_metadata_and_sdxl_style_training_runs(sdxl_folder, tmp_path):
    unet = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], use_linear_projection=True,
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], addition_embed_type="text_time",
                addition_time_embed_dim=8)
    t = _trainer(sdxl_folder, tmp_path, unet=unet, steps=2, micro_dropout=0.0)
    examples = [WorldSource(0, 32, True, 8).get(i) for i in range(3)]
    # the renderer's frames differ from the 32×32 image: the ids must carry the metadata, not the pixels
    assert any(e.original_size != (32, 32) or e.crop_top_left != (0, 0) for e in examples)
    cond = t.cond(conditioner_inputs(examples), torch.ones(len(t.cond.rates), 3, dtype=torch.bool))
    expect = torch.tensor([[*e.original_size, *e.crop_top_left, 32, 32] for e in examples], dtype=torch.float32)
    torch.testing.assert_close(cond.time_ids, expect)
    assert cond.pooled is not None and cond.context.shape[-1] == 64      # two encoders of 32, concatenated
    t.logger.close()
    model = train_unet(tiny_config(sdxl_folder, unet=unet, steps=2), tmp_path / "sdxl", progress=False)
    from chorus.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(model)
    assert pipe.base.unet.config.addition_embed_type == "text_time"
    assert len(pipe("a red circle", num_inference_steps=2, height=32, width=32, seed=0, progress=False).images) == 1


def test_cached_and_uncached_training_agree(sd_folder, tmp_path):
    a = train_unet(tiny_config(sd_folder, steps=3, save_every=3, epoch_size=8), tmp_path / "a", progress=False)
    b = train_unet(tiny_config(sd_folder, steps=3, save_every=3, epoch_size=8, cache_latents=False,
                               cache_text=False), tmp_path / "b", progress=False)
    assert max_diff(raw_weights(a.parent), raw_weights(b.parent)) < 1e-6


def test_latent_cache_renders_and_encodes_each_example_once(sd_folder, tmp_path):
    t = _trainer(sd_folder, tmp_path, epoch_size=8, batch_size=8)
    calls, renders = [], []
    encode, get = t.vae.encode, t.source.get
    t.vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    t.source.get = lambda i: renders.append(i) or get(i)
    for _ in range(3):
        t.train_step()
    assert calls == [8] and len(t.latent_cache) == 8 and sorted(renders) == list(range(8))


# --- a run that learns, and the objective's options ------------------------------------------------

def test_training_lowers_the_loss_on_a_small_set(sd_folder, tmp_path):
    t = _trainer(sd_folder, tmp_path, epoch_size=8, batch_size=8, lr=3e-3, warmup_steps=0, steps=60,
                 lr_schedule="constant", min_snr_gamma=None)
    losses = [t.train_step()["loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


@pytest.mark.parametrize("options", [dict(prediction_type="v_prediction", min_snr_gamma=5.0),
                                     dict(offset_noise=0.1, grad_accum=2, ema_decay=0.0),
                                     dict(mixed_precision="bf16", lr_schedule="constant")])
def test_objective_options_run_and_export(sd_folder, tmp_path, options):
    model = train_unet(tiny_config(sd_folder, steps=2, **options), tmp_path / "run", progress=False)
    import json
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == options.get("prediction_type", "epsilon")
    if options.get("ema_decay", 0.9) == 0:
        assert max_diff(raw_weights(model.parent), ema_weights(model.parent)) == 0


def test_grad_accumulation_matches_one_big_batch(sd_folder, tmp_path):
    a = train_unet(tiny_config(sd_folder, steps=2, save_every=2), tmp_path / "a", progress=False)
    b = train_unet(tiny_config(sd_folder, steps=2, save_every=2, grad_accum=2), tmp_path / "b", progress=False)
    assert max_diff(raw_weights(a.parent), raw_weights(b.parent)) < 2e-5


def test_offset_noise_shifts_each_channel_by_a_constant():
    d = step_draws(0, 0, 4, (4, 3, 3), 1000, [])
    assert torch.equal(training_noise(d, slice(1, 3), 0.0), d.noise[1:3])
    delta = training_noise(d, slice(1, 3), 0.1) - d.noise[1:3]
    torch.testing.assert_close(delta, (0.1 * d.offset[1:3])[:, :, None, None].expand_as(delta))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(sd_folder, tmp_path):
    t = UNetTrainer(tiny_config(sd_folder, steps=6, save_every=2), tmp_path / "run", progress=False)
    t.setup()
    latents = t.latents
    t.latents = lambda ex: latents(ex) * (float("nan") if t.step == 3 else 1.0)
    with pytest.raises(ChorusError, match=r"step 3: the loss became nan.*step-00000002"):
        t._loop()
    t.logger.close()
    from chorus.train.checkpoint import checkpoints
    assert [s for s, _ in checkpoints(tmp_path / "run")] == [2]
    assert all(torch.isfinite(v).all() for v in raw_weights(tmp_path / "run").values())


def test_sample_grid_and_benchmark_score_at_intervals(sd_folder, tmp_path):
    t = _trainer(sd_folder, tmp_path, sample_prompts=("a red circle", "two blue squares"), sample_steps=2,
                 eval_prompts=3)
    grid = t.sample_grid()
    from PIL import Image
    with Image.open(grid) as im:
        assert im.size[1] == 2 * 32 and im.size[0] > 2 * 32          # two rows of two images, captions beside
    record = t.evaluate()
    assert record["event"] == "eval" and record["n_images"] == 3 and 0.0 <= record["overall"] <= 1.0
    assert any(k.startswith("task/") for k in record)
    t.logger.close()
    import json
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    assert events == ["samples", "eval"]


def test_config_refuses_bad_values():
    with pytest.raises(ChorusError, match="prediction_type"):
        tiny_config("x", prediction_type="flow")
    with pytest.raises(ChorusError, match="divisible"):
        from chorus.train.data import check_batch
        check_batch(10, 4, 1)


@pytest.mark.parametrize("embedders", [
    ["text", "original_size", "crop_top_left", "target_size"],                       # one encoder, no pooled vector
    [{"name": "text", "pooled": True}, "original_size", "crop_top_left", "target_size"],
    [{"name": "text", "dropout": 0.3}, {"name": "minilm", "max_length": 77, "dropout": 0.2}],   # eDiff-I's pair
])
def test_a_named_conditioner_trains_exports_and_samples(sd_folder, tmp_path, embedders):
    """Micro-conditioning with a single text encoder, and the CLIP + MiniLM ensemble, from the config's
    `embedders` list: trained, written with conditioner.json, loaded whole by the pipeline."""
    import json
    from chorus.pipeline import Pipeline
    cfg = tiny_config(sd_folder, embedders=embedders, steps=2)
    model = train_unet(cfg, tmp_path / "run", progress=False)
    spec = json.loads((model / "conditioner.json").read_text())["embedders"]
    assert [e["name"] for e in spec] == [e if isinstance(e, str) else e["name"] for e in embedders]
    pipe = Pipeline.from_pretrained(model)
    rates = [e.dropout for e in pipe.base.conditioner.embedders]
    assert rates == [e["dropout"] for e in spec]
    micro = any(e == "original_size" for e in embedders)
    assert (pipe.base.unet.config.addition_embed_type == "text_time") == micro
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, seed=0, progress=False,
               original_size=(16, 16), crops_coords_top_left=(2, 2))
    assert len(out.images) == 1


def test_normalised_latents_are_folded_into_the_parts_vae(sd_folder, tmp_path):
    """`normalise_latents`: the run's VAE gives zero-mean, unit-std latents per channel on its training
    images (scaling_factor 1), decodes as before, and the base folder's VAE is untouched."""
    import json
    from chorus.models import VAE
    before = (sd_folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    t = _trainer(sd_folder, tmp_path, normalise_latents=64, epoch_size=64)
    vae_cfg = json.loads((t.parts / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == 1.0 and not vae_cfg.get("shift_factor")
    stats = json.loads((t.parts / "vae" / "latent_normalisation.json").read_text())
    assert stats["images"] == 64
    z = t.latents([t.source.get(i) for i in range(64)])
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    original = VAE.from_pretrained(sd_folder / "vae").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = original.decode(original.encode(x).mode())
        b = t.vae.decode(t.vae.encode(x).mode())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (sd_folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    t.logger.close()


def test_a_recipe_trains_its_stages_in_order_each_on_the_last(sd_folder, tmp_path):
    """RecipeConfig.stages: stage 2 is trained on stage 1's model (grown here into the CLIP + MiniLM
    ensemble with micro-conditioning); `resume` does not train a finished stage again."""
    from chorus.train.config import RecipeConfig, to_dict
    from chorus.train.recipe import run_recipe
    grown = dict(TINY_UNET_GROWN)
    stage2 = {k: v for k, v in to_dict(tiny_config(sd_folder, steps=2)).items() if k != "base"}
    stage2.update(init_from_base=True, unet=grown, prediction_type="v_prediction",
                  embedders=["text", {"name": "minilm", "max_length": 77}, "original_size", "crop_top_left",
                             "target_size"])
    recipe = RecipeConfig(unet=tiny_config(sd_folder, steps=2), stages=[stage2])
    model = run_recipe(recipe, tmp_path / "r", parts=("unet",), progress=False)
    assert model == tmp_path / "r" / "stage-2" / "model"
    import json
    cfg = json.loads((tmp_path / "r" / "stage-2" / "config.json").read_text())
    assert cfg["base"] == str((tmp_path / "r" / "model").resolve())
    assert (model / "conditioner.json").is_file()
    stamp = (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert run_recipe(recipe, tmp_path / "r", parts=("unet",), progress=False, resume=True) == model
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


TINY_UNET_GROWN = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])


@pytest.mark.parametrize("change, match", [
    ({"unet": dict(TINY_UNET, cross_attention_dim=48)}, "cross_attention_dim"),
    ({"embedders": ["text", "t5"]}, "Valid names are"),
    ({"descriptive_captions": 2.0}, "descriptive_captions"),
])
def test_a_conditioner_that_does_not_fit_is_refused_and_nothing_is_written(sd_folder, tmp_path, change, match):
    out = tmp_path / "run"
    with pytest.raises(ChorusError, match=match):
        train_unet(tiny_config(sd_folder, **change), out, progress=False)
    assert not out.exists()
