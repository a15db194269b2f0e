"""`chorus train --part refiner`: SDXL's refiner as one expert of the base (the lowest-noise interval, unframed
scenes, the aesthetic-score time id as the world's quality score); it starts as exactly the base, trains on
its own timesteps only, and loads as `--refiner` (hand-over) and as a model of its own (SDEdit refinement)."""
from __future__ import annotations

import json

import pytest
import torch

from chorus.cli import main
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline, micro_inputs
from chorus.train.data import quality_score
from chorus.train.experts import RefinerTrainConfig

torch.set_num_threads(1)

EMBEDDERS = ["text", "original_size", "crop_top_left", "target_size"]


@pytest.fixture(scope="module")
def run(sd_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refiner_run")
    cfg = dict(base=str(sd_folder), embedders=EMBEDDERS, resolution=32, batch_size=2, steps=3, save_every=1,
               keep_last=2, log_every=1, lr=1e-3, warmup_steps=0, seed=1, epoch_size=16, descriptive_captions=0.0,
               text_cache_mb=64)
    (tmp / "c.json").write_text(json.dumps(cfg))
    out = tmp / "run"
    assert main(["train", "--no-progress", "--threads", "1", "--part", "refiner", "--config", str(tmp / "c.json"),
                 "--out", str(out)]) == 0
    return out


def test_quality_score_is_the_native_resolution_on_sdxls_scale():
    assert quality_score((16, 16)) == 0.0 and quality_score((128, 200)) == 10.0 and quality_score((512, 512)) == 10.0
    assert abs(quality_score((64, 64)) - 20 / 3) < 1e-9 and quality_score((8, 8)) == 0.0


def test_the_refiner_trains_on_the_lowest_noise_only_with_the_quality_score(run):
    records = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert next(r for r in records if r.get("event") == "start")["timesteps"] == [0, 200]
    config = json.loads((run / "config.json").read_text())
    assert config["world_crop"] is False and config["timestep_interval"] == [0.0, 0.2]
    spec = json.loads((run / "model" / "conditioner.json").read_text())["embedders"]
    assert [e["name"] for e in spec] == EMBEDDERS + ["aesthetic_score"]
    assert json.loads((run / "model" / "refiner.json").read_text())["switch_at"] == 0.8


def test_the_refiner_starts_as_exactly_the_base(run, sd_folder):
    """parts/unet is the refiner before its first step: the base's weights grown by the added embedding
    of sizes and score, whose output layer is zero — the base's function for any score."""
    from chorus.models import UNet
    grown, base = UNet.from_pretrained(run / "parts" / "unet"), UNet.from_pretrained(sd_folder / "unet")
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 150])
    ctx = torch.randn(2, 7, base.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32, 9.0], [16, 16, 4, 4, 32, 32, 1.0]])
    with torch.no_grad():
        want = base(x, t, ctx)
        got = grown(x, t, ctx, added_cond_kwargs={"text_embeds": torch.zeros(2, 0), "time_ids": ids})
    assert torch.allclose(got, want, atol=1e-6)


def test_it_refines_by_hand_over_and_by_sdedit(run, sd_folder):
    kw = dict(prompt="a red circle", num_inference_steps=10, guidance_scale=3.0, height=32, width=32, seed=0,
              sampler="euler", progress=False)
    pipe = Pipeline.from_pretrained(sd_folder, refiner=run / "model", switch_at=0.8)
    assert [(e.name, e.start, e.end) for e in pipe.experts] == [("base", 0.0, 0.8), ("refiner", 0.8, 1.0)]
    # the refiner reads its score: the positive branch 6, the negative 2.5 (diffusers' defaults)
    refiner = pipe.experts.experts[1].model
    seen = []
    handle = refiner.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["added_cond_kwargs"]["time_ids"][:, -1].tolist()), with_kwargs=True)
    handed = pipe(**kw)
    handle.remove()
    assert seen and all(s == [2.5, 6.0] for s in seen) and len(seen) == 2
    plain = Pipeline.from_pretrained(sd_folder)(**kw)
    assert handed.images[0].size == (32, 32) and (handed.latents - plain.latents).abs().max() > 0
    sdedit = Pipeline.from_pretrained(run / "model")(image=plain.images[0], strength=0.3, **kw)
    assert sdedit.images[0].size == (32, 32)


def test_bad_input(sd_folder):
    with pytest.raises(ChorusError, match="branched from the base"):
        RefinerTrainConfig()
    with pytest.raises(ChorusError, match="switch_at"):
        RefinerTrainConfig(base=str(sd_folder), embedders=EMBEDDERS, switch_at=1.0)
    with pytest.raises(ChorusError, match="conditioner.json"):
        RefinerTrainConfig(base=str(sd_folder))
    assert micro_inputs(1, (32, 32))["aesthetic_score"] == [6.0]


def test_the_command_line_refines_both_ways(run, sd_folder, tmp_path):
    out = tmp_path / "png"
    assert main(["generate", "a red circle", "--model", str(sd_folder), "--refiner", str(run / "model"), "--steps", "5",
                 "--n", "1", "--size", "32x32", "--out", str(out)]) == 0
    first = sorted(out.glob("*.png"))[0]
    assert main(["edit", "a red circle", "--model", str(run / "model"), "--method", "sdedit", "--strength", "0.2",
                 "--image", str(first), "--steps", "10", "--out", str(tmp_path / "refined")]) == 0
    assert len(list((tmp_path / "refined").glob("*.png"))) == 1
