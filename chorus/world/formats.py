"""Data formats: image folders and WebDataset shards, their writers and streaming loaders.

**Image folder** (Hugging Face `imagefolder` convention)::

    DIR/00000000.png ...            the images
    DIR/metadata.jsonl              {"file_name", "text", "original_size": [h, w],
                                     "crop_top_left": [top, left], "spec", "objects", ...} per line
    DIR/conditions/KEY_canny.png    optional ControlNet conditions (also _layout.png, _instances.png)

**WebDataset shards** (the img2dataset layout): `DIR/shard-00000.tar`, ... each holding, per sample,
`KEY.png`, `KEY.txt` (the caption) and `KEY.json` (img2dataset's fields `key`, `caption`,
`width`, `height`, `original_width`, `original_height`, `status`, plus `crop_top_left`, `spec`,
`objects`), and with conditions `KEY.canny.png`, `KEY.layout.png`, `KEY.instances.png`.
Written with the standard library's `tarfile`; read without the `webdataset` package.

Writers stage everything in a hidden sibling folder and rename it into place at the end, so an
interrupted run never leaves a partial output. Loaders (`open_dataset`) stream either format, or
any folder of images with `.txt` captions or a `metadata.jsonl`, split across ranks and workers,
and skip (count, report) corrupt samples instead of crashing.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from chorus.errors import ChorusError
from chorus.world.scene import Sample

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONDITION_NAMES = ("canny", "layout", "instances")


# ---- encoding helpers -----------------------------------------------------------------------
def png_bytes(array: np.ndarray, compress_level: int = 3) -> bytes:
    """PNG bytes of a (H, W) or (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def sample_record(sample: Sample, key: str) -> dict:
    """The JSON metadata of a sample (folder line and shard JSON share it)."""
    meta = sample.meta()
    h, w = sample.image.shape[:2]
    return {"key": key, **meta, "caption": sample.caption, "width": int(w), "height": int(h),
            "original_height": int(sample.original_size[0]), "original_width": int(sample.original_size[1]),
            "status": "success", "error_message": None}


def _condition_images(sample: Sample) -> dict[str, np.ndarray]:
    from chorus.world.conditions import conditions_for
    return conditions_for(sample)


class _Staged:
    """An output folder built under a hidden sibling name and renamed into place on success."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.final = Path(out_dir)
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())) and not overwrite:
            raise ChorusError(f"The output {self.final} already exists and is not empty; choose a new "
                              f"folder or pass --overwrite to replace it.")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}-{int(time.time() * 1000)}"
        self.tmp.mkdir()

    def commit(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final) if self.final.is_dir() else self.final.unlink()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- writers --------------------------------------------------------------------------------
class _StagedWriter:
    """A writer used as a context manager: committed on success, aborted (nothing left) on error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FolderWriter(_StagedWriter):
    """Image folder + metadata.jsonl (imagefolder convention). Use as a context manager."""

    def __init__(self, out_dir: str | os.PathLike, conditions: bool = False, overwrite: bool = False,
                 extra_fields: dict | None = None):
        self.stage = _Staged(out_dir, overwrite)
        self.conditions = conditions
        self.extra = extra_fields or {}
        self._meta = open(self.stage.tmp / "metadata.jsonl", "w", encoding="utf-8")
        if conditions:
            (self.stage.tmp / "conditions").mkdir()
        self.count = 0

    def write(self, key: str, sample: Sample, **fields) -> None:
        """Write `KEY.png` and its metadata line (plus conditions when asked)."""
        name = f"{key}.png"
        (self.stage.tmp / name).write_bytes(png_bytes(sample.image))
        rec = {"file_name": name, **sample_record(sample, key), **self.extra, **fields}
        if self.conditions:
            rec["conditions"] = {}
            for cname, arr in _condition_images(sample).items():
                rel = f"conditions/{key}_{cname}.png"
                (self.stage.tmp / rel).write_bytes(png_bytes(arr))
                rec["conditions"][cname] = rel
        self._meta.write(json.dumps(rec) + "\n")
        self.count += 1

    def close(self) -> Path:
        self._meta.close()
        return self.stage.commit()

    def abort(self) -> None:
        self._meta.close()
        self.stage.abort()


class ShardWriter(_StagedWriter):
    """WebDataset tar shards of `samples_per_shard` samples each. Use as a context manager."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 10_000, conditions: bool = False,
                 overwrite: bool = False, prefix: str = "shard"):
        if samples_per_shard < 1:
            raise ChorusError(f"samples_per_shard must be >= 1, got {samples_per_shard}.")
        self.stage = _Staged(out_dir, overwrite)
        self.per_shard, self.conditions, self.prefix = samples_per_shard, conditions, prefix
        self.count, self.shards = 0, []
        self._tar: tarfile.TarFile | None = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: shards are reproducible
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, sample: Sample, **fields) -> None:
        """Append `KEY.png`, `KEY.txt`, `KEY.json` (and conditions) to the current shard."""
        if self.count % self.per_shard == 0:
            self._close_tar()
            path = self.stage.tmp / f"{self.prefix}-{len(self.shards):05d}.tar"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append(path.name)
        self._add(f"{key}.png", png_bytes(sample.image))
        self._add(f"{key}.txt", sample.caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps({**sample_record(sample, key), **fields}).encode("utf-8"))
        if self.conditions:
            for cname, arr in _condition_images(sample).items():
                self._add(f"{key}.{cname}.png", png_bytes(arr))
        self.count += 1

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> Path:
        self._close_tar()
        return self.stage.commit()

    def abort(self) -> None:
        self._close_tar()
        self.stage.abort()


# ---- loader statistics ----------------------------------------------------------------------
@dataclass
class LoaderStats:
    """What a loader yielded, skipped (by reason, with a few examples) and resized."""

    yielded: int = 0
    resized: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def note(self, text: str) -> None:
        """A message given once (e.g. 'images of another size are resized')."""
        if text not in self.notes:
            self.notes.append(text)
            warnings.warn(text, stacklevel=3)

    def summary(self) -> str:
        if not self.n_skipped:
            return f"{self.yielded} samples, none skipped" + (f", {self.resized} resized" if self.resized else "")
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return (f"{self.yielded} samples, {self.n_skipped} skipped ({reasons}); e.g. "
                + "; ".join(self.examples[:3]) + (f"; {self.resized} resized" if self.resized else ""))


# ---- sample decoding ------------------------------------------------------------------------
class _Bad(Exception):
    """A sample that cannot be used; the message is the skip reason."""


def _decode_image(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises many kinds for broken files
        raise _Bad("unreadable image") from e


def _pair(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        a, b = value
        return (int(a), int(b))
    except (TypeError, ValueError) as e:
        raise _Bad(f"bad {name}") from e


def fit_to_size(img: Image.Image, size: int | None, crop_top_left: tuple[int, int]):
    """Resize so the shorter side is `size`, centre-crop to size × size (SDXL's data recipe).

    Returns (image, crop_top_left, resized?) with the crop corner moved into the new frame.
    """
    w, h = img.size
    if size is None or (w == size and h == size):
        return img, crop_top_left, False
    k = size / min(w, h)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))
    ct = (int(round(crop_top_left[0] * k)) + top, int(round(crop_top_left[1] * k)) + left)
    return img, ct, True


def _make_item(img: Image.Image, text, meta: dict, key: str, size: int | None, as_pil: bool,
               stats: LoaderStats) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise _Bad("missing caption")
    orig = _pair(meta.get("original_size"), "original_size")
    if orig is None and "original_height" in meta and "original_width" in meta:
        orig = _pair((meta["original_height"], meta["original_width"]), "original_size")
    orig = orig or (img.size[1], img.size[0])
    crop = _pair(meta.get("crop_top_left"), "crop_top_left") or (0, 0)
    spec = meta.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise _Bad("bad spec")
    img, crop, resized = fit_to_size(img, size, crop)
    if resized:
        stats.resized += 1
        stats.note(f"images whose size is not {size}×{size} are resized (shorter side to {size}, centre crop; "
                   f"crop_top_left follows)")
    return {"image": img if as_pil else np.asarray(img), "text": text.strip(), "original_size": orig,
            "crop_top_left": crop, "spec": spec, "key": key, "meta": meta}


# ---- sources: what a path holds -------------------------------------------------------------
def _list_shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.tar") if p.is_file())


def _load_metadata(path: Path, stats: LoaderStats) -> list[dict]:
    """metadata.jsonl lines (bad JSON lines skipped and counted); a schema without file_name raises."""
    entries, n_lines = [], 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_lines += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats.skip("bad json", f"{path.name} line {i}")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
                stats.skip("no file_name", f"{path.name} line {i}")
                continue
            entries.append(rec)
    if n_lines and not entries and stats.skipped.get("no file_name"):
        raise ChorusError(f"{path} has no usable 'file_name' field on any line; each line must look like "
                          f'{{"file_name": "0001.png", "text": "a red circle"}} (the imagefolder convention).')
    if entries and not any(isinstance(r.get("text", r.get("caption")), str) for r in entries):
        raise ChorusError(f"{path} has no 'text' (or 'caption') field on any line; each line must give the "
                          f"caption of its image, e.g. {{\"file_name\": \"0001.png\", \"text\": \"a red circle\"}}.")
    return entries


def detect_format(path: str | os.PathLike) -> str:
    """'wds' (tar shards), 'folder' (metadata.jsonl) or 'captioned' (images + .txt); raises if none."""
    p = Path(path)
    if not p.exists():
        raise ChorusError(f"The data path {p} does not exist.")
    if p.is_file():
        if p.suffix == ".tar":
            return "wds"
        raise ChorusError(f"{p} is a file but not a .tar shard; give a folder of images or of .tar shards.")
    if (p / "metadata.jsonl").is_file():
        return "folder"
    if any(p.glob("*.tar")):
        return "wds"
    if any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir()):
        return "captioned"
    raise ChorusError(f"The folder {p} holds no images, no metadata.jsonl and no .tar shards; it is empty "
                      f"or not a data set. Make one with `chorus world make --n 1000 --out {p}`.")


def _split(items: list, part: int, n: int) -> list:
    return items[part::n]


def _worker() -> tuple[int, int]:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return 0, 1
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


try:
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - torch is a dependency, but keep the loader importable
    _Base = object


class ImageTextDataset(_Base):
    """Stream {"image", "text", "original_size", "crop_top_left", "spec", "key", "meta"} dicts.

    `path`: a folder with metadata.jsonl, a folder of images with .txt captions, or WebDataset
    shards (a folder of .tar files, one .tar, or a list of .tar paths). Rank r of `world_size`
    reads shards r, r + world_size, ... (tar shards) or samples r, r + world_size, ... (folders);
    DataLoader workers split a rank's part the same way (by shard when there are enough shards,
    else by sample). `size`: resize images to size × size (a note once). Corrupt samples are
    skipped and counted in `self.stats` (per process); a warning with the summary follows each pass.
    """

    def __init__(self, path, size: int | None = None, rank: int = 0, world_size: int = 1,
                 as_pil: bool = False, warn: bool = True):
        if not 0 <= rank < world_size:
            raise ChorusError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
        self.size, self.rank, self.world_size, self.as_pil, self.warn = size, rank, world_size, as_pil, warn
        self.stats = LoaderStats()
        if isinstance(path, (list, tuple)):
            self.kind, self.shards = "wds", [Path(p) for p in path]
            missing = [str(p) for p in self.shards if not p.is_file()]
            if missing:
                raise ChorusError(f"These shards do not exist: {', '.join(missing[:5])}.")
            self.root = None
        else:
            self.root = Path(path)
            self.kind = detect_format(self.root)
            self.shards = _list_shards(self.root) if self.kind == "wds" else []
        if self.kind == "folder":
            self.entries = _load_metadata(self.root / "metadata.jsonl", self.stats)
        elif self.kind == "captioned":
            self.entries = [{"file_name": p.name} for p in sorted(self.root.iterdir())
                            if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
        else:
            self.entries = []
        if self.kind != "wds" and not self.entries:
            raise ChorusError(f"The folder {self.root} lists no usable samples.")

    # -- one pass ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        it = self._iter_wds(wid, nw) if self.kind == "wds" else self._iter_folder(wid, nw)
        yield from it
        if self.warn and self.stats.n_skipped:
            warnings.warn(f"data loader ({self.root or 'shards'}): {self.stats.summary()}", stacklevel=2)

    def _iter_folder(self, wid: int, nw: int) -> Iterator[dict]:
        part = _split(_split(list(enumerate(self.entries)), self.rank, self.world_size), wid, nw)
        for _, rec in part:
            name = rec["file_name"]
            try:
                img = _decode_image(self._read(self.root / name))
                if self.kind == "captioned":
                    text = self._caption_file(self.root / name)
                else:
                    text = rec.get("text", rec.get("caption"))
                item = _make_item(img, text, rec, Path(name).stem, self.size, self.as_pil, self.stats)
            except _Bad as e:
                self.stats.skip(str(e), name)
                continue
            self.stats.yielded += 1
            yield item

    @staticmethod
    def _read(p: Path) -> bytes:
        try:
            return p.read_bytes()
        except OSError as e:
            raise _Bad("missing image file") from e

    @staticmethod
    def _caption_file(p: Path) -> str:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise _Bad("missing caption")
        try:
            return txt.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _Bad("unreadable caption") from e

    def _iter_wds(self, wid: int, nw: int) -> Iterator[dict]:
        shards, n = self.shards, self.world_size * nw
        if len(shards) >= n:  # whole shards per (rank, worker)
            mine, keep = _split(_split(shards, self.rank, self.world_size), wid, nw), None
        else:  # too few shards: everyone reads all, keeps every n-th sample
            mine, keep = shards, self.rank * nw + wid
        counter = 0
        for shard in mine:
            for key, group in _tar_groups(shard, self.stats):
                if keep is not None:
                    counter += 1
                    if (counter - 1) % n != keep:
                        continue
                try:
                    item = self._wds_item(key, group)
                except _Bad as e:
                    self.stats.skip(str(e), f"{shard.name}:{key}")
                    continue
                self.stats.yielded += 1
                yield item

    def _wds_item(self, key: str, group: dict[str, bytes]) -> dict:
        img_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in group), None)
        if img_ext is None:
            raise _Bad("missing image file")
        meta = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Bad("bad json") from e
            if not isinstance(meta, dict):
                raise _Bad("bad json")
        text = None
        if "txt" in group:
            try:
                text = group["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad("unreadable caption") from e
        text = text if text and text.strip() else meta.get("caption")
        img = _decode_image(group[img_ext])
        return _make_item(img, text, meta, key, self.size, self.as_pil, self.stats)


def _tar_groups(shard: Path, stats: LoaderStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of consecutive tar members sharing a key (text before the first dot)."""
    key, group = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                k = os.path.join(d, stem) if d else stem
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                group[ext.lower()] = tar.extractfile(m).read()
            if shard.stat().st_size - tar.offset < 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks
                raise tarfile.ReadError("the shard ends without tar's end-of-archive marker (truncated)")
    except (tarfile.TarError, OSError, EOFError) as e:
        stats.skip("unreadable shard (rest of it)", f"{shard.name}: {e.__class__.__name__}")
        group = {}  # the sample being read when the shard broke is incomplete
    if key is not None and group:
        yield key, group


def open_dataset(path, size: int | None = None, rank: int = 0, world_size: int = 1, as_pil: bool = False,
                 warn: bool = True) -> ImageTextDataset:
    """A streaming loader for any supported data path (see ImageTextDataset)."""
    return ImageTextDataset(path, size=size, rank=rank, world_size=world_size, as_pil=as_pil, warn=warn)


# ---- writing data sets ----------------------------------------------------------------------
def write_samples(samples: Iterable[tuple[str, Sample]], out_dir, fmt: str = "folder", conditions: bool = False,
                  samples_per_shard: int = 10_000, overwrite: bool = False) -> Path:
    """Write (key, sample) pairs as an image folder or as WebDataset shards; atomic."""
    if fmt == "folder":
        writer = FolderWriter(out_dir, conditions=conditions, overwrite=overwrite)
    elif fmt == "wds":
        writer = ShardWriter(out_dir, samples_per_shard=samples_per_shard, conditions=conditions, overwrite=overwrite)
    else:
        raise ChorusError(f"Unknown format {fmt!r}; use 'folder' (images + metadata.jsonl) or 'wds' (tar shards).")
    with writer:
        for key, sample in samples:
            writer.write(key, sample)
    return Path(out_dir)


def load_specs(path: str | os.PathLike) -> list[dict]:
    """Specs from a JSONL file (one per non-empty line), validated; errors name the line and field."""
    from chorus.world.captions import validate_spec
    p = Path(path)
    if not p.is_file():
        raise ChorusError(f"The spec file {p} does not exist.")
    specs = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChorusError(f"{p.name} line {i} is not valid JSON ({e.msg} at column {e.colno}); each line "
                                  f'must be one spec like {{"prompt": "a red circle", "include": '
                                  f'[{{"class": "circle", "count": 1, "color": "red"}}]}}.') from None
            specs.append({**validate_spec(spec, where=f"{p.name} line {i}"), "_line": i})
    if not specs:
        raise ChorusError(f"The spec file {p} holds no specs (it is empty).")
    return specs
