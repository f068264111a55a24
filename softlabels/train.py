"""Train one or many students from one cache, resumably, and evaluate models.

All students share one pass over the data per epoch: each batch is read once and fed to every
student. Each student keeps its own initial seed (derived from the run's seed and its name) and its
own random-number state (CPU, and CUDA when training there), so a student trained beside others gets
the same weights as one trained alone, and two runs with the same options give bit-identical weights
on the CPU.

A run writes ``OUT/checkpoint.pt`` after every epoch (and every ``checkpoint_every`` steps): every
student's weights, optimizer, schedule, random state and running metrics, the loader's position and
the options. ``resume=True`` continues from it and ends with the weights an uninterrupted run gets.

Example::

    config = TrainConfig(epochs=10, temperature=4.0, alpha=0.5, checkpoint_every=500)
    students = [StudentSpec("mlp"), StudentSpec("cnn1d", {"channels": 16})]
    summary = train_students(students, source=source, cache=cache, config=config, out_dir="runs/kd")
    # killed? the same call with resume=True continues from runs/kd/checkpoint.pt
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .augment import Pipeline
from .checkpoint import LoadedModel, load_model, read_torch_file, save_checkpoint
from .models import HF_PREFIX
from .data import NO_LABEL, Source, check_classes, default_workers, open_data
from .dump import iter_logits, resolve_device
from .errors import SoftlabelsError
from .loader import Batch, SoftTargetLoader, source_for_cache
from .losses import KL_DIRECTIONS, KDTerms, kd_terms
from .models import build_model, check_output_shape, count_parameters
from .names import distinct, plain_name
from .calibration import Calibration
from .durable import exclusive, remove_temporaries, write_atomically
from .kinds.base import argmax, is_number
from .kinds.topk import TAILS
from .store import Cache, open_cache
from .tensorboard_log import TensorBoardLog, summary_writer_class
from .tokens import TokenSource, check_tokenizer

_EVAL_BATCH = 1024
CHECKPOINT = "checkpoint.pt"
PREDICTIONS = "eval_predictions.npz"  # per student: its predictions on the evaluation data after the last epoch
SUMMARY = "summary.json"
CONFIG = "config.json"
RUN_FILES = (CHECKPOINT, SUMMARY, CONFIG)  # beside the students' directories
_CHECKPOINT_FORMAT = "softlabels-train-checkpoint"


@dataclass
class StudentSpec:
    """An architecture to train: a built-in name or ``module:callable``, with keyword arguments."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # directory and table name; defaults to the architecture's name


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0
    alpha: float = 0.5
    kl: str = "forward"
    seed: int = 0
    hard_labels_only: bool = False
    device: str = "auto"
    shards: int | None = None  # split each batch as this many ranks would; None: the number of ranks
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: at the end of each epoch only
    num_workers: int | None = None  # DataLoader workers; None: softlabels.data.default_workers
    augment: Pipeline | None = None  # a fresh augmented view of every sample in every epoch (not for view caches)
    topk_tail: str = "exact"  # a top-k cache's tail: exact, renormalize or gold (softlabels.kinds.topk.TAILS)

    # Options that change neither the batches nor the arithmetic, so a resumed run may change them.
    # The device is compared as the type it resolves to ("auto" on a CPU machine equals "cpu").
    FREE_ON_RESUME = ("checkpoint_every", "num_workers", "device")

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise SoftlabelsError("epochs and batch size must be positive")
        if not (math.isfinite(self.lr) and math.isfinite(self.weight_decay)) or self.lr <= 0 or self.weight_decay < 0:
            raise SoftlabelsError(f"learning rate must be > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise SoftlabelsError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:  # also false for NaN
            raise SoftlabelsError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.kl not in KL_DIRECTIONS:
            raise SoftlabelsError(f"kl must be forward or reverse, got {self.kl}")
        if self.shards is not None and (self.shards < 1 or self.batch_size % self.shards):
            raise SoftlabelsError(f"batch size {self.batch_size} does not split into {self.shards} shards")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise SoftlabelsError(f"checkpoint interval must be positive, got {self.checkpoint_every}")
        if self.num_workers is not None and self.num_workers < 0:
            raise SoftlabelsError(f"number of workers must be >= 0, got {self.num_workers}")
        if self.topk_tail not in TAILS:
            raise SoftlabelsError(f"top-k tail must be one of {', '.join(TAILS)}, got {self.topk_tail}")


class _Metrics:
    """Evaluation metrics accumulated batch by batch, so no ``[N, *items, C]`` array is ever held;
    with ``keep_predictions``, each item's top class, its probability and its label are kept too."""

    def __init__(self, keep_predictions: bool = False) -> None:
        self.labeled = self.correct = self.items = self.agree = 0
        self.nats = 0.0
        self.calibration = Calibration()
        self.has_teacher = False
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = [] if keep_predictions else None

    def add(self, logits: torch.Tensor, labels: torch.Tensor, teacher_top1: np.ndarray | None) -> None:
        logits = logits.float()
        # Labels per item (a token window's next tokens) say which items are targets at all; a
        # sample's label is its items' (an unlabeled sample still has a teacher to agree with).
        per_item = labels.ndim == logits.ndim - 1 and logits.ndim > 2
        labels = labels.to(logits.device).reshape(labels.shape + (1,) * (logits.ndim - 1 - labels.ndim)).expand(logits.shape[:-1])
        log_p = torch.log_softmax(logits, dim=-1)
        confidence, predicted = log_p.max(-1)
        labeled = labels != NO_LABEL
        if self.kept is not None:
            self.kept.append((predicted.cpu().numpy(), confidence.exp().double().cpu().numpy(), labels.cpu().numpy()))
        if teacher_top1 is not None:
            self.has_teacher = True
            agree = predicted.cpu().numpy() == teacher_top1
            scored = labeled.cpu().numpy() if per_item else np.ones_like(agree)
            self.agree += int(agree[scored].sum())
            self.items += int(scored.sum())
        if not labeled.any():
            return
        gold = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0]
        hit = (predicted == labels)[labeled].double().cpu().numpy()
        confidence = confidence[labeled].exp().double().cpu().numpy()
        self.labeled += int(labeled.sum())
        self.correct += int(hit.sum())
        self.nats -= float(gold[labeled].double().sum())
        self.calibration.add(confidence, hit)

    def result(self) -> dict[str, float | None]:
        labeled = self.labeled or None
        return {
            "accuracy": self.correct / labeled if labeled else None,
            "teacher_agreement": self.agree / self.items if self.has_teacher and self.items else None,
            "nats": self.nats / labeled if labeled else None,  # mean cross-entropy per labeled item
            "ece": self.calibration.ece(),
        }

    def predictions(self) -> dict[str, np.ndarray]:
        """What :data:`PREDICTIONS` holds: ``predicted`` (int64), ``confidence`` (float64, the
        probability of the predicted class) and ``labels`` (int64, ``-1`` for none), each ``[N, *items]``."""
        parts = list(zip(*self.kept)) if self.kept else ([], [], [])
        names, dtypes = ("predicted", "confidence", "labels"), (np.int64, np.float64, np.int64)
        return {name: np.concatenate(part).astype(dtype, copy=False) if part else np.zeros(0, dtype)
                for name, part, dtype in zip(names, parts, dtypes)}


