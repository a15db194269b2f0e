"""GenEval's scoring rules, applied to the objects the evaluator found in one image.

An image passes only if every clause of its spec holds (GenEval, `evaluation/evaluate_images.py`):

* include ``{"class": c, "count": n}``: the ``n`` most confident detections of shape ``c`` exist;
  with ``"color": k`` all of those ``n`` have colour ``k``; with ``"position": [rel, j]`` each of
  them stands ``rel`` each object matched by include clause ``j`` (a failed clause ``j`` fails it);
* exclude ``{"class": c, "count": m}``: fewer than ``m`` detections of shape ``c`` (counting specs
  exclude ``n + 1``, so a counting prompt demands exactly ``n``).

Positions compare box centres after shrinking the offset by ``0.1 × (size_a + size_b)`` per axis;
a relation holds when its axis carries more than half of the (unshrunk) offset's length.
The overall score is the mean of the per-task accuracies (GenEval's summary).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

POSITION_THRESHOLD = 0.1  # GenEval's default `position_threshold`
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    """One object the evaluator found: its shape, colour, box (x0, y0, x1, y1) in pixels, score."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    score: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        """(cx, cy) = midpoint of the box."""
        x0, y0, x1, y1 = self.box
        return (0.5 * (x0 + x1), 0.5 * (y0 + y1))

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color,
                "box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4)}


@dataclass
class Verdict:
    """The outcome of scoring one image against one spec."""

    correct: bool
    reasons: list[str] = field(default_factory=list)


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B: offset' = sign(o)·max(|o| − t·(dim_a + dim_b), 0), o = c_a − c_b."""
    ca = (0.5 * (box_a[0] + box_a[2]), 0.5 * (box_a[1] + box_a[3]))
    cb = (0.5 * (box_b[0] + box_b[2]), 0.5 * (box_b[1] + box_b[3]))
    dims = [abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]),
            abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1])]
    offset = [ca[0] - cb[0], ca[1] - cb[1]]
    revised = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:  # image y grows downwards
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def group_by_shape(detections: list[Detection]) -> dict[str, list[Detection]]:
    """Detections per shape, most confident first (GenEval orders each class by score)."""
    groups: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        groups.setdefault(det.shape, []).append(det)
    return groups


def _check_include(req: dict, groups, matched: list, threshold: float, reasons: list[str]) -> bool:
    """One include clause; appends its matched objects (or None) to `matched`."""
    cls, count = req["class"], int(req["count"])
    found = groups.get(cls, [])[:count]
    ok = len(found) >= count
    if not ok:
        reasons.append(f"expected {cls}>={count}, found {len(found)}")
    if ok and "color" in req:
        n_color = sum(d.color == req["color"] for d in found)
        if n_color < count:
            ok = False
            reasons.append(f"expected {req['color']} {cls}>={count}, found {n_color} {req['color']} "
                           f"({', '.join(d.color for d in found)})")
    if ok and "position" in req:
        rel, target = req["position"][0], int(req["position"][1])
        targets = matched[target] if 0 <= target < len(matched) else None
        if targets is None:
            ok = False
            reasons.append(f"no target for {cls} to be {rel}")
        else:
            for det in found:
                bad = [t for t in targets if rel not in relative_position(det.box, t.box, threshold)]
                if bad:
                    found_rels = relative_position(det.box, bad[0].box, threshold)
                    reasons.append(f"expected {cls} {rel} target, found "
                                   f"{' and '.join(sorted(found_rels)) or 'no relation'}")
                    ok = False
                    break
    matched.append(found if ok else None)
    return ok


def evaluate_spec(detections: list[Detection], spec: dict,
                  threshold: float = POSITION_THRESHOLD) -> Verdict:
    """GenEval's verdict: all include clauses hold AND no exclude clause is violated."""
    groups = group_by_shape(detections)
    reasons: list[str] = []
    matched: list = []
    correct = True
    for req in spec.get("include", []):
        correct &= _check_include(req, groups, matched, threshold, reasons)
    for req in spec.get("exclude", []):
        n = len(groups.get(req["class"], []))
        if n >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return Verdict(bool(correct), reasons)


def summarize(records: list[dict]) -> dict:
    """{"overall": mean of task accuracies, "tasks": {tag: acc}, "n_images", "splits": {...}}.

    Each record holds at least ``tag`` and ``correct``; ``split`` (default "train") groups the
    held-out prompts separately.
    """
    def table(recs):
        tasks: dict[str, list[bool]] = {}
        for r in recs:
            tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
        accs = {t: sum(v) / len(v) for t, v in sorted(tasks.items())}
        overall = sum(accs.values()) / len(accs) if accs else 0.0
        return {"overall": overall, "tasks": accs, "n_images": len(recs)}

    out = table(records)
    splits: dict[str, list[dict]] = {}
    for r in records:
        splits.setdefault(r.get("split") or "train", []).append(r)
    out["splits"] = {name: table(recs) for name, recs in sorted(splits.items())}
    return out


def overall_standard_error(correct: list[float], tags: list[str], n: int = 500, seed: int = 0) -> float:
    """Bootstrap standard error of the overall score (the mean of the per-task accuracies), resampling the
    images of each task with replacement. `correct` may also hold per-image differences (see below)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[float]] = {}
    for c, t in zip(correct, tags):
        by_tag.setdefault(t, []).append(float(c))
    arrays = [np.asarray(v) for v in by_tag.values()]
    draws = [np.mean([a[rng.integers(0, len(a), len(a))].mean() for a in arrays]) for _ in range(n)]
    return float(np.std(draws))


def paired_difference_standard_error(correct_a: list[bool], correct_b: list[bool], tags: list[str], n: int = 500,
                                     seed: int = 0) -> float:
    """Bootstrap standard error of overall(a) − overall(b) for two image sets drawn from the same prompts and
    noise (image i of both from one spec): the per-image differences are resampled, so what the two sides
    have in common cancels."""
    if not len(correct_a) == len(correct_b) == len(tags):
        raise ValueError("paired sets need one verdict per image on both sides")
    return overall_standard_error([float(a) - float(b) for a, b in zip(correct_a, correct_b)], tags, n, seed)


def format_table(summary: dict) -> str:
    """A per-task text table (rows: tasks; columns: all images, then each split)."""
    splits = summary.get("splits", {})
    cols = ["all"] + [s for s in splits if len(splits) > 1]
    tags = list(summary["tasks"])
    head = f"{'task':<14}" + "".join(f"{c:>15}" for c in cols)
    lines = [head, "-" * len(head)]

    def cell(tab, tag):
        v = tab["tasks"].get(tag)
        return f"{'-':>15}" if v is None else f"{v:>15.3f}"

    for tag in tags:
        lines.append(f"{tag:<14}" + cell(summary, tag)
                     + "".join(cell(splits[c], tag) for c in cols[1:]))
    lines.append("-" * len(head))
    lines.append(f"{'overall':<14}" + f"{summary['overall']:>15.3f}"
                 + "".join(f"{splits[c]['overall']:>15.3f}" for c in cols[1:]))
    lines.append(f"{'images':<14}" + f"{summary['n_images']:>15d}"
                 + "".join(f"{splits[c]['n_images']:>15d}" for c in cols[1:]))
    return "\n".join(lines)
