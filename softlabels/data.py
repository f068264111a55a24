"""Data specs: one string names a dataset, and :func:`open_data` turns it into a :class:`Source`.

Spec syntax (first match wins):

=====================================  ==========================================================
``mnist1d://train``, ``mnist1d://test``  the standard MNIST-1D split (4000 / 1000 samples)
``mnist1d://transfer?n=40000&seed=1``   ``n`` unlabeled MNIST-1D samples drawn with another seed
``path.npz``                            arrays ``x`` (inputs) and optional ``y`` (int labels)
``path.zarr``, ``path.h5``/``.hdf5``    a Zarr group or HDF5 file with the same array names
``module:callable[?k=v&...]``           a map-style ``torch.utils.data.Dataset`` returned by
                                        ``callable(**kwargs)``; items are ``x`` or ``(x, y)``
``tokens.npz`` (``.zarr``, ``.h5``)     token windows: ``input_ids [N, L]``, optional
                                        ``loss_mask``, ``segment_ids`` (:mod:`softlabels.tokens`)
``text:PATH?tokenizer=T&seq_len=L``     UTF-8 text tokenised with a ``tokenizers`` file and packed
                                        into windows of ``L`` tokens (:mod:`softlabels.text`)
``imagefolder:PATH?size=S``             a folder of images, one subfolder per class or flat
                                        (:mod:`softlabels.images`)
=====================================  ==========================================================

Every source reads contiguous row ranges (``read(start, stop)``), which is how the loader and the
dump consume it: array stores are read slice by slice, never row by row.

Example::

    source = open_data("mnist1d://test")
    len(source), source.input_shape, source.has_labels   # (1000, (40,), True)
    x, y = source.read(0, 4)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch

from .errors import MissingData, SoftlabelsError
from .models import resolve_callable
from .store import ZarrRows, first_failing_chunk
from .trust import refuse_unpickling

log = logging.getLogger(__name__)

NO_LABEL = -1
# The label of a row whose input could not be read (a dump with --skip-bad-files): it carries no loss.
UNUSABLE = -2
# A cache of a source with content digests stores this record: the first bytes of each row's sha256.
DIGEST = "dataset/sha256"
DIGEST_BYTES = 8
_FINGERPRINT_BLOCK_BYTES = 64 << 20
_SAMPLED_ITEMS = 64
_CALLABLE_SPEC = re.compile(r"^([\w./-]+\.py|[A-Za-z_][\w.]*):[A-Za-z_]\w*(\?.*)?$")  # module:f or path/file.py:f
_STORE_SUFFIXES = (".npz", ".zarr", ".h5", ".hdf5")


def default_workers(source: "Source", device: torch.device) -> int:
    """DataLoader worker processes for reading ``source`` when the user names none: none for array
    stores; for a dataset read item by item (decoding images, calling a user's Dataset), up to 4
    where the model runs on the CPU, whose cores it needs, and all cores but four (at least as many)
    where it runs on a GPU: the main thread, the pinned-memory thread and the writer or loader thread
    each keep one busy. Under torchrun the ranks of a machine share its cores.
    On a 16-core H200 host, a ResNet-50 dump of JPEGs ran at 1,414, 1,702 and 1,643 images/s with
    10, 12 and 14 workers (BENCHMARKS.md), each worker decoding about 160 images/s.
    """
    if not source.reads_items:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2  # those it may run on
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's ranks on this machine share them
    few = max(1, min(4, cores - 1))
    return max(few, cores - 4) if device.type == "cuda" else few


def _checked_labels(spec: str, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``labels`` (of dataset rows ``rows``), refused where one is below -1: a label is a class
    index, or -1 for none (-2 marks a row that could not be read, which only softlabels sets)."""
    bad = np.flatnonzero(labels < NO_LABEL)
    if len(bad):
        raise SoftlabelsError(f"dataset {spec}: label {int(labels[bad[0]])} of row {int(rows[bad[0]])} is below -1 "
                              "(labels are class indices, or -1 for none)")
    return labels


def _item_label(spec: str, label: Any, row: int) -> int:
    """A Dataset item's label as an int, refused unless it is an integer (a Python or numpy integer,
    or an integer tensor or array of one element): ``int()`` would take the class of a ``1.5`` to
    be 1, or parse ``"3"``."""
    if isinstance(label, (torch.Tensor, np.ndarray, np.generic)) and (label.numel() if isinstance(label, torch.Tensor) else label.size) == 1:
        label = label.reshape(()).item()
    if isinstance(label, bool) or not isinstance(label, int):
        raise SoftlabelsError(f"dataset {spec}: the label of item {row} is {label!r}, not an integer "
                              "(labels are class indices, or -1 for none)")
    return int(_checked_labels(spec, np.array([label]), np.array([row]))[0])


def data_dir() -> Path:
    """Where generated built-in datasets are kept (``$SOFTLABELS_DATA`` or ``~/.cache/softlabels``)."""
    return Path(os.environ.get("SOFTLABELS_DATA", Path.home() / ".cache" / "softlabels"))


class Source:
    """A dataset as contiguous row ranges of inputs and labels (``-1`` where a row has no label)."""

    spec: str
    # Each row costs its own read (a user's Dataset item, an image to decode): read only the rows a
    # batch takes, and by default in DataLoader worker processes.
    reads_items: bool = False
    # Its inputs are images resized from decoded ones of their own sizes (an image folder's): a view
    # pipeline that starts with a crop crops each image at its own resolution (native_shape, crop).
    native_images: bool = False
    # Its inputs lie in memory or are memory-mapped: reading rows is a copy, with no decode to overlap.
    in_memory: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``x[start:stop]`` and labels ``y[start:stop]`` as numpy arrays."""
        raise NotImplementedError

    def read_inputs(self, start: int, stop: int) -> np.ndarray:
        """Inputs ``x[start:stop]`` alone, for a reader whose labels come from elsewhere (a cache)."""
        return self.read(start, stop)[0]

    @property
    def chunk_rows(self) -> int | None:
        """Rows per stored chunk of the inputs (``None`` when reads cost the same at any offset)."""
        return None

    @property
    def label_shape(self) -> tuple[int, ...]:
        """The shape of one sample's labels: ``()``, or ``(L,)`` for token windows (one per position)."""
        return ()

    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a cache's manifest records of this dataset beside its spec and fingerprint."""
        return {}

    @property
    def classes(self) -> list[str] | None:
        """The names of the classes, label ``k`` being ``classes[k]``, where the dataset has them."""
        return None

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """The labels of rows ``ids``."""
        return self.take(ids)[1]

    def content_digests(self) -> np.ndarray | None:
        """``[N, 32]`` uint8, a sha256 per row of what the row is read from, where rows are files (an
        image folder's); a cache stores the first :data:`DIGEST_BYTES` of each, so that a resumed dump
        keeps exactly the chunks whose files did not change."""
        return None

    def row_name(self, i: int) -> str:
        """Row ``i`` as a user knows it (an image's path)."""
        return f"row {i}"

    def skip_bad_files(self) -> None:
        """Read a row that cannot be read as zeros labelled :data:`UNUSABLE`, with a warning, from now on."""
        raise SoftlabelsError(f"--skip-bad-files applies to image folders (imagefolder:PATH), not to {self.spec}")

    def skip_rows(self, rows: list[int]) -> None:
        """Read ``rows`` as zeros labelled :data:`UNUSABLE`, without reading them: the rows a cache's
        dump skipped (its manifest's ``skipped``), so that their views replay as the dump made them."""
        if rows:
            raise SoftlabelsError(f"dataset {self.spec} cannot skip rows, but the cache lists skipped rows {rows[:5]}")

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of rows ``ids`` (any order, repeats allowed), one read per run of
        consecutive rows among the sorted distinct ids.

        Example::

            x, y = source.take(np.array([7, 3, 7]))   # x[0] and x[2] are row 7
        """
        ids = self._rows(ids)
        distinct, where = np.unique(ids, return_inverse=True)
        if len(distinct) == 0:
            x, y = self.read(0, 0)
            return x, y
        breaks = np.flatnonzero(np.diff(distinct) != 1) + 1
        parts = [self.read(int(run[0]), int(run[-1]) + 1) for run in np.split(distinct, breaks)]
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return x[where], y[where]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as int64, refused when one is not a row (an index read from a stranger's cache)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise SoftlabelsError(f"dataset {self.spec} has rows 0 to {len(self) - 1}, not row {bad}")
        return ids

    def labels(self) -> np.ndarray:
        """Every label, read in blocks (labels are small next to inputs)."""
        block = 1 << 16
        return np.concatenate([self.read(s, min(s + block, len(self)))[1] for s in range(0, len(self), block)])


def skipped_rows(dataset_manifest: dict[str, Any], skipped: Any, where: str) -> list[int]:
    """The rows a cache's manifest lists as ``skipped`` (``[{"row": i, "name": ...}]``), checked."""
    if skipped is None:
        return []
    num_samples = dataset_manifest.get("num_samples")
    ok = isinstance(skipped, list) and all(
        isinstance(entry, dict) and set(entry) == {"row", "name"} and isinstance(entry["name"], str)
        and isinstance(entry["row"], int) and not isinstance(entry["row"], bool)
        and 0 <= entry["row"] < (num_samples if isinstance(num_samples, int) else 0) for entry in skipped)
    if not ok:
        raise SoftlabelsError(f"{where}: manifest field 'skipped' must list {{row, name}} of rows within the dataset")
    return [entry["row"] for entry in skipped]


def check_classes(recorded: Any, source: Source, where: str) -> None:
    """Refuse ``source`` when its class names differ from ``recorded``: the ``dataset.classes`` of a
    cache's manifest, or the ``classes`` of a model's checkpoint (``None`` where it or the source has
    no names). ``where`` names the cache or the model.

    Example::

        check_classes(cache.manifest["dataset"].get("classes"), open_data("imagefolder:val?size=224"), f"cache {cache.path}")
    """
    if recorded is None or source.classes is None:
        return
    if not (isinstance(recorded, list) and all(isinstance(name, str) for name in recorded)):
        raise SoftlabelsError(f"{where}: its class names are not a list of strings")
    if recorded != source.classes:
        missing = sorted(set(recorded) - set(source.classes))
        extra = sorted(set(source.classes) - set(recorded))
        def listed(names: list[str]) -> str:  # the first five, and how many in all
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        detail = "; ".join(part for part in (
            f"the dataset lacks {listed(missing)}" if missing else "",
            f"only the dataset has {listed(extra)}" if extra else "",
        ) if part) or "the same names in another order"
        raise SoftlabelsError(f"dataset {source.spec} has classes other than {where}'s ({detail}): "
                              "label k must name the same class in both")


def _as_input_array(x: np.ndarray) -> np.ndarray:
    # float64 inputs would make every model run in float64; nothing here needs it.
    return x.astype(np.float32) if x.dtype == np.float64 else x


class LazySource(Source):
    """A source whose arrays ``opener()`` opens lazily, once per process: an h5py handle opened before
    a ``fork`` gives wrong reads in the child, so each DataLoader worker opens its own."""

    def __init__(self, spec: str, opener: Callable[[], Any]):
        self.spec = spec
        self._opener = opener
        self._arrays: Any = None
        self._pid: int | None = None
        self._fingerprint: str | None = None

    def _open(self) -> Any:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = self._opener()
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_pid": None}

    def _read_rows(self, name: str, array: Any, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the source's array ``name``. A read that fails (a chunk whose
        checksum, such as HDF5's fletcher32, does not match; a codec's error) names the array, the
        first chunk that fails and its rows."""
        try:
            return np.asarray(array[start:stop])
        except SoftlabelsError:
            raise
        except Exception as exc:
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            chunks = getattr(array, "chunks", None)
            bad = first_failing_chunk(array, start, stop, int(chunks[0])) if chunks else None
            if bad is not None:
                lo, hi = bad * int(chunks[0]), min((bad + 1) * int(chunks[0]), int(array.shape[0]))
                raise SoftlabelsError(f"dataset {self.spec}: array '{name}' chunk {bad} (rows {lo}-{hi - 1}) "
                                      f"is damaged ({why})") from None
            raise SoftlabelsError(f"dataset {self.spec}: array '{name}' rows {start}-{stop - 1} could not be read ({why})") from None


class ArraySource(LazySource):
    """Inputs and labels held by array-likes that slice (numpy, zarr, h5py); ``opener()`` returns
    ``(x, y_or_None)``."""

    def __init__(self, spec: str, opener: Callable[[], tuple[Any, Any]]):
        super().__init__(spec, opener)
        x, y = self._open()
        # Only numbers: an object array would be unpickled on read (a Zarr v2 array may use numcodecs' Pickle).
        for name, array in (("x", x), ("y", y)):
            if array is not None and np.dtype(array.dtype).kind not in "biuf":
                raise SoftlabelsError(f"dataset {spec}: '{name}' must hold numbers, got dtype {array.dtype}")
        if len(x.shape) < 2:
            raise SoftlabelsError(f"dataset {spec}: 'x' must have a sample axis and a feature axis, got shape {list(x.shape)}")
        if y is not None:
            if len(y.shape) != 1 or y.shape[0] != x.shape[0]:
                raise SoftlabelsError(f"dataset {spec}: 'y' has shape {list(y.shape)}, expected [{x.shape[0]}]")
            if not np.issubdtype(np.dtype(y.dtype), np.integer):
                raise SoftlabelsError(f"dataset {spec}: labels 'y' must be integers, got {y.dtype}")

    def __len__(self) -> int:
        return int(self._open()[0].shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._open()[0].shape[1:])

    @property
    def has_labels(self) -> bool:
        return self._open()[1] is not None

    @property
    def chunk_rows(self) -> int | None:
        chunks = getattr(self._open()[0], "chunks", None)  # zarr and chunked h5py datasets
        return int(chunks[0]) if chunks else None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        xs, y = self.read_inputs(start, stop), self._open()[1]
        if y is None:
            return xs, np.full(stop - start, NO_LABEL, dtype=np.int64)
        return xs, _checked_labels(self.spec, self._read_rows("y", y, start, stop).astype(np.int64), np.arange(start, stop))

    def read_inputs(self, start: int, stop: int) -> np.ndarray:
        # A slice of a memory-mapped npz is read-only; torch wants arrays it may write.
        return np.require(_as_input_array(self._read_rows("x", self._open()[0], start, stop)), requirements=["C", "W"])

    @property
    def in_memory(self) -> bool:
        return all(isinstance(a, np.ndarray) for a in self._open() if a is not None)  # a memmap is one

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._open()
        if not self.in_memory:
            return super().take(ids)  # zarr and h5py: one read per run of rows
        ids = self._rows(ids)  # arrays in memory or memory-mapped: one gather
        xs = _as_input_array(x[ids])
        return xs, np.full(len(ids), NO_LABEL, dtype=np.int64) if y is None else _checked_labels(self.spec, y[ids].astype(np.int64), ids)

    def fingerprint(self) -> str:
        """sha256 of the shapes, dtypes and every byte of ``x`` and ``y``, read in large blocks."""
        if self._fingerprint is None:
            x, y = self._open()
            digest = hashlib.sha256()
            digest.update(json.dumps([list(x.shape), str(x.dtype), None if y is None else str(y.dtype)]).encode())
            row_bytes = max(1, int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize)
            block = max(1, _FINGERPRINT_BLOCK_BYTES // row_bytes)
            for start in range(0, len(self), block):
                stop = min(start + block, len(self))
                digest.update(np.ascontiguousarray(self._read_rows("x", x, start, stop)).tobytes())
                if y is not None:
                    digest.update(np.ascontiguousarray(self._read_rows("y", y, start, stop).astype(np.int64)).tobytes())
            self._fingerprint = "sha256:" + digest.hexdigest()
        return self._fingerprint


class DatasetSource(Source):
    """A user's map-style ``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)``."""

    reads_items = True

    def __init__(self, spec: str, dataset: Any):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise SoftlabelsError(f"dataset {spec}: the callable must return a map-style Dataset (with __len__ and __getitem__)")
        self.spec = spec
        self.dataset = dataset
        self._fingerprint: str | None = None
        if len(dataset) == 0:
            raise SoftlabelsError(f"dataset {spec} is empty")
        first = dataset[0]
        self._has_labels = isinstance(first, (tuple, list)) and len(first) >= 2
        self._input_shape = tuple(int(d) for d in self._item(0)[0].shape)

    def _item(self, i: int) -> tuple[np.ndarray, int]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            x, y = item[0], (item[1] if len(item) >= 2 else NO_LABEL)
        else:
            x, y = item, NO_LABEL
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return x, _item_label(self.spec, y, i)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def has_labels(self) -> bool:
        return self._has_labels

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        items = [self._item(i) for i in range(start, stop)]
        x = _as_input_array(np.stack([it[0] for it in items]))
        return x, np.array([it[1] for it in items], dtype=np.int64)

    def fingerprint(self) -> str:
        """sha256 of the length and of up to 64 evenly spaced items (reading every item may be costly)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(str(len(self)).encode())
            for i in np.unique(np.linspace(0, len(self) - 1, _SAMPLED_ITEMS).astype(int)):
                x, y = self._item(int(i))
                digest.update(np.ascontiguousarray(x).tobytes())
                digest.update(str(y).encode())
            self._fingerprint = "sampled-sha256:" + digest.hexdigest()
        return self._fingerprint


def _require(spec: str, names: Any, needed: str) -> None:
    names = sorted(names)
    if needed not in names:
        raise SoftlabelsError(f"dataset {spec} has no array '{needed}' (found: {', '.join(names) or 'none'}; "
                              "use x [and y] for samples, input_ids [and loss_mask, segment_ids] for token windows)")


def _xy(spec: str, opener: Callable[[], dict[str, Any]]) -> Callable[[], tuple[Any, Any]]:
    """An opener of ``(x, y)`` from an opener of every named array."""
    def open_xy() -> tuple[Any, Any]:
        arrays = opener()
        _require(spec, arrays, "x")
        return arrays["x"], arrays.get("y")
    return open_xy


def _npz_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map an uncompressed ``.npy`` member of an npz file, or load a compressed one whole.

    ``np.savez`` stores members uncompressed, so their bytes lie in the zip file as they are and
    can be mapped: an npz larger than memory then streams like a Zarr or HDF5 dataset.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:  # a newer .npy version: read it whole rather than guess its layout
            with archive.open(name) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise SoftlabelsError(f"{path}: array '{name[:-4]}' holds Python objects, which are not loaded")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _npz_opener(path: Path, spec: str) -> Callable[[], dict[str, Any]]:
    def open_npz() -> dict[str, Any]:
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
                return {name: _npz_member(path, archive, name + ".npy") for name in names}
        except SoftlabelsError:
            raise
        except Exception as exc:
            raise SoftlabelsError(f"cannot read dataset {spec}: {exc}") from exc

    return open_npz


def _zarr_opener(path: Path, spec: str) -> Callable[[], dict[str, Any]]:
    def open_zarr() -> dict[str, Any]:
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
            arrays = {name: group[name] for name in group.array_keys()}
        except Exception as exc:
            raise SoftlabelsError(f"cannot read dataset {spec}: not a Zarr group ({exc})") from exc
        for name, array in arrays.items():
            refuse_unpickling(array, f"dataset {spec}: array '{name}'")
        return {name: ZarrRows.wrap(path, name, array) for name, array in arrays.items()}

    return open_zarr


def _h5_opener(path: Path, spec: str) -> Callable[[], dict[str, Any]]:
    def open_h5() -> dict[str, Any]:
        import h5py

        try:
            f = h5py.File(path, "r")
        except Exception as exc:
            raise SoftlabelsError(f"cannot read dataset {spec}: not an HDF5 file ({exc})") from exc
        return {name: obj for name, obj in f.items() if isinstance(obj, h5py.Dataset)}

    return open_h5


def _mnist1d_arrays(split: str, n: int | None, seed: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Generate (once, then keep under :func:`data_dir`) an MNIST-1D split, fully offline."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if split == "transfer":
        args.num_samples, args.train_split, args.seed = n, 1.0, seed
    key = hashlib.sha256(json.dumps(vars(args), sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = data_dir() / f"mnist1d-{split}-{key}.npz"
    if not path.exists():
        log.info("generating MNIST-1D (%d samples, seed %d; once) into %s", args.num_samples, args.seed, path.parent)
        # make_dataset seeds numpy's and Python's global generators; keep the caller's untouched.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        if split == "test":
            np.savez(tmp, x=data["x_test"].astype(np.float32), y=data["y_test"].astype(np.int64))
        elif split == "train":
            np.savez(tmp, x=data["x"].astype(np.float32), y=data["y"].astype(np.int64))
        else:
            np.savez(tmp, x=data["x"].astype(np.float32))
        os.replace(tmp, path)
    with np.load(path, allow_pickle=False) as archive:
        return archive["x"], (archive["y"] if "y" in archive.files else None)


# Samples a transfer set may hold: 160 MB of inputs, some minutes to generate (the demo's 40,000 take 30 s).
MNIST1D_MAX_SAMPLES = 1_000_000


def _mnist1d_source(spec: str) -> Source:
    rest = spec[len("mnist1d://"):]
    split, _, query = rest.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if split in ("train", "test"):
        if params:
            raise SoftlabelsError(f"data spec {spec}: mnist1d://{split} takes no parameters")
        x, y = _mnist1d_arrays(split, None, None)
    elif split == "transfer":
        unknown = set(params) - {"n", "seed"}
        if unknown:
            raise SoftlabelsError(f"data spec {spec}: unknown parameter(s) {', '.join(sorted(unknown))} (use n, seed)")
        try:
            n, seed = int(params.get("n", 40000)), int(params.get("seed", 1))
        except ValueError:
            raise SoftlabelsError(f"data spec {spec}: n and seed must be integers") from None
        if not 0 < n <= MNIST1D_MAX_SAMPLES or n % 10:
            raise SoftlabelsError(f"data spec {spec}: n must be a positive multiple of 10 (one share per class) "
                                  f"up to {MNIST1D_MAX_SAMPLES:,}")
        if not 0 <= seed < 2**32:  # what mnist1d's numpy seeding takes
            raise SoftlabelsError(f"data spec {spec}: seed must be an integer from 0 to 2**32 - 1")
        if seed == 42:
            raise SoftlabelsError(f"data spec {spec}: seed 42 generates the standard train/test split; choose another")
        x, y = _mnist1d_arrays(split, n, seed)
        spec = f"mnist1d://transfer?n={n}&seed={seed}"
    else:
        raise SoftlabelsError(f"data spec {spec}: unknown MNIST-1D split '{split}' (use train, test or transfer)")
    return ArraySource(spec, lambda: (x, y))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def data_names_code(spec: str) -> bool:
    """Whether opening ``spec`` could run code: anything but ``mnist1d://`` and a plain array file path.

    What this calls safe is exactly what :func:`open_data` opens without importing anything.
    """
    spec = spec.strip()
    if spec.startswith(("mnist1d://", "text:", "imagefolder:")):  # text, a tokenizer's JSON, images: no code
        return False
    return "://" in spec or bool(_CALLABLE_SPEC.match(spec)) or Path(spec).suffix not in _STORE_SUFFIXES


def open_data(spec: str) -> Source:
    """Open the dataset named by ``spec`` (see the module docstring for the syntax); one without
    samples is refused, since every command would have nothing to do.

    ``spec`` is the user's: a ``module:callable`` is imported and called. A spec read from a file
    goes through :func:`softlabels.trust.check_recorded_spec` with :func:`data_names_code` first.
    """
    source = _open_source(spec)
    if len(source) == 0:
        raise SoftlabelsError(f"dataset {source.spec} is empty")
    return source


def _open_source(spec: str) -> Source:
    if not isinstance(spec, str) or not spec.strip():
        raise SoftlabelsError("empty data spec")
    spec = spec.strip()
    if spec.startswith("mnist1d://"):
        return _mnist1d_source(spec)
    if spec.startswith("text:"):
        from .text import open_text

        return open_text(spec)
    if spec.startswith("imagefolder:"):
        from .images import open_imagefolder

        return open_imagefolder(spec)
    if "://" in spec:
        raise SoftlabelsError(f"data spec {spec}: unknown scheme (the built-in one is mnist1d://)")
    if _CALLABLE_SPEC.match(spec):
        target, _, query = spec.partition("?")
        kwargs = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
        factory = resolve_callable(target, what="dataset")
        try:
            dataset = factory(**kwargs)
        except Exception as exc:
            raise SoftlabelsError(f"dataset {spec} failed to build: {type(exc).__name__}: {exc}") from exc
        return DatasetSource(spec, dataset)
    path = Path(spec)
    if path.suffix in _STORE_SUFFIXES:
        if not path.exists():
            raise MissingData(f"data spec {spec}: no such file or directory")
        if not (path.is_file() or (path.suffix == ".zarr" and path.is_dir())):  # a FIFO would block the reader forever
            raise SoftlabelsError(f"data spec {spec}: not a regular file{' or a folder' if path.suffix == '.zarr' else ''}")
        canonical = str(path.resolve())
        opener = {".npz": _npz_opener, ".zarr": _zarr_opener}.get(path.suffix, _h5_opener)(path.resolve(), spec)
        if "input_ids" in opener():
            from .tokens import TokenSource

            return TokenSource(canonical, opener)
        return ArraySource(canonical, _xy(spec, opener))
    if path.exists():
        raise SoftlabelsError(f"data spec {spec}: unsupported file type (use .npz, .zarr, .h5 or .hdf5)")
    raise SoftlabelsError(
        f"cannot parse data spec '{spec}': expected mnist1d://SPLIT, a .npz/.zarr/.h5 path, imagefolder:PATH, or module:callable"
    )