def evaluate(
    model: torch.nn.Module, source: Source, *, teacher_top1: np.ndarray | None = None, device: str = "cpu"
) -> dict[str, float | None]:
    """``model`` on ``source``: accuracy, mean cross-entropy (``nats``) and expected calibration
    error (15 bins of confidence, ``ece``) over the labeled items, and top-1 agreement with the
    teacher given its top class per item. For token windows an item is a position and its label the
    next token, so ``nats`` is the held-out nats per token (perplexity ``exp(nats)``).

    Example::

        evaluate(load_model("student.pth").model, open_data("mnist1d://test"))
        # {'accuracy': 0.8, 'teacher_agreement': None, 'nats': 0.61, 'ece': 0.04}
    """
    return _evaluate(model, source, teacher_top1=teacher_top1, device=device).result()


def _evaluate(model: torch.nn.Module, source: Source, *, teacher_top1: np.ndarray | None, device: str,
              keep_predictions: bool = False) -> _Metrics:
    if teacher_top1 is not None and len(teacher_top1) != len(source):
        raise SoftlabelsError(f"teacher predictions cover {len(teacher_top1)} rows, the data has {len(source)}")
    was_training = model.training
    metrics = _Metrics(keep_predictions)
    for start, out, y in iter_logits(model, source, batch_size=_EVAL_BATCH, device=resolve_device(device)):
        _check_label_range(out.shape[-1], y, f"the model evaluated on {source.spec}")
        if not torch.isfinite(out).all():
            inputs = source.read(start, start + len(out))[0]  # what the outputs came from, read again on this error only
            if np.issubdtype(inputs.dtype, np.floating) and not np.isfinite(inputs).all():
                row = start + int(np.flatnonzero(~np.isfinite(inputs.reshape(len(inputs), -1)).all(1))[0])
                raise SoftlabelsError(f"the inputs of {source.spec} hold NaN or Inf (sample {row})")
            raise SoftlabelsError(f"the model evaluated on {source.spec} outputs NaN or Inf (from sample {start}): its weights may be damaged")
        if teacher_top1 is not None and tuple(teacher_top1.shape[1:]) != tuple(out.shape[1:-1]):
            raise SoftlabelsError(f"the teacher's classes are {list(teacher_top1.shape[1:])} per sample (a cache of recorded views?), "
                                  f"the model's {list(out.shape[1:-1])}: use a cache of the data itself")
        metrics.add(out, y, None if teacher_top1 is None else teacher_top1[start:start + len(y)])
    model.train(was_training)
    return metrics


def top_classes(model: torch.nn.Module, source: Source, *, device: str = "cpu") -> np.ndarray:
    """The model's top class for every item of ``source`` (``[N, *items]``)."""
    was_training = model.training
    parts = []
    for _, out, y in iter_logits(model, source, batch_size=_EVAL_BATCH, device=resolve_device(device)):
        _check_label_range(out.shape[-1], y, f"the teacher run on {source.spec}")
        parts.append(argmax(out).cpu().numpy())
    model.train(was_training)
    return np.concatenate(parts)


def _check_label_range(classes: int, labels: torch.Tensor, who: str) -> None:
    """Refuse labels that name no output of a model: its class count differs from the data's."""
    largest = int(labels.max()) if labels.numel() else -1
    if largest >= classes:
        raise SoftlabelsError(f"{who} has {classes} classes, but the data has label {largest}")


def eval_inputs(
    eval_data: str | None, eval_cache: str | Path | None, eval_teacher: str | Path | None, *,
    device: str = "auto", trust_code: bool = False,
) -> tuple[Source | None, np.ndarray | None]:
    """The evaluation data and the teacher's top class on each of its rows (``None`` where not asked).

    The teacher's classes come from ``eval_cache`` (a cache dumped from the evaluation data, whose
    manifest names it unless ``eval_data`` does) or from running ``eval_teacher`` once on ``eval_data``.

    Example::

        source, teacher_top1 = eval_inputs("mnist1d://test", "test.zarr", None)
    """
    if eval_cache and eval_teacher:
        raise SoftlabelsError("give --eval-cache or --eval-teacher, not both")
    if eval_cache:
        with open_cache(eval_cache) as cache:
            return source_for_cache(cache, eval_data, trust_code=trust_code), cache.teacher_top1()
    if not eval_data:
        if eval_teacher:
            raise SoftlabelsError("--eval-teacher needs --eval-data")
        return None, None
    source = open_data(eval_data)
    if eval_teacher:
        teacher = load_model(eval_teacher, input_shape=source.input_shape, trust_code=trust_code)
        teacher.check_data(source, "teacher")
        return source, top_classes(teacher.model, source, device=device)
    return source, None


# Classes counted from the labels alone are believed up to this many (and up to twice the samples).
_INFERRED_CLASSES = 1 << 16


def class_count(source: Source, cache: Cache | None, num_classes: int | None = None) -> int:
    """The number of classes: the cache's, else ``num_classes``, else a token dataset's tokenizer's
    vocabulary, else the dataset's largest label (or token id) + 1.

    Example::

        class_count(open_data("mnist1d://train"), None)    # 10
    """
    if cache is not None:
        if num_classes is not None and num_classes != cache.num_classes:
            raise SoftlabelsError(f"--num-classes {num_classes} differs from the {cache.num_classes} classes of cache {cache.path}")
        return cache.num_classes
    if num_classes is not None:
        return num_classes
    if isinstance(source, TokenSource):
        if source.tokenizer is not None:
            return source.vocab_size()
        largest, items, what, unit = source.vocab_size() - 1, len(source) * source.input_shape[0], "token id", "tokens"
    else:
        labels = source.labels()
        largest, items, what, unit = int(labels.max(initial=NO_LABEL)), len(labels), "label", "samples"
        if largest == NO_LABEL:
            raise SoftlabelsError(f"dataset {source.spec} has no labels to count the classes from: pass --num-classes")
    if largest >= max(_INFERRED_CLASSES, 2 * items):  # one stray label or id would size every student's output
        raise SoftlabelsError(f"dataset {source.spec}: its largest {what} {largest} would make {largest + 1:,} classes "
                              f"for {items:,} {unit}: pass --num-classes if that is right")
    return largest + 1


