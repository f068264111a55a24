"""What every target kind is: the arrays it stores per item, how it builds them from teacher logits,
and what a reader does with them (top class, loss, statistics, checksum bytes).

A cache row holds one or more items (one per sample, one per recorded view, one per token); every
array is ``[N, *item_axes, width]`` on disk and ``[..., width]`` in memory, and every method works on
the last axis, so a new leading axis costs nothing.

Example::

    kind = TopK(k=5)
    targets = kind.build(torch.randn(8, 3, 100), rows=torch.arange(8))   # 8 samples x 3 views
    {name: tuple(t.shape) for name, t in targets.items()}
    # {'topk_logits': (8, 3, 5), 'topk_indices': (8, 3, 5), 'logsumexp': (8, 3, 4)}
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SoftlabelsError

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
# On the CPU, the passes a kind makes over a batch's logits go a block of items of this many bytes at a
# time, so that the block stays in the core's cache from one pass to the next (item_blocks).
_CPU_BLOCK_BYTES = 2 << 20
STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class StoredArray:
    """One array of a kind: its name, dtype and the size of its last (target) axis."""

    name: str
    dtype: np.dtype
    width: int


@dataclass(frozen=True)
class Option:
    """A command-line option of ``dump`` and ``convert`` that gives the kind's setting ``setting``. A
    kind's first option selects the kind (``--top-k 10``); the others refine it and take the setting's
    default when not given. ``value`` is what the option takes: ``count`` (a positive integer),
    ``temperature`` (a positive number), ``seed`` (an integer in [0, 2**63)), ``switch`` (on when
    given) or ``temperatures`` (a comma-separated list of positive numbers)."""

    flag: str
    setting: str
    value: str
    help: str
    metavar: str | None = None


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest value on ``dim=-1``: the first of equal maxima, a NaN counted as the
    largest (as ``torch.max`` and ``np.argmax`` both count them).

    Example::

        argmax(torch.tensor([[1.0, 3.0, 3.0], [0.0, float("nan"), 2.0]]))   # tensor([1, 1])
    """
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        # numpy's argmax is vectorised (SIMD); torch's max and argmax on the CPU are several times slower
        return torch.from_numpy(np.argmax(logits.detach().numpy(), axis=-1))
    return logits.max(-1).indices


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def is_number(value: Any) -> bool:
    """A finite int or float that a float can hold (JSON's ``true`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max  # 10**400 is no float


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class TargetKind:
    """Base of the target kinds. A subclass is a frozen dataclass whose fields are its settings
    (recorded in the manifest next to ``kind``) and which registers itself in :data:`KINDS`."""

    name: ClassVar[str]
    # How dump and convert ask for the kind; none for dense, the kind they store when asked for none.
    options: ClassVar[tuple[Option, ...]] = ()

    # -- settings and manifest ---------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The manifest fields of this kind, ``kind`` included."""
        return {"kind": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, num_classes: int, where: str, require_all: bool = False) -> "TargetKind":
        """Build the kind from manifest (``require_all``: every setting must be there) or user
        settings (missing ones take the defaults), each checked; ``where`` names the source."""
        values = {}
        for f in fields(cls):
            if f.name in settings:
                values[f.name] = settings[f.name]
            elif require_all:
                raise SoftlabelsError(f"{where}: field '{f.name}' of kind {cls.name} is missing")
        try:
            kind = cls(**values)
        except TypeError as exc:
            raise SoftlabelsError(f"{where}: settings of kind {cls.name} are incomplete ({exc})") from None
        kind.validate(num_classes=num_classes, where=where)
        return kind

    def validate(self, *, num_classes: int, where: str) -> None:
        """Refuse impossible settings for a teacher with ``num_classes`` classes."""

    # -- storage -----------------------------------------------------------------------------------

    def arrays(self, num_classes: int, store_dtype: str) -> list[StoredArray]:
        """The kind's arrays in checksum order."""
        raise NotImplementedError

    # -- writing -----------------------------------------------------------------------------------

    def build(self, logits: torch.Tensor, *, rows: torch.Tensor, store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The stored arrays for teacher logits ``[..., C]``, computed where the logits are.

        ``rows`` holds the dataset row of each leading index (shape ``logits.shape[:1]``); a kind
        that draws at random keys its draws by row and item, never by batch.
        """
        raise NotImplementedError

    def predicted(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's top class per item, from its logits and the arrays just built from them."""
        return argmax(logits)

    def log_partition_at_one(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``logsumexp(z)`` per item when the arrays just built from the logits ``z`` hold it (so that
        a caller needs no second pass over the logits for it), else ``None``."""
        return None

    def finite(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per item, whether the teacher's logits and every stored float are finite (NaN, Inf and
        float16 overflow are not). The logits count even where nothing of them is stored as floats
        (a compact sampled cache), because draws from NaN logits are no draws at all."""
        # amax and amin propagate NaN, and +Inf or -Inf shows in one of them: 10x cheaper than isfinite().all()
        checks = [torch.isfinite(t.amax(-1)) & torch.isfinite(t.amin(-1))
                  for t in (logits, *targets.values()) if t.is_floating_point()]
        return torch.stack(checks).all(0)

    # -- reading -----------------------------------------------------------------------------------

    @property
    def top_class_estimate(self) -> str | None:
        """``None`` where :meth:`top_class` is the teacher's own top class; otherwise what it gives
        instead, e.g. "most drawn class" (a sampled cache keeps only the classes it drew)."""
        return None

    def top_class(self, targets: dict[str, np.ndarray]) -> np.ndarray:
        """The teacher's top class per item (for a sampled cache, its best stored class)."""
        values, classes = self.logits_at(targets)
        best = np.argmax(values, axis=-1)
        if classes is None:
            return best.astype(np.int64)
        return np.take_along_axis(classes, best[..., None], axis=-1)[..., 0].astype(np.int64)

    def logits_at(self, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored teacher logits and their classes (``None``: every class, in order)."""
        raise NotImplementedError

    def impossible(self, targets: dict[str, np.ndarray], num_classes: int) -> tuple[str, int, str] | None:
        """The first stored value no writer of this kind stores, as ``(array, row, what it holds)``,
        or ``None``. Checksums pass bytes rewritten with such values, which would index outside the
        classes (a device-side assert on a GPU) or weigh the targets silently wrong."""
        return None

    def full_logits(self, targets: dict[str, np.ndarray]) -> np.ndarray | None:
        """Every logit of the teacher, where the kind keeps them all (what another kind is built from)."""
        values, classes = self.logits_at(targets)
        return values if classes is None else None

    def kl(self, student_logits: torch.Tensor, targets: dict[str, torch.Tensor], *, temperature: float, kl: str,
           tail: str = "exact", labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-item ``KL(p || q)`` (forward) or ``KL(q || p)`` (reverse) at ``temperature``, unscaled.

        ``tail`` says what becomes of the teacher's mass a sparse kind did not keep (see
        :data:`softlabels.kinds.topk.TAILS`; ``labels`` are the items' gold classes, for ``gold``);
        a kind that keeps everything, or estimates it without bias, has only ``exact``.
        """
        raise NotImplementedError

    def _exact_tail_only(self, tail: str) -> None:
        if tail != "exact":
            raise SoftlabelsError(f"--topk-tail {tail} applies to top-k caches; a {self.name} cache has no tail to treat")

    def statistic(self, targets: dict[str, np.ndarray]) -> float:
        """The sum over items of the kind's summary statistic (see :attr:`statistic_name`)."""
        raise NotImplementedError

    statistic_name: ClassVar[str] = ""
    statistic_format: ClassVar[str] = ""


def class_beyond(targets: dict[str, np.ndarray], name: str, num_classes: int) -> tuple[str, int, str] | None:
    """:meth:`TargetKind.impossible` for an array of class indices: one at or past ``num_classes``."""
    indices = targets[name]
    if not indices.size or int(indices.max()) < num_classes:  # one pass; the row is looked for only then
        return None
    per_row = indices.reshape(len(indices), -1)
    row = int(np.flatnonzero((per_row >= num_classes).any(1))[0])
    return name, row, f"class index {int(per_row[row].max())}, beyond the {num_classes} classes"


@dataclass(frozen=True)
class SparseKind(TargetKind):
    """A kind that keeps some classes per item plus ``logsumexp(z / T)`` of the full logits at each
    temperature of a grid, so the teacher's probability of every kept class is exact at those
    temperatures: ``p_c = exp(z_c / T - lse_T)``."""

    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES

    options: ClassVar[tuple[Option, ...]] = (
        Option("--temperatures", "temperatures", "temperatures",
               "Temperatures whose log-partition a sparse cache keeps; training must use one of them."),
    )

    def __post_init__(self) -> None:
        if isinstance(self.temperatures, list):
            object.__setattr__(self, "temperatures", tuple(self.temperatures))

    def validate(self, *, num_classes: int, where: str) -> None:
        if (not isinstance(self.temperatures, tuple) or not self.temperatures
                or not all(is_number(t) and t > 0 for t in self.temperatures)):
            raise SoftlabelsError(f"{where}: temperatures must be a non-empty list of positive numbers, got {self.temperatures!r}")
        if len(set(self.temperatures)) != len(self.temperatures):  # a log-partition is found by its temperature
            raise SoftlabelsError(f"{where}: temperatures must differ from each other, got {list(self.temperatures)!r}")

    def log_partition_at_one(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "logsumexp" not in targets or not any(abs(t - 1) < 1e-6 for t in self.temperatures):
            return None  # a compact sampled cache stores no log-partition; a grid may leave out T = 1
        return self.log_partition(targets, 1.0)

    def log_partition(self, targets: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """``logsumexp(z / T)`` per item for a temperature of the grid."""
        for i, t in enumerate(self.temperatures):
            if abs(t - temperature) < 1e-6:
                return targets["logsumexp"][..., i].float()
        raise SoftlabelsError(
            f"temperature {temperature:g} is not in the cache's grid {list(self.temperatures)}; "
            "train at one of those or dump with it in --temperatures"
        )

    def grid(self, z: torch.Tensor, largest: torch.Tensor | None = None) -> torch.Tensor:
        """``logsumexp(z / T)`` at every temperature of the grid, ``[..., G]`` (see :func:`log_partitions`)."""
        return log_partitions(z, self.temperatures, largest)


def log_partitions(z: torch.Tensor, temperatures: tuple[float, ...], largest: torch.Tensor | None = None) -> torch.Tensor:
    """``logsumexp(z / T)`` for each temperature, ``[..., len(temperatures)]``, as ``torch.logsumexp``
    computes it: ``m / T + log(sum(exp((z - m) / T)))`` with ``m`` the largest logit (``largest``,
    ``[...]``, where the caller has it already; an infinite one counts as 0).

    The logits are shifted by ``m`` once for every temperature, a block of items at a time
    (:func:`item_blocks`): a third of the time of one ``torch.logsumexp`` per temperature for 16,384
    tokens over 2,048 classes on the CPU. An item's values do not depend on its batch.

    Example::

        log_partitions(torch.zeros(2, 4), (1.0, 2.0))   # log(4) twice per item: [[1.3863, 1.3863], ...]
    """
    rows = z.reshape(-1, z.shape[-1])
    m = (rows.amax(-1) if largest is None else largest.reshape(-1)).to(z.dtype)
    m = m.masked_fill(m.isinf(), 0.0)[:, None]
    out = z.new_empty(len(rows), len(temperatures))
    blocks = item_blocks(rows)
    shifted = rows.new_empty(blocks[0].stop, rows.shape[-1])  # the first block is the largest
    scaled = torch.empty_like(shifted)
    for block in blocks:
        n = block.stop - block.start
        torch.sub(rows[block], m[block], out=shifted[:n])
        for i, t in enumerate(temperatures):
            if t == 1:  # dividing by 1 changes no bit: a pass over the block fewer
                torch.exp(shifted[:n], out=scaled[:n])
            else:
                torch.div(shifted[:n], t, out=scaled[:n]).exp_()
            out[block, i] = scaled[:n].sum(-1).log_()
    return (out + m / torch.tensor(temperatures, dtype=z.dtype, device=z.device)).reshape(*z.shape[:-1], len(temperatures))


def item_blocks(rows: torch.Tensor) -> list[slice]:
    """Slices of ``rows`` (items ``[N, C]``) to make several passes over one block at a time: on the
    CPU blocks of about 2 MiB, which stay in the core's cache between passes (one block per pass
    over a batch of 134 MB of logits would read it from memory each time); elsewhere one block.

    Example::

        [(b.start, b.stop) for b in item_blocks(torch.zeros(1000, 1024))]   # [(0, 512), (512, 1000)]
    """
    n = len(rows)
    if rows.device.type != "cpu" or n == 0:
        return [slice(0, n)]
    step = max(1, _CPU_BLOCK_BYTES // (rows.shape[-1] * rows.element_size()))
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


class SoftTargets:
    """A batch of cached targets of one kind, as tensors: what :func:`softlabels.kd_loss` takes.

    Example::

        targets = SoftTargets(cache.kind, {"logits": torch.randn(8, 10)})
        loss = kd_loss(student_logits, targets, labels, temperature=4.0)
    """

    def __init__(self, kind: TargetKind, arrays: dict[str, torch.Tensor]):
        self.kind, self.arrays = kind, arrays

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SoftTargets":
        return SoftTargets(self.kind, {k: v.to(device, non_blocking=non_blocking) for k, v in self.arrays.items()})

    def kl(self, student_logits: torch.Tensor, *, temperature: float, kl: str, tail: str = "exact",
           labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.kind.kl(student_logits, self.arrays, temperature=temperature, kl=kl, tail=tail, labels=labels)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in self.arrays.items())
        return f"SoftTargets({self.kind.name}: {shapes})"
