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

from .data import Source, data_names_code, open_data
from .errors import SoftlabelsError
from .store import Cache, chunk_bounds, num_chunks
from .trust import check_recorded_spec

DEFAULT_CHUNK_ROWS = 1024  # the shuffle's block size when there is no cache to follow
_MAX_BLOCK_BYTES = 16 << 20


def source_for_cache(cache: Cache, spec: str | None = None, *, trust_code: bool = False) -> Source:
    """The dataset a cache was dumped from (or ``spec``), refused if its fingerprint differs.

    The manifest's ``dataset.spec`` may name only a built-in dataset or an array file (resolved as
    written: a relative path from the working directory), unless ``trust_code``; a user who gives
    ``spec`` decides for themselves.

    Example::

        source = source_for_cache(open_cache("train.zarr"))
    """
    recorded = cache.manifest.get("dataset") or {}
    if spec is None:
        if recorded.get("spec") is None:
            raise SoftlabelsError(f"{cache.path} does not name its dataset; pass --data")
        spec = check_recorded_spec(
            recorded["spec"], names_code=data_names_code(str(recorded["spec"])),
            where=f"cache {cache.path} (manifest field 'dataset.spec')", option="--data", trust_code=trust_code,
        )
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


def block_rows(source: Source, cache: Cache | None) -> int:
    """The shuffle's unit: whole cache chunks that also cover whole input chunks where that is cheap.

    Reading 256 rows out of a 65,536-row compressed input chunk decodes all of it, so when the
    inputs' chunks are larger than the cache's the unit grows to a whole number of cache chunks that
    spans one input chunk (up to 16 MiB of logits; beyond that the inputs are decoded repeatedly).
    """
    unit = cache.chunk_rows if cache is not None else DEFAULT_CHUNK_ROWS
    inputs = source.chunk_rows
    if inputs is None or inputs <= unit:
        return unit
    grown = -(-inputs // unit) * unit
    row_bytes = (cache.num_classes * np.dtype(cache.manifest["dtype"]).itemsize) if cache is not None else 0
    return grown if grown * row_bytes <= _MAX_BLOCK_BYTES else unit


class Batch(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | dict[str, torch.Tensor] | None  # dense logits as stored, or sparse targets
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
        self._pool: ThreadPoolExecutor | None = None
        self.block_rows = block_rows(source, cache)
        self.num_samples = len(source)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self, epoch: int) -> list[list[tuple[list[int], np.ndarray | None]]]:
        """Per shard, its windows: chunks and a permutation of their rows (a pure function of seed and epoch).

        The permuted chunks are dealt round-robin to the shards, so shards differ by at most one chunk.
        """
        chunks = np.arange(num_chunks(self.num_samples, self.block_rows))
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
        return sum(b - a for a, b in (chunk_bounds(c, self.block_rows, self.num_samples) for c in group))

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
            x, y, t, i = (None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in (window.inputs, window.labels, None, window.indices))
            yield Batch(x, y, self._soft_targets(window.teacher_logits), i)

    def _soft_targets(self, targets: np.ndarray | None) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """Dense logits as a tensor; sparse targets as the dict :func:`softlabels.kd_loss` takes."""
        if targets is None or targets.dtype.names is None:
            return None if targets is None else torch.from_numpy(np.ascontiguousarray(targets))
        served = {}
        for name in targets.dtype.names:
            field = targets[name]
            served[name] = torch.from_numpy(np.ascontiguousarray(field, dtype=np.int64 if field.dtype.kind == "u" else field.dtype))
        manifest = self.cache.manifest
        served["temperatures"] = torch.tensor(manifest["temperatures"], dtype=torch.float64)
        if "proposal_temperature" in manifest:
            served["proposal_temperature"] = torch.tensor(manifest["proposal_temperature"], dtype=torch.float64)
        return served

    def _batches(self, epoch: int, read: Callable[..., _Window]) -> Iterator[_Window]:
        plans = self._plan(epoch)
        steps = self._steps(plans)
        per_shard = self.batch_size // self.shards
        shards = range(self.shards) if self.shard is None else [self.shard]
        streams = [self._stream(plans[r], per_shard, read) for r in shards]
        for parts in itertools.islice(zip(*streams), steps):
            yield _concat(list(parts))

    def _stream(self, plan: list, batch_size: int, read: Callable[..., _Window]) -> Iterator[_Window]:
        """Batches cut from the windows of ``plan`` in order, the next window read while one is served.

        A window is kept as read (its blocks concatenated) and each batch gathers its rows through the
        window's permutation, so no permuted copy of the whole window is ever made.
        """
        carry: _Window | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-prefetch") as prefetch:
            pending = prefetch.submit(read, plan[0][0]) if plan else None
            for i, (_, perm) in enumerate(plan):
                window = pending.result()
                pending = prefetch.submit(read, plan[i + 1][0]) if i + 1 < len(plan) else None
                order = np.arange(len(window.indices)) if perm is None else perm
                if carry is not None:
                    need = batch_size - len(carry.indices)
                    carry = _concat([carry, _take(window, order[:need])])
                    order = order[need:]
                    if len(carry.indices) == batch_size:
                        yield carry
                        carry = None
                    elif pending is not None:
                        continue
                full = len(order) // batch_size * batch_size
                for start in range(0, full, batch_size):
                    yield _take(window, order[start:start + batch_size])
                rest = _take(window, order[full:]) if full < len(order) else None
                carry = rest if carry is None or rest is None else _concat([carry, rest])
            if carry is not None and not self.drop_last:
                yield carry

    def _window_indices(self, group: list[int]) -> _Window:
        rows = np.concatenate([np.arange(*chunk_bounds(c, self.block_rows, self.num_samples)) for c in group])
        return _Window(None, None, None, rows)

    def _read_block(self, block: int) -> _Window:
        start, stop = chunk_bounds(block, self.block_rows, self.num_samples)
        x, y = self.source.read(start, stop)
        t = None
        if self.cache is not None:
            t, y = self.cache.read(start, stop)
        return _Window(x, y, t, np.arange(start, stop))

    def _read_window(self, group: list[int]) -> _Window:
        # Blocks are read concurrently: zarr and h5py release the GIL while they read and decode.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="softlabels-read")
        return _concat(list(self._pool.map(self._read_block, group)))


def _take(window: _Window, rows: np.ndarray) -> _Window:
    return _Window(*(None if a is None else a[rows] for a in window))


def _concat(parts: list[_Window]) -> _Window:
    if len(parts) == 1:
        return parts[0]
    return _Window(*(None if p[0] is None else np.concatenate(p) for p in zip(*parts)))