def _student_names(students: list[StudentSpec]) -> list[str]:
    """Each student's directory in the run: its given name, else its architecture's (``mlp``,
    ``mlp-2``, ...: never a name another student is given)."""
    given = [spec.name for spec in students if spec.name]
    for name in given:
        if given.count(name) > 1:
            raise SoftlabelsError(f"two students are named {name!r}: give each its own name")
    defaults = iter(distinct([_default_name(spec.arch) for spec in students if not spec.name], taken=given))
    names = [spec.name or next(defaults) for spec in students]
    for name in names:
        if not plain_name(name):
            raise SoftlabelsError(f"student name {name!r} names no directory of its own in the run: "
                                  "use a plain name, without path separators")
        if name in RUN_FILES:
            raise SoftlabelsError(f"student name {name!r} is the name of a file of the run itself: choose another")
    return names


def _default_name(arch: str) -> str:
    """``mlp`` for ``mlp``, ``f`` for ``module:f``, ``small`` for ``hf:small/config.json`` (or ``hf:small``)."""
    if arch.startswith(HF_PREFIX):
        path = Path(arch[len(HF_PREFIX):])
        return (path.parent if path.name == "config.json" else path).name or "hf"
    return arch.rpartition(":")[2]


def _student_seed(seed: int, name: str) -> int:
    # Tied to the name, not the position, so adding a student does not change the others.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _save_every_rng() -> Callable[[], None]:
    """Save the random state of the CPU and of every CUDA device (``torch.manual_seed`` seeds them
    all), and return what sets it back."""
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if torch.cuda.is_available() else []

    def give_back() -> None:
        torch.set_rng_state(cpu)
        for d, state in enumerate(cuda):
            torch.cuda.set_rng_state(state, d)
    return give_back


def _repeatable_kernels() -> Callable[[], None]:
    """Have cuDNN use deterministic kernels, chosen without benchmarking, and return what sets the
    caller's choice back. Its default convolution backward passes may sum in another order from run
    to run: on an H200, two runs of one seed gave a cnn1d student different last bits without this.
    """
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def give_back() -> None:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    return give_back


def _set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _like(value: Any, model: torch.Tensor) -> bool:
    """Whether ``value`` is a tensor of ``model``'s dtype and shape."""
    return isinstance(value, torch.Tensor) and value.dtype == model.dtype and value.shape == model.shape


def _same_structure(saved: Any, fresh: Any) -> bool:
    """Whether ``saved`` is built like ``fresh`` (the state of an optimizer or schedule as this run
    makes it): dicts of the same keys, lists and tuples of the same length, tensors of the same
    dtype and shape, finite numbers where numbers are, and otherwise values of the same type. torch
    loads such state without checking it, and fails (or trains silently wrong) steps later."""
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and saved.keys() == fresh.keys() and all(_same_structure(saved[k], v) for k, v in fresh.items())
    if isinstance(fresh, (list, tuple)):
        return type(saved) is type(fresh) and len(saved) == len(fresh) and all(map(_same_structure, saved, fresh))
    if isinstance(fresh, torch.Tensor):
        return _like(saved, fresh)
    if is_number(fresh):  # an int learning rate given to the optimizer is a float once scheduled
        return is_number(saved)
    return type(saved) is type(fresh)


# The settings of an optimizer's group, and of its schedule's state, that change as a run trains.
_MOVING = {"lr", "last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step"}


def _equal(saved: Any, fresh: Any) -> bool:
    """``saved == fresh``, as plain values (a tensor setting is compared by its values)."""
    try:
        return type(saved) is type(fresh) and bool(saved == fresh if not isinstance(fresh, torch.Tensor) else torch.equal(saved, fresh))
    except Exception:
        return False


def _check_schedule_state(saved: Any, schedule: Any) -> None:
    """Refuse a schedule state that is not ``schedule``'s: its counters and learning rates of the
    fresh state's types (and lengths), every other entry the fresh state's own; entries only one
    torch version has are left out, as for the optimizer's groups."""
    fresh = schedule.state_dict()
    needed = {"last_epoch", "_step_count", "base_lrs", "_last_lr"} & fresh.keys()
    if not (isinstance(saved, dict) and needed <= saved.keys()
            and all(_same_structure(saved[k], fresh[k]) if k in _MOVING else _equal(saved[k], fresh[k]) for k in saved.keys() & fresh.keys())):
        raise ValueError("its learning-rate schedule's state is not one of this schedule")


