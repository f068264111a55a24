"""Image folders as datasets: ``imagefolder:PATH[?size=S&resize=R&channels=3&mean=m,m,m&std=s,s,s]``.

Two layouts, told apart by what ``PATH`` holds:

- one subfolder per class, images anywhere below it (torchvision's ``ImageFolder``): class ``k`` is
  the ``k``-th folder name in sorted order, and the names are recorded in a cache's manifest;
- images directly in ``PATH`` and no subfolders: a flat, unlabelled set, such as a transfer set.

Rows are the images in the sorted order of their paths relative to ``PATH``. An image is decoded with
pillow (JPEG, PNG, BMP, GIF, WebP, TIFF, PPM/PGM only: other formats, such as EPS, would start an
external program), converted to RGB (``channels=3``) or grayscale (``channels=1``), and, with ``size``,
resized so that its shorter side is ``resize`` pixels (default ``size``; bilinear with antialiasing,
as torchvision's ``Resize``) and centre-cropped to ``size x size`` (torchvision's ``CenterCrop``).
Pixels become float32 ``value / 255``, then ``(x - mean) / std`` per channel; inputs are
``[channels, H, W]``. Without ``size`` every image must have the same size.

A view pipeline that starts with ``crop`` crops from the decoded image at its own resolution, not
from the resized one: each view's box is drawn for that image's size and replayed on it
(:meth:`ImageFolderSource.crop`), as FKD's recorded crops are.

The fingerprint covers the transform, the class names and, for every image, its path, label and the
sha256 of its bytes, so a cache is refused for a folder whose files changed. The per-image digests
are kept (:meth:`ImageFolderSource.content_digests`): a cache stores one per row, so that a dump stopped by a
corrupt file resumes once the file is fixed or removed, keeping every chunk whose files are unchanged.

Example::

    source = open_data("imagefolder:photos?size=64")
    source.classes, source.input_shape      # (['cat', 'dog'], (3, 64, 64))
    x, y = source.read(0, 8)                 # float32 [8, 3, 64, 64], int64 [8]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from tqdm import tqdm

from .augment.image import resample_box
from .data import NO_LABEL, UNUSABLE, Source
from .errors import SoftlabelsError

log = logging.getLogger(__name__)

PREFIX = "imagefolder:"
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# What pillow may open: every other plugin is refused, so no image can start Ghostscript (EPS) or similar.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# File reads and hashlib release the GIL, so files hash in parallel. Not more threads: on a 16-core
# GPU host, 20 threads took 6.4 s over a 1.1 GB folder where 4 took 3.3-3.8 s (each file's header
# was parsed in the same pass then, holding the GIL).
_HASH_THREADS = 4


@dataclass(frozen=True)
class ImageTransform:
    """What an image becomes: decode, convert, resize the shorter side, centre-crop, scale, normalise.

    Example::

        ImageTransform(size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).settings()
    """

    size: int | None = None
    resize: int | None = None
    channels: int = 3
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise SoftlabelsError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values *= self.channels
            if len(values) != self.channels or not all(np.isfinite(values)):
                raise SoftlabelsError(f"{name} must be 1 or {self.channels} finite numbers, got {list(getattr(self, name))}")
            object.__setattr__(self, name, values)
        if not all(s > 0 for s in self.std):
            raise SoftlabelsError(f"std must be positive, got {list(self.std)}")
        if self.size is None and self.resize is not None:
            raise SoftlabelsError("resize needs size (the centre crop that follows it)")
        if self.size is not None:
            if not (isinstance(self.size, int) and self.size > 0):
                raise SoftlabelsError(f"size must be a positive integer, got {self.size!r}")
            if self.resize is None:
                object.__setattr__(self, "resize", self.size)
            if not (isinstance(self.resize, int) and self.resize >= self.size):
                raise SoftlabelsError(f"resize must be an integer >= size {self.size}, got {self.resize!r}")

    def settings(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def resized(self, image: Any) -> np.ndarray:
        """The decoded pillow ``image`` resized and centre-cropped as torchvision would: ``[H, W, c]`` uint8."""
        if self.size is not None:
            from PIL import Image

            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.resize * long / short)
            new = (self.resize, new_long) if width <= height else (new_long, self.resize)
            if new != (width, height):
                image = image.resize(new, Image.Resampling.BILINEAR)
            left = int(round((new[0] - self.size) / 2.0))
            top = int(round((new[1] - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        return np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], self.channels)

    def normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, c, H, W]`` pixels in 0..255 (any dtype, any strides) as contiguous float32
        ``x / (255 * std) - mean / std``: one converting copy and one fused pass, about a third of
        the time of ``((x / 255) - mean) / std`` in three passes over a transposed tensor."""
        std = torch.tensor(self.std, dtype=torch.float64).reshape(-1, 1, 1)
        scale = (1 / (255 * std)).float()
        shift = (-torch.tensor(self.mean, dtype=torch.float64).reshape(-1, 1, 1) / std).float()
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return torch.addcmul(shift, out, scale, out=out)


