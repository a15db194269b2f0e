"""Full-size public configs built on the meta device: keys, shapes and parameter counts equal diffusers'."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from chorus.models import ControlNet, UNet, UNetConfig
from chorus.models.controlnet import ControlNetConfig

diffusers = pytest.importorskip("diffusers")

# unet/config.json of runwayml/stable-diffusion-v1-5
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_BASE_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# unet/config.json of stabilityai/stable-diffusion-xl-refiner-1.0
SDXL_REFINER_UNET = {
    **SDXL_BASE_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# config.json of lllyasviel/sd-controlnet-canny (and the other SD 1.5 ControlNets of that family)
SD15_CONTROLNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}

CASES = {
    "sd15_unet": (UNet, "UNet2DConditionModel", SD15_UNET, 859_520_964),
    "sdxl_base_unet": (UNet, "UNet2DConditionModel", SDXL_BASE_UNET, 2_567_463_684),
    "sdxl_refiner_unet": (UNet, "UNet2DConditionModel", SDXL_REFINER_UNET, 2_259_526_660),
    "sd15_controlnet": (ControlNet, "ControlNetModel", SD15_CONTROLNET, 361_279_120),
}


@pytest.mark.parametrize("name", list(CASES))
def test_full_size_keys_shapes_and_counts(name):
    cls, ref_name, config, expected = CASES[name]
    with torch.device("meta"):
        ours = cls.from_config(config)
        ref = getattr(diffusers, ref_name)(**config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(shapes) == set(ref_shapes), (set(shapes) ^ set(ref_shapes))
    assert shapes == ref_shapes
    assert ours.num_parameters() == expected == sum(p.numel() for p in ref.parameters())


def test_controlnet_from_full_size_unet_on_meta():
    with torch.device("meta"):
        controlnet = ControlNet.from_unet(UNet.from_config(SD15_UNET))
    assert controlnet.num_parameters() == 361_279_120


@pytest.mark.parametrize("config_cls, ref_name", [(UNetConfig, "UNet2DConditionModel"),
                                                  (ControlNetConfig, "ControlNetModel")])
def test_config_fields_are_diffusers_fields_with_their_defaults(config_cls, ref_name):
    params = dict(inspect.signature(getattr(diffusers, ref_name).__init__).parameters)
    params.pop("self")
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    assert set(fields) == set(params)
    for name, default in fields.items():
        ref_default = params[name].default
        ref_default = tuple(ref_default) if isinstance(ref_default, list) else ref_default
        assert default == ref_default, name