# What AdamW keeps per parameter once it has stepped: a step count (a scalar) and two moments of the
# parameter's dtype and shape.
_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer state that is not what ``optimizer`` (not yet stepped) saves once it has:
    the same groups of the same parameters, each setting the fresh group's (the learning rate a
    finite number), and for each parameter nothing or :data:`_ADAMW_STATE` for its shape."""
    fresh = optimizer.state_dict()  # its state is empty: no step yet
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    # A group's settings are compared where both have them: another torch version may add a setting
    # (its optimizer gives the default to a group saved without it) or drop one. They are the run's
    # options (which a resume repeats) or torch's defaults, so each must be the fresh group's; only
    # the learning rate moves with the schedule.
    if not (isinstance(saved, dict) and saved.keys() == fresh.keys() and isinstance(groups, list) and len(groups) == len(fresh["param_groups"])
            and all(isinstance(g, dict) and {"params", "lr"} <= g.keys() and g["params"] == f["params"]
                    and all(_same_structure(g[k], f[k]) if k in _MOVING else _equal(g[k], f[k]) for k in g.keys() & f.keys())
                    for g, f in zip(groups, fresh["param_groups"]))):
        raise ValueError("its optimizer's parameter groups are not this optimizer's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(saved["state"], dict):
        raise ValueError("its optimizer's state is not a dict")
    for index, values in saved["state"].items():
        if not (type(index) is int and 0 <= index < len(params) and isinstance(values, dict) and values.keys() == _ADAMW_STATE
                and _like(values["exp_avg"], params[index]) and _like(values["exp_avg_sq"], params[index])
                and isinstance(values["step"], torch.Tensor) and values["step"].ndim == 0 and values["step"].is_floating_point()
                and bool(torch.isfinite(values["step"])) and values["step"] >= 0):
            raise ValueError(f"its optimizer's state of parameter {index!r} is not AdamW's for that parameter")


# The evaluation metrics a student holds, and their names in its history records and the summary.
_METRIC_FIELDS = {"accuracy": "eval_accuracy", "teacher_agreement": "teacher_agreement", "nats": "eval_nats", "ece": "ece"}


class _Student:
    def __init__(self, name: str, spec: StudentSpec, model: torch.nn.Module, config: TrainConfig, total_steps: int, device: torch.device):
        self.name, self.spec, self.model = name, spec, model
        self.forward = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
        self.rng = _rng_state(device)  # the random state its dropout and the like draw from
        self.seconds = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0
        # the loss's terms, each averaged over the steps that have it: hard-label CE and the soft KL at T
        self.terms = {"ce_sum": 0.0, "ce_count": 0, "kl_sum": 0.0, "kl_count": 0}
        self.metrics: dict[str, float | None] = {"accuracy": None, "teacher_agreement": None, "nats": None, "ece": None}
        self.history: list[dict[str, Any]] = []  # one record per finished epoch: metrics.jsonl
        self.predictions: dict[str, np.ndarray] | None = None  # of the last evaluation (not checkpointed)
        self.rows = 0  # trained on in this process's part of the epoch, and the seconds their steps took
        self.step_seconds = 0.0

    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": dict(self.rng),
            "seconds": self.seconds, "loss_sum": self.loss_sum, "loss_count": self.loss_count, "terms": dict(self.terms),
            "metrics": dict(self.metrics), "history": list(self.history),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state`), each part checked first: the optimizer and
        schedule against this student's own, fresh ones, the history as ``report`` reads it back from
        metrics.jsonl, and the metrics against its last epoch's. A ValueError, KeyError or TypeError
        means the checkpoint does not hold what this student saved."""
        from .runs import check_metrics_record  # here: runs imports this module

        rng, ours = state["rng"], self.rng
        if not (isinstance(rng, dict) and _like(rng.get("cpu"), ours["cpu"])
                and (rng.get("cuda") is None if ours["cuda"] is None else _like(rng.get("cuda"), ours["cuda"]))):
            raise ValueError("its random state is not one this device's generators take")
        numbers = (state["seconds"], state["loss_sum"], state["loss_count"])
        terms = state.get("terms", {})  # absent from checkpoints written before the terms were kept: from zero
        if not (all(is_number(v) for v in numbers) and state["seconds"] >= 0 and isinstance(state["loss_count"], int)
                and isinstance(terms, dict)
                and all(is_number(terms.get(key, 0)) and (isinstance(terms.get(key, 0), int) or isinstance(value, float))
                        for key, value in self.terms.items())  # sums are numbers, counts integers
                and isinstance(state["history"], list)):
            raise ValueError("its counters, loss terms or history are not of their types")
        history = state["history"]
        for epoch, record in enumerate(history, 1):
            try:
                check_metrics_record(record, epoch, f"student '{self.name}', epoch {epoch} of its history")
            except SoftlabelsError as exc:
                raise ValueError(str(exc)) from None
        metrics = {key: (history[-1] if history else {}).get(field) for key, field in _METRIC_FIELDS.items()}
        if not (isinstance(state["metrics"], dict) and state["metrics"] == metrics):
            raise ValueError(f"the metrics of student '{self.name}' are not those of its last epoch")
        _check_optimizer_state(state["optimizer"], self.optimizer)
        _check_schedule_state(state["schedule"], self.schedule)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng = rng
        self.seconds, self.loss_sum, self.loss_count = numbers
        self.terms = {key: type(value)(terms.get(key, 0)) for key, value in self.terms.items()}
        self.metrics, self.history = metrics, history


