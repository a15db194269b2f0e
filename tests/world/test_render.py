"""The renderer against its own ground truth: determinism, spec truth, crops, blur, free scenes."""
import numpy as np
import pytest

from chorus.errors import ChorusError
from chorus.world.captions import TAGS, sample_spec
from chorus.world.render import (Frame, Placed, RenderConfig, draw, make_sample, random_scene_sample,
                                 render_spec)
from chorus.world.scene import COLORS, SHAPES, Sample


def geneval_relations(a, b, t=0.1):
    """GenEval's relative_position, written out again here (independent of the renderer's copy)."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dim_a, dim_b = np.array([a[2] - a[0], a[3] - a[1]]), np.array([b[2] - b[0], b[3] - b[1]])
    off = ca - cb
    rev = np.maximum(np.abs(off) - t * (dim_a + dim_b), 0) * np.sign(off)
    if np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / np.linalg.norm(off)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def inst_box(inst, k):
    ys, xs = np.nonzero(inst == k)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def groups(sample: Sample):
    """Object indices per include clause, in the renderer's order (clause by clause, count each)."""
    out, i = [], 0
    for req in sample.spec["include"]:
        out.append(list(range(i, i + req["count"])))
        i += req["count"]
    return out


def nearest_color(rgb):
    names = list(COLORS)
    d = [np.sum((np.array(COLORS[c], float) - rgb) ** 2) for c in names]
    return names[int(np.argmin(d))]


def eroded(mask):
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def test_deterministic_for_seed_and_index():
    a, b = make_sample(3, 17, with_instances=True), make_sample(3, 17, with_instances=True)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instance_map, b.instance_map)
    assert a.meta() == b.meta()
    c = make_sample(3, 18)
    d = make_sample(4, 17)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.image, d.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert make_sample(0, 0, size=96).image.shape == (96, 96, 3)


def _check_truth(s: Sample, check_colors: bool):
    inst = s.instance_map
    named = [o for o in s.objects if o.in_caption]
    spec_classes = {r["class"] for r in s.spec["include"] + s.spec["exclude"]}
    # counts: exactly the demanded objects are named; distractors are of other classes
    assert len(named) == sum(r["count"] for r in s.spec["include"])
    assert all(o.shape not in spec_classes for o in s.objects if not o.in_caption)
    for req, idx in zip(s.spec["include"], groups(s)):
        for i in idx:
            ob = s.objects[i]
            assert ob.in_caption and ob.shape == req["class"]
            assert (inst == i + 1).sum() >= 1, "a named object has no visible pixels"
            if "color" in req:
                assert ob.color == req["color"]
                core = eroded(inst == i + 1)
                if check_colors and core.sum() >= 4:
                    assert nearest_color(s.image[core].mean(0)) == req["color"]
            if "size" in req:
                assert ob.size == req["size"]
    for req in s.spec["exclude"]:
        assert sum(o.shape == req["class"] for o in s.objects) < req["count"]
    # positions: GenEval's rule on the boxes of the visible pixels
    g = groups(s)
    for req, idx in zip(s.spec["include"], g):
        if "position" in req:
            rel, j = req["position"]
            for a in idx:
                for b in g[j]:
                    got = geneval_relations(inst_box(inst, a + 1), inst_box(inst, b + 1))
                    assert rel in got, (s.caption, rel, got)


def test_spec_truth_training_samples():
    """Counts, classes, colours (sharp images) and positions hold in the rendered pixels."""
    for i in range(150):
        _check_truth(make_sample(11, i, with_instances=True), check_colors=False)
    sharp = RenderConfig(native_min=64, native_max=128)
    for i in range(100):
        _check_truth(make_sample(12, i, with_instances=True, config=sharp), check_colors=True)


def test_spec_truth_position_and_counting_specs():
    rng = np.random.default_rng(0)
    for k in range(120):
        tag = ("position", "counting", "color_attr")[k % 3]
        s = render_spec(sample_spec(rng, tag), seed=k, with_instances=True)
        _check_truth(s, check_colors=True)


def test_metadata_boxes_match_pixels():
    for i in range(30):
        s = render_spec(sample_spec(np.random.default_rng(i), "two_object"), seed=i, with_instances=True, native=128)
        for k, ob in enumerate(s.objects):
            got = inst_box(s.instance_map, k + 1)
            assert np.allclose(got, ob.box, atol=2.0), (ob.shape, got, ob.box)  # sharp tips lose < 2 px


