"""Augmentations of images, ``[C, H, W]`` per sample (flip takes any shape: it flips the last axis).

Boxes are stored as fractions of the image's height and width, so replay needs no integer rounding.

Example::

    crop = Crop(size=(24, 24))
    crop.params((3, 32, 32))   # {'box': (dtype('float32'), (4,))}
    crop.output_shape((3, 32, 32))   # (3, 24, 24)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SoftlabelsError
from .base import Augmentation, Declared, Mixer, Params, compute_dtype, per_sample


def _check_image(aug: Augmentation, shape: tuple[int, ...], where: str) -> None:
    if len(shape) != 3:
        raise SoftlabelsError(f"{where}: {aug.name} works on images [C, H, W], not inputs of shape {list(shape)}")


@dataclass(frozen=True)
class Crop(Augmentation):
    """A random resized crop, drawn as torchvision's ``RandomResizedCrop`` draws it, resampled to ``size``.

    For a source of ``H x W`` pixels, up to 10 tries of: ``area = H * W * rng.uniform(*scale)``,
    ``aspect = exp(rng.uniform(log(ratio[0]), log(ratio[1])))``, ``w = round(sqrt(area * aspect))``,
    ``h = round(sqrt(area / aspect))``; the first with ``0 < h <= H`` and ``0 < w <= W`` takes
    ``top = rng.integers(0, H - h, endpoint=True)``, then ``left = rng.integers(0, W - w, endpoint=True)``.
    If none fits: the largest centred box whose aspect is within ``ratio``
    (``w = W, h = round(W / ratio[0])`` or ``h = H, w = round(H * ratio[1])`` or the whole image),
    ``top = (H - h) // 2``, ``left = (W - w) // 2``.

    ``box`` float32 ``[4] = (top / H, left / W, h / H, w / W)``. Output pixel ``(p, q)`` samples the
    source bilinearly at pixel coordinates ``y = H * (box[0] + box[2] * (p + 0.5) / size[0]) - 0.5``,
    ``x = W * (box[1] + box[3] * (q + 0.5) / size[1]) - 0.5``, computed in float64 and clipped to the
    image (edges repeated); rows are interpolated first, then columns, in float32:
    ``(1 - a) * near + a * far``. That is ``grid_sample(x, affine_grid(box), mode="bilinear",
    padding_mode="border", align_corners=False)`` without the rounding of its float32 grid.

    Example::

        Crop(size=(24, 24), scale=(0.35, 1.0)).settings()
        # {'name': 'crop', 'size': [24, 24], 'scale': [0.35, 1.0], 'ratio': [0.75, 1.3333333333333333]}
    """

    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    name: ClassVar[str] = "crop"
    crops_source: ClassVar[bool] = True

    def validate(self, *, where: str) -> None:
        if not all(n > 0 for n in self.size):
            raise SoftlabelsError(f"{where}: crop size must be 2 positive integers (height,width), got {list(self.size)}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise SoftlabelsError(f"{where}: crop scale must be 2 area fractions a,b with 0 < a <= b <= 1, got {low:g},{high:g}")
        low, high = self.ratio
        if not 0 < low <= high:
            raise SoftlabelsError(f"{where}: crop ratio must be 2 aspect ratios c,d with 0 < c <= d, got {low:g},{high:g}")

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        _check_image(self, shape, where)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], *self.size)

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"box": (np.dtype(np.float32), (4,))}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        height, width = shape[-2:]
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = height * width * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                break
        else:
            w, h = width, height
            if width / height < self.ratio[0]:
                h = round(width / self.ratio[0])
            elif width / height > self.ratio[1]:
                w = round(height * self.ratio[1])
            top, left = (height - h) // 2, (width - w) // 2
        return {"box": np.array([top / height, left / width, h / height, w / width], dtype=np.float32)}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        top, left, h, w = np.asarray(params["box"], np.float64).reshape(-1, 4).T
        # each fraction rounded to float32: a box that ends at the edge may pass it by a rounding
        inside = (top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= 1 + 2**-22) & (left + w <= 1 + 2**-22)
        return {"box": (inside, "boxes (top, left, height, width) of nonzero size inside the image, as fractions")}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return resample_box(x, torch.as_tensor(params["box"], device=x.device), self.size).to(x.dtype)

    def from_source(self, source: Any, ids: np.ndarray, params: Params) -> torch.Tensor:
        """The views of rows ``ids`` cropped by ``source`` from its decoded images, each at its own
        resolution (``ImageFolderSource.crop``): what :meth:`apply` does to inputs, done to the images."""
        return source.crop(ids, params["box"], self.size)


def resample_box(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` cropped to ``boxes`` ``[B, 4]`` (fractions ``top, left, height, width``)
    and resampled bilinearly to ``size``, as :class:`Crop` describes; float32 at least."""
    top, left, h, w = boxes.double().unbind(-1)
    return _resample(_resample(x, -2, top, h, size[0]), -1, left, w, size[1])


