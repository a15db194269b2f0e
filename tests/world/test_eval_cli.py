"""`chorus eval` and `chorus world train-evaluator`: folders, spec files, a mocked pipeline, bad input."""
import argparse
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from chorus.errors import ChorusError
from chorus.world import eval_cli
from chorus.world.benchmark import BENCHMARK_PATH, PLAN, build_benchmark, load_specs, write_specs
from chorus.world.evaluator import DEFAULT_WEIGHTS
from chorus.world.render import render_spec

torch.set_num_threads(2)
needs_weights = pytest.mark.skipif(not (DEFAULT_WEIGHTS / "model.safetensors").is_file(),
                                   reason="shipped evaluator weights missing")
SEED = 7_100_000  # render seeds outside the evaluator's training draws


def parser():
    p = argparse.ArgumentParser(prog="chorus")
    sub = p.add_subparsers(dest="command")
    eval_cli.register(sub)
    world = sub.add_parser("world").add_subparsers(dest="world_command")
    eval_cli.register_world(world)
    return p


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


def some_specs(n_per_tag=2):
    specs = load_specs()
    out = []
    for tag in PLAN:
        out += [s for s in specs if s["tag"] == tag][:n_per_tag]
    return out


def render_folder(folder, specs, k=1, size=64, meta=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(specs):
        for j in range(k):
            name = f"{i:05d}.png" if k == 1 else f"{i:05d}_{j}.png"
            Image.fromarray(render_spec(s, seed=SEED + 10 * i + j, size=size).image).save(folder / name)
    if meta:
        write_specs(specs, folder / "metadata.jsonl")
    return folder


# ---- the benchmark file ---------------------------------------------------------------------

def test_benchmark_file_is_the_deterministic_draw():
    shipped = [json.loads(line) for line in BENCHMARK_PATH.read_text().splitlines()]
    assert shipped == build_benchmark()
    assert len(shipped) == sum(sum(v.values()) for v in PLAN.values()) == 553
    tags = {t: sum(s["tag"] == t for s in shipped) for t in PLAN}
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}
    held = [s for s in shipped if s["split"] != "train"]
    assert 0.10 <= len(held) / len(shipped) <= 0.15
    assert len({s["prompt"] for s in shipped}) == len(shipped)


def test_benchmark_held_out_prompts_really_are_held_out():
    from chorus.world.captions import heldout_pairs_in, heldout_words_in
    for s in load_specs():
        words, pairs = heldout_words_in(s["prompt"]), heldout_pairs_in(s)
        assert bool(words) == (s["split"] == "heldout_words"), s
        assert bool(pairs) == (s["split"] == "heldout_pairs"), s


# ---- argument wiring ------------------------------------------------------------------------

def test_commands_register():
    args = parser().parse_args(["eval", "--images", "x", "--limit", "3"])
    assert args.func is eval_cli.eval_command and args.images_per_prompt == 4
    args = parser().parse_args(["world", "train-evaluator", "--steps", "5", "--out", "d"])
    assert args.func is eval_cli.train_evaluator_command and args.steps == 5
    with pytest.raises(SystemExit):  # --model and --images are exclusive
        parser().parse_args(["eval", "--images", "x", "--model", "y"])


def test_train_evaluator_command(tmp_path, capsys):
    assert run(["world", "train-evaluator", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "model.safetensors").is_file()
    with pytest.raises(ChorusError):
        run(["world", "train-evaluator", "--steps", "0", "--out", str(tmp_path / "f")])


# ---- bad input ------------------------------------------------------------------------------

@needs_weights
def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ChorusError, match="No images"):
        run(["eval", "--images", str(tmp_path)])
    with pytest.raises(ChorusError, match="does not exist"):
        run(["eval", "--images", str(tmp_path / "nope")])


@needs_weights
def test_bad_spec_line_is_an_error(tmp_path):
    folder = render_folder(tmp_path / "imgs", some_specs(1)[:2])
    bad = tmp_path / "specs.jsonl"
    bad.write_text(json.dumps(some_specs(1)[0]) + "\n{not json\n")
    with pytest.raises(ChorusError, match="line 2"):
        run(["eval", "--images", str(folder), "--specs", str(bad)])
    bad.write_text(json.dumps({"prompt": "x", "include": [{"class": "dragon", "count": 1}]}) + "\n")
    with pytest.raises(ChorusError, match="dragon"):
        run(["eval", "--images", str(folder), "--specs", str(bad)])


@needs_weights
def test_missing_metadata_and_index_past_the_specs(tmp_path):
    specs = some_specs(1)[:2]
    folder = render_folder(tmp_path / "imgs", specs, meta=False)
    with pytest.raises(ChorusError, match="metadata.jsonl"):
        run(["eval", "--images", str(folder)])
    one = tmp_path / "one.jsonl"
    write_specs(specs[:1], one)
    with pytest.raises(ChorusError, match="index 1"):
        run(["eval", "--images", str(folder), "--specs", str(one)])


# ---- scoring folders ------------------------------------------------------------------------

