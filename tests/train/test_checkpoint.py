"""Checkpoints: atomic, last K kept, exact resume (also after a real kill -9), a full disk, loadable folders."""
from __future__ import annotations

import errno
import signal
import subprocess
import time

import pytest
import torch
from unet_helpers import chorus_cmd, chorus_env, ema_weights, max_diff, raw_weights, tiny_config, write_config

from chorus.errors import ChorusError
from chorus.train import checkpoint as ckpt
from chorus.train.unet import UNetTrainer, train_unet

torch.set_num_threads(1)


def test_keeps_the_last_k_and_leaves_no_temporary_folders(sd_folder, tmp_path):
    train_unet(tiny_config(sd_folder, steps=5, save_every=1, keep_last=2), tmp_path, progress=False)
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_resume_continues_exactly(sd_folder, tmp_path):
    cfg = tiny_config(sd_folder, steps=6, save_every=3, text_dropout=0.3, offset_noise=0.05)
    train_unet(cfg, tmp_path / "whole", progress=False)
    half = UNetTrainer(cfg, tmp_path / "split", progress=False)
    half.setup()
    for _ in range(3):
        half.train_step()
    half.save()
    half.logger.close()
    train_unet(cfg, tmp_path / "split", progress=False, resume=True)
    assert max_diff(raw_weights(tmp_path / "whole"), raw_weights(tmp_path / "split")) == 0
    assert max_diff(ema_weights(tmp_path / "whole"), ema_weights(tmp_path / "split")) == 0


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(sd_folder, tmp_path):
    """A real SIGKILL in the middle of a long run, then --resume up to the reference's step count."""
    cfg = tiny_config(sd_folder, steps=400, save_every=4, keep_last=2, lr_schedule="constant", warmup_steps=0,
                      text_dropout=0.2)
    config = write_config(cfg, tmp_path / "cfg.json")
    run = tmp_path / "killed"
    proc = subprocess.Popen(chorus_cmd("train", "--config", config, "--out", run, "--threads", "1", "--no-progress"),
                            env=chorus_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 8 for s, _ in ckpt.checkpoints(run)) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    reached = max(s for s, _ in ckpt.checkpoints(run))
    assert 8 <= reached < 400
    target = reached + 8   # a few steps past the kill; --steps is bookkeeping under a constant LR
    resumed = subprocess.run(chorus_cmd("train", "--out", run, "--resume", "--steps", target, "--threads", "1",
                                        "--no-progress"), env=chorus_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = train_unet(tiny_config(sd_folder, steps=target, save_every=target, lr_schedule="constant",
                                       warmup_steps=0, text_dropout=0.2), tmp_path / "reference", progress=False)
    assert max_diff(raw_weights(run), raw_weights(reference.parent)) <= 1e-6
    assert max_diff(ema_weights(run), ema_weights(reference.parent)) <= 1e-6


def test_full_disk_while_saving_keeps_the_previous_checkpoint(sd_folder, tmp_path, monkeypatch):
    t = UNetTrainer(tiny_config(sd_folder, steps=4, save_every=2), tmp_path, progress=False)
    t.setup()
    t.train_step(), t.train_step()
    first = t.save()
    before = raw_weights(tmp_path)
    t.train_step()
    calls = []

    def full(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(tensors, path)

    write = ckpt.write_tensors
    monkeypatch.setattr(ckpt, "write_tensors", full)
    with pytest.raises(ChorusError, match=r"disk is full.*step-00000002 is intact"):
        t.save()
    t.logger.close()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert max_diff(before, raw_weights(tmp_path)) == 0
    from chorus.pipeline import Pipeline
    Pipeline.from_pretrained(first)   # still a whole, loadable model folder


def test_checkpoint_is_a_diffusers_folder_chorus_and_diffusers_load(sd_folder, tmp_path):
    train_unet(tiny_config(sd_folder, steps=2, save_every=2), tmp_path, progress=False)
    (_, folder), = ckpt.checkpoints(tmp_path)
    from diffusers import StableDiffusionPipeline

    from chorus.pipeline import Pipeline
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    ours = Pipeline.from_pretrained(folder)
    for k, v in ref.unet.state_dict().items():       # diffusers reads the EMA weights Chorus wrote
        assert torch.equal(v, ours.base.unet.state_dict()[k])
    assert ours.base.schedule.prediction_type == "epsilon"


def test_optimizer_state_round_trips(sd_folder):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = ckpt.optimizer_tensors(opt)
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.5)
    ckpt.load_optimizer(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for name, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][name])


def test_resume_from_a_folder_without_checkpoints(sd_folder, tmp_path):
    with pytest.raises(ChorusError, match="holds no checkpoint"):
        train_unet(tiny_config(sd_folder), tmp_path, progress=False, resume=True)
    with pytest.raises(ChorusError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path / "nowhere")


def test_resume_refuses_changed_mathematics(sd_folder, tmp_path):
    train_unet(tiny_config(sd_folder, steps=2), tmp_path, progress=False)
    with pytest.raises(ChorusError, match="lr"):
        train_unet(tiny_config(sd_folder, steps=4, lr=5e-3), tmp_path, progress=False, resume=True)


def test_saved_weights_get_the_usual_permissions(tmp_path):
    """safetensors' writer (and mkstemp) make 0600 files; saved weights follow the umask like any file."""
    import os
    import stat
    from chorus.models.io import atomic_write, save_safetensors
    from chorus.train.checkpoint import write_tensors
    old = os.umask(0o022)
    try:
        write_tensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
        atomic_write(tmp_path / "t.safetensors", lambda p: save_safetensors({"a": torch.ones(1)}, p))
    finally:
        os.umask(old)
    for name in ("w", "s", "t"):
        assert stat.S_IMODE((tmp_path / f"{name}.safetensors").stat().st_mode) == 0o644, name
