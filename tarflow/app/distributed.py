"""One process group for the sampling and evaluation commands, from whichever launcher started us.

``tarflow-sample``, ``tarflow-eval`` (and any other command that splits a fixed set over ranks) run
unchanged as one process, under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``)
and under SLURM's ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the rendezvous
address is the job's first node unless ``MASTER_ADDR`` is set). Training does not come here:
Lightning sets up its own group.

What a rank draws is decided in ring 1 (:func:`tarflow.sampling.sample_set.shard_indices`); this
module only knows who we are and moves small things between ranks: a plan chosen by rank 0, a
flag that some rank failed, float64 feature sums.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the launch: global rank, world size, rank within its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def world_from_env() -> World:
    """The launch as the environment describes it (torchrun first, then SLURM); one process if
    neither set a world size above one. Reads only; creates no group."""
    size = _int_env("WORLD_SIZE")
    if size is not None:
        return World(_int_env("RANK") or 0, size, _int_env("LOCAL_RANK") or 0)
    size = _int_env("SLURM_NTASKS")
    if size is not None and size > 1:
        return World(_int_env("SLURM_PROCID") or 0, size, _int_env("SLURM_LOCALID") or 0)
    return World()


def _first_slurm_host(nodelist: str) -> str:
    """``gpu[03-05,09],cpu1`` -> ``gpu03``: SLURM's compressed node list, first host only."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return "127.0.0.1"
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def setup(world: World | None = None, *, timeout_s: float = 1800.0) -> World:
    """Join the process group of a multi-process launch (no-op for one process or when a group
    exists). NCCL when CUDA is available, gloo otherwise; a CUDA rank takes ``cuda:local_rank``."""
    import datetime

    import torch.distributed as dist

    world = world or world_from_env()
    if not world.distributed or dist.is_initialized():
        return world
    if "WORLD_SIZE" not in os.environ:  # SLURM: torch's env:// rendezvous reads these names
        os.environ.setdefault("MASTER_ADDR",
                              _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "")))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0"))
                                                 % 1000))
        os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world.size), str(world.rank)
        os.environ["LOCAL_RANK"] = str(world.local_rank)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return world


def teardown() -> None:
    """Leave the process group if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small things only: a plan, a path)."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def any_failed(failed: bool) -> bool:
    """True on every rank when any rank passes True: ranks leave a failed job together instead
    of one waiting forever in the next collective."""
    if not _active():
        return failed
    import torch.distributed as dist

    flag = torch.tensor([float(failed)], device=_collective_device())
    dist.all_reduce(flag)
    return bool(flag.item())


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``t`` over ranks, computed in float64 (feature moments of 50k
    images lose digits in float32), returned on ``t``'s device in float64."""
    out = t.detach().to(torch.float64)
    if not _active():
        return out
    import torch.distributed as dist

    moved = out.to(_collective_device())
    dist.all_reduce(moved)
    return moved.to(t.device)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the others; ``[obj]`` in one
    process). Pickled: for per-sample features (8 KiB an image), never for images."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
