"""Augmentations of 1-D signals, ``[L]`` or ``[C, L]`` per sample (scale and noise take any shape).

Example::

    shift = Shift(max=6)
    params = shift.draw(view_generator(0, 3, 0), (40,), num_samples=100)   # {'offset': np.int32(...)}
    shift.apply(x[None], {k: np.asarray([v]) for k, v in params.items()}).shape   # torch.Size([1, 40])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SoftlabelsError
from .base import Augmentation, Declared, Params, compute_dtype, per_sample


@dataclass(frozen=True)
class Shift(Augmentation):
    """Shift along the time axis with edge padding.

    ``offset`` int32 ``= rng.integers(-max, max, endpoint=True)``;
    ``out[..., t] = x[..., clip(t - offset, 0, L - 1)]``.

    Example::

        Shift(max=6).settings()   # {'name': 'shift', 'max': 6}
    """

    max: int

    name: ClassVar[str] = "shift"

    def validate(self, *, where: str) -> None:
        if self.max < 0:
            raise SoftlabelsError(f"{where}: shift max must be an integer >= 0, got {self.max}")

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        if len(shape) not in (1, 2):
            raise SoftlabelsError(f"{where}: shift works on signals [L] or [C, L], not inputs of shape {list(shape)}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"offset": (np.dtype(np.int32), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"offset": np.int32(rng.integers(-self.max, self.max, endpoint=True))}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        length = x.shape[-1]
        offset = per_sample(params["offset"], x, torch.int64)
        index = (torch.arange(length, device=x.device) - offset).clamp(0, length - 1)
        return x.gather(-1, index.expand_as(x))


@dataclass(frozen=True)
class Scale(Augmentation):
    """Multiply by a random gain.

    ``factor`` float32 ``= float32(1 + rng.uniform(-max, max))``; ``out = x * factor``.

    Example::

        Scale(max=0.25).settings()   # {'name': 'scale', 'max': 0.25}
    """

    max: float = 0.1

    name: ClassVar[str] = "scale"

    def validate(self, *, where: str) -> None:
        if not 0 <= self.max < 1:  # the factor stays positive
            raise SoftlabelsError(f"{where}: scale max must be a number in [0, 1), got {self.max:g}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"factor": (np.dtype(np.float32), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"factor": np.float32(1 + rng.uniform(-self.max, self.max))}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dtype = compute_dtype(x)
        return (x.to(dtype) * per_sample(params["factor"], x, torch.float32).to(dtype)).to(x.dtype)


@dataclass(frozen=True)
class Noise(Augmentation):
    """Add Gaussian noise from a stored seed.

    ``seed`` uint64 ``= rng.integers(2**64, dtype=np.uint64)``;
    ``out = x + float32(std) * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)``,
    the noise computed in float32 and cast to ``x``'s dtype before the sum.

    Example::

        Noise(std=0.15).settings()   # {'name': 'noise', 'std': 0.15}
    """

    std: float

    name: ClassVar[str] = "noise"

    def validate(self, *, where: str) -> None:
        if self.std < 0:
            raise SoftlabelsError(f"{where}: noise std must be a number >= 0, got {self.std:g}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"seed": (np.dtype(np.uint64), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"seed": rng.integers(2**64, dtype=np.uint64)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        seeds = params["seed"]
        # A stored seed replays numpy's generator (PCG64), which runs on the CPU whatever x's device.
        seeds = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds).reshape(-1)
        noise = np.empty((len(seeds), *x.shape[1:]), np.float32)
        for b, seed in enumerate(seeds.tolist()):
            noise[b] = np.random.default_rng(seed).standard_normal(x.shape[1:], dtype=np.float32)
        noise *= np.float32(self.std)
        return x + torch.from_numpy(noise).to(x.device, x.dtype)
