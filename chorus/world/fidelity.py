"""Structure fidelity: do the objects of a generated image sit where a reference scene's objects are?

The reference is a rendered scene with its ground truth (the renderer's instance map): a ControlNet's
condition, or the source image of an edit. The generated image is read by the world evaluator (its
detections, never the generator's own state). Per reference object with at least `min_pixels`
visible pixels:

    match      the detection of highest box IoU with the object's visible box (each detection used once,
               pairs taken in order of IoU: a greedy assignment)
    iou        that IoU (0 when nothing is left to match)
    centre     the distance in pixels between the two boxes' centres (None when unmatched)
    shape_ok   the matched detection has the object's shape

and per image: `mean_iou` over its objects, `success` = every object matched at IoU ≥ 0.5 with its shape,
`extra` = detections left over. This is the miniature of ControlNet's "condition reconstruction" IoU and of
Plug-and-Play's "structure kept" (claims_protocols.md §7.2, §8.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chorus.world.scoring import Detection

MIN_PIXELS = 12


@dataclass
class Reference:
    """The ground truth of a scene: each visible object's shape and box (x0, y0, x1, y1) in pixels."""

    shapes: list[str]
    boxes: list[tuple[float, float, float, float]]

    @classmethod
    def of_sample(cls, sample, min_pixels: int = MIN_PIXELS) -> "Reference":
        """From a sample rendered with its instance map (objects under `min_pixels` visible are left out)."""
        from chorus.world.evaluator import visible_boxes
        if sample.instance_map is None:
            raise ValueError("a reference needs the instance map: render with with_instances=True")
        boxes = visible_boxes(sample.instance_map, len(sample.objects), min_pixels)
        kept = [(ob.shape, b) for ob, b in zip(sample.objects, boxes) if b is not None]
        return cls([s for s, _ in kept], [b for _, b in kept])

    def to_json(self) -> dict:
        return {"shapes": self.shapes, "boxes": [list(b) for b in self.boxes]}


def box_iou(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre(box) -> tuple[float, float]:
    return (0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3]))


def match(reference: Reference, detections: list[Detection]) -> dict:
    """The per-object and per-image fidelity of one image's detections against its reference."""
    pairs = sorted(((box_iou(rb, d.box), i, j) for i, rb in enumerate(reference.boxes)
                    for j, d in enumerate(detections)), reverse=True)
    taken_r, taken_d, assigned = set(), set(), {}
    for iou, i, j in pairs:
        if iou <= 0 or i in taken_r or j in taken_d:
            continue
        taken_r.add(i)
        taken_d.add(j)
        assigned[i] = (iou, j)
    objects = []
    for i, (shape, rb) in enumerate(zip(reference.shapes, reference.boxes)):
        if i in assigned:
            iou, j = assigned[i]
            d = detections[j]
            c, cd = centre(rb), centre(d.box)
            objects.append({"iou": iou, "centre": float(np.hypot(c[0] - cd[0], c[1] - cd[1])),
                            "shape_ok": d.shape == shape, "color": d.color})
        else:
            objects.append({"iou": 0.0, "centre": None, "shape_ok": False, "color": None})
    n = len(objects)
    return {"objects": objects,
            "mean_iou": float(np.mean([o["iou"] for o in objects])) if n else 1.0,
            "success": all(o["iou"] >= 0.5 and o["shape_ok"] for o in objects),
            "extra": len(detections) - len(taken_d)}


def fidelity(images, references: list[Reference], evaluator=None) -> dict:
    """Fidelity of generated images to their references: per item and the summary (mean IoU, success rate,
    shape accuracy of matched objects, mean centre error)."""
    from chorus.world.evaluator import Evaluator
    evaluator = evaluator or Evaluator.load()
    detections = evaluator.detect(images)
    items = [match(r, d) for r, d in zip(references, detections)]
    return {"items": items, **summarize(items)}


def summarize(items: list[dict]) -> dict:
    objects = [o for it in items for o in it["objects"]]
    centres = [o["centre"] for o in objects if o["centre"] is not None]
    return {"n": len(items),
            "mean_iou": float(np.mean([it["mean_iou"] for it in items])) if items else float("nan"),
            "success": float(np.mean([it["success"] for it in items])) if items else float("nan"),
            "shape_accuracy": float(np.mean([o["shape_ok"] for o in objects])) if objects else float("nan"),
            "matched": float(np.mean([o["iou"] >= 0.5 for o in objects])) if objects else float("nan"),
            "centre_error": float(np.mean(centres)) if centres else float("nan")}
