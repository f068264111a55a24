"""Figures of runs and caches: each one's numbers as a plain dict, and a PNG drawn from them.

Every ``*_data`` function returns JSON-ready numbers; :func:`save_figure` draws them with
matplotlib's Agg renderer (no display, no global pyplot state) and writes ``STEM.png`` beside
``STEM.json``, so the numbers can be checked without reading pixels.

Example::

    runs = [read_run("runs/scratch"), read_run("runs/kd")]
    save_figure("accuracy_vs_params", accuracy_vs_params_data(runs), Path("report/accuracy-vs-params"))
    with open_cache("transfer.zarr") as cache:
        stats = cache_figures_data(cache)
    save_figure("mass_kept", stats["mass_kept"], Path("report/transfer-mass-kept"))
"""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from .calibration import Calibration
from .durable import write_atomically
from .kinds.dense import entropy as item_entropy
from .report import scored_hits
from .runs import Run, find_teacher
from .store import Cache
from .train import TrainConfig
from .views import VIEW_AXIS, mix_weights

DPI = 100
HISTOGRAM_BINS = 30
SPREAD_BINS = 100  # the spread across views is mostly small: fine bins, the axis cut to the filled ones
MASS_LEVELS = (0.9, 0.95, 0.99)  # the teacher mass whose K the mass-kept figure marks
TEMPERATURES = (1.0, TrainConfig.temperature)  # T = 1 and train-student's default


# -- runs ------------------------------------------------------------------------------------------


def learning_curves_data(runs: list[Run]) -> dict[str, Any]:
    """Per student of every run, per epoch: training loss and evaluation accuracy (metrics.jsonl)."""
    return {"series": [
        {"run": run.name, "student": student, "epoch": [r["epoch"] for r in records],
         "train_loss": [r.get("train_loss") for r in records], "eval_accuracy": [r.get("eval_accuracy") for r in records]}
        for run in runs for student, records in run.metrics.items()
    ]}


def accuracy_vs_params_data(runs: list[Run]) -> dict[str, Any]:
    """Final evaluation accuracy against parameter count of every student (summary.json), the
    teacher apart: the student whose checkpoint is the teacher of a cache another run trained from."""
    teacher = find_teacher(runs)
    return {
        "teacher": _point(*teacher) if teacher else None,
        "points": [_point(run, row) for run in runs for row in run.summary
                   if (teacher is None or (run, row) != teacher) and row.get("eval_accuracy") is not None
                   and row.get("params") is not None],
    }


def _point(run: Run, row: dict[str, Any]) -> dict[str, Any]:
    return {"run": run.name, "student": row["student"], "params": row.get("params"), "eval_accuracy": row.get("eval_accuracy")}


def agreement_data(runs: list[Run]) -> dict[str, Any]:
    """Top-1 agreement with the teacher on the evaluation data: per epoch (metrics.jsonl) and at the
    end against accuracy (summary.json), for the students evaluated against a teacher."""
    return {
        "series": [{"run": run.name, "student": student, "epoch": [r["epoch"] for r in records],
                    "teacher_agreement": [r.get("teacher_agreement") for r in records]}
                   for run in runs for student, records in run.metrics.items()
                   if any(r.get("teacher_agreement") is not None for r in records)],
        "final": [{"run": run.name, "student": row["student"], "teacher_agreement": row["teacher_agreement"],
                   "eval_accuracy": row.get("eval_accuracy")}
                  for run in runs for row in run.summary if row.get("teacher_agreement") is not None],
    }


def reliability_data(runs: list[Run]) -> dict[str, Any]:
    """Per student with saved evaluation predictions: its reliability diagram and ECE over the
    labeled items (:class:`~softlabels.calibration.Calibration`, as ``train-student`` reports it)."""
    panels = []
    for run in runs:
        for student, predictions in run.predictions.items():
            if predictions is None:
                continue
            labeled = predictions["labels"] >= 0
            calibration = Calibration()
            calibration.add(predictions["confidence"][labeled],
                            (predictions["predicted"][labeled] == predictions["labels"][labeled]).astype(np.float64))
            panels.append({"run": run.name, "student": student, **calibration.diagram()})
    return {"panels": panels}


# -- caches ----------------------------------------------------------------------------------------


