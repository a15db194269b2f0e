"""Paint-with-words (chorus.controls.paint_with_words): token spans from the tokenizers' offsets for every
encoder, the bias formula on the logits, only the conditional half, composition, hooks removed, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from chorus.cli import main
from chorus.controls import ControlRun, PaintWithWords
from chorus.controls.paint_with_words import phrase_tokens, region_mask
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline

torch.set_num_threads(1)
PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def test_phrase_tokens_from_offsets_in_both_encoders(pipe):
    cond = pipe.base.conditioner
    # both tokenizers give [start] a red circle to … : "red circle" is tokens 2, 3 in each window
    assert phrase_tokens(cond, PROMPT, "red circle") == [2, 3]
    assert phrase_tokens(cond, PROMPT, "blue square") == [9, 10]
    with pytest.raises(ChorusError, match="not in the prompt"):
        phrase_tokens(cond, PROMPT, "green star")


def test_bias_is_the_formula_on_the_conditional_half_inside_the_region(pipe):
    run = ControlRun(pipe.base.unet, pipe.base, 64, 64, 1, True, [PROMPT], torch.tensor([999, 500, 0]))
    pww = PaintWithWords({"red circle": [0, 0, 32, 64]}, weight=0.5)
    import contextlib
    with contextlib.ExitStack() as stack:
        pww.bind(run, stack)
        pww.unet_call(None, torch.tensor([500, 500]), {})
        logits = torch.randn(2, 1, 16, 32)     # [uncond, cond], 4×4 pixels, 32 tokens
        out = pww.hook("x.attn2", "logits", logits)
    sigma = float(pww.sigmas[500])
    expected = 0.5 * math.log1p(sigma) * logits[1].max()
    torch.testing.assert_close(out[0], logits[0])                       # the unconditional half is untouched
    diff = (out[1] - logits[1])[0].reshape(4, 4, 32)
    torch.testing.assert_close(diff[:, :2, 2:4], torch.full((4, 2, 2), float(expected)))   # left half, its tokens
    assert diff[:, 2:].abs().max() == 0 and diff[..., :2].abs().max() == 0 and diff[..., 4:].abs().max() == 0


def test_changes_the_image_composes_and_leaves_no_hook(pipe, tmp_path):
    kw = dict(num_inference_steps=6, seed=1, progress=False, output_type="latent")
    before = pipe(PROMPT, **kw).latents
    regions = {"red circle": [4, 20, 28, 44], "blue square": [36, 20, 60, 44]}
    painted = pipe(PROMPT, controls=[PaintWithWords(regions, weight=0.8)], **kw).latents
    assert (painted - before).abs().max() > 1e-2
    after = pipe(PROMPT, **kw).latents
    assert torch.equal(before, after)
    # composes with a zero-initialised ControlNet (which changes nothing): the same as paint-with-words alone
    from chorus.models import ControlNet
    ControlNet.from_unet(pipe.base.unet, (16, 32, 96)).save_pretrained(tmp_path / "cn")
    both_pipe = Pipeline.from_pretrained("default", controlnet=tmp_path / "cn")
    both = both_pipe(PROMPT, control_image=Image.new("RGB", (64, 64)),
                     controls=[PaintWithWords(regions, weight=0.8)], **kw).latents
    torch.testing.assert_close(both, painted, atol=1e-5, rtol=0)


def test_region_errors(tmp_path):
    with pytest.raises(ChorusError, match="not inside"):
        region_mask([0, 0, 80, 10], 64, 64)
    Image.new("L", (32, 32)).save(tmp_path / "m.png")
    with pytest.raises(ChorusError, match="output's size"):
        region_mask(str(tmp_path / "m.png"), 64, 64)
    m = region_mask([0, 0, 16, 8], 64, 64)
    assert m.sum() == 16 * 8 and m[:8, :16].min() == 1


def test_cli_regions(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"red circle": [4, 20, 28, 44]}))
    args = ["generate", PROMPT, "--regions", str(tmp_path / "r.json"), "--n", "1", "--steps", "4",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    made = next((tmp_path / "out").glob("*.png"))
    assert main(["generate", "--from-png", str(made), "--out", str(tmp_path / "again")]) == 0
    assert "identical to" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"green star": [4, 20, 28, 44]}))
    bad = ["generate", PROMPT, "--regions", str(tmp_path / "bad.json"), "--n", "1", "--steps", "2",
           "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "not in the prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    np.testing.assert_array_equal(np.asarray(Image.open(made)).shape, (64, 64, 3))
