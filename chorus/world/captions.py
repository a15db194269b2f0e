"""Captions with specs: a small grammar of paraphrases, each caption paired with a GenEval spec.

A spec says what the caption demands, in the clause style of GenEval::

    {"prompt": "two red squares", "tag": "counting", "split": "train",
     "include": [{"class": "square", "count": 2, "color": "red"}],
     "exclude": [{"class": "square", "count": 3}]}

`position: [rel, j]` on include[i] means include[i] stands `rel` include[j]. An optional
`size` ("small" | "medium" | "large") on an include clause is Chorus's extension (GenEval ignores
it); the renderer honours it.

Three splits. "train" never uses a held-out colour–shape pair (HELDOUT_PAIRS, bound in a caption
or drawn anywhere in a training image) nor a held-out word or phrasing (HELDOUT_WORDS).
"heldout_pairs" binds at least one held-out pair with training words (compositional
generalisation); "heldout_words" uses at least one held-out word with training pairs (paraphrase
generalisation).
"""
from __future__ import annotations

import re

import numpy as np

from chorus.errors import ChorusError
from chorus.world.scene import COLORS, RELATIONS, SHAPES, SIZES

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS: tuple[str, ...] = ("train", "heldout_pairs", "heldout_words")
# Tags whose captions bind a colour to a shape (the only ones a held-out pair can appear in).
PAIR_TAGS: tuple[str, ...] = ("counting", "colors", "position", "color_attr")

# Eight colour–shape pairs training never sees: each colour and each shape appears in one pair.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "star"), ("red", "hexagon"), ("green", "heart"), ("yellow", "cross"),
    ("blue", "triangle"), ("orange", "diamond"), ("pink", "square"), ("white", "circle"),
})

# ---- the lexicon: training words, and held-out words of the same meaning ----------------------
TRAIN_NOUNS: dict[str, list[tuple[str, str]]] = {  # shape -> [(singular, plural)]
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "heart": [("heart", "hearts")],
    "cross": [("cross", "crosses")],
    "diamond": [("diamond", "diamonds")],
    "hexagon": [("hexagon", "hexagons")],
}
HELDOUT_NOUNS: dict[str, list[tuple[str, str]]] = {
    "circle": [("orb", "orbs")],
    "cross": [("plus sign", "plus signs")],
    "diamond": [("lozenge", "lozenges")],
    "hexagon": [("six-sided shape", "six-sided shapes")],
    "star": [("pentagram", "pentagrams")],
}
TRAIN_COLORS: dict[str, list[str]] = {c: [c] for c in COLORS}
HELDOUT_COLORS: dict[str, list[str]] = {
    "red": ["crimson"], "orange": ["tangerine"], "yellow": ["golden"], "green": ["emerald"],
    "blue": ["azure"], "purple": ["violet"], "pink": ["rose"], "brown": ["chocolate"],
    "white": ["ivory"], "gray": ["grey"],
}
TRAIN_SIZES: dict[str, list[str]] = {"small": ["small", "little"], "medium": ["medium", "medium-sized"],
                                     "large": ["large", "big"]}
HELDOUT_SIZES: dict[str, list[str]] = {"small": ["miniature"], "large": ["giant"]}
TRAIN_RELATIONS: dict[str, list[str]] = {
    "left of": ["left of", "to the left of", "on the left of"],
    "right of": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under"],
}
HELDOUT_RELATIONS: dict[str, list[str]] = {
    "left of": ["to the west of"], "right of": ["to the east of"],
    "above": ["to the north of"], "below": ["to the south of", "beneath"],
}
# "B with A to its left": the relation seen from B.
TRAIN_ITS: dict[str, list[str]] = {"left of": ["to its left"], "right of": ["to its right"],
                                   "above": ["above it"], "below": ["below it"]}
TRAIN_COUNTS: dict[int, list[str]] = {2: ["two", "2"], 3: ["three", "3"], 4: ["four", "4"]}
HELDOUT_COUNTS: dict[int, list[str]] = {2: ["a pair of"], 3: ["a trio of"], 4: ["a quartet of"]}
TRAIN_PREFIXES: list[str] = ["", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ",
                             "a render of "]
HELDOUT_PREFIXES: list[str] = ["a snapshot of ", "an illustration of "]
TRAIN_CONJ: list[str] = ["and", "and", "with"]
HELDOUT_CONJ: list[str] = ["as well as", "together with"]


def _heldout_phrases() -> tuple[str, ...]:
    words: set[str] = set()
    for table in (HELDOUT_NOUNS,):
        for forms in table.values():
            for sing, plur in forms:
                words |= {sing, plur}
    for table in (HELDOUT_COLORS, HELDOUT_SIZES, HELDOUT_RELATIONS, HELDOUT_COUNTS):
        for forms in table.values():
            words |= set(forms)
    words |= {p.strip() for p in HELDOUT_PREFIXES} | set(HELDOUT_CONJ)
    return tuple(sorted(words))


