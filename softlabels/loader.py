"""Shuffled, chunk-aware batches of ``(inputs, labels, teacher targets)`` from a source and a cache.

An epoch's global batches are a pure function of ``(seed, epoch)``: the blocks (whole cache chunks)
are permuted, consecutive groups of ``shuffle_chunks`` blocks form a window, the rows of each window
are permuted, and the resulting row order is cut into batches. Ranks take slices of each global
batch and DataLoader workers take every W-th batch, so neither changes what is trained on. Every
read is a whole chunk of the cache and the matching slice of the inputs. Batches are read, checked
and cut from their window in a background thread, about a window ahead of the thread that trains.

On a view cache (:mod:`softlabels.views`) each row of a batch takes one of its recorded views, chosen
by ``(seed, epoch, sample)``: the view's targets, and its inputs replayed from the stored parameters.
Given ``augment`` instead, every row gets a fresh view keyed by ``(augment seed, sample, epoch)``.

Example::

    cache = open_cache("transfer.zarr")
    loader = SoftTargetLoader(source_for_cache(cache), cache, batch_size=128, seed=0)
    loader.set_epoch(0)
    for batch in loader:
        loss = kd_loss(model(batch.inputs), batch.teacher_logits, batch.labels)
"""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from .data import UNUSABLE, Source, check_classes, data_names_code, open_data, skipped_rows
from .errors import MissingData, SoftlabelsError
from .kinds import SoftTargets
from .augment import Pipeline
from .background import Background
from .store import Cache, chunk_bounds, num_chunks, open_cache
from .tokens import TokenSource, check_tokenizer
from .trust import check_recorded_spec
from .views import Mix, Views, replay

DEFAULT_CHUNK_ROWS = 1024  # the shuffle's block size when there is no cache to follow
_MAX_BLOCK_BYTES = 16 << 20


_DECODED_AHEAD = 4  # batches made ahead when each holds inputs decoded for it


def source_for_cache(cache: Cache, spec: str | None = None, *, trust_code: bool = False) -> Source:
    """The dataset a cache was dumped from (or ``spec``), refused if its fingerprint differs.

    The manifest's ``dataset.spec`` may name only a built-in dataset or an array file (resolved as
    written: a relative path from the working directory), unless ``trust_code``; a ``text:`` spec
    there tokenises only with the tokenizer file the cache records (its sha256). A user who gives
    ``spec`` decides for themselves.

    Example::

        source = source_for_cache(open_cache("train.zarr"))
    """
    recorded = cache.manifest.get("dataset") or {}
    given = spec is not None
    if not given:
        if recorded.get("spec") is None:
            raise SoftlabelsError(f"{cache.path} does not name its dataset; pass --data")
        spec = check_recorded_spec(
            recorded["spec"], names_code=data_names_code(str(recorded["spec"])),
            where=f"cache {cache.path} (manifest field 'dataset.spec')", option="--data", trust_code=trust_code,
        )
    try:
        if not given and spec.strip().startswith("text:"):
            from .text import check_recorded_tokenizer

            check_recorded_tokenizer(spec.strip(), cache.manifest.get("tokens"), f"cache {cache.path}")
        source = open_data(spec)
    except MissingData as exc:
        if given:
            raise
        raise SoftlabelsError(f"{exc} (where cache {cache.path} was dumped from it; if the data moved, pass --data PATH)") from None
    check_tokenizer(cache.manifest.get("tokens"), source, where=f"cache {cache.path}")
    check_classes(cache.classes, source, f"cache {cache.path}")
    source.skip_rows(skipped_rows(recorded, cache.manifest.get("skipped"), f"cache {cache.path}"))
    if len(source) != len(cache):
        raise SoftlabelsError(f"dataset {source.spec} has {len(source)} samples but cache {cache.path} has {len(cache)}")
    expected = recorded.get("fingerprint")
    if not isinstance(expected, str) or not expected:  # no check at all would pair the targets with any data
        raise SoftlabelsError(f"cache {cache.path} records no dataset fingerprint (manifest field 'dataset.fingerprint'), "
                              "so no data can be checked against it")
    if source.fingerprint() != expected:
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
    row_bytes = cache.layout.row_bytes if cache is not None else 0
    return grown if grown * row_bytes <= _MAX_BLOCK_BYTES else unit