def _resample(x: torch.Tensor, dim: int, start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """Axis ``dim`` of ``x`` resampled bilinearly (edges repeated) at ``size`` points spread over
    ``[start, start + length)``, fractions of the axis, one span per sample; in float32 at least.

    Bilinear sampling is separable, so this is what ``grid_sample`` does, done one axis at a time with
    exact positions: float64 coordinates from the same elementwise operations on every device, then
    a gather and a weighted sum, so a CPU and a GPU replay agree bit for bit and a box covering the
    image gives the image back exactly.
    """
    source = x.shape[dim]
    centres = ((torch.arange(size, dtype=torch.float64) + 0.5) / size).to(x.device)  # on the CPU: same values everywhere
    position = (source * (start[:, None] + length[:, None] * centres) - 0.5).clamp(0, source - 1)
    low = position.floor()
    weight = (position - low).to(compute_dtype(x))
    shape = [len(x), *[1] * (x.dim() - 1)]
    shape[dim] = size
    low, weight = low.long().reshape(shape), weight.reshape(shape)
    high = (low + 1).clamp(max=source - 1)
    target = list(x.shape)
    target[dim] = size
    near = x.gather(dim, low.expand(target)).to(weight.dtype)
    far = x.gather(dim, high.expand(target)).to(weight.dtype)
    return (1 - weight) * near + weight * far


@dataclass(frozen=True)
class Flip(Augmentation):
    """Mirror the last axis with probability 1/2.

    ``flip`` uint8 ``= uint8(rng.random() < 0.5)``; ``out = x[..., ::-1]`` where ``flip`` is 1.

    Example::

        Flip().settings()   # {'name': 'flip'}
    """

    name: ClassVar[str] = "flip"

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        if not shape:
            raise SoftlabelsError(f"{where}: flip needs inputs with at least one axis, not scalars")

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"flip": (np.dtype(np.uint8), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"flip": np.uint8(rng.random() < 0.5)}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        return {"flip": (params["flip"] <= 1, "0 or 1")}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.where(per_sample(params["flip"], x).bool(), x.flip(-1), x)


def pasted(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, H, W]``: whether pixel ``(h, w)``'s centre lies in box ``(y0, x0, y1, x1)`` ``[B, 4]``:
    ``y0 * H <= h + 0.5 < y1 * H`` and ``x0 * W <= w + 0.5 < x1 * W``, exact in float64 (a float32
    times an integer below 2**29 needs no rounding), so every device counts the same pixels."""
    box = box.double()
    rows = torch.arange(height, device=box.device, dtype=torch.float64) + 0.5
    cols = torch.arange(width, device=box.device, dtype=torch.float64) + 0.5
    in_rows = (rows >= box[:, 0:1] * height) & (rows < box[:, 2:3] * height)
    in_cols = (cols >= box[:, 1:2] * width) & (cols < box[:, 3:4] * width)
    return in_rows[:, :, None] & in_cols[:, None, :]


@dataclass(frozen=True)
class CutMix(Mixer):
    """Paste a box of the partner's view into the sample's (Yun et al., ICCV 2019).

    After ``partner`` (see :class:`Mixer`): ``lam0 = rng.beta(alpha, alpha)``, ``cy = rng.random()``,
    ``cx = rng.random()``, ``half = sqrt(1 - lam0) / 2``; ``box`` float32 ``[4] = clip((cy - half,
    cx - half, cy + half, cx + half), 0, 1)`` as ``(y0, x0, y1, x1)`` fractions. Pixel ``(h, w)``
    takes the partner's values where its centre ``((h + 0.5) / H, (w + 0.5) / W)`` lies in
    ``[y0, y1) x [x0, x1)`` (see :func:`pasted`); ``lam`` float32 ``= 1 - pasted pixels / (H * W)``,
    the exact fraction of the sample's own pixels.

    Example::

        CutMix(alpha=1.0).params((3, 32, 32))
        # {'partner': (dtype('int64'), ()), 'box': (dtype('float32'), (4,)), 'lam': (dtype('float32'), ())}
    """

    alpha: float = 1.0

    name: ClassVar[str] = "cutmix"

    def validate(self, *, where: str) -> None:
        if not self.alpha > 0:
            raise SoftlabelsError(f"{where}: cutmix alpha must be a number > 0, got {self.alpha:g}")

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        _check_image(self, shape, where)

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {**super().params(shape), "box": (np.dtype(np.float32), (4,)), "lam": (np.dtype(np.float32), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        drawn = super().draw(rng, shape, num_samples)
        lam0 = rng.beta(self.alpha, self.alpha)
        cy, cx = rng.random(), rng.random()
        half = math.sqrt(1 - lam0) / 2
        box = np.clip([cy - half, cx - half, cy + half, cx + half], 0, 1).astype(np.float32)
        height, width = shape[-2:]
        return {**drawn, "box": box, "lam": _own_share(box[None], height, width)[0]}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        box = np.asarray(params["box"], np.float32).reshape(-1, 4)
        y0, x0, y1, x1 = box.T
        inside = (y0 >= 0) & (x0 >= 0) & (y0 <= y1) & (x0 <= x1) & (y1 <= 1) & (x1 <= 1)
        own = _own_share(np.where(inside[:, None], box, 0), *shape[-2:])  # a box outside holds no pixel
        return {**super().drawable(params, shape, num_samples),
                "box": (inside, "boxes (y0, x0, y1, x1) with 0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1"),
                "lam": (params["lam"] == own, "the share of the sample's own pixels outside its box")}

    def apply(self, x: torch.Tensor, params: Params, partner: torch.Tensor) -> torch.Tensor:
        mask = pasted(torch.as_tensor(params["box"], device=x.device), *x.shape[-2:])
        return torch.where(mask[:, None], partner, x)


def _own_share(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[B]`` float32: the share of pixels left outside each box ``[B, 4]`` (:func:`pasted`), CutMix's ``lam``."""
    count = pasted(torch.from_numpy(np.ascontiguousarray(boxes, np.float32)), height, width).sum((1, 2)).numpy()
    return (1 - count / (height * width)).astype(np.float32)
