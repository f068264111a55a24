"""Check a cache against its own records, and optionally against its teacher.

Every chunk is read whole, as every command reads it (each against the store's own checksum: Zarr's
crc32c, HDF5's CRC-32C table or fletcher32), and its CRC-32 is compared with the one recorded at
dump time, which catches flipped bytes, truncated or missing chunk files and chunks a dump never
finished. ``recompute`` reruns the teacher on whole dump batches
chosen at random, the way the dump ran it (same batches, precision and autocast), and compares its
logits with the cached ones. On a view cache it replays random (sample, view) pairs from their
stored parameters instead, reruns the teacher on them, and also checks that the stored parameters
are the ones the augment seed draws: an edited parameter fails either way.

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
from .dump import PRECISIONS, TeacherForward, iter_logits, resolve_device
from .errors import SoftlabelsError
from .loader import source_for_cache
from .store import Cache, DamagedChunk, chunk_checksum, open_cache
from .views import GROUP as VIEW_RECORDS, Views

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
        try:  # what training would refuse; resolving named code only with trust_code
            Views.of_cache(cache, trust_code=trust_code)
        except SoftlabelsError as exc:
            report.problems.append(str(exc))
        try:
            recorded = cache.checksums()
        except SoftlabelsError as exc:  # each chunk is still checked against the store's own checksums
            report.problems.append(str(exc))
            recorded = None
        report.chunks = cache.num_chunks
        for index in range(cache.num_chunks):
            start, stop = cache.chunk_bounds(index)
            where = f"chunk {index} (rows {start}-{stop - 1})"
            if recorded is not None and recorded[index] < 0:
                report.problems.append(f"{where}: never written")
                continue
            try:  # the reading every command does: each chunk against the store's own checksums
                targets, labels = cache.read(start, stop)
                records = cache.read_records(start, stop)
            except DamagedChunk as exc:
                report.problems.append(f"{where}: array '{exc.array}' is damaged ({exc.why})")
                continue
            except Exception as exc:  # whatever else a damaged store raises
                report.problems.append(f"{where}: unreadable ({' '.join(f'{type(exc).__name__}: {exc}'.split())})")
                continue
            if recorded is not None and chunk_checksum(targets, labels, records) != recorded[index]:
                report.problems.append(f"{where}: checksum mismatch (bytes changed since the dump)")
        if recompute:
            if teacher is None:
                raise SoftlabelsError("--recompute needs --teacher")
            source = source or source_for_cache(cache, data_spec, trust_code=trust_code)
            views = Views.of_cache(cache, trust_code=trust_code)
            if views is None:
                _recompute(cache, report, recompute, teacher, source, seed, device)
            else:
                views.check(cache.layout.records, source.input_shape, where=str(cache.path))
                _recompute_views(cache, views, report, recompute, teacher, source, seed, device)
    return report


def _dump_settings(cache: Cache, teacher: LoadedModel) -> tuple[int, str, float]:
    """The dump's batch size and precision, and the tolerance of a recomputed logit."""
    recorded_sha = (cache.manifest.get("teacher") or {}).get("sha256")
    if recorded_sha and teacher.sha256 != recorded_sha:
        raise SoftlabelsError(f"{teacher.path} is not the teacher this cache was dumped with (sha256 differs)")
    recorded_batch = cache.manifest.get("batch_size")
    batch_size = recorded_batch if isinstance(recorded_batch, int) and recorded_batch > 0 else 256
    precision = cache.manifest.get("precision") if cache.manifest.get("precision") in PRECISIONS else "fp32"
    return batch_size, precision, _RTOL[precision] + (2**-11 if cache.layout.dtype == "float16" else 0)


