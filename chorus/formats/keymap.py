"""diffusers ↔ original (LDM / sgm) state-dict names, as full key → key rules built from a key list.

A single-file checkpoint (A1111 / ComfyUI `.safetensors`) stores the networks under the names of
the original CompVis/Stability code; Chorus (like diffusers) uses diffusers' names. Instead of
chained `str.replace`, every diffusers key is mapped on its own by the rules below, from the
model's structure (levels, resnets per level, which up blocks have attention). A `Rule` names one
original tensor and the diffusers tensor(s) it becomes, with the reshaping in between:

    copy       same tensor
    conv1x1    VAE mid attention: original 1×1 conv (C, C, 1, 1)  ↔  diffusers Linear (C, C)
    transpose  OpenCLIP `text_projection` (width, proj)           ↔  Linear weight (proj, width)
    qkv        OpenCLIP `in_proj_weight/bias` (3C, …)             ↔  q_proj, k_proj, v_proj

UNet (`model.diffusion_model.`) and ControlNet (`control_model.`) numbering, for level i with
L_i resnets (diffusers `layers_per_block`):

    conv_in                         input_blocks.0.0
    down_blocks.i.resnets.j         input_blocks.(1 + Σ_{k<i}(L_k + 1) + j).0    (.1 = its attention)
    down_blocks.i.downsamplers.0    input_blocks.(1 + Σ_{k<i}(L_k + 1) + L_i).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1    middle_block.0 / .1 / .2
    up_blocks.i.resnets.j           output_blocks.(Σ_{k<i} U_k + j).0           (U_k = L_{n-1-k} + 1)
    up_blocks.i.upsamplers.0        output_blocks.(Σ_{k≤i} U_k − 1).(2 if attention else 1)
    resnet: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
         =  in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection
    ControlNet: controlnet_down_blocks.k = zero_convs.k.0, controlnet_mid_block = middle_block_out.0,
         controlnet_cond_embedding conv_in / blocks.j / conv_out = input_hint_block.0 / .(2j+2) / .(2B+2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from chorus.errors import ChorusError


@dataclass(frozen=True)
class Rule:
    ldm: str                      # the original name (with its prefix)
    diffusers: tuple[str, ...]    # the diffusers name(s)
    kind: str = "copy"            # copy | conv1x1 | transpose | qkv


# --------------------------------------------------------------------------------------------------
# UNet and ControlNet
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "controlnet_cond_embedding.conv_in": "input_hint_block.0", "controlnet_mid_block": "middle_block_out.0"}


def _resnet(parts: list[str]) -> str:
    if parts[0] not in RESNET:
        raise KeyError(parts[0])
    return ".".join([RESNET[parts[0]], *parts[1:]])


@dataclass(frozen=True)
class UNetLayout:
    """What the numbering needs: resnets per down level, and whether each up block has attention."""

    layers: tuple[int, ...]
    up_attention: tuple[bool, ...]
    hint_blocks: int = 0        # ControlNet: convs in controlnet_cond_embedding.blocks

    @property
    def up_layers(self) -> tuple[int, ...]:
        n = len(self.layers)
        return tuple(self.layers[n - 1 - k] + 1 for k in range(n))

    def ldm_key(self, key: str) -> str:
        """The original name (without prefix) of one diffusers UNet/ControlNet key; KeyError if none."""
        for d, o in UNET_FIXED.items():
            if key.startswith(d + "."):
                return o + key[len(d):]
        p = key.split(".")
        if p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            start = 1 + sum(self.layers[k] + 1 for k in range(i))
            if kind == "resnets":
                return f"input_blocks.{start + int(p[3])}.0.{_resnet(p[4:])}"
            if kind == "attentions":
                return ".".join([f"input_blocks.{start + int(p[3])}.1", *p[4:]])
            if kind == "downsamplers" and p[3:5] == ["0", "conv"]:
                return ".".join([f"input_blocks.{start + self.layers[i]}.0.op", *p[5:]])
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                return f"middle_block.{2 * int(p[2])}.{_resnet(p[3:])}"
            if p[1] == "attentions" and p[2] == "0":
                return ".".join(["middle_block.1", *p[3:]])
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            up = self.up_layers
            start = sum(up[:i])
            if kind == "resnets":
                return f"output_blocks.{start + int(p[3])}.0.{_resnet(p[4:])}"
            if kind == "attentions":
                return ".".join([f"output_blocks.{start + int(p[3])}.1", *p[4:]])
            if kind == "upsamplers" and p[3:5] == ["0", "conv"]:
                slot = 2 if self.up_attention[i] else 1
                return ".".join([f"output_blocks.{start + up[i] - 1}.{slot}.conv", *p[5:]])
        elif p[0] == "controlnet_down_blocks":
            return ".".join([f"zero_convs.{p[1]}.0", *p[2:]])
        elif p[:2] == ["controlnet_cond_embedding", "blocks"]:
            return ".".join([f"input_hint_block.{2 * int(p[2]) + 2}", *p[3:]])
        elif p[:2] == ["controlnet_cond_embedding", "conv_out"]:
            return ".".join([f"input_hint_block.{2 * self.hint_blocks + 2}", *p[2:]])
        raise KeyError(key)


def unet_rules(keys: Iterable[str], layout: UNetLayout, prefix: str) -> list[Rule]:
    rules = []
    for key in keys:
        try:
            rules.append(Rule(prefix + layout.ldm_key(key), (key,)))
        except (KeyError, ValueError, IndexError):
            raise ChorusError(f"Chorus has no original-layout name for the UNet/ControlNet tensor {key}.") from None
    return rules


def diffusers_controlnet_layout(keys: Iterable[str]) -> UNetLayout:
    """The layout of a diffusers-named ControlNet, counted from its keys (it has no up blocks)."""
    keys = list(keys)
    levels = sorted({int(k.split(".")[1]) for k in keys if k.startswith("down_blocks.")})
    layers = tuple(len({int(k.split(".")[3]) for k in keys if k.startswith(f"down_blocks.{i}.resnets.")})
                   for i in levels)
    hints = {int(k.split(".")[2]) for k in keys if k.startswith("controlnet_cond_embedding.blocks.")}
    return UNetLayout(layers, (False,) * len(layers), len(hints))


# --------------------------------------------------------------------------------------------------
# VAE (`first_stage_model.`)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_key(key: str, levels: int) -> tuple[str, str]:
    """(original name without prefix, rule kind) of one diffusers AutoencoderKL key."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key, "copy"
    side = p[0]  # encoder | decoder
    if p[1] in ("conv_in", "conv_out"):
        return key, "copy"
    if p[1] == "conv_norm_out":
        return ".".join([side, "norm_out", *p[2:]]), "copy"
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return ".".join([side, f"mid.block_{int(p[3]) + 1}", *_vae_resnet(p[4:])]), "copy"
        if p[2] == "attentions" and p[3] == "0":
            rest = ".".join(p[4:])
            for d, o in VAE_ATTENTION.items():
                if rest.startswith(d + "."):
                    return f"{side}.mid.attn_1.{o}{rest[len(d):]}", "conv1x1" if rest.endswith("weight") and d != "group_norm" else "copy"
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2])
        level = i if side == "encoder" else levels - 1 - i
        name = "down" if side == "encoder" else "up"
        if p[3] == "resnets":
            return ".".join([side, f"{name}.{level}.block.{p[4]}", *_vae_resnet(p[5:])]), "copy"
        if p[3] in ("downsamplers", "upsamplers") and p[4:6] == ["0", "conv"]:
            return ".".join([side, f"{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv",
                             *p[6:]]), "copy"
    raise KeyError(key)


