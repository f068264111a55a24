"""Running under ``torchrun``: who this process is, and the few collective steps the commands need.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) every function here is a no-op for a
single process, so the library code reads the same either way.

Example:
    $ torchrun --nproc-per-node 2 -m softlabels dump --teacher t.pth --data d.npz --out d.zarr
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``, joining the process group that ``torchrun`` set up on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SOFTLABELS_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_ints(*values: int) -> list[int]:
    """Element-wise sums of integers over all ranks."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor]
