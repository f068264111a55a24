"""The cache on disk: a Zarr v3 group (``*.zarr``) or an HDF5 file (``*.h5``/``*.hdf5``), one layout.

Format version 2. A cache holds ``N`` samples; each sample holds the items of the cache's item axes
(none for one target per sample, ``[V]`` recorded views, ``[L]`` tokens), and every array is
``[N, *item_axes, width]``:

==================  ============================  ====================================================
name                shape, dtype                  meaning
==================  ============================  ====================================================
the kind's arrays   ``[N, *items, width]``        e.g. ``logits [N, *items, C]`` for dense; see
                                                  :mod:`softlabels.kinds`
``labels``          ``[N, *items]`` int64         hard labels, ``-1`` where an item has none
``chunk_crc32``     ``[N_chunks]`` int64          zlib CRC-32 of each chunk's arrays in kind order,
                                                  then its labels, then its records in manifest
                                                  order (little-endian, C order); ``-1``
                                                  until the chunk is written: the commit record
``chunk_crc32c``    ``[N_chunks, A]`` uint32      CRC-32C of each chunk of the arrays named by its
                                                  attribute ``arrays``, by chunk: HDF5, of its rows
                                                  of each target array and record; Zarr, each chunk
                                                  file's own crc32c, made at the finish
records             ``[N, *shape]``               optional per-sample records kept beside the
                                                  targets, named ``group/name`` (a view cache's
                                                  augmentation parameters under ``views/``); the
                                                  manifest's ``records`` lists each name, dtype, shape
attribute           JSON object                   the manifest (``format``, ``format_version``,
``softlabels``                                    ``kind`` and its settings, ``item_axes``, ...); in
                                                  HDF5 a JSON string
==================  ============================  ====================================================

Arrays are chunked along samples only (``chunk_rows`` samples with all their items per chunk).
Every chunk also carries the store's own checksum (Zarr's ``crc32c`` codec, HDF5's ``fletcher32``
filter), so a damaged chunk fails when it is read, by softlabels or by plain zarr/h5py. Version-1
caches (no item axes, no per-chunk codec checksum) are read as they are, through the codecs version 1
wrote only, as version 2 is read: softlabels decodes each chunk, its output held to the chunk's size.

A cache is written as ``PATH.partial`` and renamed to ``PATH`` once every chunk is written and the
manifest says ``complete``; a chunk counts as written only once its checksum is recorded, after its
bytes.

Example::

    with open_cache("logits.zarr") as cache:
        targets, labels = cache.read(0, 128)      # {"logits": [128, C]}, [128]
        cache.manifest["teacher"]["sha256"]
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import stat
import threading
import warnings
import dataclasses
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from isal import isal_zlib

from .durable import fsync_all, fsync_directory, fsync_file
from .errors import SoftlabelsError
from .trust import refuse_unpickling
from .kinds import STORE_DTYPES, StoredArray, TargetKind, kind_from_settings

FORMAT = "softlabels-cache"
FORMAT_VERSION = 2
MANIFEST_KEY = "softlabels"
_READ_CHECKSUMS = "chunk_crc32c"  # see _H5Backend.create_read_checksums and _ZarrBackend.finish_read_checksums
PARTIAL_SUFFIX = ".partial"
_MAX_CHUNK_BYTES = 1 << 30  # a reader allocates a chunk's bytes before reading them
_MAX_DEFAULT_CHUNK_ROWS = 4096
_MAX_DEFAULT_CHUNK_INPUT_BYTES = 256 << 20  # the inputs a chunk of the cache matches
_CHECKSUMS_PER_CHUNK = 4096


def backend_name(path: str | Path) -> str:
    """``"zarr"`` or ``"hdf5"``, from the path's suffix (``.partial`` ignored)."""
    name = str(path)
    if name.endswith(PARTIAL_SUFFIX):
        name = name[: -len(PARTIAL_SUFFIX)]
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    raise SoftlabelsError(f"cache path {path} must end in .zarr, .h5 or .hdf5")


def default_chunk_rows(row_bytes: int, path: str | Path, input_row_bytes: int = 0) -> int:
    """Samples per chunk of a cache at ``path``: about its backend's ``chunk_bytes`` of targets (2 MiB
    in Zarr, 0.5 MiB in HDF5), a power of two, at least 16 and at most 4096 samples, and at most
    256 MiB of the inputs they match (``input_row_bytes`` a sample, where the loader reads a window
    of inputs at once).

    The loader reads a window of 8 chunks' rows, inputs included: the caps keep it small when
    targets are small and inputs large (4096 rows of 224x224 images are 2.4 GB in float32).

    Example::

        default_chunk_rows(2000, "train.zarr"), default_chunk_rows(2000, "train.h5")   # (1024, 256)
    """
    target = _backend_type(path).chunk_bytes
    rows = min(target // max(1, row_bytes), _MAX_DEFAULT_CHUNK_INPUT_BYTES // max(1, input_row_bytes))
    return int(min(_MAX_DEFAULT_CHUNK_ROWS, max(16, 2 ** int(np.log2(max(1, rows))))))


def chunk_checksum(targets: dict[str, np.ndarray], labels: np.ndarray, records: dict[str, np.ndarray] | None = None) -> int:
    """CRC-32 of a chunk as stored: each target array's bytes in the kind's order, then the labels'
    bytes, then each record's, all little-endian and C order."""
    crc = 0
    for part in (*targets.values(), np.asarray(labels, dtype="<i8"), *(records or {}).values()):
        # ISA-L's CRC-32 (zlib's value) folds with PCLMULQDQ, 6-17x zlib's; the bytes in place, no copy
        crc = isal_zlib.crc32(_little_endian(part).reshape(-1).view(np.uint8), crc)
    return crc


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def num_chunks(num_samples: int, chunk_rows: int) -> int:
    return -(-num_samples // chunk_rows)


def chunk_bounds(index: int, chunk_rows: int, num_samples: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``index``."""
    start = index * chunk_rows
    return start, min(start + chunk_rows, num_samples)


def directory_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


RECORD_DTYPES = ("uint8", "int32", "int64", "uint64", "float16", "float32", "float64")
_RECORD_NAME = re.compile(r"[a-z][a-z0-9_]*/[A-Za-z0-9_][A-Za-z0-9_.]*")


@dataclass(frozen=True)
class Record:
    """A per-sample array kept beside the targets: ``[N, *shape]`` of ``dtype``, named ``group/name``."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...] = ()

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": np.dtype(self.dtype).name, "shape": list(self.shape)}

    @classmethod
    def from_settings(cls, settings: Any, where: str) -> "Record":
        ok = (isinstance(settings, dict) and set(settings) == {"name", "dtype", "shape"}
              and isinstance(settings["name"], str) and _RECORD_NAME.fullmatch(settings["name"])
              and settings["dtype"] in RECORD_DTYPES and isinstance(settings["shape"], list)
              and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in settings["shape"]))
        if not ok:
            raise SoftlabelsError(f"{where}: a record is {{name: 'group/name', dtype: one of {', '.join(RECORD_DTYPES)}, "
                                  f"shape: [positive ints]}}, got {settings!r}")
        return cls(settings["name"], np.dtype(settings["dtype"]), tuple(settings["shape"]))


@dataclass(frozen=True)
class Layout:
    """What a cache's arrays must be: kind, sizes, dtype, item axes and chunking.

    Example::

        layout = Layout(TopK(k=5), num_samples=1000, num_classes=100, dtype="float16", chunk_rows=256)
        layout.shapes()["topk_logits"]   # ((1000, 5), dtype('float16'))
    """

    kind: TargetKind
    num_samples: int
    num_classes: int
    dtype: str
    chunk_rows: int
    item_axes: tuple[tuple[str, int], ...] = ()
    records: tuple[Record, ...] = ()

    @property
    def items(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.item_axes)

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.num_samples, self.chunk_rows)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        return chunk_bounds(index, self.chunk_rows, self.num_samples)

    def target_arrays(self) -> list[StoredArray]:
        return self.kind.arrays(self.num_classes, self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample's targets (all items and arrays) and records."""
        targets = sum(a.dtype.itemsize * a.width for a in self.target_arrays()) * math.prod(self.items)
        return targets + sum(r.dtype.itemsize * math.prod(r.shape) for r in self.records)

    def check_chunk_bytes(self, where: str) -> None:
        """Refuse chunks of more than 1 GiB in any array: each is read whole, into memory."""
        for name, (shape, dtype) in self.shapes().items():
            size = self.chunk_rows * math.prod(shape[1:]) * dtype.itemsize
            if size > _MAX_CHUNK_BYTES:
                raise SoftlabelsError(f"{where}: a chunk of {self.chunk_rows:,} rows of array '{name}' holds {size:,} bytes, "
                                      f"more than {_MAX_CHUNK_BYTES:,}: use fewer rows per chunk")

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array's shape and dtype."""
        n, items = self.num_samples, self.items
        shapes = {a.name: ((n, *items, a.width), a.dtype) for a in self.target_arrays()}
        shapes["labels"] = ((n, *items), np.dtype(np.int64))
        shapes["chunk_crc32"] = ((self.num_chunks,), np.dtype(np.int64))
        shapes.update({r.name: ((n, *r.shape), np.dtype(r.dtype)) for r in self.records})
        return shapes

    def manifest_fields(self) -> dict[str, Any]:
        return {
            **self.kind.settings(),
            "item_axes": [{"name": name, "size": size} for name, size in self.item_axes],
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "dtype": self.dtype,
            "chunk_rows": self.chunk_rows,
            **({"records": [r.settings() for r in self.records]} if self.records else {}),
        }


class _ZarrBackend:
    # A chunk is a file per array (its targets, labels and records) and a commit record entry, each
    # written, synced and renamed as the teacher runs: 2 MiB chunks made a light teacher's dump cost
    # 1.18-1.26x its forward pass where 0.5 MiB chunks cost 1.32-1.50x (BENCHMARKS.md, "Dump
    # overhead"), and zarr's guide asks for chunks of 1 MB or more.
    chunk_bytes = 2 << 20

    def __init__(self, path: Path, mode: str):
        import zarr

        self.root, self.read_only = path, mode == "r"
        self._arrays: dict[str, Any] | None = None
        self._table: dict[str, list[int]] | None = None  # _places
        self._readers: dict[tuple[str, bool], _ZarrRawChunks] = {}  # raw_reader's, one per array: a writer's know their chunks
        self._commit_files = _check_zarr_files(path) if mode != "w" else 0
        try:
            self.group = zarr.open_group(str(path), mode=mode, zarr_format=3)  # no look at v2's .zgroup, .zattrs, ...
        except Exception as exc:
            raise SoftlabelsError(f"{path} is not a softlabels cache: cannot open it as a Zarr group ({exc})") from exc

    def commit_entries_held(self) -> int:
        """At most how many commit-record entries the cache holds: its chunk files, counted at the
        open, times the entries a file holds (one, as softlabels writes them)."""
        return self._commit_files * self.arrays()["chunk_crc32"].chunks[0]

    def create_array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype, fill: Any, compress: bool) -> Any:
        from zarr.codecs import Crc32cCodec, ZstdCodec

        # crc32c last, over the stored bytes: any zarr reader then refuses a damaged chunk. Every
        # chunk is stored, even one equal to the fill value, so a deleted chunk file is noticed.
        compressors = [ZstdCodec(level=0), Crc32cCodec()] if compress else [Crc32cCodec()]
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=compressors)

    def arrays(self) -> dict[str, Any]:
        if self._arrays is not None:
            return self._arrays
        # The config is per handle, not stored: every handle that writes must ask for empty chunks too.
        try:
            with warnings.catch_warnings():  # a folder that is no array (a user's notes beside them) is not ours to warn of
                warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component of a Zarr hierarchy")
                members = self.group.members(max_depth=None)
        except Exception as exc:  # an array's zarr.json cut short or not JSON
            raise SoftlabelsError(f"{self.root}: its arrays' metadata cannot be read ({' '.join(str(exc).split())})") from None
        arrays = {name: array.with_config({"write_empty_chunks": True}) for name, array in members if hasattr(array, "with_config")}
        if self.read_only:  # listed once: a reader's arrays do not change, and a listing costs a millisecond
            self._arrays = arrays
        return arrays

    def read_manifest(self) -> Any:
        return self.group.attrs.get(MANIFEST_KEY)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.group.attrs[MANIFEST_KEY] = manifest
        fsync_file(self.root / "zarr.json")  # zarr writes it but never syncs it

    def _chunk_file(self, name: str, chunk: int, ndim: int) -> str:
        return _zarr_chunk_file(self.root, name, chunk, ndim)

    def sync(self, chunks: range | None, arrays: dict[str, int] | None = None) -> None:
        """fsync the files of ``chunks`` of ``arrays`` (name -> ndim), one after another: a dump's
        writer thread syncs them beside the teacher, whose cores several at once would take. With
        ``chunks=None``, every directory of the cache and every file but the chunk files of
        ``arrays``, which were synced as they were written (the commit record's chunk files and the
        arrays' metadata are synced here), several at once: a cache of a million chunks is not
        synced twice over, and its finish waits for the disk's journal commits together. Every
        chunk is stored (write_empty_chunks), so a missing file is an error, not a chunk to skip."""
        if chunks is None:
            fsync_all(self._unsynced(arrays or {}))
            return
        for chunk in chunks:
            for name, ndim in (arrays or {}).items():
                fsync_file(self._chunk_file(name, chunk, ndim))

    def _unsynced(self, arrays: dict[str, int]) -> Iterator[tuple[str, bool]]:
        """``(path, is_folder)`` of every folder of the cache and every file but the chunk files of
        ``arrays``, found as the cache is walked."""
        synced = {os.path.join(self.root, name, "c") for name in arrays}
        for folder, _, names in os.walk(self.root):
            if not any(folder == top or folder.startswith(top + os.sep) for top in synced):
                yield from ((os.path.join(folder, name), False) for name in names)
            yield folder, True

    def missing_chunk(self, name: str, chunks: range, ndim: int) -> int | None:
        """The first of ``chunks`` of array ``name`` whose file is gone (zarr would read fill values)."""
        for chunk in chunks:
            if not os.path.isfile(self._chunk_file(name, chunk, ndim)):
                return chunk
        return None

    def create_read_checksums(self, layout: "Layout") -> None:
        pass  # every chunk file carries its own crc32c; their table by place is made at the finish

    def record_read_checksums(self, first: int, chunks: list[dict[str, np.ndarray]]) -> None:
        pass

    def finish_read_checksums(self, layout: "Layout") -> None:
        """Write ``chunk_crc32c [chunks, A]``: the crc32c each chunk file of each array of rows ends
        with (targets, labels, records), by chunk. A chunk file's own crc32c checks its bytes, not
        which chunk they are: a file copied over another chunk's would read as that chunk. Taken
        once every chunk is written: as this writer wrote them, and from the files that another
        rank or an earlier run wrote."""
        names = [*(a.name for a in layout.target_arrays()), "labels", *(r.name for r in layout.records)]
        arrays = self.arrays()
        table = np.empty((layout.num_chunks, len(names)), np.uint32)
        for column, name in enumerate(names):
            reader = self.raw_reader(name, arrays[name])
            table[:, column] = [reader.stored_checksum(chunk) for chunk in range(layout.num_chunks)]
        if _READ_CHECKSUMS in self.group:  # made by a finish that a kill stopped before the cache was published
            del self.group[_READ_CHECKSUMS]
        array = self.create_array(_READ_CHECKSUMS, table.shape, (max(1, min(len(table), 4096)), len(names)), np.dtype(np.uint32),
                                  0, False)
        array.attrs["arrays"] = json.dumps(names)
        array[:] = table

    def _places(self, name: str) -> list[int] | None:
        """``name``'s column of ``chunk_crc32c`` (:meth:`finish_read_checksums`), read and checked once;
        ``None`` where the cache has no such table (a partial cache, or one written before it)."""
        if self._table is None:
            self._table = {}
            array = self.arrays().get(_READ_CHECKSUMS)
            if array is not None:
                names = _read_checksum_names(array, self.arrays(), f"{self.root}: array '{_READ_CHECKSUMS}'")
                reader = _zarr_chunk_reader(self.root, _READ_CHECKSUMS, array, crc=True)
                if reader is None:
                    raise SoftlabelsError(f"{self.root}: array '{_READ_CHECKSUMS}' is not stored as softlabels stores it")
                try:
                    values = reader.read([(0, array.shape[0])])
                except _ChunkDamaged as exc:
                    raise SoftlabelsError(f"{self.root}: array '{_READ_CHECKSUMS}' chunk {exc.chunk} is damaged ({exc})") from None
                # ints, not numpy scalars: one comparison per chunk read, at a Python int's cost
                self._table = {name: values[:, column].tolist() for column, name in enumerate(names)}
        return self._table.get(name)

    def raw_reader(self, name: str, array: Any, checked: bool = True) -> "_ZarrRawChunks":
        """A direct reader of ``array``'s chunk files, which version 2 writes as little-endian bytes,
        zstd-compressed or not, followed by a crc32c, under zarr's default chunk keys; version 1
        (``checked`` false) wrote no crc32c and no chunk equal to the fill value. Any other metadata
        is refused: read through zarr, other chunk keys or codecs would find no chunk files and read
        fill values, or read them unchecked, and zarr decodes any codec chain with no bound on its
        output (a 32 KB zstd frame made 1 GiB)."""
        reader = self._readers.get((name, checked))
        if reader is not None:
            return reader
        reader = _zarr_chunk_reader(self.root, name, array, crc=checked, fill_missing=not checked)
        if reader is None:
            raise SoftlabelsError(f"{self.root}: array '{name}' is not stored as softlabels stores it (codecs bytes, "
                                  f"optionally zstd{', then crc32c' if checked else ''}; chunks of whole rows under zarr's "
                                  "default chunk keys)")
        if checked and self.read_only:
            reader.places = self._places(name)
        self._readers[name, checked] = reader
        return reader

    def close(self) -> None:
        pass


