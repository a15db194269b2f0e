"""Scale-out: 2 real processes (torchrun, gloo) train like 1 process on the same global batch; shards per rank."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from unet_helpers import chorus_env, ema_weights, max_diff, raw_weights, tiny_config, write_config

from chorus.errors import ChorusError
from chorus.train import distributed as D
from chorus.train.unet import train_unet

torch.set_num_threads(1)


def test_two_processes_match_one_on_the_same_global_batch(sd_folder, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on this CPU) vs 1 process: same parameters after 3 steps.

    Tolerance: in fp32 the two runs differ only in the order gradients are summed (each rank averages
    its 4 items, then the all-reduce averages the ranks, vs one mean over 8), ~1e-7 relative per
    step; AdamW divides by √v, so a parameter whose gradient is near 0 can move by up to ~lr·1e-2 more.
    With lr 1e-3 over 3 steps, 1e-5 absolute separates that from any real difference: 2 independent
    copies (no all-reduce) differ by ~lr per step on nearly every parameter (checked below).
    """
    cfg = tiny_config(sd_folder, steps=3, save_every=3, batch_size=8, text_dropout=0.25, offset_noise=0.05)
    config = write_config(cfg, tmp_path / "cfg.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chorus", "train", "--config", str(config), "--out", str(tmp_path / "ddp"), "--threads", "1",
           "--no-progress"]
    run = subprocess.run(cmd, env=chorus_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "ddp" / "logs" / "train.jsonl").read_text()
    assert '"world_size": 2' in log
    single = train_unet(cfg, tmp_path / "one", progress=False)
    diff = max_diff(raw_weights(tmp_path / "ddp"), raw_weights(single.parent))
    print(f"DDP vs single max |Δθ| = {diff:.3g}")
    assert diff < 1e-5
    assert max_diff(ema_weights(tmp_path / "ddp"), ema_weights(single.parent)) < 1e-5
    # the yardstick: half the batch (what an un-synchronised rank would see) lands far away
    half = train_unet(tiny_config(sd_folder, steps=3, save_every=3, batch_size=4, text_dropout=0.25,
                                  offset_noise=0.05), tmp_path / "half", progress=False)
    assert max_diff(raw_weights(half.parent), raw_weights(single.parent)) > 100 * max(diff, 1e-7)


def test_environment_of_the_launchers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.env_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ChorusError, match="outside"):
        D.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ChorusError, match="whole number"):
        D.env_world()


def test_single_process_needs_no_process_group():
    d = D.Dist()
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model, d) is model and not d.enabled
    assert D.all_mean(torch.tensor(3.0), d).item() == 3.0 and D.all_any(True, d)


def test_webdataset_shards_stream_one_shard_set_per_rank(tmp_path):
    from chorus.train.data import StreamSource
    from chorus.world.formats import write_samples
    from chorus.world.render import make_sample
    write_samples(((f"{i:04d}", make_sample(0, i, size=32)) for i in range(12)), tmp_path / "shards", fmt="wds",
                  samples_per_shard=3)
    keys = []
    for rank in range(2):
        src = StreamSource(tmp_path / "shards", 32, rank, 2, seed=0, buffer=4)
        keys.append({e.key for e in src.take(6)})
        assert all(len(e.key) == 4 for e in src.take(6))   # the next epoch goes on
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 12
    # rank 0 reads shards 0 and 2: keys 0000-0002 and 0006-0008
    assert keys[0] == {f"{i:04d}" for i in (0, 1, 2, 6, 7, 8)}
    a = StreamSource(tmp_path / "shards", 32, 0, 2, seed=0, buffer=4)
    b = StreamSource(tmp_path / "shards", 32, 0, 2, seed=0, buffer=4)
    first = [e.key for e in a.take(10)]
    b.seek(4)                                                # resume: the same sequence continues
    assert [e.key for e in b.take(6)] == first[4:]


def test_training_on_shards_runs(sd_folder, tmp_path):
    from chorus.world.formats import write_samples
    from chorus.world.render import make_sample
    write_samples(((f"{i:04d}", make_sample(1, i, size=48)) for i in range(10)), tmp_path / "shards", fmt="wds",
                  samples_per_shard=5)
    model = train_unet(tiny_config(sd_folder, data=str(tmp_path / "shards"), steps=2), tmp_path / "run",
                       progress=False)
    assert (model / "unet" / "config.json").is_file()


def test_a_whole_recipe_trains_under_torchrun_on_a_fresh_out(tmp_path):
    """`torchrun … chorus train --config RECIPE --part unet --out FRESH`: the VAE and text encoder the UNet
    needs are trained first (on rank 0, the other rank waiting), then the UNet data-parallel on both."""
    import json
    from chorus.train.config import PRESETS, to_dict
    from unet_helpers import TINY_UNET
    unet = dict(to_dict(PRESETS["tiny"].unet), unet=dict(TINY_UNET), steps=2, batch_size=4, epoch_size=8,
                save_every=2, sample_prompts=[], sample_every=0, eval_every=0, resolution=32, mixed_precision="no")
    recipe = {"vae": {"steps": 2, "batch_size": 4, "heldout_images": 6, "scale_images": 8, "eval_every": 2,
                      "image_size": 32},
              "text": {"steps": 2, "batch_size": 8, "natural_scenes": 32, "twin_pairs": 8, "eval_scenes": 8,
                       "eval_every": 2},
              "unet": unet}
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chorus", "train", "--config", str(config), "--part", "unet", "--out", str(tmp_path / "fresh"),
           "--threads", "1", "--no-progress"]
    run = subprocess.run(cmd, env=chorus_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "fresh"
    assert (out / "vae" / "config.json").is_file() and (out / "text" / "text_encoder" / "config.json").is_file()
    assert '"world_size": 2' in (out / "logs" / "train.jsonl").read_text()
    assert (out / "model" / "unet" / "config.json").is_file()
