"""Run a teacher over a dataset and store its logits: the one expensive pass, done once.

The main thread only feeds the model: each batch's logits are cast to the storage dtype on the
device, copied to the host (into pinned buffers, without blocking, on CUDA) and handed through a
bounded queue to a writer thread, which assembles whole chunks, checks them, compresses and writes
them. Compression and storage writes release the GIL, so they overlap with the next batches.

Example:
    >>> teacher = load_model("teacher.pth")
    >>> result = dump(teacher, open_data("mnist1d://train"), "train.zarr")
    >>> result.num_samples, result.num_classes
    (4000, 10)
"""

from __future__ import annotations

import errno
import logging
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

from . import __version__
from .checkpoint import LoadedModel
from .data import NO_LABEL, Source
from .errors import SoftlabelsError
from .store import CacheWriter, backend_name, chunk_checksum, default_chunk_rows, directory_bytes, dump_lock, partial_path

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_QUEUE_BATCHES = 8


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SoftlabelsError(f"device {name} requested but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise SoftlabelsError(f"unknown device {name!r}") from exc


class _Blocks(torch.utils.data.Dataset):
    """Item ``i`` is batch ``batches[i]``: rows ``[b * batch_size, (b + 1) * batch_size)``.

    Batch boundaries are fixed by the batch size alone, so a resumed dump feeds the teacher exactly
    the batches an uninterrupted one would, and gets the same bytes.
    """

    def __init__(self, source: Source, batch_size: int, batches: list[int] | None = None):
        self.source, self.batch_size = source, batch_size
        self.batches = list(range(-(-len(source) // batch_size))) if batches is None else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        start = self.batches[i] * self.batch_size
        x, y = self.source.read(start, min(start + self.batch_size, len(self.source)))
        return start, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def iter_batches(
    source: Source, *, batch_size: int, device: torch.device, num_workers: int = 0, batches: list[int] | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start_row, inputs, labels)`` for each batch (all, or the indices in ``batches``), inputs on ``device``."""
    loader = torch.utils.data.DataLoader(
        _Blocks(source, batch_size, batches),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for start, x, y in loader:
        yield start, x.to(device, non_blocking=True), y


def iter_logits(
    model: torch.nn.Module,
    source: Source,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    batches: list[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start_row, logits_on_device, labels)`` for every batch of ``source`` (or those in ``batches``).

    Example:
        >>> logits = torch.cat([out.cpu() for _, out, _ in iter_logits(model, open_data("mnist1d://test"))])
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise SoftlabelsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    autocast_dtype = PRECISIONS[precision]
    model.eval().to(device)
    with torch.inference_mode():
        for start, x, y in iter_batches(
            source, batch_size=batch_size, device=device, num_workers=num_workers, batches=batches
        ):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                try:
                    out = model(x)
                except Exception as exc:
                    raise SoftlabelsError(
                        f"the model failed on samples {start}..{start + len(y) - 1} "
                        f"(inputs {list(x.shape[1:])}): {type(exc).__name__}: {exc}"
                    ) from exc
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(y):
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise SoftlabelsError(f"the teacher must output [batch, classes]; it gave {shape} for a batch of {len(y)}")
            yield start, out, y


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
        accuracy = "n/a (no labels)" if self.teacher_accuracy is None else f"{self.teacher_accuracy:.2%} on {self.labeled} labeled"
        resumed = f" ({self.resumed_chunks} chunks kept from the interrupted dump)" if self.resumed_chunks else ""
        return (
            f"wrote {self.path}: {self.num_samples} samples x {self.num_classes} classes, "
            f"{self.bytes_on_disk / 2**20:.2f} MiB on disk, {self.seconds:.1f} s, teacher accuracy {accuracy}{resumed}"
        )


class _Accuracy:
    """Teacher accuracy on labeled rows, counted from the stored logits chunk by chunk."""

    def __init__(self) -> None:
        self.correct = self.labeled = 0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        has_label = labels != NO_LABEL
        self.correct += int((logits.argmax(1)[has_label] == labels[has_label]).sum())
        self.labeled += int(has_label.sum())

    @property
    def value(self) -> float | None:
        return self.correct / self.labeled if self.labeled else None


class _ChunkWriter(threading.Thread):
    """Assembles batches into whole chunks and writes the ``pending`` ones; runs beside inference."""

    def __init__(self, writer: CacheWriter, pending: set[int], accuracy: _Accuracy, check_finite: bool):
        super().__init__(name="softlabels-writer", daemon=True)
        self.writer, self.pending, self.accuracy = writer, pending, accuracy
        self.check_finite = check_finite
        self.inbox: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self._parts: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self._filled: dict[int, int] = {}

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
        try:
            while (item := self.inbox.get()) is not None:
                start, host_logits, labels, ready = item
                if ready is not None:
                    ready.synchronize()
                self._add(start, host_logits.numpy(), labels.numpy())
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
            while self.inbox.get() is not None:  # drain so the producer never blocks on a dead writer
                pass

    def _add(self, start: int, logits: np.ndarray, labels: np.ndarray) -> None:
        if self.check_finite:
            bad = ~np.isfinite(logits).all(axis=1)
            if bad.any():
                hint = " (float16 overflows beyond 65504: try --store-dtype float32)" if logits.dtype == np.float16 else ""
                raise SoftlabelsError(
                    f"teacher logits are NaN or Inf at sample {start + int(np.flatnonzero(bad)[0])}{hint}; "
                    "nothing was published (pass --allow-nonfinite to store them anyway)"
                )
        rows = self.writer.chunk_rows
        stop = start + len(logits)
        for chunk in range(start // rows, (stop - 1) // rows + 1):
            if chunk not in self.pending:
                continue
            lo, hi = self.writer.chunk_bounds(chunk)
            a, b = max(lo, start), min(hi, stop)
            self._parts.setdefault(chunk, []).append((a - lo, logits[a - start:b - start], labels[a - start:b - start]))
            self._filled[chunk] = self._filled.get(chunk, 0) + (b - a)
            if self._filled[chunk] == hi - lo:
                chunk_logits = np.empty((hi - lo, logits.shape[1]), dtype=logits.dtype)
                chunk_labels = np.empty(hi - lo, dtype=np.int64)
                for offset, part_logits, part_labels in self._parts.pop(chunk):
                    chunk_logits[offset:offset + len(part_logits)] = part_logits
                    chunk_labels[offset:offset + len(part_labels)] = part_labels
                self.writer.write_chunk(chunk, chunk_logits, chunk_labels)
                self.accuracy.add(chunk_logits, chunk_labels)
                del self._filled[chunk]


def _check_labels(labels: torch.Tensor, num_classes: int, start: int) -> None:
    bad = (labels < NO_LABEL) | (labels >= num_classes)
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
    "batch size": ("batch_size",),
    "precision": ("precision",),
    "device type": ("device",),
}


def _lookup(manifest: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = manifest
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _open_for_resume(out: Path, expected: dict[str, Any]) -> CacheWriter | None:
    """The interrupted dump's writer, or ``None`` when there is nothing usable to resume."""
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
    differences = []
    for what, keys in _RESUME_KEYS.items():
        was, now = _lookup(writer.manifest, keys), _lookup(expected, keys)
        if now is not None and was != now:
            differences.append(f"{what} was {was!r}, now {now!r}")
    if differences:
        writer.close()
        raise SoftlabelsError(f"cannot resume {partial}: " + "; ".join(differences))
    return writer


def _committed_chunks(writer: CacheWriter, accuracy: _Accuracy) -> set[int]:
    """Chunks of a reopened dump whose bytes match their recorded checksum (counted into ``accuracy``)."""
    kept = set()
    for chunk in np.flatnonzero(writer.recorded_checksums() >= 0):
        try:
            logits, labels = writer.read_chunk(int(chunk))
        except Exception:  # an unreadable chunk is simply written again
            continue
        if chunk_checksum(logits, labels) == writer.recorded_checksums()[chunk]:
            kept.add(int(chunk))
            accuracy.add(logits, labels)
    return kept


def dump(
    teacher: LoadedModel,
    source: Source,
    out: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    store_dtype: str = "float16",
    chunk_rows: int | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    check_finite: bool = True,
    progress: bool = True,
) -> DumpResult:
    """Run ``teacher`` over ``source`` and write its logits to the cache at ``out``.

    With ``resume=True`` an interrupted dump (``out.partial``) continues from its committed chunks,
    provided the teacher, data and storage options are the ones it recorded.
    """
    out = Path(out)
    backend_name(out)
    if len(source) == 0:
        raise SoftlabelsError(f"dataset {source.spec} is empty")
    if precision not in PRECISIONS:
        raise SoftlabelsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    dev = resolve_device(device)
    began = time.perf_counter()
    with dump_lock(out):
        if out.exists() and not overwrite:
            raise SoftlabelsError(f"{out} already exists; pass --overwrite to replace it")
        manifest = {
            "teacher": teacher.describe(),
            "dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": len(source)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "softlabels_version": __version__,
            "torch_version": torch.__version__,
            "precision": precision,
            "device": dev.type,
            "batch_size": batch_size,
        }
        expected = {**manifest, "num_samples": len(source), "dtype": store_dtype, "chunk_rows": chunk_rows}
        if partial_path(out).exists() and not (resume or overwrite):
            raise SoftlabelsError(
                f"{partial_path(out)} holds an interrupted dump: pass --resume to continue it or --overwrite to discard it"
            )
        accuracy = _Accuracy()
        writer = _open_for_resume(out, expected) if resume else None
        kept = _committed_chunks(writer, accuracy) if writer is not None else set()
        num_batches = -(-len(source) // batch_size)
        if writer is None:
            batches = list(range(num_batches))
        else:
            pending_rows = [writer.chunk_bounds(c) for c in range(writer.num_chunks) if c not in kept]
            batches = sorted({b for lo, hi in pending_rows for b in range(lo // batch_size, (hi - 1) // batch_size + 1)})
        stream = iter_logits(
            teacher.model, source, batch_size=batch_size, device=dev, precision=precision, num_workers=num_workers, batches=batches
        )
        first = next(stream, None)  # the first batch tells the number of classes, before any write
        if writer is None:
            num_classes = int(first[1].shape[1])
            writer = CacheWriter(
                out, num_samples=len(source), num_classes=num_classes,
                chunk_rows=chunk_rows or default_chunk_rows(num_classes, store_dtype), dtype=store_dtype, manifest=manifest,
            )
        num_classes = writer.manifest["num_classes"]
        pending = set(range(writer.num_chunks)) - kept
        with writer:
            thread = _ChunkWriter(writer, pending, accuracy, check_finite)
            rows = sum(hi - lo for lo, hi in map(writer.chunk_bounds, pending))
            try:
                _feed(thread, first, stream, num_classes=num_classes, store_dtype=store_dtype, device=dev, rows=rows, progress=progress)
                writer.finish(teacher_accuracy=accuracy.value)
            except OSError as exc:
                reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                raise SoftlabelsError(
                    f"cannot write {writer.partial}: {reason}; the chunks written so far are kept: "
                    "fix the cause and rerun with --resume"
                ) from exc
    return DumpResult(
        path=out,
        num_samples=len(source),
        num_classes=num_classes,
        bytes_on_disk=directory_bytes(out),
        seconds=time.perf_counter() - began,
        teacher_accuracy=accuracy.value,
        labeled=accuracy.labeled,
        resumed_chunks=len(kept),
    )


def _feed(
    thread: _ChunkWriter,
    first: tuple[int, torch.Tensor, torch.Tensor] | None,
    stream: Iterator[tuple[int, torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    store_dtype: str,
    device: torch.device,
    rows: int,
    progress: bool,
) -> None:
    """Hand the teacher's batches to the writer thread; re-raise whatever stopped either side."""
    out_dtype = getattr(torch, store_dtype)
    thread.start()
    bar = tqdm(total=rows, unit="samples", unit_scale=True, desc="dump", disable=None if progress else True)
    try:
        item = first
        while item is not None:
            start, logits, labels = item
            if logits.shape[1] != num_classes:
                raise SoftlabelsError(f"the teacher gives {logits.shape[1]} classes at sample {start}; the cache has {num_classes}")
            _check_labels(labels, num_classes, start)
            stored = logits.to(out_dtype)
            if device.type == "cuda":
                host = torch.empty(stored.shape, dtype=out_dtype, pin_memory=True)
                host.copy_(stored, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host, ready = stored, None
            thread.put((start, host, labels, ready))
            bar.update(len(labels))
            item = next(stream, None)
    finally:
        bar.close()
        thread.inbox.put(None)
        thread.join()
    if thread.error is not None:
        raise thread.error
