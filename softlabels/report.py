"""Plain-text tables and cache statistics for the CLI's output.

Example::

    print(format_table([{"student": "mlp", "eval_accuracy": 0.81}], SUMMARY_COLUMNS[:1] + SUMMARY_COLUMNS[3:4]))
    # student  eval acc
    # -------  --------
    # mlp        81.00%
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .data import skipped_rows
from .kinds import KINDS
from .store import Cache
from .tokens import GOLD
from .views import mix_weights, scored_items


def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.2%}"


def _against_dense(ratio: float | None) -> str:
    """``ratio`` (dense float32 bytes over the cache's) as " (2.5x smaller than dense float32)", or
    larger where it is below 1, or about the same size within 5%."""
    if not ratio:
        return ""
    if 0.95 <= ratio < 1.05:
        return " (about the size of dense float32)"
    return f" ({ratio:.1f}x smaller than dense float32)" if ratio >= 1 else f" ({1 / ratio:.1f}x larger than dense float32)"


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
    ("eval_nats", "eval nats", lambda v: "-" if v is None else f"{v:.3f}"),
    ("ece", "ECE", _percent),
    ("seconds", "seconds", _seconds),
]


COMPARE_COLUMNS: list[Column] = [("run", "run", str)] + SUMMARY_COLUMNS


def format_comparison(summaries: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """What ``softlabels compare`` prints: the rows of every ``(run name, summary rows)``, one table."""
    return format_table([{"run": name, **row} for name, rows in summaries for row in rows], COMPARE_COLUMNS)


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
    """What ``softlabels inspect`` prints: manifest, sizes, teacher accuracy and the kind's statistic
    (dense: entropy in nats at T = 1; top-k: the teacher mass its K classes keep at T = 1; sampled:
    distinct classes drawn), averaged over items. Chunks never written are left out, of the sizes
    per sample too (an incomplete cache's bytes are those of the chunks written)."""
    kind = cache.kind
    on_disk = cache.nbytes_on_disk()
    correct = labeled = items = rows = 0
    statistic = gold_nats = 0.0
    recorded = cache.check_commit_record()  # an incomplete cache is reported on the chunks it has
    gold = any(r.name == GOLD for r in cache.layout.records)
    weights = mix_weights(r.name for r in cache.layout.records)
    for index in np.flatnonzero(recorded >= 0):
        bounds = cache.chunk_bounds(int(index))
        targets, labels = cache.read(*bounds)
        records = cache.read_records(*bounds) if gold or weights else {}
        statistic += kind.statistic(targets)
        items += labels.size
        rows += len(labels)
        if gold:
            gold_nats -= float(records[GOLD][labels >= 0].astype(np.float64).sum())
        scored, right = scored_hits(kind, targets, labels, records, weights)
        correct += int(right.sum())
        labeled += int(scored.sum())
    n = len(cache)
    dense_float32 = rows * math.prod(cache.items) * cache.num_classes * 4
    mean = statistic / items if items else None
    return {
        "path": str(cache.path),
        "complete": bool(cache.manifest.get("complete")),
        "kind": kind.settings(),
        "item_axes": [{"name": name, "size": size} for name, size in cache.layout.item_axes],
        "shape": [n, *cache.items, cache.num_classes],
        # the logits' dtype, None where no logits are stored (a compact sampled cache)
        "dtype": cache.layout.dtype if any(a.dtype == np.dtype(cache.layout.dtype) for a in cache.layout.target_arrays()) else None,
        "chunk_rows": cache.chunk_rows,
        "bytes_on_disk": on_disk,
        "bytes_per_sample": on_disk / rows if rows else None,
        "compression_vs_dense_float32": dense_float32 / on_disk if on_disk else None,
        "labeled_items": labeled,
        # rows whose inputs a dump could not read (--skip-bad-files): stored as zeros, trained on by no loss
        "skipped_rows": len(skipped_rows(cache.manifest.get("dataset") or {}, cache.manifest.get("skipped"), str(cache.path))),
        "scored_on": "views whose own label weighs at least half" if weights else "labeled items",
        "teacher_accuracy": correct / labeled if labeled else None,
        # where the stored targets cannot tell the teacher's top class: what is counted instead, and
        # the manifest's teacher_accuracy (the dump counted the teacher's own top class)
        "teacher_accuracy_of": kind.top_class_estimate,
        "dump_teacher_accuracy": cache.manifest.get("teacher_accuracy") if kind.top_class_estimate else None,
        "statistic": {"name": kind.statistic_name, "mean": None if mean is None or math.isnan(mean) else mean},
        "views": _views_report(cache, on_disk, rows),
        "tokens": _tokens_report(cache, on_disk, rows, gold_nats / labeled if gold and labeled else None),
        "manifest": cache.manifest,
    }


def scored_hits(kind: Any, targets: dict[str, np.ndarray], labels: np.ndarray, records: dict[str, np.ndarray],
                weights: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per item, whether the teacher's accuracy is scored on it (:func:`~softlabels.views.scored_items`),
    and whether it is scored and the teacher's top class is its label."""
    scored = scored_items(labels, records, weights)
    return scored, scored & (kind.top_class(targets) == labels)


def _tokens_report(cache: Cache, on_disk: int, rows: int, teacher_nats: float | None) -> dict[str, Any] | None:
    """A token cache's window length, vocabularies, bytes per token (``on_disk`` holding ``rows``
    windows) and the teacher's own nats per token on the cached text (from its stored
    log-probability of each actual next token)."""
    tokens = cache.manifest.get("tokens")
    if not isinstance(tokens, dict) or not cache.items:
        return None
    tokenizer = tokens.get("tokenizer") if isinstance(tokens.get("tokenizer"), dict) else {}
    count = rows * cache.items[0]
    return {
        "seq_len": cache.items[0],
        "vocab_size": tokens.get("vocab_size"),
        "tokenizer_sha256": tokenizer.get("sha256"),
        "tokenizer_vocab_size": tokenizer.get("vocab_size"),
        "bytes_per_token": on_disk / count if count else None,
        "teacher_nats_per_token": teacher_nats,
    }


def _views_report(cache: Cache, on_disk: int, rows: int) -> dict[str, Any] | None:
    """A view cache's views as its manifest records them (shown, never imported), with their bytes
    (``on_disk`` holding ``rows`` samples)."""
    views = cache.manifest.get("views")
    if not isinstance(views, dict) or not cache.items:
        return None
    count = cache.items[0]
    record_bytes = sum(np.dtype(r.dtype).itemsize * math.prod(r.shape) for r in cache.layout.records)
    augment = views.get("augment") if isinstance(views.get("augment"), list) else []
    return {
        "count": count,
        "seed": views.get("seed"),
        "augment": [_augment_text(a) for a in augment],
        "bytes_per_view": on_disk / (rows * count) if rows else None,
        "record_bytes_per_view": record_bytes / count,
    }


def _augment_text(settings: Any) -> str:
    """``name?k=v&...`` of a recorded augmentation."""
    if not isinstance(settings, dict):
        return repr(settings)
    name = str(settings.get("callable") or settings.get("name"))
    values = "&".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()
                      if k not in ("name", "callable", "version"))
    return name + (f"?{values}" if values else "")


def _tokens_lines(tokens: dict[str, Any] | None) -> list[str]:
    if tokens is None:
        return []
    tokenizer = ("unknown tokenizer" if tokens["tokenizer_sha256"] is None else
                 f"tokenizer sha256 {tokens['tokenizer_sha256'][:12]}... ({_count(tokens['tokenizer_vocab_size'])} tokens)")
    nats = tokens["teacher_nats_per_token"]
    return [
        f"tokens       windows of {tokens['seq_len']}, {_count(tokens['vocab_size'])} logits per position, {tokenizer}",
        f"per token    {tokens['bytes_per_token']:.1f} bytes on disk; the teacher's own loss "
        + ("-" if nats is None else f"{nats:.3f} nats (perplexity {math.exp(min(nats, 700)):.4g})"),
    ]


def _views_lines(views: dict[str, Any] | None) -> list[str]:
    if views is None:
        return []
    return [
        f"views        {views['count']} per sample, augment seed {views['seed']}: {' -> '.join(views['augment'])}",
        f"per view     {views['bytes_per_view']:.1f} bytes on disk (targets and parameters; the parameters are {views['record_bytes_per_view']:.0f} bytes before compression)",
    ]


def format_cache_report(report: dict[str, Any]) -> str:
    m = report["manifest"]
    teacher, dataset = m.get("teacher", {}), m.get("dataset", {})
    settings = {k: v for k, v in report["kind"].items() if k != "kind"}
    kind = report["kind"]["kind"] + (f" ({', '.join(f'{k}={v}' for k, v in settings.items())})" if settings else "")
    kind_type = KINDS[report["kind"]["kind"]]
    statistic = report["statistic"]
    shape = " x ".join([f"{report['shape'][0]:,} samples", *(f"{a['size']:,} {a['name']}s" for a in report["item_axes"]),
                        f"{report['shape'][-1]:,} classes"])
    lines = [
        f"cache        {report['path']} ({'complete' if report['complete'] else 'INCOMPLETE'})",
        f"format       {m['format']} v{m['format_version']}, kind {kind}",
        f"targets      {shape}, {report['dtype'] or 'no logits stored'}, {report['chunk_rows']} samples per chunk",
        f"on disk      {report['bytes_on_disk'] / 2**20:.2f} MiB"
        + (f", {report['bytes_per_sample']:.1f} bytes per sample" if report["bytes_per_sample"] is not None else ", no sample written yet")
        + _against_dense(report["compression_vs_dense_float32"]),
        f"teacher      {teacher.get('arch')} from {teacher.get('file')} ({_count(teacher.get('params'))} params, sha256 {str(teacher.get('sha256'))[:12]}...)",
        f"dataset      {dataset.get('spec')} ({_count(dataset.get('num_samples'))} samples, {str(dataset.get('fingerprint', ''))[:20]}...)",
        f"accuracy     {_percent(report['teacher_accuracy'])} on {report['labeled_items']:,} {report['scored_on']}"
        + (f", counting the {report['teacher_accuracy_of']} (the dump's own count: {_percent(report['dump_teacher_accuracy'])})"
           if report["teacher_accuracy_of"] else ""),
        f"{statistic['name']:<12} " + ("-" if statistic["mean"] is None else kind_type.statistic_format.format(statistic["mean"])),
        *([f"skipped      {report['skipped_rows']:,} rows whose inputs could not be read (stored as zeros, no loss; "
           "listed under 'skipped' in --json)"] if report["skipped_rows"] else []),
        *_views_lines(report["views"]),
        *_tokens_lines(report["tokens"]),
        f"created      {m.get('created')} by softlabels {m.get('softlabels_version')}, torch {m.get('torch_version')}",
    ]
    return "\n".join(lines)
