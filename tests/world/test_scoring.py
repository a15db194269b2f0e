"""GenEval's scoring rules on hand-made detections (no network involved)."""
import math
import random

import pytest

from chorus.world.scoring import Detection, evaluate_spec, relative_position, summarize, format_table

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def box(cx, cy, s=10.0):
    return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


def det(shape, color, cx, cy, s=10.0, score=0.9):
    return Detection(shape, color, box(cx, cy, s), score)


def test_relative_position_axes_and_image_y_down():
    assert relative_position(box(10, 30), box(50, 30)) == {"left of"}
    assert relative_position(box(50, 30), box(10, 30)) == {"right of"}
    assert relative_position(box(30, 10), box(30, 50)) == {"above"}  # smaller y is higher up
    assert relative_position(box(30, 50), box(30, 10)) == {"below"}
    assert relative_position(box(30, 30), box(30, 30)) == set()


def test_relative_position_margin_is_a_tenth_of_the_summed_sizes():
    # two 10-px boxes: margin m = 0.1 * (10 + 10) = 2 px; along one axis the relation needs
    # (|o| - m) / |o| > 0.5, i.e. |o| > 2m = 4 px
    assert relative_position(box(30, 30), box(33.9, 30)) == set()
    assert relative_position(box(30, 30), box(34.1, 30)) == {"left of"}
    # a diagonal offset holds both relations only when both shrunken components exceed half its length
    rel = relative_position(box(10, 10), box(40, 40))
    assert rel == {"left of", "above"}
    # mostly horizontal: only "left of"
    assert relative_position(box(10, 30), box(40, 36)) == {"left of"}


def test_relative_position_is_antisymmetric():
    rnd = random.Random(0)
    for _ in range(300):
        a = box(rnd.uniform(0, 64), rnd.uniform(0, 64), rnd.uniform(4, 20))
        b = box(rnd.uniform(0, 64), rnd.uniform(0, 64), rnd.uniform(4, 20))
        assert relative_position(b, a) == {OPPOSITE[r] for r in relative_position(a, b)}


def test_relative_position_matches_a_direct_reading_of_the_rule():
    rnd = random.Random(1)
    for _ in range(300):
        a = box(rnd.uniform(0, 64), rnd.uniform(0, 64), rnd.uniform(4, 20))
        b = box(rnd.uniform(0, 64), rnd.uniform(0, 64), rnd.uniform(4, 20))
        ox = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
        oy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
        mx = 0.1 * ((a[2] - a[0]) + (b[2] - b[0]))
        n = math.hypot(ox, oy)
        rx = max(abs(ox) - mx, 0) / n if n else 0
        want = set()
        if rx > 0.5:
            want.add("left of" if ox < 0 else "right of")
        ry = max(abs(oy) - 0.1 * ((a[3] - a[1]) + (b[3] - b[1])), 0) / n if n else 0
        if ry > 0.5:
            want.add("above" if oy < 0 else "below")
        assert relative_position(a, b) == want


SPEC_TWO = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1}]}


def test_include_needs_every_class():
    assert evaluate_spec([det("circle", "red", 10, 10), det("star", "blue", 40, 40)], SPEC_TWO).correct
    v = evaluate_spec([det("circle", "red", 10, 10)], SPEC_TWO)
    assert not v.correct and "star" in v.reasons[0]
    assert not evaluate_spec([], SPEC_TWO).correct


def test_counting_is_exact_through_the_exclude_clause():
    spec = {"tag": "counting", "include": [{"class": "heart", "count": 3}], "exclude": [{"class": "heart", "count": 4}]}
    dets = [det("heart", "red", 10 + 15 * i, 30) for i in range(4)]
    assert not evaluate_spec(dets[:2], spec).correct
    assert evaluate_spec(dets[:3], spec).correct
    assert not evaluate_spec(dets, spec).correct
    # other shapes do not count
    assert evaluate_spec(dets[:3] + [det("circle", "red", 50, 50)], spec).correct


def test_colour_is_checked_on_the_most_confident_objects():
    spec = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "green"}]}
    assert evaluate_spec([det("square", "green", 30, 30)], spec).correct
    assert not evaluate_spec([det("square", "blue", 30, 30)], spec).correct
    # GenEval checks the top-`count` detections only: a confident blue one hides a weak green one
    two = [det("square", "blue", 10, 10, score=0.9), det("square", "green", 40, 40, score=0.5)]
    assert not evaluate_spec(two, spec).correct
    two[1].score = 0.95
    assert evaluate_spec(two, spec).correct


def test_colour_binding_needs_both_bindings():
    spec = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "star", "count": 1, "color": "blue"}]}
    assert evaluate_spec([det("circle", "red", 10, 10), det("star", "blue", 40, 40)], spec).correct
    assert not evaluate_spec([det("circle", "blue", 10, 10), det("star", "red", 40, 40)], spec).correct


def test_position_is_relative_to_the_target_clause():
    spec = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_spec([det("square", "red", 45, 30), det("circle", "red", 15, 30)], spec).correct
    assert not evaluate_spec([det("square", "red", 15, 30), det("circle", "red", 45, 30)], spec).correct
    assert not evaluate_spec([det("square", "red", 30, 30), det("circle", "red", 31, 30)], spec).correct
    # a missing target fails the position clause too
    v = evaluate_spec([det("circle", "red", 15, 30)], spec)
    assert not v.correct and any("no target" in r for r in v.reasons)


def test_summary_is_the_mean_of_task_accuracies():
    recs = ([{"tag": "a", "correct": True}] * 3 + [{"tag": "a", "correct": False}]
            + [{"tag": "b", "correct": False, "split": "heldout_pairs"}])
    s = summarize(recs)
    assert s["tasks"] == {"a": 0.75, "b": 0.0}
    assert s["overall"] == pytest.approx(0.375)  # not the image mean 0.6
    assert s["n_images"] == 5
    assert s["splits"]["heldout_pairs"]["n_images"] == 1
    assert "overall" in format_table(s)


def test_paired_difference_standard_error_cancels_what_both_sides_share():
    import random

    from chorus.world.scoring import overall_standard_error, paired_difference_standard_error
    rng = random.Random(0)
    tags = ["a"] * 200 + ["b"] * 200
    a = [rng.random() < 0.5 for _ in tags]
    b = list(a)
    assert paired_difference_standard_error(a, b, tags) == 0.0          # the same verdicts: no uncertainty
    b[:20] = [not x for x in b[:20]]                                     # 20 of 400 images changed
    paired = paired_difference_standard_error(a, b, tags)
    assert 0 < paired < overall_standard_error(a, tags) / 2              # far below either side's own SE
    with pytest.raises(ValueError):
        paired_difference_standard_error(a, b[:-1], tags)
