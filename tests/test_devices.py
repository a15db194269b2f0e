"""Devices and precision: Pipeline.to, --device / --dtype, and an fp16 VAE that does not decode to NaN."""
import pytest
import torch

from chorus.cli import main
from chorus.devices import resolve_device, resolve_dtype
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline

KW = dict(num_inference_steps=4, guidance_scale=4.0, height=32, width=32, progress=False, sampler="euler")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_bf16_on_the_cpu_runs_and_is_close_to_fp32(sd_folder):
    ref = Pipeline.from_pretrained(sd_folder)("a red circle", seed=0, output_type="pt", **KW)
    pipe = Pipeline.from_pretrained(sd_folder).to(dtype=torch.bfloat16)
    stage = pipe.base
    assert stage.unet.dtype == pipe.vae.dtype == torch.bfloat16 == pipe.dtype
    assert all(p.dtype == torch.bfloat16 for p in stage.conditioner.parameters())
    out = pipe("a red circle", seed=0, output_type="pt", **KW)
    assert torch.isfinite(out.latents).all() and out.images.dtype == torch.float32
    # measured on the tiny random folder: latents max |Δ| 0.16 of a max |z| 18 (0.9 %), pixels max |Δ| 0.018
    latent_err = (out.latents - ref.latents).abs().max() / ref.latents.abs().max()
    pixel_err = (out.images - ref.images).abs().max()
    assert latent_err < 0.03 and pixel_err < 0.05, (latent_err, pixel_err)


def test_fp16_vae_decode_of_a_large_latent_is_finite(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder).to(dtype=torch.float16)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 1e4
    with torch.no_grad():   # the plain fp16 decode overflows: this latent is a real test of the upcast
        assert not torch.isfinite(pipe.vae.decode(z.half() / pipe.vae.config.scaling_factor)).all()
    assert pipe.vae.config.force_upcast
    images = pipe.decode(z)
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert pipe.vae.dtype == torch.float16   # upcast for the decode only, as diffusers' upcast_vae
    # without force_upcast the fp16 decode runs, sees NaN/inf, and is done again in fp32 (A1111's rule)
    pipe.vae.config.force_upcast = False
    notes = []
    images = pipe.decode(z, notes)
    assert torch.isfinite(images).all() and any("decoded again in float32" in n for n in notes)
    assert pipe.vae.dtype == torch.float16


def test_names_of_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(ChorusError, match="fp32"):
        resolve_dtype("fp8")
    with pytest.raises(ChorusError, match="cpu"):
        resolve_device("tpu")


@NO_CUDA
def test_cuda_on_a_cpu_machine_is_a_clear_error(sd_folder):
    with pytest.raises(ChorusError, match="cuda is not available"):
        Pipeline.from_pretrained(sd_folder).to("cuda")


@NO_CUDA
@pytest.mark.parametrize("command", ["generate", "eval", "train", "train-mps"])
def test_device_flag_exits_2_with_one_paragraph(sd_folder, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"generate": ["generate", "x", "--model", str(sd_folder), "--out", str(out), "--device", "cuda"],
            "eval": ["eval", "--model", str(sd_folder), "--device", "cuda", "--limit", "1"],
            "train": ["train", "--preset", "tiny", "--out", str(out), "--device", "cuda"],
            "train-mps": ["train", "--preset", "tiny", "--out", str(out), "--device", "mps"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "\n\n" not in err.strip()
    assert ("cpu" in err) and ("cuda" in err or "mps" in err)
    assert not out.exists()


def test_generate_dtype_flag_records_it(sd_folder, tmp_path):
    import json

    from PIL import Image
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", str(sd_folder), "--steps", "2", "--n", "1", "--size", "32",
                 "--dtype", "bf16", "--device", "cpu", "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    with Image.open(png) as im:
        s = json.loads(im.text["chorus"])
    assert (s["dtype"], s["device"]) == ("bf16", "cpu")


def test_train_device_reaches_the_distributed_setup():
    from chorus.train import distributed as D
    from chorus.train.cli import train_device
    original = D.setup
    with train_device("cpu"):
        assert D.setup is not original and D.setup().device == torch.device("cpu")
    assert D.setup is original


def test_training_precision_auto_follows_the_hardware(monkeypatch):
    """--precision auto: bf16 autocast exactly where the CPU has native bf16 kernels; explicit choices kept."""
    from chorus.devices import training_precision
    from chorus.models import layers
    cpu = torch.device("cpu")
    for has in (True, False):
        monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda has=has: has)
        mode, why = training_precision("auto", cpu)
        assert mode == ("bf16" if has else "no") and "auto" in why
    assert training_precision("no", cpu)[0] == "no" and training_precision("bf16", cpu)[0] == "bf16"


def test_compiled_pipeline_matches_eager(sd_folder):
    """Pipeline.compile (torch.compile of the UNet, in place): the same images as eager, within parity."""
    import shutil
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch inductor needs a C++ compiler on the CPU; none is installed")
    eager = Pipeline.from_pretrained(sd_folder)
    compiled = Pipeline.from_pretrained(sd_folder).compile()
    kw = dict(KW, seed=3, output_type="pt")
    a = eager(["a red circle", "two blue squares"], **kw).images
    b = compiled(["a red circle", "two blue squares"], **kw).images
    assert compiled.base.unet._compiled_call_impl is not None      # really compiled
    assert (a - b).abs().max().item() < 1e-4
