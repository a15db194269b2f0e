"""The training stream: which examples each rank trains on at each step, and their conditioning inputs.

Sources
    WorldSource   the Shapes world rendered on the fly: example `i` is `make_sample(seed, i)`. With
                  `epoch_size` N the world is a fixed set of N examples (so latents can be cached by
                  index and each is encoded once); with N = None it is endless (no latent cache).
    FolderSource  an image folder (metadata.jsonl or .txt captions), read once into memory; corrupt
                  images and empty captions are skipped and counted by the world loader.
    StreamSource  WebDataset shards, streamed: each rank reads its own shard set
                  (`open_dataset(path, rank, world_size)`) through a seeded shuffle buffer.

Order (indexed sources): the examples of step s are the positions s·B … s·B + B − 1 of one global
sequence, position p → index perm_e[p mod N] with e = p div N and perm_e a permutation seeded by
(seed, e). Rank r of W with A accumulation micro-batches takes positions r·B/W + m·B/(W·A) + j of its
micro-batch m. So the examples — and the noise the trainer draws per global position — are a
function of (seed, step) only, the same for 1 or W processes, and resuming at step s continues
the exact sequence. A stream is per rank: rank r's position after s steps is s·B/W examples.

Micro-conditioning (SDXL) inputs come from each example's metadata, never from the decoded image:
`original_size` (h, w) and `crop_top_left` (top, left) as the renderer or the data set records
them, `target_size` = (resolution, resolution).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from chorus.errors import ChorusError


@dataclass
class Example:
    """One training example: the image and what the conditioner reads about it."""

    key: int | str               # the cache key: source index (indexed sources) or sample key (streams)
    image: np.ndarray | None     # (H, W, 3) uint8; None when its latent is cached
    text: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    alt_text: str | None = None  # a descriptive caption of the same image (the caption policy picks per visit)
    control: np.ndarray | None = None  # (H, W, 3) uint8 condition image of a ControlNet run (kept when cached)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


# --- sources -----------------------------------------------------------------------------------------

class WorldSource:
    """The on-the-fly Shapes world: example i = make_sample(seed, i, resolution, crop)."""

    def __init__(self, seed: int, resolution: int, crop: bool = True, epoch_size: int | None = None,
                 native_min: int | None = None, descriptive: bool = False, condition: str | None = None):
        self.seed, self.resolution, self.crop, self.size = seed, resolution, crop, epoch_size
        self.native_min, self.descriptive, self.condition = native_min, descriptive, condition

    def get(self, index: int) -> Example:
        from chorus.world.render import RenderConfig, make_sample
        config = RenderConfig(native_min=self.native_min) if self.native_min else None
        s = make_sample(self.seed, index, size=self.resolution, crop=self.crop, config=config,
                        with_instances=self.condition is not None)
        control = None
        if self.condition is not None:
            from chorus.world.conditions import condition_image
            control = condition_image(s, self.condition)
        alt = None
        if self.descriptive:
            from chorus.world.captions import describe_scene
            alt = describe_scene(np.random.default_rng([self.seed, index, 0xDE5C]), s.objects)
        return Example(index, s.image, s.caption, tuple(s.original_size), tuple(s.crop_top_left),
                       (self.resolution, self.resolution), alt, control)

    def describe(self) -> str:
        n = "endless" if self.size is None else f"{self.size} examples"
        c = f", {self.condition} conditions" if self.condition else ""
        return f"Shapes world (seed {self.seed}, {self.resolution}px, {n}{c})"


class FolderSource:
    """An image folder read into memory once; bad samples are skipped and counted."""

    def __init__(self, path, resolution: int):
        from chorus.world.formats import open_dataset
        ds = open_dataset(path, size=resolution, warn=False)
        self.items = [Example(i, it["image"], it["text"], tuple(it["original_size"]), tuple(it["crop_top_left"]),
                              (resolution, resolution)) for i, it in enumerate(ds)]
        self.stats, self.path = ds.stats, path
        self.size = len(self.items)
        if not self.items:
            raise ChorusError(f"The data folder {path} yielded no usable samples ({ds.stats.summary()}).")

    def get(self, index: int) -> Example:
        return self.items[index]

    def describe(self) -> str:
        return f"image folder {self.path}: {self.stats.summary()}"


class StreamSource:
    """WebDataset shards streamed per rank through a seeded shuffle buffer, epoch after epoch."""

    def __init__(self, path, resolution: int, rank: int, world_size: int, seed: int, buffer: int = 1000):
        from chorus.world.formats import open_dataset
        self.ds = open_dataset(path, size=resolution, rank=rank, world_size=world_size, warn=False)
        self.path, self.resolution, self.rank, self.seed, self.buffer = path, resolution, rank, seed, max(1, buffer)
        self.size = None
        self.position, self._it = 0, None

    def _epochs(self) -> Iterator[Example]:
        epoch = 0
        while True:
            rng = np.random.default_rng(mix_seed(self.seed, self.rank, epoch))
            pool, n = [], 0
            for it in self.ds:
                n += 1
                pool.append(it)
                if len(pool) >= self.buffer:
                    yield self._example(pool.pop(int(rng.integers(len(pool)))))
            while pool:
                yield self._example(pool.pop(int(rng.integers(len(pool)))))
            if n == 0:
                raise ChorusError(f"The shards at {self.path} hold no usable samples for rank {self.rank} "
                                  f"({self.ds.stats.summary()}).")
            epoch += 1

    def _example(self, it: dict) -> Example:
        return Example(it["key"], it["image"], it["text"], tuple(it["original_size"]), tuple(it["crop_top_left"]),
                       (self.resolution, self.resolution))

    def seek(self, position: int) -> None:
        """Continue after `position` examples of this rank (resume: re-reads and drops them)."""
        self._it, self.position = self._epochs(), 0
        for _ in range(position):
            next(self._it)
        self.position = position

    def take(self, n: int) -> list[Example]:
        if self._it is None:
            self.seek(0)
        out = [next(self._it) for _ in range(n)]
        self.position += n
        return out

    def describe(self) -> str:
        return f"WebDataset shards {self.path} (rank {self.rank}: {len(self.ds.shards)} shards in total)"


def open_source(cfg, rank: int = 0, world_size: int = 1):
    """The data source a UNetTrainConfig names: the world (data=None), a folder, or shards."""
    if cfg.data is None:
        return WorldSource(cfg.world_seed, cfg.resolution, cfg.world_crop, cfg.epoch_size,
                           getattr(cfg, "native_min", None), getattr(cfg, "descriptive_captions", 0.0) > 0,
                           getattr(cfg, "condition", None))
    if getattr(cfg, "condition", None):
        raise ChorusError("ControlNet training renders its conditions from the Shapes world (data=None); an "
                          "image folder or shards carry no condition images.")
    from chorus.world.formats import detect_format
    if detect_format(cfg.data) == "wds":
        return StreamSource(cfg.data, cfg.resolution, rank, world_size, cfg.world_seed, cfg.shuffle_buffer)
    return FolderSource(cfg.data, cfg.resolution)


# --- order -------------------------------------------------------------------------------------------

class Order:
    """Position p of the global sequence → source index (a fresh permutation per epoch when finite)."""

    def __init__(self, seed: int, size: int | None):
        self.seed, self.size = seed, size
        self._epoch, self._perm = None, None

    def index(self, position: int) -> int:
        if self.size is None:
            return position
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x0DE5))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm[offset]


def local_positions(step: int, batch_size: int, world_size: int, rank: int, grad_accum: int, micro: int) -> range:
    """Positions (in the global sequence) of rank's micro-batch `micro` at `step`."""
    per_rank = batch_size // world_size
    mb = per_rank // grad_accum
    start = step * batch_size + rank * per_rank + micro * mb
    return range(start, start + mb)


