"""LoRA: low-rank weight updates for the UNet and the CLIP text encoders, in the files people have.

A LoRA layer holds two small matrices per target layer and (optionally) a scalar α:

    W ← W + s · (α / r) · up · down          up (out, r), down (r, in), r the rank; α missing/0 → α = r

For a k×k conv (kohya's LoCon) `down` is a k×k conv (r, in, k, k) and `up` a 1×1 conv (out, r, 1, 1),
and the update is up·down reshaped to (out, in, k, k) — the same as kohya's
`conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)`.

Files (safetensors only; `.ckpt` / `.pt` LoRAs are refused, nothing is unpickled):

    kohya-ss / A1111 / ComfyUI   lora_unet_<module, . → _>.lora_down.weight / .lora_up.weight / .alpha,
                                 lora_te_ (SD 1.x), lora_te1_ / lora_te2_ (SDXL's two encoders). SD 1.x
                                 files use diffusers' UNet names, SDXL files the original LDM names
                                 (lora_unet_input_blocks_4_1_…); both spellings are accepted for any UNet.
    diffusers / peft             unet.<module>.lora_A.weight / .lora_B.weight, text_encoder(_2).<module>.…;
                                 α from the `lora_adapter_metadata` of the file (lora_alpha, alpha_pattern),
                                 else α = r. Also the older `.lora.down/up`, `.lora_linear_layer.down/up`
                                 and attention-processor (`processor.to_q_lora.down`) spellings.

Names are looked up, not reversed (ComfyUI's design): every Linear / Conv2d of the model registers
the names a LoRA may give it, so `to_q`, `proj_in`, `time_emb_proj` need no underscore guessing. A
LoRA layer that names no module, or whose shape does not fit its module, is an error naming it —
nothing is dropped silently.

Applying (`LoRAStack`, reached as `Pipeline.load_lora / fuse_lora / unfuse_lora / unload_lora`): the
updates of every loaded LoRA, each with its own weights for the UNet and the text encoders, are
merged into the weights (fused: no extra cost per step). The original tensor of each touched weight
is kept (on the CPU), so unfusing restores it bit for bit and re-fusing at another scale starts from
it (never W + Δ − Δ). A1111's prompt tags `<lora:NAME:0.8>` (`<lora:NAME:TE:UNET>`, `te=`/`unet=`)
load a LoRA for one call and restore the weights afterwards (`prompt_lora_tags`).

Training (`inject_lora`, used by `chorus train --part lora`): a `LoRAWeight` parametrization
(torch.nn.utils.parametrize) on each target's weight, so every use of `layer.weight` — including the
UNet's fused q/k/v matmul and the 1×1 projections — sees W + (α/r)·up·down, and only up/down train.
`LoRANetwork.kohya_state_dict` writes the kohya format (LDM names for SDXL-style UNets, as sd-scripts).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from chorus.errors import ChorusError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# key ending → role; longest first where one ends with another
ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down_old"), ("_lora.up.weight", "up_old"),   # diffusers' old attention processors
    (".alpha", "alpha"),
)
PEFT_NAMED = re.compile(r"^(.*)\.lora_([AB])\.[A-Za-z0-9_\-]+\.weight$")   # peft with an adapter name
UNSUPPORTED = tuple((re.compile(p), what) for p, what in (
    (r"\.hada_", "LyCORIS LoHa"), (r"\.lokr_", "LyCORIS LoKr"),
    (r"\.lora_mid\.", "LyCORIS LoCon with a Tucker core (lora_mid)"),
    (r"\.dora_scale$", "DoRA"), (r"\.lora_magnitude_vector", "DoRA"), (r"\.oft_", "OFT"),
    (r"\.(w|b)_norm$", "LyCORIS norm"),
    (r"\.(a|b)[12]\.weight$", "GLoRA"), (r"\.diff(_b)?$", "LyCORIS full (diff)"),
    (r"\.(lora_B|lora_up)\.bias$", "LoRA with a bias (peft lora_bias)"),
))
TEXT_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def underscored(name: str) -> str:
    return name.replace(".", "_")


# --------------------------------------------------------------------------------------------------
# Reading a file
@dataclass
class LoRALayer:
    """One layer of a LoRA file: its update for one module of the model."""

    name: str                        # the module as the file names it, normalised (prefix + path)
    keys: list[str] = field(default_factory=list)   # the file's keys, for messages
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """α / r (α missing or 0: 1, as kohya)."""
        return (self.alpha if self.alpha else self.rank) / self.rank

    def delta(self, shape: Sequence[int], device=None) -> Tensor:
        """(α/r) · up · down as a float32 tensor of the module's weight shape."""
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(tuple(shape))


