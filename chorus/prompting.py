"""A1111's prompt habits: emphasis, long prompts in 75-token chunks, BREAK, clip skip.

What `TextEmbedder` does with a prompt when its `prompt_syntax` is on (the pipeline turns it on for
every call unless `prompt_syntax="plain"`), following AUTOMATIC1111's stable-diffusion-webui:

- **Emphasis** (`modules/prompt_parser.py::parse_prompt_attention`): `(word)` multiplies the weight of
  its tokens by 1.1, `[word]` divides it by 1.1, `(word:1.3)` multiplies it by 1.3; brackets nest
  (`((word))` = 1.21); an unclosed bracket runs to the end of the prompt; `\\(`, `\\)`, `\\[`, `\\]`
  and `\\\\` are literal characters. `parse_prompt_attention` below is A1111's parser (its doctest
  vectors are in tests/test_prompting.py) with one deliberate difference: a `BREAK` inside brackets
  still breaks (A1111 multiplies the BREAK marker's weight of −1 too, and then encodes the word BREAK
  with a weight of −1.1).
- **Applying the weights** (`modules/sd_emphasis.py`, "Original", A1111's default): the encoder runs
  on the plain token ids; its output `z` (the layer the model reads, after clip skip and the final
  layer norm) is multiplied token by token by the weights, then rescaled so that the mean of `z`
  over the whole chunk (all tokens × all features, BOS/EOS/padding included) is what it was:
  `z' = z·w`, `z'' = z'·(mean(z)/mean(z'))`. A1111 takes that mean over the whole batch of one
  chunk; Chorus takes it per prompt, which is the same number when a batch repeats one prompt (A1111's
  txt2img batches) and keeps an image independent of its batch neighbours. A chunk whose weights are
  all 1 is left untouched, so a plain prompt gives bit for bit the embedding it gave before.
- **Long prompts** (`modules/sd_hijack_clip.py`): the tokens are cut into chunks of window − 2
  tokens (75 for CLIP's 77), each chunk is wrapped in BOS … EOS and padded to the window, encoded
  alone, and the chunks' outputs are concatenated on the sequence axis (a context of 77·k tokens).
  When a chunk fills up and a comma came within its last 20 tokens, the tokens after that comma move
  to the next chunk (A1111's `comma_padding_backtrack`, default 20). `BREAK` (upper case, as a word)
  ends the current chunk at once. The pooled vector (SDXL) is the first chunk's. Prompts of one
  batch, and the two branches of guidance, are padded with empty chunks (BOS, EOS, padding: the
  encoded empty prompt, A1111's `pad_cond`) to the same number of chunks, so guidance runs in one
  UNet batch. Encoders without chunking (the MiniLM sentence encoder, a BERT with an attention mask)
  read the prompt with its syntax removed and its weights applied, truncated to their window as
  before; a stage that mixes the two truncates every encoder (their contexts must stay equally long).
- **Clip skip** N (A1111's numbering, `CLIP_stop_at_last_layers`: 1 = the last layer, the default):
  an SD 1.x/2.x encoder (layer "last") gives `final_layer_norm(hidden_states[-N])` (N = 1 is
  `last_hidden_state` itself); an SDXL-style encoder (layer "penultimate") gives
  `hidden_states[-(N + 1)]`, no final norm. diffusers' `clip_skip` is A1111's minus one
  (diffusers `clip_skip=1` = A1111 "Clip skip: 2" = `hidden_states[-2]` + final norm on SD 1.x;
  `hidden_states[-(clip_skip + 2)]` on SDXL), and gives the same numbers as Chorus's `clip_skip + 1`.
  A1111 itself ignores clip skip on SDXL unless its `sdxl_clip_l_skip` option is set; Chorus follows
  diffusers there. The pooled vector is always the final layer's.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Sequence

import torch

from chorus.errors import ChorusError

ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20   # A1111's opts.comma_padding_backtrack default
BREAK = "BREAK"
SYNTAXES = ("a1111", "plain")

_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """A1111's parser: [[text, weight], ...]; a BREAK is ["BREAK", -1].

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            if not _is_break(res[p]):   # a BREAK keeps its marker (A1111 multiplies it too)
                res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                value = float(weight)
            except ValueError:
                raise ChorusError(f"The emphasis weight {weight!r} in the prompt {text!r} is not a number; "
                                  "write (word:1.2), or \\( for a literal bracket.") from None
            multiply_range(round_brackets.pop(), value)
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append([BREAK, -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND)
    for pos in square_brackets:
        multiply_range(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0   # merge runs of equal weight (never two BREAKs)
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1] and not _is_break(res[i]) and not _is_break(res[i + 1]):
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def _is_break(item) -> bool:
    return item[0] == BREAK and item[1] == -1


def plain_text(text: str) -> str:
    """The prompt with its emphasis syntax removed (what an encoder that cannot weigh tokens reads)."""
    return "".join(" " if _is_break(p) else p[0] for p in parse_prompt_attention(text))


def weighted_pieces(tokenizer, text: str) -> list[tuple[list[int], float] | None]:
    """(token ids, weight) per parsed piece, None for a BREAK (A1111 tokenizes each piece alone)."""
    parsed = parse_prompt_attention(text)
    texts = [p[0] for p in parsed if not _is_break(p)]
    ids = iter(tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]) if texts else iter(())
    return [None if _is_break(p) else (list(next(ids)), float(p[1])) for p in parsed]