def _vae_resnet(parts: list[str]) -> list[str]:
    if parts[0] not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
        raise KeyError(parts[0])
    return ["nin_shortcut" if parts[0] == "conv_shortcut" else parts[0], *parts[1:]]


def vae_rules(keys: Iterable[str], levels: int, prefix: str) -> list[Rule]:
    rules = []
    for key in keys:
        try:
            name, kind = vae_ldm_key(key, levels)
        except (KeyError, ValueError, IndexError):
            raise ChorusError(f"Chorus has no original-layout name for the VAE tensor {key}.") from None
        rules.append(Rule(prefix + name, (key,), kind))
    return rules


# --------------------------------------------------------------------------------------------------
# Text encoders. Keys are taken in the `text_model.`-prefixed form of transformers' CLIP models.
def clip_rules(keys: Iterable[str], prefix: str) -> list[Rule]:
    """HF CLIP (SD 1.x, SDXL's first encoder): the original file holds transformers' own names."""
    return [Rule(prefix + k, (k,)) for k in keys]


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


def openclip_rules(keys: Iterable[str], prefix: str) -> list[Rule]:
    """OpenCLIP (SD 2.x ViT-H, SDXL bigG): fused q/k/v `in_proj`, a bare `text_projection` matrix."""
    rules, qkv = [], {}
    for key in keys:
        if key in OPENCLIP_FIXED:
            rules.append(Rule(prefix + OPENCLIP_FIXED[key], (key,)))
            continue
        if key == "text_projection.weight":
            rules.append(Rule(prefix + "text_projection", (key,), "transpose"))
            continue
        p = key.split(".")
        if p[:3] != ["text_model", "encoder", "layers"]:
            raise ChorusError(f"Chorus has no OpenCLIP name for the text encoder tensor {key}.")
        layer, rest = p[3], ".".join(p[4:])
        base = f"{prefix}transformer.resblocks.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            what = rest.split(".")[-1]  # weight | bias
            qkv.setdefault((layer, what), {})[rest.split(".")[1][0]] = key
            continue
        for d, o in OPENCLIP_LAYER.items():
            if rest.startswith(d + "."):
                rules.append(Rule(base + o + rest[len(d):], (key,)))
                break
        else:
            raise ChorusError(f"Chorus has no OpenCLIP name for the text encoder tensor {key}.")
    for (layer, what), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ChorusError(f"Text encoder layer {layer} lacks one of q_proj/k_proj/v_proj ({what}).")
        rules.append(Rule(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{what}",
                          (parts["q"], parts["k"], parts["v"]), "qkv"))
    return rules