def train_students(
    students: list[StudentSpec],
    *,
    source: Source,
    cache: Cache | None,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    eval_source: Source | None = None,
    eval_teacher_top1: np.ndarray | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    teacher: LoadedModel | None = None,
    trust_code: bool = False,
    tensorboard: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train every student in ``students`` from ``cache`` (or on hard labels alone, or from
    ``teacher`` run on every batch); return the summary.

    With ``out_dir``, each student gets ``out_dir/NAME/student.pth`` and ``metrics.jsonl`` (one JSON
    object per epoch), the summary is written to ``out_dir/summary.json`` and the run's state to
    ``out_dir/checkpoint.pt``; every file is replaced atomically. An ``out_dir`` that already holds a
    run is refused unless ``resume`` (continue it from its checkpoint, with the same options) or
    ``overwrite``. ``num_classes`` defaults to the cache's, or without one to the largest label + 1.
    The caller's random state is the same after the call as before it. With an evaluation source,
    each student's predictions after the last epoch go to ``out_dir/NAME/eval_predictions.npz``
    (:data:`PREDICTIONS`). ``tensorboard`` names a directory for per-epoch TensorBoard scalars
    (:mod:`softlabels.tensorboard_log`).

    A view cache (:mod:`softlabels.views`) trains each sample on one recorded view per epoch, its
    inputs replayed. ``config.augment`` gives every sample a fresh view each epoch instead, for the
    two baselines a view cache is compared with: ``hard_labels_only`` (augmented scratch training)
    and ``teacher`` (online function matching: the teacher on every fresh view).

    Example::

        summary = train_students([StudentSpec("mlp")], source=source, cache=cache,
                                 config=TrainConfig(epochs=5), out_dir="runs/kd", resume=True)
    """
    config.validate()
    if not students:
        raise SoftlabelsError("no student to train: give at least one --student")
    for folder, what in ((out_dir, "--out"), (tensorboard, "--tensorboard")):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise SoftlabelsError(f"{what} {folder} is a file, not a folder")
    if tensorboard is not None:
        summary_writer_class()  # a missing extra is refused before the run directory is touched
    if teacher is not None and (cache is not None or config.hard_labels_only):
        raise SoftlabelsError("--online-teacher runs the teacher on every batch: give it --data, without --cache or --hard-labels-only")
    if cache is None and teacher is None and not config.hard_labels_only:
        raise SoftlabelsError("without a cache only --hard-labels-only or --online-teacher training is possible")
    if config.augment is not None and cache is not None and not config.hard_labels_only and "views" not in cache.manifest:
        raise SoftlabelsError(
            f"--augment on cache {cache.path}, which has no views: its targets are for the unaugmented inputs. "
            "Dump a view cache (dump --views V --augment ...), or train with --hard-labels-only or --online-teacher"
        )
    if config.hard_labels_only and not (source.has_labels or (cache is not None and (cache.labels() != NO_LABEL).any())):
        raise SoftlabelsError(f"--hard-labels-only needs labels, and dataset {source.spec} has none")
    if eval_source is not None and eval_source.input_shape != source.input_shape:
        raise SoftlabelsError(
            f"--eval-data inputs have shape {list(eval_source.input_shape)}, the training data {list(source.input_shape)}"
        )
    num_classes = class_count(source, cache, num_classes or (teacher.num_classes if teacher is not None else None))
    if teacher is not None:
        teacher.check_data(source, "teacher")
    # The tokenizer of the token ids the students learn from, recorded in their checkpoints.
    tokenizer = next((t for t in (getattr(source, "tokenizer", None),
                                  ((cache.manifest.get("tokens") or {}).get("tokenizer") if cache is not None else None)) if t), None)
    # What each output class of the students means: the names of the training data's classes, else
    # those the cache or the teacher recorded (a teacher's targets over unlabeled data).
    named = [(source.classes, f"training data {source.spec}")]
    if cache is not None:
        named.append((cache.classes, f"cache {cache.path}"))
    if teacher is not None:
        named.append((teacher.classes, f"teacher {teacher.path}"))
    classes = next((names for names, _ in named if names is not None), None)
    if classes is not None and len(classes) != num_classes:  # names of some outputs only (a folder of fewer classes)
        classes = None
    if eval_source is not None:
        if cache is not None:
            check_tokenizer(cache.manifest.get("tokens"), eval_source, where=f"cache {cache.path}")
        for names, where in named:
            check_classes(names, eval_source, where)
    device = resolve_device(config.device)
    # Hard-label training reads the cache only for labels the dataset lacks, never the logits otherwise.
    loader_cache = None if config.hard_labels_only and source.has_labels else cache
    # Under torchrun each rank takes its slice of every global batch and DistributedDataParallel
    # averages the gradients, which equals one process taking the mean over the whole batch.
    rank, ranks = distributed.world()
    shards = config.shards or ranks
    if ranks > 1 and shards != ranks:
        raise SoftlabelsError(f"--shards {shards} differs from the {ranks} ranks torchrun started")
    loader = SoftTargetLoader(
        source, loader_cache, batch_size=config.batch_size, seed=config.seed, shards=shards, shard=rank if ranks > 1 else None,
        augment=config.augment, trust_code=trust_code,
    )
    pipeline = config.augment or (loader.views.pipeline if loader.views is not None else None)
    if pipeline is not None and pipeline.output_shape(source.input_shape) != source.input_shape:
        raise SoftlabelsError(
            f"the augmentations turn inputs of shape {list(source.input_shape)} into "
            f"{list(pipeline.output_shape(source.input_shape))}; students train and are evaluated on the data's own shape"
        )
    if teacher is not None:
        teacher.model.eval().to(device)
    steps = loader.batches_per_epoch
    total_steps = max(1, config.epochs * steps)
    names = _student_names(students)
    run = Path(out_dir) if out_dir is not None else None
    options = _options(config, shards, names, students, source, cache, eval_source, eval_teacher_top1, num_classes, device)
    options["online_teacher"] = teacher.sha256 if teacher is not None else None
    out = run if rank == 0 else None  # rank 0 evaluates and writes
    with contextlib.ExitStack() as held:
        if out is not None:  # one process at a time writes a run
            held.enter_context(exclusive(out, "train-student"))
            for folder in (out, *(out / name for name in names)):
                remove_temporaries(folder)
        saved = _start_run(run, options, resume=resume, overwrite=overwrite)
        if out is None:
            eval_source = None
        num_workers = config.num_workers
        if num_workers is None:  # a dataset read item by item is read in worker processes, off the training loop
            num_workers = default_workers(source, device)

        give_back_rng = _save_every_rng()  # each student seeds the generators; the caller gets its own back
        give_back_kernels = _repeatable_kernels()  # same seed, same weights, on a GPU too
        try:
            sample = torch.from_numpy(source.read(0, min(2, len(source)))[0])
            if loader_cache is not None:  # its first chunk, checked, before students sized by its classes are built
                loader_cache.read(0, min(1, len(loader_cache)))
            if teacher is not None:  # it runs on every batch: one that cannot take the data is refused before any step
                check_output_shape(teacher.model, sample.to(device), num_classes=num_classes, name=f"teacher {teacher.path}",
                                   items=loader.items)
            trained: list[_Student] = []
            for name, spec in zip(names, students):
                torch.manual_seed(_student_seed(config.seed, name))
                model = build_model(spec.arch, input_shape=source.input_shape, num_classes=num_classes, kwargs=spec.kwargs)
                check_output_shape(model, sample, num_classes=num_classes, name=f"student '{name}'", items=loader.items)
                _check_one_row_batches(model, name, loader)
                trained.append(_Student(name, spec, model.to(device), config, total_steps, device))
            begun = out is None or saved is not None

            def begin() -> None:
                # A run this one replaces goes at this one's first write: a failure before it (in building
                # the students, their first steps or their first evaluation) leaves the old run whole.
                nonlocal begun
                if not begun:
                    _begin_run(out, options)
                    begun = True
            position = {"epoch": 0, "batches": 0}
            if saved is not None:
                try:
                    for student in trained:
                        student.load(saved["students"][student.name])
                    position = saved["position"]
                    finished = position["epoch"]  # each student's history holds epochs 1, 2, ... (_Student.load)
                    if not (isinstance(finished, int) and all(len(student.history) == finished for student in trained)):
                        raise ValueError(f"its students' epochs do not end at its position, epoch {finished!r}")
                except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # the options matched, the states do not
                    raise SoftlabelsError(f"cannot resume {run}: {CHECKPOINT} is damaged ({type(exc).__name__}: {exc})") from exc
                if out is not None:
                    _write_metrics(out, trained)  # as the checkpoint has them, whatever a killed run wrote after it
            if torch.distributed.is_initialized():
                for student in trained:  # wrapped after loading: DDP broadcasts rank 0's weights when it wraps
                    student.forward = torch.nn.parallel.DistributedDataParallel(student.model)
            loader.load_state_dict(position)
            position = loader.state_dict()  # as the loader checked it: integers inside the run
            ranked = torch.distributed.is_initialized()
            log = TensorBoardLog(tensorboard, names, first_epoch=position["epoch"] + 1) if tensorboard is not None and rank == 0 else None

            def checkpoint(epoch: int, batches: int) -> None:
                if out is not None:
                    begin()
                    write_atomically(out / CHECKPOINT, lambda f: torch.save({
                        "format": _CHECKPOINT_FORMAT, "options": options, "position": {"epoch": epoch, "batches": batches},
                        "students": {s.name: s.state() for s in trained},
                    }, f))

            bar = tqdm(total=config.epochs * steps, initial=position["epoch"] * steps + position["batches"], unit="batch",
                       desc="train", disable=None if progress and rank == 0 else True)
            try:
                for epoch in range(position["epoch"], config.epochs):
                    loader.set_epoch(epoch)  # keeps a resumed epoch's position
                    done = loader.state_dict()["batches"]
                    for batch in _epoch_batches(loader, num_workers):
                        _check_label_range(num_classes, batch.labels, "each student (--num-classes, or the cache's or teacher's classes)")
                        _step(trained, batch, config, device, teacher, loader.masks_unlabeled_items,
                              _global_rows(loader, done, len(batch.labels)) if ranked else None)
                        done += 1
                        bar.update(1)
                        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
                            checkpoint(epoch, done)
                    for student in trained:
                        rows_per_second = _end_epoch(student, epoch, eval_source, eval_teacher_top1, device)
                        if log is not None:  # before the checkpoint: a resumed run purges what follows it
                            log.write(student.name, student.history[-1], rows_per_second=rows_per_second)
                    checkpoint(epoch + 1, 0)
                    if out is not None:
                        _write_metrics(out, trained)
            finally:
                bar.close()
                if log is not None:
                    log.close()
        finally:
            give_back_kernels()
            give_back_rng()

        summary = [_summary_row(student, config, teacher is not None) for student in trained]
        if out is not None:
            begin()
            for student in trained:
                _save_student(out / student.name / "student.pth", student, source.input_shape, num_classes, classes, tokenizer)
                if eval_source is not None:
                    _save_predictions(out / student.name / PREDICTIONS, student, eval_source, eval_teacher_top1, device)
            write_atomically(out / SUMMARY, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
        return summary


def _step(trained: list[_Student], batch: Batch, config: TrainConfig, device: torch.device, teacher: LoadedModel | None,
          mask_unlabeled: bool, global_rows: int | None = None) -> None:
    """One optimizer step of every student on ``batch``, each in its own random state.

    ``global_rows``: under torchrun, the rows of the global batch when ranks hold unequal shares of
    it (see :func:`_global_rows`). Each rank's mean loss is then weighed by its share of the batch's
    rows, so that DDP's mean of the ranks' gradients is the gradient of the mean over the whole batch,
    as in one process; a rank left with no row still joins the step.
    """
    rows = len(batch.labels)
    if global_rows == 0:  # every row was an input the dump could not read (--skip-bad-files)
        return
    if not rows:
        _join_step(trained, batch, device)
        return _add_step(trained, None, False, 0.0)
    world = distributed.world()[1]
    share = rows * world / global_rows if global_rows is not None else 1.0
    x = batch.inputs.to(device, non_blocking=True)
    y = batch.labels.to(device, non_blocking=True)
    mask = y != NO_LABEL if mask_unlabeled else None
    mix = None if batch.mix is None else tuple(t.to(device, non_blocking=True) for t in batch.mix)
    if teacher is not None:
        with torch.no_grad():
            t = teacher.model(x)
    else:
        t = None if config.hard_labels_only else batch.teacher_logits.to(device, non_blocking=True)
    labeled = bool((batch.labels != NO_LABEL).any())
    losses = []
    for student in trained:
        began = time.perf_counter()
        _set_rng_state(student.rng, device)
        student.model.train()
        logits = student.forward(x)
        terms = kd_terms(logits, t, y, temperature=config.temperature, kl=config.kl, mix=mix, mask=mask, tail=config.topk_tail)
        loss = terms.loss(temperature=config.temperature, alpha=config.alpha)
        student.optimizer.zero_grad(set_to_none=True)
        (loss * share if global_rows is not None else loss).backward()
        student.optimizer.step()
        student.schedule.step()
        student.rng = _rng_state(device)
        losses.append((float(loss.detach()), terms))
        elapsed = time.perf_counter() - began  # the step itself; the loss terms are bookkeeping
        student.seconds += elapsed
        student.step_seconds += elapsed
        student.rows += len(batch.labels)
    _add_step(trained, losses, labeled, share / world, batch)


def _check_one_row_batches(model: torch.nn.Module, name: str, loader: SoftTargetLoader) -> None:
    """Refuse, before any step, a student with batch norm that a rank's slice of one row would stop
    at the end of the first epoch (batch norm cannot train on one row)."""
    last = loader.batch_rows(loader.batches_per_epoch - 1) if loader.batches_per_epoch else 0
    ranks = loader.shards if loader.shard is not None else 1  # the processes that split each batch
    if last // ranks != 1 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    where = f", 1 of them on a rank of {ranks}" if ranks > 1 else ""
    raise SoftlabelsError(f"student '{name}' has batch norm, which cannot train on one row: the last batch of every epoch holds "
                          f"{last} ({loader.num_samples} rows in batches of {loader.batch_size}){where}; choose another --batch-size")


def _global_rows(loader: SoftTargetLoader, index: int, rows: int) -> int | None:
    """The rows of global batch ``index`` (this rank holds ``rows`` of them) where ranks hold unequal
    shares of it, else ``None``: with rows a dump skipped (left out of a batch) a count over the
    ranks, one all-reduce per step; otherwise only an incomplete last batch whose rows do not split
    evenly, whose size the loader knows."""
    if loader.skips_rows:
        return distributed.sum_ints(rows)[0]
    whole = loader.batch_rows(index)
    return whole if whole % loader.shards else None


def _join_step(trained: list[_Student], batch: Batch, device: torch.device) -> None:
    """The step of a rank with no row of this batch while other ranks have some: each student adds a
    zero gradient to DDP's all-reduce (which every rank must join), then steps with the mean the
    others' rows give. The forward pass takes one row of zeros in eval mode, so that no batch norm
    statistic sees it."""
    x = torch.zeros((1, *batch.inputs.shape[1:]), dtype=batch.inputs.dtype, device=device)
    for student in trained:
        _set_rng_state(student.rng, device)
        student.model.eval()
        student.optimizer.zero_grad(set_to_none=True)
        (student.forward(x).sum() * 0.0).backward()
        student.optimizer.step()
        student.schedule.step()
        student.rng = _rng_state(device)


def _nonfinite(batch: Batch) -> str | None:
    """What in ``batch`` a loss that is not finite comes from, naming the first dataset row that
    holds it: inputs or mix weights that are NaN or Inf, cached targets that are NaN or +Inf (the
    dump stops at them unless --allow-nonfinite; -inf is how a teacher rules a class out, and trains).
    ``None`` if none: the loss is then the training's own."""
    anything = ("NaN or Inf", lambda v: ~torch.isfinite(v))
    cached = ("NaN or +Inf, which training cannot use: the cache was dumped with --allow-nonfinite, or is damaged",
              lambda v: torch.isnan(v) | torch.isposinf(v))
    targets = batch.teacher_logits.arrays if batch.teacher_logits is not None else {}
    named = {"inputs": (batch.inputs, *anything), "mix weights": (batch.mix.lam if batch.mix is not None else None, *anything),
             **{f"cached '{name}'": (value, *cached) for name, value in targets.items()}}
    for what, (value, which, unusable) in named.items():
        if value is not None and value.is_floating_point() and len(value):
            bad = torch.nonzero(unusable(value.reshape(len(value), -1)).any(1))
            if len(bad):
                return f"the {what} of dataset row {int(batch.indices[int(bad[0, 0])])} hold {which}"
    return None


def _add_step(trained: list[_Student], losses: list[tuple[float, KDTerms]] | None, labeled: bool, weight: float,
              batch: Batch | None = None) -> None:
    """Add a step's loss, hard-label cross-entropy (on a batch with labels) and soft KL at T (with a
    teacher) to each student's sums, each as the loss computed it. Under torchrun they are the whole
    batch's, as one process records them: each rank's means weighed by ``weight``, its share of the
    batch's rows, summed over the ranks in one all-reduce (a rank with no row adds nothing). Every
    rank then holds the same sums, and a diverged student stops every rank."""
    numbers = []
    for i in range(len(trained)):
        loss, terms = losses[i] if losses is not None else (0.0, None)
        ce = float(terms.hard.detach()) if labeled else 0.0
        kl = float(terms.soft.detach()) if terms is not None and terms.soft is not None else None
        numbers += [loss * weight, ce * weight, float(labeled), (kl or 0.0) * weight, float(kl is not None)]
    numbers = distributed.sum_floats(*numbers)
    for i, student in enumerate(trained):
        loss, ce, has_ce, kl, has_kl = numbers[5 * i:5 * i + 5]
        if not math.isfinite(loss):  # every later step and the evaluation would be NaN too
            # (one rank's batch says nothing of the others' under torchrun, where every rank stops here)
            cause = _nonfinite(batch) if batch is not None and distributed.world()[1] == 1 else None
            if cause is not None:
                raise SoftlabelsError(f"student '{student.name}' has a loss of {loss} in epoch {len(student.history) + 1}: {cause}")
            raise SoftlabelsError(f"student '{student.name}' diverged: its loss is {loss} in epoch {len(student.history) + 1}; "
                                  "train it again with a lower --lr (and --overwrite)")
        student.loss_sum += loss
        student.loss_count += 1
        if has_ce:
            student.terms["ce_sum"] += ce
            student.terms["ce_count"] += 1
        if has_kl:
            student.terms["kl_sum"] += kl
            student.terms["kl_count"] += 1


def _epoch_batches(loader: SoftTargetLoader, num_workers: int) -> Iterator[Batch]:
    if not num_workers:
        return iter(loader)
    # Its own generator, so the DataLoader's worker seed is not drawn from the students' random state.
    return iter(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=num_workers, generator=torch.Generator()))


