"""Running under ``torchrun``: joining its process group, who this process is, and the few collective
steps the commands need.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every function here
is a no-op for a single process, so the library code reads the same either way. Under ``torchrun``
a command calls :func:`init` once before anything else; :func:`world` only asks.

The backend is NCCL when CUDA is available and gloo otherwise; the environment variable
``SOFTLABELS_BACKEND=gloo`` forces gloo on a GPU machine (for example when NCCL cannot run there).

Example::

    rank, ranks = distributed.init()    # at the start of a command: joins torchrun's group
    ...
    if distributed.world()[0] == 0:     # anywhere later: rank 0 prints
        print("done")
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import SoftlabelsError

BACKEND_VARIABLE = "SOFTLABELS_BACKEND"


def _launched_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int]:
    """Join the process group ``torchrun`` set up (once; later calls only return ``(rank, world_size)``)."""
    if _launched_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get(BACKEND_VARIABLE) != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``. It never starts anything."""
    if _launched_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        raise SoftlabelsError(
            f"started by torchrun (WORLD_SIZE={_launched_size()}) but the process group was not joined: "
            "call softlabels.distributed.init() first"
        )
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_ints(*values: int) -> list[int]:
    """Element-wise sums of integers over all ranks."""
    return [int(v) for v in _sum(values, torch.int64)]


def sum_floats(*values: float) -> list[float]:
    """Element-wise sums of numbers over all ranks, in float64."""
    return [float(v) for v in _sum(values, torch.float64)]


def _sum(values: tuple, dtype: torch.dtype) -> list:
    if not dist.is_initialized():
        return list(values)
    # NCCL reduces device tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
