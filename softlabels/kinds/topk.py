"""Top-k targets: the K largest logits per item, their classes, and the log-partition grid.

The loss keeps the teacher's mass outside the K classes as one "rest" bucket and matches it with the
student's own mass outside the same classes: a KL over K + 1 buckets, which is the dense KL exactly
when K = C, and matches the tail instead of renormalising it away.

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
from .base import SparseKind, StoredArray, index_dtype, positive_int


@dataclass(frozen=True)
class TopK(SparseKind):
    k: int = 10

    name: ClassVar[str] = "topk"
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

    def build(self, logits: torch.Tensor, *, rows: torch.Tensor, store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        z = logits.float()
        values, indices = z.topk(self.k, dim=-1)
        return {"topk_logits": values.to(store_dtype), "topk_indices": indices, "logsumexp": self.grid(z)}

    def logits_at(self, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return targets["topk_logits"], targets["topk_indices"]

    def top_class(self, targets: dict[str, np.ndarray]) -> np.ndarray:
        return targets["topk_indices"][..., 0].astype(np.int64)  # stored largest first

    def kl(self, student_logits: torch.Tensor, targets: dict[str, torch.Tensor], *, temperature: float, kl: str) -> torch.Tensor:
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        lse = self.log_partition(targets, temperature)
        index = targets["topk_indices"].long()
        with torch.no_grad():
            log_p = targets["topk_logits"].float() / temperature - lse[..., None]
            p = log_p.exp()
            # With K = C nothing is outside; otherwise 1 - sum is exact up to float rounding.
            p_rest = torch.zeros_like(lse) if index.shape[-1] == log_q.shape[-1] else (1.0 - p.sum(-1)).clamp(min=0.0)
        log_q_kept = log_q.gather(-1, index)
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
