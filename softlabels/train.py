"""Train one or many students from one cache, and evaluate models.

All students share one pass over the data per epoch: each batch is read once and fed to every
student. Each student keeps its own initial seed (derived from the run's seed and its name) and its
own random-number state, so a student trained beside others gets the same weights as one trained
alone, and two runs with the same options give bit-identical weights on the CPU.

Example:
    >>> config = TrainConfig(epochs=10, temperature=4.0, alpha=0.5)
    >>> students = [StudentSpec("mlp"), StudentSpec("cnn1d", {"channels": 16})]
    >>> summary = train_students(students, source=source, cache=cache, config=config, out_dir="runs/kd")
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import save_checkpoint
from .data import NO_LABEL, Source
from .dump import iter_logits, resolve_device
from .errors import SoftlabelsError
from .loader import SoftTargetLoader
from .losses import KL_DIRECTIONS, kd_loss
from .models import build_model, check_output_shape, count_parameters
from .store import Cache

_EVAL_BATCH = 1024


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

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise SoftlabelsError("epochs and batch size must be positive")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SoftlabelsError("learning rate must be > 0 and weight decay >= 0")
        if self.temperature <= 0:
            raise SoftlabelsError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise SoftlabelsError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.kl not in KL_DIRECTIONS:
            raise SoftlabelsError(f"kl must be forward or reverse, got {self.kl}")
        if self.shards is not None and (self.shards < 1 or self.batch_size % self.shards):
            raise SoftlabelsError(f"batch size {self.batch_size} does not split into {self.shards} shards")


def predict(model: torch.nn.Module, source: Source, *, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Logits of ``model`` on every row of ``source`` (float32, on the host) and the source's labels."""
    was_training = model.training
    outputs, labels = [], []
    for _, out, y in iter_logits(model, source, batch_size=_EVAL_BATCH, device=device):
        outputs.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(outputs), np.concatenate(labels)


def agreement_metrics(logits: np.ndarray, labels: np.ndarray, teacher_top1: np.ndarray | None) -> dict[str, float | None]:
    """Accuracy on labeled rows and top-1 agreement with the teacher, each ``None`` when undefined."""
    predicted = logits.argmax(1)
    labeled = labels != NO_LABEL
    accuracy = float((predicted[labeled] == labels[labeled]).mean()) if labeled.any() else None
    agreement = float((predicted == teacher_top1).mean()) if teacher_top1 is not None else None
    return {"accuracy": accuracy, "teacher_agreement": agreement}


def evaluate(
    model: torch.nn.Module, source: Source, *, teacher_top1: np.ndarray | None = None, device: str = "cpu"
) -> dict[str, float | None]:
    """Accuracy of ``model`` on ``source`` and, given the teacher's top class per row, agreement with it.

    Example:
        >>> evaluate(load_model("student.pth").model, open_data("mnist1d://test"))
        {'accuracy': 0.8, 'teacher_agreement': None}
    """
    if teacher_top1 is not None and len(teacher_top1) != len(source):
        raise SoftlabelsError(f"teacher predictions cover {len(teacher_top1)} rows, the data has {len(source)}")
    logits, labels = predict(model, source, device=resolve_device(device))
    return agreement_metrics(logits, labels, teacher_top1)


def _student_names(students: list[StudentSpec]) -> list[str]:
    names, seen = [], {}
    for spec in students:
        base = spec.name or spec.arch.rpartition(":")[2]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _student_seed(seed: int, name: str) -> int:
    # Tied to the name, not the position, so adding a student does not change the others.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