@needs_weights
def test_eval_images_folder_json(tmp_path, capsys):
    specs = some_specs(2)
    folder = render_folder(tmp_path / "imgs", specs)
    out = tmp_path / "r.json"
    assert run(["eval", "--images", str(folder), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == len(specs) and set(res["tasks"]) == set(PLAN)
    assert res["overall"] >= 0.8  # renders of their own specs
    printed = capsys.readouterr().out
    assert "overall" in printed and "color_attr" in printed


@needs_weights
def test_eval_grid_shows_each_task_with_its_verdict(tmp_path, monkeypatch):
    specs = some_specs(2)
    folder = render_folder(tmp_path / "imgs", specs)
    shown = {}
    import chorus.world.cli as world_cli
    real = world_cli.caption_grid

    def spy(arrays, captions, **kw):
        shown["captions"] = captions
        return real(arrays, captions, **kw)
    monkeypatch.setattr(world_cli, "caption_grid", spy)
    grid = tmp_path / "grid.png"
    assert run(["eval", "--images", str(folder), "--grid", str(grid), "--grid-per-task", "1"]) == 0
    assert Image.open(grid).size[0] > 64
    caps = shown["captions"]
    assert len(caps) == len(PLAN)  # one prompt of each task
    assert [c.split("  ", 1)[1] for c in caps] == [s["prompt"] for s in specs[::2]]
    assert sum(c.startswith("OK") for c in caps) >= len(PLAN) - 1  # renders of their own specs
    with pytest.raises(ChorusError, match="png"):
        run(["eval", "--images", str(folder), "--grid", str(tmp_path / "grid.jpg")])


@needs_weights
def test_eval_wrong_specs_score_low(tmp_path):
    """The same folder scored against another task's specs fails: the score depends on the spec."""
    specs = [s for s in load_specs() if s["tag"] == "counting"][:6]
    folder = render_folder(tmp_path / "imgs", specs)
    others = tmp_path / "others.jsonl"
    write_specs([s for s in load_specs() if s["tag"] == "single_object"][10:16], others)
    out = tmp_path / "r.json"
    run(["eval", "--images", str(folder), "--specs", str(others), "--json", str(out)])
    assert json.loads(out.read_text())["overall"] <= 0.5


@needs_weights
def test_eval_k_images_per_prompt_and_other_sizes(tmp_path, capsys):
    specs = some_specs(1)
    folder = render_folder(tmp_path / "imgs", specs, k=2, size=96)
    out = tmp_path / "r.json"
    run(["eval", "--images", str(folder), "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 * len(specs)
    assert [r["file"] for r in res["records"]][:3] == ["00000_0.png", "00000_1.png", "00001_0.png"]
    assert "resized" in capsys.readouterr().err


@needs_weights
def test_eval_reads_world_render_metadata(tmp_path):
    """A folder as `chorus world render` writes it: metadata lines with file_name and spec."""
    from chorus.world.formats import FolderWriter
    specs = some_specs(1)
    with FolderWriter(tmp_path / "r") as w:
        for i, s in enumerate(specs):
            w.write(f"{i:05d}", render_spec(s, seed=SEED + i), index=i)
    out = tmp_path / "r.json"
    run(["eval", "--images", str(tmp_path / "r"), "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["n_images"] == len(specs)
    assert [r["prompt"] for r in res["records"]] == [s["prompt"] for s in specs]


# ---- generating with a model (the pipeline mocked by a renderer) ----------------------------

class RenderingPipeline:
    """Stands in for chorus.pipeline.Pipeline: 'generates' by rendering the prompt's spec."""

    calls = []

    def __init__(self, by_prompt):
        self.by_prompt = by_prompt

    @classmethod
    def from_pretrained(cls, path):
        specs = load_specs()
        return cls({s["prompt"]: s for s in specs})

    def __call__(self, prompt, num_inference_steps, guidance_scale, seed, num_images_per_prompt, progress=True):
        type(self).calls.append((list(prompt), num_inference_steps, guidance_scale, seed, num_images_per_prompt))
        images = [Image.fromarray(render_spec(self.by_prompt[p], seed=SEED + seed * 10 + k).image)
                  for p in prompt for k in range(num_images_per_prompt)]
        return types.SimpleNamespace(images=images)


@needs_weights
def test_eval_model_with_a_mocked_pipeline(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "chorus.pipeline", types.SimpleNamespace(Pipeline=RenderingPipeline))
    RenderingPipeline.calls = []
    out = tmp_path / "r.json"
    assert run(["eval", "--model", "anything", "--limit", "6", "--images-per-prompt", "2", "--json", str(out),
                "--batch-prompts", "4", "--save-images", str(tmp_path / "gen")]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 12 and res["tasks"] == {"single_object": 1.0}
    assert [c[0] for c in RenderingPipeline.calls] == [[s["prompt"] for s in load_specs()[:4]],
                                                      [s["prompt"] for s in load_specs()[4:6]]]
    assert RenderingPipeline.calls[0][1:] == (20, 5.0, 0, 2)
    assert len(list((tmp_path / "gen").glob("*.png"))) == 12
    # the saved folder scores the same through --images
    out2 = tmp_path / "r2.json"
    run(["eval", "--images", str(tmp_path / "gen"), "--json", str(out2)])
    assert json.loads(out2.read_text())["overall"] == res["overall"]


@needs_weights
def test_eval_model_fid(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "chorus.pipeline", types.SimpleNamespace(Pipeline=RenderingPipeline))
    out = tmp_path / "r.json"
    run(["eval", "--model", "m", "--limit", "6", "--images-per-prompt", "2", "--fid", "--json", str(out)])
    res = json.loads(out.read_text())
    for key in ("fid", "kid", "fid_floor", "kid_floor", "fid_blur", "is", "is_real"):
        assert np.isfinite(res[key])
    assert 1.0 <= res["is"] <= 8.0
    assert res["blur_sigma"] == 1.0   # (6 specs are too few to rank FIDs: finite is all this checks)


@needs_weights
def test_eval_model_runs_the_real_pipeline(sd_folder, tmp_path, capsys):
    """End to end through chorus.pipeline with a tiny random-weight SD folder (its images are noise)."""
    pytest.importorskip("chorus.pipeline")
    out = tmp_path / "r.json"
    assert run(["eval", "--model", str(sd_folder), "--limit", "2", "--images-per-prompt", "2", "--steps", "2",
                "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 4 and 0.0 <= res["overall"] <= 1.0
