"""The cache on disk: a Zarr v3 group (``*.zarr``) or an HDF5 file (``*.h5``/``*.hdf5``), one layout.

==================  ======================  ==========================================================
name                shape, dtype            meaning
==================  ======================  ==========================================================
``logits``          ``[N, C]`` float16/32    teacher logits for sample ``i`` in row ``i``
``labels``          ``[N]`` int64            hard labels, ``-1`` where a sample has none
``chunk_crc32``     ``[N_chunks]`` int64     zlib CRC-32 of each chunk's logits then labels bytes
                                             (little-endian, C order); ``-1`` until it is written
attribute           JSON object              the manifest (``format``, ``format_version``, ...); in
``softlabels``                               HDF5 a JSON string
==================  ======================  ==========================================================

Arrays are chunked along samples only (``chunk_rows`` rows, every class in one chunk). A cache is
written as ``PATH.partial`` and renamed to ``PATH`` once every chunk is written and the manifest says
``complete``; a chunk counts as written only once its checksum is recorded, after its bytes.

Example:
    >>> with open_cache("logits.zarr") as cache:
    ...     logits, labels = cache.read(0, 128)
    ...     cache.manifest["teacher"]["sha256"]
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import SoftlabelsError
from .sparse import KINDS, target_dtype

FORMAT = "softlabels-cache"
FORMAT_VERSION = 1
MANIFEST_KEY = "softlabels"
PARTIAL_SUFFIX = ".partial"
STORE_DTYPES = ("float16", "float32")
_TARGET_CHUNK_BYTES = 512 << 10
_MAX_DEFAULT_CHUNK_ROWS = 4096
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


def default_chunk_rows(num_classes: int, dtype: str) -> int:
    """Rows per chunk: about 0.5 MiB of logits, a power of two, at most 4096 rows.

    The cap keeps the matching block of inputs small when there are few classes (4096 rows of
    224x224 images are already 2.4 GB in float32).
    """
    row_bytes = num_classes * np.dtype(dtype).itemsize
    rows = 2 ** int(np.log2(max(1, _TARGET_CHUNK_BYTES // row_bytes)))
    return int(min(_MAX_DEFAULT_CHUNK_ROWS, max(16, rows)))


def chunk_checksum(targets: np.ndarray, labels: np.ndarray) -> int:
    """CRC-32 of a chunk as stored: each target array's bytes in manifest order (for dense, just the
    logits), then the labels' bytes, all little-endian and C order."""
    parts = [targets[name] for name in targets.dtype.names] if targets.dtype.names else [targets]
    crc = 0
    for part in parts:
        crc = zlib.crc32(np.ascontiguousarray(part, dtype=part.dtype.newbyteorder("<")).tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(labels, dtype="<i8").tobytes(), crc)


def row_dtype(manifest: dict[str, Any]) -> np.dtype:
    """The dtype of one sample's soft targets in a cache with this manifest."""
    return target_dtype(
        manifest["kind"], num_classes=manifest["num_classes"], size=sparse_size(manifest),
        store_dtype=manifest["dtype"], temperatures=len(manifest.get("temperatures") or ()),
    )


def sparse_size(manifest: dict[str, Any]) -> int:
    """K of a top-k cache, S of a sampled one, 0 for dense."""
    return {"topk": manifest.get("k"), "sampled": manifest.get("samples")}.get(manifest["kind"]) or 0


def _fields(dtype: np.dtype) -> list[tuple[str, np.dtype, int]]:
    """``(array name, dtype, width)`` of each target array of a cache."""
    if dtype.names is None:
        return [("logits", dtype.base, dtype.shape[0])]
    return [(name, dtype[name].base, dtype[name].shape[0]) for name in dtype.names]


def _assemble(arrays: dict[str, Any], dtype: np.dtype, start: int, stop: int) -> np.ndarray:
    if dtype.names is None:
        return np.asarray(arrays["logits"][start:stop])
    rows = np.empty(stop - start, dtype=dtype)
    for name in dtype.names:
        rows[name] = arrays[name][start:stop]
    return rows


