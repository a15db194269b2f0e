"""ControlNet conditions: Canny edges on known geometry, layout maps and masks from the instance map."""
import numpy as np
import pytest

from chorus.world.conditions import (LAYOUT_PALETTE, canny, conditions_for, hysteresis, layout_map, object_masks)
from chorus.world.render import make_sample


def _square_image(bg=(30, 32, 38), fg=(35, 85, 215)):
    img = np.zeros((48, 48, 3), np.uint8)
    img[:] = bg
    img[12:36, 16:40] = fg
    return img


def test_canny_finds_the_boundary_of_a_square_and_nothing_else():
    e = canny(_square_image()) > 0
    ring = np.zeros_like(e)
    ring[10:38, 14:42] = True
    ring[14:34, 18:38] = False  # a 2-px band around the true boundary
    assert e[ring].sum() >= 0.9 * 4 * 22  # the boundary is found (about its perimeter)
    assert not e[~ring].any()  # no edges inside the square or on the flat background
    # non-maximum suppression: each boundary row/column crossing is at most 2 px thick
    assert e[24, :].sum() <= 4 and e[:, 28].sum() <= 4


def test_canny_ignores_faint_texture_and_sees_every_object():
    rng = np.random.default_rng(0)
    img = np.clip(_square_image().astype(int) + rng.integers(-8, 9, (48, 48, 1)), 0, 255).astype(np.uint8)
    e = canny(img) > 0
    assert e.sum() > 60 and not e[:8].any() and not e[:, :10].any()
    for i in range(40):
        s = make_sample(1, i, with_instances=True)
        edges = canny(s.image) > 0
        for k in range(len(s.objects)):
            m = s.instance_map == k + 1
            if m.sum() >= 6:
                grown = np.zeros_like(m)
                ys, xs = np.nonzero(m)
                grown[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
                assert edges[grown].any(), (s.caption, s.objects[k])


def test_hysteresis_keeps_weak_pixels_only_when_connected_to_strong_ones():
    nms = np.zeros((5, 9))
    nms[2, 1:4] = [0.5, 0.25, 0.25]  # strong + connected weak
    nms[2, 6:8] = [0.25, 0.25]  # weak island
    out = hysteresis(nms, 0.2, 0.4)
    assert out[2, 1:4].all() and not out[2, 6:8].any()


def test_layout_map_and_masks_follow_the_instance_map():
    s = make_sample(4, 2, with_instances=True)
    lay = layout_map(s.instance_map, s.objects)
    masks = object_masks(s.instance_map, len(s.objects))
    assert masks.shape == (len(s.objects), 64, 64)
    assert not (masks.sum(0) > 1).any()
    assert np.array_equal(masks.any(0), s.instance_map > 0)
    for k, ob in enumerate(s.objects):
        assert (lay[masks[k]] == LAYOUT_PALETTE[ob.shape]).all()
    assert (lay[s.instance_map == 0] == 0).all()
    c = conditions_for(s)
    assert set(c) == {"canny", "layout", "instances"} and c["canny"].dtype == np.uint8
    with pytest.raises(ValueError):
        conditions_for(make_sample(4, 2))