def _end_epoch(student: _Student, epoch: int, eval_source: Source | None, eval_teacher_top1: np.ndarray | None,
               device: torch.device) -> float | None:
    """Evaluate, append the epoch's record to the history and start the next epoch's sums; return
    the rows per second of the student's steps in this epoch."""
    began = time.perf_counter()
    if eval_source is not None:
        result = _evaluate(student.model, eval_source, teacher_top1=eval_teacher_top1, device=str(device), keep_predictions=True)
        student.metrics, student.predictions = result.result(), result.predictions()
    student.seconds += time.perf_counter() - began
    terms = student.terms
    student.history.append({
        "epoch": epoch + 1,
        "train_loss": student.loss_sum / max(1, student.loss_count),
        "train_ce": terms["ce_sum"] / terms["ce_count"] if terms["ce_count"] else None,
        "train_kl": terms["kl_sum"] / terms["kl_count"] if terms["kl_count"] else None,
        "lr": student.schedule.get_last_lr()[0],
        **{name: student.metrics[key] for key, name in _METRIC_FIELDS.items()},
        "seconds": round(student.seconds, 3),
    })
    rows_per_second = student.rows / student.step_seconds if student.step_seconds > 0 else None
    student.loss_sum, student.loss_count = 0.0, 0
    student.terms = {key: type(value)(0) for key, value in terms.items()}
    student.rows, student.step_seconds = 0, 0.0
    return rows_per_second


