"""Per-epoch scalars of every student for TensorBoard (``train-student --tensorboard DIR``).

Each student writes to ``DIR/NAME``, so TensorBoard lists the students as runs and draws the same
tag of every student in one chart. The step is the epoch (1, 2, ...). A resumed run starts its event
files by purging the steps after the epochs its checkpoint holds, so an epoch a killed run logged
but never checkpointed is not shown twice. The ``tensorboard`` package is an optional extra.

Example::

    log = TensorBoardLog("runs/kd/tb", ["mlp", "cnn1d"], first_epoch=1)
    log.write("mlp", {"epoch": 1, "train_loss": 0.9, "eval_accuracy": 0.7, "lr": 0.003}, rows_per_second=5e4)
    log.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SoftlabelsError

EXTRA = "pip install 'softlabels[tensorboard]'"

# metrics.jsonl field -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train",
    "train_ce": "loss/hard_ce",
    "train_kl": "loss/soft_kl",
    "eval_accuracy": "eval/accuracy",
    "teacher_agreement": "eval/teacher_agreement",
    "eval_nats": "eval/nats",
    "ece": "eval/ece",
    "lr": "lr",
}
ROWS_PER_SECOND = "rows_per_second"


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SoftlabelsError(f"--tensorboard needs the tensorboard package: {EXTRA}") from None
    return SummaryWriter


class TensorBoardLog:
    """One event writer per student under ``log_dir``; ``first_epoch`` is the first epoch this
    process logs (steps from it on, left by an earlier process, are purged)."""

    def __init__(self, log_dir: str | Path, names: list[str], *, first_epoch: int) -> None:
        writer = summary_writer_class()
        self.writers = {name: writer(str(Path(log_dir) / name), purge_step=first_epoch) for name in names}

    def write(self, name: str, record: dict[str, Any], *, rows_per_second: float | None) -> None:
        """The fields of one metrics.jsonl ``record`` that have a value, at step ``record["epoch"]``."""
        writer, step = self.writers[name], record["epoch"]
        for field, tag in TAGS.items():
            if record.get(field) is not None:
                writer.add_scalar(tag, record[field], step)
        if rows_per_second is not None:
            writer.add_scalar(ROWS_PER_SECOND, rows_per_second, step)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
