"""`chorus train --part lora`: a few steps on the tiny SD folder; the kohya file it writes loads back in
Chorus (and in diffusers + peft) and changes the output; only the LoRA trains; --resume is exact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chorus.cli import main
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline

torch.set_num_threads(1)
KW = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=4.0, height=32, width=32)


def lora_config(base, path, **changes):
    fields = dict(base=str(base), resolution=32, epoch_size=64, batch_size=4, steps=3, save_every=3, keep_last=2,
                  log_every=1, lr=2e-2, rank=4, sample_prompts=[], mixed_precision="no", seed=1)
    fields.update(changes)
    path.write_text(json.dumps(fields))
    return path


def train(*args):
    return main(["train", "--no-progress", "--threads", "1", "--part", "lora", *map(str, args)])


def latents(pipe, **kw):
    return pipe(sampler="euler", seed=0, output_type="latent", progress=False, **{**KW, **kw}).latents


@pytest.fixture(scope="module")
def run(sd_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    out = tmp / "run"
    assert train("--config", lora_config(sd_folder, tmp / "c.json"), "--out", out) == 0
    return out


def test_writes_a_kohya_lora_of_the_attention_projections(run, sd_folder):
    path = run / "lora.safetensors"
    tensors = load_file(str(path))
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(downs) == 4 * 2 * 4   # 4 transformer blocks × (attn1, attn2) × (to_q, to_k, to_v, to_out.0)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert all(float(tensors[k.replace(".lora_down.weight", ".alpha")]) == 4.0 for k in downs)
    assert all(k.startswith("lora_unet_") for k in tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert any(tensors[k].abs().max() > 0 for k in tensors if k.endswith(".lora_up.weight"))   # it trained
    log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]


def test_only_the_lora_trains_and_the_checkpoint_is_the_merged_model(run, sd_folder):
    from chorus.models import UNet
    base = UNet.from_pretrained(sd_folder / "unet").state_dict()
    ckpt = run / "checkpoints" / "step-00000003"
    merged = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()
    targets = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(targets) for k in changed)
    # the checkpoint folder is a model: generate from it, and from the base + the exported LoRA
    pipe = Pipeline.from_pretrained(sd_folder)
    plain = latents(pipe)
    pipe.load_lora(run / "lora.safetensors")
    with_lora = latents(pipe)
    assert (with_lora - plain).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, latents(Pipeline.from_pretrained(ckpt)), atol=1e-4, rtol=1e-4)
    assert (ckpt / "lora.safetensors").is_file()


def test_exported_lora_loads_in_diffusers(run, sd_folder):
    pytest.importorskip("peft")
    import diffusers
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(run), weight_name="lora.safetensors")
    theirs = ref(generator=torch.Generator().manual_seed(0), output_type="latent", **KW).images
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.load_lora(run / "lora.safetensors")
    torch.testing.assert_close(latents(pipe), theirs, atol=1e-4, rtol=1e-4)


def test_resume_is_exact(run, sd_folder, tmp_path):
    out = tmp_path / "resumed"
    cfg = lora_config(sd_folder, tmp_path / "c.json", save_every=2)
    assert train("--config", cfg, "--out", out, "--steps", "2") == 0
    assert train("--resume", "--out", out, "--steps", "3") == 0
    a, b = load_file(str(run / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_settings_are_clear(sd_folder, tmp_path, capsys):
    assert train("--out", tmp_path / "x") == 2
    assert "needs a base model" in capsys.readouterr().err
    assert train("--base", sd_folder, "--rank", "0", "--out", tmp_path / "x") == 2
    assert "rank must be at least 1" in capsys.readouterr().err
    assert train("--preset", "tiny", "--base", sd_folder) == 2
    assert "--base model" in capsys.readouterr().err
    assert train("--base", sd_folder, "--rank", "8", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rank"] == 8 and printed["lr"] == 1e-4 and printed["ema_decay"] == 0.0
    with pytest.raises(ChorusError, match="No UNet layer matches"):
        from chorus.formats.lora import inject_lora
        from chorus.models import UNet
        inject_lora(UNet.from_pretrained(sd_folder / "unet"), targets=("nothing",))
