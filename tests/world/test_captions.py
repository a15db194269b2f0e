"""Captions and specs: structure, truthful wording, and held-out splits absent from training."""
import re

import numpy as np
import pytest

from chorus.errors import ChorusError
from chorus.world.captions import (HELDOUT_PAIRS, HELDOUT_WORDS, PAIR_TAGS, SPLITS, TAGS, TRAIN_COLORS,
                                   TRAIN_COUNTS, TRAIN_NOUNS, HELDOUT_COLORS, HELDOUT_COUNTS, HELDOUT_NOUNS,
                                   heldout_pairs_in, heldout_words_in, sample_spec, validate_spec)
from chorus.world.render import make_sample
from chorus.world.scene import COLORS, SHAPES


def _words(text):
    return " " + re.sub(r"\s+", " ", text.lower()) + " "


def _mentions(text, forms):
    return any(f" {f} " in _words(text) for f in forms)


def test_specs_of_every_tag_are_valid_and_shaped_like_geneval():
    rng = np.random.default_rng(0)
    for split in SPLITS:
        for tag in TAGS:
            if split == "heldout_pairs" and tag not in PAIR_TAGS:
                continue
            for _ in range(40):
                spec = sample_spec(rng, tag, split)
                assert validate_spec(spec) == spec
                assert spec["tag"] == tag and spec["split"] == split and spec["prompt"]
                inc = spec["include"]
                n = {"single_object": 1, "colors": 1, "counting": 1}.get(tag, 2)
                assert len(inc) == n
                if tag == "counting":
                    assert 2 <= inc[0]["count"] <= 4
                    assert spec["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
                else:
                    assert all(r["count"] == 1 for r in inc) and spec["exclude"] == []
                if n == 2:
                    assert inc[0]["class"] != inc[1]["class"]
                if tag == "color_attr":
                    assert "color" in inc[0] and "color" in inc[1] and inc[0]["color"] != inc[1]["color"]
                if tag == "colors":
                    assert "color" in inc[0]
                if tag == "position":
                    assert "position" not in inc[0] and inc[1]["position"][1] == 0


def test_captions_name_what_the_spec_demands():
    """Every clause's shape, colour and count appears in the caption (training words)."""
    rng = np.random.default_rng(1)
    for _ in range(600):
        tag = TAGS[int(rng.integers(len(TAGS)))]
        spec = sample_spec(rng, tag, "train")
        text = spec["prompt"]
        for req in spec["include"]:
            forms = [f for pair in TRAIN_NOUNS[req["class"]] for f in pair]
            assert _mentions(text, forms), (text, req)
            if "color" in req:
                assert _mentions(text, TRAIN_COLORS[req["color"]]), (text, req)
            if req["count"] > 1:
                assert _mentions(text, TRAIN_COUNTS[req["count"]]), (text, req)
        # no colour word the spec does not demand
        named = {r.get("color") for r in spec["include"]}
        for c in COLORS:
            if c not in named:
                assert not _mentions(text, [c]), (text, c)


def test_training_never_sees_heldout_pairs_or_words():
    """Over thousands of training specs and rendered samples (incl. unnamed colours and distractors)."""
    rng = np.random.default_rng(2)
    for _ in range(4000):
        spec = sample_spec(rng, TAGS[int(rng.integers(len(TAGS)))], "train")
        assert not heldout_words_in(spec["prompt"]), spec["prompt"]
        assert not heldout_pairs_in(spec)
    for i in range(1500):
        s = make_sample(21, i)
        assert not heldout_words_in(s.caption), s.caption
        assert not heldout_pairs_in(s.spec)
        assert all((o.color, o.shape) not in HELDOUT_PAIRS for o in s.objects), s.caption
        for c, sh in HELDOUT_PAIRS:  # nor the pair's words side by side
            assert not re.search(rf"\b{c} {sh}", s.caption)


def test_heldout_splits_contain_what_they_promise():
    rng = np.random.default_rng(3)
    for _ in range(500):
        spec = sample_spec(rng, PAIR_TAGS[int(rng.integers(len(PAIR_TAGS)))], "heldout_pairs")
        assert heldout_pairs_in(spec) and not heldout_words_in(spec["prompt"])
        spec = sample_spec(rng, TAGS[int(rng.integers(len(TAGS)))], "heldout_words")
        assert heldout_words_in(spec["prompt"]) and not heldout_pairs_in(spec)
    s = make_sample(0, 0, split="heldout_pairs")
    assert heldout_pairs_in(s.spec)


def test_heldout_vocabulary_is_disjoint_from_training_vocabulary():
    train = {f for forms in TRAIN_NOUNS.values() for pair in forms for f in pair}
    train |= {w for forms in TRAIN_COLORS.values() for w in forms}
    train |= {w for forms in TRAIN_COUNTS.values() for w in forms}
    held = {f for forms in HELDOUT_NOUNS.values() for pair in forms for f in pair}
    held |= {w for forms in HELDOUT_COLORS.values() for w in forms}
    held |= {w for forms in HELDOUT_COUNTS.values() for w in forms}
    assert not train & held and held <= set(HELDOUT_WORDS)
    assert len(HELDOUT_PAIRS) == 8 and {c for c, _ in HELDOUT_PAIRS} <= set(COLORS)
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)


def test_paraphrases_vary():
    rng = np.random.default_rng(4)
    texts = {sample_spec(rng, "position")["prompt"] for _ in range(300)}
    assert len(texts) > 200
    assert any("to the left of" in t for t in texts) and any(re.search(r"\bleft of\b", t) for t in texts)
    assert any(" with " in t and " it" in t or "its " in t for t in texts)  # "B with A to its left"


def test_validate_spec_errors_name_the_field():
    good = {"prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    assert validate_spec(good)["exclude"] == []
    with pytest.raises(ChorusError, match=r"include\[0\]\.class 'blob'.*circle, square, triangle"):
        validate_spec({"include": [{"class": "blob"}]}, where="f.jsonl line 3")
    with pytest.raises(ChorusError, match=r"line 3: include\[0\]\.color 'teal'.*red, orange"):
        validate_spec({"include": [{"class": "star", "color": "teal"}]}, where="line 3")
    with pytest.raises(ChorusError, match="count"):
        validate_spec({"include": [{"class": "star", "count": 0}]})
    with pytest.raises(ChorusError, match="position"):
        validate_spec({"include": [{"class": "star", "position": ["left of", 0]}]})
    with pytest.raises(ChorusError, match="position"):
        validate_spec({"include": [{"class": "star"}, {"class": "heart", "position": ["west of", 0]}]})
    with pytest.raises(ChorusError, match="include"):
        validate_spec({"prompt": "nothing"})
    with pytest.raises(ChorusError, match="heldout_pairs"):
        sample_spec(np.random.default_rng(0), "single_object", "heldout_pairs")
    with pytest.raises(ChorusError, match="tags are"):
        sample_spec(np.random.default_rng(0), "nope")