# Chunks up to which the commit record (8 bytes a chunk) is read whole whatever the store holds; past
# them the store must be able to hold what the manifest declares.
_CHUNKS_READ_WHOLE = 1 << 20

# A cache's metadata files are small JSON documents; anything larger is no metadata of ours.
_MAX_METADATA_BYTES = 64 << 20


def _check_zarr_files(root: Path) -> int:
    """Refuse a Zarr cache whose files that zarr-python itself reads (the ``zarr.json`` of the group
    and of every group and array below it, the commit record's chunks) are not regular files of a
    sane size: a FIFO there blocks the reader forever, a link to a device reads without end. A link
    to a folder is refused too, zarr would follow it out of the cache, except an array's chunk
    folder (``c``), which only softlabels reads: the bulk of the chunk files are read directly, each
    checked as it is opened (:func:`_open_chunk_file`). Returns the number of the commit record's
    chunk files."""
    folders = [str(root)]
    while folders:  # zarr's own walk of the hierarchy, without its reads: every folder but an array's chunks
        folder = folders.pop()
        metadata = os.path.join(folder, "zarr.json")
        try:
            info = os.stat(metadata)
        except FileNotFoundError:
            info = None  # zarr says what is missing
        except OSError as exc:
            raise SoftlabelsError(f"{root}: cannot read {metadata}: {exc.strerror}") from None
        if info is not None and (not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_METADATA_BYTES):
            raise SoftlabelsError(f"{root}: {metadata} is not a metadata or chunk file of a cache "
                                  f"({'too large' if stat.S_ISREG(info.st_mode) else 'not a regular file'})")
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise SoftlabelsError(f"{root}: cannot read {folder}: {exc.strerror}") from None
        array = info is not None and folder != str(root) and _is_zarr_array(metadata)
        for entry in entries:
            chunks = array and entry.name == "c"  # read by softlabels alone, each file checked as it is opened
            if entry.is_symlink() and os.path.isdir(entry.path) and not chunks:
                raise SoftlabelsError(f"{root}: {entry.path} is a link to a folder, which no cache holds")
            if entry.is_dir(follow_symlinks=False) and not chunks:
                folders.append(entry.path)
    return _check_chunk_files(os.path.join(root, "chunk_crc32", "c"), root)


