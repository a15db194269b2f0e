"""The UNet's spatial transformer: self-attention over pixels, cross-attention to the text context.

`Transformer2D` (diffusers' `Transformer2DModel`, the LDM "SpatialTransformer") flattens a feature
map into H·W tokens, runs `TransformerBlock`s (self-attn → cross-attn → GEGLU feed-forward, each
pre-LayerNorm with a residual) and folds the tokens back, adding the input.

Attention runs through `F.scaled_dot_product_attention`. When a hook is installed (see
`chorus.models.layers.hooks`) an `Attention` layer reports its projected query/key/value
(B, heads, L, d) and computes the pre-softmax logits (B, heads, Lq, Lk) explicitly so the hook can
read or replace them — the entry point for Plug-and-Play and paint-with-words.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chorus.models.layers import Hookable, add_

HALF_DTYPES = (torch.float16, torch.bfloat16)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, heads·d) → (B, heads, L, d), a view."""
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, d) → (B, L, heads·d)."""
    b, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * d)


def attention_explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, hook: Hookable) -> Tensor:
    """softmax(q·kᵀ/√d + mask)·v in fp32, offering the logits (B, h, Lq, Lk) to the hook before the softmax."""
    q, k, v = q.float(), k.float(), v.float()
    logits = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, Lq, Lk)
    if mask is not None:
        logits = logits + mask
    logits = hook.call_hook("logits", logits)
    return torch.matmul(F.softmax(logits.float(), dim=-1), v)  # (B, h, Lq, d)


def slow_bf16_backward(q: Tensor) -> bool:
    """Will the backward pass go through CPU's bf16 flash attention? At the UNet's head sizes (d = 32,
    16-256 tokens) its backward is 5-15× slower than fp32's (measured: docs/training.md, Precision), which made
    bf16 training slower than fp32; attention that is differentiated therefore runs in fp32 there
    (more exact as well). The forward pass alone is faster in bf16 and stays so."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled()


class Attention(Hookable, nn.Module):
    """softmax(Q Kᵀ/√d) V with Q = x W_q, K = c W_k, V = c W_v (c = x for self-attention), then W_out."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 dropout: float = 0.0, upcast_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def project_qkv(self, x: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        """Q, K, V as (B, L, inner). Self-attention over many tokens uses one matmul over [W_q; W_k; W_v]
        (the concatenated weight costs 3·C² copies, the fusion saves two passes over B·L·C inputs)."""
        if context is x and x.shape[0] * x.shape[1] >= 3 * x.shape[-1]:
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3·inner, C)
            return F.linear(x, w).chunk(3, dim=-1)
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, Lq, C); context: (B, Lk, C_ctx) or None; mask: additive, broadcastable to (B, h, Lq, Lk)."""
        context = x if context is None else context
        q, k, v = (split_heads(t, self.heads) for t in self.project_qkv(x, context))  # (B, h, L, d)
        dtype = q.dtype
        fp32_on_cpu = slow_bf16_backward(q)
        if (self.upcast_attention and dtype in HALF_DTYPES) or fp32_on_cpu:
            q, k, v = q.float(), k.float(), v.float()
        if self.hook is None:
            # (CPU autocast would cast the fp32 inputs back to bf16: it is off for this one call)
            with torch.autocast("cpu", enabled=False) if fp32_on_cpu else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
        else:
            q, k, v = self.call_hook("query", q), self.call_hook("key", k), self.call_hook("value", v)
            out = attention_explicit(q, k, v, mask, self)
        out = merge_heads(out.to(dtype))  # (B, Lq, inner)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """GEGLU(x) = h · GELU(g) where [h, g] = x W + b."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return h * F.gelu(gate)
        return F.gelu(gate).mul_(h)  # inference: reuse the GELU output


class FeedForward(nn.Module):
    """FF(x) = W₂ · GEGLU(x), inner width 4·dim (diffusers keys net.0.proj, net.2)."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """x += SelfAttn(LN(x)); x += CrossAttn(LN(x), c); x += FF(LN(x))  (diffusers' BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, dropout: float = 0.0,
                 upcast_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, None, dropout, upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, dropout, upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        x = add_(self.attn1(self.norm1(x)), x)  # (B, HW, C); in place on the fresh attention output
        x = add_(self.attn2(self.norm2(x), context, context_mask), x)
        return add_(self.ff(self.norm3(x)), x)


class Transformer2D(nn.Module):
    """out = x + proj_out(blocks(proj_in(GN(x)) as H·W tokens))  (diffusers' Transformer2DModel)."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int = 32, use_linear_projection: bool = False, dropout: float = 0.0,
                 upcast_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(in_channels, inner), nn.Linear(inner, in_channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(in_channels, inner, 1), nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, cross_attention_dim, dropout, upcast_attention)
            for _ in range(num_layers)
        )

    def pointwise(self, layer: nn.Module, tokens: Tensor) -> Tensor:
        """A 1×1 conv or a linear layer, applied to (B, L, C) tokens as a matmul."""
        weight = layer.weight if layer.weight.dim() == 2 else layer.weight.flatten(1)
        return F.linear(tokens, weight, layer.bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = self.pointwise(self.proj_in, tokens)  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, context_mask)
        tokens = self.pointwise(self.proj_out, tokens)  # (B, HW, C)
        return x + tokens.view(b, h, w, c).permute(0, 3, 1, 2)
