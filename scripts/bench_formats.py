"""The same teacher logits in softlabels' caches and in the formats other distillation tools use.

One set of synthetic float16 logits (and int64 labels) is written in each format, then read back in
shuffled batches. Formats (the comparison formats are written here from their descriptions):

  softlabels .zarr / .h5   written by ``CacheWriter``, read by ``SoftTargetLoader`` (manifest, CRC-32C
                           of every chunk checked on read)
  .pt per sample           torchdistill's cache: one ``torch.save`` dict per sample, ``torch.load``
  TinyViT records          one binary file per epoch of ``(key, value)`` records appended in the order
                           the teacher saw them, and a key -> offset index; one positioned read per row
  Parquet                  DistillKit's: one row per sample, ``list<halffloat>`` columns; the file is
                           read into an Arrow table once (memory-mapped), then ``take`` per batch
  Parquet + page CRC       the same with Parquet's optional page checksums written and verified
  raw .npy memmap          the limit: ``np.load(mmap_mode="r")`` and fancy indexing

For each: bytes on disk, write rate, time to the first batch (open + first shuffled batch) and the
rate of one whole shuffled epoch, best of ``--repeats`` runs taken in turn, page cache warm (every
format is read, and checked against the source arrays, once before timing). It prints a Markdown
table for BENCHMARKS.md.

    pip install -e ".[bench]"                                # pyarrow, for the Parquet rows
    python scripts/bench_formats.py                          # 65,536 x 1000 float16 (131 MB)
    python scripts/bench_formats.py --rows 16384 --kind topk --k 16
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import zarr

import softlabels
from softlabels import CacheWriter, Dense, Layout, SoftTargetLoader, TopK, open_cache, open_data, source_for_cache
from softlabels.store import default_chunk_rows


class Data(NamedTuple):
    targets: dict[str, np.ndarray]  # the kind's stored arrays, [N, width] each, in store dtypes
    labels: np.ndarray  # [N] int64
    kind: softlabels.TargetKind
    classes: int
    inputs: Path  # a 1-byte-per-row npz: SoftTargetLoader reads a Source beside the cache

    @property
    def row_bytes(self) -> int:
        return sum(a.itemsize * a.shape[1] for a in self.targets.values())


Batch = tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor]  # rows, targets, labels


def make_data(root: Path, rows: int, classes: int, kind_name: str, k: int) -> Data:
    """Teacher-like logits (normal, one class lifted per row), seeded; top-k built by the library's kind."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    kind = Dense() if kind_name == "dense" else TopK(k=k)
    dtypes = {a.name: a.dtype for a in kind.arrays(classes, "float16")}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in dtypes}
    for start in range(0, rows, 4096):  # in blocks: float32 logits of every row at once could be GBs
        n = min(4096, rows - start)
        z = rng.normal(0.0, 2.0, size=(n, classes)).astype(np.float32)
        z[np.arange(n), labels[start:start + n]] += 8.0
        built = kind.build(torch.from_numpy(z), rows=torch.arange(start, start + n), store_dtype=torch.float16)
        for name, tensor in built.items():
            parts[name].append(tensor.numpy().astype(dtypes[name]))
    inputs = root / "inputs.npz"
    np.savez(inputs, x=np.zeros((rows, 1), np.uint8), y=labels)  # uncompressed, so memory-mapped on read
    return Data({name: np.concatenate(p) for name, p in parts.items()}, labels, kind, classes, inputs)


def epoch_order(rows: int, seed: int) -> np.ndarray:
    """A uniform shuffle, what a map-style Dataset under ``DataLoader(shuffle=True)`` reads."""
    return np.random.default_rng(seed).permutation(rows)