class Batch(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor
    teacher_logits: SoftTargets | None  # the cached targets of these rows, whatever their kind
    indices: torch.Tensor  # dataset row of each sample
    mix: Mix | None = None  # partner labels and weights of views mixed with a partner
    position: int = 0  # which global batch of its epoch this is (0 for the first)


class _Window(NamedTuple):
    inputs: np.ndarray | None
    labels: np.ndarray | None
    teacher_logits: dict[str, np.ndarray] | None
    indices: np.ndarray
    records: dict[str, np.ndarray] | None = None  # a view cache's records of these rows, until replayed
    mix: dict[str, np.ndarray] | None = None  # the fields of the replayed views' Mix


_Plan = list[tuple[list[int], np.ndarray | None]]  # per window: its blocks, and the permutation of its rows


class SoftTargetLoader(torch.utils.data.IterableDataset):
    """One epoch of shuffled batches per iteration; call :meth:`set_epoch` before each epoch.

    The epoch's global batches (``batch_size`` rows each) are a pure function of ``(seed, epoch)``,
    whatever the number of ranks or DataLoader workers. ``shards`` and ``shard`` give rank ``shard``
    of ``shards`` its slice of every global batch of ``n`` rows, rows ``[shard * n // shards,
    (shard + 1) * n // shards)``; with ``shard=None`` each global batch is served whole. An incomplete
    last batch (unless ``drop_last``) is split the same way, so its slices may differ by a row or be
    empty (:meth:`batch_rows` says how many rows a global batch has), and a trainer weighs each
    rank's loss by its share of the rows.

    It is a ``torch.utils.data.IterableDataset``: under ``DataLoader(loader, batch_size=None,
    num_workers=W)`` worker ``w`` serves global batches ``w, w + W, ...``, so the DataLoader's
    round-robin yields them in the same order as ``num_workers=0``. A worker reads only the windows
    its batches draw from, and of a ``module:callable`` dataset only the items they hold; files
    (HDF5 included) are opened anew in each worker.

    :meth:`state_dict` and :meth:`load_state_dict` resume mid-epoch: the state is the epoch and the
    number of its global batches already served, and a resumed loader serves exactly the rest,
    reading none of the windows that only the served batches needed.

    Example::

        loader = SoftTargetLoader(source, cache, batch_size=128, seed=0)
        loader.load_state_dict({"epoch": 3, "batches": 40})    # continue epoch 3 at its 41st batch
        for batch in torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2):
            loss = kd_loss(model(batch.inputs), batch.teacher_logits, batch.labels)
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
        augment: Pipeline | None = None,
        trust_code: bool = False,
    ):
        if cache is not None and len(cache) != len(source):
            raise SoftlabelsError(f"the cache has {len(cache)} rows but dataset {source.spec} has {len(source)}")
        if batch_size < 1 or shuffle_chunks < 1 or shards < 1 or read_threads < 1:
            raise SoftlabelsError("batch size, shuffle chunks, shards and read threads must be positive")
        if batch_size % shards:
            raise SoftlabelsError(f"batch size {batch_size} does not split evenly over {shards} shards")
        if shard is not None and not 0 <= shard < shards:
            raise SoftlabelsError(f"shard {shard} is outside 0..{shards - 1}")
        skipped = [] if cache is None else skipped_rows(cache.manifest.get("dataset") or {}, cache.manifest.get("skipped"), str(cache.path))
        source.skip_rows(skipped)  # rows the dump could not read are read as it stored them: zeros, without loss
        self.skips_rows = bool(skipped)  # whether a batch may hold fewer rows than it was cut with
        self.source = source
        self._cache, self._cache_path, self._cache_pid = cache, (cache.path if cache is not None else None), os.getpid()
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.shuffle_chunks, self.drop_last = shuffle_chunks, drop_last
        self.shards, self.shard, self.read_threads = shards, shard, read_threads
        self.block_rows = block_rows(source, cache)
        self.views = None if cache is None else Views.of_cache(cache, trust_code=trust_code)
        if self.views is not None:
            self.views.check(cache.layout.records, source.input_shape, where=str(cache.path))
            if augment is not None:
                raise SoftlabelsError(f"{cache.path} replays its own recorded views; --augment does not apply to it")
        if augment is not None:
            if isinstance(source, TokenSource):  # a shift would show a position its own answer, noise change ids
                raise SoftlabelsError(f"--augment on {source.spec}: token windows are ids, not values an augmentation may change")
            augment.check_input(source.input_shape, where=f"--augment on {source.spec}")
        self.augment = augment
        self.num_samples = len(source)
        # A dataset read item by item (images to decode, a user's Dataset) costs the same per item wherever
        # it lies: its inputs are read per batch, only the batch's rows, not a window at a time.
        self._batch_inputs = source.reads_items
        # Views cropped from decoded images (an image folder's) are made from the images themselves.
        pipeline = self.views.pipeline if self.views is not None else augment
        self._crops_inputs = pipeline is not None and pipeline.crops_from(source)
        self.epoch = 0
        self._start = 0  # global batches of this epoch skipped (a resumed epoch)
        self._served = 0  # global batches of this epoch served so far in this process

    @property
    def cache(self) -> Cache | None:
        # An HDF5 handle inherited through fork reads wrong data, so each DataLoader worker opens its own.
        if self._cache_path is not None and (self._cache is None or self._cache_pid != os.getpid()):
            self._cache, self._cache_pid = open_cache(self._cache_path), os.getpid()
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # open handles do not pickle; the cache reopens by path

    @property
    def items(self) -> tuple[int, ...]:
        """The item axes of the targets served per sample (a view cache serves one view per sample)."""
        if self._cache_path is None:
            return self.source.label_shape
        return self.cache.items[1:] if self.views is not None else self.cache.items

    @property
    def masks_unlabeled_items(self) -> bool:
        """Whether an item labelled ``-1`` carries no loss at all: a token position with nothing to
        predict (elsewhere ``-1`` means "no hard label", and the soft target still counts)."""
        return isinstance(self.source, TokenSource) or (self._cache_path is not None and "tokens" in self.cache.manifest)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in every epoch (the same for any seed, epoch, rank or worker count)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def batch_rows(self, batch: int) -> int:
        """The rows of global batch ``batch`` of an epoch (before rows a dump skipped are left out)."""
        return min(self.batch_size, self.num_samples - batch * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` next, from its first batch (unless it is the epoch :meth:`load_state_dict` resumed)."""
        if epoch != self.epoch:
            self.epoch, self._start, self._served = epoch, 0, 0

    def state_dict(self, last: Batch | None = None) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch and how many of its global batches were served, or,
        given ``last``, the position after that batch.

        Under a DataLoader with workers the loader in this process does not see the batches go by
        (the workers' copies serve them): pass the last batch used, ``loader.state_dict(batch)``.
        """
        return {"epoch": self.epoch, "batches": self._served if last is None else last.position + 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``state["batches"]`` global batches."""
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise SoftlabelsError(f"a loader state is {{'epoch': E, 'batches': N}}, got {state!r}") from None
        if epoch < 0 or not 0 <= batches <= self.batches_per_epoch:
            raise SoftlabelsError(f"loader state {state} is outside the epoch's 0..{self.batches_per_epoch} batches")
        self.epoch, self._start, self._served = epoch, batches, batches

    def __len__(self) -> int:
        """The batches left to serve in this epoch."""
        return self.batches_per_epoch - self._start

    def order(self, epoch: int) -> np.ndarray:
        """The dataset rows of a whole epoch in the order this loader (this shard) serves them."""
        batches = self._batches(epoch, 0, 0, 1, self._window_indices)
        return np.concatenate([b.indices for b in batches] or [np.zeros(0, np.int64)])

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._served = self._start
        # Batches are made in a background thread, about a window ahead, so that the caller's thread
        # only trains. Its threads live only as long as this iteration: closing the generator (the
        # end of the epoch, or garbage collection after a break) stops them.
        per_batch = self.batch_size // self.shards if self.shard is not None else self.batch_size
        ahead = max(2, -(-self.shuffle_chunks * self.block_rows // per_batch))
        # Handed over a quarter of them at a time (see Background), except batches whose inputs are
        # decoded for them: the decoding then outweighs a hand-over, and each batch held ahead is large.
        group = ahead // 4
        if self._batch_inputs:  # inputs decoded per batch (images): a window of them could be gigabytes
            ahead, group = min(ahead, _DECODED_AHEAD), 1
        make = functools.partial(self._make_batches, worker, workers)
        with Background(make, ahead, group=group, name="softlabels-batches") as batches:
            for batch in batches:
                self._served += 1
                yield batch

    def _make_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """The batches of this epoch that this process serves, read, cut from their windows and viewed."""
        memory = _Reusable()

        def read(group: list[int], perm: np.ndarray | None) -> _Window:
            buffers = memory.take()
            window = self._read_window(pool, group, perm, buffers)
            memory.give(buffers)
            return window

        positions = range(self._start + worker, self.batches_per_epoch, workers)  # as _slices serves them
        with ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="softlabels-read") as pool:
            for position, window in zip(positions, self._batches(self.epoch, self._start, worker, workers, read)):
                window, mix = self._view(self._with_inputs(window))
                window, mix = _usable(window, mix)
                x, y, i = (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
                           for a in (window.inputs, window.labels, window.indices))
                yield Batch(x, y, self._soft_targets(window.teacher_logits), i, mix, position)

    def _view(self, window: _Window) -> tuple[_Window, Mix | None]:
        """The batch as trained on: one recorded view per row replayed (a view cache), or a fresh
        view per row (``augment``), or the rows as they are."""
        if self.views is not None and window.records is None:  # replayed with its window (_replayed)
            mix = None if window.mix is None else Mix(**{k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in window.mix.items()})
            return window._replace(mix=None), mix
        if self.views is not None:  # the window kept one view per row (_one_view)
            x, mix = self.views.apply(self.source, self._raw_inputs(window), window.records, window.indices)
            return window._replace(inputs=x, records=None), mix
        if self.augment is not None:
            record = self.augment.draw(window.indices, np.full(len(window.indices), self.epoch), self.num_samples,
                                       self.source.input_shape, self.source)
            x, mix = replay(self.augment, self.source, self._raw_inputs(window), record, window.indices)
            return window._replace(inputs=x), mix
        return window, None

    def _with_inputs(self, window: _Window) -> _Window:
        """A batch of a source read item by item, with its inputs (and, without a cache, labels) read
        for its rows alone; views cropped from the decoded images need only the labels."""
        if not self._batch_inputs:
            return window
        if self._crops_inputs:
            return window if window.labels is not None else window._replace(labels=self.source.labels_of(window.indices))
        x, y = self.source.take(window.indices)
        return window._replace(inputs=x, labels=window.labels if window.labels is not None else y)

    def _raw_inputs(self, window: _Window) -> torch.Tensor | None:
        return None if self._crops_inputs else torch.from_numpy(np.ascontiguousarray(window.inputs))

    def _soft_targets(self, targets: dict[str, np.ndarray] | None) -> SoftTargets | None:
        """The window rows' cached arrays as the :class:`SoftTargets` that :func:`softlabels.kd_loss`
        takes; class indices and counts, stored as small unsigned types, become int64 for ``gather``."""
        if targets is None:
            return None
        return SoftTargets(self.cache.kind, {
            name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind == "u" else a.dtype))
            for name, a in targets.items()
        })

    def _plan(self, epoch: int) -> _Plan:
        """The epoch's windows in order: blocks permuted by ``(seed, epoch)``, then rows within each window."""
        blocks = np.arange(num_chunks(self.num_samples, self.block_rows))
        if not self.shuffle:
            return [([int(b)], None) for b in blocks]
        rng = np.random.default_rng([self.seed, epoch])
        blocks = rng.permutation(blocks)
        groups = [[int(b) for b in blocks[i:i + self.shuffle_chunks]] for i in range(0, len(blocks), self.shuffle_chunks)]
        return [(group, rng.permutation(self._rows(group))) for group in groups]

    def _rows(self, group: list[int]) -> int:
        return sum(b - a for a, b in (chunk_bounds(c, self.block_rows, self.num_samples) for c in group))

    def _slices(self, start: int, worker: int, workers: int) -> list[tuple[int, int]]:
        """Positions ``[lo, hi)`` in the epoch's row order of the batches this process serves."""
        slices = []
        for b in range(start + worker, self.batches_per_epoch, workers):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)
            if self.shard is not None:
                n = hi - lo
                lo, hi = lo + self.shard * n // self.shards, lo + (self.shard + 1) * n // self.shards
            slices.append((lo, hi))
        return slices

    def _batches(self, epoch: int, start: int, worker: int, workers: int,
                 read: Callable[[list[int], np.ndarray | None], _Window]) -> Iterator[_Window]:
        """The batches this process serves, each a slice of the one or two windows it spans.

        Only the windows these batches draw from are read, in order, each when the first batch that
        needs it is made. ``read(blocks, perm)`` gives a window's rows already in the order of its
        permutation (a row's bytes are put at their place as its chunk is read), so a batch is a
        view of its window's rows, not a copy. A window is let go as soon as no batch needs more of it.
        """
        plan = self._plan(epoch)
        sizes = np.array([self._rows(group) for group, _ in plan], dtype=np.int64)
        ends = np.cumsum(sizes)
        begins = ends - sizes
        slices = self._slices(start, worker, workers)
        spans = [(int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(begins, hi, "left"))) for lo, hi in slices]
        loaded: dict[int, _Window] = {}
        for (lo, hi), (a, b) in zip(slices, spans):
            if lo >= hi:  # a rank's empty slice of a small last batch: no rows, the window's fields
                w = min(a, len(plan) - 1)
                yield _take(loaded.get(w) or read(*plan[w]), slice(0, 0))
                continue
            parts = []
            for w in range(a, b):
                if w not in loaded:
                    loaded[w] = read(*plan[w])
                parts.append(_take(loaded[w], slice(max(lo, begins[w]) - begins[w], min(hi, ends[w]) - begins[w])))
                if ends[w] <= hi:  # no later batch reaches back into it: the next window may take its memory
                    del loaded[w]
            yield _concat(parts)

    def _window_indices(self, group: list[int], perm: np.ndarray | None) -> _Window:
        indices = np.concatenate([np.arange(*chunk_bounds(c, self.block_rows, self.num_samples)) for c in group])
        return _Window(None, None, None, indices if perm is None else indices[perm])

    def _read_block(self, block: int, inputs: bool = True) -> _Window:
        """A block's inputs (or labels without a cache) and records; :meth:`_read_window` reads the targets."""
        start, stop = chunk_bounds(block, self.block_rows, self.num_samples)
        if self.cache is not None:  # the cache holds the labels
            x, y = self.source.read_inputs(start, stop) if inputs else None, None
        else:
            x, y = self.source.read(start, stop) if inputs else (None, None)
        records = self.cache.read_records(start, stop) if self.views is not None else None
        return _Window(x, y, None, np.arange(start, stop), records)

    def _read_window(self, pool: ThreadPoolExecutor, group: list[int], perm: np.ndarray | None,
                     buffers: dict[str, np.ndarray]) -> _Window:
        """The window's blocks, their rows in the order ``perm`` (as read without it): inputs and
        records read on the pool's threads (zarr and h5py release the GIL while they read and
        decode; inputs in memory are copied here) and joined, while this thread reads the targets and
        labels in one call that puts each row straight at its place in the window (into ``buffers``,
        see :meth:`Cache.read_ranges`). A source read item by item gives its inputs per batch instead
        (:meth:`_with_inputs`)."""
        read = functools.partial(self._read_block, inputs=not self._batch_inputs)
        # Inputs in memory (or memory-mapped) are copied in this thread once the targets are read: on the
        # pool, whose threads took the interpreter lock from this one between its reads and checks, the
        # hand-offs cost more than the copies.
        blocks = map(read, group) if self.source.in_memory else pool.map(read, group)  # the pool's submitted now
        if self.cache is not None:
            # A view cache's rows are put in order as one view of each is picked (_one_view): placing
            # every view of a row first would move V times the bytes trained on.
            order = None if perm is None or self.views is not None else _inverse(perm)
            t, y = self.cache.read_ranges([chunk_bounds(b, self.block_rows, self.num_samples) for b in group], buffers, order)
        window = _concat(list(blocks))
        if perm is not None:
            window = _take(window, perm)
        if self.cache is not None:
            window = window._replace(teacher_logits=t, labels=y)
        if self.views is None:
            return window
        window = self._one_view(window, perm)
        return window if self._batch_inputs else self._replayed(window)

    def _one_view(self, window: _Window, perm: np.ndarray | None) -> _Window:
        """The window with one recorded view per row, chosen by ``(seed, epoch, sample)``: its targets,
        label and record (chosen once a window, so a batch gathers only the view it trains on). The
        window's cached targets and labels are as read, its other fields in the order ``perm``."""
        rows, view = np.arange(len(window.indices)), self.views.view_of(self.seed, self.epoch, window.indices)
        read = rows if perm is None else perm
        return window._replace(labels=window.labels[read, view], teacher_logits={n: a[read, view] for n, a in window.teacher_logits.items()},
                               records={n: a[rows, view] for n, a in window.records.items()})

    def _replayed(self, window: _Window) -> _Window:
        """The window's views replayed at once, which its batches then gather: a replay's cost is mostly
        per call, and a window holds many batches. (A source read item by item replays per batch.)
        Under DataLoader workers each worker replays the windows its batches draw from, as it reads them."""
        x, mix = self.views.apply(self.source, self._raw_inputs(window), window.records, window.indices)
        return window._replace(inputs=x.numpy(), records=None, mix=None if mix is None else {k: t.numpy() for k, t in mix._asdict().items()})