def build_chunks(pieces, chunk_length: int, comma_id: int | None = None,
                 backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """A1111's `tokenize_line`: the tokens and weights of each chunk (at most chunk_length, no BOS/EOS)."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        chunks.append((tokens, mults))
        tokens, mults, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:          # BREAK
            next_chunk()
            continue
        ids, weight = piece
        for tok in ids:
            if comma_id is not None and tok == comma_id:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1
                moved_t, moved_m = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved_t, moved_m
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(tok)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, per prompt: z·w, rescaled so the mean of each row's (L, D) is kept.

    z (B, L, D), weights (B, L). Rows whose weights are all 1 are returned untouched."""
    weights = weights.to(z.device, torch.float32)
    rows = (weights != 1.0).any(dim=1)
    if not bool(rows.any()):
        return z
    out = z.clone()
    for b in torch.nonzero(rows).flatten().tolist():
        zb = z[b].float()
        original_mean = zb.mean()
        zb = zb * weights[b][:, None]
        zb = zb * (original_mean / zb.mean())
        out[b] = zb.to(z.dtype)
    return out


@contextmanager
def prompt_settings(conditioner, texts: Sequence[str], syntax: str = "a1111", clip_skip: int | None = None,
                    min_length: int | None = None):
    """For one pipeline call: the text embedders of `conditioner` read A1111's syntax (or not), use clip
    skip, and agree on one number of chunks, enough for every text of the call (prompts and negatives)
    and for `min_length` context tokens (given prompt embeddings), so the branches of guidance line up."""
    from chorus.conditioning import TextEmbedder
    if syntax not in SYNTAXES:
        raise ChorusError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, not {syntax!r}.")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1):
        raise ChorusError(f"clip_skip must be a whole number ≥ 1 (A1111's numbering: 1 = the last layer), "
                          f"got {clip_skip!r}.")
    embs = [e for e in conditioner.embedders if isinstance(e, TextEmbedder)]
    saved = [(e.prompt_syntax, e.chunks, e.clip_skip) for e in embs]
    try:
        on = syntax == "a1111"
        for e in embs:
            e.prompt_syntax = on
            if clip_skip is not None:
                e.clip_skip = clip_skip
        chunkers = [e for e in embs if e.can_chunk]
        if on and chunkers:
            if all(e.can_chunk for e in embs if e.context):
                n = max(e.count_chunks(list(texts) or [""]) for e in chunkers)
                if min_length:
                    n = max(n, -(-int(min_length) // chunkers[0].max_length))
            else:
                n = 1   # a stage with an encoder that cannot chunk: every encoder truncates to its window
            for e in chunkers:
                e.chunks = n
        yield
    finally:
        for e, (s, c, k) in zip(embs, saved):
            e.prompt_syntax, e.chunks, e.clip_skip = s, c, k


# --- prompt editing: [from:to:when] (A1111's modules/prompt_parser.py, get_learned_conditioning_prompt_schedules)

_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*")


def _matching(text: str, i: int) -> int:
    """The index of the `]` closing the `[` at i (escapes and nesting respected), or -1."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        depth += c == "["
        depth -= c == "]"
        if depth == 0:
            return j
        j += 1
    return -1


def _top_level_split(text: str, sep: str = ":") -> list[str]:
    parts, depth, start, j = [], 0, 0, 0
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:j])
            start = j + 1
        j += 1
    return parts + [text[start:]]


def _parse_edits(text: str) -> list:
    """Text pieces and ("edit", before, after, when) nodes; a bracket that is not an edit stays literal
    (A1111's `[word]` de-emphasis, read later by parse_prompt_attention)."""
    out, i, plain = [], 0, []
    while i < len(text):
        c = text[i]
        if c == "\\":
            plain.append(text[i:i + 2])
            i += 2
            continue
        end = _matching(text, i) if c == "[" else -1
        if end < 0:
            plain.append(c)
            i += 1
            continue
        inner = text[i + 1:end]
        parts = _top_level_split(inner)
        if len(parts) in (2, 3) and _NUMBER.fullmatch(parts[-1]):
            before, after = ("", parts[0]) if len(parts) == 2 else (parts[0], parts[1])
            out += ["".join(plain), ("edit", _parse_edits(before), _parse_edits(after), parts[-1].strip())]
        else:
            out += ["".join(plain), "[", *_parse_edits(inner), "]"]
        plain = []
        i = end + 1
    return [*out, "".join(plain)]


def _when(s: str, steps: int) -> int:
    """A1111's rule: a number with a decimal point is a fraction of the steps, an integer a step number."""
    v = float(s) * steps if "." in s else float(s)
    return min(steps, int(v))


def _edit_steps(nodes: list, steps: int) -> set[int]:
    out: set[int] = set()
    for n in nodes:
        if isinstance(n, tuple):
            out |= {_when(n[3], steps)} | _edit_steps(n[1], steps) | _edit_steps(n[2], steps)
    return out


def _text_at(nodes: list, step: int, steps: int) -> str:
    return "".join(n if isinstance(n, str) else _text_at(n[1] if step <= _when(n[3], steps) else n[2], step, steps)
                   for n in nodes)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt editing: [(last_step, prompt), …], the prompt that conditions sampling steps (0-based)
    up to and including last_step, the last entry ending at `steps`.

    `[from:to:when]` reads `from` until step `when`, then `to`; `[to:when]` adds `to` after `when`;
    `[from::when]` removes `from` after `when`. `when` with a decimal point is a fraction of the steps
    (0.4 of 20 → step 8), a whole number is a step; the edited part is in use up to and including that step,
    as A1111 counts (`[a:b:0.5]` of 20 steps: `a` for steps 0–10). Edits nest. A prompt without
    edits is one entry, itself, and brackets that are not edits are left as they are."""
    nodes = _parse_edits(text)
    edits = _edit_steps(nodes, steps)
    if not edits:
        return [(steps, text)]
    ends = sorted({s for s in edits if s < steps} | {steps})
    out: list[tuple[int, str]] = []
    for e in ends:
        t = _text_at(nodes, e, steps)
        if out and out[-1][1] == t:
            out[-1] = (e, t)
        else:
            out.append((e, t))
    return out


def batch_prompt_schedule(prompts: Sequence[str], steps: int) -> list[tuple[int, list[str]]]:
    """The schedules of a batch on one set of step boundaries: [(last_step, [prompt of each item]), …]."""
    each = [prompt_schedule(p, steps) for p in prompts]
    ends = sorted({e for s in each for e, _ in s})
    return [(e, [next(t for last, t in s if e <= last) for s in each]) for e in ends]