@dataclass
class LoRAFile:
    path: Path | None
    layers: dict[str, LoRALayer]
    metadata: dict[str, str]
    format: str                      # "kohya" | "diffusers"

    @property
    def label(self) -> str:
        return self.path.name if self.path is not None else "the LoRA"

    def base_model_hint(self) -> str:
        """What the file says (or its names suggest) it was made for, as a phrase, or ''."""
        m = self.metadata
        for key in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
            if m.get(key):
                return f"its metadata names the base model {m[key]!r}"
        if any(n.startswith("lora_te2_") or n.startswith("text_encoder_2.") for n in self.layers):
            return "it has layers for a second text encoder, as SDXL LoRAs do"
        if any(n.startswith("lora_unet_input_blocks") for n in self.layers):
            return "its UNet names are kohya's SDXL (LDM) names"
        return ""


def read_lora(path) -> LoRAFile:
    """A LoRA .safetensors file: its layers (down, up, α) by module name, and its metadata."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ChorusError(f"{path.name} is a pickled ({path.suffix}) LoRA. Chorus never unpickles files (they can run "
                          "code); convert it to .safetensors first (e.g. with kohya's or A1111's tools) or get the "
                          ".safetensors version.")
    if not path.is_file():
        raise ChorusError(f"The LoRA file {path} does not exist.")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ChorusError(f"{path.name} is not a readable safetensors file ({str(e).splitlines()[0]}); Chorus reads "
                          "LoRAs from .safetensors only.") from None
    return parse_lora(tensors, metadata, path)


def parse_lora(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, path=None) -> LoRAFile:
    """Group a LoRA state dict by module (kohya or diffusers/peft names); unknown keys are an error."""
    metadata = dict(metadata or {})
    label = Path(path).name if path is not None else "the LoRA"
    layers: dict[str, LoRALayer] = {}
    unknown, unsupported = [], {}
    for key, t in tensors.items():
        for pattern, what in UNSUPPORTED:
            if pattern.search(key):
                unsupported.setdefault(what, key)
                break
        else:
            base, role = _split_key(key)
            if base is None:
                unknown.append(key)
                continue
            old = role.endswith("_old")
            name = _normalise(base, old)
            layer = layers.setdefault(name, LoRALayer(name))
            layer.keys.append(key)
            if role == "alpha":
                layer.alpha = float(t.float().reshape(-1)[0]) if t.numel() else None
            else:
                setattr(layer, role.split("_")[0], t)
    if unsupported:
        kinds = ", ".join(f"{w} (e.g. {k})" for w, k in unsupported.items())
        raise ChorusError(f"{label} holds layers of kinds Chorus does not apply: {kinds}. Chorus loads plain LoRA "
                          "and LoCon (lora_down/lora_up, lora_A/lora_B) files.")
    if unknown:
        raise ChorusError(f"{label} has {len(unknown)} keys that are not LoRA weights, e.g. {', '.join(unknown[:3])}. "
                          "Chorus reads kohya (lora_unet_….lora_down.weight / .lora_up.weight / .alpha) and "
                          "diffusers/peft (unet.….lora_A.weight / .lora_B.weight) LoRAs.")
    if not layers:
        raise ChorusError(f"{label} holds no LoRA layers.")
    for layer in layers.values():
        if layer.down is None or layer.up is None:
            which = "down (lora_down / lora_A)" if layer.down is None else "up (lora_up / lora_B)"
            raise ChorusError(f"{label}: the layer {layer.name} lacks its {which} matrix "
                              f"(keys: {', '.join(layer.keys)}).")
        if layer.up.ndim == 4 and tuple(layer.up.shape[2:]) != (1, 1):
            raise ChorusError(f"{label}: the layer {layer.name} has an up matrix with a "
                              f"{tuple(layer.up.shape[2:])} kernel; Chorus applies LoCon layers whose up is a 1×1 "
                              "conv (as kohya).")
        if layer.up.flatten(1).shape[1] != layer.down.shape[0]:
            raise ChorusError(f"{label}: the layer {layer.name} has up {tuple(layer.up.shape)} and down "
                              f"{tuple(layer.down.shape)}, whose ranks differ.")
    fmt = "kohya" if all(n.startswith(("lora_unet_", "lora_te")) for n in layers) else "diffusers"
    if fmt == "diffusers":
        _peft_alphas(layers, metadata)
    return LoRAFile(Path(path) if path is not None else None, layers, metadata, fmt)


def _split_key(key: str) -> tuple[str | None, str]:
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    m = PEFT_NAMED.match(key)
    if m:
        return m.group(1), "down" if m.group(2) == "A" else "up"
    return None, ""


def _normalise(base: str, old: bool) -> str:
    """peft's `base_model.model.` prefix off; the old attention-processor names as module names."""
    if base.startswith("base_model.model."):
        base = base[len("base_model.model."):]
    if ".processor." in base:
        base = base.replace(".processor.", ".")
    if old:
        text = base.startswith("text_encoder")
        for short in ("q", "k", "v"):
            if base.endswith(f".to_{short}"):
                return base[:-len(f"to_{short}")] + (f"{short}_proj" if text else f"to_{short}")
        if base.endswith(".to_out"):
            return base[:-len("to_out")] + ("out_proj" if text else "to_out.0")
    return base


