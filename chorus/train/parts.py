"""Assembling the model folder a UNet run trains in (OUT/parts): model_index.json, the scheduler, the
frozen components (VAE, text encoders, the conditioner.json of an ensemble) and the initial unet/ —
fresh from a config, the base's own, or the base grown into a larger config (chorus.train.grow)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from chorus.errors import ChorusError
from chorus.schedule import NoiseSchedule
from chorus.train import checkpoint as ckpt
from chorus.train.data import mix_seed

# the scheduler of a fresh model when no base folder gives one: Stable Diffusion's
DEFAULT_SCHEDULE = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
                    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
def _component(cfg, name: str) -> Path | None:
    """Where a frozen component comes from: an explicit folder, else the base pipeline."""
    if name == "vae" and cfg.vae:
        p = Path(cfg.vae)
        return p / "vae" if (p / "vae" / "config.json").is_file() else p
    if name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") and cfg.text_encoder:
        p = Path(cfg.text_encoder) / name
        return p if p.is_dir() else None
    if cfg.base and (Path(cfg.base) / name).is_dir():
        return Path(cfg.base) / name
    return None


def _text_class(folder: Path) -> str:
    data = json.loads((folder / "config.json").read_text())
    return (data.get("architectures") or ["CLIPTextModel"])[0]


def _tokenizer_class(folder: Path) -> str:
    p = folder / "tokenizer_config.json"
    name = json.loads(p.read_text()).get("tokenizer_class", "CLIPTokenizer") if p.is_file() else "CLIPTokenizer"
    return name.replace("Fast", "")


def complete_unet_config(unet: dict, parts: Path, resolution: int, embedders: list[dict] | None = None) -> dict:
    """Fill the UNet fields its neighbours fix: latent channels and size (VAE), context width (text)."""
    vae = json.loads((parts / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    out = dict(unet)
    out.setdefault("in_channels", vae.get("latent_channels", 4))
    out.setdefault("out_channels", vae.get("latent_channels", 4))
    out.setdefault("sample_size", resolution // factor)
    widths, pooled = [], None
    for name in ("text_encoder", "text_encoder_2"):
        if (parts / name / "config.json").is_file():
            tc = json.loads((parts / name / "config.json").read_text())
            widths.append(tc["hidden_size"])
            pooled = tc.get("projection_dim", tc["hidden_size"]) if name == "text_encoder_2" else pooled
    if embedders is not None:  # the conditioner names its embedders: their widths fix the UNet's
        from chorus.conditioning import embedder_widths
        ws = [embedder_widths(e, parts) for e in embedders]
        out.setdefault("cross_attention_dim", sum(w[0] for w in ws))
        if any(w[2] for w in ws):
            out.setdefault("addition_embed_type", "text_time")
            out.setdefault("addition_time_embed_dim", 256)
            out.setdefault("projection_class_embeddings_input_dim",
                           sum(w[1] for w in ws) + sum(w[2] for w in ws) * out["addition_time_embed_dim"])
        return out
    out.setdefault("cross_attention_dim", sum(widths))
    if out.get("addition_embed_type") == "text_time":
        out.setdefault("addition_time_embed_dim", 256)
        n_ids = 6
        out.setdefault("projection_class_embeddings_input_dim",
                       (pooled or widths[-1]) + n_ids * out["addition_time_embed_dim"])
    return out


def prepare_parts(cfg, parts: Path) -> None:
    """OUT/parts: model_index.json, scheduler/, the frozen components and a freshly initialised unet/."""
    from chorus.models import UNet
    tmp = parts.parent / f".tmp-parts-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vae = _component(cfg, "vae")
    te = _component(cfg, "text_encoder")
    if vae is None or te is None or _component(cfg, "tokenizer") is None:
        raise ChorusError("The UNet trainer needs a frozen VAE and text encoder: give `base` (a pipeline folder "
                          "with vae/, text_encoder/, tokenizer/), or `vae` and `text_encoder` folders "
                          "(`chorus train --part vae|text` makes them).")
    ckpt.link_or_copy_tree(vae, tmp / "vae")
    if cfg.normalise_latents:
        normalise_vae_latents(cfg, tmp / "vae")
    index = {}
    if cfg.base and (Path(cfg.base) / "model_index.json").is_file():
        index = json.loads((Path(cfg.base) / "model_index.json").read_text())
    index.setdefault("_class_name", "StableDiffusionPipeline")
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        src = _component(cfg, name)
        if src is not None:
            ckpt.link_or_copy_tree(src, tmp / name)
            index[name] = ["transformers", _text_class(src) if name.startswith("text") else _tokenizer_class(src)]
        elif name in index:
            index[name] = [None, None]
    sched = dict(DEFAULT_SCHEDULE)
    if _component(cfg, "scheduler") is not None:
        sched = json.loads((_component(cfg, "scheduler") / "scheduler_config.json").read_text())
    sched.update(cfg.schedule)
    sched["prediction_type"] = cfg.prediction_type
    NoiseSchedule.from_config(sched)  # refuse what Chorus cannot sample before training on it
    (tmp / "scheduler").mkdir()
    ckpt.write_json(sched, tmp / "scheduler" / "scheduler_config.json")
    index["scheduler"] = ["diffusers", sched.get("_class_name", "EulerDiscreteScheduler")]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    for key, value in (("safety_checker", [None, None]), ("feature_extractor", [None, None]),
                       ("requires_safety_checker", False)):
        if index["_class_name"] == "StableDiffusionPipeline":
            index.setdefault(key, value)
    index["_diffusers_version"] = index.get("_diffusers_version", "0.42.1")
    if cfg.embedders is not None:
        check_embedders(cfg.embedders, tmp, cfg.unet or None)
        ckpt.write_json({"embedders": cfg.embedders}, tmp / "conditioner.json")
    if cfg.unet:
        unet_cfg = complete_unet_config(cfg.unet, tmp, cfg.resolution, cfg.embedders)
    elif _component(cfg, "unet") is not None:
        unet_cfg = json.loads((_component(cfg, "unet") / "config.json").read_text())
    else:
        raise ChorusError("No UNet to train: give a `unet` config (its fields in diffusers' names) or a `base` "
                          "folder with unet/.")
    if cfg.embedders is not None:
        # diffusers' pipelines read one CLIP (SD) or two CLIPs + sizes (SDXL) from model_index.json; this
        # conditioner lives in conditioner.json, which only Chorus reads (`chorus info` says so)
        index["_class_name"] = "ChorusPipeline"
        index["chorus_conditioner"] = "conditioner.json"
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            index.pop(key, None)
    elif unet_cfg.get("addition_embed_type") == "text_time":
        index["_class_name"] = "StableDiffusionXLPipeline"
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            index.pop(key, None)
    if cfg.init_from_base:
        if _component(cfg, "unet") is None:
            raise ChorusError("init_from_base is set but the base folder has no unet/.")
        unet = UNet.from_pretrained(_component(cfg, "unet"), torch_dtype=torch.float32)
        if cfg.unet:  # a config of its own: grow the base into it (exactly the base's function at step 0)
            from chorus.train.grow import grow_unet
            base_state = unet.state_dict()
            with torch.random.fork_rng():
                torch.manual_seed(mix_seed(cfg.seed, 0x1417))
                unet = UNet.from_config(unet_cfg)
            grow_unet(unet, base_state)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(mix_seed(cfg.seed, 0x1417))
            unet = UNet.from_config(unet_cfg)
    ckpt.write_unet(unet, tmp / "unet")
    ckpt.write_json(index, tmp / "model_index.json")
    try:
        check_parts_fit(tmp)
    except ChorusError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if parts.exists():
        shutil.rmtree(parts)
    os.replace(tmp, parts)


def check_parts_fit(folder: Path) -> None:
    """Refuse, before any training, a text encoder (or ensemble) whose widths do not fit the UNet."""
    from chorus.conditioning import check_widths, embedder_entry, read_conditioner_spec
    from chorus.models.io import config_from_dict
    from chorus.models.unet import UNetConfig
    unet_cfg = config_from_dict(UNetConfig, json.loads((folder / "unet" / "config.json").read_text()), "UNet")
    spec = read_conditioner_spec(folder)
    if spec is None:  # the folder's own text encoders, as the pipeline reads them
        index = json.loads((folder / "model_index.json").read_text())
        spec = [embedder_entry(name) for name, enc in (("text", "text_encoder"), ("text_2", "text_encoder_2"))
                if (index.get(enc) or [None])[0] and (folder / enc).is_dir()]
        if unet_cfg.addition_embed_type == "text_time":
            return  # SDXL-style folders: their pooled and time-id layout is checked by the UNet's first call
    check_widths(spec, folder, unet_cfg)


def check_embedders(entries: list[dict], parts: Path, unet: dict | None) -> None:
    """Refuse, before training, a conditioner whose text folders are missing."""
    for e in entries:
        if e["name"] in ("text", "text_2"):
            enc = "text_encoder" if e["name"] == "text" else "text_encoder_2"
            if not (parts / enc / "config.json").is_file():
                raise ChorusError(f"The embedder {e['name']!r} reads {enc}/, which neither the base folder nor the "
                                  "text_encoder folder provides.")
        if e["name"] == "minilm":
            from chorus.conditioning import minilm_folder
            minilm_folder()


def absolute_paths(cfg):
    """The config with its folders made absolute, so a checkpoint resumes from any working directory."""
    changes = {k: str(Path(v).resolve()) for k in ("base", "vae", "text_encoder", "data")
               if isinstance(v := getattr(cfg, k), str)}
    return dataclasses.replace(cfg, **changes)


@torch.no_grad()
def normalise_vae_latents(cfg, folder: Path) -> dict:
    """Centre and whiten the latents per channel, folded into the VAE's weights (`normalise_latents` N):
    the per-channel mean and std of the posterior means of the first N training images, folded by
    `VAE.fold_latent_normalisation`, so the diffusion model sees zero-mean, unit-variance latents and
    the folder is still a plain diffusers AutoencoderKL. Returns the statistics (also saved beside it)."""
    from chorus.models import VAE
    from chorus.train.data import open_source, pixels
    vae = VAE.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vae.config.scaling_factor, vae.config.shift_factor = 1.0, None   # the statistics are of the raw latents
    source = open_source(cfg, 0, 1)
    n = int(cfg.normalise_latents)
    if getattr(source, "size", None) is not None:
        images = [source.get(i % source.size).image for i in range(n)]
    else:
        images = [e.image for e in source.take(n)]
    z = torch.cat([vae.encode(pixels(images[i:i + 64])).mode() for i in range(0, n, 64)])
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
    vae.fold_latent_normalisation(mean, std)
    shutil.rmtree(folder)          # the hard links to the source VAE go; the source is untouched
    vae.save_pretrained(folder)
    stats = {"images": n, "mean": [round(float(v), 5) for v in mean], "std": [round(float(v), 5) for v in std]}
    ckpt.write_json(stats, folder / "latent_normalisation.json")
    return stats


def adopt_base(cfg) -> None:
    """An adapter of a frozen base (a LoRA, a ControlNet) trains against the base's own objective and
    conditioner: its prediction type (ε or v, from the base's scheduler) and its embedders
    (conditioner.json), unless the config names embedders itself. Changes `cfg` in place."""
    base = Path(cfg.base)
    sched = base / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cfg.prediction_type = json.loads(sched.read_text()).get("prediction_type", "epsilon")
    if cfg.embedders is None and (base / "conditioner.json").is_file():
        from chorus.conditioning import read_conditioner_spec
        cfg.embedders = read_conditioner_spec(base)
