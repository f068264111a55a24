"""Dense targets: every logit of the teacher, ``logits [N, *items, C]``.

Example::

    Dense().build(torch.randn(4, 10), rows=torch.arange(4), store_dtype=torch.float16)["logits"].dtype
    # torch.float16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..losses import kl_divergence
from .base import StoredArray, TargetKind


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per item, the entropy (nats) of ``softmax(logits / temperature)`` over the last axis.

    Example::

        entropy(torch.zeros(2, 10))   # tensor([2.3026, 2.3026]): log 10, the uniform distribution
    """
    log_p = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@dataclass(frozen=True)
class Dense(TargetKind):
    name: ClassVar[str] = "dense"
    statistic_name: ClassVar[str] = "entropy"
    statistic_format: ClassVar[str] = "{:.3f} nats mean at T=1"

    def arrays(self, num_classes: int, store_dtype: str) -> list[StoredArray]:
        return [StoredArray("logits", np.dtype(store_dtype), num_classes)]

    def build(self, logits: torch.Tensor, *, rows: torch.Tensor, store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {"logits": logits.to(store_dtype)}

    def finite(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        # The stored logits are every logit cast, and a cast keeps their order: the largest and smallest
        # cast show NaN, Inf and an overflow. Taken from the logits: torch's float16 reductions on the CPU
        # are slower than its float32 ones.
        dtype = targets["logits"].dtype
        return torch.isfinite(logits.amax(-1).to(dtype)) & torch.isfinite(logits.amin(-1).to(dtype))

    def logits_at(self, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, None]:
        return targets["logits"], None

    def kl(self, student_logits: torch.Tensor, targets: dict[str, torch.Tensor], *, temperature: float, kl: str,
           tail: str = "exact", labels: torch.Tensor | None = None) -> torch.Tensor:
        self._exact_tail_only(tail)
        return kl_divergence(student_logits, targets["logits"], temperature=temperature, kl=kl)

    def statistic(self, targets: dict[str, np.ndarray]) -> float:
        """Summed entropy (nats) of the teacher at T = 1."""
        return float(entropy(torch.from_numpy(np.asarray(targets["logits"], dtype=np.float64))).sum())
