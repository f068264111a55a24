"""Shuffled, chunk-aware batches of ``(inputs, labels, teacher logits)`` from a source and a cache.

The epoch's order is a pure function of ``(seed, epoch)``: the chunks are permuted, consecutive
groups of ``shuffle_chunks`` chunks form a window, and the rows of each window are permuted. Every
read is a whole chunk of the cache and the matching slice of the inputs, never a single row, and the
next window is read in a background thread while the current one is trained on.

Example:
    >>> cache = open_cache("transfer.zarr")
    >>> loader = SoftTargetLoader(source_for_cache(cache), cache, batch_size=128, seed=0)
    >>> loader.set_epoch(0)
    >>> for batch in loader:
    ...     loss = kd_loss(model(batch.inputs), batch.teacher_logits, batch.labels)
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from .data import Source, open_data
from .errors import SoftlabelsError
from .store import Cache, chunk_bounds, num_chunks

DEFAULT_CHUNK_ROWS = 1024  # the shuffle's block size when there is no cache to follow


def source_for_cache(cache: Cache, spec: str | None = None) -> Source:
    """The dataset a cache was dumped from (or ``spec``), refused if its fingerprint differs.

    Example:
        >>> source = source_for_cache(open_cache("train.zarr"))
    """
    recorded = cache.manifest.get("dataset") or {}
    spec = spec or recorded.get("spec")
    if not isinstance(spec, str) or not spec:
        raise SoftlabelsError(f"{cache.path} does not name its dataset; pass --data")
    source = open_data(spec)
    if len(source) != len(cache):
        raise SoftlabelsError(f"dataset {source.spec} has {len(source)} samples but cache {cache.path} has {len(cache)}")
    expected = recorded.get("fingerprint")
    if expected and source.fingerprint() != expected:
        raise SoftlabelsError(
            f"dataset {source.spec} does not match cache {cache.path}: fingerprint {source.fingerprint()[:19]} "
            f"differs from the recorded {expected[:19]} (the data changed or is another dataset)"
        )
    return source


class Batch(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None  # as stored (float16 or float32); None without a cache
    indices: torch.Tensor  # dataset row of each sample


class _Window(NamedTuple):
    inputs: np.ndarray
    labels: np.ndarray
    teacher_logits: np.ndarray | None
    indices: np.ndarray


class SoftTargetLoader:
    """Iterates one epoch of shuffled batches; call :meth:`set_epoch` before each epoch.

    ``shards`` splits each epoch for data-parallel training: the epoch's permuted chunks are dealt
    round-robin to the shards, shard ``r`` serves batches of ``batch_size // shards`` rows from its
    own chunks only, and every shard serves the same number of batches (the few rows left over on
    some shards wait for the next epoch's shuffle). A loader with
    ``shard=r`` is rank ``r``'s view; with ``shard=None`` it serves each global batch whole, the
    concatenation of the shards' batches, which is what one process needs to match N ranks.
    """

    def __init__(
        self,
        source: Source,
        cache: Cache | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_chunks: int = 8,
        drop_last: bool = False,
        shards: int = 1,
        shard: int | None = None,
        read_threads: int = 4,
    ):
        if cache is not None and len(cache) != len(source):
            raise SoftlabelsError(f"the cache has {len(cache)} rows but dataset {source.spec} has {len(source)}")
        if batch_size < 1 or shuffle_chunks < 1 or shards < 1 or read_threads < 1:
            raise SoftlabelsError("batch size, shuffle chunks, shards and read threads must be positive")
        if batch_size % shards:
            raise SoftlabelsError(f"batch size {batch_size} does not split evenly over {shards} shards")
        if shard is not None and not 0 <= shard < shards:
            raise SoftlabelsError(f"shard {shard} is outside 0..{shards - 1}")
        self.source, self.cache = source, cache
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.shuffle_chunks, self.drop_last = shuffle_chunks, drop_last or shards > 1
        self.shards, self.shard, self.read_threads = shards, shard, read_threads
        self.chunk_rows = cache.chunk_rows if cache is not None else DEFAULT_CHUNK_ROWS
        self.num_samples = len(source)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self, epoch: int) -> list[list[tuple[list[int], np.ndarray | None]]]:
        """Per shard, its windows: chunks and a permutation of their rows (a pure function of seed and epoch).

        The permuted chunks are dealt round-robin to the shards, so shards differ by at most one chunk.
        """
        chunks = np.arange(num_chunks(self.num_samples, self.chunk_rows))
        if not self.shuffle:
            return [[([int(c)], None) for c in chunks[r::self.shards]] for r in range(self.shards)]
        rng = np.random.default_rng([self.seed, epoch])
        chunks = rng.permutation(chunks)
        plans = []
        for r in range(self.shards):
            mine = chunks[r::self.shards]
            groups = [[int(c) for c in mine[i:i + self.shuffle_chunks]] for i in range(0, len(mine), self.shuffle_chunks)]
            plans.append([(group, rng.permutation(self._rows(group))) for group in groups])
        return plans

    def _rows(self, group: list[int]) -> int:
        return sum(b - a for a, b in (chunk_bounds(c, self.chunk_rows, self.num_samples) for c in group))

    def _steps(self, plans: list[list[tuple[list[int], np.ndarray | None]]]) -> int:
        """Batches per shard in an epoch: the same on every shard."""
        per_shard = self.batch_size // self.shards
        rows = [sum(self._rows(group) for group, _ in plan) for plan in plans]
        if self.drop_last:
            return min(r // per_shard for r in rows)
        return -(-rows[0] // per_shard)

    def __len__(self) -> int:
        return self._steps(self._plan(self.epoch))

    def order(self, epoch: int) -> np.ndarray:
        """The dataset rows of an epoch in the order this loader serves them."""
        return np.concatenate([b.indices for b in self._batches(epoch, self._window_indices)] or [np.zeros(0, np.int64)])

    def __iter__(self) -> Iterator[Batch]:
        for window in self._batches(self.epoch, self._read_window):
            yield Batch(*(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in window))

    def _batches(self, epoch: int, read: Callable[..., _Window]) -> Iterator[_Window]:
        plans = self._plan(epoch)
        steps = self._steps(plans)
        per_shard = self.batch_size // self.shards
        shards = range(self.shards) if self.shard is None else [self.shard]
        streams = [self._stream(plans[r], per_shard, read) for r in shards]
        for parts in itertools.islice(zip(*streams), steps):
            yield parts[0] if len(parts) == 1 else _Window(*(None if p[0] is None else np.concatenate(p) for p in zip(*parts)))

    def _stream(self, plan: list, batch_size: int, read: Callable[..., _Window]) -> Iterator[_Window]:
        """Batches cut from the windows of ``plan`` in order, the next window read while one is served."""
        carry: _Window | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-prefetch") as prefetch:
            pending = prefetch.submit(read, *plan[0]) if plan else None
            for i in range(len(plan)):
                window = pending.result()
                pending = prefetch.submit(read, *plan[i + 1]) if i + 1 < len(plan) else None
                if carry is not None:
                    window = _Window(*(None if a is None else np.concatenate([c, a]) for c, a in zip(carry, window)))
                rows = len(window.indices)
                usable = rows if pending is None else rows // batch_size * batch_size
                for start in range(0, usable, batch_size):
                    stop = min(start + batch_size, usable)
                    if self.drop_last and stop - start < batch_size:
                        break
                    yield _Window(*(None if a is None else a[start:stop] for a in window))
                carry = _Window(*(None if a is None else a[usable:] for a in window))

    def _window_indices(self, group: list[int], perm: np.ndarray | None) -> _Window:
        rows = np.concatenate([np.arange(*chunk_bounds(c, self.chunk_rows, self.num_samples)) for c in group])
        return _Window(None, None, None, rows if perm is None else rows[perm])

    def _read_chunk(self, chunk: int) -> _Window:
        start, stop = chunk_bounds(chunk, self.chunk_rows, self.num_samples)
        x, y = self.source.read(start, stop)
        t = None
        if self.cache is not None:
            t, y = self.cache.read(start, stop)
        return _Window(x, y, t, np.arange(start, stop))

    def _read_window(self, group: list[int], perm: np.ndarray | None) -> _Window:
        # Chunks are read concurrently: zarr and h5py release the GIL while they read and decode.
        with ThreadPoolExecutor(max_workers=min(self.read_threads, len(group)), thread_name_prefix="softlabels-read") as pool:
            parts = list(pool.map(self._read_chunk, group))
        window = _Window(*(None if p[0] is None else np.concatenate(p) for p in zip(*parts)))
        if perm is None:
            return window
        return _Window(*(None if a is None else a[perm] for a in window))