def _peft_alphas(layers: dict[str, LoRALayer], metadata: Mapping[str, str]) -> None:
    """α of diffusers/peft layers from `lora_adapter_metadata` (lora_alpha, alpha_pattern); else α = r."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return
    for layer in layers.values():
        if layer.alpha is not None:
            continue
        prefix, _, rel = layer.name.partition(".")
        if f"{prefix}.lora_alpha" not in meta:
            prefix, rel = "unet", layer.name   # a bare UNet state dict
        alpha = meta.get(f"{prefix}.lora_alpha")
        for pattern, value in (meta.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", rel):
                alpha = value
                break
        if alpha is None:
            continue
        if meta.get(f"{prefix}.use_rslora"):
            alpha = float(alpha) * math.sqrt(layer.rank)    # peft's rsLoRA: scale α/√r
        layer.alpha = float(alpha)


# --------------------------------------------------------------------------------------------------
# The model's names
@dataclass(eq=False)
class Target:
    part: str          # "unet" | "text_encoder" | "text_encoder_2"
    name: str          # the module's name inside that part
    module: nn.Module

    @property
    def weight(self) -> Tensor:
        return self.module.weight


def unet_layout(config):
    """The LDM numbering (chorus.formats.keymap) of a UNet config, or None if it has none."""
    from chorus.formats.keymap import UNetLayout
    from chorus.models.unet import UP_TYPES, encoder_spec
    try:
        spec = encoder_spec(config, "UNet")
        return UNetLayout(spec.layers, tuple(UP_TYPES[t] for t in config.up_block_types))
    except (ChorusError, KeyError, TypeError, AttributeError):
        return None


def ldm_module_name(layout, name: str) -> str | None:
    if layout is None:
        return None
    try:
        return layout.ldm_key(name + ".weight")[:-len(".weight")]
    except (KeyError, ValueError, IndexError):
        return None


def _layers(module: nn.Module, convs: bool = True) -> Iterable[tuple[str, nn.Module]]:
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    for name, m in module.named_modules():
        if isinstance(m, kinds) and ".parametrizations." not in name:
            yield name, m


def lora_targets(stage) -> dict[str, Target]:
    """Every name a LoRA file may give each Linear / Conv2d of a stage's UNet and CLIP text encoders."""
    found: dict[str, Target] = {}
    unet = stage.unet
    layout = unet_layout(unet.config)
    for name, m in _layers(unet):
        t = Target("unet", name, m)
        names = [name, f"unet.{name}", f"lora_unet_{underscored(name)}"]
        ldm = ldm_module_name(layout, name)
        if ldm is not None:
            names += [f"lora_unet_{underscored(ldm)}", f"diffusion_model.{ldm}"]
        for n in names:
            found.setdefault(n, t)
    for e in getattr(stage.conditioner, "embedders", ()):
        part, encoder = getattr(e, "name", None), getattr(e, "encoder", None)
        if part not in TEXT_PREFIXES or not isinstance(encoder, nn.Module):
            continue
        for name, m in _layers(encoder, convs=False):
            t = Target(part, name, m)
            for spelling in _clip_spellings(name):
                for n in (f"{part}.{spelling}", *(p + underscored(spelling) for p in TEXT_PREFIXES[part])):
                    found.setdefault(n, t)
    return found


