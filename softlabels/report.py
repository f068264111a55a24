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

from .store import Cache


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
    """What ``softlabels inspect`` prints: manifest, sizes, teacher accuracy and soft-target entropy."""
    logits_bytes = len(cache) * cache.num_classes * np.dtype(cache.manifest["dtype"]).itemsize
    raw_bytes = logits_bytes + len(cache) * 8
    on_disk = cache.nbytes_on_disk()
    correct = labeled = 0
    entropy_sum = 0.0
    for _, logits, labels in cache.iter_chunks():
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        entropy_sum += float(-(np.exp(log_p) * log_p).sum())
        has_label = labels >= 0
        correct += int((logits.argmax(1)[has_label] == labels[has_label]).sum())
        labeled += int(has_label.sum())
    return {
        "path": str(cache.path),
        "complete": bool(cache.manifest.get("complete")),
        "shape": [len(cache), cache.num_classes],
        "dtype": cache.manifest["dtype"],
        "chunk_rows": cache.chunk_rows,
        "bytes_on_disk": on_disk,
        "compression_ratio": raw_bytes / on_disk if on_disk else None,
        "labeled_rows": labeled,
        "teacher_accuracy": correct / labeled if labeled else None,
        "mean_entropy_nats": entropy_sum / len(cache) if len(cache) else None,
        "manifest": cache.manifest,
    }


def format_cache_report(report: dict[str, Any]) -> str:
    m = report["manifest"]
    teacher, dataset = m.get("teacher", {}), m.get("dataset", {})
    ratio = report["compression_ratio"]
    lines = [
        f"cache        {report['path']} ({'complete' if report['complete'] else 'INCOMPLETE'})",
        f"format       {m['format']} v{m['format_version']}, kind {m['kind']}",
        f"logits       {report['shape'][0]:,} x {report['shape'][1]:,} {report['dtype']}, {report['chunk_rows']} rows per chunk",
        f"on disk      {report['bytes_on_disk'] / 2**20:.2f} MiB" + (f" (compression {ratio:.2f}x)" if ratio else ""),
        f"teacher      {teacher.get('arch')} from {teacher.get('file')} ({_count(teacher.get('params'))} params, sha256 {str(teacher.get('sha256'))[:12]}...)",
        f"dataset      {dataset.get('spec')} ({_count(dataset.get('num_samples'))} samples, {dataset.get('fingerprint', '')[:20]}...)",
        f"accuracy     {_percent(report['teacher_accuracy'])} on {report['labeled_rows']:,} labeled rows",
        f"entropy      {report['mean_entropy_nats']:.3f} nats mean at T=1" if report["mean_entropy_nats"] is not None else "entropy      -",
        f"created      {m.get('created')} by softlabels {m.get('softlabels_version')}, torch {m.get('torch_version')}",
    ]
    return "\n".join(lines)
