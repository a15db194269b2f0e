"""Image folders and WebDataset shards: round trips, rank/worker splits, corrupt samples, errors."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from chorus.errors import ChorusError
from chorus.world.formats import (FolderWriter, ShardWriter, detect_format, load_specs, open_dataset,
                                  png_bytes, write_samples)
from chorus.world.render import make_sample

torch.set_num_threads(1)
N = 12


@pytest.fixture(scope="module")
def samples():
    return [(f"{i:08d}", make_sample(7, i, with_instances=True)) for i in range(N)]


@pytest.fixture(scope="module")
def folder(samples, tmp_path_factory):
    return write_samples(samples, tmp_path_factory.mktemp("f") / "data", fmt="folder", conditions=True)


@pytest.fixture(scope="module")
def shards(samples, tmp_path_factory):
    return write_samples(samples, tmp_path_factory.mktemp("w") / "data", fmt="wds", samples_per_shard=5,
                         conditions=True)


def _check_round_trip(items, samples):
    assert [it["key"] for it in items] == [k for k, _ in samples]
    for it, (_, s) in zip(items, samples):
        assert np.array_equal(it["image"], s.image)  # PNG is lossless
        assert it["text"] == s.caption
        assert it["original_size"] == tuple(s.original_size)
        assert it["crop_top_left"] == tuple(s.crop_top_left)
        assert it["spec"] == s.spec


def test_folder_round_trip(folder, samples):
    assert detect_format(folder) == "folder"
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [x["file_name"] for x in lines] == [f"{k}.png" for k, _ in samples]
    assert all({"text", "original_size", "crop_top_left", "spec"} <= set(x) for x in lines)
    for x in lines:
        for rel in x["conditions"].values():
            assert (folder / rel).is_file()
    ds = open_dataset(folder)
    _check_round_trip(list(ds), samples)
    assert ds.stats.yielded == N and ds.stats.n_skipped == 0


def test_shard_round_trip_and_layout(shards, samples):
    names = sorted(p.name for p in shards.iterdir())
    assert names == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    with tarfile.open(shards / "shard-00000.tar") as t:
        members = t.getnames()
    assert members[:6] == ["00000000.png", "00000000.txt", "00000000.json", "00000000.canny.png",
                           "00000000.layout.png", "00000000.instances.png"]
    with tarfile.open(shards / "shard-00000.tar") as t:
        meta = json.loads(t.extractfile("00000000.json").read())
    for k in ("key", "caption", "width", "height", "original_width", "original_height", "crop_top_left", "spec"):
        assert k in meta
    assert (meta["original_height"], meta["original_width"]) == tuple(samples[0][1].original_size)
    _check_round_trip(list(open_dataset(shards)), samples)
    _check_round_trip(list(open_dataset(sorted(shards.glob("*.tar")))), samples)


def test_webdataset_package_reads_the_shards(shards, samples):
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert len(got) == N
    assert np.array_equal(got[0]["png"], samples[0][1].image)
    assert got[3]["txt"] == samples[3][1].caption and got[3]["json"]["spec"] == samples[3][1].spec


@pytest.mark.parametrize("which", ["folder", "shards"])
def test_ranks_partition_the_data(which, folder, shards):
    path = folder if which == "folder" else shards
    seen = []
    for world in (2, 3, 4):  # 3 shards: world 2 and 3 split by shard, 4 falls back to samples
        keys = [[it["key"] for it in open_dataset(path, rank=r, world_size=world)] for r in range(world)]
        flat = [k for ks in keys for k in ks]
        assert sorted(flat) == [f"{i:08d}" for i in range(N)]  # disjoint and complete
        assert all(keys)
        seen.append(keys)
    with pytest.raises(ChorusError):
        open_dataset(path, rank=2, world_size=2)


def test_dataloader_workers_split_within_a_rank(shards):
    ds = open_dataset(shards, rank=0, world_size=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                     collate_fn=lambda x: x, multiprocessing_context="fork")
    keys = sorted(it["key"] for it in dl)
    assert keys == [f"{i:08d}" for i in range(N)]


def test_corrupt_samples_are_skipped_counted_and_reported(tmp_path, samples):
    d = tmp_path / "bad"
    write_samples(samples[:6], d, fmt="folder")
    (d / "00000001.png").write_bytes(b"not a png at all")
    lines = (d / "metadata.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["text"] = ""
    lines[2] = json.dumps(rec)
    lines[3] = lines[3][:40]  # broken JSON
    (d / "00000004.png").unlink()
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = open_dataset(d)
    with pytest.warns(UserWarning, match="skipped"):
        items = list(ds)
    assert [it["key"] for it in items] == ["00000000", "00000005"]
    assert ds.stats.skipped == {"unreadable image": 1, "missing caption": 1, "bad json": 1,
                                "missing image file": 1}
    assert "4 skipped" in ds.stats.summary()


def test_corrupt_shard_members_are_skipped(tmp_path, samples):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for k, s in samples[:4]:
            png = png_bytes(s.image)
            add(f"{k}.png", png if k != "00000001" else png[:50])  # truncated PNG
            add(f"{k}.txt", s.caption.encode() if k != "00000002" else b"  ")  # empty caption
            add(f"{k}.json", b"{oops" if k == "00000003" else json.dumps({"crop_top_left": [1, 2]}).encode())
    truncated = tmp_path / "cut.tar"
    with tarfile.open(path) as t:
        cut = t.getmembers()[6].offset_data + 100  # inside the third sample's PNG
    truncated.write_bytes(path.read_bytes()[:cut])  # a shard cut short mid-stream
    ds = open_dataset([path, truncated], warn=False)
    items = list(ds)
    assert [it["key"] for it in items] == ["00000000", "00000000"]  # then 00000001's bad PNG, then the cut
    assert items[0]["crop_top_left"] == (1, 2) and items[0]["original_size"] == (64, 64)
    assert ds.stats.skipped["unreadable image"] == 2 and ds.stats.skipped["missing caption"] == 1
    assert ds.stats.skipped["bad json"] == 1 and ds.stats.skipped["unreadable shard (rest of it)"] == 1


def test_user_folder_with_txt_captions_and_other_sizes(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(d / "a.png")
    (d / "a.txt").write_text("a red rectangle\n")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(d / "b.jpg")
    (d / "b.txt").write_text("blue")
    Image.new("RGB", (64, 64)).save(d / "c.png")  # no caption: skipped
    assert detect_format(d) == "captioned"
    ds = open_dataset(d, size=64, warn=False)
    with pytest.warns(UserWarning, match="resized"):
        items = list(ds)
    assert [it["key"] for it in items] == ["a", "b"]
    a = items[0]
    assert a["image"].shape == (64, 64, 3) and a["original_size"] == (80, 120)
    assert a["crop_top_left"] == (0, (96 - 64) // 2)  # SDXL: resize shorter side, centre crop
    assert a["text"] == "a red rectangle" and a["spec"] is None
    assert ds.stats.resized == 1 and ds.stats.skipped == {"missing caption": 1}
    pil = next(iter(open_dataset(d, as_pil=True, warn=False)))["image"]
    assert isinstance(pil, Image.Image)


def test_bad_paths_raise_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChorusError, match="empty"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(ChorusError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    d = tmp_path / "meta"
    d.mkdir()
    (d / "metadata.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(ChorusError, match="file_name"):
        open_dataset(d)
    (d / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "x"}\n')
    with pytest.raises(ChorusError, match="'text'"):
        open_dataset(d)


def test_writers_never_leave_partial_output(tmp_path, samples):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, samples_per_shard=2) as w:
            for k, s in samples[:3]:
                w.write(k, s)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with FolderWriter(out) as w:
            w.write(*samples[0])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_samples(samples[:2], out)
    with pytest.raises(ChorusError, match="not empty"):
        write_samples(samples[:2], out)
    write_samples(samples[:3], out, overwrite=True)
    assert len(list(out.glob("*.png"))) == 3
    with pytest.raises(ChorusError, match="format"):
        write_samples(samples[:1], tmp_path / "x", fmt="zip")


def test_load_specs_names_line_and_field(tmp_path):
    p = tmp_path / "specs.jsonl"
    good = {"prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    specs = load_specs(p)
    assert [s["_line"] for s in specs] == [1, 3]
    p.write_text(json.dumps(good) + "\n{bad json\n")
    with pytest.raises(ChorusError, match="line 2 is not valid JSON"):
        load_specs(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps({"include": [{"class": "circle", "color": "teal"}]}) + "\n")
    with pytest.raises(ChorusError, match=r"line 2: include\[0\]\.color 'teal'.*red, orange, yellow"):
        load_specs(p)
    p.write_text("")
    with pytest.raises(ChorusError, match="empty"):
        load_specs(p)