class _Student:
    def __init__(self, name: str, spec: StudentSpec, model: torch.nn.Module, config: TrainConfig, total_steps: int):
        self.name, self.spec, self.model = name, spec, model
        self.forward = torch.nn.parallel.DistributedDataParallel(model) if torch.distributed.is_initialized() else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
        self.rng_state = torch.get_rng_state()
        self.seconds = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.metrics: dict[str, float | None] = {"accuracy": None, "teacher_agreement": None}


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
) -> list[dict[str, Any]]:
    """Train every student in ``students`` from ``cache`` (or on hard labels alone); return the summary.

    With ``out_dir``, each student gets ``out_dir/NAME/student.pth`` and ``metrics.jsonl`` (one JSON
    object per epoch), and the summary is written to ``out_dir/summary.json``.
    """
    config.validate()
    if not students:
        raise SoftlabelsError("no student to train: give at least one --student")
    if cache is None and not config.hard_labels_only:
        raise SoftlabelsError("without a cache only --hard-labels-only training is possible")
    if num_classes is None:
        if cache is None:
            raise SoftlabelsError("the number of classes is unknown without a cache")
        num_classes = cache.num_classes
    if config.hard_labels_only and not (source.has_labels or (cache is not None and (cache.labels() != NO_LABEL).any())):
        raise SoftlabelsError(f"--hard-labels-only needs labels, and dataset {source.spec} has none")
    if eval_source is not None and eval_source.input_shape != source.input_shape:
        raise SoftlabelsError(
            f"--eval-data inputs have shape {list(eval_source.input_shape)}, the training data {list(source.input_shape)}"
        )
    device = resolve_device(config.device)
    # Hard-label training reads the cache only for labels the dataset lacks, never the logits otherwise.
    loader_cache = None if config.hard_labels_only and source.has_labels else cache
    # Under torchrun each rank reads its own shard of every epoch and DistributedDataParallel averages
    # the gradients, which equals one process taking the mean over the whole (sharded) batch.
    rank, ranks = distributed.world()
    shards = config.shards or ranks
    if ranks > 1 and shards != ranks:
        raise SoftlabelsError(f"--shards {shards} differs from the {ranks} ranks torchrun started")
    loader = SoftTargetLoader(
        source, loader_cache, batch_size=config.batch_size, seed=config.seed, shards=shards, shard=rank if ranks > 1 else None
    )
    total_steps = max(1, config.epochs * len(loader))
    sample = torch.from_numpy(source.read(0, min(2, len(source)))[0])
    out = Path(out_dir) if out_dir is not None else None

    trained: list[_Student] = []
    for name, spec in zip(_student_names(students), students):
        torch.manual_seed(_student_seed(config.seed, name))
        model = build_model(spec.arch, input_shape=source.input_shape, num_classes=num_classes, kwargs=spec.kwargs)
        check_output_shape(model, sample, num_classes=num_classes, name=f"student '{name}'")
        trained.append(_Student(name, spec, model.to(device), config, total_steps))
    if rank != 0:
        out, eval_source = None, None  # rank 0 evaluates and writes
    if out is not None:
        for student in trained:
            (out / student.name).mkdir(parents=True, exist_ok=True)
            (out / student.name / "metrics.jsonl").write_text("")

    run_rng = torch.get_rng_state()
    bar = tqdm(total=config.epochs * len(loader), unit="batch", desc="train", disable=None if progress and rank == 0 else True)
    try:
        for epoch in range(config.epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                x = batch.inputs.to(device, non_blocking=True)
                y = batch.labels.to(device, non_blocking=True)
                t = None if config.hard_labels_only else _to_device(batch.teacher_logits, device)
                for student in trained:
                    began = time.perf_counter()
                    torch.set_rng_state(student.rng_state)
                    student.model.train()
                    loss = kd_loss(student.forward(x), t, y, temperature=config.temperature, alpha=config.alpha, kl=config.kl)
                    student.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    student.optimizer.step()
                    student.schedule.step()
                    student.rng_state = torch.get_rng_state()
                    student.loss_sum += float(loss.detach())
                    student.loss_count += 1
                    student.seconds += time.perf_counter() - began
                bar.update(1)
            for student in trained:
                _end_epoch(student, epoch, eval_source, eval_teacher_top1, device, out)
    finally:
        bar.close()
        torch.set_rng_state(run_rng)

    summary = []
    for student in trained:
        if out is not None:
            save_checkpoint(
                out / student.name / "student.pth",
                student.model,
                arch=student.spec.arch,
                arch_kwargs=student.spec.kwargs,
                input_shape=source.input_shape,
                num_classes=num_classes,
            )
        summary.append(
            {
                "student": student.name,
                "arch": student.spec.arch,
                "params": count_parameters(student.model),
                "targets": "hard labels" if config.hard_labels_only else f"cache (T={config.temperature:g}, alpha={config.alpha:g}, {config.kl} KL)",
                "eval_accuracy": student.metrics["accuracy"],
                "teacher_agreement": student.metrics["teacher_agreement"],
                "seconds": round(student.seconds, 3),
            }
        )
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "config.json").write_text(json.dumps({**asdict(config), "cache": str(cache.path) if cache else None, "data": source.spec}, indent=2) + "\n")
    return summary


def _to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, dict):
        return {name: value.to(device, non_blocking=True) for name, value in targets.items()}
    return targets.to(device, non_blocking=True)


def _end_epoch(
    student: _Student,
    epoch: int,
    eval_source: Source | None,
    eval_teacher_top1: np.ndarray | None,
    device: torch.device,
    out: Path | None,
) -> None:
    began = time.perf_counter()
    if eval_source is not None:
        student.metrics = evaluate(student.model, eval_source, teacher_top1=eval_teacher_top1, device=str(device))
    student.seconds += time.perf_counter() - began
    record = {
        "epoch": epoch + 1,
        "train_loss": student.loss_sum / max(1, student.loss_count),
        "lr": student.schedule.get_last_lr()[0],
        "eval_accuracy": student.metrics["accuracy"],
        "teacher_agreement": student.metrics["teacher_agreement"],
        "seconds": round(student.seconds, 3),
    }
    student.loss_sum, student.loss_count = 0.0, 0
    if out is not None:
        with open(out / student.name / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