def parse_transform(spec: str, query: str) -> ImageTransform:
    """The :class:`ImageTransform` of a spec's query string, each value checked."""
    values: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key in values:
            raise SoftlabelsError(f"data spec {spec}: {key} is given twice")
        try:
            if key in ("size", "resize", "channels"):
                values[key] = int(text)
            elif key in ("mean", "std"):
                values[key] = tuple(float(v) for v in text.split(","))
            else:
                raise SoftlabelsError(f"data spec {spec}: unknown parameter {key!r} (use size, resize, channels, mean, std)")
        except ValueError:
            raise SoftlabelsError(f"data spec {spec}: {key} must be {'an integer' if key in ('size', 'resize', 'channels') else 'comma-separated numbers'}, got {text!r}") from None
    try:
        return ImageTransform(**values)
    except SoftlabelsError as exc:
        raise SoftlabelsError(f"data spec {spec}: {exc}") from None


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


class ImageFolderSource(Source):
    """The images of a folder (see the module docstring), decoded on every read."""

    reads_items = True
    native_images = True

    def __init__(self, root: Path, transform: ImageTransform):
        self.root, self.transform = root, transform
        query = "&".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in transform.settings().items() if v is not None)
        self.spec = f"{PREFIX}{root}?{query}"
        if not root.is_dir():
            raise SoftlabelsError(f"image folder {root} does not exist or is not a folder")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        flat = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
        if folders and flat:
            raise SoftlabelsError(f"image folder {root} holds both class folders and images ({flat[0].name}): "
                                  "use one folder per class, or only images")
        if folders:
            self._classes: list[str] | None = [p.name for p in folders]
            files, labels = [], []
            for label, folder in enumerate(folders):
                found = _images_below(folder)
                if not found:
                    raise SoftlabelsError(f"image folder {root}: class folder {folder.name!r} holds no images ({', '.join(SUFFIXES)})")
                files += found
                labels += [label] * len(found)
        else:
            self._classes, files, labels = None, sorted(flat), [NO_LABEL] * len(flat)
        if not files:
            raise SoftlabelsError(f"image folder {root} holds no images ({', '.join(SUFFIXES)})")
        self.files = [str(p.relative_to(root)) for p in files]
        self._labels = np.asarray(labels, dtype=np.int64)
        self._skip_bad = False
        self._bad: set[int] = set()  # rows this process could not decode, with skip_bad_files
        self._digests: np.ndarray | None = None
        self._sizes: np.ndarray | None = None  # [N, 2] (height, width) of every decoded image
        self._fingerprint: str | None = None
        self._shape = self._first_shape()

    def _first_shape(self) -> tuple[int, ...]:
        """Every input's shape: ``size`` says it; without it, the first image that decodes does (a
        corrupt one is named when it is read, or skipped with ``skip_bad_files``)."""
        if self.transform.size is not None:
            return (self.transform.channels, self.transform.size, self.transform.size)
        first_error = None
        for i in range(len(self.files)):
            try:
                return (self.transform.channels, *self._decode(i).shape[:2])
            except SoftlabelsError as exc:
                first_error = first_error or exc
        raise first_error

    # -- the Source interface ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def has_labels(self) -> bool:
        return self._classes is not None

    @property
    def classes(self) -> list[str] | None:
        return self._classes

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.take(np.arange(start, stop))

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        x = np.zeros((len(ids), self._shape[1], self._shape[2], self._shape[0]), dtype=np.uint8)
        for j, i in enumerate(ids.tolist()):
            pixels = self._decode(i)
            if pixels is None:  # skipped: zeros, and the label says so
                continue
            if pixels.shape != x.shape[1:]:
                raise SoftlabelsError(
                    f"image folder {self.root}: {self.files[i]} is {pixels.shape[1]}x{pixels.shape[0]} pixels but "
                    f"{self.files[0]} is {x.shape[2]}x{x.shape[1]}: images of mixed sizes need ?size=S (resize and centre-crop)")
            x[j] = pixels
        return self.transform.normalised(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(), self.labels_of(ids)

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """The labels of rows ``ids``: :data:`~softlabels.data.UNUSABLE` for an image this process skipped."""
        ids = np.asarray(ids, dtype=np.int64)
        labels = self._labels[ids]
        if self._bad:
            labels[np.isin(ids, list(self._bad))] = UNUSABLE
        return labels

    def skip_bad_files(self) -> None:
        self._skip_bad = True

    def skip_rows(self, rows: list[int]) -> None:
        self._bad.update(rows)

    def row_name(self, i: int) -> str:
        return self.files[i]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        return {"classes": self.classes, "transform": self.transform.settings()}

    # -- decoding ----------------------------------------------------------------------------------

    def _open(self, i: int) -> Any:
        """Image ``i`` decoded and converted; a file that does not decode is a one-line error naming it,
        or, with :meth:`skip_bad_files`, a warning and ``None``."""
        from PIL import Image

        if i in self._bad:
            return None
        path = self.root / self.files[i]
        try:
            with Image.open(path, formats=FORMATS) as image:
                image.load()  # a truncated or corrupt file fails here, not later
                return image.convert(self.transform.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            message = f"image folder {self.root}: cannot decode {self.files[i]}: {exc}"
            if not self._skip_bad:
                raise SoftlabelsError(message) from None
        log.warning("%s; skipped (--skip-bad-files)", message)
        self._bad.add(i)
        return None

    def _decode(self, i: int) -> np.ndarray | None:
        image = self._open(i)
        return None if image is None else self.transform.resized(image)

    def native_shape(self, i: int) -> tuple[int, ...]:
        """The shape of image ``i`` as decoded, before any resizing: ``(channels, H, W)``."""
        height, width = (int(v) for v in self.sizes()[i])
        if not height or not width:  # its header did not parse: decoding says why, naming the file
            self._open(i)
            return self._shape  # skipped: its views are drawn as for any input
        return (self.transform.channels, height, width)

    def crop(self, ids: np.ndarray, boxes: Any, size: tuple[int, int]) -> torch.Tensor:
        """Views cropped from each decoded image at its own resolution: image ``ids[b]``'s box ``boxes[b]``
        (fractions ``top, left, height, width``) resampled to ``size`` as
        :class:`softlabels.augment.image.Crop` resamples, then normalised. ``[B, channels, *size]`` float32.
        """
        boxes = torch.as_tensor(boxes).double().reshape(-1, 4)
        out = torch.zeros(len(boxes), self.transform.channels, *size)  # a skipped image stays zeros
        by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for b, i in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            image = self._open(i)
            if image is not None:
                pixels = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], -1)
                by_size.setdefault(pixels.shape[:2], []).append((b, pixels))
        for group in by_size.values():  # images of one size are resampled together
            rows = torch.tensor([b for b, _ in group])
            pixels = torch.from_numpy(np.stack([p for _, p in group])).permute(0, 3, 1, 2).float()
            out[rows] = resample_box(pixels, boxes[rows], size)
        return self.transform.normalised(out)

    # -- identity ----------------------------------------------------------------------------------

    def _scan(self, *, digests: bool, sizes: bool) -> None:
        """Hash every file and/or read every image's size from its header, files in parallel. Sizes
        are read only when needed (views cropped from the images, or no ``size`` to resize to): the
        header parse holds the GIL, and a fingerprint without it took 0.48 s against 0.71 s for
        4000 JPEGs on 2 cores (best of 5, two runs each)."""
        from PIL import Image

        def one(i: int) -> tuple[bytes, tuple[int, int]]:
            path = self.root / self.files[i]
            data = path.read_bytes() if digests else None
            height = width = 0
            if sizes:
                try:
                    with Image.open(io.BytesIO(data) if digests else path, formats=FORMATS) as image:
                        width, height = image.size
                except Exception:  # decoding names the file and the cause; until then only its bytes count
                    pass
            return (hashlib.sha256(data).digest() if digests else b""), (height, width)

        found, shapes = np.empty((len(self), 32), dtype=np.uint8), np.empty((len(self), 2), dtype=np.int64)
        block = 4096  # files in flight at once: a future per file of a million-image folder would not fit
        with ThreadPoolExecutor(_HASH_THREADS) as pool, tqdm(total=len(self), desc="fingerprint" if digests else "image sizes",
                                                             unit="files", unit_scale=True, leave=False, disable=None) as bar:
            for start in range(0, len(self), block):  # a bar on a terminal only
                for i, (digest, size) in enumerate(pool.map(one, range(start, min(start + block, len(self)))), start):
                    if digests:
                        found[i] = np.frombuffer(digest, dtype=np.uint8)
                    shapes[i] = size
                bar.update(min(block, len(self) - start))
        if digests:
            self._digests = found
        if sizes:
            self._sizes = shapes
        if sizes and self.transform.size is None:
            readable = np.flatnonzero(shapes.all(axis=1))
            odd = readable[(shapes[readable] != shapes[readable[:1]]).any(axis=1)]
            if len(odd):
                (h0, w0), (h, w) = shapes[readable[0]], shapes[odd[0]]
                raise SoftlabelsError(
                    f"image folder {self.root}: {self.files[odd[0]]} is {w}x{h} pixels but {self.files[readable[0]]} is "
                    f"{w0}x{h0}: images of mixed sizes need ?size=S (resize and centre-crop)")

    def content_digests(self) -> np.ndarray:
        """``[N, 32]`` uint8: the sha256 of every file's bytes (and, without ``size``, the check that
        every image has the same size, in the same pass)."""
        if self._digests is None:
            self._scan(digests=True, sizes=self.transform.size is None and self._sizes is None)
        return self._digests

    def sizes(self) -> np.ndarray:
        """``[N, 2]``: every image's ``(height, width)`` as its header gives it."""
        if self._sizes is None:
            self._scan(digests=False, sizes=True)
        return self._sizes

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
            for name, label, file_digest in zip(self.files, self._labels.tolist(), self.content_digests()):
                digest.update(f"{name}\0{label}\0".encode())
                digest.update(file_digest.tobytes())
            self._fingerprint = "sha256:" + digest.hexdigest()
        return self._fingerprint


def open_imagefolder(spec: str) -> ImageFolderSource:
    """The :class:`ImageFolderSource` of ``imagefolder:PATH[?...]``."""
    path, _, query = spec[len(PREFIX):].partition("?")
    if not path:
        raise SoftlabelsError(f"data spec {spec}: no folder after {PREFIX}")
    return ImageFolderSource(Path(os.path.abspath(path)), parse_transform(spec, query))
