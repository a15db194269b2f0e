"""The Shapes world's vocabulary and data types: shapes, colours, sizes, objects and samples.

Everything else in `chorus.world` speaks these names. A `Sample` is one rendered image with its
caption, its GenEval-style spec (what the caption demands) and the renderer's ground truth
(object boxes, an instance map, and SDXL's micro-conditioning metadata: original size and crop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")

# Named RGB anchors; each object jitters its colour by at most COLOR_JITTER per channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (245, 215, 35),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (130, 55, 185),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "gray": (135, 135, 135),
}
COLOR_JITTER: int = 10

# Object side (its tight box) as a fraction of the final image side; jittered by +-SIZE_JITTER.
SIZES: dict[str, float] = {"small": 0.17, "medium": 0.24, "large": 0.32}
SIZE_JITTER: float = 0.06

# Dark muted background tints (every channel <= 60), far from every object colour including
# gray, brown and white; a background may carry a faint texture (amplitude <= 8 levels).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "charcoal": (32, 33, 38),
    "slate": (30, 40, 52),
    "teal": (20, 44, 46),
    "olive": (40, 42, 22),
    "plum": (44, 26, 42),
    "navy": (20, 26, 52),
    "umber": (46, 34, 26),
}
TEXTURES: tuple[str, ...] = ("flat", "noise", "gradient", "stripes", "checker")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass
class WorldObject:
    """One drawn object; `box` is its tight box (x0, y0, x1, y1) in final-image pixels, clipped."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]
    touches_border: bool = False
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered colour actually drawn
    in_caption: bool = True  # False for distractors that a crop cuts (never named by the caption)
    visible_fraction: float = 1.0  # share of the object's box inside the final image (a crop cuts the rest)

    @property
    def center(self) -> tuple[float, float]:
        """(cx, cy) = the middle of the box."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape, "color": self.color, "size": self.size,
            "box": [round(float(v), 3) for v in self.box], "touches_border": bool(self.touches_border),
            "rgb": [int(c) for c in self.rgb], "in_caption": bool(self.in_caption),
            "visible_fraction": round(float(self.visible_fraction), 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WorldObject":
        return cls(shape=d["shape"], color=d["color"], size=d["size"], box=tuple(d["box"]),
                   touches_border=bool(d.get("touches_border", False)), rgb=tuple(d.get("rgb", (0, 0, 0))),
                   in_caption=bool(d.get("in_caption", True)),
                   visible_fraction=float(d.get("visible_fraction", 1.0)))


@dataclass
class Sample:
    """A rendered image (H, W, 3 uint8) with its caption, spec and ground truth.

    `original_size` (h, w) is the native render size before resizing; `crop_top_left` (top, left)
    is where the final window starts in the resized canvas (SDXL's micro-conditioning inputs).
    `instance_map` (H, W int16): 0 = background, i + 1 = objects[i], visible pixels after occlusion.
    """

    image: np.ndarray
    caption: str
    spec: dict
    objects: list[WorldObject]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    instance_map: np.ndarray | None = None
    background: str = ""
    texture: str = ""
    extra: dict = field(default_factory=dict)

    def meta(self) -> dict:
        """JSON-able metadata: everything except the pixels and the instance map."""
        return {
            "text": self.caption,
            "spec": self.spec,
            "objects": [o.to_dict() for o in self.objects],
            "original_size": [int(v) for v in self.original_size],
            "crop_top_left": [int(v) for v in self.crop_top_left],
            "size": [int(self.image.shape[0]), int(self.image.shape[1])],
            "background": self.background,
            "texture": self.texture,
            **self.extra,
        }
