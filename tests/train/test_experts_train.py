"""`chorus train --part experts`: experts branched from a shared model on their noise intervals (eDiff-I).

A few steps on the tiny SD folder: each expert's run trains only on its own timesteps, the total budget is
shared, the model folder holds every expert with its interval and samples each interval with its own UNet,
the continuation control (--splits none) is a plain folder, --resume finishes an interrupted ensemble, bad
input is refused."""
from __future__ import annotations

import json

import pytest
import torch

from chorus.cli import main
from chorus.errors import ChorusError
from chorus.experts import read_experts_spec, split_edges, training_interval
from chorus.pipeline import Pipeline
from chorus.train.experts import ExpertsTrainConfig, parse_splits

torch.set_num_threads(1)


def config(base, path, **changes):
    fields = dict(base=str(base), resolution=32, batch_size=2, steps=4, save_every=1, keep_last=2, log_every=1,
                  lr=1e-3, warmup_steps=0, mixed_precision="no", seed=1, epoch_size=16, descriptive_captions=0.0,
                  text_cache_mb=64)
    fields.update(changes)
    path.write_text(json.dumps(fields))
    return path


def train(*args):
    return main(["train", "--no-progress", "--threads", "1", "--part", "experts", *map(str, args)])


@pytest.fixture(scope="module")
def run(sd_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experts_run")
    out = tmp / "run"
    assert train("--config", config(sd_folder, tmp / "c.json"), "--splits", "0.25,0.75", "--out", out) == 0
    return out


def test_interval_arithmetic():
    assert split_edges([0.5]) == [0.0, 0.5, 1.0]
    # sampling runs from t = T (pure noise, fraction 0) down to t = 0: the first expert trains on the top of [0, T)
    assert training_interval(0.0, 0.2) == (0.8, 1.0) and training_interval(0.8, 1.0) == (0.0, 0.2)
    assert parse_splits("0.2,0.8") == (0.2, 0.8) and parse_splits("none") == ()
    with pytest.raises(ChorusError, match="increasing"):
        split_edges([0.6, 0.3])
    with pytest.raises(ChorusError, match="fractions"):
        parse_splits("half")


def test_each_expert_trains_only_on_its_own_timesteps(run):
    spans = {"high": (750, 1000), "middle": (250, 750), "low": (0, 250)}
    for name, (lo, hi) in spans.items():
        records = [json.loads(line) for line in (run / name / "logs" / "train.jsonl").read_text().splitlines()]
        start = next(r for r in records if r.get("event") == "start")
        assert start["timesteps"] == [lo, hi]
        assert json.loads((run / name / "config.json").read_text())["timestep_interval"] == [lo / 1000, hi / 1000]
    # the total budget of 4 steps shared by 3 experts: 2 + 1 + 1
    steps = [json.loads((run / n / "config.json").read_text())["steps"] for n in ("high", "middle", "low")]
    assert steps == [2, 1, 1]


def test_the_model_folder_holds_its_experts_and_samples_each_interval_with_its_own(run, sd_folder, capsys):
    folder = run / "model"
    spec = read_experts_spec(folder)
    assert [(e["name"], e["unet"], e["start"], e["end"]) for e in spec] == [
        ("high", "unet", 0.0, 0.25), ("middle", "unet_middle", 0.25, 0.75), ("low", "unet_low", 0.75, 1.0)]
    pipe = Pipeline.from_pretrained(folder)
    assert [e.name for e in pipe.experts] == ["high", "middle", "low"]
    assert main(["info", str(folder)]) == 0
    assert "experts: high [0, 0.25) → unet, middle [0.25, 0.75) → unet_middle" in capsys.readouterr().out
    unets = [e.model.unet for e in pipe.experts]
    assert all(u is not v for u in unets for v in unets if u is not v) and len({id(u) for u in unets}) == 3
    # a single file holds one UNet: exporting the ensemble is refused with what to do instead
    assert main(["export", str(folder), "--single-file", str(run / "x.safetensors")]) != 0
    assert "ensemble of 3 experts" in " ".join(capsys.readouterr().err.split()) and not (run / "x.safetensors").exists()
    # which UNet is called at which step: 8 Euler steps, 2 in [0, 0.25), 4 in [0.25, 0.75), 2 after
    calls = []
    for name, u in zip(("high", "middle", "low"), unets):
        u.register_forward_hook(lambda m, a, o, name=name: calls.append((name, int(a[1].flatten()[0]))))
    pipe("a red circle", num_inference_steps=8, guidance_scale=1.0, height=32, width=32, sampler="euler", seed=0,
         progress=False, output_type="latent")
    assert [n for n, _ in calls] == ["high"] * 2 + ["middle"] * 4 + ["low"] * 2
    # each expert was trained on the timesteps it is called at
    assert all(t >= 750 for n, t in calls if n == "high") and all(t < 250 for n, t in calls if n == "low")
    # a refiner takes over at switch_at: the experts of [0, 0.5) stay, the middle one cut at 0.5
    with_refiner = Pipeline.from_pretrained(folder, refiner=sd_folder, switch_at=0.5)
    assert [(e.name, e.start, e.end) for e in with_refiner.experts] == [
        ("high", 0.0, 0.25), ("middle", 0.25, 0.5), ("refiner", 0.5, 1.0)]


def test_an_ensemble_of_identical_experts_is_the_single_model(sd_folder, tmp_path):
    """The hand-over itself changes nothing: experts that are all the base UNet give the base's latents
    (a one-step sampler, so no multistep history is cut at the hand-over)."""
    from chorus.train.experts import assemble
    folder = tmp_path / "same"
    experts = [{"name": "high", "start": 0.0, "end": 0.5, "timestep_interval": (0.5, 1.0), "steps": 0},
               {"name": "low", "start": 0.5, "end": 1.0, "timestep_interval": (0.0, 0.5), "steps": 0}]
    assemble([sd_folder, sd_folder], experts, folder)
    kw = dict(prompt="a blue star", num_inference_steps=6, guidance_scale=3.0, height=32, width=32, sampler="euler",
              seed=3, output_type="latent", progress=False)
    two = Pipeline.from_pretrained(folder)
    assert len(two.experts) == 2
    assert torch.equal(two(**kw).latents, Pipeline.from_pretrained(sd_folder)(**kw).latents)


def test_the_continuation_control_is_a_plain_model(sd_folder, tmp_path):
    out = tmp_path / "cont"
    assert train("--config", config(sd_folder, tmp_path / "c.json", steps=2), "--splits", "none", "--out", out) == 0
    assert not (out / "model" / "experts.json").exists()
    assert json.loads((out / "all" / "config.json").read_text())["timestep_interval"] == [0.0, 1.0]
    assert len(Pipeline.from_pretrained(out / "model").experts) == 1


def test_resume_finishes_an_interrupted_ensemble(sd_folder, tmp_path, run):
    import shutil
    out = tmp_path / "again"
    assert train("--config", config(sd_folder, tmp_path / "c.json"), "--splits", "0.25,0.75", "--out", out) == 0
    # interrupted before the last expert exported: its model/ and the ensemble are missing
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "low" / "model")
    assert train("--out", out, "--resume") == 0
    a = Pipeline.from_pretrained(out / "model").experts.experts[2].model.unet.state_dict()
    b = Pipeline.from_pretrained(run / "model").experts.experts[2].model.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(sd_folder, tmp_path, capsys):
    with pytest.raises(ChorusError, match="shared model"):
        ExpertsTrainConfig(splits=(0.5,))
    with pytest.raises(ChorusError, match="cannot be shared"):
        ExpertsTrainConfig(base=str(sd_folder), splits=(0.2, 0.8), steps=2)
    assert train("--config", config(sd_folder, tmp_path / "c.json"), "--splits", "0.7,0.3",
                 "--out", tmp_path / "bad") != 0
    assert "increasing" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_an_expert_may_be_a_whole_pipeline_of_another_architecture(sd_folder, sd2v_folder, tmp_path):
    """experts.json's "folder" entries: an expert with its own UNet architecture, conditioner and prediction type
    (here SD 2.x-style v-prediction beside an SD 1.x-style ε model) over the same latent space."""
    import shutil
    folder = tmp_path / "mixed"
    shutil.copytree(sd_folder, folder)
    shutil.copytree(sd2v_folder, folder / "experts" / "low")
    (folder / "experts.json").write_text(json.dumps({"experts": [
        {"name": "high", "unet": "unet", "start": 0.0, "end": 0.6},
        {"name": "low", "folder": "experts/low", "start": 0.6, "end": 1.0}]}))
    pipe = Pipeline.from_pretrained(folder)
    high, low = (e.model for e in pipe.experts)
    assert (high.prediction_type, low.prediction_type) == ("epsilon", "v_prediction")
    assert high.conditioner is not low.conditioner and high.unet.config != low.unet.config
    out = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0, height=32, width=32, sampler="euler", seed=0,
               progress=False, output_type="latent").latents
    assert torch.isfinite(out).all()
    (folder / "experts.json").write_text(json.dumps({"experts": [
        {"name": "high", "unet": "unet", "start": 0.0, "end": 0.6}, {"name": "low", "unet": "nowhere", "start": 0.6,
                                                                       "end": 1.0}]}))
    with pytest.raises(ChorusError, match="does not exist"):
        Pipeline.from_pretrained(folder)
    (folder / "experts.json").write_text(json.dumps({"experts": [
        {"name": "high", "unet": "unet", "start": 0.0, "end": 0.5}, {"name": "low", "unet": "unet", "start": 0.6,
                                                                      "end": 1.0}]}))
    with pytest.raises(ChorusError, match="cover the schedule"):
        Pipeline.from_pretrained(folder)
