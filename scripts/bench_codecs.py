"""Measure codecs for the logits array: compression ratio, write and whole-chunk read throughput.

The logits imitate a trained teacher's: one confident class per row plus spread over the rest, stored
as float16 in chunks of each format's default size (for C = 1000, 1024 rows in Zarr and 256 in
HDF5). Every codec runs on the same array in one process, so the ratios between rows are what to read.

    python scripts/bench_codecs.py --rows 40000 --classes 1000
    python scripts/bench_codecs.py --from-cache runs/demo/transfer.zarr   # a real teacher's logits
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from softlabels import open_cache
from softlabels.store import default_chunk_rows, directory_bytes


def teacher_like_logits(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(rows, classes)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, classes, rows)] += 10.0
    return logits.astype(np.float16)


def zarr_case(compressors):
    def write(path: Path, data: np.ndarray, chunk: int):
        group = zarr.open_group(str(path), mode="w")
        array = group.create_array("logits", shape=data.shape, chunks=(chunk, data.shape[1]), dtype=data.dtype, compressors=compressors)
        for start in range(0, len(data), chunk):
            array[start:start + chunk] = data[start:start + chunk]

    def read(path: Path, chunk: int) -> int:
        array = zarr.open_group(str(path), mode="r")["logits"]
        return sum(np.asarray(array[s:s + chunk]).shape[0] for s in range(0, array.shape[0], chunk))

    return write, read


def h5_case(compression, opts=None):
    def write(path: Path, data: np.ndarray, chunk: int):
        with h5py.File(path, "w") as f:
            d = f.create_dataset("logits", shape=data.shape, chunks=(chunk, data.shape[1]), dtype=data.dtype,
                                 compression=compression, compression_opts=opts)
            for start in range(0, len(data), chunk):
                d[start:start + chunk] = data[start:start + chunk]

    def read(path: Path, chunk: int) -> int:
        with h5py.File(path, "r") as f:
            d = f["logits"]
            return sum(d[s:s + chunk].shape[0] for s in range(0, d.shape[0], chunk))

    return write, read


CASES = {
    "zarr, no codec (default)": (".zarr", zarr_case(None)),
    "zarr, blosc-lz4 + shuffle": (".zarr", zarr_case([BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")])),
    "zarr, blosc-zstd + shuffle": (".zarr", zarr_case([BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")])),
    "zarr, zstd (--compress-logits)": (".zarr", zarr_case([ZstdCodec(level=0)])),
    "hdf5, no filter (default)": (".h5", h5_case(None)),
    "hdf5, lzf": (".h5", h5_case("lzf")),
    "hdf5, gzip level 4 (--compress-logits)": (".h5", h5_case("gzip", 4)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--from-cache", metavar="PATH", help="Use the float16 logits of an existing cache instead.")
    args = parser.parse_args()
    if args.from_cache:
        with open_cache(args.from_cache) as cache:
            data = cache.read(0, len(cache))[0]["logits"].astype(np.float16)
        args.rows, args.classes = data.shape
    else:
        data = teacher_like_logits(args.rows, args.classes)
    chunks = {suffix: default_chunk_rows(args.classes * 2, suffix) for suffix in (".zarr", ".h5")}
    raw = data.nbytes
    print(f"{args.rows} x {args.classes} float16 logits ({raw / 2**20:.0f} MiB), rows per chunk (the default): "
          f"{chunks['.zarr']} in Zarr, {chunks['.h5']} in HDF5\n")
    print("| codec | ratio | write MB/s | read MB/s | read vs no codec |")
    print("| --- | ---: | ---: | ---: | ---: |")
    baseline = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (suffix, (write, read)) in CASES.items():
            path, chunk = Path(tmp) / f"c{suffix}", chunks[suffix]
            began = time.perf_counter()
            write(path, data, chunk)
            write_s = time.perf_counter() - began
            ratio = raw / directory_bytes(path)
            began = time.perf_counter()
            assert read(path, chunk) == args.rows
            read_s = time.perf_counter() - began
            fmt = suffix
            baseline.setdefault(fmt, read_s)
            print(f"| {name} | {ratio:.2f} | {raw / write_s / 1e6:.0f} | {raw / read_s / 1e6:.0f} | {baseline[fmt] / read_s:.2f} |")
            shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
