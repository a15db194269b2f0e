"""How far to trust the evaluator where generated images differ from renders.

The honesty checks (`eval_cli.honesty`) show that renders pass their own specs and fail shuffled
ones. A shuffled spec usually differs in several attributes at once; a diffusion sample that is
*almost* right differs in one, and is blurred, noisy, off-colour or slightly warped. This module
measures the evaluator on exactly that:

* **minimal pairs** (`minimal_pairs`): a spec that differs from a render's own spec in exactly one
  demanded attribute — a colour replaced (colors), the two colours swapped (color_attr), the
  relation flipped (position), the count one higher or one lower (counting). The render does not
  satisfy it, so every pass is a lenient verdict;
* **degradations like samples** (`DEGRADATIONS`): blur, additive noise, a global colour cast within
  twice the world's colour jitter, a slight affine or elastic warp, and a shift that pushes an
  object across the border. Geometric ones warp the renderer's instance map too, so the
  ground-truth verdict is recomputed from the warped objects (`truth_verdict`) instead of assumed;
* **a classical check** (`classical_verdict`, `agreement`): connected components of pixels close to
  each colour anchor, without any learning — a second opinion on the colour/count part of a verdict
  that the evaluator's colour/count reading can be compared with on any images, samples included.

`trust_report` runs the first two on renders of a list of specs and returns the rates; the tests
(`tests/world/test_evaluator_trust.py`) assert floors and ceilings on it.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from chorus.world.eval_cli import HONESTY_SEED
from chorus.world.scene import BACKGROUNDS, COLORS, RELATIONS, WorldObject
from chorus.world.scoring import Detection, evaluate_spec

TRUST_SEED = HONESTY_SEED + 40_000  # render_spec seeds 7_040_000 + i: disjoint from the other honesty renders
FLIP: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
assert set(FLIP) == set(RELATIONS)


# --------------------------------------------------------------------------------------------
# spec subsets and minimal pairs
# --------------------------------------------------------------------------------------------

def spread_specs(specs: list[dict], per_tag: int, tags: tuple[str, ...] | None = None) -> list[dict]:
    """`per_tag` specs of each task, evenly spaced over its prompts (the benchmark lists a task's
    held-out prompts last, so the spread includes some); tags in their order of first appearance."""
    tags = tags or tuple(dict.fromkeys(s.get("tag", "?") for s in specs))
    out = []
    for tag in tags:
        of_tag = [s for s in specs if s.get("tag") == tag]
        if of_tag:
            idx = np.unique(np.linspace(0, len(of_tag) - 1, min(per_tag, len(of_tag))).round().astype(int))
            out += [of_tag[i] for i in idx]
    return out


def _variant(spec: dict, include: list[dict], exclude: list[dict], change: str) -> dict:
    return {**spec, "include": include, "exclude": exclude, "minimal_pair": change}


def minimal_pairs(spec: dict) -> list[tuple[str, dict]]:
    """(kind, spec) pairs that differ from `spec` in exactly one demanded attribute.

    * colors: the colour replaced by each of the nine others (kind "color replaced");
    * color_attr: the two colours swapped (kind "color swap"; none when both are the same colour);
    * position: the relation flipped, left <-> right, above <-> below (kind "relation flip");
    * counting: n + 1 (kind "count +1") and n - 1 (kind "count -1"), excludes moved along.

    Every other field (shapes, sizes, the other clauses) stays; `minimal_pair` says what changed.
    An image that satisfies `spec` satisfies none of them, given its objects are exactly those
    `spec` names (true of `render_spec`); `truth_verdict` checks it per image all the same.
    """
    tag, inc, exc = spec.get("tag"), spec["include"], spec.get("exclude", [])
    out: list[tuple[str, dict]] = []
    if tag == "colors" and len(inc) == 1 and "color" in inc[0]:
        for color in COLORS:
            if color != inc[0]["color"]:
                out.append(("color replaced", _variant(spec, [{**inc[0], "color": color}], exc,
                                                       f"{inc[0]['color']} -> {color}")))
    elif tag == "color_attr" and len(inc) == 2 and "color" in inc[0] and "color" in inc[1]:
        a, b = inc[0]["color"], inc[1]["color"]
        if a != b:
            out.append(("color swap", _variant(spec, [{**inc[0], "color": b}, {**inc[1], "color": a}], exc,
                                               f"{a} <-> {b}")))
    elif tag == "position":
        new = [({**r, "position": [FLIP[r["position"][0]], r["position"][1]]} if "position" in r else r) for r in inc]
        if new != inc:
            out.append(("relation flip", _variant(spec, new, exc, "relation flipped")))
    elif tag == "counting" and len(inc) == 1:
        n, cls = int(inc[0]["count"]), inc[0]["class"]
        for d, kind in ((1, "count +1"), (-1, "count -1")):
            if n + d >= 1:
                ex = [({**r, "count": n + d + 1} if r["class"] == cls else r) for r in exc]
                out.append((kind, _variant(spec, [{**inc[0], "count": n + d}], ex, f"{n} -> {n + d}")))
    return out


# --------------------------------------------------------------------------------------------
# ground truth from the renderer's objects and instance map
# --------------------------------------------------------------------------------------------

def truth_detections(objects: list[WorldObject], instance_map: np.ndarray, reference: np.ndarray | None = None,
                     min_share: float = 0.7) -> list[Detection] | None:
    """The ground-truth objects as Detections, boxes = their visible pixels in `instance_map`.

    `reference` is the instance map before a degradation (default: the same map). An object keeps
    `share` = its pixels now / its pixels in the reference: share 0 means gone (no detection),
    share >= `min_share` means present, anything between is ambiguous and gives None (no ground
    truth can be stated: the training rule ignores objects cut to under 30%, a person might too).
    """
    reference = instance_map if reference is None else reference
    dets = []
    for i, obj in enumerate(objects):
        ys, xs = np.nonzero(instance_map == i + 1)
        before = int((reference == i + 1).sum())
        if len(xs) == 0:
            continue
        if before == 0 or len(xs) / before < min_share:
            return None
        dets.append(Detection(obj.shape, obj.color, (float(xs.min()), float(ys.min()),
                                                     float(xs.max() + 1), float(ys.max() + 1))))
    return dets


def truth_verdict(detections: list[Detection] | None, spec: dict) -> bool | None:
    """GenEval's rules on the ground-truth objects (None when the ground truth is ambiguous)."""
    return None if detections is None else evaluate_spec(detections, spec).correct


