"""Top-k targets: the K largest logits per item, their classes, and the log-partition grid.

The loss keeps the teacher's mass outside the K classes as one "rest" bucket and matches it with the
student's own mass outside the same classes: a KL over K + 1 buckets, which is the dense KL exactly
when K = C, and matches the tail instead of renormalising it away. Two other treatments of the tail
exist for comparison (:data:`TAILS`): ``renormalize`` rescales the K probabilities to sum to 1 and
drops the tail, as DistillKit, MaxText and ModelOpt do (biased: it overstates the K classes), and
``gold`` gives the tail's mass to the item's gold class (its label), a bucket of its own when the
label is outside the K.

Example::

    kind = TopK(k=5)
    targets = kind.build(torch.randn(8, 100), rows=torch.arange(8))
    kind.kl(torch.randn(8, 100), targets, temperature=4.0, kl="forward").shape   # torch.Size([8])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SoftlabelsError
from .base import Option, SparseKind, StoredArray, class_beyond, index_dtype, positive_int

TAILS = ("exact", "renormalize", "gold")


@dataclass(frozen=True)
class TopK(SparseKind):
    k: int = 10

    name: ClassVar[str] = "topk"
    options: ClassVar[tuple[Option, ...]] = (
        Option("--top-k", "k", "count", "Store the K largest logits per sample (kind topk).", metavar="K"),
        *SparseKind.options,
    )
    statistic_name: ClassVar[str] = "top-k mass"
    statistic_format: ClassVar[str] = "{:.2%} of the teacher's probability at T=1, on average"

    def validate(self, *, num_classes: int, where: str) -> None:
        super().validate(num_classes=num_classes, where=where)
        if not positive_int(self.k):
            raise SoftlabelsError(f"{where}: top-k needs a positive k, got {self.k!r}")
        if self.k > num_classes:
            raise SoftlabelsError(f"{where}: top-k {self.k} exceeds the teacher's {num_classes} classes")

    def arrays(self, num_classes: int, store_dtype: str) -> list[StoredArray]:
        return [
            StoredArray("topk_logits", np.dtype(store_dtype), self.k),
            StoredArray("topk_indices", index_dtype(num_classes), self.k),
            StoredArray("logsumexp", np.dtype(np.float32), len(self.temperatures)),
        ]

    def impossible(self, targets: dict[str, np.ndarray], num_classes: int) -> tuple[str, int, str] | None:
        return class_beyond(targets, "topk_indices", num_classes)

    def build(self, logits: torch.Tensor, *, rows: torch.Tensor, store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        z = logits.float()
        values, indices = z.topk(self.k, dim=-1)
        stored = values.to(store_dtype)
        return {"topk_logits": stored, "topk_indices": indices, "logsumexp": self._log_partitions(z, values, stored)}

    def _log_partitions(self, z: torch.Tensor, values: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """The grid's log-partitions, made so that the K logits as stored carry the teacher's exact
        mass of the K classes, and ``1 - sum_k p_k`` is its exact tail. Rounded to float16, a logit
        of 30 moves by up to 0.016 and its probability by up to 1.6%: against the log-partition of
        the unrounded logits the tail would come out that much too small, or below zero."""
        grid = self.grid(z, values[..., 0])  # the K largest come largest first
        if stored.dtype == values.dtype:
            return grid
        t = torch.tensor(self.temperatures, dtype=z.dtype, device=z.device)[:, None]
        exact = (values[..., None, :] / t - grid[..., None]).exp().sum(-1)  # [..., G]: at least K / C
        rounded = (stored.float()[..., None, :] / t - grid[..., None]).exp().sum(-1)
        return grid + torch.log(rounded / exact)

    def log_partition_at_one(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        stored = super().log_partition_at_one(logits, targets)
        if stored is None or targets["topk_logits"].dtype == torch.float32:
            return stored
        # the teacher's own, from the column :meth:`_log_partitions` shifted: with a = sum_k exp(zs_k - lse)
        # and b = sum_k exp(z_k - lse) for the stored column lse, logsumexp(z) = lse + log(b / a)
        kept = logits.float().gather(-1, targets["topk_indices"].long())
        return (stored + torch.log((kept - stored[..., None]).exp().sum(-1))
                - torch.log((targets["topk_logits"].float() - stored[..., None]).exp().sum(-1)))

    def predicted(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return targets["topk_indices"][..., 0]  # largest first: no second pass over the logits

    def logits_at(self, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return targets["topk_logits"], targets["topk_indices"]

    def top_class(self, targets: dict[str, np.ndarray]) -> np.ndarray:
        return targets["topk_indices"][..., 0].astype(np.int64)  # stored largest first

    def kl(self, student_logits: torch.Tensor, targets: dict[str, torch.Tensor], *, temperature: float, kl: str,
           tail: str = "exact", labels: torch.Tensor | None = None) -> torch.Tensor:
        if tail not in TAILS:
            raise SoftlabelsError(f"--topk-tail must be one of {', '.join(TAILS)}, got {tail!r}")
        if tail != "exact" and kl != "forward":
            raise SoftlabelsError(f"--topk-tail {tail} is a forward-KL comparison; use --kl forward")
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        lse = self.log_partition(targets, temperature)
        index = targets["topk_indices"].long()
        with torch.no_grad():
            log_p = targets["topk_logits"].float() / temperature - lse[..., None]
            p = log_p.exp()
            # With K = C nothing is outside; otherwise 1 - sum is exact up to float rounding.
            p_rest = torch.zeros_like(lse) if index.shape[-1] == log_q.shape[-1] else (1.0 - p.sum(-1)).clamp(min=0.0)
        log_q_kept = log_q.gather(-1, index)
        if tail == "renormalize":
            p_hat = p / p.sum(-1, keepdim=True)
            return (torch.special.xlogy(p_hat, p_hat) - p_hat * log_q_kept).sum(-1)
        if tail == "gold":
            return _gold_tail(p, p_rest, index, log_q, log_q_kept, labels)
        # The student's mass outside the kept classes. The floor (about 1e-13) keeps it finite when
        # nothing is outside, and keeps float noise in p_rest from being multiplied by a huge log.
        log_q_rest = torch.logsumexp(log_q.scatter(-1, index, float("-inf")), dim=-1).clamp(min=-30.0)
        if kl == "forward":
            kept = (torch.special.xlogy(p, p) - p * log_q_kept).sum(-1)
            return kept + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
        q_kept, q_rest = log_q_kept.exp(), log_q_rest.exp()
        log_p_rest = p_rest.clamp(min=1e-12).log()
        return (q_kept * (log_q_kept - log_p)).sum(-1) + q_rest * (log_q_rest - log_p_rest)

    def statistic(self, targets: dict[str, np.ndarray]) -> float:
        """Summed teacher mass at T = 1 that the K classes keep (NaN without 1 in the grid)."""
        if 1.0 not in self.temperatures:
            return float("nan")
        lse = targets["logsumexp"][..., self.temperatures.index(1.0)].astype(np.float64)
        return float(np.exp(targets["topk_logits"].astype(np.float64) - lse[..., None]).sum())


def _gold_tail(p: torch.Tensor, p_rest: torch.Tensor, index: torch.Tensor, log_q: torch.Tensor, log_q_kept: torch.Tensor,
               labels: torch.Tensor | None) -> torch.Tensor:
    """Forward KL over the K classes plus the gold class, the tail's mass given to the gold class
    (added to it when it is among the K); an item without a label (``-1``) keeps the K alone."""
    if labels is None:
        raise SoftlabelsError("--topk-tail gold needs the items' labels")
    labels = labels.to(index.device).long()
    with torch.no_grad():
        has_gold = labels >= 0
        in_kept = (index == labels[..., None]) & has_gold[..., None]
        p = p + in_kept * p_rest[..., None]
        p_gold = torch.where(has_gold & ~in_kept.any(-1), p_rest, torch.zeros_like(p_rest))
    kept = (torch.special.xlogy(p, p) - p * log_q_kept).sum(-1)
    log_q_gold = log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return kept + torch.special.xlogy(p_gold, p_gold) - p_gold * log_q_gold