def _targets_description(config: TrainConfig, online: bool) -> str:
    augmented = ", fresh augmented views" if config.augment is not None else ""
    if config.hard_labels_only:
        return f"hard labels{augmented}"
    where = "online teacher" if online else "cache"
    tail = f", {config.topk_tail} tail" if config.topk_tail != "exact" else ""
    return f"{where} (T={config.temperature:g}, alpha={config.alpha:g}, {config.kl} KL{tail}{augmented})"


def _summary_row(student: _Student, config: TrainConfig, online: bool) -> dict[str, Any]:
    return {
        "student": student.name,
        "arch": student.spec.arch,
        "params": count_parameters(student.model),
        "targets": _targets_description(config, online),
        **{name: student.metrics[key] for key, name in _METRIC_FIELDS.items()},
        "seconds": round(student.seconds, 3),
    }


def _save_student(path: Path, student: _Student, input_shape: tuple[int, ...], num_classes: int, classes: list[str] | None,
                  tokenizer: dict[str, Any] | None) -> None:
    arch = student.spec.arch
    if arch.startswith(HF_PREFIX):  # the configuration it names, from wherever the checkpoint is read
        arch = HF_PREFIX + str(Path(arch[len(HF_PREFIX):]).resolve())
    save_checkpoint(path, student.model, arch=arch, arch_kwargs=student.spec.kwargs,
                    input_shape=input_shape, num_classes=num_classes, classes=classes, tokenizer=tokenizer)


