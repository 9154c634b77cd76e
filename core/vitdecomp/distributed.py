"""torch.distributed glue: vitdecomp runs unchanged under ``torchrun`` (single- or multi-node).

Nothing here is a scheduler. When a process group is initialised — by the user, or by :func:`init_from_env`
from the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) — extraction
splits the dataset's shards across ranks, and statistics (streaming scores, ablation means, the aligner's
normal equations) are summed across ranks with ``all_reduce``. Without a process group every helper is the
identity, so single-process code pays nothing.
"""

from __future__ import annotations

import atexit
import inspect
import os
from typing import Any, Optional

import attrs
import torch

__all__ = ["DistInfo", "info", "init_from_env", "all_reduce_sum", "barrier", "broadcast_object", "all_gather_objects",
           "is_main"]


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def info() -> DistInfo:
    """Rank, world size and backend of the current process group (rank 0 of 1 when there is none)."""
    if not _available():
        return DistInfo()
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=torch.distributed.get_backend())


def is_main() -> bool:
    return info().rank == 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _uses_nccl(backend: Optional[str]) -> bool:
    return backend is not None and "nccl" in str(backend).lower()


def init_from_env(backend: Optional[str] = None, device=None) -> DistInfo:
    """Initialise the default process group from ``torchrun``'s environment variables, if they say there is
    more than one process and no group exists yet. Backend: ``nccl`` for CUDA devices, else ``gloo``.

    With ``nccl`` every rank binds GPU ``cuda:LOCAL_RANK`` (``torch.cuda.set_device`` before the group is
    created, and ``device_id`` where this torch accepts it), so several ranks on one node never share a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        if backend is None:
            on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
            backend = "nccl" if on_cuda else "gloo"
        kwargs = {}
        if _uses_nccl(backend):
            gpu = torch.device("cuda", _local_rank())
            torch.cuda.set_device(gpu)
            if "device_id" in inspect.signature(torch.distributed.init_process_group).parameters:
                kwargs["device_id"] = gpu
        torch.distributed.init_process_group(backend=backend, **kwargs)
        atexit.register(_destroy_group)  # the group we created is torn down before the interpreter's threads go
    return info()


def _destroy_group() -> None:
    # without it, a rank can abort at exit ("terminate called without an active exception") while the backend's
    # threads are still alive
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collectives' buffers live: this rank's GPU for NCCL (``cuda:LOCAL_RANK`` under torchrun, else the
    current CUDA device of a group the caller initialised), the CPU otherwise."""
    if not _uses_nccl(info().backend):
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", _local_rank())
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``t`` (returned on ``t``'s device and dtype); ``t`` itself when there is no group."""
    if not info().active:
        return t
    dev = _comm_device()
    buf = t.detach().to(dev, copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(t.device)


def barrier() -> None:
    if info().active:
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled); ``obj`` when there is no group."""
    if not info().active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled); ``[obj]`` when there is no group."""
    if not info().active:
        return [obj]
    out = [None] * info().world_size
    torch.distributed.all_gather_object(out, obj)
    return out
