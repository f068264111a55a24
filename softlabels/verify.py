"""Check a cache against its own records, and optionally against its teacher.

Every chunk is read whole and its CRC-32 compared with the one recorded at dump time, which catches
flipped bytes, truncated or missing chunk files (Zarr reads a missing chunk as zeros without an
error) and chunks a dump never finished. ``recompute`` reruns the teacher on random rows and compares
its logits with the cached ones.

Example:
    >>> report = verify_cache("train.zarr", recompute=64, teacher=load_model("teacher.pth"))
    >>> report.ok, report.problems
    (True, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel
from .errors import SoftlabelsError
from .loader import source_for_cache
from .sparse import FIELDS
from .store import chunk_checksum, open_cache

# Relative tolerance of a recomputed logit by the precision the dump ran at; float16 storage adds
# its own rounding (2**-11 relative) on top.
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
    data_spec: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    trust_code: bool = False,
) -> VerifyReport:
    """Check manifest, completeness and every chunk's checksum; rerun ``teacher`` on ``recompute`` rows.

    ``data_spec`` and ``trust_code`` say where the recomputed rows' inputs come from, as for
    :func:`softlabels.source_for_cache`.
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
            try:
                logits, labels = cache.read(start, stop)
            except Exception as exc:  # a damaged chunk can fail to decode in any codec-specific way
                report.problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if chunk_checksum(logits, labels) != recorded[index]:
                report.problems.append(f"{where}: checksum mismatch (bytes changed since the dump)")
        if recompute:
            _recompute(cache, report, recompute, teacher, data_spec, seed, device, trust_code)
    return report


def _recompute(cache, report: VerifyReport, count: int, teacher: LoadedModel | None, data_spec, seed: int, device: str,
               trust_code: bool) -> None:
    if teacher is None:
        raise SoftlabelsError("--recompute needs --teacher")
    recorded_sha = (cache.manifest.get("teacher") or {}).get("sha256")
    if recorded_sha and teacher.sha256 != recorded_sha:
        raise SoftlabelsError(f"{teacher.path} is not the teacher this cache was dumped with (sha256 differs)")
    source = source_for_cache(cache, data_spec, trust_code=trust_code)
    rows = np.sort(np.random.default_rng(seed).choice(len(cache), size=min(count, len(cache)), replace=False))
    inputs = np.concatenate([source.read(int(i), int(i) + 1)[0] for i in rows])
    targets = np.concatenate([cache.read(int(i), int(i) + 1)[0] for i in rows])
    model = teacher.model.eval().to(device)
    with torch.inference_mode():
        fresh = model(torch.from_numpy(inputs).to(device)).float().cpu().numpy()
    if targets.dtype.names is None:
        cached = targets.astype(np.float32)
    else:  # a sparse cache: compare the logits it kept, at the classes it kept
        values, classes = FIELDS[cache.kind][:2]
        cached = targets[values].astype(np.float32)
        fresh = np.take_along_axis(fresh, targets[classes].astype(np.int64), axis=1)
    rtol = _RTOL.get(cache.manifest.get("precision"), _RTOL["fp32"]) + (2**-11 if cache.manifest["dtype"] == "float16" else 0)
    scale = np.abs(fresh).max(axis=1, keepdims=True) + 1e-6
    far = np.abs(fresh - cached) > rtol * scale
    report.rows_recomputed = len(rows)
    report.max_abs_difference = float(np.abs(fresh - cached).max())
    for i in np.flatnonzero(far.any(axis=1))[:10]:
        report.problems.append(
            f"row {rows[i]}: cached logits differ from the teacher's by up to {np.abs(fresh[i] - cached[i]).max():.4g}"
        )
    extra = int(far.any(axis=1).sum()) - 10
    if extra > 0:
        report.problems.append(f"... and {extra} more rows differ")