class _Reusable:
    """The memory windows are read into, each array's buffer taken again once nothing refers to it:
    batches are views of their window, and a window's memory read into anew costs a page fault per
    4 KiB. Whether anything refers to a buffer is told by its reference count, which every view of
    it and every tensor made from one holds. Only the ``keep`` buffers of each array used last are
    kept: a buffer that batches a caller keeps still refer to is then let go with them."""

    def __init__(self, keep: int = 4) -> None:
        self._kept: dict[str, list[np.ndarray]] = {}
        self._keep = keep

    def take(self) -> dict[str, np.ndarray]:
        """Buffers by array name that nothing refers to any more, for :meth:`Cache.read_ranges` to read
        into (it adds any it lacks); give them back with :meth:`give` once read into."""
        buffers = {}
        for name, kept in self._kept.items():
            free = next((i for i in range(len(kept)) if _references(kept, i) == _UNREFERENCED), None)
            if free is not None:
                buffers[name] = kept.pop(free)
        return buffers

    def give(self, buffers: dict[str, np.ndarray]) -> None:
        """Keep ``buffers`` (just read into) for later windows, the oldest let go past ``keep``."""
        for name, buffer in buffers.items():
            kept = self._kept.setdefault(name, [])
            kept.append(buffer)
            del kept[:-self._keep]


