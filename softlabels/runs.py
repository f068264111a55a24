"""``train-student`` run directories read back: the summary, each student's per-epoch metrics and
its last evaluation predictions.

A run directory may come from anyone, so it is read as data only (JSON, and ``.npz`` arrays loaded
with ``allow_pickle=False``) and every field is checked before use; anything else is a one-line
:class:`~softlabels.errors.SoftlabelsError`.

Example::

    run = read_run("runs/kd")
    run.name, [row["student"] for row in run.summary]   # ('kd', ['linear', 'mlp'])
    run.metrics["mlp"][-1]["eval_accuracy"]             # 0.816
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import file_sha256
from .errors import SoftlabelsError
from .kinds.base import is_number
from .names import distinct, plain_name
from .train import CONFIG, PREDICTIONS, SUMMARY

METRICS = "metrics.jsonl"
CHECKPOINT_FILE = "student.pth"

# Fields of a summary row and of a metrics.jsonl record that are numbers or null, and of those the
# shares (from 0 to 1) and the counts and sizes (0 or more).
_SUMMARY_NUMBERS = ("params", "eval_accuracy", "teacher_agreement", "eval_nats", "ece", "seconds")
_METRICS_NUMBERS = ("train_loss", "train_ce", "train_kl", "lr", "eval_accuracy", "teacher_agreement", "eval_nats", "ece",
                    "seconds")
_SHARES = ("eval_accuracy", "teacher_agreement", "ece")
_NOT_NEGATIVE = ("params", "eval_nats", "seconds")
_PREDICTION_KINDS = {"predicted": "i", "confidence": "f", "labels": "i"}


@dataclass(eq=False)  # runs are told apart by identity: their arrays do not compare as one truth value
class Run:
    """One run directory: its ``summary`` rows, and per student name its ``metrics`` records,
    ``predictions`` (``None`` without evaluation data) and ``checkpoint_sha256`` (``None`` if the
    student has no checkpoint); ``teacher_sha256`` is the sha256 of the teacher of the cache it was
    trained from (from its ``config.json``), ``None`` for a run without a cache."""

    name: str
    path: Path
    summary: list[dict[str, Any]]
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    predictions: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict)
    checkpoint_sha256: dict[str, str | None] = field(default_factory=dict)
    teacher_sha256: str | None = None


def read_summary(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The run's name (its directory's) and its ``summary.json`` rows, checked; ``path`` is the run
    directory or the summary file itself."""
    path = Path(path)
    if not path.is_file():
        if not (path / SUMMARY).is_file():
            raise SoftlabelsError(f"{path} is not a finished train-student run: it has no {SUMMARY}")
        path = path / SUMMARY
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SoftlabelsError(f"cannot read summary {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise SoftlabelsError(f"{path} is not a train-student summary (a non-empty JSON list of objects)")
    names = [entry.get("student") for entry in entries]
    if len(set(map(str, names))) != len(names):
        raise SoftlabelsError(f"{path}: two entries name one student")
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not plain_name(entry.get("student")):
            raise SoftlabelsError(f"{where}: 'student' must be a plain name, got {entry.get('student')!r}")
        _check_numbers(entry, _SUMMARY_NUMBERS, where)
        params = entry.get("params")  # a number of 0 or more already (_check_numbers)
        if params is not None and not (isinstance(params, int) and params < 2**53):
            raise SoftlabelsError(f"{where}: 'params' must be a parameter count (an integer from 0 to 2**53), got {str(params)[:40]}")
        if not isinstance(entry.get("targets", ""), str):
            raise SoftlabelsError(f"{where}: 'targets' must be a string")
    return path.resolve().parent.name, entries


def _readable(path: Path, what: str) -> Path:
    """``path``, refused where it is there but no regular file: reading a FIFO would block forever."""
    if path.exists() and not path.is_file():
        raise SoftlabelsError(f"cannot read {what} {path}: not a regular file")
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """A student's ``metrics.jsonl``: one object per epoch, epochs 1, 2, ... in order, every metric
    a number or null."""
    path = _readable(Path(path), "metrics")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SoftlabelsError(f"cannot read metrics {path}: {exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SoftlabelsError(f"{where} is not JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
        check_metrics_record(record, number, where)
        records.append(record)
    return records


def check_metrics_record(record: Any, epoch: int, where: str) -> None:
    """Refuse what is not the metrics record of ``epoch`` (:func:`read_metrics`'s lines, and the
    history a ``train-student`` checkpoint holds to write them from)."""
    if not isinstance(record, dict):
        raise SoftlabelsError(f"{where} is not a JSON object")
    if record.get("epoch") != epoch or isinstance(record.get("epoch"), bool):
        raise SoftlabelsError(f"{where}: 'epoch' must be {epoch}, got {record.get('epoch')!r}")
    _check_numbers(record, _METRICS_NUMBERS, where)


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """A student's :data:`~softlabels.train.PREDICTIONS`: ``predicted``, ``confidence`` in [0, 1] and
    ``labels`` (``-1``: none), of one shape, loaded without pickle."""
    path = _readable(Path(path), "predictions")
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy under the archive's name
                raise ValueError("not an .npz archive")
            with data:
                arrays = {name: data[name] for name in _PREDICTION_KINDS if name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SoftlabelsError(f"cannot read predictions {path}: {type(exc).__name__}: {exc}") from exc
    for name, kind in _PREDICTION_KINDS.items():
        if name not in arrays or arrays[name].dtype.kind != kind:
            raise SoftlabelsError(f"{path}: array '{name}' is missing or not of {'signed integers' if kind == 'i' else 'floats'}")
    if len({a.shape for a in arrays.values()}) != 1:
        raise SoftlabelsError(f"{path}: arrays 'predicted', 'confidence' and 'labels' differ in shape")
    if arrays["labels"].size and (arrays["predicted"].min() < 0 or arrays["labels"].min() < -1):
        raise SoftlabelsError(f"{path}: 'predicted' must hold classes (0 or more) and 'labels' classes or -1 (no label)")
    confidence = arrays["confidence"]
    if confidence.size and not (np.isfinite(confidence).all() and confidence.min() >= 0 and confidence.max() <= 1):
        raise SoftlabelsError(f"{path}: 'confidence' must hold probabilities in [0, 1]")
    return arrays


def run_names(paths: list[str | Path]) -> list[str]:
    """What tables and figures call each run: its directory's name, with its parent's where runs
    share one (``a/kd``, ``b/kd``), made distinct.

    Example::

        run_names(["a/kd", "b/kd", "runs/scratch"])   # ['a/kd', 'b/kd', 'scratch']
    """
    folders = [Path(p).resolve() for p in paths]
    folders = [f.parent if f.is_file() else f for f in folders]  # a summary file names its run's directory
    names = [f.name for f in folders]
    return distinct([f"{f.parent.name}/{n}" if names.count(n) > 1 and f.parent.name else n for f, n in zip(folders, names)])


def read_runs(paths: list[str | Path], *, records: bool = True) -> list[Run]:
    """:func:`read_run` of each of ``paths``, named by :func:`run_names`."""
    runs = [read_run(path, records=records) for path in paths]
    for run, name in zip(runs, run_names(paths)):
        run.name = name
    return runs


def read_run(path: str | Path, *, records: bool = True) -> Run:
    """Everything a run directory holds for a report, checked (see :class:`Run`); without
    ``records``, the summary and the checkpoints' hashes only (no metrics, no predictions)."""
    path = Path(path)
    name, summary = read_summary(path)
    run = Run(name=name, path=path, summary=summary, teacher_sha256=_cache_teacher(path / CONFIG))
    for row in summary:
        student = path / row["student"]
        if records:
            run.metrics[row["student"]] = read_metrics(student / METRICS)
            predictions = student / PREDICTIONS
            run.predictions[row["student"]] = read_predictions(predictions) if predictions.exists() else None
        checkpoint = student / CHECKPOINT_FILE
        run.checkpoint_sha256[row["student"]] = file_sha256(checkpoint) if checkpoint.is_file() else None
    return run


def find_teacher(runs: list[Run]) -> tuple[Run, dict[str, Any]] | None:
    """The run and summary row of the student that is the teacher of a cache another run was
    distilled from: its checkpoint's sha256 is the one that cache's manifest recorded."""
    teachers = {run.teacher_sha256 for run in runs} - {None}
    for run in runs:
        for row in run.summary:
            if run.checkpoint_sha256.get(row["student"]) in teachers:
                return run, row
    return None


def _cache_teacher(config: Path) -> str | None:
    """``cache_identity["teacher.sha256"]`` of a run's ``config.json``, if it has one."""
    try:
        options = json.loads(_readable(config, "run options").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # the options only name the teacher; a run without them just has none
    identity = options.get("cache_identity") if isinstance(options, dict) else None
    sha256 = identity.get("teacher.sha256") if isinstance(identity, dict) else None
    return sha256 if isinstance(sha256, str) else None


def _check_numbers(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if not is_number(value):
            raise SoftlabelsError(f"{where}: '{key}' must be a number or null, got {value!r}")
        if key in _SHARES and not 0 <= value <= 1:
            raise SoftlabelsError(f"{where}: '{key}' must be a share from 0 to 1, got {value!r}")
        if key in _NOT_NEGATIVE and value < 0:
            raise SoftlabelsError(f"{where}: '{key}' must not be negative, got {value!r}")
