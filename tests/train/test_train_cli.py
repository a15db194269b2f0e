"""`chorus train` from the command line: configs and presets, bad input (exit 2, one paragraph), a data folder
with broken samples, and output folders that `chorus generate` and diffusers load."""
from __future__ import annotations

import json

import pytest
import torch
from unet_helpers import raw_weights, tiny_config, write_config

from chorus.cli import main
from chorus.train.config import PRESETS, RecipeConfig, UNetTrainConfig, load_config, to_dict

torch.set_num_threads(1)


def train(*args):
    return main(["train", "--no-progress", "--threads", "1", *map(str, args)])


def error_text(capsys) -> str:
    """stderr as one line (the CLI wraps its one-paragraph message)."""
    return " ".join(capsys.readouterr().err.split())


def test_unknown_config_fields_list_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 3, "learning_rate": 0.1}))
    assert train("--config", bad, "--out", tmp_path / "o") == 2
    err = error_text(capsys)
    assert err.startswith("error:") and "learning_rate" in err and "Valid fields are" in err and " lr," in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_bad_recipe_and_preset_names(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"unet": {"stepz": 1}, "vae": {}}))
    assert train("--config", tmp_path / "r.json") == 2
    assert "stepz" in error_text(capsys)
    assert train("--preset", "huge") == 2
    assert "tiny, default" in error_text(capsys)
    assert train("--preset", "tiny", "--config", tmp_path / "r.json") == 2
    assert "either --preset or --config" in error_text(capsys)


def test_printed_config_loads_back_identically(capsys):
    assert train("--preset", "tiny", "--print-config", "--steps", "7", "--seed", "3") == 0
    printed = json.loads(capsys.readouterr().out)
    recipe = load_config(RecipeConfig, printed)
    assert recipe.unet.steps == 7 and recipe.unet.seed == 3 and recipe.vae["seed"] == 3
    assert to_dict(recipe.unet) == to_dict(load_config(UNetTrainConfig, to_dict(recipe.unet)))


def test_presets_are_valid_configs():
    for name, recipe in PRESETS.items():
        assert isinstance(recipe.unet, UNetTrainConfig), name
        assert recipe.unet.batch_size % recipe.unet.grad_accum == 0
    vae, text = pytest.importorskip("chorus.train.vae"), pytest.importorskip("chorus.train.text")
    for name, recipe in PRESETS.items():   # the VAE / text parts name fields their trainers know
        load_config(vae.VAETrainConfig, recipe.vae, f"{name}.vae")
        load_config(text.TextTrainConfig, recipe.text, f"{name}.text")


def test_resume_from_a_folder_without_checkpoints(tmp_path, capsys):
    assert train("--resume", "--out", tmp_path) == 2
    err = error_text(capsys)
    assert "Cannot resume" in err and "holds no checkpoint" in err and "Traceback" not in err
    assert train("--resume", tmp_path / "missing", "--part", "unet") == 2
    assert "does not exist" in error_text(capsys)


def test_train_then_generate_from_the_model_and_a_checkpoint(sd_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--config", write_config(tiny_config(sd_folder, steps=2, save_every=1), tmp_path / "c.json"),
                 "--out", out) == 0
    assert capsys.readouterr().out.strip().endswith("model")
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["samples_per_s"] > 0 and "eta_s" in r for r in steps)
    for model in (out / "model", out / "checkpoints" / "step-00000001"):
        assert main(["generate", "a red circle", "--model", str(model), "--steps", "2", "--n", "1", "--size", "32",
                     "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 2


def test_data_folder_with_a_corrupt_image_and_an_empty_caption(sd_folder, tmp_path):
    from chorus.train.data import FolderSource
    from chorus.world.formats import write_samples
    from chorus.world.render import make_sample
    data = write_samples(((f"{i:04d}", make_sample(2, i, size=32)) for i in range(10)), tmp_path / "data")
    (data / "0003.png").write_bytes(b"not a png")
    lines = (data / "metadata.jsonl").read_text().splitlines()
    rec = json.loads(lines[5])
    rec["text"] = "  "
    lines[5] = json.dumps(rec)
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    src = FolderSource(data, 32)
    assert src.size == 8 and src.stats.n_skipped == 2
    assert src.stats.skipped == {"unreadable image": 1, "missing caption": 1}
    out = tmp_path / "run"
    cfg = tiny_config(sd_folder, data=str(data), steps=2)
    assert train("--config", write_config(cfg, tmp_path / "c.json"), "--out", out) == 0
    start = json.loads((out / "logs" / "train.jsonl").read_text().splitlines()[0])
    assert "8 samples, 2 skipped" in start["data"]
    assert all(torch.isfinite(v).all() for v in raw_weights(out).values())


def test_a_folder_of_only_broken_samples_is_an_error(sd_folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"junk")
    (data / "a.txt").write_text("a red circle")
    cfg = tiny_config(sd_folder, data=str(data), steps=1)
    assert train("--config", write_config(cfg, tmp_path / "c.json"), "--out", tmp_path / "o") == 2
    assert "no usable samples" in error_text(capsys)


def test_flags_override_the_config(sd_folder, tmp_path):
    cfg = tiny_config(sd_folder, steps=50, save_every=50)
    assert train("--config", write_config(cfg, tmp_path / "c.json"), "--out", tmp_path / "o", "--steps", 2,
                 "--save-every", 1, "--seed", 5) == 0
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["steps"] == 2 and saved["save_every"] == 1 and saved["seed"] == 5


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
    """The whole tiny recipe (VAE → text encoder → UNet) and a generated image; needs T2's trainers."""
    pytest.importorskip("chorus.train.text")
    out = tmp_path / "tiny"
    assert train("--preset", "tiny", "--out", out) == 0
    assert main(["generate", "a red circle", "--model", str(out / "model"), "--steps", "4", "--n", "1",
                 "--out", str(tmp_path / "png")]) == 0
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None)


def test_base_default_names_the_shipped_model(capsys):
    from chorus.pipeline import default_model_path
    assert train("--preset", "tiny", "--part", "unet", "--base", "default", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unet"]["base"] == str(default_model_path())


def test_default_preset_parts_are_the_shipped_parts():
    """The default recipe's VAE and text-encoder configs are the ones weights/ records it was trained with
    (the text encoder ran under a CPU budget that stopped it at step 1208; the preset says 1200 steps)."""
    from pathlib import Path
    vae_mod, text_mod = pytest.importorskip("chorus.train.vae"), pytest.importorskip("chorus.train.text")
    weights = Path(__file__).resolve().parents[2] / "weights"
    recipe = PRESETS["default"]
    vae = to_dict(load_config(vae_mod.VAETrainConfig, recipe.vae))
    shipped = json.loads((weights / "vae-world-f4" / "vae_train_config.json").read_text())
    skip = {"threads", "save_dtype"}
    assert {k: v for k, v in vae.items() if k not in skip} == {k: v for k, v in shipped.items() if k not in skip}
    text = to_dict(load_config(text_mod.TextTrainConfig, recipe.text))
    shipped = json.loads((weights / "text-world" / "text_train_config.json").read_text())
    skip = {"threads", "steps", "cpu_budget_s"}
    assert {k: text[k] for k in shipped if k not in skip} == {k: v for k, v in shipped.items() if k not in skip}
    assert text["image_pool"] == "attention"  # its contrastive_heads.safetensors holds image.pool.* weights
    assert text["steps"] == 1200 and text["save_dtype"] == "float16" and vae["save_dtype"] == "float16"