def _clip_spellings(name: str) -> tuple[str, ...]:
    """transformers ≥ 5 names CLIPTextModel's layers without the `text_model.` that LoRA files (and
    CLIPTextModelWithProjection) have: accept both."""
    if name.startswith("text_model."):
        return name, name[len("text_model."):]
    if name == "text_projection":
        return (name,)
    return f"text_model.{name}", name


@dataclass(eq=False)
class Patch:
    target: Target
    layer: LoRALayer

    @property
    def text(self) -> bool:
        return self.target.part != "unet"


def _fits(layer: LoRALayer, shape: tuple[int, ...]) -> bool:
    out, inn = layer.up.shape[0], layer.down.flatten(1).shape[1]
    numel_in = math.prod(shape[1:])
    if out != shape[0] or inn != numel_in:
        return False
    if len(shape) == 4 and layer.down.ndim == 4:
        return tuple(layer.down.shape[1:]) == tuple(shape[1:])
    return layer.down.ndim == 2 or tuple(layer.down.shape[2:]) == (1, 1)


def resolve(lora: LoRAFile, targets: Mapping[str, Target], model: str = "this model") -> list[Patch]:
    """The LoRA's layers matched to modules; an unknown name or a shape that does not fit raises."""
    patches, unmatched, misfit = [], [], []
    for layer in lora.layers.values():
        t = targets.get(layer.name)
        if t is None:
            unmatched.append(layer.name)
            continue
        shape = tuple(t.weight.shape)
        if not _fits(layer, shape):
            misfit.append((layer, t, shape))
            continue
        patches.append(Patch(t, layer))
    hint = lora.base_model_hint()
    hint = f" ({hint})" if hint else ""
    if unmatched:
        raise ChorusError(f"{lora.label}: {len(unmatched)} of its {len(lora.layers)} layers name no module of {model}, "
                          f"e.g. {', '.join(unmatched[:4])}. It was probably made for another kind of model{hint}; "
                          "Chorus applies LoRAs to the UNet and the CLIP text encoders of SD 1.x/2.x/SDXL-style "
                          "pipelines.")
    if misfit:
        layer, t, shape = misfit[0]
        upd = (layer.up.shape[0], *layer.down.shape[1:])
        more = "" if len(misfit) == 1 else f"; {len(misfit) - 1} more layers differ"
        raise ChorusError(f"{lora.label} does not fit {model}: the {t.part} module {t.name} has a weight of shape "
                          f"{shape}, but the LoRA's update is {upd} (lora_up {tuple(layer.up.shape)} · lora_down "
                          f"{tuple(layer.down.shape)}){more}. "
                          f"The LoRA was made for another base model{hint}.")
    return patches