def _save_predictions(path: Path, student: _Student, eval_source: Source, eval_teacher_top1: np.ndarray | None,
                      device: torch.device) -> None:
    """The student's last predictions on the evaluation data, as plain arrays (read back with
    ``np.load(path, allow_pickle=False)``); evaluated again when a run resumed after its last epoch."""
    predictions = student.predictions
    if predictions is None:
        predictions = _evaluate(student.model, eval_source, teacher_top1=eval_teacher_top1, device=str(device),
                                keep_predictions=True).predictions()
    write_atomically(path, lambda f: np.savez(f, **predictions))


def _write_metrics(out: Path, trained: list[_Student]) -> None:
    for student in trained:
        text = "".join(json.dumps(record) + "\n" for record in student.history)
        write_atomically(out / student.name / "metrics.jsonl", lambda f: f.write(text.encode()))


# -- options recorded in a checkpoint, and the checks before a run starts ---------------------------------


def _options(config: TrainConfig, shards: int, names: list[str], students: list[StudentSpec], source: Source, cache: Cache | None,
             eval_source: Source | None, eval_teacher_top1: np.ndarray | None, num_classes: int, device: torch.device) -> dict[str, Any]:
    """What a resumed run must repeat: plain strings, numbers, lists and dicts (loadable with weights_only)."""
    identity = None
    if cache is not None:  # its content, not its name: a cache converted from another keeps its manifest's dates
        manifest = cache.manifest
        identity = {"teacher.sha256": (manifest.get("teacher") or {}).get("sha256"),
                    "dataset.fingerprint": (manifest.get("dataset") or {}).get("fingerprint"),
                    "kind": json.dumps(cache.kind.settings(), sort_keys=True),
                    "layout": json.dumps([cache.layout.dtype, cache.chunk_rows, cache.layout.item_axes]),
                    "chunk checksums": hashlib.sha256(np.ascontiguousarray(cache.check_commit_record(), "<i8").tobytes()).hexdigest()}
    return {
        # shards as trained: a run resumes with the number of ranks it began with (each rank's random
        # state is its own), or in one process with --shards set to it
        "config": {**{f.name: getattr(config, f.name) for f in fields(config) if f.name not in TrainConfig.FREE_ON_RESUME},
                   "shards": shards, "augment": config.augment.settings() if config.augment is not None else None},
        "device": device.type,
        "student": [_describe(name, spec) for name, spec in zip(names, students)],
        "cache": str(cache.path) if cache is not None else None,
        "cache_identity": identity,
        "data": source.spec,
        "num_classes": num_classes,
        "eval_data": eval_source.spec if eval_source is not None else None,
        "eval_teacher": hashlib.sha256(np.ascontiguousarray(eval_teacher_top1, dtype=np.int64).tobytes()).hexdigest()
        if eval_teacher_top1 is not None else None,
    }


def _describe(name: str, spec: StudentSpec) -> str:
    text = f"{name}={spec.arch}"
    return text + (" " + json.dumps(spec.kwargs, sort_keys=True) if spec.kwargs else "")


def _option_difference(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first option that differs, said as the command line says it; ``None`` if all agree."""
    for key, value in now["config"].items():
        if before["config"].get(key) != value:
            old = before["config"].get(key)
            old, value = (repr(old), repr(value)) if str(old) == str(value) else (old, value)  # "2" and 2
            return f"--{key.replace('_', '-')} was {old}, now {value}"
    for key in ("device", "student", "data", "num_classes", "eval_data"):
        if before.get(key) != now[key]:
            old, new = before.get(key), now[key]
            if key == "student":
                old, new = ", ".join(old or []), ", ".join(new)
            return f"--{key.replace('_', '-')} was {old}, now {new}"
    if (before.get("cache") is None) != (now["cache"] is None):
        return f"--cache was {before.get('cache')}, now {now['cache']}"
    for key, value in (now["cache_identity"] or {}).items():
        if (before.get("cache_identity") or {}).get(key) != value:
            return f"--cache {now['cache']} is not the cache the run started from {before['cache']} (its {key} differs)"
    if before.get("eval_teacher") != now["eval_teacher"]:
        return "the teacher's predictions on the evaluation data (--eval-cache, --eval-teacher) differ"
    return None


def _holds_a_run(run: Path) -> bool:
    if (run / SUMMARY).exists() or (run / CHECKPOINT).exists():
        return True
    return run.is_dir() and any((child / "student.pth").exists() or (child / "metrics.jsonl").exists() for child in run.iterdir())


def _remove_run(run: Path) -> None:
    """Remove what a run writes (checkpoint, summary, config, student directories); nothing else in ``run``."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    for child in run.iterdir():
        if child.is_dir() and ((child / "student.pth").exists() or (child / "metrics.jsonl").exists()):
            shutil.rmtree(child)


def _start_run(run: Path | None, options: dict[str, Any], *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (``None``: start afresh), after refusing what must not happen;
    nothing is written or removed yet (see :func:`_begin_run`)."""
    if run is None:
        if resume:
            raise SoftlabelsError("resuming needs the run's output directory")
        return None
    if resume and overwrite:
        raise SoftlabelsError("give --resume or --overwrite, not both")
    path = run / CHECKPOINT
    if resume and path.exists():
        saved = _load_checkpoint(path)
        difference = _option_difference(saved["options"], options)
        if difference:
            raise SoftlabelsError(f"cannot resume {run}: {difference}")
        return saved
    if _holds_a_run(run):
        if resume:
            raise SoftlabelsError(f"cannot resume {run}: it holds a run but no {CHECKPOINT}")
        if not overwrite:
            raise SoftlabelsError(f"{run} already holds a training run: pass --resume to continue it or --overwrite to replace it")
    return None


def _begin_run(run: Path, options: dict[str, Any]) -> None:
    """Start a new run in ``run``: a run there (allowed by :func:`_start_run`) is removed whole, so
    that no later --resume or report mixes it with the new one, and the options are written."""
    if _holds_a_run(run):
        _remove_run(run)
    write_atomically(run / CONFIG, lambda f: f.write((json.dumps(options, indent=2) + "\n").encode()))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    saved = read_torch_file(path)  # a flipped byte in a tensor fails its zip CRC-32 instead of loading
    if (not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT
            or not all(isinstance(saved.get(key), dict) for key in ("options", "students", "position"))
            or not isinstance(saved["options"].get("config"), dict) or not isinstance(saved["options"].get("student"), list)):
        raise SoftlabelsError(f"{path} is not a train-student checkpoint")
    return saved
