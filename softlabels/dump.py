"""Run a teacher over a dataset and store its logits: the one expensive pass, done once.

The main thread only feeds the model: each batch's logits are cast to the storage dtype on the
device, copied to the host (into pinned buffers, without blocking, on CUDA) and handed through a
bounded queue to a writer thread, which assembles whole chunks and writes them, a run of finished
chunks per store call. Storage writes release the GIL, so they overlap with the next batches.

Example::

    teacher = load_model("teacher.pth")
    result = dump(teacher, open_data("mnist1d://train"), "train.zarr", kind=TopK(k=5))
    result.num_samples, result.num_classes   # (4000, 10)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import dataclasses
import itertools
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, distributed
from .checkpoint import LoadedModel
from .data import DIGEST, DIGEST_BYTES, NO_LABEL, UNUSABLE, Source, default_workers
from .errors import SoftlabelsError
from .kinds import Dense, TargetKind
from .tokens import GOLD, TOKEN_AXIS, TokenSource, gold_logprob, gold_record, token_manifest
from .views import VIEW_AXIS, Views, mix_weights, scored_items
from .durable import exclusive
from .store import (CacheWriter, Layout, Record, backend_name, check_replaceable, chunk_checksum, default_chunk_rows,
                    directory_bytes, partial_path, remove_path)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_QUEUE_BATCHES = 8
# Finished chunks are written, synced and committed in groups: one sync of an HDF5 file per group
# halves its write time against one per chunk. A chunk waits at most _WRITE_WAIT seconds for its group.
_WRITE_GROUP = 8
_WRITE_WAIT = 0.1


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SoftlabelsError(f"device {name} requested but no CUDA GPU is available")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SoftlabelsError(f"unknown device {name!r}") from exc
    if device.type not in ("cpu", "cuda"):  # meta holds no values; others would fail deep in a model
        raise SoftlabelsError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


class _Blocks(torch.utils.data.Dataset):
    """Item ``i`` is batch ``batches[i]``: rows ``[b * batch_size, (b + 1) * batch_size)``, as
    ``(start, inputs, labels, records)``; with ``views``, the inputs are every view of each row
    (``[rows * V, ...]``), drawn and made here, in the DataLoader's workers, and ``records`` their
    parameters (``[rows, V, *tail]`` each).

    Batch boundaries are fixed by the batch size alone, so a resumed dump feeds the teacher exactly
    the batches an uninterrupted one would, and gets the same bytes.
    """

    def __init__(self, source: Source, batch_size: int, batches: list[int] | None = None, views: Views | None = None):
        self.source, self.batch_size, self.views = source, batch_size, views
        self.batches = list(range(-(-len(source) // batch_size))) if batches is None else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        start = self.batches[i] * self.batch_size
        stop = min(start + self.batch_size, len(self.source))
        if self.views is None:
            x, y = self._read(start, stop)
            return start, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), {}
        rows = np.arange(start, stop)
        records = self.views.draw(rows, self.source)
        flat = {name: r.reshape(-1, *r.shape[2:]) for name, r in records.items()}
        if self.views.pipeline.crops_from(self.source):  # the views are cropped from the decoded images
            x, y = None, self.source.labels_of(rows)
        else:
            x, y = self._read(start, stop)
            x = torch.from_numpy(np.ascontiguousarray(x)).repeat_interleave(self.views.count, 0)
        inputs, _ = self.views.apply(self.source, x, flat, np.repeat(rows, self.views.count))
        return start, inputs, torch.from_numpy(y), records

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The source's rows ``[start, stop)``; an error there names them and the dataset (a Dataset's
        own exception says nothing of where it was)."""
        try:
            return self.source.read(start, stop)
        except SoftlabelsError:
            raise
        except Exception as exc:
            raise SoftlabelsError(f"cannot read samples {start}..{stop - 1} of {self.source.spec}: "
                                  f"{type(exc).__name__}: {exc}") from exc


def _as_is(item: Any) -> Any:
    return item


