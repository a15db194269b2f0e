"""Is the evaluator lenient where generated images differ from renders? (`chorus.world.trust`)

Three checks beyond `test_evaluator.py`'s honesty tests, on renders from `render_spec` with seeds the
evaluator never trained on (TRUST_SEED + i), 40 benchmark prompts per task spread over each task:

* minimal pairs: a render scored against a spec that differs from its own in one demanded
  attribute (colour, colour binding, relation, count) must fail, and against its own spec pass;
* degradations like samples (blur, noise, a colour cast, a slight warp, an object cut by the
  border): the verdict must still agree with the ground truth, and minimal pairs must still fail;
* a classical check (colour anchors + connected components, no learning) must agree with the
  ground truth on renders, and with the evaluator's colour/count reading.

Measured rates are printed (`pytest -s`); the floors leave a few images of margin below them.
"""
import numpy as np
import pytest
import torch

from chorus.errors import ChorusError
from chorus.world.benchmark import load_specs
from chorus.world.captions import validate_spec
from chorus.world.evaluator import DEFAULT_WEIGHTS, Evaluator
from chorus.world.render import render_spec
from chorus.world.scene import BACKGROUNDS, COLORS, WorldObject
from chorus.world.trust import (DEGRADATIONS, FLIP, STRONG_DEGRADATIONS, TRUST_SEED, agreement, agreement_records,
                                classical_verdict, color_components, connected_components, count_verdict, degrade,
                                format_report, minimal_pairs, spread_specs, trust_report, truth_detections,
                                truth_verdict)

torch.set_num_threads(1)
needs_weights = pytest.mark.skipif(not (DEFAULT_WEIGHTS / "model.safetensors").is_file(),
                                   reason="shipped evaluator weights missing")
PER_TAG = 40
SPECS = spread_specs(load_specs(), PER_TAG)  # 240 prompts, held-out ones included
PHOTOMETRIC = ("blur 0.5", "blur 1.0", "noise 8/255", "noise 16/255", "color shift 10-15")
# Own-spec agreement floors of the mild degradations; measured at 240 prompts (shipped weights):
# clean 0.992, blur 0.992 / 0.992, noise 0.992 / 0.992, colour shift 0.988, affine 0.996,
# elastic 0.992, border cut 0.961 (its misses: cut objects read as another shape, mostly circle → hexagon).
FLOORS = {"blur 0.5": 0.96, "blur 1.0": 0.96, "noise 8/255": 0.96, "noise 16/255": 0.96,
          "color shift 10-15": 0.95, "affine 5deg 5%": 0.96, "elastic 1px": 0.96, "border cut 15%": 0.92}
assert set(FLOORS) == set(DEGRADATIONS)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load()


@pytest.fixture(scope="module")
def renders():
    """The renders `trust_report` scores: spec i drawn with seed TRUST_SEED + i, with instance maps."""
    return [render_spec(s, seed=TRUST_SEED + i, with_instances=True) for i, s in enumerate(SPECS)]


@pytest.fixture(scope="module")
def report(evaluator):
    r = trust_report(SPECS, evaluator)
    print(f"\n== {len(SPECS)} renders: own-spec agreement and minimal-pair passes ==\n{format_report(r)}")
    return r


def truth_counts(sample) -> dict[str, int]:
    """Per colour the number of objects the renderer drew."""
    return {c: sum(o.color == c for o in sample.objects) for c in COLORS}


# ---- minimal pairs and ground truth (no weights needed) ---------------------------------------

def test_spread_specs_cover_every_task_and_the_held_out_prompts():
    tags = [s["tag"] for s in SPECS]
    assert len(SPECS) == 6 * PER_TAG and all(tags.count(t) == PER_TAG for t in set(tags))
    assert {s["split"] for s in SPECS} == {"train", "heldout_pairs", "heldout_words"}
    assert len({s["prompt"] for s in SPECS}) == len(SPECS)