# --------------------------------------------------------------------------------------------------
# Applying: fused into the weights, the originals kept
@dataclass(eq=False)
class LoadedLoRA:
    name: str
    path: Path | None
    patches: list[Patch]
    unet_scale: float = 1.0
    text_scale: float = 1.0
    temporary: bool = False


class LoRAStack:
    """The LoRAs loaded into one stage (a pipeline's base expert), merged into its weights.

    load() applies a LoRA at once; unfuse() puts every original weight back exactly (the LoRAs stay
    loaded, off until the next fuse() or load()) and fuse(s) merges them again, all scaled by s;
    unload() forgets them. Prompt-tag LoRAs (temporarily) apply at their own weights in any state. Every weight is
    computed from its kept original: W = W₀ + Σᵢ sᵢ·Δᵢ, in float32, cast to the weight's dtype."""

    def __init__(self, stage, model: str = "this model"):
        self.stage, self.model = stage, model
        self.loaded: dict[str, LoadedLoRA] = {}
        self.active, self.multiplier = True, 1.0
        self._originals: dict[int, tuple[Tensor, Tensor]] = {}   # id(weight) → (weight, original on the CPU)
        self._targets: dict[str, Target] | None = None
        self._files: OrderedDict[tuple[str, int, int], LoRAFile] = OrderedDict()   # the last FILE_CACHE read

    # -- what is loaded --------------------------------------------------------------------------------
    def targets(self) -> dict[str, Target]:
        if self._targets is None:
            self._targets = lora_targets(self.stage)
        return self._targets

    FILE_CACHE = 8

    def read(self, path) -> LoRAFile:
        """A LoRA file, parsed once per (path, size, mtime) while it is among the last FILE_CACHE read."""
        p = Path(path).resolve()
        if p.suffix.lower() in PICKLE_SUFFIXES or not p.is_file():
            return read_lora(p)   # raises the clear message
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora(p)
            while len(self._files) > self.FILE_CACHE:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def load(self, source, scale: float = 1.0, text_scale: float | None = None, name: str | None = None,
             temporary: bool = False, apply: bool = True) -> str:
        """Load a LoRA (a path or a LoRAFile) with its UNet weight `scale` and text-encoder weight
        `text_scale` (default: `scale`); returns its name (the file's stem unless given)."""
        lora = source if isinstance(source, LoRAFile) else self.read(source)
        patches = resolve(lora, self.targets(), self.model)
        base = name or (lora.path.stem if lora.path is not None else "lora")
        name, k = base, 2
        while name in self.loaded:
            name, k = f"{base}-{k}", k + 1
        self.loaded[name] = LoadedLoRA(name, lora.path, patches, float(scale),
                                       float(scale if text_scale is None else text_scale), temporary)
        if not temporary:
            self.active = True    # loading turns the stack on again after an unfuse()
        if apply:
            self.apply()
        return name

    def set_scale(self, name: str, scale: float, text_scale: float | None = None) -> None:
        entry = self._entry(name)
        entry.unet_scale, entry.text_scale = float(scale), float(scale if text_scale is None else text_scale)
        self.apply()

    def unload(self, name: str | None = None) -> None:
        """Forget one LoRA (or all) and restore the weights it changed."""
        if name is None:
            self.loaded.clear()
        else:
            del self.loaded[self._entry(name).name]
        self.apply()

    def fuse(self, lora_scale: float = 1.0) -> None:
        self.active, self.multiplier = True, float(lora_scale)
        self.apply()

    def unfuse(self) -> None:
        self.active = False
        self.apply()

    def _entry(self, name: str) -> LoadedLoRA:
        if name not in self.loaded:
            raise ChorusError(f"No LoRA named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'}).")
        return self.loaded[name]

    # -- the weights -------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Set every weight a LoRA touches to W₀ + Σ sᵢ·Δᵢ; weights no LoRA touches any more to W₀."""
        wanted: dict[int, tuple[Tensor, list[tuple[float, Patch]]]] = {}
        for entry in self.loaded.values():
            if self.active or entry.temporary:   # prompt-tag LoRAs apply even while the others are unfused
                multiplier = 1.0 if entry.temporary else self.multiplier
                for p in entry.patches:
                    s = (entry.text_scale if p.text else entry.unet_scale) * multiplier
                    if s != 0.0:
                        w = p.target.weight
                        wanted.setdefault(id(w), (w, []))[1].append((s, p))
        for key, (w, original) in list(self._originals.items()):
            if key not in wanted:
                w.copy_(original)
                del self._originals[key]
        for key, (w, items) in wanted.items():
            if key not in self._originals:
                self._originals[key] = (w, w.detach().to("cpu", copy=True))
            new = self._originals[key][1].to(w.device, torch.float32, copy=True)
            for s, p in items:
                new.add_(p.layer.delta(w.shape, w.device), alpha=s)
            w.copy_(new.to(w.dtype))

    @contextlib.contextmanager
    def temporarily(self, loras: Sequence[tuple[Any, float, float]]):
        """Load (path, unet_scale, text_scale) LoRAs for a block, then restore the weights."""
        names = []
        try:
            for path, unet_scale, text_scale in loras:
                names.append(self.load(path, unet_scale, text_scale, temporary=True, apply=False))
            self.apply()
            yield names
        finally:
            for n in names:
                self.loaded.pop(n, None)
            self.apply()