def iter_batches(
    source: Source, *, batch_size: int, device: torch.device, num_workers: int = 0, batches: list[int] | None = None,
    views: Views | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    """``(start_row, inputs, labels, records)`` for each batch (all, or the indices in ``batches``),
    inputs on ``device``; with ``views``, see :class:`_Blocks`."""
    loader = torch.utils.data.DataLoader(
        _Blocks(source, batch_size, batches, views),
        batch_size=None,
        collate_fn=_as_is,  # the records stay numpy arrays, as they are stored
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for start, x, y, records in loader:
        yield start, x.to(device, non_blocking=True), y, records


def iter_logits(
    model: torch.nn.Module,
    source: Source,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    batches: list[int] | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start_row, logits_on_device, labels)`` for every batch of ``source`` (or those in ``batches``);
    the logits are ``[batch, ..., classes]``.

    Example::

        logits = torch.cat([out.cpu() for _, out, _ in iter_logits(model, open_data("mnist1d://test"))])
    """
    device = torch.device(device)
    forward = TeacherForward(model, device, precision, channels_last)
    for start, x, y, _ in iter_batches(source, batch_size=batch_size, device=device, num_workers=num_workers, batches=batches):
        yield start, forward(x, f"samples {start}..{start + len(y) - 1}"), y


def iter_view_logits(
    model: torch.nn.Module,
    source: Source,
    views: Views,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    batches: list[int] | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    """``(start_row, logits [rows, V, ..., classes], labels, records)`` for every batch of
    ``batch_size // V`` samples (or those in ``batches``): each sample's ``V`` views are drawn
    (``records``, see :class:`softlabels.views.Views`), made, and run through the teacher together.

    Example::

        views = Views(4, Pipeline((Shift(max=6),)))
        start, logits, labels, records = next(iter_view_logits(model, open_data("mnist1d://train"), views))
    """
    device = torch.device(device)
    forward = TeacherForward(model, device, precision, channels_last)
    for start, inputs, y, records in iter_batches(source, batch_size=max(1, batch_size // views.count), device=device,
                                                  num_workers=num_workers, batches=batches, views=views):
        out = forward(inputs, f"the views of samples {start}..{start + len(y) - 1}")
        yield start, out.reshape(len(y), views.count, *out.shape[1:]), y, records


class TeacherForward:
    """The teacher's forward pass on a batch, in inference mode and the dump's autocast precision;
    with ``channels_last``, images (``[B, C, H, W]``) and the model in that memory format, which
    convolutions on tensor cores run faster in."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool = False):
        if precision not in PRECISIONS:
            raise SoftlabelsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
        self.model, self.device, self.autocast = model.eval().to(device), device, PRECISIONS[precision]
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # The modes are entered per batch, never held across a yield: a suspended generator would
        # otherwise leave the caller's thread in inference mode.
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            try:
                out = self.model(x)
            except Exception as exc:
                hint = ""
                if not x.is_floating_point() and isinstance(exc, (IndexError, RuntimeError)) and "index" in str(exc):
                    hint = f" (the token ids go up to {int(x.max())}: are they beyond the teacher's vocabulary?)"
                raise SoftlabelsError(
                    f"the model failed on {what} (inputs {list(x.shape[1:])}): {type(exc).__name__}: {exc}{hint}"
                ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != len(x):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SoftlabelsError(f"the teacher must output [batch, ..., classes]; it gave {shape} for a batch of {len(x)}")
        return out


@dataclass
class DumpResult:
    path: Path
    num_samples: int
    num_classes: int
    bytes_on_disk: int
    seconds: float
    teacher_accuracy: float | None
    labeled: int
    resumed_chunks: int = 0

    def summary(self) -> str:
        if self.teacher_accuracy is not None:
            accuracy = f"{self.teacher_accuracy:.2%} on {self.labeled} labeled"
        else:
            accuracy = "n/a (no labels)" if not self.labeled else "n/a (a resumed dump of drawn classes cannot count the chunks it kept)"
        resumed = f" ({self.resumed_chunks} chunks kept from the interrupted dump)" if self.resumed_chunks else ""
        return (
            f"wrote {self.path}: {self.num_samples} samples x {self.num_classes} classes, "
            f"{self.bytes_on_disk / 2**20:.2f} MiB on disk, {self.seconds:.1f} s, teacher accuracy {accuracy}{resumed}"
        )


class _Accuracy:
    """Teacher accuracy on the items :func:`~softlabels.views.scored_items` scores (labeled ones; in a
    mixed view, those whose own label weighs at least half), counted chunk by chunk."""

    def __init__(self) -> None:
        self.correct = self.labeled = 0

    def add(self, predicted: np.ndarray, labels: np.ndarray, records: dict[str, np.ndarray]) -> None:
        scored = scored_items(labels, records, mix_weights(records))
        self.correct += int((predicted[scored] == labels[scored]).sum())
        self.labeled += int(scored.sum())


class _ChunkWriter(threading.Thread):
    """Assembles batches into whole chunks and writes the ``pending`` ones; runs beside inference."""

    def __init__(self, writer: CacheWriter, pending: set[int], accuracy: _Accuracy, check_finite: bool):
        super().__init__(name="softlabels-writer", daemon=True)
        self.writer, self.pending, self.accuracy = writer, pending, accuracy
        self.check_finite = check_finite
        self.inbox: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self._parts: dict[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._filled: dict[int, int] = {}
        self._done: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._waiting_since = 0.0  # when the oldest unwritten finished chunk was finished

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.inbox.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        received_end = False
        try:
            while True:
                wait = max(0.0, self._waiting_since + _WRITE_WAIT - time.monotonic()) if self._done else None
                try:
                    item = self.inbox.get(timeout=wait)
                except queue.Empty:  # a slow teacher: the finished chunks have waited long enough
                    self._flush()
                    continue
                if item is None:
                    break
                start, targets, finite, predicted, labels, ready = item
                if ready is not None:
                    ready.synchronize()
                arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in targets.items()}
                self._add(start, arrays, finite.numpy(), predicted.numpy(), labels.numpy())
                if len(self._done) >= _WRITE_GROUP or (self._done and time.monotonic() >= self._waiting_since + _WRITE_WAIT):
                    self._flush()
            received_end = True
            self._flush()
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
            while not received_end and self.inbox.get() is not None:  # the producer must never block on a dead writer
                pass

    def _add(self, start: int, targets: dict[str, np.ndarray], finite: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> None:
        if self.check_finite and not finite.all():
            float16 = any(t.dtype == np.float16 for t in targets.values())
            hint = " (float16 overflows beyond 65504: try --store-dtype float32)" if float16 else ""
            raise SoftlabelsError(
                f"teacher logits are NaN or Inf at sample {start + int(np.flatnonzero(~finite)[0])}{hint}; "
                "nothing was published (pass --allow-nonfinite to store them anyway)"
            )
        rows = self.writer.chunk_rows
        stop = start + len(labels)
        for chunk in range(start // rows, (stop - 1) // rows + 1):
            if chunk not in self.pending:
                continue
            lo, hi = self.writer.chunk_bounds(chunk)
            a, b = max(lo, start), min(hi, stop)
            part = ({k: v[a - start:b - start] for k, v in targets.items()}, predicted[a - start:b - start], labels[a - start:b - start])
            self._parts.setdefault(chunk, []).append((a - lo, *part))
            self._filled[chunk] = self._filled.get(chunk, 0) + (b - a)
            if self._filled[chunk] == hi - lo:
                if not self._done:
                    self._waiting_since = time.monotonic()
                parts = [part[1:] for part in sorted(self._parts.pop(chunk), key=lambda part: part[0])]
                self._done[chunk] = _concat_parts(parts)
                del self._filled[chunk]

    def _flush(self) -> None:
        """Write the finished chunks, each run of consecutive ones in one store call."""
        for first, run in _consecutive_runs(sorted(self._done)):
            arrays, predicted, labels = _concat_parts([self._done[c] for c in run])
            records = {r.name: arrays.pop(r.name) for r in self.writer.layout.records}
            self.writer.write_chunks(first, arrays, labels, records)
            self.accuracy.add(predicted, labels, records)
        self._done.clear()


def _concat_parts(parts: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Row-wise concatenation of ``(targets, predicted, labels)`` parts (one part is returned as it is:
    a batch that fills its chunk, or a run of one chunk, is not copied)."""
    if len(parts) == 1:
        return parts[0]
    targets = {name: _joined([part[0][name] for part in parts]) for name in parts[0][0]}
    return targets, _joined([part[1] for part in parts]), _joined([part[2] for part in parts])


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays`` one after another: a view when they are consecutive rows of one array (the chunks
    one batch filled: 16 chunks of a token batch are 67 MB a copy would move again), else a copy."""
    base = arrays[0].base
    if isinstance(base, np.ndarray) and base.flags.c_contiguous and base.ndim:
        step, origin = base.strides[0], base.__array_interface__["data"][0]
        first = (arrays[0].__array_interface__["data"][0] - origin) // step if step else 0
        end = first
        for a in arrays:
            if (a.base is not base or a.dtype != base.dtype or a.shape[1:] != base.shape[1:] or not a.flags.c_contiguous
                    or a.__array_interface__["data"][0] != origin + end * step):
                break
            end += len(a)
        else:
            return base[first:end]
    return np.concatenate(arrays)


def _consecutive_runs(indices: list[int]) -> Iterator[tuple[int, list[int]]]:
    run: list[int] = []
    for index in indices:
        if run and index != run[-1] + 1:
            yield run[0], run
            run = []
        run.append(index)
    if run:
        yield run[0], run


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in pinned host memory, started without waiting; the writer synchronises before use."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _check_labels(labels: torch.Tensor, num_classes: int, start: int) -> None:
    bad = ((labels < 0) & (labels != NO_LABEL) & (labels != UNUSABLE)) | (labels >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise SoftlabelsError(
            f"label {int(labels[i])} at sample {start + i} is out of range for a teacher with {num_classes} classes"
        )


# What a resumed dump must share with the interrupted one for its bytes to be the same.
_RESUME_KEYS = {
    "teacher checkpoint (sha256)": ("teacher", "sha256"),
    "teacher architecture": ("teacher", "arch"),
    "teacher architecture arguments": ("teacher", "arch_kwargs"),
    "dataset fingerprint": ("dataset", "fingerprint"),
    "number of samples": ("num_samples",),
    "store dtype": ("dtype",),
    "rows per chunk": ("chunk_rows",),
    "logits compression": ("compress_logits",),
    "batch size": ("batch_size",),
    "precision": ("precision",),
    "memory format": ("channels_last",),
    "device type": ("device",),
    "views and augmentations": ("views",),
    "token windows and tokenizer": ("tokens", "tokenizer"),
}


def _lookup(manifest: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = manifest
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _open_for_resume(out: Path, expected: dict[str, Any], kind: TargetKind, item_axes: tuple[str, ...],
                     source: Source, compress_logits: bool) -> CacheWriter | None:
    """The interrupted dump's writer, or ``None`` when there is nothing usable to resume.

    A dataset whose rows carry content digests (an image folder) may have changed since: a corrupt
    file fixed or removed. Its chunks are then kept only where every row's file is unchanged
    (:func:`_committed_chunks`), and a changed number of rows gives a new partial cache that takes
    over the chunks before the first change (:func:`_resized`).
    """
    partial = partial_path(out)
    if not partial.exists():
        log.info("no %s to resume: starting a new dump", partial)
        return None
    try:
        writer = CacheWriter.resume(out)
    except SoftlabelsError as exc:
        if backend_name(out) == "hdf5":
            log.warning("the partial HDF5 file %s is unreadable (%s): starting again", partial, exc)
            return None
        raise SoftlabelsError(f"cannot resume {partial}: {exc}") from exc
    differences = [] if writer.layout.kind == kind else [f"cache kind was {writer.layout.kind.settings()}, now {kind.settings()}"]
    recorded_axes = tuple(name for name, _ in writer.layout.item_axes)
    if recorded_axes != item_axes:
        differences.append(f"item axes were {list(recorded_axes)}, now {list(item_axes)}")
    by_digest = source.content_digests() is not None and any(r.name == DIGEST for r in writer.layout.records)
    for what, keys in _RESUME_KEYS.items():
        if by_digest and keys in (("dataset", "fingerprint"), ("num_samples",)):
            continue
        was, now = _lookup(writer.manifest, keys), _lookup(expected, keys)
        if keys == ("views",):  # replay versions may differ; what is drawn may not
            was, now = ({k: v for k, v in (m or {}).items() if k != "versions"} or None for m in (was, now))
            if was != now:
                differences.append(f"{what} were {was!r}, now {now!r}")
            continue
        if now is not None and was != now:
            differences.append(f"{what} was {was!r}, now {now!r}")
    if differences:
        writer.close()
        raise SoftlabelsError(f"cannot resume {partial}: " + "; ".join(differences))
    writer.manifest["dataset"] = expected["dataset"]
    if writer.layout.num_samples != len(source):
        writer = _resized(writer, source, compress_logits)
    return writer


def _resized(old: CacheWriter, source: Source, compress_logits: bool) -> CacheWriter:
    """A new partial cache with ``source``'s number of rows, given every committed chunk of the
    interrupted dump ``old`` that holds the same rows in both and whose files are unchanged."""
    aside = old.path.with_name(f"{old.path.stem}.resized{old.path.suffix}")
    dataset = old.manifest["dataset"]
    old.close()
    remove_path(partial_path(aside))
    os.replace(old.partial, partial_path(aside))  # read from there while PATH.partial is made anew
    previous = CacheWriter.resume(aside)
    with previous:
        writer = CacheWriter(old.path, dataclasses.replace(previous.layout, num_samples=len(source)),
                             manifest={**previous.manifest, "dataset": dataset}, compress_logits=compress_logits)
        recorded = previous.recorded_checksums()
        for chunk in range(min(previous.num_chunks, writer.num_chunks)):
            if recorded[chunk] < 0 or previous.chunk_bounds(chunk) != writer.chunk_bounds(chunk):
                continue
            stored = _stored_chunk(previous, chunk, recorded[chunk], source)
            if stored is not None:
                writer.write_chunks(chunk, *stored)
    remove_path(partial_path(aside))
    return writer


def _stored_chunk(writer: CacheWriter, chunk: int, checksum: int, source: Source) -> tuple | None:
    """Chunk ``chunk``'s targets, labels and records if they match ``checksum`` and, where rows carry
    content digests, every row's file and label are still the source's; else ``None``."""
    try:
        targets, labels, records = writer.read_chunk(chunk)
    except Exception:  # an unreadable chunk is simply written again
        return None
    if chunk_checksum(targets, labels, records) != checksum:
        return None
    if DIGEST in records:
        start, stop = writer.chunk_bounds(chunk)
        if stop > len(source):
            return None
        now = source.content_digests()[start:stop, :DIGEST_BYTES]
        if not (np.array_equal(records[DIGEST], now) and np.array_equal(labels, source.labels_of(np.arange(start, stop)))):
            return None
    return targets, labels, records


def _committed_chunks(writer: CacheWriter, accuracy: _Accuracy, chunks: range, source: Source) -> set[int]:
    """Those of ``chunks`` that :func:`_stored_chunk` keeps (counted into ``accuracy``)."""
    kept = set()
    recorded = writer.recorded_checksums()
    for chunk in (c for c in chunks if recorded[c] >= 0):
        stored = _stored_chunk(writer, int(chunk), recorded[chunk], source)
        if stored is not None:
            kept.add(int(chunk))
            accuracy.add(writer.layout.kind.top_class(stored[0]), *stored[1:])
    return kept


def dump(
    teacher: LoadedModel,
    source: Source,
    out: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    channels_last: bool = False,
    store_dtype: str = "float16",
    chunk_rows: int | None = None,
    compress_logits: bool = False,
    kind: TargetKind = Dense(),
    item_axes: tuple[str, ...] = (),
    views: Views | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    check_finite: bool = True,
    skip_bad_files: bool = False,
    progress: bool = True,
) -> DumpResult:
    """Run ``teacher`` over ``source`` and write its targets to the cache at ``out``.

    ``kind`` chooses what is stored (:mod:`softlabels.kinds`: ``Dense()``, ``TopK(k=10)``,
    ``Sampled(samples=12)``). A teacher whose output is ``[batch, *items, classes]`` needs one name
    per item axis in ``item_axes`` (``("token",)``); each item gets its sample's label.

    With ``views`` (:class:`softlabels.views.Views`) the teacher runs on ``views.count`` augmented
    views of every sample instead, and their parameters are stored with the targets (item axis
    ``view``); the teacher's forward batches hold ``batch_size`` views.

    With ``resume=True`` an interrupted dump (``out.partial``) continues from its committed chunks,
    provided the teacher, data and storage options are the ones it recorded.

    An input that cannot be read (a corrupt image) stops the dump with an error naming it; the chunks
    committed before it are kept for ``resume``. With ``skip_bad_files`` it is stored as zeros labelled
    :data:`~softlabels.data.UNUSABLE` (no loss in training) and listed in the manifest's ``skipped``.
    """
    out = Path(out)
    backend_name(out)  # a path of another suffix is refused before anything is run, made or replaced
    if not isinstance(teacher, LoadedModel):  # a bare module has no file, checksum or architecture to record
        raise SoftlabelsError(f"the teacher must be a softlabels.load_model(...) result, got a {type(teacher).__name__}: "
                              "save the module with softlabels.save_checkpoint and load it")
    if len(source) == 0:
        raise SoftlabelsError(f"dataset {source.spec} is empty")
    if precision not in PRECISIONS:
        raise SoftlabelsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    if resume and overwrite:  # continue the partial cache, or discard it: as train-student has it
        raise SoftlabelsError("give --resume or --overwrite, not both")
    if skip_bad_files:
        source.skip_bad_files()
    if views is not None:
        if item_axes or isinstance(source, TokenSource):
            raise SoftlabelsError("a dump with views has the one item axis 'view', and no token windows")
        views.pipeline.check_input(source.input_shape, where=f"--augment on {source.spec}")
        item_axes = (VIEW_AXIS,)
    if isinstance(source, TokenSource):
        item_axes = item_axes or (TOKEN_AXIS,)
    teacher.check_data(source, "teacher")
    rank, size = distributed.world()
    if size > 1 and backend_name(out) == "hdf5":
        raise SoftlabelsError("an HDF5 file has one writer: under torchrun, dump to a .zarr path")
    dev = resolve_device(device)
    if dev.type == "cuda" and size > 1:
        dev = torch.device("cuda", torch.cuda.current_device())
    if num_workers is None:
        num_workers = default_workers(source, dev)
    began = time.perf_counter()
    if views is None:
        def logits_of(batches: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
            for start, out, y in iter_logits(teacher.model, source, batch_size=batch_size, device=dev, precision=precision,
                                             num_workers=num_workers, batches=batches, channels_last=channels_last):
                yield start, out, y, {}
        batch_rows = batch_size
    else:
        logits_of = functools.partial(iter_view_logits, teacher.model, source, views, batch_size=batch_size, device=dev,
                                      precision=precision, num_workers=num_workers, channels_last=channels_last)
        batch_rows = max(1, batch_size // views.count)
    digests = source.content_digests()
    if digests is not None:  # each row's file, so that a resumed dump can tell which chunks still hold
        logits_of = functools.partial(_with_digests, logits_of, digests[:, :DIGEST_BYTES])
    accuracy = _Accuracy()
    first = None
    with exclusive(out, "dump") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            writer, first = _start(out, teacher, source, logits_of, kind, tuple(item_axes), views, overwrite=overwrite, resume=resume,
                                   expected={"precision": precision, "channels_last": channels_last, "device": dev.type, "batch_size": batch_size,
                                             "dtype": store_dtype, "chunk_rows": chunk_rows, "compress_logits": compress_logits})
        distributed.barrier()  # rank 0 has made (or reopened) the partial cache the others now open
        if rank != 0:
            writer = CacheWriter.resume(out)
        # Each rank owns a contiguous, chunk-aligned range of rows; batches are fixed by the batch size
        # alone, so the bytes do not depend on how many ranks there are.
        mine = range(writer.num_chunks * rank // size, writer.num_chunks * (rank + 1) // size)
        kept = _committed_chunks(writer, accuracy, mine, source)
        pending = set(mine) - kept
        bounds = [writer.chunk_bounds(c) for c in sorted(pending)]
        batches = sorted({b for lo, hi in bounds for b in range(lo // batch_rows, (hi - 1) // batch_rows + 1)})
        if first is not None and batches[:1] == [0]:
            stream = itertools.chain([first], logits_of(batches=batches[1:]))
        else:
            stream = logits_of(batches=batches)
        with writer:
            thread = _ChunkWriter(writer, pending, accuracy, check_finite)
            fed = False
            try:
                _feed(thread, stream, layout=writer.layout, device=dev, rows=sum(hi - lo for lo, hi in bounds),
                      progress=progress and rank == 0)
                fed = True
                distributed.barrier()  # every rank's chunks are written
                correct, labeled = distributed.sum_ints(accuracy.correct, accuracy.labeled)
                kept_chunks = distributed.sum_ints(len(kept))[0]
                # The chunks a resumed dump kept are counted by the class their stored targets give, which
                # is the teacher's own top class except where the kind keeps only some classes it drew.
                counted = labeled and not (kept_chunks and writer.layout.kind.top_class_estimate)
                teacher_accuracy = correct / labeled if counted else None
                if rank == 0:
                    skipped = _skipped(writer, source) if skip_bad_files else []
                    writer.finish(teacher_accuracy=teacher_accuracy, **({"skipped": skipped} if skipped else {}))
            except Exception as exc:
                if isinstance(exc, OSError) and (exc is thread.error or fed):  # the writer's: the dataset's reads are not
                    reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                    raise SoftlabelsError(
                        f"cannot write {writer.partial}: {reason}; the chunks written so far are kept: "
                        "fix the cause and rerun with --resume"
                    ) from exc
                # bad input (a label out of range, a file that does not decode, a Dataset that raises)
                if size == 1 and not kept and _nothing_committed(writer):
                    # nothing to resume: a partial left behind would only block the next dump
                    writer.close()
                    remove_path(writer.partial)
                raise
    distributed.barrier()  # the cache is published
    return DumpResult(
        path=out,
        num_samples=len(source),
        num_classes=writer.layout.num_classes,
        bytes_on_disk=directory_bytes(out),
        seconds=time.perf_counter() - began,
        teacher_accuracy=teacher_accuracy,
        labeled=labeled,
        resumed_chunks=kept_chunks,
    )


def _nothing_committed(writer: CacheWriter) -> bool:
    """Whether no chunk of the partial cache is committed (a record that cannot be read counts as some)."""
    try:
        return not (writer.recorded_checksums() >= 0).any()
    except Exception:
        return False


def _with_digests(logits_of: Any, digests: np.ndarray, batches: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    for start, logits, labels, records in logits_of(batches=batches):
        yield start, logits, labels, {**records, DIGEST: digests[start:start + len(logits)]}


def _skipped(writer: CacheWriter, source: Source) -> list[dict[str, Any]]:
    """The rows stored as unusable, with what each was read from: the manifest's ``skipped``."""
    labels = writer.labels()
    rows = np.flatnonzero((labels == UNUSABLE).reshape(len(labels), -1).any(axis=1))
    return [{"row": int(i), "name": source.row_name(int(i))} for i in rows]


def _start(
    out: Path, teacher: LoadedModel, source: Source, logits_of: Any, kind: TargetKind, item_axes: tuple[str, ...],
    views: Views | None, *, overwrite: bool, resume: bool, expected: dict[str, Any],
) -> tuple[CacheWriter, tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]] | None]:
    """Reopen the interrupted dump, or make a new partial cache; the latter needs the first batch's
    output for the number of classes and items, which is returned so that it is not computed twice."""
    interrupted = resume and partial_path(out).exists()  # a dump with --overwrite, stopped before it replaced OUT
    if out.exists() or out.is_symlink():
        if not (overwrite or interrupted):
            if resume:
                raise SoftlabelsError(f"{out} is complete already: there is nothing to resume (`softlabels verify {out}` "
                                      "checks it; --overwrite dumps it again)")
            raise SoftlabelsError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    if partial_path(out).exists() and not (resume or overwrite):
        raise SoftlabelsError(
            f"{partial_path(out)} holds an interrupted dump: pass --resume to continue it or --overwrite to discard it"
        )
    manifest = {
        "teacher": teacher.describe(),
        "dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": len(source), **source.describe()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "softlabels_version": __version__,
        "torch_version": torch.__version__,
        "precision": expected["precision"],
        "channels_last": expected["channels_last"],
        "device": expected["device"],
        "batch_size": expected["batch_size"],
        **({"views": views.settings()} if views is not None else {}),
    }
    if isinstance(source, TokenSource):
        manifest["tokens"] = token_manifest(source, None)
    if resume:
        writer = _open_for_resume(out, {**manifest, **expected, "num_samples": len(source)}, kind, item_axes, source,
                                  expected["compress_logits"])
        if writer is not None:
            return writer, None
    first = next(logits_of(batches=[0]))
    shape = tuple(first[1].shape)
    if len(shape) != 2 + len(item_axes):
        raise SoftlabelsError(
            f"the teacher outputs {list(shape)} for a batch; expected [batch, {''.join(a + ', ' for a in item_axes)}classes]"
        )
    num_classes = shape[-1]
    kind.validate(num_classes=num_classes, where="the cache kind")
    if isinstance(source, TokenSource):
        manifest["tokens"] = token_manifest(source, num_classes)
    axes = tuple(zip(item_axes, shape[1:-1]))
    records = views.records(source.input_shape) if views is not None else ()
    if isinstance(source, TokenSource):
        records = (gold_record(source.input_shape[0]),)
    if source.content_digests() is not None:
        records += (Record(DIGEST, np.dtype(np.uint8), (DIGEST_BYTES,)),)
    layout = Layout(kind, len(source), num_classes, expected["dtype"], expected["chunk_rows"] or 1, axes, records)
    if not expected["chunk_rows"]:
        # The loader reads an array's inputs a window of chunks at a time (counted here at 4 bytes a
        # value), and inputs read item by item (images to decode) a batch at a time.
        inputs = 0 if source.reads_items else 4 * math.prod(source.input_shape)
        layout = dataclasses.replace(layout, chunk_rows=default_chunk_rows(layout.row_bytes, out, inputs))
    writer = CacheWriter(out, layout, manifest=manifest, compress_logits=expected["compress_logits"])
    return writer, first


def _feed(
    thread: _ChunkWriter,
    stream: Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]],
    *,
    layout: Layout,
    device: torch.device,
    rows: int,
    progress: bool,
) -> None:
    """Hand the teacher's batches to the writer thread; re-raise whatever stopped either side."""
    out_dtype = getattr(torch, layout.dtype)
    thread.start()
    bar = tqdm(total=rows, unit="samples", unit_scale=True, desc="dump", disable=None if progress else True)
    try:
        for start, logits, labels, records in stream:
            if tuple(logits.shape[1:]) != (*layout.items, layout.num_classes):
                raise SoftlabelsError(
                    f"the teacher gives {list(logits.shape[1:])} per sample at sample {start}; "
                    f"the cache holds {[*layout.items, layout.num_classes]}"
                )
            _check_labels(labels, layout.num_classes, start)
            if labels.shape != logits.shape[:-1]:  # one label per sample: each of its items gets it
                labels = labels.reshape(-1, *([1] * len(layout.items))).expand(-1, *layout.items)
            # Cast, rank, check (and sparsify) on the device: finiteness of the stored values catches
            # float16 overflow too, and only what is stored crosses to the host.
            rows_here = torch.arange(start, start + len(logits), device=logits.device)
            stored = layout.kind.build(logits, rows=rows_here, store_dtype=out_dtype)
            if any(r.name == GOLD for r in layout.records):
                records = {**records, GOLD: gold_logprob(logits, labels, layout.kind.log_partition_at_one(logits, stored))}
            predicted = layout.kind.predicted(logits, stored)
            finite = layout.kind.finite(logits, stored).reshape(len(logits), -1).all(1)
            if device.type == "cuda":  # records drawn on the host (views) are numpy and stay there
                host = {k: _to_host(v) for k, v in stored.items()}
                records = {k: _to_host(v) if isinstance(v, torch.Tensor) else v for k, v in records.items()}
                finite, predicted = _to_host(finite), _to_host(predicted)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host, ready = stored, None
            thread.put((start, {**host, **records}, finite, predicted.cpu(), labels.contiguous(), ready))
            bar.update(len(labels))
    finally:
        bar.close()
        thread.inbox.put(None)
        thread.join()
    if thread.error is not None:
        raise thread.error