def test_crop_metadata_and_dropping():
    seen_crop = seen_cut = 0
    for i in range(200):
        s = make_sample(5, i, with_instances=True)
        top, left = s.crop_top_left
        h0, w0 = s.original_size
        assert top >= 0 and left >= 0 and 16 <= min(h0, w0) <= 128
        seen_crop += (top, left) != (0, 0)
        for k, ob in enumerate(s.objects):
            x0, y0, x1, y1 = ob.box
            assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 64
            edge = min(x0, y0) <= 0.5 or max(x1, y1) >= 63.5
            assert ob.touches_border == edge
            assert ob.visible_fraction >= 0.02  # cut-away objects are dropped
            if ob.in_caption:
                assert ob.visible_fraction >= 0.75  # a crop never cuts a named object badly
            else:
                seen_cut += ob.visible_fraction < 1
        assert s.instance_map.max() <= len(s.objects)
    assert seen_crop > 150 and seen_cut > 50
    for i in range(20):
        s = make_sample(5, i, crop=False)
        assert s.crop_top_left == (0, 0) and s.original_size[0] == s.original_size[1]
        assert all(o.in_caption for o in s.objects)


def test_crop_corner_is_where_the_window_starts():
    """Two crops of one canvas agree where they overlap, shifted by the crop corners' difference."""
    native, resized = (60, 80), (96, 128)
    canvas_objs = [("circle", 40.0, 50.0, 20.0), ("star", 90.0, 60.0, 24.0), ("cross", 70.0, 30.0, 18.0)]
    images = []
    corners = [(10, 20), (17, 31)]
    for top, left in corners:
        objs = [Placed(sh, "red", "medium", (215, 35, 35), x - left, y - top, side) for sh, x, y, side in canvas_objs]
        img, *_ = draw(np.random.default_rng(0), Frame(native, resized, (top, left), 64), objs)
        images.append(img.astype(int))
    dy, dx = corners[1][0] - corners[0][0], corners[1][1] - corners[0][1]
    overlap_a = images[0][dy:, dx:]
    overlap_b = images[1][:64 - dy, :64 - dx]
    assert np.abs(overlap_a - overlap_b).max() <= 2
    assert np.abs(images[0] - images[1]).mean() > 5  # and the crop visibly shifts the scene


def _sharpness(img):
    g = img.astype(float).mean(2)
    return np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean()


def test_small_native_size_looks_blurry():
    spec = {"prompt": "a star and a cross", "include": [{"class": "star", "count": 1}, {"class": "cross", "count": 1}]}
    sharp = _sharpness(render_spec(spec, seed=1, native=128).image)
    blurry = _sharpness(render_spec(spec, seed=1, native=16).image)
    assert sharp > 2.5 * blurry


def test_render_spec_errors_and_satisfiability():
    with pytest.raises(ChorusError, match="circle, square"):
        render_spec({"prompt": "x", "include": [{"class": "blob", "count": 1}]}, seed=0)
    with pytest.raises(ChorusError, match="no image satisfies"):
        render_spec({"prompt": "x", "include": [{"class": "star", "count": 2}],
                     "exclude": [{"class": "star", "count": 2}]}, seed=0)


def test_every_tag_shape_and_colour_appears():
    tags, shapes, colors = set(), set(), set()
    for i in range(300):
        s = make_sample(2, i)
        tags.add(s.spec["tag"])
        shapes |= {o.shape for o in s.objects}
        colors |= {o.color for o in s.objects}
    assert tags == set(TAGS) and shapes == set(SHAPES) and colors == set(COLORS)


def test_backgrounds_never_look_like_an_object_colour():
    for i in range(60):
        s = make_sample(9, i, with_instances=True)
        bg = s.image[s.instance_map == 0].reshape(-1, 3).astype(float)
        med = np.median(bg, 0)
        assert med.max() <= 70  # dark, textures and blur halos aside
        for rgb in COLORS.values():
            assert np.abs(med - np.array(rgb)).max() > 60  # far (in some channel) from every object colour


def test_random_scene_samples():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(80):
        s = random_scene_sample(rng, occlusion=bool(rng.integers(2)))
        counts.add(len(s.objects))
        assert s.instance_map.max() <= len(s.objects)
        assert sum(r["count"] for r in s.spec["include"]) == len(s.objects)
        assert all(not o.touches_border for o in s.objects)
    assert counts == {0, 1, 2, 3, 4}


def test_render_speed_smoke():
    """Not the benchmark (benchmarks/world_render.py): only that 200 samples take well under a minute."""
    import time
    t = time.process_time()
    for i in range(200):
        make_sample(0, i)
    assert time.process_time() - t < 20