def batches_of(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


# --- softlabels: the library's own writer and loader -------------------------------------------------

def write_softlabels(path: Path, data: Data) -> None:
    rows = len(data.labels)
    layout = Layout(data.kind, rows, data.classes, "float16", default_chunk_rows(data.row_bytes, path))
    source = open_data(str(data.inputs))
    manifest = {"dataset": {"spec": str(data.inputs), "fingerprint": source.fingerprint(), "num_samples": rows}}
    with CacheWriter(path, layout, manifest=manifest) as writer:
        step = 16  # chunks per call: one store call per array, then one sync, as a dump writes
        for first in range(0, writer.num_chunks, step):
            a = writer.chunk_bounds(first)[0]
            b = writer.chunk_bounds(min(first + step, writer.num_chunks) - 1)[1]
            writer.write_chunks(first, {n: v[a:b] for n, v in data.targets.items()}, data.labels[a:b])
        writer.finish()


def read_softlabels(path: Path, data: Data, batch: int, order: np.ndarray) -> Iterator[Batch]:
    # The loader shuffles by its own (seed, epoch) plan: chunks permuted, then rows within windows of
    # 8 chunks; ``order`` does not apply. source_for_cache checks the inputs' recorded fingerprint.
    with open_cache(path) as cache:
        loader = SoftTargetLoader(source_for_cache(cache), cache, batch_size=batch, seed=0)
        for b in loader:
            yield b.indices.numpy(), b.teacher_logits.arrays, b.labels


# --- torchdistill: one .pt file per sample -------------------------------------------------------------

def write_pt(path: Path, data: Data) -> None:
    path.mkdir()
    for i in range(len(data.labels)):
        # copies: torch.save writes a tensor's whole storage, and a view's storage is the whole array
        item = {name: torch.from_numpy(v[i].copy()) for name, v in data.targets.items()}
        torch.save({**item, "label": int(data.labels[i])}, path / f"{i}.pt")


def read_pt(path: Path, data: Data, batch: int, order: np.ndarray) -> Iterator[Batch]:
    names = [str(path / f"{i}.pt") for i in range(len(data.labels))]
    for rows in batches_of(order, batch):
        items = [torch.load(names[i], weights_only=True) for i in rows]
        targets = {name: torch.stack([item[name] for item in items]) for name in data.targets}
        yield rows, targets, torch.tensor([item["label"] for item in items])


# --- TinyViT: one record file per epoch and a key -> offset index ---------------------------------------

def record_dtype(data: Data) -> np.dtype:
    """One record: key and value length, then the value (label and each target array's row), packed."""
    fields = [("key", "<u8"), ("size", "<u4"), ("label", "<i8")]
    fields += [(name, v.dtype.newbyteorder("<"), (v.shape[1],)) for name, v in data.targets.items()]
    return np.dtype(fields)


def write_records(path: Path, data: Data) -> None:
    path.mkdir()
    dtype = record_dtype(data)
    header = struct.Struct("<QI")
    # Records are appended as the teacher's (shuffled) epoch produces them, not in key order.
    written = epoch_order(len(data.labels), seed=1)
    offsets = np.empty(len(written), np.int64)
    with open(path / "epoch0.bin", "wb") as f:
        for n, key in enumerate(written):
            offsets[n] = f.tell()
            value = data.labels[key].astype("<i8").tobytes() + b"".join(v[key].tobytes() for v in data.targets.values())
            f.write(header.pack(int(key), len(value)) + value)
    assert offsets[-1] + dtype.itemsize == (path / "epoch0.bin").stat().st_size
    np.save(path / "epoch0.index.npy", np.stack([written, offsets], axis=1))  # (key, offset) in file order


def read_records(path: Path, data: Data, batch: int, order: np.ndarray) -> Iterator[Batch]:
    dtype = record_dtype(data)
    pairs = np.load(path / "epoch0.index.npy")
    offset_of = np.empty(len(pairs), np.int64)
    offset_of[pairs[:, 0]] = pairs[:, 1]
    fd = os.open(path / "epoch0.bin", os.O_RDONLY)
    try:
        for rows in batches_of(order, batch):
            # os.pread is seek + read in one call: one positioned read per row, as the index allows
            blob = b"".join(os.pread(fd, dtype.itemsize, int(offset_of[i])) for i in rows)
            records = np.frombuffer(blob, dtype)
            assert (records["key"] == rows).all()  # the index pointed at the right records
            targets = {name: torch.from_numpy(np.ascontiguousarray(records[name])) for name in data.targets}
            yield rows, targets, torch.from_numpy(records["label"].astype(np.int64))
    finally:
        os.close(fd)


# --- DistillKit: Parquet, one row per sample, list columns ------------------------------------------

def write_parquet(path: Path, data: Data, *, compression: str, dictionary: bool, row_group: int, checksums: bool) -> None:
    columns = {"label": pa.int64(), **{n: pa.list_(pa.from_numpy_dtype(v.dtype)) for n, v in data.targets.items()}}
    schema = pa.schema(list(columns.items()))
    # pyarrow's defaults (what `datasets` writes) dictionary-encode every column: float16 has only 65,536
    # values, so the logits stay dictionary-encoded, smaller but several times slower to decode.
    with pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dictionary,
                          write_page_checksum=checksums) as writer:
        for a in range(0, len(data.labels), row_group):
            b = min(a + row_group, len(data.labels))
            arrays = [pa.array(data.labels[a:b])]
            for v in data.targets.values():
                offsets = pa.array(np.arange(0, (b - a) * v.shape[1] + 1, v.shape[1], dtype=np.int32))
                arrays.append(pa.ListArray.from_arrays(offsets, pa.array(v[a:b].reshape(-1))))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=row_group)