# --------------------------------------------------------------------------------------------
# degradations like samples
# --------------------------------------------------------------------------------------------

def _identity_grid(b: int, h: int, w: int) -> torch.Tensor:
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(b, 2, 3)
    return F.affine_grid(theta, [b, 1, h, w], align_corners=False)


def warp(x: torch.Tensor, inst: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample images (bilinear, edge pixels repeated) and instance maps (nearest, 0 outside) on `grid`."""
    img = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ids = F.grid_sample(inst[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, ids[:, 0].round().to(inst.dtype)


def blur(sigma: float):
    """Gaussian blur of σ px (the evaluator's own `gaussian_blur`)."""
    def apply(x, inst, gen):
        from chorus.world.evaluator import gaussian_blur
        return gaussian_blur(x, sigma), inst
    return apply


def noise(std: float):
    """Additive i.i.d. Gaussian noise of standard deviation `std` (in [0, 1] units) per pixel and channel."""
    def apply(x, inst, gen):
        return x + std * torch.randn(x.shape, generator=gen), inst
    return apply


def color_shift(lo: float, hi: float):
    """A global colour cast: per image and channel an offset of lo..hi levels (out of 255), random sign."""
    def apply(x, inst, gen):
        b = x.shape[0]
        mag = lo + (hi - lo) * torch.rand(b, 3, 1, 1, generator=gen)
        sign = torch.randint(0, 2, (b, 3, 1, 1), generator=gen) * 2 - 1
        return x + sign * mag / 255.0, inst
    return apply


def affine(max_degrees: float, max_scale: float):
    """Rotation by U[−max_degrees, max_degrees] and scaling by 1 + U[−max_scale, max_scale], about the centre."""
    def apply(x, inst, gen):
        b = x.shape[0]
        u = torch.rand(b, 2, generator=gen) * 2 - 1
        a, k = u[:, 0] * math.radians(max_degrees), 1 + u[:, 1] * max_scale
        c, s = torch.cos(a) / k, torch.sin(a) / k  # the grid maps output pixels to input pixels: the inverse
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
        return warp(x, inst, F.affine_grid(theta, list(x.shape), align_corners=False))
    return apply


def elastic(max_px: float, smooth_px: float = 4.0):
    """A smooth random displacement field (white noise blurred by `smooth_px`) scaled to at most `max_px`."""
    def apply(x, inst, gen):
        from chorus.world.evaluator import gaussian_blur
        b, _, h, w = x.shape
        d = gaussian_blur(torch.randn(b, 2, h, w, generator=gen), smooth_px)
        d = d / d.norm(dim=1, keepdim=True).amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8) * max_px
        grid = _identity_grid(b, h, w) + d.permute(0, 2, 3, 1) * torch.tensor([2.0 / w, 2.0 / h])
        return warp(x, inst, grid)
    return apply


def border_shift(cut: float = 0.15):
    """Translate by whole pixels so that one object crosses a border by `cut` of its side.

    Per image the smallest such shift over all objects and the four borders (so the chosen object
    is the first to reach that border); the vacated strip repeats the old edge pixels (background).
    """
    def apply(x, inst, gen):
        b, _, h, w = x.shape
        shift = torch.zeros(b, 2)
        for i in range(b):
            best = None
            for k in [int(v) for v in torch.unique(inst[i]) if v > 0]:
                ys, xs = torch.nonzero(inst[i] == k, as_tuple=True)
                x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
                cx, cy = math.ceil(cut * (x1 - x0)), math.ceil(cut * (y1 - y0))
                for dx, dy in ((-(x0 + cx), 0), (w - x1 + cx, 0), (0, -(y0 + cy)), (0, h - y1 + cy)):
                    if best is None or abs(dx) + abs(dy) < abs(best[0]) + abs(best[1]):
                        best = (dx, dy)
            if best is not None:
                shift[i] = torch.tensor(best, dtype=torch.float32)
        grid = _identity_grid(b, h, w) - shift[:, None, None, :] * torch.tensor([2.0 / w, 2.0 / h])
        return warp(x, inst, grid)
    return apply


Degradation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

# name -> (images (B,3,H,W) in [0,1], instance maps (B,H,W), generator) -> (images, instance maps)
DEGRADATIONS: dict[str, Degradation] = {
    "blur 0.5": blur(0.5),
    "blur 1.0": blur(1.0),
    "noise 8/255": noise(8 / 255),
    "noise 16/255": noise(16 / 255),
    "color shift 10-15": color_shift(10, 15),  # the world's jitter is ±COLOR_JITTER (10) per channel
    "affine 5deg 5%": affine(5.0, 0.05),
    "elastic 1px": elastic(1.0),
    "border cut 15%": border_shift(0.15),  # the data set lets a named object overhang a crop by <= 12%
}

# Beyond what a good sample shows: where the evaluator starts to err, and in which direction.
STRONG_DEGRADATIONS: dict[str, Degradation] = {
    "blur 2.0": blur(2.0),
    "noise 32/255": noise(32 / 255),
    "color shift 20-30": color_shift(20, 30),
    "affine 10deg 10%": affine(10.0, 0.10),
    "elastic 2px": elastic(2.0),
    "border cut 30%": border_shift(0.30),
}


def degrade(images: list[np.ndarray], instance_maps: list[np.ndarray], degradation: Degradation,
            seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Apply one degradation to uint8 images and their instance maps; images come back as uint8
    (rounded, as a sample saved to PNG), maps warped along (unchanged by photometric ones)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    inst = torch.from_numpy(np.stack(instance_maps).astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    y, inst = degradation(x, inst, gen)
    out = (y.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(out), list(inst.numpy().astype(np.int16))


# --------------------------------------------------------------------------------------------
# the report: own specs and minimal pairs, clean and degraded
# --------------------------------------------------------------------------------------------

def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def score_variant(detections: list[list[Detection]], truths: list[list[Detection] | None], specs: list[dict],
                  pairs: list[list[tuple[str, dict]]]) -> dict:
    """Agreement with the ground truth on own specs, and lenient passes on minimal pairs.

    own: images whose ground truth is defined; `agree` = share where the evaluator's verdict equals
    the ground-truth verdict (`n_true` of them are True). pairs: minimal pairs whose ground truth is
    False; `lenient` = share the evaluator passes, overall and per kind. `undefined` counts images
    whose ground truth is ambiguous (an object cut between 0 and 70%), left out of both.
    """
    own_n = own_agree = own_true = undefined = 0
    kinds: dict[str, list[int]] = {}
    for dets, truth, spec, spec_pairs in zip(detections, truths, specs, pairs):
        gt = truth_verdict(truth, spec)
        if gt is None:
            undefined += 1
            continue
        own_n += 1
        own_true += gt
        own_agree += evaluate_spec(dets, spec).correct == gt
        for kind, pair in spec_pairs:
            if truth_verdict(truth, pair) is False:  # a true minimal pair for this image
                tally = kinds.setdefault(kind, [0, 0])
                tally[0] += evaluate_spec(dets, pair).correct
                tally[1] += 1
    n_pairs, n_lenient = sum(t[1] for t in kinds.values()), sum(t[0] for t in kinds.values())
    return {"own": {"n": own_n, "n_true": own_true, "agree": _rate(own_agree, own_n)},
            "pairs": {"n": n_pairs, "lenient": _rate(n_lenient, n_pairs),
                      "kinds": {k: {"n": t[1], "lenient": _rate(*t)} for k, t in sorted(kinds.items())}},
            "undefined": undefined}


def trust_report(specs: list[dict], evaluator=None, seed: int = TRUST_SEED,
                 degradations: dict[str, Degradation] | None = None) -> dict[str, dict]:
    """{"clean": ..., name: ... for each degradation}, each as `score_variant` returns it.

    One render per spec (`render_spec`, seed + i, with its instance map); degradation j draws its
    randomness from seed + j. The own-spec ground truth of a clean render is True by construction
    (checked: a render whose ground-truth objects fail their own spec would count as undefined).
    """
    from chorus.world.evaluator import Evaluator
    from chorus.world.render import render_spec
    evaluator = evaluator or Evaluator.load()
    degradations = DEGRADATIONS if degradations is None else degradations
    size = evaluator.config.image_size
    samples = [render_spec(s, seed=seed + i, size=size, with_instances=True) for i, s in enumerate(specs)]
    images, maps = [s.image for s in samples], [s.instance_map for s in samples]
    pairs = [minimal_pairs(s) for s in specs]
    truths = [truth_detections(s.objects, s.instance_map) for s in samples]
    report = {"clean": score_variant(evaluator.detect(images), truths, specs, pairs)}
    for j, (name, fn) in enumerate(degradations.items()):
        imgs, warped = degrade(images, maps, fn, seed + j)
        truths = [truth_detections(s.objects, m, s.instance_map) for s, m in zip(samples, warped)]
        report[name] = score_variant(evaluator.detect(imgs), truths, specs, pairs)
    return report


def format_report(report: dict[str, dict]) -> str:
    """One line per variant: own-spec agreement (n), minimal-pair lenient rate (n), per kind."""
    kinds = sorted({k for r in report.values() for k in r["pairs"]["kinds"]})
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"
    head = f"{'variant':<19}{'own agree':>10}{'n':>5}{'pairs pass':>11}{'n':>5}" + "".join(f"{k:>15}" for k in kinds)
    lines = [head, "-" * len(head)]
    for name, r in report.items():
        per = "".join(f"{fmt(r['pairs']['kinds'].get(k, {}).get('lenient')):>15}" for k in kinds)
        lines.append(f"{name:<19}{fmt(r['own']['agree']):>10}{r['own']['n']:>5}{fmt(r['pairs']['lenient']):>11}"
                     f"{r['pairs']['n']:>5}{per}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the classical check: colour anchors and connected components, no learning
# --------------------------------------------------------------------------------------------

_ANCHORS = np.array(list(COLORS.values()), np.float32)  # (10, 3) in COLORS' order


@dataclass
class ClassicalVerdict:
    """Per colour the number of objects found, and the colour/count verdict of a spec on them."""

    counts: dict[str, int]
    correct: bool


def _as_array(image) -> np.ndarray:
    """PIL image / (H,W,3) uint8 array / (3,H,W) float tensor in [0,1] → (H,W,3) float32 in 0..255."""
    if isinstance(image, torch.Tensor):
        return (image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float32)
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return a[..., :3].astype(np.float32)


def _shifts(m: np.ndarray, fill) -> list[np.ndarray]:
    """The 8 neighbours of every pixel (out-of-image neighbours = `fill`)."""
    p = np.pad(m, 1, constant_values=fill)
    h, w = m.shape
    return [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels, n), labels 1..n, 0 off the mask.

    Min-label propagation: each mask pixel starts with its own index and takes the smallest label
    among its neighbours until nothing changes (as many rounds as a component is long; objects
    here are small), with pointer jumping (a label adopts its label's label) to shorten the chain.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = np.minimum.reduce([lab] + _shifts(lab, big))
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[new], big)  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), np.int32)
    out[mask] = labels + 1
    return out, len(roots)


def _blend_pairs(bg: np.ndarray, tol: float) -> np.ndarray:
    """(10, 10) bool: anchor k lies within tol of a blend α·anchor_j + (1 − α)·bg, α ∈ [0.2, 0.9] —
    the colour an anti-aliased or blurred edge of a j object passes through (orange → brown, white → gray)."""
    alphas = np.linspace(0.2, 0.9, 15)[:, None, None]
    blends = alphas * _ANCHORS[None] + (1 - alphas) * bg  # (15, 10, 3): blends of each j
    d = np.linalg.norm(_ANCHORS[:, None, None, :] - blends[None], axis=-1).min(1)  # (k, j)
    out = d <= tol
    np.fill_diagonal(out, False)
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = np.logical_or.reduce([mask] + _shifts(mask, False))
    return mask


def _median_plus(a: np.ndarray) -> np.ndarray:
    """Per-channel median over each pixel and its four neighbours: isolated noise goes, while a
    one-pixel gap between two objects stays (a 3×3 median would fill it from both sides)."""
    h, w = a.shape[:2]
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    taps = [p[1:1 + h, 1:1 + w], p[:h, 1:1 + w], p[2:, 1:1 + w], p[1:1 + h, :w], p[1:1 + h, 2:]]
    return np.median(np.stack(taps), axis=0)


_BACKGROUND = np.array(list(BACKGROUNDS.values()), np.float32).mean(0)  # the typical dark tint


def color_components(image, tol: float = 56.0, min_area: float = 4.0, smooth: bool = True) -> dict[str, int]:
    """Per colour anchor, how many objects of that colour the image holds (shape ignored).

    1. `smooth`: a 5-pixel (plus-shaped) median per channel: tames sample noise, keeps edges and gaps;
    2. a pixel belongs to the nearest anchor of COLORS when within `tol` (Euclidean RGB). The
       nearest anchor tells colours apart (they lie >= 80 apart; objects jitter <= 10 per channel);
       `tol` only tells object from background (every background channel is <= 68, >= 90 from
       every anchor), and 56 leaves room for a colour cast of 20-30 levels per channel;
    3. the *core* of a colour: its pixels whose four neighbours have that colour too. Erosion drops
       the one-pixel rings an anti-aliased edge blends into another anchor (white over the dark
       background passes through gray) and cuts the anti-aliased bridges between objects drawn
       1 px apart; an object is an 8-connected component of the core with `min_area` pixels
       (per 64×64);
    4. *fringes* go too: a component of colour k, where k is what an edge of colour j blends into
       over the dark background (`_blend_pairs`: white → gray, orange → brown, ...), with at least
       half of its pixels within 2 px of colour j — the halo of a blurred j object, not an object.

    Objects of one colour that touch over more than a couple of pixels count as one; a k object
    hugging a j object along half of it would be lost.
    """
    a = _as_array(image)
    if smooth:
        a = _median_plus(a)
    h, w = a.shape[:2]
    d = np.linalg.norm(a[:, :, None, :] - _ANCHORS[None, None], axis=-1)  # (H, W, 10)
    nearest, ok = d.argmin(-1), d.min(-1) <= tol
    masks = [(nearest == k) & ok for k in range(len(COLORS))]
    blends = _blend_pairs(_BACKGROUND, tol)
    area = min_area * h * w / 4096.0
    near: dict[int, np.ndarray] = {}  # colour j -> pixels within 2 px of it (computed when needed)
    counts = {}
    for k, name in enumerate(COLORS):
        up, left, right, down = (_shifts(masks[k], False)[i] for i in (1, 3, 4, 6))
        core, n = masks[k] & up & left & right & down, 0
        if core.sum() >= area:
            labels, n_comp = connected_components(core)
            sizes = np.bincount(labels.ravel(), minlength=n_comp + 1)
            keep = sizes >= area
            keep[0] = False
            for j in np.nonzero(blends[k])[0]:
                if not masks[j].any() or not keep.any():
                    continue
                if j not in near:
                    near[j] = _dilate(masks[j], 2)
                hugged = np.bincount(labels[near[j] & core], minlength=n_comp + 1)
                keep &= hugged < 0.5 * sizes
            n = int(keep.sum())
        counts[name] = n
    return counts


def count_verdict(counts: dict[str, int], spec: dict) -> bool:
    """The colour/count part of a spec on per-colour object counts (shapes and positions ignored).

    Include clauses: per colour they name, at least the sum of their counts of that colour; in all,
    at least the sum of every clause's count. Exclude {"class": c, "count": m}: fewer than m objects
    of the colour c's include clause names (of any colour when none is named). Counting specs thus
    demand exactly n objects of their colour (or exactly n objects when uncoloured).
    """
    total = sum(counts.values())
    need: Counter = Counter()
    for req in spec.get("include", []):
        need[req.get("color")] += int(req.get("count", 1))
    if total < sum(need.values()) or any(counts.get(c, 0) < n for c, n in need.items() if c is not None):
        return False
    for req in spec.get("exclude", []):
        colors = {r.get("color") for r in spec.get("include", []) if r["class"] == req["class"]}
        have = counts.get(next(iter(colors)), 0) if len(colors) == 1 and None not in colors else total
        if have >= int(req["count"]):
            return False
    return True


def classical_verdict(image, spec: dict, **kwargs) -> ClassicalVerdict:
    """Per-colour object counts (`color_components`, kwargs passed on) and `count_verdict` of `spec`."""
    counts = color_components(image, **kwargs)
    return ClassicalVerdict(counts, count_verdict(counts, spec))


def detection_counts(detections: list[Detection]) -> dict[str, int]:
    """Per colour the number of the evaluator's detections (any shape)."""
    c = Counter(d.color for d in detections)
    return {name: c.get(name, 0) for name in COLORS}


def agreement_records(images, specs: list[dict], evaluator=None, **kwargs) -> list[dict]:
    """Per image the evaluator's and the classical per-colour counts and colour/count verdicts.

    Both sides are read the same way (`count_verdict`, shapes and positions ignored), so a
    disagreement means the learned detector and the pixel count see different numbers or colours.
    """
    from chorus.world.evaluator import Evaluator
    evaluator = evaluator or Evaluator.load()
    records = []
    for im, dets, spec in zip(images, evaluator.detect(list(images)), specs):
        ev, cl = detection_counts(dets), classical_verdict(im, spec, **kwargs)
        records.append({"prompt": spec.get("prompt", ""), "tag": spec.get("tag", "?"),
                        "evaluator": count_verdict(ev, spec), "classical": cl.correct,
                        "evaluator_counts": {k: v for k, v in ev.items() if v},
                        "classical_counts": {k: v for k, v in cl.counts.items() if v}})
    return records


def agreement(images, specs: list[dict], evaluator=None, **kwargs) -> float:
    """Share of images where the evaluator's colour/count verdict equals the classical one."""
    if len(images) != len(specs):
        from chorus.errors import ChorusError
        raise ChorusError(f"Got {len(images)} images but {len(specs)} specs; each image needs its spec.")
    records = agreement_records(images, specs, evaluator, **kwargs)
    return sum(r["evaluator"] == r["classical"] for r in records) / max(len(records), 1)
