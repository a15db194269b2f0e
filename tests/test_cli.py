"""`chorus generate` / `chorus info` end to end on a tiny diffusers folder."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from chorus.cli import main


def gen(*args):
    return main(["generate", *map(str, args)])


def test_generate_writes_pngs_with_settings_and_from_png_recreates(sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert gen("a red circle", "--model", sd_folder, "--steps", 3, "--n", 2, "--seed", 7, "--size", "32x32",
               "--sampler", "euler_a", "--guidance", 3, "--out", out) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    with Image.open(files[1]) as im:
        text = dict(im.text)
    assert text["prompt"] == "a red circle" and text["seed"] == "8" and text["sampler"] == "euler_a"
    assert json.loads(text["chorus"])["steps"] == 3
    again = tmp_path / "again"
    assert gen("--from-png", files[1], "--out", again) == 0
    assert "identical to" in capsys.readouterr().out
    (copy,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(files[1])))


def test_generate_never_overwrites(sd_folder, tmp_path):
    for _ in range(2):
        assert gen("a", "--model", sd_folder, "--steps", 1, "--n", 1, "--size", "32", "--out", tmp_path) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize("args, match", [
    (["--size", "30x32"], "multiple"),
    (["--steps", "0"], "steps"),
    (["--guidance", "inf"], "finite"),
    (["--sampler", "warp"], "euler"),
    (["--size", "big"], "HxW"),
    (["--original-size", "64"], "--original-size"),
    (["--original-size=-4x64"], "non-negative"),
    (["--crop", "1,2,3"], "--crop"),
    (["--crop", "a,b"], "TOP,LEFT"),
])
def test_bad_input_exits_2_with_one_paragraph_and_no_file(sd_folder, tmp_path, capsys, args, match):
    out = tmp_path / "o"
    assert gen("x", "--model", sd_folder, "--out", out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_model_folder(tmp_path, capsys):
    assert gen("x", "--model", tmp_path / "none") == 2
    assert "does not exist" in capsys.readouterr().err


def test_pickle_checkpoint_is_refused(sd_folder, tmp_path, capsys):
    import shutil
    import torch
    bad = tmp_path / "m"
    shutil.copytree(sd_folder, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, bad / "unet" / "diffusion_pytorch_model.bin")
    assert gen("x", "--model", bad, "--out", tmp_path / "o") == 2
    err = capsys.readouterr()
    assert "pickle" in err.err and "pwned" not in err.out


def test_info_describes_the_folder(sd_folder, capsys):
    assert main(["info", str(sd_folder)]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "parameters" in out and "float32" in out


def test_python_dash_m_is_the_same_command():
    r = subprocess.run([sys.executable, "-m", "chorus", "generate", "--list-samplers"], capture_output=True, text=True)
    assert r.returncode == 0 and "dpmpp_2m" in r.stdout


def test_a_models_recommended_guidance_is_the_default_and_flags_override_it(sd_folder, tmp_path, capsys):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(sd_folder, model)
    (model / "sampling_defaults.json").write_text(json.dumps({"guidance_scale": 2.5}))
    out = tmp_path / "o"
    assert gen("a red circle", "--model", model, "--steps", 2, "--n", 1, "--size", "32x32", "--out", out) == 0
    (png,) = out.glob("*.png")
    with Image.open(png) as im:
        assert json.loads(im.text["chorus"])["guidance"] == 2.5
    out2 = tmp_path / "o2"
    assert gen("a red circle", "--model", model, "--steps", 2, "--n", 1, "--size", "32x32", "--guidance", 4,
               "--out", out2) == 0
    (png2,) = out2.glob("*.png")
    with Image.open(png2) as im:
        assert json.loads(im.text["chorus"])["guidance"] == 4.0
    (model / "sampling_defaults.json").write_text(json.dumps({"guidance_scale": "high"}))
    assert gen("a red circle", "--model", model, "--steps", 2, "--out", tmp_path / "o3") == 2
    assert "guidance_scale" in capsys.readouterr().err


def test_a_models_recommended_steps_are_the_default_and_flags_override_them(sd_folder, tmp_path, capsys):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(sd_folder, model)
    (model / "sampling_defaults.json").write_text(json.dumps({"num_inference_steps": 3}))
    for flags, steps in (((), 3), (("--steps", 2), 2)):
        out = tmp_path / f"o{steps}"
        assert gen("a red circle", "--model", model, "--n", 1, "--size", "32x32", "--out", out, *flags) == 0
        (png,) = out.glob("*.png")
        with Image.open(png) as im:
            assert json.loads(im.text["chorus"])["steps"] == steps
    shutil.rmtree(tmp_path / "o3")
    assert gen("a red circle", "--model", sd_folder, "--n", 1, "--size", "32x32", "--out", tmp_path / "o3") == 0
    with Image.open(next((tmp_path / "o3").glob("*.png"))) as im:
        assert json.loads(im.text["chorus"])["steps"] == 20      # no recommendation: 20
    for bad in (0, 2.5, "many", True):
        (model / "sampling_defaults.json").write_text(json.dumps({"num_inference_steps": bad}))
        assert gen("a red circle", "--model", model, "--out", tmp_path / "o4") == 2
        assert "num_inference_steps" in capsys.readouterr().err
        assert not (tmp_path / "o4").exists()