def cache_figures_data(cache: Cache, *, progress: bool = False) -> dict[str, Any]:
    """The numbers of a cache's figures, read chunk by chunk:

    - ``entropy``: histograms of the teacher's entropy (nats) per item at :data:`TEMPERATURES`;
    - ``mass_kept``: the mean teacher mass its top K classes keep, for K = 1..C, at the same
      temperatures, and the smallest K that keeps each of :data:`MASS_LEVELS`;
    - ``class_accuracy``: the teacher's accuracy per class on the scored labeled items;
    - ``view_spread``: for a view cache, per sample the mean total-variation distance (T = 1) of
      each view's targets from the mean of its views, as a histogram.

    Those that need every logit (all but ``class_accuracy``) are ``None`` for a sparse cache, and
    ``view_spread`` for a cache without views.
    """
    c = cache.num_classes
    dense = False  # whether the kind keeps every logit, known from the first chunk
    viewed = cache.layout.item_axes[:1] == ((VIEW_AXIS, cache.items[0]),) if cache.items else False
    entropy_edges = np.linspace(0.0, math.log(c), HISTOGRAM_BINS + 1) if c > 1 else np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    spread_edges = np.linspace(0.0, 1.0, SPREAD_BINS + 1)
    entropy = {t: _Histogram(entropy_edges) for t in TEMPERATURES}
    mass = {t: np.zeros(c) for t in TEMPERATURES}
    spread, disagreeing = _Histogram(spread_edges), 0
    kept_items = nonfinite = 0
    correct, labeled = np.zeros(c, np.int64), np.zeros(c, np.int64)
    weights = mix_weights(r.name for r in cache.layout.records)
    for index in tqdm(range(cache.num_chunks), desc="cache statistics", unit="chunk", disable=None if progress else True):
        bounds = cache.chunk_bounds(index)
        targets, labels = cache.read(*bounds)
        scored, right = scored_hits(cache.kind, targets, labels, cache.read_records(*bounds) if weights else {}, weights)
        scored, right = scored & (labels < c), right & (labels < c)  # a label out of range has no class to count for
        labeled += np.bincount(labels[scored], minlength=c)
        correct += np.bincount(labels[right], minlength=c)
        full = cache.kind.full_logits(targets)
        dense = full is not None
        if not dense:
            continue
        logits = torch.from_numpy(np.asarray(full, dtype=np.float64))
        finite = torch.isfinite(logits).all(-1)
        nonfinite += int((~finite).sum())
        flat = logits[finite]  # [items, C]
        kept_items += len(flat)
        for t in TEMPERATURES:
            entropy[t].add(item_entropy(flat, t).numpy())
            cumulative = torch.sort(torch.softmax(flat / t, dim=-1), dim=-1, descending=True).values.cumsum(-1)
            mass[t] += cumulative.sum(0).numpy()
        if viewed:
            whole = finite.reshape(len(finite), -1).all(-1)  # samples whose every view is finite
            p = torch.softmax(logits[whole], dim=-1)  # [samples, V, C]
            distance = 0.5 * (p - p.mean(1, keepdim=True)).abs().sum(-1).mean(-1)
            spread.add(distance.numpy())
            top = p.argmax(-1)
            disagreeing += int((top != top[:, :1]).any(-1).sum())
    accuracy = [float(k / n) if n else None for k, n in zip(correct, labeled)]
    return {
        "path": str(cache.path),
        "nonfinite_items": nonfinite,
        "entropy": {"temperatures": [_temperature(t, entropy[t].summary()) for t in TEMPERATURES],
                    "max_nats": math.log(c)} if dense else None,
        "mass_kept": {"temperatures": [_temperature(t, _mass_summary(mass[t] / max(kept_items, 1))) for t in TEMPERATURES],
                      "levels": list(MASS_LEVELS)} if dense and kept_items else None,
        "class_accuracy": {"labeled": labeled.tolist(), "correct": correct.tolist(), "accuracy": accuracy}
        if labeled.any() else None,
        "view_spread": {**spread.summary(), "views": cache.items[0], "samples_with_disagreeing_top_class": disagreeing}
        if dense and viewed else None,
    }


class _Histogram:
    """Counts over fixed edges (values outside go to the nearer end bin), and the values' mean."""

    def __init__(self, edges: np.ndarray) -> None:
        self.edges, self.counts, self.total, self.n = edges, np.zeros(len(edges) - 1, np.int64), 0.0, 0

    def add(self, values: np.ndarray) -> None:
        self.counts += np.histogram(np.clip(values, self.edges[0], self.edges[-1]), bins=self.edges)[0]
        self.total += float(values.sum())
        self.n += values.size

    def summary(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "mean": self.total / self.n if self.n else None}


