"""Single-file checkpoints: the `.safetensors` (or `.ckpt`) files A1111 / ComfyUI users download.

A single file holds a whole pipeline (SD 1.x, SD 2.x, SDXL base or refiner) — or one ControlNet —
under the original CompVis / Stability names (see `keymap.py`):

    model.diffusion_model.*                 UNet
    first_stage_model.*                     VAE
    cond_stage_model.transformer.*          CLIP ViT-L/14 (SD 1.x; transformers' own names)
    cond_stage_model.model.*                OpenCLIP ViT-H (SD 2.x; fused in_proj)
    conditioner.embedders.0.transformer.*   CLIP ViT-L (SDXL base)
    conditioner.embedders.1.model.*         OpenCLIP bigG (SDXL base)
    conditioner.embedders.0.model.*         OpenCLIP bigG (SDXL refiner)
    control_model.*                         ControlNet (or no prefix; or diffusers' names)

It has no configs and no tokenizer. Chorus rebuilds every config from the tensor shapes (levels,
channels, resnets per level, attention levels, transformer depth, context width, the SDXL added
embedding, text-encoder width/depth/vocabulary); what shapes cannot tell (attention heads, group-norm
groups, sample size, VAE scaling factor, activation, prediction type) comes from the family's
defaults — or, in a file Chorus wrote, from the configs it recorded in the safetensors metadata
(`chorus.configs`), so tiny models round-trip exactly. Nothing is ever unpickled: `.ckpt`/`.pt`
files are read with `torch.load(weights_only=True)` or refused.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from chorus.errors import ChorusError
from chorus.formats import keymap as K
from chorus.models.io import PICKLE_SUFFIXES

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CONTROL = "control_model."
CLIP_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_XL = "conditioner.embedders.0.transformer."
OPENCLIP_XL = "conditioner.embedders.1.model."
OPENCLIP_REFINER = "conditioner.embedders.0.model."

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner",
                "controlnet": "ControlNet"}
# (diffusers component, text-encoder layout, prefix in the file) per family
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "clip", CLIP_SD1)],
    "sd2": [("text_encoder", "openclip_sd2", OPENCLIP_SD2)],
    "sdxl": [("text_encoder", "clip", CLIP_XL), ("text_encoder_2", "openclip", OPENCLIP_XL)],
    "sdxl_refiner": [("text_encoder_2", "openclip", OPENCLIP_REFINER)],
}
TEXT_ENCODER_CLASS = {"clip": "CLIPTextModel", "openclip_sd2": "CLIPTextModel",
                      "openclip": "CLIPTextModelWithProjection"}
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                  "sd2_v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                  "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
IMAGE_SIZE = {"sd1": 512, "sd2": 512, "sd2_v": 768, "sdxl": 1024, "sdxl_refiner": 1024}
SDXL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}   # size+crop+target (base) or size+crop+aesthetic (refiner)
DEFAULT_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                     "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                     "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                     "clip_sample": False, "interpolation_type": "linear", "use_karras_sigmas": False}
# LDM training buffers and other tensors full checkpoints carry that no diffusers component uses
IGNORED_TOP_LEVEL = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "v_pred", "ztsnr")
PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                      "v-prediction": "v_prediction"}
HF_CONFIG_BOOKKEEPING = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                         "model_type", "_commit_hash", "_attn_implementation_autoset")


def _prediction(value: str | None) -> str | None:
    if value is None:
        return None
    if str(value).lower() not in PREDICTION_ALIASES:
        raise ChorusError(f"prediction_type must be 'epsilon' or 'v_prediction', not {value!r}.")
    return PREDICTION_ALIASES[str(value).lower()]


# --------------------------------------------------------------------------------------------------
# Reading
@dataclass
class Checkpoint:
    """A single file's tensors, its safetensors metadata and (pickles only) its global_step."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None
    path: Path | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}


