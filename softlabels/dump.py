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
from .store import CacheWriter, backend_name, default_chunk_rows, directory_bytes

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
    """Item ``k`` is the ``k``-th contiguous batch of a source, so DataLoader workers read slices."""

    def __init__(self, source: Source, batch_size: int):
        self.source, self.batch_size = source, batch_size

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        start = k * self.batch_size
        x, y = self.source.read(start, min(start + self.batch_size, len(self.source)))
        return start, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def iter_batches(
    source: Source, *, batch_size: int, device: torch.device, num_workers: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start_row, inputs, labels)`` in row order, inputs already on ``device``."""
    loader = torch.utils.data.DataLoader(
        _Blocks(source, batch_size),
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
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start_row, logits_on_device, labels)`` for every batch of ``source``, in eval mode.

    Example:
        >>> logits = torch.cat([out.cpu() for _, out, _ in iter_logits(model, open_data("mnist1d://test"))])
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise SoftlabelsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    autocast_dtype = PRECISIONS[precision]
    model.eval().to(device)
    with torch.inference_mode():
        for start, x, y in iter_batches(source, batch_size=batch_size, device=device, num_workers=num_workers):
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

    def summary(self) -> str:
        accuracy = "n/a (no labels)" if self.teacher_accuracy is None else f"{self.teacher_accuracy:.2%} on {self.labeled} labeled"
        return (
            f"wrote {self.path}: {self.num_samples} samples x {self.num_classes} classes, "
            f"{self.bytes_on_disk / 2**20:.2f} MiB on disk, {self.seconds:.1f} s, teacher accuracy {accuracy}"
        )


class _ChunkWriter(threading.Thread):
    """Assembles batches into whole chunks and writes them; runs beside the inference loop."""

    def __init__(self, writer: CacheWriter, num_classes: int, dtype: str, check_finite: bool):
        super().__init__(name="softlabels-writer", daemon=True)
        self.writer = writer
        self.check_finite = check_finite
        self.inbox: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
        self.error: BaseException | None = None
        rows = writer.chunk_rows
        self._logits = np.empty((rows, num_classes), dtype=dtype)
        self._labels = np.empty(rows, dtype=np.int64)
        self._filled = 0
        self._chunk = 0

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
        offset = 0
        while offset < len(logits):
            chunk_start, chunk_stop = self.writer.chunk_bounds(self._chunk)
            room = (chunk_stop - chunk_start) - self._filled
            take = min(room, len(logits) - offset)
            self._logits[self._filled:self._filled + take] = logits[offset:offset + take]
            self._labels[self._filled:self._filled + take] = labels[offset:offset + take]
            self._filled += take
            offset += take
            if self._filled == chunk_stop - chunk_start:
                self.writer.write_chunk(self._chunk, self._logits[:self._filled], self._labels[:self._filled])
                self._chunk += 1
                self._filled = 0


def _check_labels(labels: torch.Tensor, num_classes: int, start: int) -> None:
    bad = (labels < NO_LABEL) | (labels >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise SoftlabelsError(
            f"label {int(labels[i])} at sample {start + i} is out of range for a teacher with {num_classes} classes"
        )


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
    check_finite: bool = True,
    progress: bool = True,
) -> DumpResult:
    """Run ``teacher`` over ``source`` and write its logits to the cache at ``out``."""
    out = Path(out)
    backend_name(out)
    if out.exists() and not overwrite:
        raise SoftlabelsError(f"{out} already exists; pass --overwrite to replace it")
    if len(source) == 0:
        raise SoftlabelsError(f"dataset {source.spec} is empty")
    dev = resolve_device(device)
    began = time.perf_counter()
    batches = iter_logits(teacher.model, source, batch_size=batch_size, device=dev, precision=precision, num_workers=num_workers)
    start, logits, labels = next(batches)  # the first batch tells the number of classes, before any write
    num_classes = int(logits.shape[1])
    chunk_rows = chunk_rows or default_chunk_rows(num_classes, store_dtype)
    manifest = {
        "teacher": teacher.describe(),
        "dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": len(source)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "softlabels_version": __version__,
        "torch_version": torch.__version__,
        "precision": precision,
        "device": dev.type,
    }
    out_dtype = getattr(torch, store_dtype)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    labeled = torch.zeros((), dtype=torch.int64, device=dev)
    with CacheWriter(
        out, num_samples=len(source), num_classes=num_classes, chunk_rows=chunk_rows, dtype=store_dtype, manifest=manifest
    ) as writer:
        thread = _ChunkWriter(writer, num_classes, store_dtype, check_finite)
        thread.start()
        bar = tqdm(total=len(source), unit="samples", unit_scale=True, desc="dump", disable=None if progress else True)
        try:
            while True:
                if logits.shape[1] != num_classes:
                    raise SoftlabelsError(f"the teacher gave {logits.shape[1]} classes at sample {start}, {num_classes} before")
                _check_labels(labels, num_classes, start)
                y = labels.to(dev, non_blocking=True)
                has_label = y != NO_LABEL
                correct += ((logits.argmax(1) == y) & has_label).sum()
                labeled += has_label.sum()
                stored = logits.to(out_dtype)
                if dev.type == "cuda":
                    host = torch.empty(stored.shape, dtype=out_dtype, pin_memory=True)
                    host.copy_(stored, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                else:
                    host, ready = stored, None
                thread.put((start, host, labels, ready))
                bar.update(len(labels))
                try:
                    start, logits, labels = next(batches)
                except StopIteration:
                    break
        finally:
            bar.close()
            thread.inbox.put(None)
            thread.join()
        if thread.error is not None:
            raise thread.error
        labeled_count = int(labeled)
        accuracy = int(correct) / labeled_count if labeled_count else None
        writer.finish(teacher_accuracy=accuracy)
    return DumpResult(
        path=out,
        num_samples=len(source),
        num_classes=num_classes,
        bytes_on_disk=directory_bytes(out),
        seconds=time.perf_counter() - began,
        teacher_accuracy=accuracy,
        labeled=labeled_count,
    )
