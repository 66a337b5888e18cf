"""The process group and the collectives the stages use, each a no-op in a one-process job.

:func:`init_process_group` joins torchrun's group (or makes a one-process group) and returns this
process's :class:`DistEnv`; the helpers take that ``DistEnv`` and skip the collective when
``world_size`` is 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str = "cpu") -> DistEnv:
    """Join the job's process group (torchrun's environment), or make a one-process group.

    gloo on CPU, nccl on CUDA. A run without torchrun gets a single-process group over a file
    rendezvous, so the same sharded code path runs everywhere.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch sees no CUDA device")
    backend = "nccl" if device == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            rdzv = tempfile.NamedTemporaryFile(prefix="iat-rdzv-", delete=False).name
            os.unlink(rdzv)
            dist.init_process_group(backend, init_method=f"file://{rdzv}", rank=0,
                                    world_size=1)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[DistEnv]:
    """:func:`init_process_group` for the length of a ``with`` block; a group made here is
    destroyed at its end (one that already existed is left alone)."""
    started = not dist.is_initialized()
    try:
        yield init_process_group(device)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.world_size > 1:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank."""
    box = [obj]
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if env.world_size == 1:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_arrays(arrays: Dict[str, "object"], env: DistEnv) -> Optional[List[Dict]]:
    """All ranks' small result dicts, on rank 0 (None elsewhere)."""
    if env.world_size == 1:
        return [arrays]
    out: Optional[List[Dict]] = [None] * env.world_size if env.is_main else None
    dist.gather_object(arrays, out, dst=0)
    return out


def _collective_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(value: int, env: DistEnv, op: dist.ReduceOp) -> int:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device(env))
    dist.all_reduce(t, op=op)
    return int(t.item())


def all_equal_batches(count: int, env: DistEnv) -> int:
    """The largest per-rank batch count: ranks with fewer pad with weight-0 batches."""
    return _reduce(count, env, dist.ReduceOp.MAX)


def sum_over_ranks(value: int, env: DistEnv) -> int:
    """The sum of an integer over all ranks."""
    return _reduce(value, env, dist.ReduceOp.SUM)
