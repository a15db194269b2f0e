"""The conditioner as training uses it: per-embedder dropout by the step's draws, and caches of the
text embeddings of frozen encoders (each caption is encoded once). One semantics with sampling: a
dropped embedder gives exactly `embedder.unconditional(…)`, the branch classifier-free guidance uses."""
from __future__ import annotations

import warnings

import torch

from chorus.conditioning import Conditioner, Conditioning, TextEmbedder


class TrainingConditioner:
    """The pipeline's conditioner, as training uses it: dropout per embedder, and cached text embeddings.

    Each embedder is dropped independently at its own rate (`embedder.dropout`), and a dropped one gives
    `embedder.unconditional(values, None)` — the same call guidance's unconditional branch makes at
    sampling time, so training and sampling share one semantics (the empty prompt, or zeros for
    SDXL-style `zero_for_empty`; zeros for a number embedder trained with dropout). Text embeddings are
    stored in `dtype` (bf16 under bf16 autocast, where the UNet's projections round them to bf16 anyway).
    """

    def __init__(self, conditioner: Conditioner, cfg, dtype: torch.dtype, device):
        self.conditioner, self.dtype, self.device = conditioner, dtype, device
        self.cache_text, self.budget = cfg.cache_text, cfg.text_cache_mb * 2 ** 20
        if cfg.embedders is None:  # the base's conditioner: the config's two rates, written into its embedders
            for e in conditioner.embedders:
                e.dropout = cfg.text_dropout if isinstance(e, TextEmbedder) else cfg.micro_dropout
        self.rates = [e.dropout for e in conditioner.embedders]
        self.cache: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in conditioner.embedders]
        self.uncond: list[dict[str, torch.Tensor] | None] = [None for _ in conditioner.embedders]
        self.bytes, self.truncated = 0, 0
        for e in conditioner.embedders:
            e.requires_grad_(False).eval()

    @torch.no_grad()
    def _text(self, k: int, e: TextEmbedder, prompts: list[str]) -> dict[str, torch.Tensor]:
        cache = self.cache[k]
        todo = sorted({p for p in prompts if p not in cache}) if self.cache_text else list(dict.fromkeys(prompts))
        fresh = {}
        if todo:
            with warnings.catch_warnings():  # a caption longer than the window: its tail is cut, as at sampling
                warnings.simplefilter("ignore")
                out = e(todo)
            self.truncated += len(e.notes)
            e.notes = []
            for i, p in enumerate(todo):
                fresh[p] = {kind: v[i].to("cpu", self.dtype) for kind, v in out.items()}
                if self.cache_text and self.bytes < self.budget:
                    cache[p] = fresh[p]
                    self.bytes += sum(v.numel() * v.element_size() for v in fresh[p].values())
        rows = [cache.get(p) or fresh[p] for p in prompts]
        return {kind: torch.stack([r[kind] for r in rows]) for kind in rows[0]}

    @torch.no_grad()
    def _unconditional(self, k: int, e, n: int) -> dict[str, torch.Tensor]:
        if self.uncond[k] is None:
            out = e.unconditional([""], None)
            self.uncond[k] = {kind: v[0].to("cpu", self.dtype) for kind, v in out.items()}
        return {kind: v.expand(n, *v.shape) for kind, v in self.uncond[k].items()}

    def __call__(self, inputs: dict[str, list], keep: torch.Tensor) -> Conditioning:
        """keep: (n_embedders, b) bool for this micro-batch."""
        outputs = []
        for k, e in enumerate(self.conditioner.embedders):
            values = inputs[e.input_key]
            if isinstance(e, TextEmbedder):
                out = self._text(k, e, values)
                alt = self._unconditional(k, e, len(values)) if self.rates[k] > 0 else None
            else:
                out = {kind: v.float() for kind, v in e(values).items()}
                alt = ({kind: v.float() for kind, v in e.unconditional(values, None).items()}
                       if self.rates[k] > 0 else None)
            if alt is not None:
                mask = keep[k]
                out = {kind: torch.where(mask.view(-1, *[1] * (v.dim() - 1)), v, alt[kind].to(v.dtype))
                       for kind, v in out.items()}
            outputs.append(out)
        cond = self.conditioner._route(outputs, device=self.device)
        return cond.map(lambda t: t.float())  # autocast, where it is on, rounds it back to bf16 exactly


def text_storage_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 when the UNet really runs under bf16 autocast (`precision` resolved by
    chorus.devices.training_precision: GPU, or a CPU with bf16 kernels), else fp32."""
    if precision != "bf16":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    from chorus.models.layers import cpu_has_bf16_kernels
    return torch.bfloat16 if cpu_has_bf16_kernels() else torch.float32