# --------------------------------------------------------------------------------------------------
# Applying rules
def to_diffusers(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], what: str) -> dict[str, torch.Tensor]:
    """Original tensors → diffusers names; every rule's tensor must be there."""
    missing = [r.ldm for r in rules if r.ldm not in state]
    if missing:
        raise ChorusError(f"The {what} is incomplete: {len(missing)} tensors are missing, e.g. "
                          f"{', '.join(missing[:3])}.")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        t = state[r.ldm]
        if r.kind == "copy":
            out[r.diffusers[0]] = t
        elif r.kind == "conv1x1":
            out[r.diffusers[0]] = t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t
        elif r.kind == "transpose":
            out[r.diffusers[0]] = t.t().contiguous()
        elif r.kind == "qkv":
            if t.shape[0] % 3:
                raise ChorusError(f"{r.ldm} has {t.shape[0]} rows, not a multiple of 3 (fused q, k, v).")
            for name, part in zip(r.diffusers, t.chunk(3, dim=0)):
                out[name] = part.contiguous()
        else:  # pragma: no cover - rules are built here
            raise ValueError(r.kind)
    return out


def to_ldm(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], what: str) -> dict[str, torch.Tensor]:
    """diffusers tensors → original names; every diffusers key must be covered by exactly one rule."""
    covered = [k for r in rules for k in r.diffusers]
    left = sorted(set(state) - set(covered))
    missing = sorted(set(covered) - set(state))
    if left or missing:
        raise ChorusError(f"The {what} does not fit its layout: {len(left)} tensors without an original name "
                          f"({', '.join(left[:3])}) and {len(missing)} missing ({', '.join(missing[:3])}).")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        ts = [state[k] for k in r.diffusers]
        if r.kind == "copy":
            out[r.ldm] = ts[0]
        elif r.kind == "conv1x1":
            out[r.ldm] = ts[0][:, :, None, None] if ts[0].ndim == 2 else ts[0]
        elif r.kind == "transpose":
            out[r.ldm] = ts[0].t().contiguous()
        elif r.kind == "qkv":
            out[r.ldm] = torch.cat(ts, dim=0)
        else:  # pragma: no cover
            raise ValueError(r.kind)
    return out