def offsets_in_batch(step: int, batch_size: int, positions: range) -> slice:
    """Where a micro-batch sits inside its step's global batch (to slice the per-step random draws)."""
    first = positions.start - step * batch_size
    return slice(first, first + len(positions))


def check_batch(batch_size: int, world_size: int, grad_accum: int) -> None:
    if batch_size % (world_size * grad_accum):
        raise ChorusError(f"batch_size={batch_size} must be divisible by world size × grad_accum = "
                          f"{world_size} × {grad_accum}; each rank and micro-batch takes an equal share.")


class Stream:
    """The examples of each (step, micro-batch) for this rank, from any source."""

    def __init__(self, source, cfg, rank: int, world_size: int):
        check_batch(cfg.batch_size, world_size, cfg.grad_accum)
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self.order = Order(mix_seed(cfg.world_seed, 0x5EED), getattr(source, "size", None))
        self.indexed = not isinstance(source, StreamSource)
        self.known: dict[int, Example] = {}   # image-less copies of examples whose latent is cached

    def start_at(self, step: int) -> None:
        """Position the stream for resuming at `step` (streams re-read what ranks consumed)."""
        if not self.indexed:
            self.source.seek(step * self.cfg.batch_size // self.world_size)

    def micro_batch(self, step: int, micro: int, have_latent=lambda key: False) -> tuple[list[Example], slice]:
        """The examples of one micro-batch and their slice of the global batch.

        An example whose latent is cached (`have_latent(index)`) comes back without its image and is
        not rendered or decoded again.
        """
        c = self.cfg
        pos = local_positions(step, c.batch_size, self.world_size, self.rank, c.grad_accum, micro)
        if not self.indexed:
            return self.source.take(len(pos)), offsets_in_batch(step, c.batch_size, pos)
        examples = []
        for p in pos:
            idx = self.order.index(p)
            if have_latent(idx) and idx in self.known:   # cached: no rendering, no decoding
                examples.append(self.known[idx])
                continue
            ex = self.source.get(idx)
            if self.cacheable():
                self.known[idx] = Example(ex.key, None, ex.text, ex.original_size, ex.crop_top_left, ex.target_size,
                                          ex.alt_text, ex.control)
            examples.append(ex)
        examples = [self.caption_policy(p, e) for p, e in zip(pos, examples)]
        return examples, offsets_in_batch(step, c.batch_size, pos)

    def caption_policy(self, position: int, ex: Example) -> Example:
        """The descriptive caption with probability `descriptive_captions`, drawn afresh at every visit
        (a function of the seed and the global position, so runs and resumes repeat it), else the short one."""
        share = getattr(self.cfg, "descriptive_captions", 0.0)
        if not ex.alt_text or share <= 0:
            return ex
        u = (mix_seed(self.cfg.world_seed, position, 0xCA97) % 1_000_003) / 1_000_003
        if u >= share:
            return ex
        return Example(ex.key, ex.image, ex.alt_text, ex.original_size, ex.crop_top_left, ex.target_size, ex.alt_text,
                       ex.control)

    def cacheable(self) -> bool:
        """Latents can be cached by index: a finite indexed source."""
        return self.indexed and getattr(self.source, "size", None) is not None


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images → (B, 3, H, W) float32 in [−1, 1]."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def conditioner_inputs(examples: list[Example]) -> dict[str, list]:
    """What the conditioner's embedders read: prompts and the SDXL micro-conditioning numbers."""
    return {"prompt": [e.text for e in examples],
            "original_size": [e.original_size for e in examples],
            "crop_top_left": [e.crop_top_left for e in examples],
            "target_size": [e.target_size for e in examples],
            "aesthetic_score": [quality_score(e.original_size) for e in examples]}


def quality_score(original_size) -> float:
    """SDXL's aesthetic score, in the world's terms: its one quality axis is the native resolution (a small
    native size is resampled up, blurry), mapped log-linearly onto SDXL's 0–10 scale — 16 px → 0, 32 → 3.3,
    64 → 6.7, 128 px and more → 10 (so diffusers' defaults 6 / 2.5 ask for ~57 px vs ~14 px)."""
    import math
    side = max(1, min(int(original_size[0]), int(original_size[1])))
    return float(min(10.0, max(0.0, 10.0 * (math.log2(side) - 4.0) / 3.0)))