def _references(buffers: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(buffers[i])


_UNREFERENCED = _references([np.empty(0)], 0)  # what it counts for a buffer that only its list holds


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Where each row goes: ``_inverse(perm)[perm[i]] == i``."""
    order = np.empty_like(perm)
    order[perm] = np.arange(len(perm))
    return order


def _usable(window: _Window, mix: Mix | None) -> tuple[_Window, Mix | None]:
    """The batch without its rows labelled :data:`~softlabels.data.UNUSABLE` (inputs a dump could not
    read and skipped): they carry no loss at all."""
    bad = window.labels == UNUSABLE
    if not bad.any():
        return window, mix
    keep = np.flatnonzero(~bad.reshape(len(bad), -1).any(axis=1))
    return _take(window, keep), None if mix is None else Mix(*(t[keep] for t in mix))


def _take(window: _Window, rows: np.ndarray | slice) -> _Window:
    """Rows ``rows`` of every field; cached targets are a dict of arrays, each indexed alike."""
    def pick(v):  # np.take: a tenth faster than fancy indexing at gathering rows; a slice stays a view
        return v[rows] if isinstance(rows, slice) else np.take(v, rows, axis=0)

    def take(a):
        return {k: pick(v) for k, v in a.items()} if isinstance(a, dict) else pick(a)
    return _Window(*(None if a is None else take(a) for a in window))


def _concat(parts: list[_Window]) -> _Window:
    """The rows of ``parts`` one after another; cached targets are a dict of arrays, each joined alike."""
    if len(parts) == 1:
        return parts[0]

    def concat(p):
        if isinstance(p[0], dict):
            return {k: np.concatenate([a[k] for a in p]) for k in p[0]}
        return np.concatenate(p)
    return _Window(*(None if p[0] is None else concat(p) for p in zip(*parts)))
