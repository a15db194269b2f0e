"""Checkpoints you can trust: atomic, the last K kept, and an exact resume.

A checkpoint is a diffusers-format pipeline folder, so `chorus generate --model CKPT` (and
diffusers' `StableDiffusionPipeline.from_pretrained(CKPT)`) load it as it is::

    OUT/checkpoints/step-00001000/
        model_index.json, vae/, text_encoder/, tokenizer/, scheduler/   hard links to OUT/parts/ (copies
                                                                          where links are impossible)
        unet/                 the EMA weights (the model to sample from), float32
        trainer/unet.safetensors       the raw (optimised) weights, when EMA is on
        trainer/optimizer.safetensors  AdamW moments and step counts; its hyper-parameters in state.json
        trainer/rng.safetensors        every rank's torch RNG state (CPU, and CUDA when used)
        trainer/state.json             step, data position, config; written last

It is written into a hidden temporary folder `checkpoints/.tmp-step-…` and renamed into place only
when complete, so a crash (even `kill -9`) or a full disk mid-save leaves the previous checkpoints as
they were; stray temporary folders are removed on the next save. Only after a successful save are
checkpoints beyond the last K deleted (renamed away first, then removed).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from chorus.errors import ChorusError
from chorus.models.io import save_safetensors

STEP_DIR = re.compile(r"^step-(\d{8})$")
PART_NAMES = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
FORMAT_VERSION = 1


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The one place tensors reach the disk (safetensors); tests replace it to simulate a full disk."""
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` by renames; an existing `final` is swapped out, then removed."""
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(data: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- finding checkpoints ---------------------------------------------------------------------------

def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `folder` (an output folder or its checkpoints/), oldest first."""
    folder = Path(folder)
    root = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(path: Path) -> Path:
    """The checkpoint to resume from: `path` itself if it is one, else the newest under it."""
    path = Path(path)
    if (path / "trainer" / "state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        where = "does not exist" if not path.exists() else "holds no checkpoint (no checkpoints/step-*/trainer/state.json)"
        raise ChorusError(f"Cannot resume: {path} {where}. Resume from the --out folder of an earlier "
                          "`chorus train` run, or drop --resume to start afresh.")
    return found[-1][1]


# --- writing ---------------------------------------------------------------------------------------

def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Mirror a folder with hard links (no extra space, unaffected when the source is replaced)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        q = dst / p.name
        if p.is_dir():
            link_or_copy_tree(p, q)
            continue
        try:
            os.link(p, q)
        except OSError:
            shutil.copy2(p, q)


def link_parts(parts: Path, folder: Path) -> None:
    """model_index.json and the frozen components from the parts folder."""
    shutil.copy2(parts / "model_index.json", folder / "model_index.json")
    if (parts / "conditioner.json").is_file():   # a conditioner only Chorus expresses (chorus.conditioning)
        shutil.copy2(parts / "conditioner.json", folder / "conditioner.json")
    for name in PART_NAMES:
        if (parts / name).is_dir():
            link_or_copy_tree(parts / name, folder / name)


def write_unet(unet, folder: Path, dtype: torch.dtype | None = None) -> None:
    """A diffusers UNet component folder: config.json + diffusion_pytorch_model.safetensors."""
    from chorus.models.io import CONFIG_NAME, WEIGHTS_NAME
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in unet.state_dict().items()}
    write_tensors(state, folder / WEIGHTS_NAME)
    write_json(unet.config_dict(), folder / CONFIG_NAME)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state as flat tensors ("state.<param>.<name>") and its JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, keyed "rank<r>.<device>"."""
    return {f"rank{r}.{k}": v for r, s in enumerate(states) for k, v in s.items()}


def local_rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> bool:
    """Set this rank's RNG states from a checkpoint; False when the checkpoint has none for this rank."""
    cpu = tensors.get(f"rank{rank}.cpu")
    if cpu is None:
        return False
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rank{rank}.cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    return True


def save_checkpoint(out: Path, step: int, parts: Path, ema_unet, raw_unet, optimizer, state: dict,
                    rng_states: list[dict[str, torch.Tensor]], keep_last: int, component: str = "unet") -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then keep only the last `keep_last`. The trained model goes
    in the folder `component` (unet/, or controlnet/ for a ControlNet run)."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        _remove_stale(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        link_parts(parts, tmp)
        if component != "unet" and (parts / "unet").is_dir():   # an adapter's checkpoint: with its frozen base UNet
            link_or_copy_tree(parts / "unet", tmp / "unet")
        write_unet(ema_unet if ema_unet is not None else raw_unet, tmp / component)
        trainer = tmp / "trainer"
        trainer.mkdir()
        if ema_unet is not None:
            write_tensors(raw_unet.state_dict(), trainer / f"{component}.safetensors")
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        write_tensors(opt_tensors, trainer / "optimizer.safetensors")
        write_tensors(rng_tensors(rng_states), trainer / "rng.safetensors")
        write_json({"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta, "ema": ema_unet is not None,
                    "component": component, **state}, trainer / "state.json")
        replace_folder(tmp, final)  # the same step saved again (e.g. after a resume) is swapped out
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(out)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ChorusError(f"Could not write the checkpoint of step {step} in {root}: {reason}. Nothing partial was "
                          f"left behind and {kept}; free some space (or choose another --out) and continue with "
                          "--resume.") from None
    prune(out, keep_last)
    return final


def _remove_stale(root: Path) -> None:
    """Temporary and trash folders of earlier, interrupted saves."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-step-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (renamed away first, so none is left half-deleted)."""
    found = checkpoints(out)
    for _, path in found[:max(0, len(found) - keep_last)]:
        trash = path.parent / f".trash-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------------

def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "trainer" / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChorusError(f"The checkpoint {ckpt} is unreadable ({e}); resume from an earlier one.") from None


def load_checkpoint(ckpt: Path, raw_unet, ema_unet, optimizer, rank: int = 0) -> dict:
    """Restore weights, EMA, optimiser and this rank's RNG from a checkpoint; return its state.json."""
    from chorus.models.io import WEIGHTS_NAME
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    component = state.get("component", "unet")
    trained = load_file(str(ckpt / component / WEIGHTS_NAME))
    if state.get("ema"):
        raw = load_file(str(ckpt / "trainer" / f"{component}.safetensors"))
        if ema_unet is None:
            raise ChorusError(f"The checkpoint {ckpt} was trained with EMA but this run has ema_decay=0.")
        ema_unet.load_weights(trained)
    else:
        raw = trained
    raw_unet.load_weights(raw)
    load_optimizer(optimizer, load_file(str(ckpt / "trainer" / "optimizer.safetensors")), state["optimizer"])
    state["rng_restored"] = restore_rng(load_file(str(ckpt / "trainer" / "rng.safetensors")), rank)
    return state


def export_model(parts: Path, unet, out: Path, dtype: torch.dtype | None = None) -> Path:
    """The final model folder (no trainer state), atomically: `chorus generate --model OUT` loads it.

    With a half `dtype` the VAE and text encoders are converted too, so the folder stays small.
    """
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if dtype is None or dtype == torch.float32:
            link_parts(parts, tmp)
        else:
            _convert_parts(parts, tmp, dtype)
        write_unet(unet, tmp / "unet", dtype)
        replace_folder(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ChorusError(f"Could not write the model folder {out}: {e.strerror or e}. The checkpoints are "
                          "intact; export again after freeing space.") from None
    return out


def _convert_parts(parts: Path, folder: Path, dtype: torch.dtype) -> None:
    """Copy the frozen parts, casting their floating-point weights to `dtype`."""
    link_parts(parts, folder)
    for name in PART_NAMES:
        for f in sorted((folder / name).glob("*.safetensors")) if (folder / name).is_dir() else []:
            tensors = load_file(str(f))
            f.unlink()  # a hard link: unlink before writing, never write through it
            write_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, f)
        cfg = folder / name / "config.json"
        if cfg.is_file() and name.startswith("text_encoder"):
            data = json.loads(cfg.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in data:
                    data[key] = str(dtype).replace("torch.", "")
            cfg.unlink()
            write_json(data, cfg)