def test_minimal_pairs_change_exactly_one_attribute():
    n_kinds = {"colors": 9, "color_attr": 1, "position": 1, "counting": 2, "single_object": 0, "two_object": 0}
    for spec in load_specs():
        pairs = minimal_pairs(spec)
        assert len(pairs) == n_kinds[spec["tag"]], spec
        for kind, pair in pairs:
            validate_spec(pair)
            a, b = spec["include"], pair["include"]
            assert len(a) == len(b) and [r["class"] for r in a] == [r["class"] for r in b]
            changed = [(i, k) for i, (ra, rb) in enumerate(zip(a, b))
                       for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)]
            if kind == "color replaced":
                assert changed == [(0, "color")]
            elif kind == "color swap":
                assert sorted(changed) == [(0, "color"), (1, "color")]
                assert (b[0]["color"], b[1]["color"]) == (a[1]["color"], a[0]["color"])
            elif kind == "relation flip":
                (i, key), = changed
                assert key == "position" and b[i]["position"] == [FLIP[a[i]["position"][0]], a[i]["position"][1]]
            else:  # count +1 / count -1: the exclude moves along, so the count stays exact
                assert changed == [(0, "count")] and b[0]["count"] == a[0]["count"] + (1 if kind == "count +1" else -1)
                assert pair["exclude"] == [{"class": a[0]["class"], "count": b[0]["count"] + 1}]
            if kind != "count +1" and kind != "count -1":
                assert pair["exclude"] == spec["exclude"]
    same = {"prompt": "a red star and a red heart", "tag": "color_attr", "exclude": [],
            "include": [{"class": "star", "count": 1, "color": "red"}, {"class": "heart", "count": 1, "color": "red"}]}
    assert minimal_pairs(same) == []  # swapping equal colours changes nothing: not a minimal pair


def test_renders_satisfy_their_spec_and_none_of_its_minimal_pairs(renders):
    """On the renderer's own objects (boxes from the instance map) GenEval's rules pass the spec and
    fail every minimal pair: each pair is truly unsatisfied by its render."""
    n_pairs = 0
    for spec, sample in zip(SPECS, renders):
        truth = truth_detections(sample.objects, sample.instance_map)
        assert truth_verdict(truth, spec) is True, spec["prompt"]
        for kind, pair in minimal_pairs(spec):
            assert truth_verdict(truth, pair) is False, (spec["prompt"], kind)
            n_pairs += 1
    assert n_pairs == PER_TAG * (9 + 1 + 1 + 2)


def test_truth_detections_keep_present_drop_gone_and_refuse_ambiguous_cuts():
    objs = [WorldObject("square", "red", "small", (10, 10, 20, 20)),
            WorldObject("circle", "blue", "small", (40, 40, 50, 50))]
    ref = np.zeros((64, 64), np.int16)
    ref[10:20, 10:20], ref[40:50, 40:50] = 1, 2
    dets = truth_detections(objs, ref)
    assert [(d.shape, d.box) for d in dets] == [("square", (10, 10, 20, 20)), ("circle", (40, 40, 50, 50))]
    cut = ref.copy()
    cut[:, 10:12] = 0  # the square keeps 80% of its pixels: present, box clipped to what is visible
    assert truth_detections(objs, cut, ref)[0].box == (12, 10, 20, 20)
    cut[:, 10:15] = 0  # 50%: neither clearly there nor clearly gone
    assert truth_detections(objs, cut, ref) is None and truth_verdict(None, {"include": []}) is None
    cut[ref == 1] = 0  # gone
    assert [d.shape for d in truth_detections(objs, cut, ref)] == ["circle"]


def test_degradations_do_what_they_say(renders):
    samples = renders[::10]
    images, maps = [s.image for s in samples], [s.instance_map for s in samples]
    x = np.stack(images).astype(np.float64)
    for j, (name, fn) in enumerate(DEGRADATIONS.items()):
        out, warped = degrade(images, maps, fn, seed=j)
        y = np.stack(out).astype(np.float64)
        assert y.shape == x.shape and out[0].dtype == np.uint8
        if name in PHOTOMETRIC:
            assert all(np.array_equal(a, b) for a, b in zip(warped, maps)), name
        diff = y - x
        if name.startswith("blur"):
            assert 0.3 < np.abs(diff).mean() < 6, name  # edges soften, flat areas stay
        elif name.startswith("noise"):
            std = float(name.split()[1].split("/")[0])
            inside = (y > 0) & (y < 255)
            assert abs(diff[inside].std() - std) < 0.15 * std, name
        elif name.startswith("color shift"):
            offsets = np.median(diff, axis=(1, 2))  # (B, 3): one offset per image and channel
            assert np.all((np.abs(offsets) >= 10) & (np.abs(offsets) <= 15.5)), offsets
        else:  # geometric: the objects move a little, their pixels stay
            kept = [np.mean([(w == k).sum() / (m == k).sum() for k in np.unique(m) if k])
                    for m, w in zip(maps, warped)]
            assert min(kept) > 0.7, (name, kept)
            if name.startswith("border cut"):  # some object now touches the border
                for w in warped:
                    assert (w[0] > 0).any() or (w[-1] > 0).any() or (w[:, 0] > 0).any() or (w[:, -1] > 0).any()
            else:
                assert np.mean([(w != m).mean() for m, w in zip(maps, warped)]) < 0.1, name


