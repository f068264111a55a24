"""Check a cache against its own records, and optionally against its teacher.

Every chunk is read whole, as every command reads it (each against the store's own checksum: Zarr's
crc32c, HDF5's CRC-32C table or fletcher32), and its CRC-32 is compared with the one recorded at
dump time, which catches flipped bytes, truncated or missing chunk files and chunks a dump never
finished. ``recompute`` reruns the teacher on whole dump batches
chosen at random, the way the dump ran it (same batches, precision and autocast), and compares its
logits with the cached ones.

Example::

    report = verify_cache("train.zarr", recompute=64, teacher=load_model("teacher.pth"))
    report.ok, report.problems   # (True, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel
from .data import Source
from .dump import PRECISIONS, iter_logits, resolve_device
from .errors import SoftlabelsError
from .loader import source_for_cache
from .store import Cache, DamagedChunk, chunk_checksum, open_cache

# Relative tolerance of a recomputed logit by the precision the dump ran at (another device or
# library version may round differently); float16 storage adds its own rounding (2**-11) on top.
_RTOL = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2}


@dataclass
class VerifyReport:
    path: Path
    chunks: int = 0
    rows_recomputed: int = 0
    max_abs_difference: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(
    path: str | Path,
    *,
    recompute: int = 0,
    teacher: LoadedModel | None = None,
    source: Source | None = None,
    data_spec: str | None = None,
    seed: int = 0,
    device: str = "auto",
    trust_code: bool = False,
) -> VerifyReport:
    """Check manifest, completeness and every chunk's checksum; rerun ``teacher`` on at least
    ``recompute`` rows. Their inputs come from ``source``, or else as for
    :func:`softlabels.source_for_cache` with ``data_spec`` and ``trust_code``.
    """
    report = VerifyReport(Path(path))
    with open_cache(path, allow_incomplete=True) as cache:
        if not cache.manifest.get("complete"):
            report.problems.append("the cache is incomplete: its dump did not finish")
        recorded = cache.checksums()
        report.chunks = cache.num_chunks
        for index in range(cache.num_chunks):
            start, stop = cache.chunk_bounds(index)
            where = f"chunk {index} (rows {start}-{stop - 1})"
            if recorded[index] < 0:
                report.problems.append(f"{where}: never written")
                continue
            try:  # the reading every command does: each chunk against the store's own checksums
                targets, labels = cache.read(start, stop)
            except DamagedChunk as exc:
                report.problems.append(f"{where}: array '{exc.array}' is damaged ({exc.why})")
                continue
            except Exception as exc:  # whatever else a damaged store raises
                report.problems.append(f"{where}: unreadable ({' '.join(f'{type(exc).__name__}: {exc}'.split())})")
                continue
            if chunk_checksum(targets, labels) != recorded[index]:
                report.problems.append(f"{where}: checksum mismatch (bytes changed since the dump)")
        if recompute:
            if teacher is None:
                raise SoftlabelsError("--recompute needs --teacher")
            source = source or source_for_cache(cache, data_spec, trust_code=trust_code)
            _recompute(cache, report, recompute, teacher, source, seed, device)
    return report


def _recompute(cache: Cache, report: VerifyReport, count: int, teacher: LoadedModel, source: Source, seed: int, device: str) -> None:
    recorded_sha = (cache.manifest.get("teacher") or {}).get("sha256")
    if recorded_sha and teacher.sha256 != recorded_sha:
        raise SoftlabelsError(f"{teacher.path} is not the teacher this cache was dumped with (sha256 differs)")
    recorded_batch = cache.manifest.get("batch_size")
    batch_size = recorded_batch if isinstance(recorded_batch, int) and recorded_batch > 0 else 256
    precision = cache.manifest.get("precision") if cache.manifest.get("precision") in PRECISIONS else "fp32"
    # Whole batches of the dump: the teacher sees exactly the inputs it saw then, batched the same way.
    batches = np.random.default_rng(seed).permutation(-(-len(cache) // batch_size))[: -(-count // batch_size)]
    rtol = _RTOL[precision] + (2**-11 if cache.layout.dtype == "float16" else 0)
    worst, differing, rows = 0.0, [], 0
    for start, out, _ in iter_logits(teacher.model, source, batch_size=batch_size, device=resolve_device(device),
                                     precision=precision, batches=sorted(int(b) for b in batches)):
        stop = start + len(out)
        # rounded as the dump stored it: the same teacher, batches and precision give a difference of 0
        fresh = out.to(getattr(torch, cache.layout.dtype)).float().cpu().numpy()
        cached, classes = cache.kind.logits_at(cache.read(start, stop)[0])
        cached = cached.astype(np.float32)
        if classes is not None:  # a sparse cache: compare the logits it kept, at the classes it kept
            fresh = np.take_along_axis(fresh, classes.astype(np.int64), axis=-1)
        scale = np.abs(fresh).max(axis=-1, keepdims=True) + 1e-6
        far = (np.abs(fresh - cached) > rtol * scale).reshape(len(out), -1).any(axis=1)
        worst = max(worst, float(np.abs(fresh - cached).max()))
        differing += [(start + int(i), float(np.abs(fresh[i] - cached[i]).max())) for i in np.flatnonzero(far)]
        rows += len(out)
    report.rows_recomputed, report.max_abs_difference = rows, worst
    for row, difference in differing[:10]:
        report.problems.append(f"row {row}: cached logits differ from the teacher's by up to {difference:.4g}")
    if len(differing) > 10:
        report.problems.append(f"... and {len(differing) - 10} more rows differ")