def directory_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _ZarrBackend:
    def __init__(self, path: Path, mode: str):
        import zarr

        self.root = path
        try:
            self.group = zarr.open_group(str(path), mode=mode)
        except Exception as exc:
            raise SoftlabelsError(f"{path} is not a softlabels cache: cannot open it as a Zarr group ({exc})") from exc

    def create_array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill: Any, compress: bool) -> Any:
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=0)] if compress else None
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=compressors)

    def arrays(self) -> dict[str, Any]:
        return {name: self.group[name] for name in self.group.array_keys()}

    def read_manifest(self) -> Any:
        return self.group.attrs.get(MANIFEST_KEY)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.group.attrs[MANIFEST_KEY] = manifest

    def sync(self, chunks: range | None, names: list[str] = ()) -> None:
        """fsync the files of ``chunks`` of the 2-D arrays ``names`` and of the labels (``None``: the
        manifest), which zarr writes but never syncs."""
        if chunks is None:
            _fsync_file(self.root / "zarr.json")
            return
        for chunk in chunks:
            for name in names:
                _fsync_file(self.root / name / "c" / str(chunk) / "0")
            _fsync_file(self.root / "labels" / "c" / str(chunk))

    def close(self) -> None:
        pass


class _H5Backend:
    def __init__(self, path: Path, mode: str):
        import h5py

        try:
            self.file = h5py.File(path, mode)
        except Exception as exc:
            raise SoftlabelsError(f"{path} is not a softlabels cache: cannot open it as HDF5 ({exc})") from exc

    def create_array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill: Any, compress: bool) -> Any:
        # gzip is the filter every HDF5 reader has; LZF (h5py's own) is faster but needs h5py to read.
        compression = ("gzip" if np.issubdtype(np.dtype(dtype), np.floating) else "lzf") if compress else None
        return self.file.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill, compression=compression)

    def arrays(self) -> dict[str, Any]:
        import h5py

        return {name: obj for name, obj in self.file.items() if isinstance(obj, h5py.Dataset)}

    def read_manifest(self) -> Any:
        raw = self.file.attrs.get(MANIFEST_KEY)
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if not isinstance(raw, str):
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)

    def sync(self, chunks: range | None, names: list[str] = ()) -> None:
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())

    def close(self) -> None:
        self.file.close()


def _open_backend(path: Path, mode: str) -> _ZarrBackend | _H5Backend:
    backend = backend_name(path)
    if mode == "r" and not path.exists():
        raise SoftlabelsError(f"cache not found: {path}")
    if backend == "zarr":
        return _ZarrBackend(path, mode)
    return _H5Backend(path, mode)


def validate_manifest(manifest: Any, arrays: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check a manifest against this reader and the arrays it describes; return it or raise."""
    if not isinstance(manifest, dict):
        raise SoftlabelsError(f"{path} is not a softlabels cache: no '{MANIFEST_KEY}' manifest")
    if manifest.get("format") != FORMAT:
        raise SoftlabelsError(f"{path} is not a softlabels cache: manifest format is {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SoftlabelsError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise SoftlabelsError(
            f"{path} uses cache format version {version}, newer than this softlabels reads ({FORMAT_VERSION}): upgrade softlabels"
        )
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise SoftlabelsError(f"{path}: unsupported cache kind {kind!r}")
    fields = {"num_samples": int, "num_classes": int, "chunk_rows": int, "dtype": str}
    if kind == "topk":
        fields.update(k=int, temperatures=list)
    elif kind == "sampled":
        fields.update(samples=int, temperatures=list, sample_seed=int)
    for key, kind_of in fields.items():
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
    n, c = manifest["num_samples"], manifest["num_classes"]
    if n < 0 or c < 1 or manifest["chunk_rows"] < 1 or manifest["dtype"] not in STORE_DTYPES:
        raise SoftlabelsError(f"{path}: manifest has impossible values (num_samples={n}, num_classes={c})")
    if kind != "dense" and (not 1 <= sparse_size(manifest) <= max(c, sparse_size(manifest) if kind == "sampled" else c)
                            or not manifest["temperatures"]
                            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in manifest["temperatures"])):
        raise SoftlabelsError(f"{path}: manifest has impossible sparse settings (size {sparse_size(manifest)})")
    expected = {name: ((n, width), dtype) for name, dtype, width in _fields(row_dtype(manifest))}
    expected.update(labels=((n,), np.dtype(np.int64)), chunk_crc32=((num_chunks(n, manifest["chunk_rows"]),), np.dtype(np.int64)))
    for name, (shape, dtype) in expected.items():
        if name not in arrays:
            raise SoftlabelsError(f"{path}: array '{name}' is missing")
        if tuple(arrays[name].shape) != shape:
            raise SoftlabelsError(
                f"{path}: array '{name}' has shape {list(arrays[name].shape)} but the manifest says {list(shape)}"
            )
        if np.dtype(str(arrays[name].dtype)) != dtype:
            raise SoftlabelsError(f"{path}: array '{name}' is {arrays[name].dtype} but the manifest implies {dtype}")
    return manifest


def num_chunks(num_samples: int, chunk_rows: int) -> int:
    return -(-num_samples // chunk_rows)


def chunk_bounds(index: int, chunk_rows: int, num_samples: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``index``."""
    start = index * chunk_rows
    return start, min(start + chunk_rows, num_samples)


class Cache:
    """A read-only view of a cache. Use :func:`open_cache`."""

    def __init__(self, path: Path, *, allow_incomplete: bool = False):
        self.path = path
        self._backend = _open_backend(path, "r")
        try:
            arrays = self._backend.arrays()
            self.manifest = validate_manifest(self._backend.read_manifest(), arrays, path)
            if not self.manifest.get("complete") and not allow_incomplete:
                raise SoftlabelsError(f"{path} is incomplete (its dump did not finish); resume or rerun the dump")
        except BaseException:
            self._backend.close()
            raise
        self.row_dtype = row_dtype(self.manifest)
        self._targets = {name: arrays[name] for name, _, _ in _fields(self.row_dtype)}
        self._labels = arrays["labels"]
        self._checksums = arrays["chunk_crc32"]

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def chunk_rows(self) -> int:
        return self.manifest["chunk_rows"]

    @property
    def num_chunks(self) -> int:
        return num_chunks(len(self), self.chunk_rows)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        return chunk_bounds(index, self.chunk_rows, len(self))

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Soft targets and labels of rows ``start:stop``; aligned ranges read whole chunks.

        Dense targets are the ``[rows, C]`` logits; sparse ones a structured array with one field
        per stored array (``targets["topk_logits"]``, ...).
        """
        return _assemble(self._targets, self.row_dtype, start, stop), np.asarray(self._labels[start:stop])

    def labels(self) -> np.ndarray:
        """Every row's hard label (``-1`` for none)."""
        return np.asarray(self._labels[:])

    def checksums(self) -> np.ndarray:
        return np.asarray(self._checksums[:])

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start_row, targets, labels)`` for each chunk, in order."""
        for index in range(self.num_chunks):
            start, stop = self.chunk_bounds(index)
            yield (start, *self.read(start, stop))

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

    Example:
        >>> cache = open_cache("logits.zarr")
        >>> len(cache), cache.num_classes
        (40000, 10)
    """
    return Cache(Path(path), allow_incomplete=allow_incomplete)


