"""Plain-text tables and cache statistics for the CLI's output.

Example:
    >>> print(format_table([{"student": "mlp", "eval_accuracy": 0.81}], SUMMARY_COLUMNS[:1] + SUMMARY_COLUMNS[3:4]))
    student  eval acc
    -------  --------
    mlp        81.00%
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .sparse import teacher_argmax
from .store import Cache, sparse_size


def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.2%}"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


Column = tuple[str, str, Callable[[Any], str]]
SUMMARY_COLUMNS: list[Column] = [
    ("student", "student", str),
    ("params", "params", _count),
    ("targets", "trained on", str),
    ("eval_accuracy", "eval acc", _percent),
    ("teacher_agreement", "agrees w/ teacher", _percent),
    ("seconds", "seconds", _seconds),
]


def format_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """Left-aligned text columns, numbers right-aligned, one header rule."""
    cells = [[fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(r[i][:1].isdigit() or r[i] == "-" for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def cache_report(cache: Cache) -> dict[str, Any]:
    """What ``softlabels inspect`` prints: manifest, sizes, teacher accuracy and soft-target statistics.

    Entropy (nats, T = 1) is exact for dense caches; top-k caches report the teacher mass their K
    classes keep instead, and sampled caches the mean number of distinct classes drawn.
    """
    kind = cache.kind
    on_disk = cache.nbytes_on_disk()
    correct = labeled = 0
    statistic = 0.0
    for _, targets, labels in cache.iter_chunks():
        if kind == "dense":
            z = targets.astype(np.float64)
            log_p = z - logsumexp(z)
            statistic += float(-(np.exp(log_p) * log_p).sum())
        elif kind == "topk":
            lse_1 = targets["logsumexp"][:, cache.manifest["temperatures"].index(1.0)] if 1.0 in cache.manifest["temperatures"] else None
            if lse_1 is not None:
                statistic += float(np.exp(targets["topk_logits"].astype(np.float64) - lse_1[:, None]).sum())
        else:
            statistic += float((targets["sample_counts"] > 0).sum())
        has_label = labels >= 0
        correct += int((teacher_argmax(targets)[has_label] == labels[has_label]).sum())
        labeled += int(has_label.sum())
    n = len(cache)
    dense_float32 = n * cache.num_classes * 4
    report = {
        "path": str(cache.path),
        "complete": bool(cache.manifest.get("complete")),
        "kind": kind,
        "size": sparse_size(cache.manifest) or None,
        "shape": [n, cache.num_classes],
        "dtype": cache.manifest["dtype"],
        "chunk_rows": cache.chunk_rows,
        "bytes_on_disk": on_disk,
        "bytes_per_sample": on_disk / n if n else None,
        "compression_vs_dense_float32": dense_float32 / on_disk if on_disk else None,
        "labeled_rows": labeled,
        "teacher_accuracy": correct / labeled if labeled else None,
        "mean_entropy_nats": statistic / n if n and kind == "dense" else None,
        "mean_topk_mass": statistic / n if n and kind == "topk" and 1.0 in cache.manifest["temperatures"] else None,
        "mean_distinct_samples": statistic / n if n and kind == "sampled" else None,
        "manifest": cache.manifest,
    }
    return report


def logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))


def format_cache_report(report: dict[str, Any]) -> str:
    m = report["manifest"]
    teacher, dataset = m.get("teacher", {}), m.get("dataset", {})
    kind = report["kind"] if report["kind"] == "dense" else f"{report['kind']} ({'K' if report['kind'] == 'topk' else 'S'} = {report['size']})"
    statistic = {
        "dense": ("entropy", report["mean_entropy_nats"], "{:.3f} nats mean at T=1"),
        "topk": ("top-k mass", report["mean_topk_mass"], "{:.2%} of the teacher's probability at T=1, on average"),
        "sampled": ("distinct", report["mean_distinct_samples"], "{:.1f} classes per sample on average"),
    }[report["kind"]]
    lines = [
        f"cache        {report['path']} ({'complete' if report['complete'] else 'INCOMPLETE'})",
        f"format       {m['format']} v{m['format_version']}, kind {kind}",
        f"targets      {report['shape'][0]:,} samples x {report['shape'][1]:,} classes, {report['dtype']}, {report['chunk_rows']} rows per chunk",
        f"on disk      {report['bytes_on_disk'] / 2**20:.2f} MiB, {report['bytes_per_sample']:.1f} bytes per sample "
        f"({report['compression_vs_dense_float32']:.1f}x smaller than dense float32)",
        f"teacher      {teacher.get('arch')} from {teacher.get('file')} ({_count(teacher.get('params'))} params, sha256 {str(teacher.get('sha256'))[:12]}...)",
        f"dataset      {dataset.get('spec')} ({_count(dataset.get('num_samples'))} samples, {str(dataset.get('fingerprint', ''))[:20]}...)",
        f"accuracy     {_percent(report['teacher_accuracy'])} on {report['labeled_rows']:,} labeled rows",
        f"{statistic[0]:<12} " + ("-" if statistic[1] is None else statistic[2].format(statistic[1])),
        f"created      {m.get('created')} by softlabels {m.get('softlabels_version')}, torch {m.get('torch_version')}",
    ]
    return "\n".join(lines)