# --------------------------------------------------------------------------------------------------
# A1111's prompt tags: <lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET>, <lora:NAME:te=W:unet=W>
TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*)*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoRATag:
    name: str
    text_scale: float
    unet_scale: float


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ChorusError(f"The prompt tag {tag} has the weight {text!r}, which is not a number "
                          "(write <lora:NAME:0.8>, or <lora:NAME:TE:UNET>).") from None


def parse_lora_tags(prompt: str) -> tuple[str, list[LoRATag]]:
    """The prompt without its <lora:…> tags (spaces tidied), and the tags."""
    tags = []

    def take(m: re.Match) -> str:
        name, fields = m.group(1).strip(), [f.strip() for f in m.group(2).split(":")[1:]]
        positional = [f for f in fields if "=" not in f]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        bad = sorted(set(named) - {"te", "unet"})
        if bad or len(positional) > 2:
            raise ChorusError(f"The prompt tag {m.group(0)} is not understood: write <lora:NAME:W>, "
                              "<lora:NAME:TE:UNET> or <lora:NAME:te=W:unet=W>.")
        te = _number(positional[0], m.group(0)) if positional and positional[0] else 1.0
        te = _number(named["te"], m.group(0)) if "te" in named else te
        unet = _number(positional[1], m.group(0)) if len(positional) > 1 and positional[1] else te
        unet = _number(named["unet"], m.group(0)) if "unet" in named else unet
        tags.append(LoRATag(name, te, unet))
        return " "

    clean = TAG.sub(take, prompt)
    if tags:
        clean = re.sub(r"\s+([,.;])", r"\1", re.sub(r"[ \t]{2,}", " ", clean)).strip()
    return clean, tags


def lora_search_dirs(pipeline) -> list[Path]:
    """Where a tag's NAME is looked for: the pipeline's lora_dirs, then beside the model."""
    dirs = [Path(d) for d in getattr(pipeline, "lora_dirs", None) or []]
    name = getattr(pipeline, "name", "")
    if name:
        model = Path(name)
        if model.is_file():
            dirs += [model.parent / "loras", model.parent / "Lora", model.parent]
        elif model.is_dir():
            dirs += [model / "loras", model.parent / "loras", model.parent]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_lora(name: str, dirs: Sequence[Path]) -> Path:
    """NAME → NAME.safetensors in the first folder (or its subfolders) that has it."""
    candidates = [name] if name.lower().endswith(".safetensors") else [f"{name}.safetensors", name]
    for d in dirs:
        for c in candidates:
            if (d / c).is_file():
                return d / c
        for c in candidates:
            hits = sorted(p for p in d.rglob(Path(c).name) if p.is_file())
            if hits:
                return hits[0]
    for d in dirs:
        for suffix in PICKLE_SUFFIXES:
            if (d / f"{name}{suffix}").is_file():
                read_lora(d / f"{name}{suffix}")   # raises: never unpickled
    where = ", ".join(str(d) for d in dirs) or "no folder (give --lora-dir)"
    have = sorted({p.stem for d in dirs for p in d.rglob("*.safetensors")})[:12]
    raise ChorusError(f"The prompt names the LoRA {name!r}, but there is no {name}.safetensors in {where}"
                      f"{'; LoRAs found: ' + ', '.join(have) if have else ''}.")


