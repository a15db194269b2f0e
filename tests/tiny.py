"""Tiny random diffusers-format pipelines, built offline, for parity tests against diffusers.

The tokenizer is a character-level CLIP BPE tokenizer (every byte symbol, no merges) written
here, so nothing is fetched from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(s, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return tok


def clip_text_model(vocab_size: int, hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def scheduler_config(prediction_type: str = "epsilon", spacing: str = "leading") -> dict:
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
            "timestep_spacing": spacing, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1, sample_size=32).eval()


def make_sd_folder(folder: Path, prediction_type: str = "epsilon", linear: bool = False) -> Path:
    """A tiny SD 1.x (or 2.x with linear projections) pipeline saved by diffusers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    tok = write_clip_tokenizer(folder.parent / f"{folder.name}_tokenizer_src")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
                                in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=4,
                                use_linear_projection=linear,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_model(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler.from_config(scheduler_config(prediction_type)),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def make_sdxl_folder(folder: Path, refiner: bool = False) -> Path:
    """A tiny SDXL base (two text encoders, size/crop time ids) or refiner pipeline saved by diffusers."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    tok = write_clip_tokenizer(folder.parent / f"{folder.name}_tokenizer_src")
    te1 = clip_text_model(len(tok), hidden=32, seed=2)
    te2 = clip_text_model(len(tok), hidden=32, projection=32, seed=3)
    torch.manual_seed(4)
    n_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
                                in_channels=4, out_channels=4, cross_attention_dim=32 if refiner else 64,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=n_ids * 8 + 32,
                                transformer_layers_per_block=(1, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    sched = EulerDiscreteScheduler.from_config(scheduler_config(spacing="leading"))
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=tok, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(str(folder))
    return folder


def make_controlnet_folder(folder: Path, sd_folder: Path, seed: int = 5) -> Path:
    """A ControlNet copied from the tiny SD UNet, its zero convs re-initialised so it is not a no-op."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(sd_folder / "unet"))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.1)
    cn.save_pretrained(str(folder))
    return folder