HELDOUT_WORDS: tuple[str, ...] = _heldout_phrases()
_HELDOUT_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in HELDOUT_WORDS) + r")\b")


def heldout_words_in(text: str) -> list[str]:
    """The held-out words or phrases that occur (as whole words) in `text`."""
    return _HELDOUT_RE.findall(text.lower())


def heldout_pairs_in(spec: dict) -> list[tuple[str, str]]:
    """The held-out (colour, shape) pairs an include clause of `spec` binds."""
    return [(r["color"], r["class"]) for r in spec.get("include", [])
            if "color" in r and (r["color"], r["class"]) in HELDOUT_PAIRS]


# ---- word choice ---------------------------------------------------------------------------
class _Lexicon:
    """Picks words; in the heldout_words split each slot may take a held-out variant."""

    def __init__(self, rng: np.random.Generator, heldout: bool):
        self.rng, self.heldout, self.used_heldout = rng, heldout, False

    def _pick(self, train: list, held: list | None):
        if self.heldout and held and self.rng.random() < 0.5:
            self.used_heldout = True
            return held[int(self.rng.integers(len(held)))]
        return train[int(self.rng.integers(len(train)))]

    def noun(self, shape: str, plural: bool = False) -> str:
        sing, plur = self._pick(TRAIN_NOUNS[shape], HELDOUT_NOUNS.get(shape))
        return plur if plural else sing

    def color(self, color: str) -> str:
        return self._pick(TRAIN_COLORS[color], HELDOUT_COLORS.get(color))

    def size(self, size: str) -> str:
        return self._pick(TRAIN_SIZES[size], HELDOUT_SIZES.get(size))

    def relation(self, rel: str) -> str:
        return self._pick(TRAIN_RELATIONS[rel], HELDOUT_RELATIONS.get(rel))

    def count(self, n: int) -> str:
        return self._pick(TRAIN_COUNTS[n], HELDOUT_COUNTS.get(n))

    def prefix(self) -> str:
        return self._pick(TRAIN_PREFIXES, HELDOUT_PREFIXES)

    def conj(self) -> str:
        return self._pick(TRAIN_CONJ, HELDOUT_CONJ)