def _strip(prompt) -> tuple[Any, list[list[LoRATag]]]:
    if prompt is None:
        return None, []
    many = not isinstance(prompt, str)
    items = list(prompt) if many else [prompt]
    cleaned, tags = [], []
    for p in items:
        c, t = parse_lora_tags(p) if isinstance(p, str) else (p, [])
        cleaned.append(c)
        tags.append(t)
    return (cleaned if many else cleaned[0]), tags


def prompt_lora_tags(fn):
    """Decorates Pipeline.__call__: `<lora:NAME:W>` tags in the prompt load NAME for this call only
    (found by `find_lora` in `lora_search_dirs`); the tags are removed from the text that is encoded.
    Every prompt of one call must carry the same tags (the weights are shared by the batch); tags in
    the negative prompt are removed and ignored, with a note."""

    @functools.wraps(fn)
    def call(self, prompt=None, negative_prompt=None, *args, **kwargs):
        prompt, tags = _strip(prompt)
        negative_prompt, neg_tags = _strip(negative_prompt)
        notes = []
        if any(neg_tags):
            notes.append("LoRA tags in the negative prompt were removed and not applied: "
                         + ", ".join(sorted({t.name for ts in neg_tags for t in ts})))
        if not any(tags):
            out = fn(self, prompt, negative_prompt, *args, **kwargs)
        else:
            if any(t != tags[0] for t in tags):
                raise ChorusError("The prompts of one call carry different <lora:…> tags; the LoRA weights are shared "
                                  "by the whole batch, so give every prompt the same tags (or generate them apart).")
            dirs = lora_search_dirs(self)
            loras = [(find_lora(t.name, dirs), t.unet_scale, t.text_scale) for t in tags[0]]
            with self.loras.temporarily(loras):
                out = fn(self, prompt, negative_prompt, *args, **kwargs)
            notes.append("LoRA from the prompt: " + ", ".join(
                f"{t.name} (text {t.text_scale:g}, UNet {t.unet_scale:g})" for t in tags[0]))
        out.notes[:0] = notes
        return out

    return call


