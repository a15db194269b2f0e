"""Chorus's UNet against diffusers' UNet2DConditionModel on the same random weights, plus hooks and errors."""
from __future__ import annotations

import json

import pytest
import torch

from chorus.errors import ChorusError
from chorus.models import UNet

diffusers = pytest.importorskip("diffusers")

SD1 = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD1_SMALL = dict(block_out_channels=(4, 8), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
                 norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(SD1, use_linear_projection=True, attention_head_dim=(2, 4), norm_num_groups=8)
SDXL = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=(2, 4),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80)  # 6 time ids × 8 + 32 pooled
REFINER = dict(block_out_channels=(16, 32, 32, 64), layers_per_block=1, cross_attention_dim=32,
               attention_head_dim=(2, 4, 4, 8), norm_num_groups=8,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=8, projection_class_embeddings_input_dim=72)  # 5 time ids × 8 + 32
CONFIGS = {"sd1": SD1, "sd1_small": SD1_SMALL, "sd2": SD2, "sdxl": SDXL, "refiner": REFINER}
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning threads run ~30× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pair(config: dict, seed: int = 0):
    """diffusers' UNet with seeded random weights, and a Chorus UNet holding the same weights."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet.from_config(config).eval()
    ours.load_weights(ref.state_dict())
    return ref, ours


def inputs(config: dict, batch: int = 2, size: tuple[int, int] = (8, 8), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    args = {"sample": torch.randn(batch, 4, *size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}
    if config.get("addition_embed_type") == "text_time":
        n_ids = (config["projection_class_embeddings_input_dim"] - 32) // config["addition_time_embed_dim"]
        ids = torch.tensor([1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:n_ids - 1] + [6.0]).repeat(batch, 1)
        args["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": ids}
    return args


def run_ref(ref, timestep, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return ref(timestep=timestep, return_dict=False, **args)[0]


def run_ours(ours, timestep, args: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return ours(timestep=timestep, **args, **extra)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    ref, ours = pair(config)
    assert set(ours.state_dict()) == set(ref.state_dict())
    args = inputs(config)
    for t in (999, torch.tensor(17), torch.tensor([3.5, 640.0])):
        expected = run_ref(ref, t, args)
        got = run_ours(ours, t, args)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < TOL, (name, t)


def test_weights_matter():
    """The parity test can fail: one perturbed weight changes the output beyond the tolerance."""
    ref, ours = pair(SD1)
    args = inputs(SD1)
    with torch.no_grad():
        ours.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v.weight.add_(0.05)
    assert (run_ours(ours, 10, args) - run_ref(ref, 10, args)).abs().max().item() > TOL


def test_odd_sizes_center_input_and_text_mask():
    config = dict(SD1, center_input_sample=True)
    ref, ours = pair(config)
    args = inputs(config, batch=2, size=(13, 11))
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    expected = run_ref(ref, 50, dict(args, encoder_attention_mask=mask))
    got = run_ours(ours, 50, args, encoder_attention_mask=mask)
    assert got.shape == (2, 4, 13, 11)
    assert (got - expected).abs().max().item() < TOL
    assert (got - run_ours(ours, 50, args)).abs().max().item() > TOL  # the mask does something


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_folders_both_ways(name, tmp_path):
    config = CONFIGS[name]
    ref, _ = pair(config, seed=3)
    args = inputs(config)
    expected = run_ref(ref, 100, args)
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = UNet.from_pretrained(tmp_path / "from_diffusers")
    assert (run_ours(ours, 100, args) - expected).abs().max().item() < TOL
    ours.save_pretrained(tmp_path / "from_chorus")
    config_json = json.loads((tmp_path / "from_chorus" / "config.json").read_text())
    assert config_json["_class_name"] == "UNet2DConditionModel"
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "from_chorus").eval()
    assert (run_ref(back, 100, args) - expected).abs().max().item() < TOL


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    unet = UNet.from_config(SD1_SMALL)
    args = inputs(SD1_SMALL, batch=1, size=(8, 8))
    grads = []
    for enabled in (False, True):
        unet.zero_grad()
        unet.enable_gradient_checkpointing(enabled)
        unet(timestep=5, **args).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_cpu_bf16_autocast(monkeypatch):
    """Where the CPU lacks bf16 kernels, autocast runs the UNet in fp32; otherwise (or when told) in bf16."""
    from chorus.models import layers

    ref, ours = pair(SD1_SMALL)
    args = inputs(SD1_SMALL)
    fp32 = run_ours(ours, 10, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run_ours(ours, 10, args)
        monkeypatch.setattr(layers, "CPU_AUTOCAST_FALLBACK", False)
        bf16, ref_bf16 = run_ours(ours, 10, args), run_ref(ref, 10, args)
        masked = run_ours(ours, 10, args, encoder_attention_mask=torch.ones(2, 7))  # fp32 mask, bf16 queries
        monkeypatch.setattr(layers, "CPU_AUTOCAST_FALLBACK", True)
        bf16_inputs = run_ours(ours, 10, {k: v.bfloat16() for k, v in args.items()})  # e.g. a text encoder's output
    if not layers.cpu_has_bf16_kernels():
        assert torch.equal(auto, fp32)
    assert (bf16_inputs.float() - fp32).abs().max().item() < 0.1
    assert bf16.dtype == ref_bf16.dtype == torch.bfloat16
    assert (bf16.float() - ref_bf16.float()).abs().max().item() < 0.05
    assert (bf16.float() - fp32).abs().max().item() < 0.1
    assert (masked.float() - bf16.float()).abs().max().item() < 0.05


def test_bf16_training_runs_cpu_attention_in_fp32(monkeypatch):
    """Under CPU bf16 autocast, attention that is differentiated goes through fp32 SDPA (the bf16 kernel's
    backward is many times slower at these head sizes), inference stays bf16; the bf16 gradients stay close
    to the fp32 ones."""
    import torch.nn.functional as F

    from chorus.models import attention, layers
    monkeypatch.setattr(layers, "CPU_AUTOCAST_FALLBACK", False)   # bf16 even where the CPU lacks its kernels
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    _, ours = pair(SD1_SMALL)
    args = inputs(SD1_SMALL)

    def grads(model, autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(sample=args["sample"], timestep=10, encoder_hidden_states=args["encoder_hidden_states"])
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g32 = grads(ours, False)
    seen.clear()
    g16 = grads(ours, True)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run_ours(ours, 10, args)
    assert set(seen) == {torch.bfloat16}
    cos = F.cosine_similarity(g16, g32, dim=0).item()
    assert cos > 0.999, cos
    assert (g16 - g32).norm() / g32.norm() < 0.03


# --- hooks ----------------------------------------------------------------------------------------
def test_identity_hook_and_logits_path_match_sdpa():
    _, ours = pair(SDXL)
    args = inputs(SDXL)
    plain = run_ours(ours, 10, args)
    seen = {}

    def identity(name, kind, tensor):
        seen.setdefault(kind, []).append((name, tuple(tensor.shape)))
        return tensor  # returning the same logits forces the explicit softmax path, which must equal SDPA

    with ours.hooks(identity):
        hooked = run_ours(ours, 10, args)
    assert (hooked - plain).abs().max().item() < 1e-5
    assert set(seen) == {"query", "key", "value", "logits", "resnet", "resnet_branch"}
    name, shape = next(x for x in seen["logits"] if x[0].endswith("attn2"))
    assert name == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert shape == (2, 4, 4 * 4, 7)  # (B, heads, H·W, text tokens): 8×8 latent, one level down
    q_name, q_shape = seen["query"][0]
    assert q_shape == (2, 4, 16, 16)  # (B, heads, L, d): 64 channels / 4 heads
    assert ("up_blocks.0.attentions.2.transformer_blocks.1.attn1", (2, 4, 16, 16)) in seen["logits"]
    with torch.no_grad():
        after = ours(timestep=10, **args)
    assert torch.equal(after, plain)  # hooks are gone after the block


def test_hooks_replace_tensors_and_filter_by_name():
    _, ours = pair(SD1)
    args = inputs(SD1)
    plain = run_ours(ours, 10, args)
    target = "up_blocks.1.resnets.0"
    zero_resnet = lambda name, kind, t: torch.zeros_like(t) if (name, kind) == (target, "resnet") else None  # noqa
    with ours.hooks(zero_resnet):
        assert (run_ours(ours, 10, args) - plain).abs().max().item() > 1e-3
    calls = []
    with ours.hooks(lambda name, kind, t: calls.append(name), names=lambda n: n.startswith("mid_block")):
        same = run_ours(ours, 10, args)
    assert calls and all(n.startswith("mid_block") for n in calls)
    assert torch.allclose(same, plain, atol=1e-5)

    def uniform_cross_attention(name, kind, t):  # paint-with-words style: flatten cross-attention scores
        return torch.zeros_like(t) if kind == "logits" and name.endswith("attn2") else None
    with ours.hooks(uniform_cross_attention):
        assert (run_ours(ours, 10, args) - plain).abs().max().item() > 1e-4


# --- errors ---------------------------------------------------------------------------------------
def test_missing_key_names_key_and_architecture():
    ref, _ = pair(SD1)
    state = ref.state_dict()
    del state["conv_in.weight"]
    with pytest.raises(ChorusError, match=r"conv_in\.weight.*UNet"):
        UNet.from_config(SD1).load_weights(state)


def test_sdxl_weights_into_sd_config():
    torch.manual_seed(0)
    xl_state = diffusers.UNet2DConditionModel(**SDXL).state_dict()
    with pytest.raises(ChorusError, match=r"add_embedding.*SDXL"):
        UNet.from_config(SD1).load_weights(xl_state)


def test_config_errors():
    with pytest.raises(ChorusError, match=r"not_a_field.*Valid fields are:.*attention_head_dim"):
        UNet.from_config(dict(SD1, not_a_field=1))
    with pytest.raises(ChorusError, match=r"class_embed_type='timestep'"):
        UNet.from_config(dict(SD1, class_embed_type="timestep"))
    with pytest.raises(ChorusError, match=r"time_embedding_type='fourier'"):
        UNet.from_config(dict(SD1, time_embedding_type="fourier"))
    with pytest.raises(ChorusError, match=r"SimpleCrossAttnDownBlock2D"):
        UNet.from_config(dict(SD1, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")))


def test_call_errors():
    _, ours = pair(SDXL)
    args = inputs(SDXL)
    with pytest.raises(ChorusError, match="added_cond_kwargs"):
        ours(args["sample"], 1, args["encoder_hidden_states"])
    bad = dict(args, added_cond_kwargs={**args["added_cond_kwargs"], "time_ids": torch.zeros(2, 5)})
    with pytest.raises(ChorusError, match="projection_class_embeddings_input_dim"):
        ours(timestep=1, **bad)
    with pytest.raises(ChorusError, match="skip connections"):
        ours(timestep=1, **args, down_block_additional_residuals=[torch.zeros(1)])
    with pytest.raises(ChorusError, match="class_labels"):
        ours(timestep=1, **args, class_labels=torch.zeros(2))
