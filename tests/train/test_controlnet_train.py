"""`chorus train --part controlnet`: a few steps on the tiny SD folder with world conditions; the ControlNet
it writes loads and steers, the base UNet is untouched, probes are logged, --resume is exact, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chorus.cli import main
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline

torch.set_num_threads(1)


def config(base, path, **changes):
    fields = dict(base=str(base), resolution=32, batch_size=4, steps=4, save_every=2, keep_last=3, log_every=1,
                  lr=1e-3, mixed_precision="no", seed=1, probe_every=2, probe_items=3, probe_steps=2,
                  condition="layout")
    fields.update(changes)
    path.write_text(json.dumps(fields))
    return path


def train(*args):
    return main(["train", "--no-progress", "--threads", "1", "--part", "controlnet", *map(str, args)])


@pytest.fixture(scope="module")
def run(sd_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn_run")
    out = tmp / "run"
    assert train("--config", config(sd_folder, tmp / "c.json"), "--out", out) == 0
    return out


def test_writes_a_controlnet_that_steers_the_base(run, sd_folder):
    assert (run / "controlnet" / "config.json").is_file()
    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=4.0, height=32, width=32, sampler="euler",
              seed=0, output_type="latent", progress=False)
    layout = Image.new("RGB", (32, 32))
    layout.paste((230, 25, 75), (4, 4, 20, 20))
    steered = Pipeline.from_pretrained(sd_folder, controlnet=run / "controlnet")(control_image=layout, **kw).latents
    plain = Pipeline.from_pretrained(sd_folder)(**kw).latents
    assert (steered - plain).abs().max() > 1e-4


def test_checkpoints_hold_the_frozen_base_and_the_controlnet(run, sd_folder):
    ck = run / "checkpoints" / "step-00000004"
    assert (ck / "controlnet" / "config.json").is_file() and (ck / "trainer" / "controlnet.safetensors").is_file()
    base = load_file(str(sd_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    kept = load_file(str(ck / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(base[k].float(), kept[k].float()) for k in base)     # the base never trains
    state = json.loads((ck / "trainer" / "state.json").read_text())
    assert state["component"] == "controlnet"


def test_probes_log_condition_fidelity_beside_the_loss(run):
    log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    probes = [r for r in log if r.get("event") == "probe"]
    assert [p["step"] for p in probes] == [1, 2, 4]
    assert all(0.0 <= p["mean_iou"] <= 1.0 and p["items"] == 3 for p in probes)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_resume_is_exact(sd_folder, tmp_path, run):
    out = tmp_path / "half"
    assert train("--config", config(sd_folder, tmp_path / "c.json", steps=2), "--out", out) == 0
    assert train("--out", out, "--resume", "--steps", "4") == 0
    a = load_file(str(out / "checkpoints" / "step-00000004" / "trainer" / "controlnet.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-00000004" / "trainer" / "controlnet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_dropout_drops_every_text_embedder_of_an_example_together(sd_folder, tmp_path):
    from chorus.train.controlnet import ControlNetTrainConfig, ControlNetTrainer
    from chorus.train.core import StepDraws
    cfg = ControlNetTrainConfig(base=str(sd_folder), resolution=32)
    assert cfg.text_dropout == 0.5 and cfg.micro_dropout == 0.0
    trainer = ControlNetTrainer(cfg, tmp_path / "x")

    class Stage:  # two text embedders and a number embedder
        from chorus.conditioning import TextEmbedder
        conditioner = type("C", (), {"embedders": [object.__new__(TextEmbedder), object(),
                                                   object.__new__(TextEmbedder)]})()
    trainer.stage = Stage()
    keep = torch.tensor([[True, False, True, False], [True, True, False, False], [False, True, False, True]])
    out = trainer.adjust_draws(StepDraws(None, None, None, keep)).keep
    assert torch.equal(out[2], keep[0]) and torch.equal(out[1], keep[1]) and torch.equal(out[0], keep[0])


def test_bad_input(sd_folder, tmp_path, capsys):
    assert train("--condition", "layout", "--out", tmp_path / "o") == 2
    assert "needs a frozen base" in capsys.readouterr().err
    assert train("--base", sd_folder, "--data", tmp_path, "--out", tmp_path / "o") == 2
    assert "renders its conditions" in capsys.readouterr().err
    with pytest.raises(ChorusError, match="condition must be one of"):
        from chorus.train.controlnet import ControlNetTrainConfig
        ControlNetTrainConfig(base=str(sd_folder), condition="depth")
    assert not (tmp_path / "o").exists()


def test_world_conditions_render_for_each_kind():
    from chorus.world.conditions import condition_image
    from chorus.world.render import make_sample
    s = make_sample(0, 1, size=32, with_instances=True)
    for kind in ("canny", "layout", "boxes"):
        im = condition_image(s, kind)
        assert im.shape == (32, 32, 3) and im.dtype == np.uint8 and im.max() > 0
