"""`chorus generate` writes A1111's `parameters` chunk and re-creates an image from a PNG that has only it."""
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from chorus.cli import main
from chorus.generate_cli import settings_from_parameters
from chorus.serve.metadata import parse_infotext


def _text(path):
    with Image.open(path) as im:
        return dict(im.text)


def test_generate_writes_a1111_parameters_beside_chorus_chunks(sd_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a (red:1.2) circle, big", "--model", str(sd_folder), "--steps", "2", "--n", "1",
                 "--size", "32x32", "--seed", "5", "--sampler", "euler_a", "--guidance", "4.5", "--negative", "blue",
                 "--clip-skip", "2", "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    text = _text(png)
    assert "chorus" in text and text["prompt"] == "a (red:1.2) circle, big"
    info = text["parameters"]
    assert info.splitlines()[:2] == ["a (red:1.2) circle, big", "Negative prompt: blue"]
    p = parse_infotext(info)
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size-1"], p["Size-2"], p["Clip skip"]) == \
        ("2", "Euler a", "4.5", "5", "32", "32", "2")
    assert p["Model"] == "model"


def test_from_png_reads_a_png_with_only_a1111_parameters(sd_folder, tmp_path, capsys):
    info = PngInfo()
    info.add_text("parameters", "a red circle, (big:1.1)\nNegative prompt: green\nSteps: 3, Sampler: DPM++ 2M, "
                                "Schedule type: Karras, CFG scale: 4.5, Seed: 7, Size: 64x32, Model hash: 6ce0161689, "
                                "Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.0")
    src = tmp_path / "a1111.png"
    Image.new("RGB", (64, 32)).save(src, pnginfo=info)
    out = tmp_path / "out"
    assert main(["generate", "--from-png", str(src), "--model", str(sd_folder), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "Model: v1-5-pruned-emaonly" in cap.err and "A1111's noise" in cap.out
    (png,) = out.glob("*.png")
    s = json.loads(_text(png)["chorus"])
    assert (s["prompt"], s["negative"], s["steps"], s["sampler"], s["karras"], s["guidance"], s["seed"]) == \
        ("a red circle, (big:1.1)", "green", 3, "dpmpp_2m", True, 4.5, 7)
    assert s["size"] == "32x64" and s["clip_skip"] == 2       # A1111's Size is WxH, Chorus's HxW
    with Image.open(png) as im:
        assert im.size == (64, 32)
    # and the PNG Chorus wrote re-creates itself from its own chunk
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    assert "identical to" in capsys.readouterr().out


def test_settings_from_parameters_maps_samplers_and_reports_the_rest():
    s, unmapped = settings_from_parameters("cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, "
                                           "Hires upscale: 2, Denoising strength: 0.7")
    assert (s["sampler"], s["size"], s["negative"]) == ("euler_a", "768x512", None)
    assert "Hires upscale" in unmapped
    s, unmapped = settings_from_parameters("cat\nSteps: 20, Sampler: LMS, CFG scale: 7, Seed: 1, Size: 512x512")
    assert s["sampler"] is None and any("LMS" in u for u in unmapped)


def test_from_png_without_any_settings_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(src)
    assert main(["generate", "--from-png", str(src)]) == 2
    assert "parameters" in capsys.readouterr().err