# --------------------------------------------------------------------------------------------------
# Training: a parametrization of each target weight, exported in kohya's format
class LoRAWeight(nn.Module):
    """W ↦ W + (α/r)·up·down, a torch parametrization of one layer's weight. down starts as kohya's
    (Kaiming-uniform), up as zeros, so the UNet starts as exactly the base's function."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float | None = None):
        super().__init__()
        out, inn, kernel = shape[0], shape[1], tuple(shape[2:])
        self.rank, self.alpha = int(rank), float(alpha if alpha else rank)
        self.down = nn.Parameter(torch.empty(self.rank, inn, *kernel))
        self.up = nn.Parameter(torch.zeros(out, self.rank, *([1] * len(kernel))))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        return (self.up.flatten(1) @ self.down.flatten(1)) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta().view(weight.shape).to(weight.dtype)


class LoRANetwork(nn.Module):
    """The LoRA layers injected into a UNet (their parameters are the only trainable ones)."""

    def __init__(self, layers: dict[str, LoRAWeight], names: dict[str, str], layout=None,
                 targets: Sequence[str] = DEFAULT_TARGETS):
        super().__init__()
        self.targets = tuple(targets)
        self.layers = nn.ModuleDict(layers)    # keyed by the module name with . → _
        self.names = dict(names)               # key → the UNet module name
        self.layout = layout                   # LDM numbering for kohya names (SDXL-style UNets), or None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def kohya_name(self, key: str) -> str:
        name = self.names[key]
        ldm = ldm_module_name(self.layout, name) if self.layout is not None else None
        return f"lora_unet_{underscored(ldm or name)}"

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        out = {}
        for key, p in self.layers.items():
            k = self.kohya_name(key)
            cast = (lambda t: t.detach().to("cpu", dtype or t.dtype).contiguous())  # noqa: E731
            out[f"{k}.lora_down.weight"] = cast(p.down)
            out[f"{k}.lora_up.weight"] = cast(p.up)
            out[f"{k}.alpha"] = torch.tensor(p.alpha, dtype=dtype or torch.float32)
        return out

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        own = self.state_dict()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ChorusError(f"The LoRA checkpoint does not fit this run's LoRA layers: {len(missing)} missing "
                              f"(e.g. {', '.join(missing[:2])}), {len(extra)} unexpected "
                              f"(e.g. {', '.join(extra[:2])}); "
                              "resume with the same rank and targets.")
        self.load_state_dict(dict(state))


def inject_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
                targets: Sequence[str] = DEFAULT_TARGETS) -> LoRANetwork:
    """Freeze the UNet and parametrize each weight whose module name ends with one of `targets`
    (default: the attention projections to_q, to_k, to_v, to_out.0) as W + (α/r)·up·down."""
    from torch.nn.utils import parametrize
    if int(rank) < 1:
        raise ChorusError(f"The LoRA rank must be at least 1, got {rank}.")
    unet.requires_grad_(False)
    chosen = [(n, m) for n, m in _layers(unet) if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ChorusError(f"No UNet layer matches the LoRA targets {', '.join(targets)} (names end with e.g. "
                          "attn1.to_q, ff.net.2, proj_in).")
    layers, names = {}, {}
    for name, m in chosen:
        w = m.weight
        lw = LoRAWeight(tuple(w.shape), rank, alpha).to(w.device, torch.float32)
        parametrize.register_parametrization(m, "weight", lw)
        key = underscored(name)
        layers[key], names[key] = lw, name
    config = getattr(unet, "config", None)
    sdxl_style = getattr(config, "addition_embed_type", None) == "text_time"
    return LoRANetwork(layers, names, unet_layout(config) if sdxl_style else None, targets)


@torch.no_grad()
def merged_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """A parametrized UNet's state dict under its plain names, each LoRA merged into its weight."""
    out, suffix = {}, ".parametrizations.weight.original"
    modules = dict(unet.named_modules())
    for k, v in unet.state_dict().items():
        if k.endswith(suffix):
            path = k[:-len(suffix)]
            out[path + ".weight"] = modules[path].weight.detach()
        elif ".parametrizations.weight." not in k:
            out[k] = v
    return out


def save_lora(tensors: Mapping[str, Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """A LoRA .safetensors file (atomically), with kohya-style metadata."""
    from safetensors.torch import save_file

    from chorus.models.io import atomic_write, usual_permissions
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(p):
        save_file(tensors, str(p), metadata=meta)
        usual_permissions(p)

    atomic_write(path, write)
    return path


def kohya_metadata(network: LoRANetwork, base: str | None = None, **extra) -> dict[str, str]:
    first = next(iter(network.layers.values()))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
            "ss_network_alpha": f"{first.alpha:g}",
            "ss_base_model_version": "sdxl_base_v1-0" if network.layout else "sd_v1",
            "chorus_targets": ",".join(network.targets)}
    if base:
        meta["chorus_base"] = str(base)
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


__all__ = ["LoRAFile", "LoRALayer", "LoRAStack", "LoRANetwork", "LoRAWeight", "LoRATag", "Patch", "Target",
           "find_lora", "inject_lora", "kohya_metadata", "lora_search_dirs", "lora_targets", "merged_state_dict",
           "parse_lora", "parse_lora_tags", "prompt_lora_tags", "read_lora", "resolve", "save_lora"]
