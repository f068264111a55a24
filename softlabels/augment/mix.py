"""MixUp: a convex mix of the sample's view and its partner's, any shape (Zhang et al., ICLR 2018).

Example::

    mixup = MixUp(alpha=0.4)
    drawn = mixup.draw(view_generator(0, 3, 0), (40,), num_samples=100)   # {'partner': ..., 'lam': ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SoftlabelsError
from .base import Declared, Mixer, Params, compute_dtype, per_sample


@dataclass(frozen=True)
class MixUp(Mixer):
    """After ``partner`` (see :class:`Mixer`): ``lam`` float32 ``= float32(rng.beta(alpha, alpha))``;
    ``out = lam * x + (1 - lam) * partner``, in float32 (or ``x``'s wider float type).

    Example::

        MixUp().settings()   # {'name': 'mixup', 'alpha': 1.0}
    """

    alpha: float = 1.0

    name: ClassVar[str] = "mixup"

    def validate(self, *, where: str) -> None:
        if not self.alpha > 0:
            raise SoftlabelsError(f"{where}: mixup alpha must be a number > 0, got {self.alpha:g}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {**super().params(shape), "lam": (np.dtype(np.float32), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {**super().draw(rng, shape, num_samples), "lam": np.float32(rng.beta(self.alpha, self.alpha))}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        lam = params["lam"]
        return {**super().drawable(params, shape, num_samples), "lam": ((lam >= 0) & (lam <= 1), "weights from 0 to 1")}

    def apply(self, x: torch.Tensor, params: Params, partner: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        lam = per_sample(params["lam"], x, torch.float32).to(dtype)
        return (lam * x.to(dtype) + (1 - lam) * partner.to(dtype)).to(x.dtype)
