"""`chorus world make|show|render`: outputs, and errors as one paragraph with exit status 2."""
import json
import tarfile

import numpy as np
from PIL import Image

from chorus.world.formats import open_dataset


def run(argv):
    """Through the lead's `chorus` entry point when present, else the world CLI's own."""
    try:
        from chorus.cli import main
        return main(["world", *argv])
    except ImportError:  # pragma: no cover - chorus.cli not built yet
        from chorus.world.cli import main
        return main(argv)


def test_make_folder_and_shards(tmp_path):
    assert run(["make", "--n", "6", "--out", str(tmp_path / "f"), "--seed", "3", "--quiet"]) == 0
    items = list(open_dataset(tmp_path / "f"))
    assert len(items) == 6 and items[0]["image"].shape == (64, 64, 3)
    assert run(["make", "--n", "5", "--out", str(tmp_path / "w"), "--format", "wds", "--shard-size", "2",
                "--size", "32", "--no-crop", "--conditions", "--quiet"]) == 0
    shards = sorted((tmp_path / "w").glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as t:
        assert "00000000.canny.png" in t.getnames()
    items = list(open_dataset(tmp_path / "w"))
    assert len(items) == 5 and all(it["crop_top_left"] == (0, 0) and it["image"].shape == (32, 32, 3) for it in items)
    # the same seed gives the same data
    assert run(["make", "--n", "6", "--out", str(tmp_path / "g"), "--seed", "3", "--quiet"]) == 0
    a, b = (tmp_path / "f" / "00000004.png").read_bytes(), (tmp_path / "g" / "00000004.png").read_bytes()
    assert a == b


def test_show_writes_a_captioned_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert run(["show", "--n", "6", "--cols", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.width == 3 * (64 * 3 + 4) + 4 and img.height > 2 * 64 * 3
    arr = np.asarray(img.convert("L"))
    # caption text (dark pixels) under the first tile, on the white strip
    strip = arr[4 + 64 * 3 + 2: 4 + 64 * 3 + 14, 4: 4 + 64 * 3]
    assert (strip < 100).sum() > 20


def test_render_specs_to_an_imagefolder(tmp_path):
    specs = [
        {"prompt": "a red circle left of a blue square", "tag": "position",
         "include": [{"class": "square", "count": 1, "color": "blue"},
                     {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]},
        {"prompt": "three stars", "tag": "counting", "include": [{"class": "star", "count": 3}],
         "exclude": [{"class": "star", "count": 4}]},
    ]
    f = tmp_path / "specs.jsonl"
    f.write_text("\n".join(json.dumps(s) for s in specs) + "\n")
    assert run(["render", "--specs", str(f), "--out", str(tmp_path / "out"), "--conditions", "--quiet"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == ["00000.png", "00001.png"]
    assert [m["index"] for m in meta] == [0, 1] and [m["line"] for m in meta] == [1, 2]
    assert meta[0]["spec"]["include"] == specs[0]["include"] and meta[0]["text"] == specs[0]["prompt"]
    objs = meta[0]["objects"]
    circle = next(o for o in objs if o["shape"] == "circle")
    square = next(o for o in objs if o["shape"] == "square")
    assert circle["color"] == "red" and square["color"] == "blue"
    assert circle["box"][2] < square["box"][0] + 1  # the circle is left of the square
    assert sum(o["shape"] == "star" for o in meta[1]["objects"]) == 3
    assert (out / meta[1]["conditions"]["canny"]).is_file()


def test_errors_are_one_paragraph_and_leave_no_output(tmp_path, capsys):
    f = tmp_path / "specs.jsonl"
    good = json.dumps({"prompt": "a star", "include": [{"class": "star", "count": 1}]})
    f.write_text(good + "\n" + good + "\n" + json.dumps({"include": [{"class": "blob"}]}) + "\n")
    assert run(["render", "--specs", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "include[0].class 'blob'" in err and "circle, square" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [f]
    f.write_text(good + "\n{oops\n")
    assert run(["render", "--specs", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    assert run(["render", "--specs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert run(["make", "--n", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert run(["make", "--n", "2", "--out", str(tmp_path / "o"), "--split", "nope", "--quiet"]) == 2
    assert "splits are" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    assert run(["make", "--n", "2", "--out", str(tmp_path / "full"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    assert run(["show", "--out", str(tmp_path / "grid.jpg")]) == 2


def test_standalone_entry_point(tmp_path):
    from chorus.world.cli import main
    assert main(["show", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["make", "--n", "0", "--out", str(tmp_path / "x")]) == 2
