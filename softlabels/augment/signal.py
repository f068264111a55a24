"""Augmentations of 1-D signals, ``[L]`` or ``[C, L]`` per sample (scale and noise take any shape).

Example::

    shift = Shift(max=6)
    params = shift.draw(view_generator(0, 3, 0), (40,), num_samples=100)   # {'offset': np.int32(...)}
    shift.apply(x[None], {k: np.asarray([v]) for k, v in params.items()}).shape   # torch.Size([1, 40])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
        if not 0 <= self.max < 2**31:  # the offset is stored as an int32
            raise SoftlabelsError(f"{where}: shift max must be an integer from 0 to 2**31 - 1, got {self.max}")

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        if len(shape) not in (1, 2):
            raise SoftlabelsError(f"{where}: shift works on signals [L] or [C, L], not inputs of shape {list(shape)}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"offset": (np.dtype(np.int32), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"offset": np.int32(rng.integers(-self.max, self.max, endpoint=True))}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        offset = params["offset"]
        return {"offset": ((offset >= -self.max) & (offset <= self.max), f"integers from {-self.max} to {self.max}")}

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

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        low, high = np.float32(1 - self.max), np.float32(1 + self.max)  # float32 rounding keeps a draw within these
        factor = params["factor"]
        return {"factor": ((factor >= low) & (factor <= high), f"numbers from {low:g} to {high:g}")}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dtype = compute_dtype(x)
        return (x.to(dtype) * per_sample(params["factor"], x, torch.float32).to(dtype)).to(x.dtype)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def keyed_normals(seeds: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normals ``[len(seeds), *shape]`` float32, row ``b`` a pure function of ``seeds[b]``,
    made for every row at once (no generator per row).

    Word ``k`` of a row is SplitMix64's output for the state ``seed + (k + 1) * 0x9E3779B97F4A7C15``
    (mod 2**64): ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31``. Its high and low 32 bits ``h`` and ``l`` make the row's values ``2k`` and
    ``2k + 1`` (row-major over ``shape``) by Box-Muller in float64, each rounded to float32:
    ``r = sqrt(-2 * log((h + 1) * 2**-32))``, ``r * cos(l * 2**-32 * 2 * pi)``, ``r * sin(...)``.

    Example::

        keyed_normals(np.array([7, 7, 8], np.uint64), (40,)).shape   # (3, 40); rows 0 and 1 equal
    """
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    size = math.prod(shape)
    with np.errstate(over="ignore"):  # the arithmetic is mod 2**64 by design
        z = seeds + np.arange(1, (size + 1) // 2 + 1, dtype=np.uint64) * _GOLDEN
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    radius = np.sqrt(-2.0 * np.log(((z >> np.uint64(32)) + np.uint64(1)).astype(np.float64) * 2.0**-32))
    # torch's vectorised cosine and sine: numpy's float64 ones run 20-30x slower, one value at a time.
    angle = torch.from_numpy((z & np.uint64(0xFFFFFFFF)).astype(np.float64) * (2.0**-32 * 2 * np.pi))
    radius = torch.from_numpy(radius)
    pairs = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1).to(torch.float32).numpy()
    return pairs.reshape(len(seeds), -1)[:, :size].reshape(len(seeds), *shape)


@dataclass(frozen=True)
class Noise(Augmentation):
    """Add Gaussian noise from a stored seed.

    ``seed`` uint64 ``= rng.integers(2**64, dtype=np.uint64)``;
    ``out = x + float32(std) * keyed_normals(seed, shape)`` (:func:`keyed_normals`), the noise in
    float32, cast to ``x``'s dtype before the sum. Caches made before this generator (their manifests
    record no ``generator``) replay with ``generator="pcg64"``:
    ``np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)``, one generator per row.

    Example::

        Noise(std=0.15).settings()   # {'name': 'noise', 'std': 0.15, 'generator': 'keyed'}
    """

    std: float
    generator: Literal["keyed", "pcg64"] = "keyed"

    name: ClassVar[str] = "noise"
    unrecorded: ClassVar[dict[str, Any]] = {"generator": "pcg64"}

    def validate(self, *, where: str) -> None:
        if self.std < 0:
            raise SoftlabelsError(f"{where}: noise std must be a number >= 0, got {self.std:g}")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"seed": (np.dtype(np.uint64), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"seed": rng.integers(2**64, dtype=np.uint64)}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        return {"seed": (np.ones(len(params["seed"]), bool), "any 64-bit integer")}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        seeds = params["seed"]
        # A stored seed replays on the CPU whatever x's device.
        seeds = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds).reshape(-1).astype(np.uint64)
        if self.generator == "keyed":
            noise = keyed_normals(seeds, tuple(x.shape[1:]))
        else:
            noise = np.empty((len(seeds), *x.shape[1:]), np.float32)
            for b, seed in enumerate(seeds.tolist()):
                noise[b] = np.random.default_rng(seed).standard_normal(x.shape[1:], dtype=np.float32)
        noise *= np.float32(self.std)
        return x + torch.from_numpy(noise).to(x.device, x.dtype)