def read_header(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and metadata of a `.safetensors` file, without reading the tensors."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own types for bad headers
        raise ChorusError(f"{path} is not a readable safetensors file ({e}).") from None


def read_checkpoint(path) -> Checkpoint:
    """Tensors of a single file: safetensors, or a pickle read with weights_only=True (else refused)."""
    path = Path(path)
    if not path.is_file():
        raise ChorusError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        _, metadata = read_header(path)
        try:
            state = load_file(str(path))
        except Exception as e:
            raise ChorusError(f"{path} is not a readable safetensors file ({e}).") from None
        return Checkpoint(state, metadata, None, path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ChorusError(f"{path}: unknown checkpoint format '{path.suffix}' (use .safetensors, or a .ckpt).")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ChorusError(
            f"Refusing to load {path}: it is a pickle file and holds more than plain tensors "
            f"({type(e).__name__}). Chorus never unpickles arbitrary objects (a pickle can run code); convert "
            "it to .safetensors with a tool you trust.") from None
    global_step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ChorusError(f"{path} does not hold a dict of tensors.")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ChorusError(f"{path} holds no tensors.")
    return Checkpoint(state, {}, global_step if isinstance(global_step, int) else None, path)


def is_single_file(path) -> bool:
    """A path that names a single-file checkpoint (by its suffix; a folder never is one)."""
    return Path(path).suffix in SINGLE_FILE_SUFFIXES and not Path(path).is_dir()


# --------------------------------------------------------------------------------------------------
# Detection
@dataclass
class Detection:
    """What a single file holds: its family, the prediction type, and how it was told."""

    family: str                      # sd1 | sd2 | sdxl | sdxl_refiner | controlnet
    prediction_type: str = "epsilon"
    prediction_source: str = "default"
    base: str | None = None          # a ControlNet's base family (sd1 | sd2 | sdxl)
    control_prefix: str = CONTROL    # where a ControlNet's tensors are ("" = no prefix)
    control_layout: str = "ldm"      # ldm | diffusers
    inpainting: bool = False         # UNet with 9 (or 8, instruct-pix2pix) input channels

    @property
    def name(self) -> str:
        if self.family == "controlnet":
            return f"ControlNet ({FAMILY_NAMES.get(self.base or '', 'unknown base')})"
        name = FAMILY_NAMES[self.family]
        return f"{name} ({'v' if self.prediction_type == 'v_prediction' else 'ε'}-prediction)" \
            if self.family == "sd2" else name

    def __str__(self) -> str:
        return self.family


def _shape_map(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def _has(shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _first(shapes, prefix: str, suffix: str):
    for k in sorted(shapes):
        if k.startswith(prefix) and k.endswith(suffix):
            return shapes[k]
    return None


def _clip_width(shapes, prefix: str) -> int | None:
    for name in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"):
        if prefix + name in shapes:
            return shapes[prefix + name][1]
    return None


def _openclip_width(shapes, prefix: str) -> int | None:
    s = shapes.get(prefix + "token_embedding.weight")
    return s[1] if s else None


def _family_checks(shapes) -> dict[str, list[tuple[str, bool]]]:
    """For each family, the facts a file of that family shows, each with whether this file shows it."""
    unet, vae = _has(shapes, UNET), _has(shapes, VAE)
    context = _first(shapes, UNET, "attn2.to_k.weight")
    context = context[1] if context else None
    proj_in = _first(shapes, UNET, "proj_in.weight")
    label = UNET + "label_emb.0.0.weight" in shapes
    w_sd1, w_sd2 = _clip_width(shapes, CLIP_SD1), _openclip_width(shapes, OPENCLIP_SD2)
    w_l, w_g, w_ref = _clip_width(shapes, CLIP_XL), _openclip_width(shapes, OPENCLIP_XL), \
        _openclip_width(shapes, OPENCLIP_REFINER)

    def width(expected, what):
        if context is None or expected is None:
            return (f"a UNet context width equal to the {what} width (found: UNet "
                    f"{context if context is not None else 'none'}, text encoder "
                    f"{expected if expected is not None else 'none'})", False)
        return (f"the UNet's context width {context} equal to the {what} width {expected}", context == expected)

    common = [(f"the UNet under `{UNET}`", unet), (f"the VAE under `{VAE}`", vae)]
    proj_conv = (f"1×1-conv `proj_in` layers (found {'none' if proj_in is None else f'{len(proj_in)}-D'}; "
                 "SD 2.x and SDXL use Linear)", proj_in is not None and len(proj_in) == 4)
    proj_lin = (f"Linear (2-D) `proj_in` layers (found {'none' if proj_in is None else f'{len(proj_in)}-D'})",
                proj_in is not None and len(proj_in) == 2)
    no_label = ("no `label_emb` (SDXL's size/crop embedding)", unet and not label)
    has_label = (f"the added size/crop embedding `{UNET}label_emb.0.0.weight`", label)
    return {
        "sd1": common + [(f"the CLIP ViT-L text encoder under `{CLIP_SD1}`", w_sd1 is not None), no_label, proj_conv,
                         width(w_sd1, "CLIP")],
        "sd2": common + [(f"the OpenCLIP text encoder under `{OPENCLIP_SD2}`", w_sd2 is not None), no_label, proj_lin,
                         width(w_sd2, "OpenCLIP")],
        "sdxl": common + [(f"the CLIP ViT-L text encoder under `{CLIP_XL}`", w_l is not None),
                          (f"the OpenCLIP bigG text encoder under `{OPENCLIP_XL}`", w_g is not None), has_label,
                          width(None if w_l is None or w_g is None else w_l + w_g, "CLIP-L + bigG")],
        "sdxl_refiner": common + [(f"the OpenCLIP bigG text encoder under `{OPENCLIP_REFINER}`", w_ref is not None),
                                  (f"no second text encoder under `{OPENCLIP_XL}`", w_ref is not None and not _has(shapes, OPENCLIP_XL)),
                                  has_label, width(w_ref, "bigG")],
        "controlnet": [("ControlNet tensors (`control_model.input_hint_block.*`, `zero_convs.*`, or diffusers' "
                        "`controlnet_cond_embedding.*`)", _control_prefix(shapes) is not None)],
    }


def _control_prefix(shapes) -> tuple[str, str] | None:
    """(prefix, layout) of the ControlNet in a file, or None."""
    if CONTROL + "input_hint_block.0.weight" in shapes:
        return CONTROL, "ldm"
    if "input_hint_block.0.weight" in shapes and "time_embed.0.weight" in shapes:
        return "", "ldm"
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        return "", "diffusers"
    return None


def detect(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None, prediction_type: str | None = None,
           global_step: int | None = None, path=None) -> Detection:
    """The family of a single file from its tensor names and shapes (tensors or shape tuples).

    SD 2.x ε and v checkpoints have identical weights: `prediction_type` decides; else the file's
    ModelSpec metadata (`modelspec.prediction_type` / `.architecture`); else diffusers' rule (a
    pickle's `global_step == 875000` is SD 2.0-base, ε; any other SD 2.x is v). A file of no family
    raises ChorusError naming the closest family and what differs."""
    shapes = _shape_map(state)
    metadata = dict(metadata or {})
    checks = _family_checks(shapes)
    control = _control_prefix(shapes)
    prediction = _prediction(prediction_type)
    if control is not None:
        prefix, layout = control
        return Detection("controlnet", prediction or "epsilon", "argument" if prediction else "default",
                         base=_control_base(shapes, prefix, layout), control_prefix=prefix, control_layout=layout)
    matched = [f for f in ("sd1", "sd2", "sdxl", "sdxl_refiner") if all(ok for _, ok in checks[f])]
    if not matched:
        raise ChorusError(_no_family_message(shapes, checks, path))
    family = matched[0]
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    det = Detection(family, inpainting=bool(conv_in and conv_in[1] in (8, 9)))
    det.prediction_type, det.prediction_source = _prediction_rule(family, shapes, metadata, prediction, global_step)
    return det


def _prediction_rule(family, shapes, metadata, prediction, global_step) -> tuple[str, str]:
    if prediction:
        return prediction, "argument"
    spec = metadata.get("modelspec.prediction_type")
    if spec and spec.lower() in PREDICTION_ALIASES:
        return PREDICTION_ALIASES[spec.lower()], "modelspec.prediction_type"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2"):
        return ("v_prediction" if arch.endswith("-v") else "epsilon"), "modelspec.architecture"
    if "v_pred" in shapes:  # ComfyUI's marker for v-prediction SDXL files
        return "v_prediction", "v_pred key"
    if family == "sd2":
        if global_step == 875000:
            return "epsilon", "global_step 875000 (SD 2.0-base)"
        return "v_prediction", "SD 2.x default (diffusers' rule: 768-v unless global_step is 875000)"
    return "epsilon", "default"


def _control_base(shapes, prefix, layout) -> str:
    if layout == "diffusers":
        label = "add_embedding.linear_1.weight" in shapes
        proj = _first(shapes, prefix + "down_blocks.", "proj_in.weight")
    else:
        label = prefix + "label_emb.0.0.weight" in shapes
        proj = _first(shapes, prefix + "input_blocks.", "proj_in.weight")
    if label:
        return "sdxl"
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


def _no_family_message(shapes, checks, path) -> str:
    from chorus.models.io import guess_architecture
    order = ["sd1", "sd2", "sdxl", "sdxl_refiner", "controlnet"]
    score = {f: sum(ok for _, ok in checks[f]) / len(checks[f]) for f in order}
    best = max(order, key=lambda f: (score[f], -order.index(f)))
    missing = [what for what, ok in checks[best] if not ok]
    where = str(path) if path else "The checkpoint"
    msg = (f"{where} is not a single-file checkpoint Chorus can load (SD 1.x, SD 2.x, SDXL base or refiner, or a "
           f"ControlNet). The closest family is {FAMILY_NAMES[best]}, but the file lacks: " + "; ".join(missing) + ".")
    prefixes = sorted({k.split(".")[0] for k in shapes})
    msg += f" Its top-level key prefixes are: {', '.join(prefixes[:8])}{' …' if len(prefixes) > 8 else ''}."
    arch = guess_architecture(shapes)
    if arch not in ("no architecture Chorus recognises",) and "original-format" not in arch:
        msg += (f" The names look like {arch} in diffusers' layout: load a diffusers folder with from_pretrained "
                "instead.")
    return msg


def detect_file(path, prediction_type: str | None = None) -> Detection:
    """detect() from a file's header (safetensors) or its tensors (a pickle, read safely)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        shapes, metadata = read_header(path)
        return detect(shapes, metadata, prediction_type, path=path)
    ckpt = read_checkpoint(path)
    return detect(ckpt.shapes, ckpt.metadata, prediction_type, ckpt.global_step, path=path)


# --------------------------------------------------------------------------------------------------
# Configs from shapes
def _indices(shapes, prefix: str) -> list[int]:
    out = set()
    for k in shapes:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".")[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _depth(shapes, prefix: str) -> int:
    return len(_indices(shapes, prefix + "transformer_blocks."))


def _compact(values: list):
    """An int when every entry is the same int, else a list (diffusers' per-level fields)."""
    return values[0] if all(v == values[0] for v in values) and not isinstance(values[0], list) else values


def _encoder_structure(sd, what: str) -> dict:
    """The down levels of a UNet/ControlNet in original names: channels, resnets, attention, depth."""
    blocks = _indices(sd, "input_blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise ChorusError(f"The {what} has no consecutive input_blocks.* (found {blocks[:5]}).")
    levels: list[list[tuple[int, bool, int]]] = [[]]
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
            continue
        key = f"input_blocks.{i}.0.out_layers.3.weight"
        if key not in sd:
            raise ChorusError(f"The {what} block input_blocks.{i} is neither a resnet nor a downsampler.")
        attn = f"input_blocks.{i}.1.proj_in.weight" in sd
        levels[-1].append((sd[key][0], attn, _depth(sd, f"input_blocks.{i}.1.") if attn else 0))
    if any(not lvl for lvl in levels):
        raise ChorusError(f"The {what} has a level without resnets.")
    for n, lvl in enumerate(levels):
        if len({c for c, _, _ in lvl}) > 1 or len({a for _, a, _ in lvl}) > 1:
            raise ChorusError(f"The {what}'s level {n} mixes channel counts or attention, which diffusers' "
                              "UNet blocks cannot express.")
    if "middle_block.1.proj_in.weight" not in sd or "middle_block.2.out_layers.3.weight" not in sd:
        raise ChorusError(f"The {what} has no resnet-transformer-resnet middle block.")
    first_attn = _first(sd, "input_blocks.", "attn2.to_k.weight") or _first(sd, "middle_block.", "attn2.to_k.weight")
    contexts = {sd[k][1] for k in sd if k.endswith("attn2.to_k.weight")}
    if len(contexts) > 1:
        raise ChorusError(f"The {what} has several context widths {sorted(contexts)}; Chorus supports one.")
    proj = sd["middle_block.1.proj_in.weight"]
    conv_in = sd["input_blocks.0.0.weight"]
    c0 = conv_in[0]
    mid_depth = _depth(sd, "middle_block.1.")
    attention = [lvl[0][1] for lvl in levels]
    per_level = [[d for _, _, d in lvl] for lvl in levels]
    flat = {d for i, ds in enumerate(per_level) if attention[i] for d in ds} | {mid_depth}
    depth = []
    for i, ds in enumerate(per_level):
        if attention[i]:
            depth.append(ds[0] if len(set(ds)) == 1 else ds)
        elif len(flat) == 1:  # levels without attention carry a placeholder: one depth everywhere (SD 1.x/2.x)
            depth.append(mid_depth)
        else:                 # … or 1, with the mid block reading the last level's entry (SDXL: [1, 2, 10])
            depth.append(mid_depth if i == len(levels) - 1 else 1)
    last = depth[-1] if isinstance(depth[-1], int) else depth[-1][0]
    if last != mid_depth:
        raise ChorusError(f"The {what}'s middle block has {mid_depth} transformer layers but its last level "
                          f"{last}; diffusers' UNet uses one number for both.")
    cfg = {
        "in_channels": conv_in[1], "conv_in_kernel": conv_in[2] if len(conv_in) == 4 else 3,
        "block_out_channels": [lvl[0][0] for lvl in levels],
        "layers_per_block": _compact([len(lvl) for lvl in levels]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "transformer_layers_per_block": _compact(depth),
        "cross_attention_dim": first_attn[1] if first_attn else None,
        "use_linear_projection": len(proj) == 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    temb = sd["time_embed.0.weight"][0]
    cfg["time_embedding_dim"] = None if temb == 4 * c0 else temb
    if "label_emb.0.0.weight" in sd:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = sd["label_emb.0.0.weight"][1]
    else:
        cfg["addition_embed_type"] = None
        cfg["projection_class_embeddings_input_dim"] = None
    return cfg


def _strip(shapes, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def unet_config_from_ldm(sd: Mapping[str, tuple], what: str = "UNet") -> dict:
    """UNet2DConditionModel config fields that the original-layout shapes (prefix stripped) determine."""
    cfg = _encoder_structure(sd, what)
    n = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    layers = [layers] * n if isinstance(layers, int) else layers
    up_layers = [layers[n - 1 - k] + 1 for k in range(n)]
    expected = sum(up_layers)
    found = _indices(sd, "output_blocks.")
    if found != list(range(expected)):
        raise ChorusError(f"The {what} has output_blocks {found[:3]}…{found[-1:] if found else ''}; its down "
                          f"levels imply {expected} (0…{expected - 1}).")
    up_types, reverse, idx = [], [], 0
    depth = cfg["transformer_layers_per_block"]
    depth = [depth] * n if isinstance(depth, int) else depth
    mirrored = True
    for i in range(n):
        attn = [f"output_blocks.{idx + j}.1.proj_in.weight" in sd for j in range(up_layers[i])]
        if len(set(attn)) > 1:
            raise ChorusError(f"The {what}'s up block {i} mixes layers with and without attention.")
        ds = [_depth(sd, f"output_blocks.{idx + j}.1.") for j in range(up_layers[i])] if attn[0] else [1]
        level_depth = depth[n - 1 - i]
        if attn[0] and ds != [level_depth if isinstance(level_depth, int) else level_depth[0]] * up_layers[i]:
            mirrored = False
        up_types.append("CrossAttnUpBlock2D" if attn[0] else "UpBlock2D")
        reverse.append(ds[0] if len(set(ds)) == 1 else ds)
        idx += up_layers[i]
    if [t.startswith("CrossAttn") for t in up_types] != [t.startswith("CrossAttn") for t in
                                                         reversed(cfg["down_block_types"])]:
        raise ChorusError(f"The {what}'s up blocks do not mirror its down blocks' attention.")
    cfg["up_block_types"] = up_types
    cfg["reverse_transformer_layers_per_block"] = None if mirrored else reverse
    cfg["out_channels"] = sd["out.2.weight"][0]
    cfg["conv_out_kernel"] = sd["out.2.weight"][2] if len(sd["out.2.weight"]) == 4 else 3
    return cfg


def controlnet_config_from_ldm(sd: Mapping[str, tuple]) -> dict:
    """ControlNetModel config fields from an original-layout ControlNet (prefix stripped)."""
    cfg = _encoder_structure(sd, "ControlNet")
    hints = _indices(sd, "input_hint_block.")
    convs = [i for i in hints if f"input_hint_block.{i}.weight" in sd]
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) < 2 or len(convs) % 2:
        raise ChorusError(f"The ControlNet's input_hint_block has convs at {convs}; expected 0, 2, …, 2B+2 "
                          "(conv_in, pairs of convs, conv_out).")
    blocks = convs[1:-1]
    channels = [sd["input_hint_block.0.weight"][0]] + [sd[f"input_hint_block.{i}.weight"][0] for i in blocks[1::2]]
    cfg["conditioning_channels"] = sd["input_hint_block.0.weight"][1]
    cfg["conditioning_embedding_out_channels"] = channels
    n_skips = len(_indices(sd, "zero_convs."))
    if n_skips != len(_indices(sd, "input_blocks.")):
        raise ChorusError(f"The ControlNet has {n_skips} zero_convs for {len(_indices(sd, 'input_blocks.'))} "
                          "input blocks.")
    return cfg


def controlnet_hint_blocks(sd) -> int:
    convs = [i for i in _indices(sd, "input_hint_block.") if f"input_hint_block.{i}.weight" in sd]
    return len(convs) - 2


def vae_config_from_ldm(sd: Mapping[str, tuple]) -> dict:
    """AutoencoderKL config fields from an original-layout VAE (prefix stripped)."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in sd:
            raise ChorusError(f"The VAE lacks {VAE}{key}.")
    levels = _indices(sd, "encoder.down.")
    layers = len(_indices(sd, "encoder.down.0.block."))
    channels = [sd[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in levels]
    for i in levels:
        if len(_indices(sd, f"decoder.up.{i}.block.")) != layers + 1:
            raise ChorusError(f"The VAE decoder level {i} does not have {layers + 1} resnets (encoder levels "
                              f"have {layers}).")
    n = len(levels)
    return {"in_channels": sd["encoder.conv_in.weight"][1], "out_channels": sd["decoder.conv_out.weight"][0],
            "latent_channels": sd["decoder.conv_in.weight"][1], "block_out_channels": channels,
            "layers_per_block": layers, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd}


def clip_config_from_keys(sd: Mapping[str, tuple], what: str) -> dict:
    """CLIPTextConfig fields from a text encoder in transformers' (`text_model.`-prefixed) names."""
    tok = sd.get("text_model.embeddings.token_embedding.weight")
    pos = sd.get("text_model.embeddings.position_embedding.weight")
    if tok is None or pos is None:
        raise ChorusError(f"The {what} lacks its token or position embedding.")
    layers = _indices(sd, "text_model.encoder.layers.")
    if not layers:
        raise ChorusError(f"The {what} has no transformer layers.")
    cfg = {"vocab_size": tok[0], "hidden_size": tok[1], "max_position_embeddings": pos[0],
           "num_hidden_layers": len(layers),
           "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"][0]}
    if "text_projection.weight" in sd:
        cfg["projection_dim"] = sd["text_projection.weight"][0]
    return cfg


# --------------------------------------------------------------------------------------------------
# Family defaults for what shapes cannot tell
def _per64(channels) -> list[int]:
    return [max(1, c // 64) for c in channels]


def unet_defaults(family: str, derived: dict, prediction_type: str, pooled_dim: int | None) -> dict:
    v = prediction_type == "v_prediction"
    size_key = "sd2_v" if family == "sd2" and v else family
    out = {"sample_size": IMAGE_SIZE.get(size_key, 512) // 8, "norm_num_groups": 32,
           "attention_head_dim": 8 if family == "sd1" else _per64(derived["block_out_channels"]),
           "upcast_attention": family == "sd2" and v}
    if derived.get("addition_embed_type") == "text_time":
        n_ids = SDXL_TIME_IDS.get(family, 6)
        extra = derived["projection_class_embeddings_input_dim"] - (pooled_dim or 0)
        if pooled_dim is None or extra <= 0 or extra % n_ids:
            out["addition_time_embed_dim"] = 256
        else:
            out["addition_time_embed_dim"] = extra // n_ids
    return out


def text_defaults(kind: str, derived: dict) -> dict:
    vocab = derived["vocab_size"]
    return {"num_attention_heads": max(1, derived["hidden_size"] // 64),
            "hidden_act": "quick_gelu" if kind == "clip" else "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1 if kind == "clip" else 0,
            "projection_dim": derived.get("projection_dim", derived["hidden_size"])}


def _recorded(metadata: Mapping[str, str]) -> dict:
    """The diffusers configs Chorus recorded in a file it wrote (`chorus.configs`), if any."""
    text = metadata.get("chorus.configs")
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _merge(defaults: dict, recorded: Mapping | None, derived: dict, allowed: set[str] | None = None) -> dict:
    """defaults < recorded config < shape-derived fields (the tensors always win)."""
    out = dict(defaults)
    for k, v in (recorded or {}).items():
        if k.startswith("_") or k in HF_CONFIG_BOOKKEEPING:
            continue
        out[k] = v
    out.update(derived)
    if allowed is not None:
        out = {k: v for k, v in out.items() if k in allowed}
    return out


def _fields(config_cls) -> set[str]:
    import dataclasses
    return {f.name for f in dataclasses.fields(config_cls)}


# --------------------------------------------------------------------------------------------------
# Text encoders: names in transformers' text_model.-prefixed form
def canonical_text_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ≥5 saves CLIPTextModel without `text_model.`; the original files keep it."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def _model_text_keys(state: Mapping[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    if any(k.startswith("text_model.") for k in model_keys):
        return dict(state)
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def _text_class(kind: str):
    import transformers
    return getattr(transformers, TEXT_ENCODER_CLASS[kind])


def _text_model_keys(kind: str, config: dict) -> list[str]:
    from transformers import CLIPTextConfig
    with torch.device("meta"):
        model = _text_class(kind)(CLIPTextConfig(**config))
    return [k for k in model.state_dict() if not k.endswith("position_ids")]


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_text_encoder(kind: str, config: dict, canonical: Mapping[str, torch.Tensor], dtype=torch.float32):
    """A transformers CLIP text model from a config dict and `text_model.`-form tensors (all required)."""
    from transformers import CLIPTextConfig
    _quiet_transformers()
    keys = _text_model_keys(kind, config)
    state = _model_text_keys(canonical, keys)
    missing, unexpected = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
    if missing or unexpected:
        raise ChorusError(f"The {TEXT_ENCODER_CLASS[kind]} tensors do not fit the config derived from them: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model = _text_class(kind).from_pretrained(None, config=CLIPTextConfig(**config), state_dict=state)
    except (KeyError, ValueError, TypeError) as e:
        raise ChorusError(f"Could not build the {TEXT_ENCODER_CLASS[kind]} from its config {config} ({e}).") from None
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# Conversion: single file → diffusers components
@dataclass
class Component:
    name: str                         # unet | vae | text_encoder | text_encoder_2 | controlnet
    config: dict                      # diffusers config.json fields (transformers for text encoders)
    state: dict[str, torch.Tensor]    # diffusers names (canonical text_model. form for text encoders)
    kind: str = ""                    # text encoders: clip | openclip_sd2 | openclip


@dataclass
class Converted:
    detection: Detection
    components: dict[str, Component]
    scheduler: dict
    pipeline_flags: dict
    notes: list[str] = field(default_factory=list)


def _chorus_keys(model_cls, config: dict) -> list[str]:
    with torch.device("meta"):
        model = model_cls.from_config(config)
    return list(model.state_dict())


def _convert_text(ckpt_state, shapes, kind: str, prefix: str, recorded: dict | None, what: str) \
        -> tuple[dict, dict, set[str]]:
    """(config, canonical tensors, original keys used) of one text encoder."""
    used: set[str] = set()
    if kind == "clip":
        sub = {k[len(prefix):]: k for k in shapes if k.startswith(prefix) and not k.endswith("position_ids")}
        if sub and not any(k.startswith("text_model.") for k in sub):  # old files: no text_model. level
            sub = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sub.items()}
        shapes_c = {k: shapes[v] for k, v in sub.items()}
        derived = clip_config_from_keys(shapes_c, what)
        config = _merge(text_defaults(kind, derived), recorded, derived)
        keys = [k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
                for k in _text_model_keys(kind, _hf_config(config))]
        state = {}
        for k in keys:
            if k not in sub:
                raise ChorusError(f"The {what} lacks {prefix}{k}.")
            state[k] = ckpt_state[sub[k]]
            used.add(sub[k])
        used |= {k for k in shapes if k.startswith(prefix) and k.endswith("position_ids")}
        return _hf_config(config), state, used
    # OpenCLIP
    sd = _strip(shapes, prefix)
    tok, pos = sd.get("token_embedding.weight"), sd.get("positional_embedding")
    if tok is None or pos is None:
        raise ChorusError(f"The {what} under {prefix} lacks token_embedding.weight or positional_embedding.")
    blocks = _indices(sd, "transformer.resblocks.")
    n_layers = len(blocks) - 1 if kind == "openclip_sd2" else len(blocks)  # SD 2.x uses the penultimate layer
    if n_layers < 1:
        raise ChorusError(f"The {what} has {len(blocks)} transformer blocks.")
    derived = {"vocab_size": tok[0], "hidden_size": tok[1], "max_position_embeddings": pos[0],
               "num_hidden_layers": n_layers, "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"][0]}
    if kind == "openclip":
        if "text_projection" not in sd:
            raise ChorusError(f"The {what} lacks {prefix}text_projection.")
        derived["projection_dim"] = sd["text_projection"][1]
    config = _hf_config(_merge(text_defaults(kind, derived), recorded, derived))
    keys = canonical_text_keys({k: None for k in _text_model_keys(kind, config)})
    rules = K.openclip_rules(keys, prefix)
    state = K.to_diffusers(ckpt_state, rules, what)
    used = {r.ldm for r in rules}
    # the unused last block of SD 2.x, its projection and CLIP's logit scale are known leftovers
    used |= {k for k in shapes if k.startswith(f"{prefix}transformer.resblocks.{blocks[-1]}.")} \
        if kind == "openclip_sd2" else set()
    used |= {k for k in (prefix + "text_projection", prefix + "logit_scale", prefix + "attn_mask") if k in shapes}
    return config, state, used


def _hf_config(config: dict) -> dict:
    from transformers import CLIPTextConfig
    known = set(CLIPTextConfig().to_dict()) - set(HF_CONFIG_BOOKKEEPING)
    return {k: v for k, v in config.items() if k in known}


def recorded_from_folder(folder) -> dict:
    """The configs of a local diffusers folder (a pipeline or a ControlNet), as `chorus.configs` holds them."""
    from chorus.models.io import read_json
    folder = Path(folder)
    if not folder.is_dir():
        raise ChorusError(f"The config folder {folder} does not exist.")
    if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        return {"controlnet": read_json(folder / "config.json")}
    out: dict[str, Any] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / name / "config.json").is_file():
            out[name] = read_json(folder / name / "config.json")
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        out["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
    if (folder / "model_index.json").is_file():
        out["model_index"] = read_json(folder / "model_index.json")
    if not out:
        raise ChorusError(f"{folder} holds no diffusers configs (unet/config.json, …).")
    return out


def convert_checkpoint(ckpt: Checkpoint, detection: Detection | None = None, prediction_type: str | None = None,
                       config=None) -> Converted:
    """Every component of a single file as diffusers configs + tensors (nothing built yet).

    `config`: a local diffusers folder whose configs fill in what the shapes cannot tell (as diffusers'
    `from_single_file(config=…)`); it wins over the configs Chorus records in the files it writes."""
    from chorus.models import UNet
    from chorus.models.vae import VAE as VAEModel
    shapes = ckpt.shapes
    det = detection or detect(shapes, ckpt.metadata, prediction_type, ckpt.global_step, ckpt.path)
    recorded = recorded_from_folder(config) if config is not None else _recorded(ckpt.metadata)
    folder_pred = (recorded.get("scheduler") or {}).get("prediction_type") if config is not None else None
    if folder_pred and prediction_type is None and det.family != "controlnet":
        det.prediction_type, det.prediction_source = _prediction(folder_pred), f"the config folder {config}"
    used: set[str] = set()
    components: dict[str, Component] = {}
    notes: list[str] = []
    if det.family == "controlnet":
        comp, used = _convert_controlnet(ckpt.state, shapes, det, recorded.get("controlnet"))
        return Converted(det, {"controlnet": comp}, {}, {}, _leftovers(shapes, used, det))

    # text encoders first: SDXL's added embedding width depends on the pooled (projection) width
    pooled = None
    for name, kind, prefix in TEXT_ENCODERS[det.family]:
        cfg, state, u = _convert_text(ckpt.state, shapes, kind, prefix, recorded.get(name), f"{name} ({prefix})")
        components[name] = Component(name, cfg, state, kind)
        used |= u
        if kind == "openclip":
            pooled = cfg["projection_dim"]

    unet_sd = _strip(shapes, UNET)
    derived = unet_config_from_ldm(unet_sd)
    _keep_recorded_placeholders(derived, recorded.get("unet"))
    unet_cfg = _merge(unet_defaults(det.family, derived, det.prediction_type, pooled), recorded.get("unet"), derived,
                      _fields(UNet.config_class))
    keys = _chorus_keys(UNet, unet_cfg)
    layout = K.UNetLayout(_levels(unet_cfg["layers_per_block"], len(unet_cfg["block_out_channels"])),
                          tuple(t == "CrossAttnUpBlock2D" for t in unet_cfg["up_block_types"]))
    rules = K.unet_rules(keys, layout, UNET)
    components["unet"] = Component("unet", unet_cfg, K.to_diffusers(ckpt.state, rules, "UNet"))
    used |= {r.ldm for r in rules}

    vae_sd = _strip(shapes, VAE)
    derived = vae_config_from_ldm(vae_sd)
    size_key = "sd2_v" if det.family == "sd2" and det.prediction_type == "v_prediction" else det.family
    vae_defaults = {"scaling_factor": VAE_SCALING[det.family], "sample_size": IMAGE_SIZE[size_key],
                    "norm_num_groups": 32}
    vae_cfg = _merge(vae_defaults, recorded.get("vae"), derived, _fields(VAEModel.config_class))
    rules = K.vae_rules(_chorus_keys(VAEModel, vae_cfg), len(vae_cfg["block_out_channels"]), VAE)
    components["vae"] = Component("vae", vae_cfg, K.to_diffusers(ckpt.state, rules, "VAE"))
    used |= {r.ldm for r in rules}

    scheduler = dict(DEFAULT_SCHEDULER)
    scheduler.update({k: v for k, v in (recorded.get("scheduler") or {}).items() if not k.startswith("_")})
    scheduler["prediction_type"] = det.prediction_type
    flags = {"sdxl": {"force_zeros_for_empty_prompt": True},
             "sdxl_refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}.get(
        det.family, {})
    flags.update({k: v for k, v in (recorded.get("model_index") or {}).items()
                  if k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")})
    notes += _leftovers(shapes, used, det)
    return Converted(det, components, scheduler, flags, notes)


def _keep_recorded_placeholders(derived: dict, recorded: Mapping | None) -> None:
    """The transformer depth of a level without attention is a placeholder the tensors cannot show: keep the
    recorded value when it agrees with the tensors on every level that has attention."""
    if not recorded or "transformer_layers_per_block" not in recorded:
        return
    n = len(derived["block_out_channels"])
    mine, theirs = derived["transformer_layers_per_block"], recorded["transformer_layers_per_block"]
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    if len(as_list(theirs)) != n:
        return
    attn = [t == "CrossAttnDownBlock2D" for t in derived["down_block_types"]]
    if all(a == b for a, b, on in zip(as_list(mine), as_list(theirs), attn) if on) and \
            as_list(mine)[-1] == as_list(theirs)[-1]:
        derived["transformer_layers_per_block"] = list(theirs) if isinstance(theirs, (list, tuple)) else theirs


def _levels(layers, n) -> tuple[int, ...]:
    return tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),) * n


def _convert_controlnet(state, shapes, det: Detection, recorded) -> tuple[Component, set[str]]:
    from chorus.models import ControlNet
    prefix = det.control_prefix
    if det.control_layout == "diffusers":  # diffusers' names in a single file: rename to the original first
        sub = _strip(shapes, prefix)
        layout = K.diffusers_controlnet_layout(sub)
        rules = K.unet_rules(sub, layout, "")
        renamed = {r.ldm: shapes[prefix + r.diffusers[0]] for r in rules}
        derived = controlnet_config_from_ldm(renamed)
        tensors = {r.ldm: state[prefix + r.diffusers[0]] for r in rules}
        used = {prefix + r.diffusers[0] for r in rules}
        prefix_ldm, src = "", tensors
    else:
        sub = _strip(shapes, prefix)
        derived = controlnet_config_from_ldm(sub)
        prefix_ldm, src, used = prefix, state, set()
    base = det.base or "sd1"
    defaults = {"attention_head_dim": 8 if base == "sd1" else _per64(derived["block_out_channels"]),
                "norm_num_groups": 32}
    if derived.get("addition_embed_type") == "text_time":
        defaults["addition_time_embed_dim"] = 256
    cfg = _merge(defaults, recorded, derived, _fields(ControlNet.config_class))
    keys = _chorus_keys(ControlNet, cfg)
    n_hint = len(cfg["conditioning_embedding_out_channels"]) - 1
    layout = K.UNetLayout(_levels(cfg["layers_per_block"], len(cfg["block_out_channels"])),
                          (False,) * len(cfg["block_out_channels"]), 2 * n_hint)
    rules = K.unet_rules(keys, layout, prefix_ldm)
    converted = K.to_diffusers(src, rules, "ControlNet")
    if det.control_layout != "diffusers":
        used = {r.ldm for r in rules}
    return Component("controlnet", cfg, converted), used


def _leftovers(shapes, used: set[str], det: Detection) -> list[str]:
    """Notes on tensors no component took (EMA copies and LDM buffers are expected and not reported)."""
    notes = []
    ema = [k for k in shapes if k.startswith("model_ema.")]
    if len(ema) > 100:
        notes.append(f"the file also holds EMA weights ({len(ema)} model_ema.* tensors); the non-EMA weights are "
                     "used, as diffusers does by default")
    left = sorted(k for k in shapes if k not in used and not k.startswith("model_ema.")
                  and k not in IGNORED_TOP_LEVEL and not k.endswith("position_ids"))
    if det.family == "controlnet":  # a ControlNet 1.0 file carries a whole SD pipeline beside control_model.*
        left = [k for k in left if not k.startswith((UNET, VAE, "cond_stage_model.", "conditioner."))]
    if left:
        notes.append(f"{len(left)} tensors were not used: {', '.join(left[:5])}{' …' if len(left) > 5 else ''}")
    return notes


# --------------------------------------------------------------------------------------------------
# Tokenizers (a single file has none)
def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer_files_from_bpe(bpe_gz, out_dir) -> Path:
    """vocab.json + merges.txt from OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` (the same BPE as OpenAI CLIP):
    256 byte symbols, the same with `</w>`, the first 48,894 merges, then the two special tokens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + 49152 - 256 - 2] if len(m.split()) == 2]
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + \
            ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    return out_dir


def _shipped_vocab() -> Path | None:
    here = Path(__file__).resolve().parent / "clip_tokenizer"
    return here if (here / "vocab.json").is_file() and (here / "merges.txt").is_file() else None


def _open_clip_vocab() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        gz = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if gz.is_file():
            import tempfile
            return clip_tokenizer_files_from_bpe(gz, Path(tempfile.gettempdir()) / "chorus-clip-bpe")
    return None


NO_TOKENIZER = ("{what} holds no tokenizer (single-file checkpoints never do), and no CLIP BPE vocabulary is "
                "available offline: neither transformers nor diffusers ships one and Chorus downloads nothing. "
                "Pass tokenizer=DIR (`--tokenizer DIR` on the command line; for `chorus generate`, set "
                "CHORUS_TOKENIZER=DIR or put a tokenizer/ folder next to the file): a folder with vocab.json + "
                "merges.txt (as in openai/clip-vit-large-patch14), a saved tokenizer folder, or a diffusers "
                "pipeline folder with tokenizer/ (and tokenizer_2/). An installed open_clip_torch also works: "
                "its wheel carries the vocabulary.")


def _tokenizer_source(tokenizer, path) -> Path | None:
    if tokenizer is not None:
        p = Path(tokenizer)
        if not p.is_dir():
            raise ChorusError(f"The tokenizer folder {p} does not exist.")
        return p
    env = os.environ.get("CHORUS_TOKENIZER")
    if env:
        if not Path(env).is_dir():
            raise ChorusError(f"CHORUS_TOKENIZER={env} is not a folder.")
        return Path(env)
    if path is not None and (Path(path).parent / "tokenizer").is_dir():
        return Path(path).parent
    return _shipped_vocab() or _open_clip_vocab()


def _is_tokenizer_dir(p: Path) -> bool:
    return any((p / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.json"))


def load_tokenizers(roles: Sequence[tuple[str, str]], tokenizer=None, path=None, max_lengths=None) -> dict:
    """A tokenizer per text encoder: (component name, layout) → CLIPTokenizer.

    A pipeline folder's tokenizer/ and tokenizer_2/ are used as they are; one tokenizer folder serves
    every encoder, with OpenCLIP's padding token `!` for SD 2.x and SDXL's second encoder."""
    from transformers import AutoTokenizer, CLIPTokenizer
    _quiet_transformers()
    src = _tokenizer_source(tokenizer, path)
    if src is None:
        raise ChorusError(NO_TOKENIZER.format(what=str(path) if path else "The checkpoint"))
    out = {}
    for name, kind in roles:
        sub = "tokenizer_2" if name == "text_encoder_2" else "tokenizer"
        folder, as_is = src, False
        if (src / sub).is_dir():
            folder, as_is = src / sub, True
        elif (src / "tokenizer").is_dir():
            folder = src / "tokenizer"
        elif not _is_tokenizer_dir(src):
            raise ChorusError(f"{src} holds no tokenizer (no tokenizer/, tokenizer_config.json or vocab.json).")
        kwargs = {} if as_is or kind == "clip" else {"pad_token": "!"}
        try:
            if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            else:
                tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                    pad_token=kwargs.get("pad_token", "<|endoftext|>"))
        except (OSError, ValueError) as e:
            raise ChorusError(f"Could not read the tokenizer in {folder} ({str(e).splitlines()[0]}).") from None
        limit = (max_lengths or {}).get(name)
        if limit and (getattr(tok, "model_max_length", 0) or 0) > limit:
            tok.model_max_length = limit
        out[name] = tok
    return out


# --------------------------------------------------------------------------------------------------
# Building Chorus models
def build_component(comp: Component, torch_dtype=torch.float32):
    from chorus.models import ControlNet, UNet
    from chorus.models.vae import VAE as VAEModel
    cls = {"unet": UNet, "vae": VAEModel, "controlnet": ControlNet}[comp.name]
    with torch.device("meta"):
        model = cls.from_config(comp.config)
    model.load_weights(comp.state)
    return model.to(dtype=torch_dtype).eval()


def load_controlnet(path, torch_dtype=torch.float32, config=None):
    """A ControlNet from a diffusers folder or a single file (original or diffusers names)."""
    from chorus.models import ControlNet
    path = Path(path)
    if path.is_dir():
        return ControlNet.from_pretrained(path, torch_dtype=torch_dtype)
    ckpt = read_checkpoint(path)
    conv = convert_checkpoint(ckpt, config=config)
    if conv.detection.family != "controlnet":
        raise ChorusError(f"{path} is a {conv.detection.name} checkpoint, not a ControlNet.")
    _warn(conv.notes, path)
    return build_component(conv.components["controlnet"], torch_dtype or torch.float32)


def _warn(notes, path):
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=3)


def load_single_file_stage(path, prediction_type: str | None = None, tokenizer=None, torch_dtype=torch.float32,
                           config=None):
    """(Stage, VAE, Detection) of a single-file pipeline checkpoint (`config`: see convert_checkpoint)."""
    from chorus.conditioning import Conditioner, NumberEmbedder, TextEmbedder
    from chorus.pipeline import Stage
    from chorus.schedule import NoiseSchedule
    path = Path(path)
    ckpt = read_checkpoint(path)
    conv = convert_checkpoint(ckpt, prediction_type=prediction_type, config=config)
    det = conv.detection
    if tokenizer is None and config is not None and any((Path(config) / d).is_dir() for d in ("tokenizer",
                                                                                              "tokenizer_2")):
        tokenizer = config
    if det.family == "controlnet":
        raise ChorusError(f"{path} is a {det.name} file, not a whole pipeline: load a base model and pass this file "
                          "as controlnet= (CLI: --controlnet FILE).")
    if det.inpainting:
        raise ChorusError(f"{path} is an inpainting / instruct-pix2pix {det.name} checkpoint (its UNet takes "
                          f"{conv.components['unet'].config['in_channels']} input channels); the text-to-image "
                          "pipeline needs a 4-channel UNet. `chorus export FILE --diffusers DIR` still converts it.")
    _warn(conv.notes, path)
    dtype = torch_dtype or torch.float32
    unet = build_component(conv.components["unet"], dtype)
    vae = build_component(conv.components["vae"], dtype)
    roles = [(n, k) for n, k, _ in TEXT_ENCODERS[det.family]]
    lengths = {n: conv.components[n].config["max_position_embeddings"] for n, _ in roles}
    tokenizers = load_tokenizers(roles, tokenizer, path, lengths)
    encoders = {n: build_text_encoder(k, conv.components[n].config, conv.components[n].state).float()
                for n, k in roles}
    sdxl = det.family in ("sdxl", "sdxl_refiner")
    zeros = conv.pipeline_flags.get("force_zeros_for_empty_prompt", True)
    embedders: list = []
    if "text_encoder" in encoders:
        embedders.append(TextEmbedder(tokenizers["text_encoder"], encoders["text_encoder"],
                                      layer="penultimate" if sdxl else "last", zero_for_empty=sdxl and zeros,
                                      name="text_encoder"))
    if "text_encoder_2" in encoders:
        embedders.append(TextEmbedder(tokenizers["text_encoder_2"], encoders["text_encoder_2"], layer="penultimate",
                                      pooled=True, zero_for_empty=zeros, name="text_encoder_2"))
    if sdxl:
        embedders.append(NumberEmbedder("original_size", 2))
        embedders.append(NumberEmbedder("crop_top_left", 2))
        if conv.pipeline_flags.get("requires_aesthetics_score", False):
            embedders.append(NumberEmbedder("aesthetic_score", 1))
        else:
            embedders.append(NumberEmbedder("target_size", 2))
    stage = Stage(unet, Conditioner(embedders), NoiseSchedule.from_config(conv.scheduler), det.prediction_type)
    stage.scheduler_config = conv.scheduler
    stage.detection = det
    return stage, vae, det


def load_stage_from(path, torch_dtype=torch.float32, prediction_type=None, tokenizer=None):
    """(Stage, VAE) from a diffusers folder or a single file."""
    from chorus.pipeline import load_stage
    if is_single_file(path):
        stage, vae, _ = load_single_file_stage(path, prediction_type, tokenizer, torch_dtype)
        return stage, vae
    return load_stage(Path(path), torch_dtype)


def pipeline_from_single_file(cls, path, prediction_type=None, tokenizer=None, refiner=None, switch_at: float = 0.8,
                              controlnet=None, torch_dtype=None, config=None):
    """Pipeline.from_single_file: see there."""
    from chorus.experts import Expert, ExpertEnsemble
    torch_dtype = torch_dtype or torch.float32
    base, vae, _ = load_single_file_stage(path, prediction_type, tokenizer, torch_dtype, config)
    if controlnet is not None:
        paths = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
        base.controls = [load_controlnet(p, torch_dtype) for p in paths]
    if refiner is None:
        experts = [Expert("base", base)]
    else:
        ref, _ = load_stage_from(refiner, torch_dtype, tokenizer=tokenizer)
        experts = [Expert("base", base, 0.0, switch_at), Expert("refiner", ref, switch_at, 1.0)]
    return cls(vae, ExpertEnsemble(experts), base.scheduler_config, name=str(path))


# --------------------------------------------------------------------------------------------------
# Export: diffusers folder → single file
def _folder_text_state(folder: Path) -> dict[str, torch.Tensor]:
    from chorus.models.io import load_state_dict, read_json
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_state_dict(folder / f))
    elif (folder / "model.safetensors").is_file():
        state = load_state_dict(folder / "model.safetensors")
    else:
        raise ChorusError(f"{folder} has no model.safetensors (Chorus reads text encoders from safetensors only).")
    return canonical_text_keys(state)


def _folder_family(folder: Path, index: dict, unet_cfg) -> str:
    has1 = bool(index.get("text_encoder") and index["text_encoder"][0])
    has2 = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
    if unet_cfg.addition_embed_type == "text_time":
        if has1 and has2:
            return "sdxl"
        if has2:
            return "sdxl_refiner"
        raise ChorusError(f"{folder}: an SDXL-style UNet without the OpenCLIP text_encoder_2 has no single-file "
                          "layout.")
    if not has1 or has2:
        raise ChorusError(f"{folder}: an SD 1.x/2.x UNet needs exactly one text_encoder.")
    return "sd2" if unet_cfg.use_linear_projection else "sd1"


def _identity_openclip_block(state: Mapping[str, torch.Tensor], prefix: str, index: int) -> dict:
    """An OpenCLIP block that passes its input through (zero attention and MLP, unit norms): SD 2.x files hold
    one more block than the encoder diffusers uses (SD 2.x conditions on the penultimate layer)."""
    out = {}
    src = f"{prefix}transformer.resblocks.0."
    for k, v in state.items():
        if k.startswith(src):
            rest = k[len(src):]
            unit = rest.startswith(("ln_1.weight", "ln_2.weight"))
            out[f"{prefix}transformer.resblocks.{index}.{rest}"] = torch.ones_like(v) if unit else torch.zeros_like(v)
    return out


def to_single_file_state(folder, family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors in original names, metadata, family) of a diffusers pipeline or ControlNet folder."""
    from chorus.conditioning import read_conditioner_spec
    from chorus.models import ControlNet, UNet
    from chorus.models.io import read_json
    from chorus.models.unet import UP_TYPES, encoder_spec
    from chorus.models.vae import VAE as VAEModel
    folder = Path(folder)
    if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        cfg = read_json(folder / "config.json")
        if cfg.get("_class_name") != "ControlNetModel":
            raise ChorusError(f"{folder} is a {cfg.get('_class_name', 'component')} folder; Chorus writes single "
                              "files of whole pipelines and of ControlNets.")
        cn = ControlNet.from_pretrained(folder)
        spec = encoder_spec(cn.config, "ControlNet")
        layout = K.UNetLayout(spec.layers, (False,) * len(spec.layers),
                              2 * (len(cn.config.conditioning_embedding_out_channels) - 1))
        state = cn.state_dict()
        tensors = K.to_ldm(state, K.unet_rules(state, layout, CONTROL), "ControlNet")
        base = "sdxl" if cn.config.addition_embed_type == "text_time" else (
            "sd2" if cn.config.use_linear_projection else "sd1")
        meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{MODELSPEC_ARCH[base]}/controlnet",
                "modelspec.implementation": "https://github.com/lllyasviel/ControlNet",
                "modelspec.title": folder.name, "chorus.configs": json.dumps({"controlnet": cn.config_dict()})}
        return tensors, meta, "controlnet"
    if not (folder / "model_index.json").is_file():
        raise ChorusError(f"{folder} is not a diffusers pipeline folder (no model_index.json) nor a ControlNet "
                          "folder.")
    if read_conditioner_spec(folder) is not None:
        raise ChorusError(f"{folder} has its own conditioner (conditioner.json), which the single-file layouts of "
                          "SD 1.x/2.x/SDXL cannot express.")
    index = read_json(folder / "model_index.json")
    unet = UNet.from_pretrained(folder / "unet")
    vae = VAEModel.from_pretrained(folder / "vae")
    fam = family or _folder_family(folder, index, unet.config)
    if fam not in TEXT_ENCODERS:
        raise ChorusError(f"Unknown family {fam!r}; use one of {', '.join(TEXT_ENCODERS)}.")
    spec = encoder_spec(unet.config, "UNet")
    layout = K.UNetLayout(spec.layers, tuple(UP_TYPES[t] for t in unet.config.up_block_types))
    unet_state = unet.state_dict()
    tensors = K.to_ldm(unet_state, K.unet_rules(unet_state, layout, UNET), "UNet")
    vae_state = vae.state_dict()
    tensors.update(K.to_ldm(vae_state, K.vae_rules(vae_state, len(vae.config.block_out_channels), VAE), "VAE"))
    configs: dict[str, Any] = {"unet": unet.config_dict(), "vae": vae.config_dict()}
    for name, kind, prefix in TEXT_ENCODERS[fam]:
        if not (folder / name).is_dir():
            raise ChorusError(f"{folder} has no {name}/ folder, which an {FAMILY_NAMES[fam]} single file needs.")
        te_cfg = {k: v for k, v in read_json(folder / name / "config.json").items() if k not in HF_CONFIG_BOOKKEEPING}
        state = _folder_text_state(folder / name)
        if kind == "clip":
            state.pop("text_projection.weight", None)
            tensors.update(K.to_ldm(state, K.clip_rules(state, prefix), name))
        else:
            ldm = K.to_ldm(state, K.openclip_rules(state, prefix), name)
            if kind == "openclip_sd2":
                ldm.update(_identity_openclip_block(ldm, prefix, te_cfg["num_hidden_layers"]))
                ldm[prefix + "text_projection"] = torch.eye(te_cfg["hidden_size"], dtype=ldm[prefix + "ln_final.weight"].dtype)
            ldm[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=ldm[prefix + "ln_final.weight"].dtype)
            tensors.update(ldm)
        configs[name] = te_cfg
    sched = read_json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    configs["scheduler"] = sched
    configs["model_index"] = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
                              if k in index}
    pred = sched.get("prediction_type", "epsilon")
    arch = MODELSPEC_ARCH["sd2_v" if fam == "sd2" and pred == "v_prediction" else fam]
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) if unet.config.sample_size else None
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": folder.name, "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
            "chorus.configs": json.dumps(configs)}
    if size:
        meta["modelspec.resolution"] = f"{size}x{size}"
    return tensors, meta, fam


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_single_file(folder, out, dtype: str | None = None, family: str | None = None) -> str:
    """Write a diffusers pipeline (or ControlNet) folder as one original-layout `.safetensors` file."""
    from safetensors.torch import save_file

    from chorus.models.io import atomic_write
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ChorusError(f"{out}: Chorus writes single files as .safetensors only (never pickles).")
    tensors, meta, fam = to_single_file_state(folder, family)
    cast = DTYPES[dtype] if dtype else None
    tensors = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    atomic_write(out, lambda p: save_file(tensors, str(p), metadata={"format": "pt", **meta}))
    return fam


# --------------------------------------------------------------------------------------------------
# Export: single file → diffusers folder
def export_diffusers(path, out_dir, prediction_type: str | None = None, tokenizer=None, config=None) -> Detection:
    """Write a single file as a diffusers folder (a pipeline with tokenizers, or a ControlNet)."""
    from chorus.models.io import DIFFUSERS_VERSION
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ChorusError(f"{out_dir} exists and is not empty; give a new folder.")
    ckpt = read_checkpoint(path)
    conv = convert_checkpoint(ckpt, prediction_type=prediction_type, config=config)
    det = conv.detection
    _warn(conv.notes, path)
    if tokenizer is None and config is not None and any((Path(config) / d).is_dir() for d in ("tokenizer",
                                                                                              "tokenizer_2")):
        tokenizer = config
    if det.family == "controlnet":
        build_component(conv.components["controlnet"], None).save_pretrained(out_dir)
        return det
    roles = [(n, k) for n, k, _ in TEXT_ENCODERS[det.family]]
    lengths = {n: conv.components[n].config["max_position_embeddings"] for n, _ in roles}
    tokenizers = load_tokenizers(roles, tokenizer, path, lengths)  # fail before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(conv.components["unet"].state.values())).dtype
    build_component(conv.components["unet"], dtype).save_pretrained(out_dir / "unet")
    build_component(conv.components["vae"], dtype).save_pretrained(out_dir / "vae")
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS[det.family], "_diffusers_version": DIFFUSERS_VERSION,
                             "feature_extractor": [None, None], "image_encoder": [None, None],
                             "scheduler": ["diffusers", conv.scheduler["_class_name"]],
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if det.family in ("sd1", "sd2"):
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    for name in ("text_encoder", "text_encoder_2"):
        tok_name = name.replace("text_encoder", "tokenizer")
        if name not in conv.components:
            if det.family != "sd1" and det.family != "sd2":
                index[name], index[tok_name] = [None, None], [None, None]
            continue
        comp = conv.components[name]
        enc = build_text_encoder(comp.kind, comp.config, comp.state, dtype)
        enc.save_pretrained(str(out_dir / name), safe_serialization=True)
        tokenizers[name].save_pretrained(str(out_dir / tok_name))
        index[name] = ["transformers", TEXT_ENCODER_CLASS[comp.kind]]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    index.update(conv.pipeline_flags)
    (out_dir / "scheduler").mkdir(exist_ok=True)
    sched = {"_class_name": conv.scheduler["_class_name"], "_diffusers_version": DIFFUSERS_VERSION,
             **{k: v for k, v in conv.scheduler.items() if not k.startswith("_")}}
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return det