def _temperature(t: float, values: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": t, **values}


def _mass_summary(curve: np.ndarray) -> dict[str, Any]:
    """The curve over K = 1..C and, per level, the smallest K whose mean kept mass reaches it."""
    return {"k": list(range(1, len(curve) + 1)), "mass": curve.tolist(),
            "k_for_level": {f"{level:g}": int(np.argmax(curve >= level)) + 1 for level in MASS_LEVELS}}


# -- drawing ---------------------------------------------------------------------------------------


def save_figure(name: str, data: dict[str, Any], stem: Path, *, dpi: int = DPI, title: str = "") -> Path:
    """Draw figure ``name`` (a key of :data:`DRAW`) from ``data``; write ``stem.png`` and
    ``stem.json`` (the data), each atomically. Returns the PNG's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib import rc_context

    # Run, student and cache names are drawn as written: a "$" in one is not matplotlib's math text.
    with rc_context({"text.parse_math": False}):
        fig = Figure(figsize=(9, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        DRAW[name](fig, data)
        if title:
            fig.suptitle(title, fontsize=10)
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=dpi)
    png = stem.with_suffix(".png")
    write_atomically(png, lambda f: f.write(image.getvalue()))
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    write_atomically(stem.with_suffix(".json"), lambda f: f.write(text.encode()))
    return png


def _legend(ax: Any, **options: Any) -> None:
    """The legend of ``ax`` where something drawn there has a label (matplotlib warns of an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _label(item: dict[str, Any]) -> str:
    return f"{item['run']}/{item['student']}"


def _draw_learning_curves(fig: Any, data: dict[str, Any]) -> None:
    loss, accuracy = fig.subplots(1, 2)
    for series in data["series"]:
        loss.plot(series["epoch"], _nan(series["train_loss"]), label=_label(series))
        accuracy.plot(series["epoch"], _nan(series["eval_accuracy"]), label=_label(series))
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    accuracy.set(xlabel="epoch", ylabel="evaluation accuracy", title="evaluation accuracy")
    _legend(accuracy, fontsize=7)
    _whole_epochs(loss, accuracy)


def _whole_epochs(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_accuracy_vs_params(fig: Any, data: dict[str, Any]) -> None:
    ax = fig.subplots()
    runs = list(dict.fromkeys(p["run"] for p in data["points"]))
    for marker, run in zip(itertools.cycle("osD^v<>ph*"), runs):
        points = [p for p in data["points"] if p["run"] == run]
        ax.scatter([p["params"] for p in points], [p["eval_accuracy"] for p in points], marker=marker, s=40, label=run)
        for p in points:
            ax.annotate(p["student"], (p["params"], p["eval_accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    teacher = data["teacher"]
    if teacher is not None and teacher["eval_accuracy"] is not None:
        params = "" if teacher["params"] is None else f", {teacher['params']:,} params"
        ax.axhline(teacher["eval_accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"teacher ({_label(teacher)}{params})")
    _log_x(ax)
    ax.set(xlabel="parameters", ylabel="evaluation accuracy", title="accuracy against size")
    _legend(ax, fontsize=8)


def _log_x(ax: Any) -> None:
    """A log-scale x axis whose ticks read 20k, 1M: matplotlib's own labels are math text, which
    :func:`save_figure` does not parse (names are drawn as written)."""
    from matplotlib.ticker import EngFormatter, LogFormatter

    class PlainLog(LogFormatter):  # LogFormatter chooses which ticks to label, EngFormatter writes them
        def __call__(self, x: float, pos: int | None = None) -> str:
            return EngFormatter(sep="")(x) if super().__call__(x, pos) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PlainLog())
    ax.xaxis.set_minor_formatter(PlainLog(minor_thresholds=(1, 0.4)))


def _draw_agreement(fig: Any, data: dict[str, Any]) -> None:
    curves, final = fig.subplots(1, 2)
    for series in data["series"]:
        curves.plot(series["epoch"], _nan(series["teacher_agreement"]), label=_label(series))
    curves.set(xlabel="epoch", ylabel="top-1 agreement with the teacher", title="agreement with the teacher")
    _legend(curves, fontsize=7)
    _whole_epochs(curves)
    points = [p for p in data["final"] if p["eval_accuracy"] is not None]
    final.scatter([p["teacher_agreement"] for p in points], [p["eval_accuracy"] for p in points])
    for p in points:
        final.annotate(_label(p), (p["teacher_agreement"], p["eval_accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    final.set(xlabel="agreement with the teacher", ylabel="evaluation accuracy", title="after the last epoch")


def _draw_reliability(fig: Any, data: dict[str, Any]) -> None:
    panels = data["panels"]
    columns = min(4, len(panels)) or 1
    rows = math.ceil(len(panels) / columns) or 1
    fig.set_size_inches(2.6 * columns + 0.5, 2.6 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        edges = np.asarray(panel["edges"])
        ax.bar(edges[:-1], _nan(panel["accuracy"]), width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.4,
               label="accuracy")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ece = "-" if panel["ece"] is None else f"{panel['ece']:.2%}"
        ax.set_title(f"{_label(panel)}, ECE {ece}", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax in axes[::columns]:
        ax.set_ylabel("accuracy")
    for ax in axes[-columns:]:
        ax.set_xlabel("confidence")


def _draw_entropy(fig: Any, data: dict[str, Any]) -> None:
    ax = fig.subplots()
    for entry in data["temperatures"]:
        edges = np.asarray(entry["edges"])
        mean = "-" if entry["mean"] is None else f"{entry['mean']:.3f}"
        ax.stairs(entry["counts"], edges, fill=False, linewidth=1.5, label=f"T={entry['temperature']:g} (mean {mean} nats)")
    ax.axvline(data["max_nats"], color="gray", linestyle=":", linewidth=1, label="log C (uniform)")
    ax.set(xlabel="teacher entropy (nats)", ylabel="items", title="entropy of the teacher's targets")
    _legend(ax, fontsize=8)


def _draw_mass_kept(fig: Any, data: dict[str, Any]) -> None:
    ax = fig.subplots()
    for entry in data["temperatures"]:
        marks = ", ".join(f"{float(level):.0%} at K={k}" for level, k in entry["k_for_level"].items())
        line, = ax.plot(entry["k"], entry["mass"], marker="." if len(entry["k"]) <= 50 else None,
                        label=f"T={entry['temperature']:g}: {marks}")
        ks = sorted(set(entry["k_for_level"].values()))
        ax.plot(ks, [entry["mass"][k - 1] for k in ks], "o", color=line.get_color(), markersize=8, fillstyle="none")
    for level in data["levels"]:
        ax.axhline(level, color="gray", linestyle=":", linewidth=0.8)
    if len(data["temperatures"][0]["k"]) > 50:
        _log_x(ax)
    ax.set(xlabel="K (classes kept, largest first)", ylabel="mean teacher mass kept", title="teacher mass in the top K classes")
    _legend(ax, fontsize=8, loc="lower right")


def _draw_class_accuracy(fig: Any, data: dict[str, Any]) -> None:
    ax = fig.subplots()
    accuracy = _nan(data["accuracy"])
    classes = np.arange(len(accuracy))
    if len(classes) <= 100:
        ax.bar(classes, accuracy)
    else:
        ax.plot(classes, accuracy, ".", markersize=2)
    ax.set(xlabel="class", ylabel="teacher accuracy", ylim=(0, 1), title="teacher accuracy per class (labeled items)")


def _draw_view_spread(fig: Any, data: dict[str, Any]) -> None:
    ax = fig.subplots()
    edges = np.asarray(data["edges"])
    mean = "-" if data["mean"] is None else f"{data['mean']:.3f}"
    ax.stairs(data["counts"], edges, fill=True,
              label=f"mean {mean}; in {data['samples_with_disagreeing_top_class']:,} samples the views' top classes differ")
    filled = np.flatnonzero(data["counts"])
    ax.set_xlim(0, edges[filled[-1] + 1] * 1.05 if len(filled) else 1)
    ax.set(xlabel="mean total-variation distance of a sample's views' targets from their mean (T=1)", ylabel="samples",
           title=f"spread of the teacher's targets across {data['views']} views")
    _legend(ax, fontsize=8)


def _nan(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


DRAW: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "learning_curves": _draw_learning_curves,
    "accuracy_vs_params": _draw_accuracy_vs_params,
    "agreement": _draw_agreement,
    "reliability": _draw_reliability,
    "entropy": _draw_entropy,
    "mass_kept": _draw_mass_kept,
    "class_accuracy": _draw_class_accuracy,
    "view_spread": _draw_view_spread,
}
