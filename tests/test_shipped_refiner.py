"""The shipped world refiner (weights/refiner, trained by `chorus train --part refiner --base default`): found by its
name, it takes the last 20 % of the shipped model's schedule with its own conditioning (the aesthetic-score time id,
the world's quality score), and refines both ways from the command line."""
from __future__ import annotations

import json

import torch

from chorus.cli import main
from chorus.paths import shipped_weights
from chorus.pipeline import Pipeline

torch.set_num_threads(1)


def test_default_refiner_is_an_expert_of_the_default_model():
    pipe = Pipeline.from_pretrained("default", refiner="default-refiner")
    assert [(e.name, e.start, e.end) for e in pipe.experts] == [("base", 0.0, 0.8), ("refiner", 0.8, 1.0)]
    base, refiner = (e.model for e in pipe.experts)
    names = [getattr(e, "input_key", None) for e in refiner.conditioner.embedders]
    assert "aesthetic_score" in names and "aesthetic_score" not in [e.input_key for e in base.conditioner.embedders]
    record = json.loads((shipped_weights("refiner") / "refiner.json").read_text())
    assert record["trained_timesteps"] == [0.0, 0.2] and record["switch_at"] == 0.8
    # it was trained: its UNet is not the base's (the grown added embedding aside)
    b, r = base.unet.state_dict(), refiner.unet.state_dict()
    shared = [k for k in b if k in r and b[k].shape == r[k].shape]
    assert len(shared) > 0.9 * len(b) and any(not torch.equal(b[k], r[k]) for k in shared)
    out = pipe("a red circle", num_inference_steps=20, seed=0, progress=False)
    assert out.images[0].size == (64, 64)


def test_the_shipped_model_by_name_is_a_refiner_too():
    """`refiner="default"`: the shipped model itself as the expert of the last steps (the hand-over alone, the
    refiner study's control)."""
    pipe = Pipeline.from_pretrained("default", refiner="default", switch_at=0.8)
    assert [e.name for e in pipe.experts] == ["base", "refiner"]


def test_cli_refines_by_name_both_ways(tmp_path):
    assert main(["generate", "a blue star", "--refiner", "default-refiner", "--n", "1", "--steps", "10",
                 "--out", str(tmp_path / "a")]) == 0
    first = sorted((tmp_path / "a").glob("*.png"))[0]
    assert main(["edit", "a blue star", "--model", "default-refiner", "--method", "sdedit", "--strength", "0.2",
                 "--image", str(first), "--steps", "10", "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "b").glob("*.png"))) == 1