# ---- the classical check (no weights needed) ----------------------------------------------------

def drawn_image() -> np.ndarray:
    """A hand-made scene on the charcoal background: two white squares, a gray one, a blurred orange
    disk (its halo passes through brown), a one-pixel gray line (an edge ring, not an object)."""
    from chorus.world.evaluator import gaussian_blur
    img = np.broadcast_to(np.array(BACKGROUNDS["charcoal"], np.float32), (64, 64, 3)).copy()
    img[4:14, 4:14] = COLORS["white"]
    img[4:14, 20:30] = COLORS["white"]
    img[40:52, 4:16] = COLORS["gray"]
    img[30, 30:60] = COLORS["gray"]
    yy, xx = np.mgrid[0:64, 0:64]
    disk = (yy - 46) ** 2 + (xx - 44) ** 2 <= 49
    img[disk] = COLORS["orange"]
    x = torch.from_numpy(img / 255.0).permute(2, 0, 1)[None].float()
    blurred = gaussian_blur(x, 1.2)[0].permute(1, 2, 0).numpy() * 255.0
    img[36:58, 32:58] = blurred[36:58, 32:58]  # blur only around the disk
    return img.round().astype(np.uint8)


def test_connected_components_label_8_connected_blobs():
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True
    m[3, 3], m[4, 4], m[5, 5] = True, True, True  # a diagonal chain is one 8-connected component
    m[7, 0] = True
    labels, n = connected_components(m)
    assert n == 3 and len({labels[0, 0], labels[4, 4], labels[7, 0]}) == 3
    assert labels[3, 3] == labels[5, 5] and (labels[~m] == 0).all()


def test_color_components_on_a_drawn_scene():
    counts = color_components(drawn_image())
    assert {k: v for k, v in counts.items() if v} == {"white": 2, "gray": 1, "orange": 1}  # no brown halo, no line
    touching = drawn_image()
    touching[4:14, 14:20] = COLORS["white"]  # the two white squares now touch: one component
    assert color_components(touching)["white"] == 1


def test_count_verdict_reads_colour_and_count_clauses_only():
    c = {k: 0 for k in COLORS} | {"red": 3, "blue": 1}
    three_red = {"include": [{"class": "star", "count": 3, "color": "red"}], "exclude": [{"class": "star", "count": 4}]}
    assert count_verdict(c, three_red)
    assert not count_verdict(c | {"red": 4}, three_red) and not count_verdict(c | {"red": 2}, three_red)
    four_any = {"include": [{"class": "star", "count": 4}], "exclude": [{"class": "star", "count": 5}]}
    assert count_verdict(c, four_any) and not count_verdict(c | {"blue": 2}, four_any)  # 4 in all, not 5
    binding = {"include": [{"class": "star", "count": 1, "color": "red"},
                           {"class": "heart", "count": 1, "color": "green"}]}
    assert not count_verdict(c, binding) and count_verdict(c | {"green": 1}, binding)
    relation = {"include": [{"class": "star", "count": 1}, {"class": "heart", "count": 1, "position": ["above", 0]}]}
    assert count_verdict(c, relation) and not count_verdict({k: 0 for k in COLORS} | {"red": 1}, relation)


def test_classical_check_agrees_with_the_ground_truth_on_renders(renders):
    """Colors and counting renders: exact per-colour counts, own specs pass, colour/count minimal
    pairs fail; then the same on each mild degradation (the check must hold up on samples)."""
    idx = [i for i, s in enumerate(SPECS) if s["tag"] in ("colors", "counting")]
    images, maps = [renders[i].image for i in idx], [renders[i].instance_map for i in idx]
    variants = {"clean": images} | {name: degrade(images, maps, fn, TRUST_SEED + j)[0]
                                    for j, (name, fn) in enumerate(DEGRADATIONS.items())}
    print(f"\n== classical check on {len(idx)} colors/counting renders ==")
    print(f"{'variant':<19}{'counts':>8}{'own':>8}{'pairs fail':>12}")
    for name, imgs in variants.items():
        exact = own = fail = n_pairs = 0
        for i, im in zip(idx, imgs):
            v = classical_verdict(im, SPECS[i])
            exact += v.counts == truth_counts(renders[i])
            own += v.correct
            for _, pair in minimal_pairs(SPECS[i]):
                fail += not count_verdict(v.counts, pair)
                n_pairs += 1
        rates = exact / len(idx), own / len(idx), fail / n_pairs
        print(f"{name:<19}{rates[0]:>8.3f}{rates[1]:>8.3f}{rates[2]:>12.3f}")
        # measured: clean 1.000 (all 174 such benchmark prompts too); degraded 0.963-1.000, the misses
        # being objects drawn 1 px apart that merge once the gap is blurred or noisy
        floor = 0.97 if name == "clean" else 0.93
        assert min(rates) >= floor, (name, rates)