def read_parquet(path: Path, data: Data, batch: int, order: np.ndarray, *, checksums: bool) -> Iterator[Batch]:
    # Uniformly shuffled rows touch every row group in every batch, so reading row groups per batch
    # would decode the file once per batch; instead the table is decoded once (the first batch waits
    # for it) and each batch is an Arrow ``take``, as a Hugging Face ``datasets`` table serves rows.
    table = pq.read_table(path, memory_map=True, page_checksum_verification=checksums)
    for rows in batches_of(order, batch):
        taken = table.take(pa.array(rows))
        # writable=True copies only where Arrow's buffer is shared: torch warns on read-only arrays
        flat = {name: pc.list_flatten(taken[name]).combine_chunks().to_numpy(zero_copy_only=False, writable=True)
                for name in data.targets}
        targets = {name: torch.from_numpy(a.reshape(len(rows), -1)) for name, a in flat.items()}
        yield rows, targets, torch.from_numpy(taken["label"].combine_chunks().to_numpy(zero_copy_only=False, writable=True))


# --- the limit: raw .npy files, memory-mapped ---------------------------------------------------------

def write_npy(path: Path, data: Data) -> None:
    path.mkdir()
    for name, v in {**data.targets, "labels": data.labels}.items():
        np.save(path / f"{name}.npy", v)


def read_npy(path: Path, data: Data, batch: int, order: np.ndarray) -> Iterator[Batch]:
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in [*data.targets, "labels"]}
    for rows in batches_of(order, batch):
        targets = {name: torch.from_numpy(arrays[name][rows]) for name in data.targets}  # fancy indexing copies
        yield rows, targets, torch.from_numpy(arrays["labels"][rows])


# --- measurement ---------------------------------------------------------------------------------------

class Format(NamedTuple):
    name: str
    path: str  # file or folder name under the work directory
    write: Callable[[Path, Data], None] | None  # None: reads another format's files
    read: Callable[..., Iterator[Batch]]
    manifest: str
    checks: str
    order: str = "uniform"  # "loader": the row order SoftTargetLoader serves


def formats(args: argparse.Namespace) -> list[Format]:
    def parquet(checksums: bool):
        def write(path: Path, data: Data) -> None:
            write_parquet(path, data, compression=args.parquet_compression, dictionary=args.parquet_dictionary == "on",
                          row_group=args.row_group, checksums=checksums)

        def read(path: Path, data: Data, batch: int, order: np.ndarray) -> Iterator[Batch]:
            return read_parquet(path, data, batch, order, checksums=checksums)
        return write, read

    settings = f"{args.parquet_compression}, dictionary {args.parquet_dictionary}"
    return [
        Format("softlabels .zarr", "cache.zarr", write_softlabels, read_softlabels, "yes", "CRC-32C per chunk", "loader"),
        Format("softlabels .h5", "cache.h5", write_softlabels, read_softlabels, "yes", "CRC-32C per chunk", "loader"),
        Format(".pt per sample (torchdistill)", "pt", write_pt, read_pt, "no", "no¹"),
        Format("record file + index (TinyViT)", "records", write_records, read_records, "no", "no"),
        Format(f"Parquet, list columns (DistillKit), {settings}", "plain.parquet", *parquet(False),
               "schema only", "no (page CRC off by default)"),
        Format(f"Parquet, {settings}, page CRC on", "crc.parquet", *parquet(True), "schema only", "CRC-32 per page"),
        Format("raw .npy memmap", "npy", write_npy, read_npy, "no", "no"),
        Format("raw .npy memmap, softlabels' row order", "npy", None, read_npy, "no", "no", "loader"),
    ]


