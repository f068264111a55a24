"""How the process's memory allocator treats large blocks: kept for reuse, not returned to the kernel.

glibc's malloc serves a block of more than 32 MiB with a fresh ``mmap`` and unmaps it when it is
freed, so every batch whose tensors are that large (a language model's logits, ``[B, L, V]``) pays a
page fault for each 4 KiB of them, and the kernel zeroes every page first. With the blocks kept in
the heap, the dump command of the 3.7M-parameter demo teacher ran 1.2-1.4x faster on the CPU
(``scripts/bench_lm.py --sections allocator``). This is what PyTorch's CPU tuning guide gets from
jemalloc or TCMalloc, with the allocator the process already has. ``softlabels`` commands call it
on start; a script using the library may too:

    import softlabels
    softlabels.keep_freed_memory()
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory there for reuse.

    The process's resident memory then stays at its peak instead of falling after it. Returns whether
    it applied: not on a C library other than glibc, and not when the environment already tunes
    malloc (``MALLOC_*`` variables or ``GLIBC_TUNABLES``), whose settings are left as they are.
    """
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl's and macOS's mallocs differ
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # No mmap for any block, so freed large blocks stay in the heap; and the heap's free top is kept
    # up to 2 GiB (mallopt takes an int), instead of being trimmed back to the kernel at 128 KiB.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