def _is_zarr_array(metadata: str) -> bool:
    """Whether the (checked, regular) ``zarr.json`` at ``metadata`` describes an array, whose ``c``
    folder holds its chunks rather than members; what cannot be parsed is left to zarr to refuse."""
    try:
        with open(metadata, "rb") as f:
            return json.load(f).get("node_type") == "array"
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def _check_chunk_files(folder: str, root: Path) -> int:
    """Refuse anything but regular files and folders under ``folder`` (if it exists); return how
    many files it holds. A directory entry says what a file is without a ``stat`` call (one per
    chunk would cost a large cache's every open); a link is followed."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise SoftlabelsError(f"{root}: cannot read {folder}: {exc.strerror}") from None
    files = 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            files += _check_chunk_files(entry.path, root)
            continue
        try:
            regular = entry.is_file()
        except OSError as exc:
            raise SoftlabelsError(f"{root}: cannot read {entry.path}: {exc.strerror}") from None
        if not regular and os.path.exists(entry.path):  # a dangling link is missing: zarr says so
            raise SoftlabelsError(f"{root}: {entry.path} is not a metadata or chunk file of a cache (not a regular file)")
        files += regular
    return files


class _ChunkDamaged(Exception):
    def __init__(self, chunk: int, why: str):
        super().__init__(why)
        self.chunk = chunk


class _H5Backend:
    # A chunk is an entry of the file's chunk index, so larger chunks save the dump little, and a
    # chunk larger than h5py's default chunk cache (1 MiB) is read whole from the file for every row
    # a plain h5py reader takes from it (3x fewer rows/s at 2 MiB, BENCHMARKS.md).
    chunk_bytes = 512 << 10

    def __init__(self, path: Path, mode: str):
        import h5py

        if path.exists() and not path.is_file():  # a FIFO would block h5py forever
            raise SoftlabelsError(f"{path} is not a softlabels cache: not a regular file")
        try:
            self.file = h5py.File(path, mode)
        except Exception as exc:
            raise SoftlabelsError(f"{path} is not a softlabels cache: cannot open it as HDF5 ({exc})") from exc
        self.path = path
        if mode != "w":
            try:
                self._check_storage()
            except BaseException:
                self.file.close()
                raise

    def _check_storage(self) -> None:
        """Refuse what would make h5py read outside this file: a link (external, which opens another
        file, or soft), a dataset stored in external files or made of other files' (virtual). A FIFO
        named by any of them would block the reader forever, and someone else's file would be read
        as a record."""
        import h5py

        def refused(name: str, link: Any) -> str | None:  # a value stops the visit: raising inside it is not safe
            if not isinstance(link, h5py.HardLink):
                return f"'{name}' is a {type(link).__name__}, which no cache holds"
            node = self.file.get(name)
            if isinstance(node, h5py.Dataset) and (node.is_virtual or node.external):
                return f"array '{name}' is stored {'virtual' if node.is_virtual else 'in external files'}, which no cache is"
            return None
        found = self.file.visititems_links(refused)
        if found is not None:
            raise SoftlabelsError(f"{self.path}: {found}")

    def commit_entries_held(self) -> int:
        """At most how many commit-record entries the file holds: 8 bytes each, stored raw."""
        return os.path.getsize(self.path) // 8

    def create_array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype, fill: Any, compress: bool) -> Any:
        # gzip is the filter every HDF5 reader has; LZF (h5py's own) is faster but needs h5py to read.
        compression = ("gzip" if np.issubdtype(dtype, np.floating) else "lzf") if compress else None
        return self.file.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill,
                                        compression=compression, fletcher32=True)

    def arrays(self) -> dict[str, Any]:
        import h5py

        found: dict[str, Any] = {}

        def add(name: str, obj: Any) -> None:  # returning a value would stop the visit
            if isinstance(obj, h5py.Dataset):
                found[name] = obj
        self.file.visititems(add)
        return found

    def read_manifest(self) -> Any:
        raw = self.file.attrs.get(MANIFEST_KEY)
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if not isinstance(raw, str):
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SoftlabelsError(f"{self.path}: its '{MANIFEST_KEY}' manifest is damaged: not valid JSON "
                                  f"({exc.msg} at character {exc.pos})") from None
        except RecursionError:
            raise SoftlabelsError(f"{self.path}: its '{MANIFEST_KEY}' manifest is damaged: nested deeper than "
                                  "JSON that Python reads") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)
        self.sync(None)

    def sync(self, chunks: range | None, arrays: dict[str, int] | None = None) -> None:
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())

    def missing_chunk(self, name: str, chunks: range, ndim: int) -> int | None:
        """The first of ``chunks`` of array ``name`` the file does not store: h5py would read its
        fill values, which no checksum of a stored chunk covers."""
        array = self.file[name]
        for chunk in chunks:
            if array.id.get_chunk_info_by_coord((chunk * array.chunks[0], *[0] * (ndim - 1))).byte_offset is None:
                return chunk
        return None

    def create_read_checksums(self, layout: "Layout") -> None:
        """A table of the CRC-32C of each target array's and record's rows per chunk. h5py checks
        fletcher32 at under half its unfiltered read speed; softlabels reads uncompressed chunks raw
        and checks this table instead, at hardware CRC speed (plain h5py readers still get fletcher32)."""
        names = [a.name for a in layout.target_arrays()] + [r.name for r in layout.records]
        shape = (layout.num_chunks, len(names))
        table = self.file.create_dataset(_READ_CHECKSUMS, shape=shape, chunks=(max(1, min(shape[0], 4096)), len(names)),
                                         dtype="uint32", fletcher32=True)
        table.attrs["arrays"] = json.dumps(names)

    def record_read_checksums(self, first: int, chunks: list[dict[str, np.ndarray]]) -> None:
        table = self.file.get(_READ_CHECKSUMS)
        if table is None:  # a file without the table is read through h5py, fletcher32 checked
            return
        names = json.loads(table.attrs["arrays"])  # this writer's own table
        table[first:first + len(chunks)] = [
            [_crc32c(_little_endian(chunk[name])) for name in names]
            for chunk in chunks
        ]

    def raw_reader(self, name: str, array: Any, checked: bool = True) -> "_H5RawChunks | None":
        """A direct reader of a compressed array (:class:`_H5FilteredChunks`), or of an uncompressed
        target array whose chunks the read-checksum table covers; ``None`` (h5py with fletcher32, or
        version 1: ``checked`` false) otherwise. An array of rows without fletcher32 is refused in
        version 2: h5py would read it unchecked. (The commit record needs none: its entries are
        checksums, which damage makes disagree with the chunks they describe.)"""
        if checked and name != "chunk_crc32" and not array.fletcher32:
            raise SoftlabelsError(f"{self.file.filename}: array '{name}' is stored without HDF5's fletcher32 checksum, "
                                  "which every chunk of a cache's rows carries")
        codec, fletcher = self._filters(name, array)
        table, column = self._read_checksums(name) if checked and fletcher else (None, -1)
        fd = self.file.id.get_vfd_handle() if self.file.mode == "r" else None
        if codec is not None:
            return _H5FilteredChunks(array, codec, fletcher, table, column, fd=fd)
        if table is None or array.chunks is None:
            return None
        return _H5RawChunks(array, table, column, fd=fd)

    def _read_checksums(self, name: str) -> tuple[Any, int]:
        """The read-checksum table and ``name``'s column in it, ``(None, -1)`` where it has none. A
        reader gets the table's values (it never changes: one read, not a small h5py read per chunk),
        a writer the array it adds to."""
        table = self.file.get(_READ_CHECKSUMS)
        if table is None:
            return None, -1
        self._filters(_READ_CHECKSUMS, table)  # read through h5py below
        names = _read_checksum_names(table, self.arrays(), f"{self.file.filename}: array '{_READ_CHECKSUMS}'")
        if name not in names:
            return None, -1
        if self.file.mode != "r":
            return table, names.index(name)
        try:
            return np.asarray(table[:]), names.index(name)
        except OSError as exc:  # its fletcher32 failed
            raise SoftlabelsError(f"{self.file.filename}: array '{_READ_CHECKSUMS}' is damaged ({exc})") from None

    def _filters(self, name: str, array: Any) -> tuple[int | None, bool]:
        """``array``'s compression filter (gzip or LZF, or ``None``) and whether fletcher32 follows
        it: the pipelines softlabels writes. Any other is refused: h5py's filters grow their output
        for as long as a stream goes on (a 1 MB gzip chunk made 1 GiB), and the commit record and
        read-checksum table, read through h5py, must not be compressed at all."""
        import h5py

        plist = array.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        fletcher = filters[-1:] == [h5py.h5z.FILTER_FLETCHER32]
        codec = filters[:-1] if fletcher else filters
        codecs = [[]] if name in ("chunk_crc32", _READ_CHECKSUMS) else [[], [h5py.h5z.FILTER_DEFLATE], [h5py.h5z.FILTER_LZF]]
        if codec not in codecs:
            raise SoftlabelsError(f"{self.file.filename}: array '{name}' is stored through HDF5 filters {filters}, not the "
                                  f"pipelines softlabels writes ({'none' if len(codecs) == 1 else 'gzip (1) or LZF (32000)'}, "
                                  "then fletcher32 (3))")
        return (codec[0] if codec else None), fletcher

    def finish_read_checksums(self, layout: "Layout") -> None:
        pass  # kept as each chunk is written (record_read_checksums)

    def close(self) -> None:
        self.file.close()


def _read_checksum_names(table: Any, arrays: dict[str, Any], where: str) -> list[str]:
    """The arrays a read-checksum table (``chunk_crc32c``) covers, one column each, checked against
    its shape."""
    try:
        names = json.loads(table.attrs["arrays"])
    except (KeyError, TypeError, ValueError, RecursionError):
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n in arrays for n in names) and len(set(names)) == len(names)):
        raise SoftlabelsError(f"{where}: its attribute 'arrays' is not a list of distinct names of the cache's arrays")
    chunks = {-(-a.shape[0] // a.chunks[0]) for n, a in arrays.items() if n in names and a.chunks and a.shape}
    if np.dtype(table.dtype) != np.uint32 or table.ndim != 2 or table.shape[1] != len(names) or chunks != {table.shape[0]}:
        raise SoftlabelsError(f"{where} is {table.dtype} {list(table.shape)}, not uint32 [chunks, {len(names)}] "
                              "for the arrays it covers")
    return names


class _RawChunks:
    """Reads rows of an uncompressed chunked array chunk by chunk, as the stored bytes (each chunk is
    stored whole, a partial last chunk padded), into one buffer with no further copy, and checks each
    chunk's checksum: the check zarr or h5py would make, without their per-chunk pipeline overhead.
    Subclasses say where a chunk's bytes and checksum are."""

    trailer = 0  # bytes a chunk's read writes past its values (HDF5's fletcher32)

    def __init__(self, dtype: np.dtype, chunk_shape: tuple[int, ...], shape: tuple[int, ...]):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_shape, self.shape = chunk_shape, shape
        self.chunk_bytes = self.dtype.itemsize * math.prod(chunk_shape)

    def nbytes(self, ranges: list[tuple[int, int]]) -> int:
        """The size of the buffer :meth:`read` fills for ``ranges``."""
        rows = self.chunk_shape[0]
        # a single range is read from its first chunk's start; a whole chunk's trailer lands after its values
        return (sum(stop - start for start, stop in ranges) + ranges[0][0] % rows) * (self.chunk_bytes // rows) + self.trailer

    def read(self, ranges: list[tuple[int, int]], buffer: np.ndarray | None = None, order: np.ndarray | None = None) -> np.ndarray:
        """The rows of ``ranges`` one after another, each chunk read straight to its place and checked
        while its bytes are still in this core's cache: a window of shuffled blocks needs no join.
        Ranges start at a chunk boundary, except a single range. The rows are read into ``buffer``
        (uint8, at least :meth:`nbytes` long) when given: a new one costs a page fault per 4 KiB.

        Given ``order``, a permutation of the rows read, row ``i`` of the reading lands at row
        ``order[i]`` of the result: each chunk is read and checked piece by piece in one reused
        buffer of a chunk's size, and its rows are put at their places from there. A shuffled window
        read so needs no gather of its batches' rows later, which would read each byte from memory
        once more."""
        rows = self.chunk_shape[0]
        if len(ranges) == 1 and ranges[0][0] % rows:  # from its chunk's start, the leading rows cut off
            if order is not None:
                raise ValueError("rows are put in another order only when read from chunk boundaries")
            start, stop = ranges[0]
            return self.read([(start - start % rows, stop)], buffer)[start % rows:]
        row_bytes = self.chunk_bytes // rows
        total = sum(stop - start for start, stop in ranges) * row_bytes
        need = self.nbytes(ranges)
        buffer = np.empty(need, np.uint8) if buffer is None else buffer[:need]
        out = buffer[:total].view(self.dtype).reshape(-1, *self.chunk_shape[1:])
        scratch = None
        at = 0
        for start, stop in ranges:
            if start % rows:
                raise ValueError(f"range {start}..{stop} does not start at a chunk boundary")
            for chunk in range(start // rows, -(-stop // rows)):
                taken = (min(stop, (chunk + 1) * rows) - chunk * rows) * row_bytes
                if taken == self.chunk_bytes and order is None:
                    _check(chunk, self.read_chunk(chunk, buffer[at:at + taken + self.trailer]))
                else:  # a chunk read in part (its padding or cut rows must not land on the next chunk's), or placed row by row
                    scratch = np.empty(self.chunk_bytes + self.trailer, np.uint8) if scratch is None else scratch
                    _check(chunk, self.read_chunk(chunk, scratch))
                    if order is None:
                        buffer[at:at + taken] = scratch[:taken]
                    else:
                        places = order[at // row_bytes:(at + taken) // row_bytes]
                        out[places] = scratch[:taken].view(self.dtype).reshape(-1, *self.chunk_shape[1:])
                at += taken
        return out

    def read_chunk(self, chunk: int, into: np.ndarray) -> tuple[int, int] | None:
        """Read chunk ``chunk``'s stored bytes into ``into`` (its values, then :attr:`trailer` bytes);
        return the CRC-32C of its values as read and the recorded one, or ``None`` when the chunk was
        checked already or carries none. Raise ``_ChunkDamaged`` if the stored chunk is not whole."""
        raise NotImplementedError


def _check(chunk: int, check: tuple[int, int] | None) -> None:
    """Raise if a chunk's computed CRC-32C (``check[0]``) is not its recorded one (``check[1]``)."""
    if check is not None and check[0] != check[1]:
        raise _ChunkDamaged(chunk, "its crc32c does not match its bytes")


def _crc32c(data: Any, previous: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer), continuing ``previous``: the CRC of the bytes before it."""
    return _crc32c_function()(data, previous)


# A chunk is read and checked this many bytes at a time: a piece's CRC-32C then reads it from the core's
# L2 cache, where the kernel's copy just put it. A whole 512 KiB chunk had partly left it by then, and
# its check took longer (bench_checksums.py compares the two).
_PIECE_BYTES = 256 * 1024


def _read_checked(read_into: Callable[[memoryview, int], int], into: np.ndarray, covered: int) -> tuple[int, int]:
    """Fill ``into`` piece by piece, ``read_into(view, offset)`` reading each piece and returning how
    many bytes it read (fewer only at the end of a file), and take the CRC-32C of the first
    ``covered`` bytes piece by piece right after each read. Returns the bytes read and the CRC."""
    view = memoryview(into)
    got = crc = 0
    while got < len(view):
        count = read_into(view[got:got + _PIECE_BYTES], got)
        if count <= 0:
            break
        if got < covered:
            crc = _crc32c(view[got:min(got + count, covered)], crc)
        got += count
    return got, crc


@functools.cache
def _crc32c_function() -> Callable[[Any], int]:
    # aws-checksums folds with VPCLMULQDQ where the CPU has it: 3x the crc32c package on bytes still
    # in the core's cache, where the loader checks them. Imported on first use (70 ms) and only then:
    # an import statement run per chunk cost the loader a third as much as the CRC itself.
    from awscrt.checksums import crc32c

    return crc32c


_ZSTD = threading.local()  # a zstandard decompressor holds state: one per thread that reads


def _zstd_decode(frame: np.ndarray, into: np.ndarray) -> None:
    """Decode the zstd frame ``frame`` into ``into``, raising unless it fills it exactly. zstandard
    decodes a chunk of 256 labels in a third of the time numcodecs' codec takes (4.5 against 15
    microseconds a frame): about 7% of a dense cache's Zarr loader epoch at batch 256."""
    decompressor = getattr(_ZSTD, "decompressor", None)
    if decompressor is None:
        import zstandard

        decompressor = _ZSTD.decompressor = zstandard.ZstdDecompressor()
    data = decompressor.decompress(frame, max_output_size=len(into), allow_extra_data=False)  # zarr refuses bytes after it too
    if len(data) != len(into):
        raise ValueError(f"it decodes to {len(data)} bytes")
    into[:] = np.frombuffer(data, np.uint8)


def _open_chunk_file(path: str, chunk: int) -> io.FileIO:
    """A chunk file opened for reading, which must be a regular file: a pipe or a device in a cache
    (which may come from anyone) would block the reader or never end."""
    try:
        f = io.FileIO(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:  # a link that loops, a file without read permission
        raise _ChunkDamaged(chunk, f"its chunk file cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise _ChunkDamaged(chunk, "its chunk file is not a regular file")
    return f


def _zarr_chunk_file(root: str | Path, name: str, chunk: int, ndim: int) -> str:
    # Chunked along the first axis only, so every other chunk coordinate is 0. A string, not a
    # Path: the loader opens one file per chunk, and pathlib would cost more than a small read.
    return f"{root}{os.sep}{name}{os.sep}c{os.sep}{chunk}" + f"{os.sep}0" * (ndim - 1)


def _zarr_chunk_reader(root: str | Path, name: str, array: Any, *, crc: bool | None,
                       fill_missing: bool = False) -> "_ZarrRawChunks | None":
    """A direct reader of the Zarr v3 array ``root/name`` when its chunk files can be read without
    zarr: chunked along the first axis only, default chunk keys, codecs ``bytes`` (little-endian),
    then ``zstd`` or not, then ``crc32c`` (required with ``crc=True``, either way with ``None``).
    Else ``None``. With ``fill_missing`` a chunk without a file reads as the fill value, as zarr
    reads it (a dataset); otherwise it is damaged (a cache stores every chunk)."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or type(meta.chunk_key_encoding).__name__ != "DefaultChunkKeyEncoding":
        return None
    codecs = [type(codec).__name__ for codec in meta.codecs]
    checked = codecs[-1:] == ["Crc32cCodec"]
    codecs = codecs[:-1] if checked else codecs
    reader = {("BytesCodec",): _ZarrRawChunks, ("BytesCodec", "ZstdCodec"): _ZarrZstdChunks}.get(tuple(codecs))
    endian = getattr(getattr(meta.codecs[0], "endian", None), "value", None)
    chunk_shape = tuple(getattr(meta.chunk_grid, "chunk_shape", ()))
    if (reader is None or (crc is not None and checked != crc) or (endian != "little" and np.dtype(array.dtype).itemsize > 1)
            or getattr(meta.chunk_key_encoding, "separator", None) != "/" or not array.shape
            or len(chunk_shape) != len(array.shape) or chunk_shape[1:] != tuple(array.shape[1:]) or not math.prod(array.shape)):
        return None
    return reader(root, name, array, chunk_shape, crc=checked, fill_missing=fill_missing)


class _ZarrRawChunks(_RawChunks):
    """A Zarr v3 array whose codecs are ``bytes`` (little-endian) then ``crc32c`` (or no checksum, a
    dataset's): each chunk file is the chunk's values followed by their CRC-32C."""

    def __init__(self, root: str | Path, name: str, array: Any, chunk_shape: tuple[int, ...], *, crc: bool = True,
                 fill_missing: bool = False):
        super().__init__(np.dtype(array.dtype), chunk_shape, tuple(array.shape))
        self.root, self.name, self.fill = root, name, array.fill_value
        self.crc, self.fill_missing = crc, fill_missing
        self.places: list[int] | None = None  # the crc32c each chunk's file ends with, by chunk (chunk_crc32c)
        self._trailers: dict[int, int] = {}  # the crc32c each chunk file that write wrote ends with
        self._folders: set[str] = set()  # made by write already: a mkdir that finds one costs a syscall per chunk

    def _file(self, chunk: int) -> str:
        return _zarr_chunk_file(self.root, self.name, chunk, len(self.shape))

    def _missing(self, chunk: int, into: np.ndarray) -> None:
        """A chunk without a file: its fill values for a dataset, damage in a cache."""
        if not self.fill_missing:
            raise _ChunkDamaged(chunk, "its chunk file is missing")
        into.view(self.dtype)[:] = self.fill

    def write(self, start: int, values: np.ndarray) -> None:
        """Store rows ``start..start + len(values)`` (whole chunks from a chunk boundary; the array's
        short last chunk padded with the fill value) as zarr would: each chunk file its little-endian
        bytes, then their CRC-32C if the array has one. zarr-python's pipeline costs about ten times the
        write itself."""
        rows = self.chunk_shape[0]
        values = np.ascontiguousarray(values, dtype=self.dtype)
        for at in range(0, len(values), rows):
            part = values[at:at + rows]
            if len(part) < rows:
                part = np.concatenate([part, np.full((rows - len(part), *part.shape[1:]), self.fill, self.dtype)])
            data = self.encode(part.reshape(-1).view(np.uint8))
            path = self._file((start + at) // rows)
            folder = os.path.dirname(path)
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            # Through a temporary file, as zarr does: another rank reading the chunk sees it whole or not at all.
            temporary = f"{path}.{os.getpid()}.partial"
            with open(temporary, "wb") as f:
                f.write(data)
                if self.crc:
                    trailer = self._trailers[(start + at) // rows] = _crc32c(data)
                    f.write(trailer.to_bytes(4, "little"))
            os.replace(temporary, path)

    def encode(self, data: np.ndarray) -> np.ndarray:
        """A chunk's bytes as stored before their CRC-32C."""
        return data

    def read_written(self, torn_unwritten: bool = True) -> np.ndarray:
        """Every value written so far (a partial cache's commit record): the fill value in a chunk
        whose file is not there yet, or not whole (cut short or failing its CRC-32C: torn by a crash
        before it reached the disk), which is then no commit; without ``torn_unwritten`` such a chunk
        raises instead (a reader's view: a finished cache's record tears only by damage). One small
        read per chunk file: zarr-python takes about 0.3 ms per chunk, which for a dump's commit
        record was most of its fixed cost. The files there are found by listing the chunk folder
        once, not by asking after every chunk the array declares (seconds for millions of them)."""
        rows = self.chunk_shape[0]
        out = np.full(num_chunks(self.shape[0], rows) * rows, self.fill, self.dtype)
        raw = out.view(np.uint8).reshape(-1, self.chunk_bytes)
        for chunk in self._chunks_present(len(raw)):
            if os.path.exists(self._file(chunk)):
                try:
                    _check(chunk, self.read_chunk(chunk, raw[chunk]))
                except _ChunkDamaged:
                    if not torn_unwritten:
                        raise
                    out[chunk * rows:(chunk + 1) * rows] = self.fill
        return out[:self.shape[0]]

    def _chunks_present(self, count: int) -> list[int]:
        """The chunks, of the first ``count``, that have a file or folder in the chunk folder, in order
        (a name zarr would not write for a chunk, such as ``07``, is no chunk)."""
        try:
            names = os.listdir(os.path.join(self.root, self.name, "c"))
        except FileNotFoundError:
            return []
        return sorted(int(name) for name in names if name.isdecimal() and name == str(int(name)) and int(name) < count)

    def read_chunk(self, chunk: int, into: np.ndarray) -> tuple[int, int] | None:
        trailer = 4 if self.crc else 0
        try:
            with _open_chunk_file(self._file(chunk), chunk) as f:
                if self.crc:
                    got, computed = _read_checked(lambda view, at: f.readinto(view), into, len(into))
                else:
                    got = f.readinto(memoryview(into))
                crc = f.read(trailer + 1)
        except FileNotFoundError:
            return self._missing(chunk, into)
        if got != len(into) or len(crc) != trailer:
            more = "more than " if len(crc) > trailer else ""
            raise _ChunkDamaged(chunk, f"its chunk file has {more}{got + len(crc)} bytes, not {len(into) + trailer}")
        return (computed, self._placed(chunk, int.from_bytes(crc, "little"))) if self.crc else None

    def _placed(self, chunk: int, trailer: int) -> int:
        """The crc32c a chunk file ends with, refused unless it is the one recorded for the chunk
        (where the cache has the table): a file copied over another chunk's passes its own check."""
        if self.places is not None and trailer != self.places[chunk]:
            raise _ChunkDamaged(chunk, "its chunk file is not the one written for it (its crc32c is not the one "
                                f"recorded in {_READ_CHECKSUMS})")
        return trailer

    def stored_checksum(self, chunk: int) -> int:
        """The crc32c chunk ``chunk``'s file ends with: as :meth:`write` wrote it, or read alone."""
        if chunk in self._trailers:
            return self._trailers[chunk]
        with _open_chunk_file(self._file(chunk), chunk) as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")


class _ZarrZstdChunks(_ZarrRawChunks):
    """A Zarr v3 array whose codecs are ``bytes``, ``zstd`` then ``crc32c`` (labels and class indices;
    or no checksum, a dataset's): each chunk file is a zstd frame followed by its CRC-32C, checked
    before the frame is decoded and copied into place. zarr-python would spend about a millisecond per
    call on the same small chunks."""

    def __init__(self, root: str | Path, name: str, array: Any, chunk_shape: tuple[int, ...], *, crc: bool = True,
                 fill_missing: bool = False):
        super().__init__(root, name, array, chunk_shape, crc=crc, fill_missing=fill_missing)
        from numcodecs import Zstd

        zstd = array.metadata.codecs[1]
        self.encoder = Zstd(level=zstd.level, checksum=zstd.checksum)  # made once, not per chunk written

    def encode(self, data: np.ndarray) -> np.ndarray:
        return np.frombuffer(self.encoder.encode(data), np.uint8)

    def read_chunk(self, chunk: int, into: np.ndarray) -> None:
        try:
            with _open_chunk_file(self._file(chunk), chunk) as f:
                # zstd's worst case is a little over the data it holds; a longer file is no chunk of ours
                stored = np.frombuffer(f.read(_most_compressed(len(into))), np.uint8)
                if f.read(1):
                    raise _ChunkDamaged(chunk, "its chunk file is longer than any zstd frame of the chunk")
        except FileNotFoundError:
            return self._missing(chunk, into)
        if self.crc:
            if len(stored) < 4:
                raise _ChunkDamaged(chunk, f"its chunk file has {len(stored)} bytes")
            _check(chunk, (_crc32c(stored[:-4]), self._placed(chunk, int.from_bytes(stored[-4:].tobytes(), "little"))))
            stored = stored[:-4]
        declared = _zstd_content_size(stored)
        if declared != len(into):  # zstd then holds the frame to it: decoding checks the size it makes
            raise _ChunkDamaged(chunk, f"its zstd frame declares {declared} bytes, not {len(into)}")
        try:
            _zstd_decode(stored, into)
        except Exception as exc:  # a frame that passed its checksum yet does not decode to a chunk
            raise _ChunkDamaged(chunk, f"its zstd frame does not decode to {len(into)} bytes: {exc}") from None
        return None


def _zstd_content_size(frame: np.ndarray) -> int | None:
    """The decoded size a zstd frame's header declares (RFC 8878, section 3.1.1.1), ``None`` if it is
    no zstd frame or declares none. Decoding into a chunk's buffer would not say how much it filled.

    Example::

        _zstd_content_size(np.frombuffer(numcodecs.Zstd().encode(np.zeros(8, np.int64)), np.uint8))   # 64
    """
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    single_segment = (descriptor >> 5) & 1
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]  # after the window and dictionary fields
    size = (single_segment, 2, 4, 8)[descriptor >> 6]
    if size == 0 or len(head) < at + size:
        return None
    value = int.from_bytes(head[at:at + size], "little")
    return value + 256 if size == 2 else value


class ZarrRows:
    """A Zarr v3 array whose row slices are read straight from its chunk files, checked where they
    carry a crc32c; anything else is handed to the array. zarr-python spends about a millisecond per
    call, which for a dataset's inputs read beside a cache's chunks was a fifth of the loader's time.

    Example::

        x = ZarrRows.wrap("data.zarr", "x", zarr.open_group("data.zarr", mode="r")["x"])
        x[0:100]   # the same values as the zarr array's
    """

    def __init__(self, array: Any, reader: _ZarrRawChunks, where: str):
        self.array, self.reader, self.where = array, reader, where

    @classmethod
    def wrap(cls, root: str | Path, name: str, array: Any) -> Any:
        """``array`` read directly where its layout allows it (see :func:`_zarr_chunk_reader`), else itself."""
        reader = _zarr_chunk_reader(root, name, array, crc=None, fill_missing=True)
        return array if reader is None else cls(array, reader, f"{root}{os.sep}{name}")

    def __getitem__(self, key: Any) -> Any:
        if not (isinstance(key, slice) and key.step in (None, 1)):
            return self.array[key]
        start, stop, _ = key.indices(self.array.shape[0])
        if stop <= start:
            return self.array[key]
        try:
            return self.reader.read([(start, stop)])
        except _ChunkDamaged as exc:
            rows = self.reader.chunk_shape[0]
            last = min((exc.chunk + 1) * rows, self.array.shape[0]) - 1
            raise SoftlabelsError(f"{self.where}: chunk {exc.chunk} (rows {exc.chunk * rows}-{last}) is damaged ({exc})") from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("array", "reader", "where"):  # never the array's: copy and pickle probe these
            raise AttributeError(name)
        return getattr(self.array, name)


class _H5RawChunks(_RawChunks):
    """An uncompressed HDF5 dataset whose chunks are read as stored (their fletcher32 trailer left
    unchecked), each chunk's rows checked against the CRC-32C the writer put in the read-checksum
    table. The stored bytes are taken as little-endian: ``validate_manifest`` admits only the
    native (little-endian) dtypes the writer uses.

    Given the file's descriptor ``fd`` (a file opened only for reading), a chunk is read at the
    offset HDF5's chunk index gives, with the GIL released; otherwise with ``read_direct_chunk``,
    which sees what the writer's HDF5 cache has not yet flushed."""

    trailer = 4

    def __init__(self, array: Any, table: Any, column: int, fd: int | None = None):
        super().__init__(np.dtype(array.dtype), tuple(array.chunks), tuple(array.shape))
        self.array, self.table, self.column, self.fd = array, table, column, fd
        self._index: np.ndarray | None = None  # per chunk: byte offset, stored size, filter mask (-1: absent)

    def _coordinates(self, chunk: int) -> tuple[int, ...]:
        """Where chunk ``chunk`` starts in the array, as HDF5 indexes its chunks."""
        return (chunk * self.chunk_shape[0], *([0] * (len(self.chunk_shape) - 1)))

    def _covered(self, chunk: int) -> int:
        """The bytes of chunk ``chunk`` the read-checksum table covers: the writer summed the rows in
        the array only, not a short last chunk's padding."""
        rows = min(self.chunk_shape[0], self.shape[0] - chunk * self.chunk_shape[0])
        return rows * self.chunk_bytes // self.chunk_shape[0]

    def read_chunk(self, chunk: int, into: np.ndarray) -> tuple[int, int]:
        offset, covered = self._coordinates(chunk), self._covered(chunk)
        computed = None
        try:
            if self.fd is None:
                mask, stored = self.array.id.read_direct_chunk(offset, out=into)
                size = len(stored)
            else:
                where, size, mask = (int(v) for v in self._chunk_index()[chunk])
                if where < 0:
                    raise _ChunkDamaged(chunk, "the file does not have it")
                if size == len(into):
                    got, computed = _read_checked(lambda view, at: os.preadv(self.fd, [view], where + at), into, covered)
                    if got != size:
                        raise _ChunkDamaged(chunk, "the file ends inside it")
        except _ChunkDamaged:
            raise
        except Exception as exc:  # e.g. a chunk the file does not have
            raise _ChunkDamaged(chunk, f"unreadable: {exc}") from None
        if mask != 0 or size != len(into):  # the values and the fletcher32 trailer
            raise _ChunkDamaged(chunk, f"its stored chunk has {size} bytes, not {len(into)}")
        if computed is None:
            computed = _crc32c(into[:covered])
        return computed, int(self.table[chunk, self.column])

    def _chunk_index(self) -> np.ndarray:
        """Where each chunk is stored, read from HDF5's chunk index in one pass on first use (a lookup
        per chunk would cost about as much as reading it from the page cache)."""
        if self._index is None:
            rows, count = self.chunk_shape[0], -(-self.shape[0] // self.chunk_shape[0])
            index = np.full((count, 3), -1, np.int64)

            def note(info: Any) -> None:
                first, *rest = info.chunk_offset
                if first % rows == 0 and 0 <= first // rows < count and not any(rest):  # else it is no chunk of ours
                    index[first // rows] = (info.byte_offset, info.size, info.filter_mask)
            self.array.id.chunk_iter(note)
            self._index = index
        return self._index



class _H5FilteredChunks(_H5RawChunks):
    """An HDF5 dataset whose chunks go through the compression softlabels writes (gzip for floats,
    LZF for integers), then fletcher32 (version 2; version 1 stored none). Each chunk's stored bytes
    are read as they are and decoded here into exactly the chunk's bytes: h5py's filters grow their
    output for as long as a stream goes on, so a 1 MB gzip chunk of a shared cache made 1 GiB. A
    chunk its compression would not shrink is stored as it is, which its filter mask says
    (compression is an optional filter).

    The check: the CRC-32C of the decoded rows against the read-checksum table's ``column`` where
    the table covers the array (targets and records, at hardware CRC speed), else fletcher32 of the
    stored bytes (labels; computed here at about 0.5 GB/s)."""

    trailer = 0

    def __init__(self, array: Any, codec: int, fletcher: bool, table: Any = None, column: int = -1, fd: int | None = None):
        import h5py

        super().__init__(array, table, column, fd)
        self.codec = "gzip" if codec == h5py.h5z.FILTER_DEFLATE else "LZF"
        self.decode = _inflate if codec == h5py.h5z.FILTER_DEFLATE else _lzf_decode
        self.fletcher = fletcher

    def read_chunk(self, chunk: int, into: np.ndarray) -> tuple[int, int] | None:
        most = _most_compressed(len(into)) + 4 * self.fletcher  # what compressing a chunk can make
        try:
            if self.fd is None:
                mask, data = self.array.id.read_direct_chunk(self._coordinates(chunk))
                size = len(data)
            else:
                where, size, mask = (int(v) for v in self._chunk_index()[chunk])
                if where < 0:
                    raise _ChunkDamaged(chunk, "the file does not have it")
                data = os.pread(self.fd, size, where) if size <= most else b""
                if len(data) != size and size <= most:
                    raise _ChunkDamaged(chunk, "the file ends inside it")
        except _ChunkDamaged:
            raise
        except Exception as exc:  # e.g. a chunk the file does not have
            raise _ChunkDamaged(chunk, f"unreadable: {exc}") from None
        if size > most or mask not in (0, 1):
            raise _ChunkDamaged(chunk, f"its stored chunk has {size} bytes and filter mask {mask}, not at most {most} "
                                f"bytes of {self.codec} (mask 0) or {len(into)} bytes as they are (mask 1)")
        stored = np.frombuffer(data, np.uint8)
        if self.fletcher:
            if size < 4 or (self.table is None and _fletcher32(stored[:-4]) != int.from_bytes(data[-4:], "little")):
                raise _ChunkDamaged(chunk, "its fletcher32 does not match its bytes")
            stored = stored[:-4]
        try:
            if mask:  # stored as it is
                if len(stored) != len(into):
                    raise ValueError(f"it holds {len(stored)} bytes")
                into[:] = stored
            else:
                self.decode(stored, into)  # held to the chunk's bytes, checked or not
        except Exception as exc:  # a stream the decoder refuses (damage that the table's check would find after it)
            raise _ChunkDamaged(chunk, f"its {self.codec} stream does not decode to {len(into)} bytes: {exc}") from None
        if self.table is None:
            return None
        return _crc32c(into[:self._covered(chunk)]), int(self.table[chunk, self.column])


def _most_compressed(size: int) -> int:
    """More bytes than gzip, LZF or zstd make of ``size`` bytes at worst (a little over them): a stored
    chunk larger than this is no chunk of ours, and is not read."""
    return size + size // 64 + 1024


def _fletcher32(data: np.ndarray) -> int:
    """HDF5's Fletcher-32 of ``data`` (uint8; H5_checksum_fletcher32): running sums of its big-endian
    16-bit words, both folded to 17 bits after every 360 words and the second kept to 32 bits, as
    HDF5 computes them, so the value is HDF5's exactly. Each block's two sums are taken by numpy; only
    the folding runs per block here."""
    words = data[:len(data) // 2 * 2].view(">u2")
    sums = []
    for at in range(0, len(words), 360 * 1024):  # 720 KiB at a time: bounded temporaries
        part = words[at:at + 360 * 1024].astype(np.int64)
        blocks = [part[:len(part) // 360 * 360].reshape(-1, 360), part[len(part) // 360 * 360:].reshape(1, -1)]
        for block in (b for b in blocks if b.size):
            weights = np.arange(block.shape[1], 0, -1)
            sums += [(block.shape[1], plain, weighted) for plain, weighted in zip(block.sum(1).tolist(), (block @ weights).tolist())]
    if len(data) % 2:  # the last byte, as the high byte of a word
        sums.append((1, int(data[-1]) << 8, int(data[-1]) << 8))
    sum1 = sum2 = 0
    for count, plain, weighted in sums:  # over a block: sum1 += word, then sum2 += sum1, word by word
        sum2 = (sum2 + count * sum1 + weighted) & 0xFFFFFFFF
        sum1 += plain
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def _inflate(stream: np.ndarray, into: np.ndarray) -> None:
    """Decode the zlib stream ``stream`` (HDF5's gzip filter) into ``into``, never making more than one
    byte past it, and raise unless it fills it exactly and ends where the stream does."""
    decompressor = isal_zlib.decompressobj()
    data = decompressor.decompress(stream, len(into) + 1)  # one byte of room: the stream's end is then reached
    if len(data) != len(into) or not decompressor.eof or decompressor.unused_data:
        raise ValueError(f"it decodes to {f'more than {len(into)}' if len(data) > len(into) else len(data)} bytes"
                         + ("" if decompressor.eof else ", the stream unfinished") + (", then more bytes" if decompressor.unused_data else ""))
    into[:] = np.frombuffer(data, np.uint8)


def _lzf_decode(stream: np.ndarray, into: np.ndarray) -> None:
    """Decode the LZF stream ``stream`` (h5py's LZF filter) into ``into``, raising unless it fills it
    exactly; nothing is written past it."""
    decompress = _liblzf()
    if decompress is None:
        return _lzf_decode_in_python(stream, into)
    import ctypes

    data = stream.tobytes()
    written = decompress(data, len(data), into.ctypes.data, len(into)) if data else 0  # it reads a byte of any stream
    if written != len(into):
        raise ValueError(f"it decodes to {written} bytes" if written else f"it decodes to more than {len(into)} bytes"
                         if data and ctypes.get_errno() == errno.E2BIG else "it is no LZF stream")
    return None


@functools.cache
def _liblzf() -> Callable[..., int] | None:
    """liblzf's ``lzf_decompress(in, in_len, out, out_len)`` as h5py builds it into its LZF filter
    (``h5py.h5z`` exports it on Linux and macOS), else ``None``. It never writes past ``out_len``,
    checks each read of its input (liblzf's CHECK_INPUT, on by default) and returns the bytes written,
    0 for a stream that is no LZF or makes more; ctypes releases the GIL for it. About 40 times
    :func:`_lzf_decode_in_python`, which decodes labels at about 20 MB/s."""
    import ctypes

    from h5py import h5z

    try:
        function = ctypes.CDLL(h5z.__file__, use_errno=True).lzf_decompress
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = ctypes.c_uint, [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    return function


def _lzf_decode_in_python(stream: np.ndarray, into: np.ndarray) -> None:
    """:func:`_lzf_decode` where liblzf cannot be had. A stream is tokens: a byte below 32 is a run of
    that many plus one literal bytes; else its top 3 bits (7: plus the next byte) plus 2 are a length,
    and its low 5 bits and the byte after, plus 1, how far back the bytes to copy start."""
    data, out, size = stream.tobytes(), memoryview(into), len(into)
    at = written = 0
    while at < len(data):
        ctrl = data[at]
        if ctrl < 32:
            stop, start, at = written + ctrl + 1, at + 1, at + ctrl + 2
            if at > len(data):
                raise ValueError("it ends inside a run of literal bytes")
            source = data[start:at]
        else:
            length = ctrl >> 5
            if length == 7 and at + 1 < len(data):
                at += 1
                length += data[at]
            if at + 1 >= len(data):
                raise ValueError("it ends inside a copy")
            start, stop, at = written - ((ctrl & 31) << 8) - data[at + 1] - 1, written + length + 2, at + 2
            if start < 0:
                raise ValueError("a copy reaches back before its start")
            source = out[start:min(stop - written + start, written)].tobytes()
            if len(source) < stop - written:  # a copy longer than its distance repeats those bytes
                source = (source * ((stop - written) // len(source) + 1))[:stop - written]
        if stop > size:
            raise ValueError(f"it decodes to more than {size} bytes")
        out[written:stop] = source
        written = stop
    if written != size:
        raise ValueError(f"it decodes to {written} bytes")


def _backend_type(path: str | Path) -> type[_ZarrBackend] | type[_H5Backend]:
    """The backend of a cache at ``path``, by its suffix (see :func:`backend_name`)."""
    return _ZarrBackend if backend_name(path) == "zarr" else _H5Backend


def _open_backend(path: Path, mode: str) -> _ZarrBackend | _H5Backend:
    backend = _backend_type(path)
    if mode == "r" and not path.exists():
        raise SoftlabelsError(f"cache not found: {path}")
    return backend(path, mode)


def _item_axes(manifest: dict[str, Any], path: Path) -> tuple[tuple[str, int], ...]:
    axes = manifest.get("item_axes", [])  # version 1 had none
    if not isinstance(axes, list) or not all(
        isinstance(a, dict) and isinstance(a.get("name"), str) and a["name"].isidentifier()
        and isinstance(a.get("size"), int) and not isinstance(a.get("size"), bool) and a["size"] > 0 for a in axes
    ):
        raise SoftlabelsError(f"{path}: manifest field 'item_axes' must be a list of {{name, size}} objects, got {axes!r}")
    return tuple((a["name"], a["size"]) for a in axes)


def _check_descriptions(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's counts, class names and token fields that readers print or compare: each of
    its type, or absent."""
    teacher, dataset, tokens = manifest.get("teacher", {}), manifest.get("dataset", {}), manifest.get("tokens")
    if tokens is not None and not (isinstance(tokens, dict) and isinstance(tokens.get("tokenizer"), (dict, type(None)))):
        raise SoftlabelsError(f"{path}: manifest field 'tokens' is not an object with a 'tokenizer' object or null")
    tokenizer = (tokens or {}).get("tokenizer") or {}
    counts = {"teacher.params": teacher.get("params"), "dataset.num_samples": dataset.get("num_samples"),
              "tokens.seq_len": (tokens or {}).get("seq_len"), "tokens.vocab_size": (tokens or {}).get("vocab_size"),
              "tokens.tokenizer.vocab_size": tokenizer.get("vocab_size")}
    for name, value in counts.items():
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise SoftlabelsError(f"{path}: manifest field '{name}' is not a count, got {value!r}")
    if not isinstance(tokenizer.get("sha256", ""), str):
        raise SoftlabelsError(f"{path}: manifest field 'tokens.tokenizer.sha256' is not a string")
    for name, names, size in (("dataset.classes", dataset.get("classes"), None),
                              ("teacher.classes", teacher.get("classes"), manifest["num_classes"])):
        if names is not None and not (isinstance(names, list) and names and all(isinstance(v, str) for v in names)
                                      and len(set(names)) == len(names) and size in (None, len(names))):
            raise SoftlabelsError(f"{path}: manifest field '{name}' is not a list of distinct class names"
                                  + (f", one for each of the {size} classes" if size else ""))


def validate_manifest(manifest: Any, arrays: dict[str, Any], path: Path) -> tuple[dict[str, Any], Layout]:
    """Check a manifest against this reader and the arrays it describes; return it and its layout."""
    if manifest is None:
        raise SoftlabelsError(f"{path} is not a softlabels cache: no '{MANIFEST_KEY}' manifest")
    if not isinstance(manifest, dict):
        raise SoftlabelsError(f"{path}: its '{MANIFEST_KEY}' manifest is invalid ({type(manifest).__name__}, not a JSON object)")
    if manifest.get("format") != FORMAT:
        raise SoftlabelsError(f"{path} is not a softlabels cache: manifest format is {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SoftlabelsError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise SoftlabelsError(
            f"{path} uses cache format version {version}, newer than this softlabels reads ({FORMAT_VERSION}): upgrade softlabels"
        )
    for key, kind_of in {"num_samples": int, "num_classes": int, "chunk_rows": int, "dtype": str, "kind": str}.items():
        value = manifest.get(key)
        if not isinstance(value, kind_of) or isinstance(value, bool):
            raise SoftlabelsError(f"{path}: manifest field '{key}' is missing or not {kind_of.__name__}")
    for key in ("teacher", "dataset"):
        if not isinstance(manifest.get(key, {}), dict):
            raise SoftlabelsError(f"{path}: manifest field '{key}' is not an object")
        for name, value in manifest.get(key, {}).items():
            if name in ("spec", "fingerprint", "sha256", "arch", "file") and not isinstance(value, (str, type(None))):
                raise SoftlabelsError(f"{path}: manifest field '{key}.{name}' is not a string")
    if not isinstance(manifest.get("complete"), bool):
        raise SoftlabelsError(f"{path}: manifest field 'complete' is missing or not true/false")
    accuracy = manifest.get("teacher_accuracy")
    if accuracy is not None and (not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0 <= accuracy <= 1):
        raise SoftlabelsError(f"{path}: manifest field 'teacher_accuracy' is not a number from 0 to 1 or null")
    n, c = manifest["num_samples"], manifest["num_classes"]
    for key, bad in (("num_samples", n < 0), ("num_classes", c < 1), ("chunk_rows", manifest["chunk_rows"] < 1),
                     ("dtype", manifest["dtype"] not in STORE_DTYPES)):
        if bad:
            raise SoftlabelsError(f"{path}: manifest field '{key}' has an impossible value {manifest[key]!r}")
    _check_descriptions(manifest, path)
    kind = kind_from_settings(manifest, num_classes=c, where=f"{path}: manifest", require_all=True)
    records = manifest.get("records", [])
    if not isinstance(records, list):
        raise SoftlabelsError(f"{path}: manifest field 'records' is not a list")
    records = tuple(Record.from_settings(r, f"{path}: manifest field 'records'") for r in records)
    layout = Layout(kind, n, c, manifest["dtype"], manifest["chunk_rows"], _item_axes(manifest, path), records)
    layout.check_chunk_bytes(str(path))
    if len({r.name for r in records}) != len(records):
        raise SoftlabelsError(f"{path}: manifest field 'records' repeats a name")
    for name, (shape, dtype) in layout.shapes().items():
        if name not in arrays:
            raise SoftlabelsError(f"{path}: array '{name}' is missing")
        if tuple(arrays[name].shape) != shape:
            raise SoftlabelsError(
                f"{path}: array '{name}' has shape {list(arrays[name].shape)} but the manifest says {list(shape)}"
            )
        if str(arrays[name].dtype) != str(np.dtype(dtype)):  # compared as names: a compound type has no dtype string
            raise SoftlabelsError(f"{path}: array '{name}' is {arrays[name].dtype} but the manifest implies {dtype}")
        refuse_unpickling(arrays[name], f"{path}: array '{name}'")
        chunks = tuple(arrays[name].chunks or ())
        if name == "chunk_crc32":
            if chunks and not (len(chunks) == 1 and 1 <= chunks[0] <= _CHECKSUMS_PER_CHUNK):  # each chunk is read whole
                raise SoftlabelsError(f"{path}: array 'chunk_crc32' (the commit record) is chunked {list(chunks)}, "
                                      f"not in chunks of 1 to {_CHECKSUMS_PER_CHUNK} entries")
        elif chunks != (layout.chunk_rows, *shape[1:]):  # readers index chunks by chunk_rows and take whole items per chunk
            raise SoftlabelsError(
                f"{path}: array '{name}' is chunked {list(chunks)}, not [{layout.chunk_rows}, *{list(shape[1:])}]"
            )
    return manifest, layout


def _impossible_label(labels: np.ndarray, num_classes: int) -> tuple[str, int, str] | None:
    """A stored label no dump writes: a class past the cache's, or below -2 (-1: none, -2: a row that
    could not be read)."""
    if not labels.size or (int(labels.min()) >= -2 and int(labels.max()) < num_classes):
        return None
    per_row = labels.reshape(len(labels), -1)
    bad = (per_row < -2) | (per_row >= num_classes)
    row = int(np.flatnonzero(bad.any(1))[0])
    return "labels", row, f"label {int(per_row[row][bad[row]][0])}, outside -2..{num_classes - 1}"


class _Arrays:
    """The arrays of an open cache (or partial cache), read with the store's checksums checked."""

    def __init__(self, path: Path, backend: Any, layout: Layout, version: int):
        self.path, self.backend, self.layout = path, backend, layout
        arrays = backend.arrays()
        self.targets = {a.name: arrays[a.name] for a in layout.target_arrays()}
        self.labels = arrays["labels"]
        self.records = {r.name: arrays[r.name] for r in layout.records}
        self.checksums = arrays["chunk_crc32"]
        self._ndims = {name: len(shape) for name, (shape, _) in layout.shapes().items()}  # h5py's ndim costs a call per read
        # Version 1 stored no codec checksums and skipped chunks equal to the fill value. Its arrays are
        # read directly too: zarr and h5py decode whatever codecs an array names, unbounded.
        self.checked = version >= 2
        named = {**self.targets, "labels": self.labels, **self.records}
        self._raw = {name: backend.raw_reader(name, array, self.checked) for name, array in named.items()}
        commit = backend.raw_reader("chunk_crc32", self.checksums, self.checked)
        self._commit = commit if isinstance(commit, _ZarrRawChunks) else None

    def commit_record(self, torn_unwritten: bool = True) -> np.ndarray:
        """Each chunk's recorded CRC-32, ``-1`` where none is (durably) written; an entry torn by a
        crash counts as unwritten for a writer, and raises for a reader (``torn_unwritten=False``). A
        Zarr cache's record is one small file per chunk, read directly: zarr-python's cost per file,
        paid at every open, grows with the number of chunks."""
        if self._commit is not None:
            return self._commit.read_written(torn_unwritten)
        return np.asarray(self.checksums[:])

    def read(self, ranges: list[tuple[int, int]], reuse: dict[str, np.ndarray] | None = None,
             order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Targets and labels of the rows of ``ranges``, one after another (row ``i`` at ``order[i]``
        when given); a damaged chunk raises, naming it."""
        out = {name: self._read(name, array, ranges, reuse, order) for name, array in {**self.targets, "labels": self.labels}.items()}
        labels = out.pop("labels")
        found = self.layout.kind.impossible(out, self.layout.num_classes) or _impossible_label(labels, self.layout.num_classes)
        if found is not None:
            name, row, what = found
            if order is not None:  # the row as read
                row = int(np.flatnonzero(order == row)[0])
            for start, stop in ranges:  # the row's place in the read, to the chunk that holds it
                if row < stop - start:
                    raise self._damaged(name, (start + row) // self.layout.chunk_rows, f"it holds {what}")
                row -= stop - start
        return out, labels

    def read_records(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The records of rows ``[start, stop)``, checked as :meth:`read` checks."""
        return {name: self._read(name, array, [(start, stop)]) for name, array in self.records.items()}

    def _read(self, name: str, array: Any, ranges: list[tuple[int, int]], reuse: dict[str, np.ndarray] | None = None,
              order: np.ndarray | None = None) -> np.ndarray:
        raw = self._raw.get(name)
        if raw is not None:  # the bulk of the bytes: read directly, crc32c checked
            buffer = None
            if reuse is not None:
                need, buffer = raw.nbytes(ranges), reuse.get(name)
                if buffer is None or len(buffer) < need:
                    buffer = reuse[name] = np.empty(need, np.uint8)
            try:
                return raw.read(ranges, buffer, order)
            except _ChunkDamaged as exc:
                raise self._damaged(name, exc.chunk, str(exc)) from None
        parts = [self._read_range(name, array, start, stop) for start, stop in ranges]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if order is None:
            return rows
        placed = np.empty_like(rows)
        placed[order] = rows
        return placed

    def _read_range(self, name: str, array: Any, start: int, stop: int) -> np.ndarray:
        if self.checked:
            chunks = range(start // self.layout.chunk_rows, -(-stop // self.layout.chunk_rows))
            missing = self.backend.missing_chunk(name, chunks, self._ndims[name])
            if missing is not None:
                raise self._damaged(name, missing, "its chunk file is missing")
        try:
            return np.asarray(array[start:stop])
        except Exception as exc:  # a checksum or decode failure, whatever the codec raised
            raise self._damaged(name, self._first_bad_chunk(array, start, stop), f"{type(exc).__name__}: {exc}") from exc

    def _first_bad_chunk(self, array: Any, start: int, stop: int) -> int:
        bad = first_failing_chunk(array, start, stop, self.layout.chunk_rows)
        return start // self.layout.chunk_rows if bad is None else bad

    def _damaged(self, name: str, chunk: int, why: str) -> "DamagedChunk":
        return DamagedChunk(self.path, name, chunk, self.layout.chunk_bounds(chunk), " ".join(why.split()))


def first_failing_chunk(array: Any, start: int, stop: int, chunk_rows: int) -> int | None:
    """The first chunk (of ``chunk_rows`` rows) of rows ``[start, stop)`` of an array read through zarr
    or h5py whose read fails, e.g. by its checksum; ``None`` if each reads alone. For naming the
    chunk after a read of the whole range failed."""
    for chunk in range(start // chunk_rows, -(-stop // chunk_rows)):
        try:
            array[chunk * chunk_rows:min((chunk + 1) * chunk_rows, int(array.shape[0]))]
        except Exception:
            return chunk
    return None


class DamagedChunk(SoftlabelsError):
    """A chunk that failed its checksum (or is missing) when read; names the array, chunk and rows."""

    def __init__(self, path: Path, array: str, chunk: int, rows: tuple[int, int], why: str):
        super().__init__(f"{path}: array '{array}' chunk {chunk} (rows {rows[0]}-{rows[1] - 1}) is damaged ({why}); "
                         "run softlabels verify for a full report")
        self.array, self.chunk, self.why = array, chunk, why


class _Chunked:
    """Chunk geometry read off ``self.layout``, shared by :class:`Cache` and :class:`CacheWriter`."""

    layout: Layout

    @property
    def chunk_rows(self) -> int:
        return self.layout.chunk_rows

    @property
    def num_chunks(self) -> int:
        return self.layout.num_chunks

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        return self.layout.chunk_bounds(index)


class Cache(_Chunked):
    """A read-only view of a cache. Use :func:`open_cache`."""

    def __init__(self, path: Path, *, allow_incomplete: bool = False):
        self.path = path
        self._backend = _open_backend(path, "r")
        try:
            self.manifest, self.layout = validate_manifest(self._backend.read_manifest(), self._backend.arrays(), path)
            if not self.manifest.get("complete") and not allow_incomplete:
                raise SoftlabelsError(f"{path} is incomplete (its dump did not finish); resume or rerun the dump")
            # The commit record is read when asked for (checksums()), not here: a reader of the rows
            # checks each chunk as it reads it, and the record is a small file per chunk in Zarr,
            # which every open (and every DataLoader worker's) would read. Its entries are counted.
            held, chunks = self._backend.commit_entries_held(), self.layout.num_chunks
            if chunks > _CHUNKS_READ_WHOLE:  # the commit record and the read checksums are read whole: not for any size declared
                if self.manifest["complete"] and 2 * held < chunks:
                    raise SoftlabelsError(f"{path}: the cache is complete but its store holds {held:,} commit-record "
                                          f"entries at most, for {chunks:,} chunks")
                elif not self.manifest["complete"]:  # a partial cache holds few entries by right: its size is the bound
                    room = shutil.disk_usage(path.parent).total
                    if self.layout.num_samples * self.layout.row_bytes > room:
                        raise SoftlabelsError(f"{path}: the cache declares {self.layout.num_samples:,} samples of "
                                              f"{self.layout.row_bytes:,} bytes, more than its filesystem holds ({room:,} bytes)")
            self._arrays = _Arrays(path, self._backend, self.layout, self.manifest["format_version"])
            if self.manifest["complete"] and held < chunks and not allow_incomplete:
                self.check_commit_record()  # names the first chunk without an entry
        except BaseException:
            self._backend.close()
            raise

    def __len__(self) -> int:
        return self.layout.num_samples

    @property
    def kind(self) -> TargetKind:
        return self.layout.kind

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def items(self) -> tuple[int, ...]:
        """The sizes of the item axes (``()`` for one target per sample)."""
        return self.layout.items

    def read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The kind's arrays (``[rows, *items, width]`` each) and labels (``[rows, *items]``) of
        rows ``start:stop``, every chunk's store checksum checked; aligned ranges read whole chunks."""
        return self._arrays.read([(start, stop)])

    def read_ranges(self, ranges: list[tuple[int, int]], reuse: dict[str, np.ndarray] | None = None,
                    order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """As :meth:`read`, for the rows of several ranges one after another, each starting at a
        chunk boundary; an uncompressed array is read straight into one buffer, with no join.

        Given ``reuse``, a dict of buffers by array name that this call fills or grows, later calls
        with the same dict read into the same memory (new memory costs a page fault per 4 KiB): the
        arrays an earlier call returned are then overwritten, so pass it only once they are unused.

        Given ``order``, a permutation of the rows read, the row read ``i``-th is returned at row
        ``order[i]``, placed there as its chunk is read (a shuffled window, with no gather after).

        Example::

            targets, labels = cache.read_ranges([(512, 768), (0, 256)])   # rows 512..767, then 0..255
        """
        return self._arrays.read(ranges, reuse, order)

    def read_records(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The records (``[rows, *shape]`` each, e.g. a view cache's augmentation parameters) of rows
        ``start:stop``, checked as :meth:`read` checks; ``{}`` for a cache without records."""
        return self._arrays.read_records(start, stop)


    def iter_chunks(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """``(start_row, targets, labels)`` for each chunk, in order, each checked as it is read."""
        for index in range(self.num_chunks):
            start, stop = self.chunk_bounds(index)
            yield (start, *self.read(start, stop))

    @property
    def classes(self) -> list[str] | None:
        """The name of each class, in order, where the manifest records them: the dataset's (an image
        folder's), else the teacher's checkpoint's."""
        return (self.manifest.get("dataset") or {}).get("classes") or (self.manifest.get("teacher") or {}).get("classes")

    def teacher_top1(self) -> np.ndarray:
        """The teacher's top class of every item (``[N, *items]``), read chunk by chunk."""
        parts = [self.kind.top_class(targets) for _, targets, _ in self.iter_chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, *self.items), np.int64)

    def labels(self) -> np.ndarray:
        """Every item's hard label (``-1`` for none), read as :meth:`read` reads them."""
        return self._arrays._read("labels", self._arrays.labels, [(0, len(self))])

    def checksums(self) -> np.ndarray:
        """Each chunk's CRC-32 as the dump recorded it (the commit record), ``-1`` where none was."""
        try:
            return self._arrays.commit_record(torn_unwritten=False)
        except _ChunkDamaged as exc:
            raise SoftlabelsError(f"{self.path}: array 'chunk_crc32' (the commit record) is damaged: its entry for "
                                  f"chunk {exc.chunk} ({exc})") from None
        except Exception as exc:  # its store checksum (zarr's crc32c, HDF5's fletcher32) failed
            raise SoftlabelsError(f"{self.path}: array 'chunk_crc32' (the commit record) is damaged: "
                                  f"{' '.join(f'{type(exc).__name__}: {exc}'.split())}") from None

    def check_commit_record(self) -> np.ndarray:
        """The commit record (:meth:`checksums`), refused where a complete cache lacks a chunk's entry:
        a record chunk deleted from a Zarr cache reads as "never written", and a reader going by the
        record would leave its rows out unseen. Returns the record."""
        recorded = self.checksums()
        missing = np.flatnonzero(recorded < 0)
        if self.manifest["complete"] and len(missing):
            chunk = int(missing[0])
            raise DamagedChunk(self.path, "chunk_crc32", chunk, self.chunk_bounds(chunk),
                               f"the cache is complete but the commit record has no entry for {len(missing)} chunk(s)")
        return recorded

    def nbytes_on_disk(self) -> int:
        return directory_bytes(self.path)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_cache(path: str | Path, *, allow_incomplete: bool = False) -> Cache:
    """Open a cache read-only after checking its manifest, its arrays' shapes and its completeness.

    Example::

        cache = open_cache("logits.zarr")
        len(cache), cache.num_classes, cache.kind.name   # (40000, 10, 'dense')
    """
    return Cache(Path(path), allow_incomplete=allow_incomplete)


class CacheWriter(_Chunked):
    """Writes a cache chunk by chunk into ``PATH.partial``; :meth:`finish` publishes it as ``PATH``.

    A chunk's bytes are flushed to disk (fsync) before its checksum is recorded, so the recorded
    checksums name exactly the chunks that survive a crash. Leaving the ``with`` block by an
    exception keeps the partial cache as it is (never complete); :meth:`resume` reopens it.

    Example::

        layout = Layout(Dense(), num_samples=100, num_classes=10, dtype="float16", chunk_rows=64)
        with CacheWriter("out.zarr", layout, manifest={"teacher": ..., "dataset": ...}) as writer:
            writer.write_chunks(0, {"logits": logits[:64]}, labels[:64])
            writer.write_chunks(1, {"logits": logits[64:]}, labels[64:])
            writer.finish()
    """

    def __init__(self, path: str | Path, layout: Layout, *, manifest: dict[str, Any], compress_logits: bool = False):
        path = Path(path)
        backend_name(path)
        # HDF5 refuses chunks larger than the array
        layout = dataclasses.replace(layout, chunk_rows=max(1, min(layout.chunk_rows, layout.num_samples)))
        if layout.dtype not in STORE_DTYPES:
            raise SoftlabelsError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {layout.dtype}")
        layout.check_chunk_bytes(str(path))
        manifest = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **layout.manifest_fields(),
            "compress_logits": compress_logits,
            "complete": False,
        }
        partial = partial_path(path)
        remove_path(partial)
        backend = _open_backend(partial, "w")
        rows = layout.chunk_rows
        for name, (shape, dtype) in layout.shapes().items():
            if name == "chunk_crc32":
                # In Zarr each checksum gets a file of its own, so ranks of a distributed dump never
                # rewrite each other's records; HDF5 has a single writer.
                per_file = 1 if backend_name(path) == "zarr" else max(1, min(shape[0], _CHECKSUMS_PER_CHUNK))
                backend.create_array(name, shape, (per_file,), dtype, -1, False)
            else:
                # Logits are stored raw unless asked: float16 mantissas are close to random, so codecs
                # gain about 10% at 2-5x the write CPU and half the read speed (scripts/bench_codecs.py).
                floating = np.issubdtype(dtype, np.floating)
                backend.create_array(name, shape, (rows, *shape[1:]), dtype, -1 if name == "labels" else 0,
                                     compress_logits or not floating)
        backend.create_read_checksums(layout)
        backend.sync(None)  # the arrays' metadata: a resumed dump reopens them
        backend.write_manifest(manifest)
        self._attach(path, backend, manifest, layout)

    @classmethod
    def resume(cls, path: str | Path) -> "CacheWriter":
        """Reopen ``PATH.partial`` to write its missing chunks; raises if it cannot be trusted."""
        path = Path(path)
        partial = partial_path(path)
        backend = _open_backend(partial, "r+")
        try:
            manifest, layout = validate_manifest(backend.read_manifest(), backend.arrays(), partial)
            if manifest["format_version"] != FORMAT_VERSION:
                raise SoftlabelsError(f"{partial} was started by an older softlabels (format {manifest['format_version']})")
        except BaseException:
            backend.close()
            raise
        writer = cls.__new__(cls)
        writer._attach(path, backend, manifest, layout)
        return writer

    def _attach(self, path: Path, backend: Any, manifest: dict[str, Any], layout: Layout) -> None:
        self.path, self.partial = path, partial_path(path)
        self.manifest, self.layout = manifest, layout
        self._backend = backend
        self._arrays = _Arrays(self.partial, backend, layout, manifest["format_version"])
        self._ndims = {name: len(shape) for name, (shape, _) in layout.shapes().items() if name != "chunk_crc32"}
        writers = {**self._arrays._raw, "chunk_crc32": self._arrays._commit}
        self._writers = {name: w for name, w in writers.items() if isinstance(w, _ZarrRawChunks)}  # Zarr: written directly
        self._finished = False

    def recorded_checksums(self) -> np.ndarray:
        """Each chunk's recorded CRC-32, ``-1`` for chunks not (durably) written yet."""
        return self._arrays.commit_record()

    def labels(self) -> np.ndarray:
        """Every item's label as written so far."""
        return np.asarray(self._arrays.labels[:])

    def read_chunk(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Chunk ``index``'s targets, labels and records as stored (raises if a store checksum fails)."""
        start, stop = self.chunk_bounds(index)
        return (*self._arrays.read([(start, stop)]), self._arrays.read_records(start, stop))

    def write_chunks(self, first: int, targets: dict[str, np.ndarray], labels: np.ndarray,
                     records: dict[str, np.ndarray] | None = None) -> None:
        """Write consecutive chunks from ``first`` on, one store call per array (a call costs
        milliseconds of overhead), sync them, then record their checksums.

        ``targets`` maps each of the kind's arrays to ``[rows, *items, width]``, ``records`` each of
        the layout's records to ``[rows, *shape]``.
        """
        start, _ = self.chunk_bounds(first)
        count = -(-len(labels) // self.chunk_rows)
        stop = self.chunk_bounds(first + count - 1)[1]
        shapes = self.layout.shapes()
        records = records or {}
        if (labels.shape != (stop - start, *self.layout.items) or set(targets) != set(self._arrays.targets)
                or set(records) != set(self._arrays.records)):
            raise ValueError(f"chunks {first}..{first + count - 1} need {stop - start} rows of "
                             f"{sorted(self._arrays.targets)} and records {sorted(self._arrays.records)}")
        targets = {name: np.asarray(targets[name]).astype(shapes[name][1], copy=False) for name in self._arrays.targets}
        records = {name: np.asarray(records[name]).astype(shapes[name][1], copy=False) for name in self._arrays.records}
        for name, values in {**targets, **records}.items():
            if values.shape != (stop - start, *shapes[name][0][1:]):
                raise ValueError(f"array '{name}' of chunks {first}..{first + count - 1} needs shape "
                                 f"{[stop - start, *shapes[name][0][1:]]}, got {list(values.shape)}")
        labels = labels.astype(np.int64, copy=False)
        found = self.layout.kind.impossible(targets, self.layout.num_classes) or _impossible_label(labels, self.layout.num_classes)
        if found is not None:  # what every reader would refuse
            raise ValueError(f"array '{found[0]}' of chunks {first}..{first + count - 1} holds {found[2]} at row {start + found[1]}")
        for name, array in {**self._arrays.targets, **self._arrays.records}.items():
            self._write(name, array, start, {**targets, **records}[name])
        self._write("labels", self._arrays.labels, start, labels)
        bounds = [self.chunk_bounds(c) for c in range(first, first + count)]

        def rows(arrays: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
            return {k: v[a - start:b - start] for k, v in arrays.items()}
        self._backend.record_read_checksums(first, [rows({**targets, **records}, a, b) for a, b in bounds])
        self._backend.sync(range(first, first + count), self._ndims)
        sums = [chunk_checksum(rows(targets, a, b), labels[a - start:b - start], rows(records, a, b)) for a, b in bounds]
        self._write("chunk_crc32", self._arrays.checksums, first, np.array(sums, dtype=np.int64))

    def _write(self, name: str, array: Any, start: int, values: np.ndarray) -> None:
        """``array[start:start + len(values)] = values``, with the chunk files of a version-2 Zarr array
        written directly (zarr-python spends about a millisecond per call on them)."""
        raw = self._writers.get(name)
        if raw is None:
            array[start:start + len(values)] = values
        else:
            raw.write(start, values)

    def finish(self, **manifest_updates: Any) -> None:
        """Mark the cache complete and move it from ``PATH.partial`` to ``PATH``."""
        written = self.recorded_checksums()
        if (written < 0).any():
            raise RuntimeError(f"chunk {int(np.flatnonzero(written < 0)[0])} was never written")
        self._backend.finish_read_checksums(self.layout)
        self._backend.sync(None, self._ndims)  # everything the cache holds is on disk before its manifest says complete
        self.manifest.update(manifest_updates, complete=True)
        self._backend.write_manifest(self.manifest)
        self._backend.close()
        _publish(self.partial, self.path)
        self._finished = True

    def close(self) -> None:
        if not self._finished:
            self._backend.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def partial_path(path: Path) -> Path:
    return Path(str(path) + PARTIAL_SUFFIX)


def _publish(partial: Path, path: Path) -> None:
    """Move the finished cache at ``partial`` to ``path``, replacing what is there. A file is replaced in
    one rename. A directory (a Zarr cache) cannot be, so the old one is renamed aside first and removed
    only once the new one is in place: killed at any moment, ``path`` holds a whole cache or nothing
    (the old one then waits at ``PATH.replaced``), never a half-removed one."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(path.name + ".replaced")
        remove_path(aside)  # left by an earlier kill
        os.replace(path, aside)
        os.replace(partial, path)
        fsync_directory(path.parent)
        remove_path(aside)
    else:
        os.replace(partial, path)
        fsync_directory(path.parent)


def check_replaceable(path: Path) -> None:
    """Refuse to let ``--overwrite`` replace ``path`` unless it is a softlabels cache and nothing else:
    a mistyped output path (the dataset being read, someone's folder, a run) must never be removed.

    Example::

        check_replaceable(Path("data.zarr"))   # SoftlabelsError: data.zarr is not a softlabels cache (...)
    """
    why = _not_a_cache(path)
    if why is not None:
        raise SoftlabelsError(f"{path} is not a softlabels cache ({why}): --overwrite replaces only a cache; "
                              "remove it yourself or choose another output path")


# What zarr's write of the group's zarr.json leaves when it is killed: a temporary file of its own
_ZARR_TEMPORARY = re.compile(r"zarr\.[0-9a-f]{32}\.partial")


def _not_a_cache(path: Path) -> str | None:
    """Why what is at ``path`` is no cache (complete or not) that softlabels wrote, or ``None``."""
    if path.is_symlink():
        return "it is a link"
    if backend_name(path) == "zarr":
        if not path.is_dir():
            return "it is not a folder"
        metadata = path / "zarr.json"
        try:
            info = os.stat(metadata)
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_METADATA_BYTES:  # a FIFO would block the read
                return "its zarr.json is not a metadata file"
            manifest = json.loads(metadata.read_bytes()).get("attributes", {}).get(MANIFEST_KEY)
            others = sorted(e.name for e in os.scandir(path) if e.name != "zarr.json" and not _ZARR_TEMPORARY.fullmatch(e.name)
                            and not (e.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(e.path, "zarr.json"))))
        except (OSError, ValueError, RecursionError, AttributeError):
            return "it has no readable zarr.json"
        if others:
            return f"it holds {others[0]}, which is no part of a cache"
    else:
        if not path.is_file():
            return "it is not a file"
        try:
            import h5py

            with h5py.File(path, "r") as f:
                manifest = json.loads(f.attrs[MANIFEST_KEY])
        except Exception:  # not HDF5, no manifest, not JSON: no cache of ours either way
            return "it has no softlabels manifest"
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        return "it has no softlabels manifest"
    return None


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
