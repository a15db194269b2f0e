"""Component folders in the diffusers layout: `config.json` + safetensors weights.

Every Chorus model (UNet, VAE, ControlNet) is a `ModelBase`: a typed dataclass config that
reads and writes diffusers' `config.json` fields, and a state dict with diffusers' key names.
Weights are read from safetensors only; a legacy pickle file (`.bin`, `.ckpt`, `.pt`) is read
with `torch.load(weights_only=True)` (tensors only, never arbitrary objects) or refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chorus.errors import ChorusError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
DIFFUSERS_VERSION = "0.42.1"  # written into saved configs so diffusers reads them without warnings


def config_from_dict(config_cls: type, values: Mapping[str, Any], what: str) -> Any:
    """Build a dataclass config from a diffusers-style dict; keys starting with '_' are metadata."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ChorusError(
            f"The {what} config has fields Chorus does not know: {', '.join(unknown)}. "
            f"Valid fields are: {', '.join(sorted(fields))}."
        )
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return config_cls(**kwargs)


def config_to_dict(config: Any, class_name: str) -> dict:
    """The config as diffusers writes it: plain JSON with `_class_name` and `_diffusers_version`."""
    out = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    for k, v in dataclasses.asdict(config).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def usual_permissions(path) -> None:
    """Give a file the mode a plain open() would (0666 less the umask): mkstemp and safetensors' writer make 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_safetensors(tensors: dict, path) -> None:
    """safetensors.torch.save_file with pt metadata, and the usual file permissions."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    usual_permissions(path)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        usual_permissions(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ChorusError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ChorusError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def _find_weights(folder: Path, variant: str | None) -> list[Path]:
    """The weight files of a component folder: single, fp16 variant, or sharded with an index."""
    names = [WEIGHTS_NAME]
    if variant:
        names.insert(0, WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors"))
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return [folder / s for s in shards]
    safetensors = sorted(folder.glob("*.safetensors"))
    if len(safetensors) == 1:
        return safetensors
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return pickles
    raise ChorusError(
        f"No weights in {folder}: expected {WEIGHTS_NAME} (or a sharded index, or a .{variant or 'fp16'} "
        "variant). Save a model with save_pretrained() or point at a diffusers-format component folder."
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from safetensors; a pickle file is read with weights_only=True or refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ChorusError(f"{path} is not a readable safetensors file ({e}).") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ChorusError(
                f"Refusing to load {path}: it is a pickle file and holds more than plain tensors "
                f"({type(e).__name__}). Chorus never unpickles arbitrary objects; convert it to "
                "safetensors with a tool you trust."
            ) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ChorusError(f"{path} does not hold a flat dict of tensors.")
        return sd
    raise ChorusError(f"{path}: unknown weight format '{path.suffix}' (use .safetensors).")


def guess_architecture(keys) -> str:
    """Name the diffusers architecture a set of state-dict keys looks like (for error messages)."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("controlnet_down_blocks") or has("controlnet_cond_embedding"):
        return "a ControlNet (ControlNetModel)"
    if has("encoder.down_blocks") and has("decoder.up_blocks"):
        return "a VAE (AutoencoderKL)"
    if has("add_embedding.linear_1"):
        return "an SDXL-style UNet (addition_embed_type='text_time')"
    if has("down_blocks") and has("time_embedding"):
        if any(".proj_in.weight" in k for k in keys):
            return "a Stable Diffusion UNet (UNet2DConditionModel)"
        return "a UNet (UNet2DConditionModel)"
    if has("text_model.") or has("embeddings.word_embeddings"):
        return "a text encoder"
    if has("model.diffusion_model") or has("first_stage_model"):
        return "an original-format Stable Diffusion single-file checkpoint (not diffusers layout)"
    return "no architecture Chorus recognises"


def _key_mismatch_message(what: str, missing: list[str], unexpected: list[str], keys) -> str:
    def few(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    parts = [f"The weights do not match the {what} config."]
    if missing:
        parts.append(f"Missing {len(missing)} keys: {few(missing)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} keys: {few(unexpected)}.")
    parts.append(f"The file looks like {guess_architecture(keys)}.")
    return " ".join(parts)


class ModelBase(nn.Module):
    """A model with a dataclass config, saved and loaded as a diffusers component folder."""

    config_class: ClassVar[type]
    diffusers_class_name: ClassVar[str]

    def __init__(self, config):
        super().__init__()
        self.config = config

    # --- config ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config) -> "ModelBase":
        """Build a randomly initialised model from a config dataclass or a diffusers-style dict."""
        if not isinstance(config, cls.config_class):
            config = config_from_dict(cls.config_class, config, cls.__name__)
        return cls(config)

    def config_dict(self) -> dict:
        return config_to_dict(self.config, self.diffusers_class_name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- folders -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, device: str | torch.device = "cpu") -> "ModelBase":
        """Load `folder[/subfolder]/config.json` and its weights; keys must match exactly."""
        folder = Path(folder)
        if subfolder:
            folder = folder / subfolder
        if not folder.is_dir():
            raise ChorusError(f"Model folder {folder} does not exist.")
        if not (folder / CONFIG_NAME).is_file():
            raise ChorusError(f"{folder} has no {CONFIG_NAME}; it is not a diffusers-format component folder.")
        config = config_from_dict(cls.config_class, read_json(folder / CONFIG_NAME), cls.__name__)
        state = {}
        for path in _find_weights(folder, variant):
            state.update(load_state_dict(path))
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state)
        dtype = torch_dtype or next(iter(state.values())).dtype
        return model.to(device=device, dtype=dtype).eval()

    def load_weights(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a state dict, naming missing/unexpected keys and what the file looks like."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ChorusError(_key_mismatch_message(type(self).__name__, missing, unexpected, state.keys()))
        bad = [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            k = bad[0]
            raise ChorusError(
                f"The weights do not match the {type(self).__name__} config: {len(bad)} tensors have other "
                f"shapes, e.g. {k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}. "
                f"The file looks like {guess_architecture(state.keys())}."
            )
        on_meta = any(p.is_meta for p in self.parameters())
        state = {k: v.to(own[k].dtype) if own[k].dtype.is_floating_point and v.dtype != own[k].dtype else v
                 for k, v in state.items() if k in own}
        self.load_state_dict(state, strict=strict, assign=on_meta)
        for name, buf in self.named_buffers():
            if buf.is_meta:
                raise ChorusError(f"{type(self).__name__}: buffer {name} was not in the weights.")

    def save_pretrained(self, folder, dtype: torch.dtype | None = None) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors` atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                 for k, v in self.state_dict().items()}
        text = json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_safetensors(state, p))