# ---- the evaluator (shipped weights) -------------------------------------------------------------

@needs_weights
def test_clean_renders_pass_their_spec_and_fail_its_minimal_pairs(report):
    clean = report["clean"]
    assert clean["undefined"] == 0 and clean["own"]["n_true"] == len(SPECS)
    assert clean["own"]["agree"] >= 0.97, clean["own"]  # measured 0.992
    assert clean["pairs"]["lenient"] <= 0.05, clean["pairs"]  # measured 0.002 (1 of 520)
    for kind, r in clean["pairs"]["kinds"].items():
        assert r["n"] >= PER_TAG and r["lenient"] <= 0.05, (kind, r)  # measured 0 except count -1: 1 of 40


@needs_weights
def test_mild_degradations_keep_the_verdict(report):
    for name, floor in FLOORS.items():
        r = report[name]
        assert r["undefined"] <= 0.05 * len(SPECS), (name, r["undefined"])  # border cut: 7 ambiguous cuts
        assert r["own"]["n_true"] == r["own"]["n"], name  # mild: the ground truth stays True
        assert r["own"]["agree"] >= floor, (name, r["own"])


@needs_weights
def test_degraded_renders_still_fail_their_minimal_pairs(report):
    """Measured: <= 0.006 over all pairs; per kind 0 except count -1 (0.025-0.05; border cut 0.079:
    a cut circle read as a hexagon is not counted as a circle, so 'n - 1 circles' passes)."""
    for name in DEGRADATIONS:
        pairs = report[name]["pairs"]
        assert pairs["lenient"] <= 0.10, (name, pairs)
        for kind, r in pairs["kinds"].items():
            assert r["lenient"] <= 0.10, (name, kind, r)


@needs_weights
def test_strong_degradations_err_towards_failing(evaluator):
    """Beyond mild (blur 2, noise 32/255, a cast of 20-30 levels, 10° / 10%, 2 px, 30% cut): fewer
    own specs pass (measured 0.885-1.000 at 96 prompts), yet minimal pairs still fail (measured <= 0.010
    over all pairs; count -1 is where leniency shows: 0.125 under blur 2, 0.175 at 240 prompts)."""
    specs = spread_specs(load_specs(), 16)
    r = trust_report(specs, evaluator, degradations=STRONG_DEGRADATIONS)
    print(f"\n== {len(specs)} renders, strong degradations ==\n{format_report(r)}")
    for name in STRONG_DEGRADATIONS:
        assert r[name]["own"]["agree"] >= 0.75, (name, r[name]["own"])
        assert r[name]["pairs"]["lenient"] <= 0.10, (name, r[name]["pairs"])


@needs_weights
def test_evaluator_and_classical_check_agree_on_colour_and_count(evaluator, renders):
    """On clean renders and on renders each degraded by one mild degradation in turn; a detector that
    sees nothing disagrees wherever the classical check passes."""
    images, maps = [s.image for s in renders], [s.instance_map for s in renders]
    mixed = list(images)
    for j, fn in enumerate(DEGRADATIONS.values()):
        out, _ = degrade(images[j::len(DEGRADATIONS)], maps[j::len(DEGRADATIONS)], fn, TRUST_SEED + j)
        mixed[j::len(DEGRADATIONS)] = out
    clean, degraded = agreement(images, SPECS, evaluator), agreement(mixed, SPECS, evaluator)
    print(f"\nevaluator vs classical colour/count verdicts: clean {clean:.3f}, degraded {degraded:.3f} "
          f"({len(SPECS)} images)")
    assert clean >= 0.97 and degraded >= 0.95  # measured 1.000 and 0.988

    class Blind:  # finds nothing
        def detect(self, images):
            return [[] for _ in images]

    recs = agreement_records(images[:12], SPECS[:12], Blind())
    assert all(r["classical"] and not r["evaluator"] for r in recs)
    assert agreement(images[:12], SPECS[:12], Blind()) == 0.0
    with pytest.raises(ChorusError):
        agreement(images[:3], SPECS[:2], evaluator)
