"""Scale-out on an existing engine: torch.distributed, as `torchrun` and `accelerate launch` set it up.

Both launchers start one process per device and export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; `setup()` reads them and joins the process group — NCCL when CUDA is there, gloo on
a CPU-only host (so 2 processes on a laptop really exchange gradients rather than running as two
independent copies). The UNet is wrapped in DistributedDataParallel: each rank computes the loss of
its share of the global batch and DDP averages the gradients (an all-reduce) before the step, so the
update equals the one a single process makes from the whole batch, up to float summation order.

FSDP (sharding parameters, gradients and optimiser state across ranks) is the route for UNets too
large for one device; see docs/training.md ("Scale-out").
"""
from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chorus.errors import ChorusError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when not launched."""
    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return int(value) if value not in (None, "") else default
        except ValueError:
            raise ChorusError(f"The environment variable {name}={value!r} is not a whole number; it is set by "
                              "torchrun / accelerate launch and must not be edited.") from None
    world_size = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local_rank = get("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ChorusError(f"RANK={rank} is outside WORLD_SIZE={world_size}.")
    return rank, world_size, local_rank


def setup(device: str | None = None, timeout_s: int = 600) -> Dist:
    """Join the process group the launcher prepared (if any) and pick this rank's device."""
    rank, world_size, local_rank = env_world()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ChorusError(f"WORLD_SIZE={world_size} but {name} is not set; start distributed runs with "
                                  "`torchrun --nproc_per_node N -m chorus train ...` or `accelerate launch`.")
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return Dist(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over ranks (a copy; every rank gets the result)."""
    value = value.detach().clone().to(d.device)
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def all_any(flag: bool, d: Dist) -> bool:
    """True on every rank if it is true on any rank (e.g. a NaN loss: all stop together)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, d: Dist):
    """rank 0's picklable object on every rank (small control data only: paths, steps)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several ranks; the model itself otherwise."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model: torch.nn.Module, skip: bool):
    """Inside: backward passes accumulate locally without the all-reduce (all but the last micro-batch)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()
