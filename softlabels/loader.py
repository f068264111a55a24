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

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

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
    """Iterates one epoch of shuffled batches; call :meth:`set_epoch` before each epoch."""

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
    ):
        if cache is not None and len(cache) != len(source):
            raise SoftlabelsError(f"the cache has {len(cache)} rows but dataset {source.spec} has {len(source)}")
        if batch_size < 1 or shuffle_chunks < 1:
            raise SoftlabelsError("batch size and shuffle chunks must be positive")
        self.source, self.cache = source, cache
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.shuffle_chunks, self.drop_last = shuffle_chunks, drop_last
        self.chunk_rows = cache.chunk_rows if cache is not None else DEFAULT_CHUNK_ROWS
        self.num_samples = len(source)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _plan(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """Per window: its chunks and the permutation of its rows (a pure function of seed and epoch)."""
        chunks = np.arange(num_chunks(self.num_samples, self.chunk_rows))
        if not self.shuffle:
            return [([int(c)], None) for c in chunks]
        rng = np.random.default_rng([self.seed, epoch])
        chunks = rng.permutation(chunks)
        plan = []
        for i in range(0, len(chunks), self.shuffle_chunks):
            group = [int(c) for c in chunks[i:i + self.shuffle_chunks]]
            rows = sum(b - a for a, b in (chunk_bounds(c, self.chunk_rows, self.num_samples) for c in group))
            plan.append((group, rng.permutation(rows)))
        return plan

    def order(self, epoch: int) -> np.ndarray:
        """The dataset rows of an epoch in the order they are served."""
        parts = []
        for group, perm in self._plan(epoch):
            rows = np.concatenate([np.arange(*chunk_bounds(c, self.chunk_rows, self.num_samples)) for c in group])
            parts.append(rows if perm is None else rows[perm])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _read_window(self, group: list[int], perm: np.ndarray | None) -> _Window:
        xs, ys, ts, idx = [], [], [], []
        for c in group:
            start, stop = chunk_bounds(c, self.chunk_rows, self.num_samples)
            x, y = self.source.read(start, stop)
            if self.cache is not None:
                t, y = self.cache.read(start, stop)
                ts.append(t)
            xs.append(x)
            ys.append(y)
            idx.append(np.arange(start, stop))
        window = _Window(
            np.concatenate(xs), np.concatenate(ys), np.concatenate(ts) if ts else None, np.concatenate(idx)
        )
        if perm is None:
            return window
        return _Window(*(None if a is None else a[perm] for a in window))

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan(self.epoch)
        carry: _Window | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-read") as reader:
            pending = reader.submit(self._read_window, *plan[0]) if plan else None
            for i in range(len(plan)):
                window = pending.result()
                pending = reader.submit(self._read_window, *plan[i + 1]) if i + 1 < len(plan) else None
                if carry is not None:
                    window = _Window(*(None if a is None else np.concatenate([c, a]) for c, a in zip(carry, window)))
                usable = len(window.indices) if pending is None else len(window.indices) // self.batch_size * self.batch_size
                for start in range(0, usable, self.batch_size):
                    stop = min(start + self.batch_size, usable)
                    if self.drop_last and stop - start < self.batch_size:
                        break
                    yield Batch(*(None if a is None else torch.from_numpy(np.ascontiguousarray(a[start:stop])) for a in window))
                carry = _Window(*(None if a is None else a[usable:] for a in window))
