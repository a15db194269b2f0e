"""The Shapes world renderer: specs in, anti-aliased images with ground truth out.

How one training sample is made (`make_sample`):

1. a *frame*: a native size (h0, w0), log-uniform in [native_min, native_max] (non-square when
   cropping), the size of the canvas resized so its shorter side is `size·u`, u ~ U[1, 1.5], and
   a random crop `size × size` of it at (top, left) — SDXL's `original_size` and `crop_top_left`;
2. a spec from the caption grammar (`captions.sample_spec`) and a *layout* in final-image pixels:
   free non-overlapping positions, or a 3×3 grid when the spec has relations (each relation
   verified with GenEval's rule on the boxes before drawing);
3. when the crop leaves canvas outside a border, up to `max_distractors` *distractors* (shapes the
   spec does not mention) straddle that border, so the crop visibly cuts them; named objects may
   overhang a cropped border by at most `overhang` of their side (>= ~77% of their box stays visible);
4. drawing at the native size: a dark muted background with a faint texture, each object's
   polygon drawn at `supersample`× and box-filtered (anti-aliasing), then the crop window
   resampled to `size × size` (bilinear: a small native size looks blurry, a large one sharp).

Objects whose visible share is under 2% (cut away by the crop) are dropped from the metadata.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from chorus.errors import ChorusError
from chorus.world.captions import HELDOUT_PAIRS, PAIR_TAGS, TAGS, sample_spec, validate_spec
from chorus.world.scene import (BACKGROUNDS, COLOR_JITTER, COLORS, SHAPES, SIZE_JITTER, SIZES, TEXTURES,
                                Sample, WorldObject)


@dataclass
class RenderConfig:
    """Knobs of `make_sample`; the defaults make the built-in data set."""

    native_min: int = 16
    native_max: int = 128
    crop_scale_max: float = 1.5  # resized shorter side / final size, drawn in [1, crop_scale_max]
    aspect_max: float = 4 / 3  # native aspect ratio drawn in [1/aspect_max, aspect_max] when cropping
    supersample: int = 4
    overhang: float = 0.12  # a named object may stick out of a cropped border by this share of its side
    max_distractors: int = 2
    tag_weights: dict[str, float] = field(default_factory=lambda: {
        "single_object": 0.12, "two_object": 0.16, "counting": 0.18, "colors": 0.18,
        "position": 0.18, "color_attr": 0.18})


# ---- geometry -------------------------------------------------------------------------------
@dataclass
class Frame:
    """Native canvas (h0, w0) -> resized canvas (H1, W1) -> crop `size × size` at (top, left)."""

    native: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    size: int

    def window(self) -> tuple[float, float, float, float]:
        """The crop in native pixels: (left, top, left + S, top + S) · (w0 / W1, h0 / H1)."""
        (h0, w0), (h1, w1), (top, left), s = self.native, self.resized, self.crop_top_left, self.size
        sx, sy = w0 / w1, h0 / h1
        return (left * sx, top * sy, (left + s) * sx, (top + s) * sy)

    def open_borders(self) -> dict[str, float]:
        """Canvas beyond each final-image border, in final pixels (0 where the crop is flush)."""
        (h1, w1), (top, left), s = self.resized, self.crop_top_left, self.size
        return {"left": float(left), "top": float(top), "right": float(w1 - left - s),
                "bottom": float(h1 - top - s)}


def draw_frame(rng: np.random.Generator, size: int, crop: bool, cfg: RenderConfig) -> Frame:
    """A native size (log-uniform), and when cropping an aspect ratio, a zoom u and a crop corner."""
    n = int(round(math.exp(rng.uniform(math.log(cfg.native_min), math.log(cfg.native_max)))))
    if not crop:
        return Frame((n, n), (size, size), (0, 0), size)
    r = math.exp(rng.uniform(-math.log(cfg.aspect_max), math.log(cfg.aspect_max)))
    h0, w0 = (n, max(n, int(round(n * r)))) if r >= 1 else (max(n, int(round(n / r))), n)
    k = size * rng.uniform(1.0, cfg.crop_scale_max) / n
    h1, w1 = max(size, int(round(h0 * k))), max(size, int(round(w0 * k)))
    top, left = int(rng.integers(0, h1 - size + 1)), int(rng.integers(0, w1 - size + 1))
    return Frame((h0, w0), (h1, w1), (top, left), size)


def _unit(points) -> np.ndarray:
    """Scale a polygon so its bounding box is exactly [-1, 1]² (the object's box is tight)."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / ((hi - lo) / 2)


def _star(k: int = 5, inner: float = 0.45):
    a = -np.pi / 2 + np.arange(2 * k) * np.pi / k
    r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart(n: int = 48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _regular(k: int, phase: float = 0.0):
    a = phase + np.arange(k) * 2 * np.pi / k
    return np.stack([np.cos(a), np.sin(a)], 1)


_W = 0.32  # half-width of a cross arm
POLYGONS: dict[str, np.ndarray] = {  # unit polygons, y pointing down
    "circle": _unit(_regular(64)),
    "square": _unit([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _unit([(0, -1), (1, 1), (-1, 1)]),
    "star": _unit(_star()),
    "heart": _unit(_heart()),
    "cross": _unit([(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1),
                    (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)]),
    "diamond": _unit([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "hexagon": _unit(_regular(6)),
}
assert set(POLYGONS) == set(SHAPES)


@dataclass
class Placed:
    """An object laid out in final-image pixels: centre (cx, cy) and side of its square box."""

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    side: float
    in_caption: bool = True

    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def relations(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """GenEval's rule: o = c_a − c_b shrunk by t·(dim_a + dim_b) per axis; an axis holding > half of |o| names it."""
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    off = ca - cb
    rev = np.maximum(np.abs(off) - threshold * dims, 0) * np.sign(off)
    if np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / np.linalg.norm(off)
    return {r for r, ok in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                            ("below", dy > 0.5)) if ok}


def _overlaps(a: Placed, others: list[Placed], gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    for o in others:
        bx0, by0, bx1, by1 = o.box()
        if ax0 < bx1 + gap and bx0 < ax1 + gap and ay0 < by1 + gap and by0 < ay1 + gap:
            return True
    return False


# ---- layout ---------------------------------------------------------------------------------
def allowed_color(rng: np.random.Generator, shape: str, split: str) -> str:
    """A random colour; outside the heldout_pairs split never one of the held-out pairs."""
    choices = [c for c in COLORS if split == "heldout_pairs" or (c, shape) not in HELDOUT_PAIRS]
    return choices[int(rng.integers(len(choices)))]


def _jitter_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    d = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3).tolist()
    return tuple(min(255, max(0, c + e)) for c, e in zip(COLORS[color], d))


def _objects_of(rng: np.random.Generator, include: list[dict], size: int, split: str) -> list[Placed]:
    """One Placed per object the include clauses demand (colour/size drawn where unspecified)."""
    out = []
    for req in include:
        for _ in range(int(req.get("count", 1))):
            color = req.get("color") or allowed_color(rng, req["class"], split)
            sname = req.get("size") or list(SIZES)[int(rng.integers(len(SIZES)))]
            side = SIZES[sname] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
            out.append(Placed(req["class"], color, sname, _jitter_rgb(rng, color), 0.0, 0.0, side))
    return out


def _center_range(side: float, size: int, lo_open: float, hi_open: float, overhang: float):
    """Allowed centres along one axis: 1 px margin, or overhang past a border the crop left open."""
    lo = -overhang * side if lo_open >= overhang * side else 1.0
    hi = size + overhang * side if hi_open >= overhang * side else size - 1.0
    return lo + side / 2, hi - side / 2


def _place_free(rng, objs: list[Placed], size: int, borders: dict, overhang: float) -> bool:
    """Rejection-sample non-overlapping centres, largest object first."""
    done: list[Placed] = []
    for ob in sorted(objs, key=lambda o: -o.side):
        xr = _center_range(ob.side, size, borders["left"], borders["right"], overhang)
        yr = _center_range(ob.side, size, borders["top"], borders["bottom"], overhang)
        for _ in range(60):
            ob.cx, ob.cy = rng.uniform(*xr), rng.uniform(*yr)
            if not _overlaps(ob, done, gap=1.0):
                done.append(ob)
                break
        else:
            return False
    return True


def _cell_ok(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Grid cells (row, col): A is `rel` B along a dominant axis."""
    dr, dc = a[0] - b[0], a[1] - b[1]
    return {"left of": dc < 0 and abs(dr) < -dc, "right of": dc > 0 and abs(dr) < dc,
            "above": dr < 0 and abs(dc) < -dr, "below": dr > 0 and abs(dc) < dr}[rel]


def _constraints(include: list[dict]) -> list[tuple[int, str, int]]:
    """(object index, relation, target object index) for every pair a position clause demands."""
    starts = np.cumsum([0] + [int(r.get("count", 1)) for r in include])
    out = []
    for i, req in enumerate(include):
        if "position" in req:
            rel, j = req["position"][0], int(req["position"][1])
            out += [(a, rel, b) for a in range(starts[i], starts[i + 1]) for b in range(starts[j], starts[j + 1])]
    return out


def _place_grid(rng, objs: list[Placed], size: int, cons) -> bool:
    """3×3 grid cells that satisfy the relations, jittered inside the cell, checked with GenEval's rule."""
    if len(objs) > 9:
        return False
    cell = size / 3
    for _ in range(50):
        cells = [divmod(int(c), 3) for c in rng.permutation(9)[:len(objs)]]
        if all(_cell_ok(rel, cells[a], cells[b]) for a, rel, b in cons):
            break
    else:
        return False
    for ob, (r, c) in zip(objs, cells):
        j = max(0.0, (cell - ob.side) / 2) * 0.9
        ob.cx = min(max((c + 0.5) * cell + rng.uniform(-j, j), ob.side / 2 + 1), size - 1 - ob.side / 2)
        ob.cy = min(max((r + 0.5) * cell + rng.uniform(-j, j), ob.side / 2 + 1), size - 1 - ob.side / 2)
    if any(_overlaps(o, objs[:i], gap=1.0) for i, o in enumerate(objs)):
        return False
    return all(rel in relations(objs[a].box(), objs[b].box()) for a, rel, b in cons)


def layout(rng: np.random.Generator, include: list[dict], size: int, frame: Frame | None = None,
           split: str = "train", overhang: float = 0.0) -> list[Placed]:
    """Objects of the include clauses placed in final pixels (grid if relations, else free)."""
    borders = frame.open_borders() if frame is not None else dict.fromkeys(("left", "top", "right", "bottom"), 0.0)
    objs = _objects_of(rng, include, size, split)
    cons = _constraints(include)
    for attempt in range(200):
        ok = _place_grid(rng, objs, size, cons) if cons else _place_free(rng, objs, size, borders, overhang)
        if ok:
            return objs
        if attempt % 10 == 9:  # crowded: shrink everything a little and try again
            for o in objs:
                o.side *= 0.93
    n = len(objs)
    raise ChorusError(f"Could not lay out {n} objects ({', '.join(r['class'] for r in include)}) in a "
                      f"{size}×{size} image with their relations; use fewer or smaller objects, or a larger size.")


def add_distractors(rng: np.random.Generator, objs: list[Placed], frame: Frame, banned: set[str],
                    split: str, max_n: int) -> list[Placed]:
    """Shapes the spec never names, straddling borders the crop left open (so the crop cuts them)."""
    open_b = {k: v for k, v in frame.open_borders().items() if v > 2}
    if not open_b or max_n <= 0:
        return []
    free = [s for s in SHAPES if s not in banned]
    size, out = frame.size, []
    for _ in range(int(rng.integers(0, max_n + 1))):
        shape = free[int(rng.integers(len(free)))]
        sname = list(SIZES)[int(rng.integers(len(SIZES)))]
        color = allowed_color(rng, shape, split)
        side = SIZES[sname] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        d = Placed(shape, color, sname, _jitter_rgb(rng, color), 0.0, 0.0, side, in_caption=False)
        names = sorted(open_b)
        for _ in range(20):
            border = names[int(rng.integers(len(names)))]
            vis = max(rng.uniform(0.1, 0.7), 1 - open_b[border] / side)  # visible share of the side
            if vis > 0.9:
                continue
            across = -side / 2 + vis * side  # centre coordinate measured inward from the border
            along = rng.uniform(side / 2, size - side / 2)
            if border in ("left", "right"):
                d.cx, d.cy = (across if border == "left" else size - across), along
            else:
                d.cx, d.cy = along, (across if border == "top" else size - across)
            if not _overlaps(d, objs + out, gap=1.0):
                out.append(d)
                break
    return out


# ---- drawing --------------------------------------------------------------------------------
_TEXTURE_BANK: dict[tuple[str, int], np.ndarray] = {}
_BANK_VARIANTS = 8


def _texture_field(texture: str, variant: int, n: int) -> np.ndarray:
    """An (n, n) int16 texture field of amplitude <= 8 levels; fixed per (texture, variant, n), cached."""
    key = (texture, variant, n)
    if key not in _TEXTURE_BANK:
        rng = np.random.default_rng([variant, TEXTURES.index(texture), n])
        yy, xx = np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.float32)[None, :]
        a = rng.uniform(0, np.pi)
        u = np.cos(a) * xx + np.sin(a) * yy  # coordinate along a random direction
        if texture == "noise":
            field = rng.normal(0.0, 2.5, (n, n))
        elif texture == "gradient":
            field = 6.0 * ((u - u.min()) / max(float(u.max() - u.min()), 1.0) * 2 - 1)
        elif texture == "stripes":
            field = 5.0 * np.sin(2 * np.pi * u / rng.uniform(3, 10))
        else:  # checker
            s = rng.uniform(3, 10)
            field = 4.0 * ((np.floor(xx / s) + np.floor(yy / s)) % 2 * 2 - 1)
        _TEXTURE_BANK[key] = np.clip(np.round(field), -8, 8).astype(np.int16)
    return _TEXTURE_BANK[key]


def background(rng: np.random.Generator, h: int, w: int) -> tuple[str, str, Image.Image]:
    """A dark muted tint plus a faint texture (<= 8 levels): a random window of a fixed texture bank."""
    names = list(BACKGROUNDS)
    name, texture = names[int(rng.integers(len(names)))], TEXTURES[int(rng.integers(len(TEXTURES)))]
    tint = BACKGROUNDS[name]
    if texture == "flat":
        return name, texture, Image.new("RGB", (w, h), tint)
    n = 1 << max(7, int(math.ceil(math.log2(max(h, w)))) + 1)  # bank side >= 2·max(h, w)
    field = _texture_field(texture, int(rng.integers(_BANK_VARIANTS)), n)
    y, x = int(rng.integers(n - h + 1)), int(rng.integers(n - w + 1))
    img = np.asarray(tint, np.int16) + field[y:y + h, x:x + w, None]
    return name, texture, Image.fromarray(img.astype(np.uint8))


def _patch(cx: float, cy: float, rx: float, ry: float, h: int, w: int):
    """Integer native-pixel box (x0, y0, x1, y1) covering the object, clipped; None if off-canvas."""
    x0, x1 = max(int(math.floor(cx - rx)), 0), min(int(math.ceil(cx + rx)), w)
    y0, y1 = max(int(math.floor(cy - ry)), 0), min(int(math.ceil(cy + ry)), h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _polygon_ss(poly: np.ndarray, cx: float, cy: float, rx: float, ry: float, x0: int, y0: int, ss: int):
    """Polygon vertices in the ss× patch (PIL samples pixel centres at integer coordinates)."""
    xs = (cx + poly[:, 0] * rx - x0) * ss - 0.5
    ys = (cy + poly[:, 1] * ry - y0) * ss - 0.5
    return list(zip(xs.tolist(), ys.tolist()))


def _to_array(img: Image.Image, dtype=np.uint8) -> np.ndarray:
    return np.asarray(img, dtype=dtype)


def _instance_map(alphas: list[np.ndarray]) -> np.ndarray:
    """Visible pixels: v_i = a_i · Π_{j>i}(1 − a_j); pixel -> argmax_i v_i where v_i >= peak_i / 2."""
    a = np.stack(alphas)  # (K, S, S), drawing order = index order
    c = np.cumprod(np.concatenate([np.ones_like(a[:1]), (1 - a)[::-1]]), axis=0)  # c_k = Π_{j >= K-k}(1 − a_j)
    above = c[:len(a)][::-1]  # above_i = Π_{j > i}(1 − a_j)
    vis = a * above
    peak = a.reshape(len(a), -1).max(1)[:, None, None]
    vis = np.where((vis >= 0.5 * peak) & (peak > 1e-3), vis, 0.0)
    label = vis.argmax(0).astype(np.int16) + 1
    label[vis.max(0) <= 0] = 0
    return label


def draw(rng: np.random.Generator, frame: Frame, objs: list[Placed], ss: int = 4, with_instances: bool = False):
    """Render at the native size, resample the crop window to size × size.

    Each object: the canvas patch under it is upsampled ss× (nearest), the polygon filled in its
    colour, and the patch box-filtered back (= exact-area anti-aliasing at 1/ss² resolution).
    Returns (image uint8 (S, S, 3), instance map or None, background name, texture).
    """
    (h0, w0), (h1, w1), (top, left), size = frame.native, frame.resized, frame.crop_top_left, frame.size
    sx, sy = w0 / w1, h0 / h1
    bg_name, texture, canvas = background(rng, h0, w0)
    win = frame.window()
    alphas = []
    for ob in objs:
        cx, cy, rx, ry = (ob.cx + left) * sx, (ob.cy + top) * sy, ob.side / 2 * sx, ob.side / 2 * sy
        box = _patch(cx, cy, rx, ry, h0, w0)
        if box is None:
            alphas.append(None)
            continue
        pw, ph = box[2] - box[0], box[3] - box[1]
        pts = _polygon_ss(POLYGONS[ob.shape], cx, cy, rx, ry, box[0], box[1], ss)
        big = canvas.crop(box).resize((pw * ss, ph * ss), Image.NEAREST)
        ImageDraw.Draw(big).polygon(pts, fill=ob.rgb)
        canvas.paste(big.reduce(ss), box[:2])
        if with_instances:
            mask = Image.new("L", (pw * ss, ph * ss), 0)
            ImageDraw.Draw(mask).polygon(pts, fill=255)
            full = Image.new("F", (w0, h0), 0.0)
            full.paste(mask.reduce(ss).convert("F"), box[:2])
            alphas.append(full)
        else:
            alphas.append(None)
    image = _to_array(canvas.resize((size, size), Image.BILINEAR, box=win))
    inst = None
    if with_instances:
        small = [np.zeros((size, size), np.float32) if f is None else
                 _to_array(f.resize((size, size), Image.BILINEAR, box=win), np.float32) / 255.0 for f in alphas]
        inst = _instance_map(small) if small else np.zeros((size, size), np.int16)
    return image, inst, bg_name, texture


def _box_fraction(box: tuple[float, float, float, float], size: int) -> float:
    """Share of a box's area inside the size × size image."""
    x0, y0, x1, y1 = box
    inside = max(0.0, min(x1, size) - max(x0, 0)) * max(0.0, min(y1, size) - max(y0, 0))
    return inside / max((x1 - x0) * (y1 - y0), 1e-9)


def _world_objects(objs: list[Placed], size: int) -> list[WorldObject]:
    out = []
    for ob in objs:
        x0, y0, x1, y1 = ob.box()
        box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(size)), min(y1, float(size)))
        touches = box[0] <= 0.5 or box[1] <= 0.5 or box[2] >= size - 0.5 or box[3] >= size - 0.5
        out.append(WorldObject(ob.shape, ob.color, ob.size, box, bool(touches), ob.rgb, ob.in_caption,
                               _box_fraction(ob.box(), size)))
    return out


def _compose(rng, frame: Frame, objs: list[Placed], spec: dict, ss: int, with_instances: bool,
             extra: dict, min_visible: float = 0.02) -> Sample:
    image, inst, bg, tex = draw(rng, frame, objs, ss, with_instances)
    world = _world_objects(objs, frame.size)
    keep = [i for i, o in enumerate(world) if o.in_caption or o.visible_fraction >= min_visible]
    if inst is not None and len(keep) < len(world):  # renumber the instance map after dropping
        lut = np.zeros(len(world) + 1, np.int16)
        lut[[k + 1 for k in keep]] = np.arange(1, len(keep) + 1, dtype=np.int16)
        inst = lut[inst]
    return Sample(image=image, caption=spec.get("prompt", ""), spec=spec, objects=[world[k] for k in keep],
                  original_size=frame.native, crop_top_left=frame.crop_top_left, instance_map=inst,
                  background=bg, texture=tex, extra=extra)


# ---- public entry points ---------------------------------------------------------------------
def make_sample(seed: int, index: int, size: int = 64, crop: bool = True, split: str = "train",
                with_instances: bool = False, config: RenderConfig | None = None) -> Sample:
    """Sample `index` of the data set `seed`: a caption of a random task tag and its image.

    Deterministic for (seed, index, size, crop, split, config).
    """
    cfg = config or RenderConfig()
    if size < 16:
        raise ChorusError(f"Image size {size} is too small for the Shapes world; use 16 or more.")
    rng = np.random.default_rng([int(seed), int(index), 0x5A9E5])
    tags = [t for t in TAGS if split != "heldout_pairs" or t in PAIR_TAGS]
    w = np.cumsum([cfg.tag_weights.get(t, 0.0) for t in tags])
    tag = tags[min(int(np.searchsorted(w, rng.random() * w[-1], side="right")), len(tags) - 1)]
    spec = sample_spec(rng, tag, split)
    frame = draw_frame(rng, size, crop, cfg)
    objs = layout(rng, spec["include"], size, frame, split, cfg.overhang if crop else 0.0)
    if crop:
        banned = {r["class"] for r in spec["include"] + spec["exclude"]}
        objs = objs + add_distractors(rng, objs, frame, banned, split, cfg.max_distractors)
    extra = {"tag": tag, "split": split, "seed": int(seed), "index": int(index)}
    return _compose(rng, frame, objs, spec, cfg.supersample, with_instances, extra)


def _check_excludes(spec: dict) -> None:
    counts: dict[str, int] = {}
    for r in spec["include"]:
        counts[r["class"]] = counts.get(r["class"], 0) + int(r["count"])
    for r in spec["exclude"]:
        if counts.get(r["class"], 0) >= int(r["count"]):
            raise ChorusError(f"The spec {spec.get('prompt', '')!r} asks for {counts[r['class']]} "
                              f"{r['class']}(s) and excludes {r['count']} or more; no image satisfies it.")


def render_spec(spec: dict, seed: int, size: int = 64, with_instances: bool = False,
                native: int | None = None, supersample: int = 4) -> Sample:
    """An image that satisfies `spec` (no crop; drawn at `native` px, default `size`, then resized)."""
    spec = validate_spec(spec)
    _check_excludes(spec)
    rng = np.random.default_rng([int(seed), 0xC0DE])
    n = int(native or size)
    frame = Frame((n, n), (size, size), (0, 0), size)
    objs = layout(rng, spec["include"], size, frame, spec.get("split", "train"), 0.0)
    extra = {"tag": spec.get("tag", ""), "split": spec.get("split", "train"), "seed": int(seed)}
    return _compose(rng, frame, objs, spec, supersample, with_instances, extra)


def _describe(objs: list[Placed]) -> tuple[str, list[dict]]:
    """'a red circle, two blue stars and a gray cross' and one include clause per (shape, colour)."""
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o.shape, o.color)] = groups.get((o.shape, o.color), 0) + 1
    words = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    parts = []
    for (shape, color), n in groups.items():
        noun = shape + ("es" if shape == "cross" else "s") if n > 1 else shape
        art = ("an" if color[0] in "aeiou" else "a") if n == 1 else words.get(n, str(n))
        parts.append(f"{art} {color} {noun}")
    text = "an empty background" if not parts else (
        parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    include = [{"class": s, "count": n, "color": c} for (s, c), n in groups.items()]
    return text, include


def random_scene_sample(rng: np.random.Generator, size: int = 64, min_objects: int = 0, max_objects: int = 4,
                        occlusion: bool = False, native_range: tuple[int, int] | None = None,
                        split: str = "train", with_instances: bool = True, supersample: int = 4) -> Sample:
    """A free-form scene for training the evaluator: 0..4 objects of any shape, colour and size.

    Positions are uniform in the image (1 px margin, never cut). Without `occlusion` boxes never
    overlap; with it a new object may overlap earlier ones by up to 35% of the smaller box (later
    objects are drawn on top; the instance map holds the visible pixels). Shapes may repeat.
    `native_range` (lo, hi) draws a native size log-uniformly (blur); default: drawn at `size`.
    The caption lists every object; the spec (tag "scene") has one clause per (shape, colour).
    """
    n = int(rng.integers(min_objects, max_objects + 1))
    objs: list[Placed] = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = allowed_color(rng, shape, split)
        sname = list(SIZES)[int(rng.integers(len(SIZES)))]
        side = SIZES[sname] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        ob = Placed(shape, color, sname, _jitter_rgb(rng, color), 0.0, 0.0, side)
        for _ in range(60):
            ob.cx = rng.uniform(side / 2 + 1, size - 1 - side / 2)
            ob.cy = rng.uniform(side / 2 + 1, size - 1 - side / 2)
            if not (_too_much_overlap(ob, objs, 0.35) if occlusion else _overlaps(ob, objs, gap=1.0)):
                objs.append(ob)
                break
    nat = size
    if native_range is not None:
        lo, hi = native_range
        nat = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    frame = Frame((nat, nat), (size, size), (0, 0), size)
    text, include = _describe(objs)
    spec = {"prompt": text, "tag": "scene", "include": include, "exclude": [], "split": split}
    return _compose(rng, frame, objs, spec, supersample, with_instances, {"tag": "scene", "split": split})


def _too_much_overlap(a: Placed, others: list[Placed], limit: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    for o in others:
        bx0, by0, bx1, by1 = o.box()
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        if inter > limit * min(a.side, o.side) ** 2:
            return True
    return False