def _a(phrase: str) -> str:
    """English indefinite article: 'a' or 'an' before `phrase`."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _np(lex: _Lexicon, req: dict, with_article: bool = True) -> str:
    """Noun phrase of one include clause with count 1: '[a] [size] [colour] noun'."""
    words = []
    if "size" in req:
        words.append(lex.size(req["size"]))
    if "color" in req:
        words.append(lex.color(req["color"]))
    words.append(lex.noun(req["class"]))
    phrase = " ".join(words)
    return _a(phrase) if with_article else phrase


def _np_postcolor(lex: _Lexicon, req: dict) -> str:
    """'a noun that is red' / 'a noun in red' (another word order for a coloured object)."""
    base = _np(lex, {k: v for k, v in req.items() if k != "color"})
    return base + (" that is " if lex.rng.random() < 0.5 else " in ") + lex.color(req["color"])


# ---- spec drawing --------------------------------------------------------------------------
def _pick_color(rng: np.random.Generator, shape: str, split: str, want_pair: bool = False) -> str:
    """A colour for `shape`: held-out pairs only when asked for (and never in train)."""
    if want_pair:
        return next(c for c, s in sorted(HELDOUT_PAIRS) if s == shape)
    choices = [c for c in COLORS if (c, shape) not in HELDOUT_PAIRS]
    return choices[int(rng.integers(len(choices)))]


def _shapes(rng: np.random.Generator, k: int) -> list[str]:
    return [SHAPES[i] for i in rng.choice(len(SHAPES), size=k, replace=False)]


def _maybe_size(rng: np.random.Generator, req: dict, p: float = 0.25) -> dict:
    if rng.random() < p:
        req["size"] = list(SIZES)[int(rng.integers(len(SIZES)))]
    return req


def _clauses(rng: np.random.Generator, tag: str, split: str) -> tuple[list[dict], list[dict]]:
    """The include/exclude clauses of one spec of `tag` (no caption yet)."""
    pairs = split == "heldout_pairs"
    if tag == "single_object":
        return [_maybe_size(rng, {"class": _shapes(rng, 1)[0], "count": 1})], []
    if tag == "two_object":
        a, b = _shapes(rng, 2)
        return [{"class": a, "count": 1}, {"class": b, "count": 1}], []
    if tag == "colors":
        s = _shapes(rng, 1)[0]
        return [_maybe_size(rng, {"class": s, "count": 1, "color": _pick_color(rng, s, split, pairs)})], []
    if tag == "counting":
        s, n = _shapes(rng, 1)[0], int(rng.integers(2, 5))
        req = {"class": s, "count": n}
        if pairs or rng.random() < 0.5:
            req["color"] = _pick_color(rng, s, split, pairs)
        return [_maybe_size(rng, req, 0.15)], [{"class": s, "count": n + 1}]
    if tag == "color_attr":
        a, b = _shapes(rng, 2)
        which = int(rng.integers(2)) if pairs else -1
        ca = _pick_color(rng, a, split, which == 0)
        cb = _pick_color(rng, b, split, which == 1)
        while cb == ca:  # two different colours; the held-out pair's colour stays fixed
            if which == 1:
                ca = _pick_color(rng, a, split)
            else:
                cb = _pick_color(rng, b, split)
        return [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}], []
    if tag == "position":
        a, b = _shapes(rng, 2)
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        target, obj = {"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}
        which = int(rng.integers(2)) if pairs else -1
        for i, req in enumerate((target, obj)):
            if which == i or (which < 0 and rng.random() < 0.3):
                req["color"] = _pick_color(rng, req["class"], split, which == i)
        return [target, obj], []
    raise ChorusError(f"Unknown task tag {tag!r}; the tags are: {', '.join(TAGS)}.")


def _caption(lex: _Lexicon, tag: str, include: list[dict]) -> str:
    """A paraphrase of the clauses: prefix + the tag's template with a random word order."""
    rng = lex.rng
    if tag in ("single_object", "colors"):
        req = include[0]
        body = _np_postcolor(lex, req) if "color" in req and rng.random() < 0.3 else _np(lex, req)
    elif tag == "two_object" or tag == "color_attr":
        first, second = (include[0], include[1]) if rng.random() < 0.5 else (include[1], include[0])
        post = tag == "color_attr" and rng.random() < 0.25
        part = (lambda r: _np_postcolor(lex, r)) if post else (lambda r: _np(lex, r))
        body = f"{part(first)} {lex.conj()} {part(second)}"
    elif tag == "counting":
        req = include[0]
        words = [lex.count(req["count"])]
        words += [lex.size(req["size"])] if "size" in req else []
        words += [lex.color(req["color"])] if "color" in req else []
        body = " ".join(words + [lex.noun(req["class"], plural=True)])
    elif tag == "position":
        target, obj = include
        rel = obj["position"][0]
        if rng.random() < 0.25 and not lex.heldout:
            its = TRAIN_ITS[rel][int(rng.integers(len(TRAIN_ITS[rel])))]
            body = f"{_np(lex, target)} with {_np(lex, obj)} {its}"
        else:
            body = f"{_np(lex, obj)} {lex.relation(rel)} {_np(lex, target)}"
    else:
        raise ChorusError(f"Unknown task tag {tag!r}; the tags are: {', '.join(TAGS)}.")
    prefix = lex.prefix()
    return prefix + body


def sample_spec(rng: np.random.Generator, tag: str, split: str = "train") -> dict:
    """Draw one caption and its GenEval spec of task `tag` from `split` (see the module doc)."""
    if split not in SPLITS:
        raise ChorusError(f"Unknown split {split!r}; the splits are: {', '.join(SPLITS)}.")
    if tag not in TAGS:
        raise ChorusError(f"Unknown task tag {tag!r}; the tags are: {', '.join(TAGS)}.")
    if split == "heldout_pairs" and tag not in PAIR_TAGS:
        raise ChorusError(f"Tag {tag!r} names no colour, so it cannot carry a held-out colour–shape "
                          f"pair; the heldout_pairs split has the tags: {', '.join(PAIR_TAGS)}.")
    include, exclude = _clauses(rng, tag, split)
    for _ in range(100):
        lex = _Lexicon(rng, heldout=split == "heldout_words")
        prompt = _caption(lex, tag, include)
        if split != "heldout_words" or lex.used_heldout:
            break
    else:  # pragma: no cover - 100 fair coins all tails
        raise RuntimeError("could not draw a held-out phrasing")
    return {"prompt": prompt, "tag": tag, "include": include, "exclude": exclude, "split": split}


# ---- validation ----------------------------------------------------------------------------
def _check_count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChorusError(f"{where}: 'count' must be a whole number >= 1, got {value!r}.")
    return value