class CacheWriter:
    """Writes a cache chunk by chunk into ``PATH.partial``; :meth:`finish` publishes it as ``PATH``.

    A chunk's bytes are flushed to disk (fsync) before its checksum is recorded, so the recorded
    checksums name exactly the chunks that survive a crash. Leaving the ``with`` block by an
    exception keeps the partial cache as it is (never complete); :meth:`resume` reopens it.

    Example:
        >>> with CacheWriter("out.zarr", num_samples=100, num_classes=10, chunk_rows=64,
        ...                  dtype="float16", manifest=manifest) as writer:
        ...     writer.write_chunk(0, logits[:64], labels[:64])
        ...     writer.write_chunk(1, logits[64:], labels[64:])
        ...     writer.finish()
    """

    def __init__(
        self,
        path: str | Path,
        *,
        num_samples: int,
        num_classes: int,
        chunk_rows: int,
        dtype: str,
        manifest: dict[str, Any],
        compress_logits: bool = False,
        sparse: dict[str, Any] | None = None,
    ):
        """``sparse`` holds ``kind`` (``topk`` or ``sampled``) and its manifest fields (``k``, or
        ``samples``, ``proposal_temperature`` and ``sample_seed``; ``temperatures``)."""
        path = Path(path)
        backend_name(path)
        chunk_rows = max(1, min(chunk_rows, num_samples))  # HDF5 refuses chunks larger than the array
        if dtype not in STORE_DTYPES:
            raise SoftlabelsError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
        manifest = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "dense",
            **(sparse or {}),
            "num_samples": num_samples,
            "num_classes": num_classes,
            "dtype": dtype,
            "chunk_rows": chunk_rows,
            "compress_logits": compress_logits,
            "complete": False,
        }
        partial = partial_path(path)
        remove_path(partial)
        backend = _open_backend(partial, "w")
        chunks = num_chunks(num_samples, chunk_rows)
        for name, field_dtype, width in _fields(row_dtype(manifest)):
            # Logits are stored raw unless asked: float16 mantissas are close to random, so codecs gain
            # about 10% at 2-5x the write CPU and half the read speed (scripts/bench_codecs.py).
            compress = compress_logits or not np.issubdtype(field_dtype, np.floating)
            backend.create_array(name, (num_samples, width), (chunk_rows, width), field_dtype.str, 0, compress)
        backend.create_array("labels", (num_samples,), (chunk_rows,), "int64", -1, True)
        # In Zarr each checksum gets a file of its own, so ranks of a distributed dump never rewrite
        # each other's records; HDF5 has a single writer.
        per_file = 1 if backend_name(path) == "zarr" else max(1, min(chunks, _CHECKSUMS_PER_CHUNK))
        backend.create_array("chunk_crc32", (chunks,), (per_file,), "int64", -1, False)
        backend.write_manifest(manifest)
        backend.sync(None)
        self._attach(path, backend, manifest)

    @classmethod
    def resume(cls, path: str | Path) -> "CacheWriter":
        """Reopen ``PATH.partial`` to write its missing chunks; raises if it cannot be trusted."""
        path = Path(path)
        partial = partial_path(path)
        backend = _open_backend(partial, "r+")
        try:
            manifest = validate_manifest(backend.read_manifest(), backend.arrays(), partial)
        except BaseException:
            backend.close()
            raise
        writer = cls.__new__(cls)
        writer._attach(path, backend, manifest)
        return writer

    def _attach(self, path: Path, backend: Any, manifest: dict[str, Any]) -> None:
        self.path, self.partial = path, partial_path(path)
        self.manifest = manifest
        self.chunk_rows, self.num_samples = manifest["chunk_rows"], manifest["num_samples"]
        self.num_chunks = num_chunks(self.num_samples, self.chunk_rows)
        self._backend = backend
        arrays = backend.arrays()
        self.row_dtype = row_dtype(manifest)
        self._targets = {name: arrays[name] for name, _, _ in _fields(self.row_dtype)}
        self._labels, self._checksums = arrays["labels"], arrays["chunk_crc32"]
        self._finished = False

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        return chunk_bounds(index, self.chunk_rows, self.num_samples)

    def recorded_checksums(self) -> np.ndarray:
        """Each chunk's recorded CRC-32, ``-1`` for chunks not (durably) written yet."""
        return np.asarray(self._checksums[:])

    def read_chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.chunk_bounds(index)
        return _assemble(self._targets, self.row_dtype, start, stop), np.asarray(self._labels[start:stop])

    def write_chunk(self, index: int, targets: np.ndarray, labels: np.ndarray) -> None:
        """Write chunk ``index`` (rows ``index * chunk_rows`` onwards), then record its checksum."""
        self.write_chunks(index, targets, labels)

    def write_chunks(self, first: int, targets: np.ndarray, labels: np.ndarray) -> None:
        """Write consecutive chunks from ``first`` on, one store call per array (a call costs
        milliseconds of overhead), sync them, then record their checksums.

        ``targets`` are ``[rows, C]`` logits for a dense cache, rows of :attr:`row_dtype` otherwise.
        """
        start, _ = self.chunk_bounds(first)
        count = -(-len(targets) // self.chunk_rows)
        stop = self.chunk_bounds(first + count - 1)[1]
        if targets.shape[0] != stop - start or labels.shape[0] != stop - start:
            raise ValueError(f"chunks {first}..{first + count - 1} need {stop - start} rows, got {targets.shape[0]}")
        targets = targets.astype(self.row_dtype.base if self.row_dtype.names is None else self.row_dtype, copy=False)
        labels = labels.astype(np.int64, copy=False)
        for name, array in self._targets.items():
            array[start:stop] = targets if self.row_dtype.names is None else targets[name]
        self._labels[start:stop] = labels
        self._backend.sync(range(first, first + count), list(self._targets))
        sums = [chunk_checksum(targets[a - start:b - start], labels[a - start:b - start])
                for a, b in map(self.chunk_bounds, range(first, first + count))]
        self._checksums[first:first + count] = sums

    def finish(self, **manifest_updates: Any) -> None:
        """Mark the cache complete and move it from ``PATH.partial`` to ``PATH``."""
        written = self.recorded_checksums()
        if (written < 0).any():
            raise RuntimeError(f"chunk {int(np.flatnonzero(written < 0)[0])} was never written")
        self.manifest.update(manifest_updates, complete=True)
        self._backend.write_manifest(self.manifest)
        self._backend.sync(None)
        self._backend.close()
        remove_path(self.path)
        os.replace(self.partial, self.path)
        _fsync_directory(self.path.parent)
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


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # zarr does not store a chunk that is all fill value
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


@contextmanager
def dump_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` while a dump writes ``PATH``.

    ``flock`` locks die with their process, so a killed dump never leaves the path locked. The lock
    file is removed on release; a waiter that locked a file removed meanwhile notices by its inode
    and refuses rather than share the path.
    """
    lock = Path(str(path) + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SoftlabelsError(f"another dump is writing {path} (it holds {lock})") from None
        if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:
            raise SoftlabelsError(f"another dump is writing {path}")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
