"""ControlNet conditions computed for a Shapes-world sample: Canny edges, a layout map, masks.

* `canny(image)` — the Canny edge detector in numpy: Gaussian blur, Sobel gradients, non-maximum
  suppression along the gradient direction, double threshold and hysteresis. Edges are 255.
* `layout_map(instance_map, objects)` — each object's visible pixels painted in its shape's
  palette colour (`LAYOUT_PALETTE`), background black: a semantic layout (which shape where).
* `boxes_map(instance_map, objects)` — each object's visible bounding box outlined (2 px) in its shape's
  palette colour, later objects on top: the coarsest control (where, and which shape, but no silhouette).
* `object_masks(instance_map, n)` — (n, H, W) bool masks; the boxes live in the objects' metadata.
* `condition_image(sample, kind)` — the (H, W, 3) uint8 image a ControlNet of that kind is given.
"""
from __future__ import annotations

import numpy as np

from chorus.world.scene import SHAPES, Sample, WorldObject

# One distinct colour per shape class (not the object's own colour: the caption carries that).
LAYOUT_PALETTE: dict[str, tuple[int, int, int]] = {
    "circle": (230, 25, 75), "square": (60, 180, 75), "triangle": (255, 225, 25), "star": (0, 130, 200),
    "heart": (245, 130, 48), "cross": (145, 30, 180), "diamond": (70, 240, 240), "hexagon": (240, 50, 230),
}
assert set(LAYOUT_PALETTE) == set(SHAPES)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian: x * g_σ along rows then columns (reflect padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    p = np.pad(x, r, mode="reflect")
    h, w = x.shape
    rows = sum(g[i] * p[:, i:i + w] for i in range(2 * r + 1))  # (h + 2r, w)
    return sum(g[i] * rows[i:i + h, :] for i in range(2 * r + 1))


def sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g_x, g_y) = Sobel derivatives: [1 2 1]ᵀ ⊗ [−1 0 1] and its transpose."""
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731 - shifted view
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep |∇| where it is >= both neighbours along the gradient (direction quantised to 45°)."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int8)  # 0: horizontal, 1: 45°, 2: vertical, 3: 135°
    p = np.pad(mag, 1)
    h, w = mag.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    # y grows downwards, so a 45° gradient (gx > 0, gy > 0) points to (+1, +1).
    pairs = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for k, (a, b) in pairs.items():
        keep |= (sector == k) & (mag >= s(*a)) & (mag >= s(*b))
    return np.where(keep, mag, 0.0)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3×3 binary dilation."""
    p = np.pad(m, 1)
    h, w = m.shape
    out = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def hysteresis(nms: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges = pixels >= high, grown through 8-connected pixels >= low until nothing changes."""
    weak = nms >= low
    edges = nms >= high
    while True:
        grown = _dilate(edges) & weak
        if (grown == edges).all():
            return edges
        edges = grown


def canny(image: np.ndarray, sigma: float = 1.0, low: float = 0.2, high: float = 0.4) -> np.ndarray:
    """Canny edges of an (H, W, 3) uint8 image -> (H, W) uint8 in {0, 255}.

    As OpenCV does for colour input, each pixel takes the gradient of the channel where it is
    largest. Thresholds are on that Sobel magnitude of [0, 1] intensities (a sharp unit step gives
    4): every object/background step (>= ~0.27 in some channel) passes, textures (<= 8 levels) not.
    """
    x = image[..., :3].astype(np.float32) / 255.0
    grads = [sobel(_gaussian_blur(x[..., c], sigma)) for c in range(3)]
    mags = np.stack([np.hypot(gx, gy) for gx, gy in grads])  # (3, H, W)
    best = mags.argmax(0)[None]
    gx = np.take_along_axis(np.stack([g[0] for g in grads]), best, 0)[0]
    gy = np.take_along_axis(np.stack([g[1] for g in grads]), best, 0)[0]
    mag = np.take_along_axis(mags, best, 0)[0]
    return (hysteresis(non_max_suppression(mag, gx, gy), low, high) * 255).astype(np.uint8)


def layout_map(instance_map: np.ndarray, objects: list[WorldObject]) -> np.ndarray:
    """(H, W, 3) uint8: each object's visible pixels in LAYOUT_PALETTE[shape], background black."""
    lut = np.zeros((len(objects) + 1, 3), np.uint8)
    for i, ob in enumerate(objects):
        lut[i + 1] = LAYOUT_PALETTE[ob.shape]
    return lut[instance_map]


def boxes_map(instance_map: np.ndarray, objects: list[WorldObject], width: int = 2) -> np.ndarray:
    """(H, W, 3) uint8: the tight box of each object's visible pixels outlined in LAYOUT_PALETTE[shape]."""
    h, w = instance_map.shape
    out = np.zeros((h, w, 3), np.uint8)
    for i, ob in enumerate(objects):
        ys, xs = np.nonzero(instance_map == i + 1)
        if len(xs) == 0:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        colour = LAYOUT_PALETTE[ob.shape]
        out[y0:y1, x0:min(x0 + width, x1)] = colour
        out[y0:y1, max(x1 - width, x0):x1] = colour
        out[y0:min(y0 + width, y1), x0:x1] = colour
        out[max(y1 - width, y0):y1, x0:x1] = colour
    return out


CONDITION_KINDS = ("canny", "layout", "boxes")


def condition_image(sample: Sample, kind: str) -> np.ndarray:
    """The (H, W, 3) uint8 condition image of `kind` (canny | layout | boxes) for a sample rendered with
    instances; Canny's single channel is repeated to RGB, as ControlNet's Canny models take it."""
    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown condition {kind!r}; the world renders {', '.join(CONDITION_KINDS)}")
    if sample.instance_map is None:
        raise ValueError("conditions need the instance map: render with with_instances=True")
    if kind == "canny":
        return np.repeat(canny(sample.image)[..., None], 3, axis=2)
    if kind == "layout":
        return layout_map(sample.instance_map, sample.objects)
    return boxes_map(sample.instance_map, sample.objects)


def object_masks(instance_map: np.ndarray, n: int) -> np.ndarray:
    """(n, H, W) bool: mask i = the visible pixels of objects[i]."""
    return instance_map[None] == np.arange(1, n + 1, dtype=instance_map.dtype)[:, None, None]


def conditions_for(sample: Sample) -> dict[str, np.ndarray]:
    """{"canny": (H, W) uint8, "layout": (H, W, 3) uint8, "instances": (H, W) uint8 ids} of a sample.

    Needs the sample's instance map (render with `with_instances=True`).
    """
    if sample.instance_map is None:
        raise ValueError("conditions need the instance map: render with with_instances=True")
    return {
        "canny": canny(sample.image),
        "layout": layout_map(sample.instance_map, sample.objects),
        "instances": sample.instance_map.astype(np.uint8),
    }