def _check_clause(req, where: str, index: int, n_before: int, kind: str) -> None:
    if not isinstance(req, dict):
        raise ChorusError(f"{where}: {kind}[{index}] must be an object like "
                          f'{{"class": "circle", "count": 1}}, got {req!r}.')
    at = f"{where}: {kind}[{index}]"
    if "class" not in req:
        raise ChorusError(f"{at} has no 'class' field; give one of: {', '.join(SHAPES)}.")
    if req["class"] not in SHAPES:
        raise ChorusError(f"{at}.class {req['class']!r} is not a shape of the Shapes world; "
                          f"the shapes are: {', '.join(SHAPES)}.")
    _check_count(req.get("count", 1), f"{at}.count")
    if "color" in req and req["color"] not in COLORS:
        raise ChorusError(f"{at}.color {req['color']!r} is not a colour of the Shapes world; "
                          f"the colours are: {', '.join(COLORS)}.")
    if "size" in req and req["size"] not in SIZES:
        raise ChorusError(f"{at}.size {req['size']!r} is unknown; the sizes are: {', '.join(SIZES)}.")
    if "position" in req:
        pos = req["position"]
        ok = isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
        ok = ok and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < n_before
        if not ok:
            raise ChorusError(f"{at}.position must be [relation, j] with relation one of "
                              f"{', '.join(RELATIONS)} and j the index of an earlier include clause "
                              f"(0..{n_before - 1}), got {pos!r}.")


def validate_spec(spec, where: str = "spec") -> dict:
    """Check a spec's fields and names; returns it with every clause's count filled in.

    Raises ChorusError naming `where` (e.g. "specs.jsonl line 3") and the bad field.
    """
    if not isinstance(spec, dict):
        raise ChorusError(f"{where}: a spec must be a JSON object with 'prompt' and 'include', got "
                          f"{type(spec).__name__}.")
    if not isinstance(spec.get("prompt", ""), str):
        raise ChorusError(f"{where}: 'prompt' must be a string.")
    if "tag" in spec and not isinstance(spec["tag"], str):
        raise ChorusError(f"{where}: 'tag' must be a string such as {TAGS[0]!r}.")
    include = spec.get("include")
    if not isinstance(include, list) or not include:
        raise ChorusError(f"{where}: 'include' must be a non-empty list of clauses like "
                          f'{{"class": "circle", "count": 1}}.')
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list):
        raise ChorusError(f"{where}: 'exclude' must be a list of clauses.")
    for i, req in enumerate(include):
        _check_clause(req, where, i, i, "include")
    for i, req in enumerate(exclude):
        _check_clause(req, where, i, 0, "exclude")
    out = dict(spec)
    out["include"] = [{**r, "count": r.get("count", 1)} for r in include]
    out["exclude"] = [{**r, "count": r.get("count", 1)} for r in exclude]
    return out


# ---- descriptive captions (DALL-E 3's recaptioning, in miniature) ---------------------------------
def describe_scene(rng: np.random.Generator, objects, min_visible: float = 0.3, max_relations: int = 1) -> str:
    """A complete, truthful caption of a rendered scene: every visible object with its colour and size
    (same-looking objects grouped as a count), in random order, then up to `max_relations` relation
    clauses between distinct objects whose relation is unambiguous under GenEval's rule.

    `objects` are the renderer's WorldObjects (ground truth, not the prompt); training words only.
    """
    from chorus.world.render import relations
    objs = [o for o in objects if o.visible_fraction >= min_visible]
    if not objs:
        return "an empty background"
    lex = _Lexicon(rng, heldout=False)
    groups: dict[tuple[str, str], list] = {}
    for o in objs:
        groups.setdefault((o.color, o.shape), []).append(o)
    keys = list(groups)
    rng.shuffle(keys)
    parts = []
    for color, shape in keys:
        members = groups[(color, shape)]
        sizes = {o.size for o in members}
        words = ([lex.size(members[0].size)] if len(sizes) == 1 and rng.random() < 0.7 else []) + [lex.color(color)]
        n = len(members)
        if n == 1:
            parts.append(_a(" ".join(words + [lex.noun(shape)])))
        else:
            parts.append(" ".join([lex.count(n) if n in TRAIN_COUNTS else str(n)] + words
                                  + [lex.noun(shape, plural=True)]))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    # relations only between objects the caption names uniquely (the only one of its colour and shape)
    singles = [k for k in keys if len(groups[k]) == 1]
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1:]]
    rng.shuffle(pairs)
    clauses = []
    limit = max_relations if len(keys) <= 3 else 0   # keep the caption inside a 32-token window
    for a, b in pairs:
        if len(clauses) >= limit:
            break
        if rng.random() < 0.5:
            a, b = b, a
        rels = sorted(relations(groups[a][0].box, groups[b][0].box))
        if len(rels) != 1:
            continue
        clauses.append(f"the {lex.color(a[0])} {lex.noun(a[1])} is {lex.relation(rels[0])} "
                       f"the {lex.color(b[0])} {lex.noun(b[1])}")
    return text + ("; " + ", ".join(clauses) if clauses else "")