def disk_bytes(path: Path) -> tuple[int, int]:
    """Bytes of the files, and bytes allocated for them (whole filesystem blocks)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def one_epoch(fmt: Format, path: Path, data: Data, batch: int, order: np.ndarray, check: bool) -> tuple[float, float]:
    """Seconds to the first batch (open included) and for the whole epoch; ``check`` compares every row."""
    seen = 0
    began = time.perf_counter()
    first = None
    for rows, targets, labels in fmt.read(path, data, batch, order):
        if first is None:
            first = time.perf_counter() - began
        seen += len(rows)
        if check:
            assert np.array_equal(labels.numpy(), data.labels[rows]), fmt.name
            for name, v in data.targets.items():
                assert np.array_equal(targets[name].numpy(), v[rows].astype(targets[name].numpy().dtype)), fmt.name
    elapsed = time.perf_counter() - began
    assert seen == len(data.labels), f"{fmt.name} served {seen} rows"
    return first, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--kind", choices=("dense", "topk"), default="dense")
    parser.add_argument("--k", type=int, default=16, help="K of --kind topk")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-group", type=int, default=1024, help="Parquet rows per row group")
    parser.add_argument("--parquet-compression", default="snappy", help="pyarrow's default, as datasets writes")
    parser.add_argument("--parquet-dictionary", choices=("on", "off"), default="on", help="on: pyarrow's default")
    parser.add_argument("--workdir", type=Path, help="where to write (a fresh folder inside it, removed at the end)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=args.workdir))
    try:
        data = make_data(root, args.rows, args.classes, args.kind, args.k)
        logit_bytes = args.rows * data.row_bytes
        shapes = ", ".join(f"{n} {v.dtype}[{v.shape[1]}]" for n, v in data.targets.items())
        print(f"{args.rows:,} rows of {args.kind} targets over C = {args.classes} ({shapes}; {logit_bytes / 1e6:.1f} MB), "
              f"int64 labels; shuffled batches of {args.batch}; load average at start {os.getloadavg()[0]:.1f}\n")
        fmts = formats(args)
        results: dict[str, dict] = {}
        for fmt in fmts:
            if fmt.write is not None:
                began = time.perf_counter()
                fmt.write(root / fmt.path, data)
                results[fmt.name] = {"write": time.perf_counter() - began, "size": disk_bytes(root / fmt.path)}
            else:
                results[fmt.name] = {"write": None, "size": None}
        with open_cache(root / "cache.zarr") as cache:
            loader_order = SoftTargetLoader(source_for_cache(cache), cache, batch_size=args.batch, seed=0).order(0)
        orders = {"uniform": epoch_order(args.rows, seed=0), "loader": loader_order}
        for fmt in fmts:  # warm the page cache, and check every row each format serves
            one_epoch(fmt, root / fmt.path, data, args.batch, orders[fmt.order], check=True)
        for _ in range(args.repeats):  # formats in turn, best of each: the machine is shared and noisy
            for fmt in fmts:
                first, epoch = one_epoch(fmt, root / fmt.path, data, args.batch, orders[fmt.order], check=False)
                results[fmt.name].setdefault("first", []).append(first)
                results[fmt.name].setdefault("epoch", []).append(epoch)
        print_table(fmts, results, args.rows, logit_bytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(fmts: list[Format], results: dict[str, dict], rows: int, logit_bytes: int) -> None:
    limit = rows / min(results["raw .npy memmap"]["epoch"])
    print("| format | manifest | checksums checked on read | MB on disk (allocated) | write rows/s | write MB/s "
          "| first batch (ms) | shuffled read rows/s | GB/s of targets | vs memmap | spread |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fmt in fmts:
        r = results[fmt.name]
        epoch, first = min(r["epoch"]), min(r["first"])
        spread = (max(r["epoch"]) - epoch) / epoch
        size = "same files" if r["size"] is None else f"{r['size'][0] / 1e6:,.1f} ({r['size'][1] / 1e6:,.1f})"
        write = ("—", "—") if r["write"] is None else (f"{rows / r['write']:,.0f}", f"{logit_bytes / 1e6 / r['write']:,.1f}")
        print(f"| {fmt.name} | {fmt.manifest} | {fmt.checks} | {size} | {write[0]} | {write[1]} | {first * 1e3:,.1f} | "
              f"{rows / epoch:,.0f} | {logit_bytes / 1e9 / epoch:.2f} | {rows / epoch / limit:.2f}x | {spread:.0%} |")
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "zarr": zarr.__version__, "h5py": h5py.__version__, "pyarrow": pa.__version__,
                "softlabels": softlabels.__version__}
    print(f"\nMachine: {os.cpu_count()} cores, {platform.machine()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`")
    print("\nWrite: one run, each format as its tool writes it (softlabels fsyncs every group of chunks before "
          "recording its checksums; the others do not sync). Reads: best of the repeats, page cache warm, each "
          "epoch timed from opening the files; first batch = open + first batch. softlabels shuffles its own way "
          "(chunks permuted, then rows within windows of 8 chunks, inputs of 1 byte per row read beside); the "
          "other formats read a uniform permutation, except the last row, which reads the loader's row order. "
          "Parquet: the whole file is read into an Arrow table (memory-mapped) before the first batch, then "
          "`Table.take` per batch. Spread: (slowest - best) / best epoch.\n"
          "¹ torch.save writes a zip with a CRC-32 per member, but torch.load does not check it (a flipped byte "
          "in a tensor loads silently, torch " + torch.__version__ + ").")


if __name__ == "__main__":
    main()