def _recompute(cache: Cache, report: VerifyReport, count: int, teacher: LoadedModel, source: Source, seed: int, device: str) -> None:
    batch_size, precision, rtol = _dump_settings(cache, teacher)
    # Whole batches of the dump: the teacher sees exactly the inputs it saw then, batched the same way.
    # The fewest of them, in a random order, that hold ``count`` rows (the last batch may be short).
    order = np.random.default_rng(seed).permutation(-(-len(cache) // batch_size))
    held = np.cumsum(np.minimum(batch_size, len(cache) - order * batch_size))
    batches = order[:int(np.searchsorted(held, count)) + 1]
    differing = []
    for start, out, _ in iter_logits(teacher.model, source, batch_size=batch_size, device=resolve_device(device),
                                     precision=precision, batches=sorted(int(b) for b in batches)):
        rows = torch.arange(start, start + len(out))
        far = _compare(cache, report, out, cache.read(start, start + len(out))[0], rows, rtol)
        differing += [(f"row {start + int(i)}", d) for i, d in far]
    _report_differences(report, differing)


def _recompute_views(cache: Cache, views: Views, report: VerifyReport, count: int, teacher: LoadedModel, source: Source,
                     seed: int, device: str) -> None:
    batch_size, precision, rtol = _dump_settings(cache, teacher)
    rng = np.random.default_rng(seed)
    samples = np.sort(rng.choice(len(cache), size=min(count, len(cache)), replace=False))
    if not len(samples):  # an empty cache: no view to recompute
        return
    chosen = rng.integers(views.count, size=len(samples))
    targets, records = _stored_views(cache, samples, chosen)
    where = [f"sample {i} view {v}" for i, v in zip(samples, chosen)]
    drawn = views.draw_views(samples, chosen, source)
    for name, values in drawn.items():
        for i in np.flatnonzero((values != records[name]).reshape(len(samples), -1).any(axis=1))[:10]:
            recorded = cache.manifest["views"].get("versions")
            report.problems.append(f"{where[i]}: stored parameter '{name}' is {records[name][i].tolist()}, but the augment "
                                   f"seed draws {values[i].tolist()} (edited, or drawn with other library versions: {recorded})")
    # A view holding a parameter value its augmentation never draws differs from its draw (reported
    # above) and cannot be replayed: the others are.
    keep = views.replayable(source, records, samples)
    samples, chosen, where = samples[keep], chosen[keep], [w for w, kept in zip(where, keep) if kept]
    targets, records = ({n: a[keep] for n, a in arrays.items()} for arrays in (targets, records))
    dev = resolve_device(device)
    forward = TeacherForward(teacher.model, dev, precision)
    differing = []
    for lo in range(0, len(samples), batch_size):
        hi = min(lo + batch_size, len(samples))
        x = None if views.pipeline.crops_from(source) else torch.from_numpy(np.ascontiguousarray(source.take(samples[lo:hi])[0])).to(dev)
        inputs, _ = views.apply(source, x, {name: r[lo:hi] for name, r in records.items()}, samples[lo:hi])
        out = forward(inputs.to(dev), f"the stored views of samples {samples[lo]}..{samples[hi - 1]}")
        far = _compare(cache, report, out, {name: t[lo:hi] for name, t in targets.items()}, torch.from_numpy(samples[lo:hi]), rtol,
                       views=torch.from_numpy(chosen[lo:hi]))
        differing += [(where[lo + i], d) for i, d in far]
    _report_differences(report, differing)


def _stored_views(cache: Cache, samples: np.ndarray, views: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The stored targets and records of view ``views[j]`` of sample ``samples[j]`` (sorted), chunk by chunk."""
    targets: list[dict[str, np.ndarray]] = []
    records: list[dict[str, np.ndarray]] = []
    for chunk in np.unique(samples // cache.chunk_rows):
        a, b = cache.chunk_bounds(int(chunk))
        here = (samples >= a) & (samples < b)
        rows, view = samples[here] - a, views[here]
        targets.append({name: t[rows, view] for name, t in cache.read(a, b)[0].items()})
        records.append({name: r[rows, view] for name, r in cache.read_records(a, b).items() if name.startswith(VIEW_RECORDS)})
    return ({name: np.concatenate([t[name] for t in targets]) for name in targets[0]},
            {name: np.concatenate([r[name] for r in records]) for name in records[0]})


def _compare(cache: Cache, report: VerifyReport, out: torch.Tensor, stored: dict[str, np.ndarray], rows: torch.Tensor,
             rtol: float, views: torch.Tensor | None = None) -> list[tuple[int, float]]:
    """The rows of ``out`` (fresh teacher logits) whose values differ from the ``stored`` targets by
    more than ``rtol`` of the row's largest logit, with their largest difference. A cache that keeps
    no logits (compact sampled) is compared by what the kind builds from the fresh logits, exactly:
    its draws are keyed by row and item (``views``: the view each row's targets are)."""
    cached, classes = cache.kind.logits_at(stored)
    if cached is None:
        return _compare_built(cache, report, out, stored, rows, views)
    # rounded as the dump stored it: the same teacher, batches and precision give a difference of 0
    fresh = out.to(getattr(torch, cache.layout.dtype)).float().cpu().numpy()
    cached = cached.astype(np.float32)
    if classes is not None:  # a sparse cache: compare the logits it kept, at the classes it kept
        fresh = np.take_along_axis(fresh, classes.astype(np.int64), axis=-1)
    difference = np.abs(fresh - cached)
    far = (difference > rtol * (np.abs(fresh).max(axis=-1, keepdims=True) + 1e-6)).reshape(len(out), -1).any(axis=1)
    report.rows_recomputed += len(out)
    report.max_abs_difference = max(report.max_abs_difference or 0.0, float(difference.max(initial=0.0)))
    return [(int(i), float(difference[i].max())) for i in np.flatnonzero(far)]


def _compare_built(cache: Cache, report: VerifyReport, out: torch.Tensor, stored: dict[str, np.ndarray], rows: torch.Tensor,
                   views: torch.Tensor | None) -> list[tuple[int, float]]:
    """Rows whose stored arrays differ from those built anew from ``out``; the difference reported is
    the share of stored values that differ."""
    if views is None:
        built = cache.kind.build(out.float().cpu(), rows=rows)
    else:  # one view per row: build every view's targets where a row's view sits among the items
        full = out.float().cpu()[:, None].expand(-1, cache.items[0], *out.shape[1:])
        built = {name: t[torch.arange(len(rows)), views] for name, t in cache.kind.build(full, rows=rows).items()}
    report.rows_recomputed += len(out)
    differs = np.stack([(built[name].numpy() != stored[name]).reshape(len(out), -1).mean(axis=1) for name in built], axis=1).max(axis=1)
    return [(int(i), float(differs[i])) for i in np.flatnonzero(differs > 0)]


def _report_differences(report: VerifyReport, differing: list[tuple[str, float]]) -> None:
    rebuilt = report.max_abs_difference is None  # a compact cache: its draws were rebuilt, not its logits compared
    for where, difference in differing[:10]:
        report.problems.append(f"{where}: " + (f"{difference:.1%} of the stored draws differ from those the teacher's logits give"
                                               if rebuilt else f"cached logits differ from the teacher's by up to {difference:.4g}"))
    if len(differing) > 10:
        report.problems.append(f"... and {len(differing) - 10} more rows differ")
