"""What checking every chunk on read costs: the same cache with and without the store's checksums.

A version-2 Zarr cache carries zarr's crc32c codec on every chunk; softlabels reads its uncompressed
chunk files directly and checks each crc32c itself. A version-2 HDF5 cache has fletcher32 on every
chunk (for plain h5py readers) and a table of each chunk's CRC-32C, which softlabels checks after
reading the chunk raw. For each format this script writes one dense float16 cache, makes a copy of
the same bytes without any checksum (a version-1 cache, read unchecked as version 1 always was), and
measures both in one run, alternating, through whole-chunk ``Cache.read`` calls and through
``SoftTargetLoader`` with inputs. Two more measurements isolate the check itself: the same format-2
loader with every CRC-32C comparison skipped (the checksum function replaced by one whose result
equals anything), and the check's own time inside the checked loader's epochs (every CRC-32C call
timed where the loader makes it). The first is a difference of a few percent on a machine whose
epochs vary by tens of percent, so it is measured in many pairs of epochs, one of each in alternating
order, and reported as the median of the pairs' ratios with a bootstrap 95% interval; the second does
not depend on how fast the epochs around it ran. First, the speed of each CRC function alone; last,
the check's own time with each chunk read and checked in pieces (as the loader does) against chunks
read whole and then checked. It prints Markdown tables for BENCHMARKS.md.

    python scripts/bench_checksums.py              # 65,536 x 1000 float16 (131 MB)
    python scripts/bench_checksums.py --rows 16384 # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import zarr

import softlabels
import softlabels.store
from softlabels import CacheWriter, Dense, Layout, SoftTargetLoader, open_cache, open_data
from softlabels.store import default_chunk_rows


class _Matches:
    """A checksum that equals every recorded one: the loader's work without the check."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False


def unchecked_epoch(path: Path, data: Path) -> float:
    """``loader_epoch`` with every CRC-32C comparison skipped (the same reads, no checksum computed)."""
    real = softlabels.store._crc32c
    softlabels.store._crc32c = lambda data, previous=0: _Matches()
    try:
        return loader_epoch(path, data)
    finally:
        softlabels.store._crc32c = real


def write_caches(root: Path, rows: int, classes: int, suffix: str) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    data = root / "inputs.npz"
    if not data.exists():
        np.savez(data, x=rng.normal(size=(rows, 40)).astype(np.float32), y=rng.integers(0, classes, rows))
    source = open_data(str(data))
    checked = root / f"checked{suffix}"
    chunk_rows = default_chunk_rows(classes * 2, checked)
    pool = rng.normal(0.0, 2.0, size=(16, chunk_rows, classes)).astype(np.float16)
    labels = source.labels()
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": rows}}
    with CacheWriter(checked, Layout(Dense(), rows, classes, "float16", chunk_rows), manifest=manifest) as writer:
        for i in range(writer.num_chunks):
            a, b = writer.chunk_bounds(i)
            writer.write_chunks(i, {"logits": pool[i % 16][: b - a]}, labels[a:b])
        writer.finish()
    # The same arrays and chunks with no checksum of any kind, read as version 1 (unchecked).
    unchecked = root / f"unchecked{suffix}"
    if suffix == ".zarr":
        src = zarr.open_group(str(checked), mode="r")
        dst = zarr.open_group(str(unchecked), mode="w")
        for name in src.array_keys():
            array = src[name]
            compressors = [c for c in array.compressors if type(c).__name__ != "Crc32cCodec"]
            copy = dst.create_array(name, shape=array.shape, chunks=array.chunks, dtype=array.dtype,
                                    fill_value=array.fill_value, compressors=compressors or None)
            copy[:] = array[:]
        dst.attrs["softlabels"] = {**src.attrs["softlabels"], "format_version": 1}
    else:
        with h5py.File(checked, "r") as src, h5py.File(unchecked, "w") as dst:
            for name, array in src.items():
                if name != "chunk_crc32c":  # the read-checksum table
                    dst.create_dataset(name, data=array[:], chunks=array.chunks, compression=array.compression)
            manifest = json.loads(src.attrs["softlabels"])
            dst.attrs["softlabels"] = json.dumps({**manifest, "format_version": 1})
    return checked, unchecked, data


def read_chunks(path: Path) -> float:
    """Seconds to read every chunk once, whole, in order."""
    with open_cache(path) as cache:
        began = time.perf_counter()
        for _ in cache.iter_chunks():
            pass
        return time.perf_counter() - began


def loader_epoch(path: Path, data: Path) -> float:
    """Seconds for one shuffled epoch of batches with inputs."""
    with open_cache(path) as cache:
        loader = SoftTargetLoader(open_data(str(data)), cache, batch_size=1024, seed=0)
        loader.set_epoch(0)
        began = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - began


def check_share(path: Path, data: Path, epochs: int) -> tuple[float, float]:
    """The check's own time inside the checked loader's epochs: every CRC-32C call timed where the
    loader makes it; the median over ``epochs`` of its share of the epoch, and its rate in GB/s."""
    real, spent = softlabels.store._crc32c, [0.0, 0]

    def timed(data, previous: int = 0) -> int:
        began = time.perf_counter()
        value = real(data, previous)
        spent[0] += time.perf_counter() - began
        spent[1] += data.nbytes
        return value

    shares, rates = [], []
    softlabels.store._crc32c = timed
    try:
        for _ in range(epochs):
            spent[:] = [0.0, 0]
            epoch = loader_epoch(path, data)
            shares.append(spent[0] / epoch)
            rates.append(spent[1] / spent[0] / 1e9)
    finally:
        softlabels.store._crc32c = real
    return float(np.median(shares)), float(np.median(rates))


def checksum_rates() -> list[str]:
    """Table rows: GB/s of each CRC function on a 512 KiB buffer (a chunk, in the core's cache) and
    on a 64 MiB one (from memory), best of 5, those softlabels uses beside those it replaced."""
    import zlib

    from awscrt.checksums import crc32c as aws_crc32c
    from isal.isal_zlib import crc32 as isal_crc32

    functions = {"CRC-32, zlib (before)": zlib.crc32, "CRC-32, ISA-L `isal` (the commit record)": isal_crc32,
                 "CRC-32C, aws-checksums `awscrt` (every chunk on read)": aws_crc32c}
    try:
        import crc32c

        functions["CRC-32C, `crc32c` package (before)"] = crc32c.crc32c
    except ImportError:
        pass
    rows = []
    for name, function in functions.items():
        rates = []
        for size in (512 << 10, 64 << 20):
            data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
            calls, best = max(1, (256 << 20) // size), float("inf")
            for _ in range(5):
                began = time.perf_counter()
                for _ in range(calls):
                    function(data)
                best = min(best, time.perf_counter() - began)
            rates.append(calls * size / best / 1e9)
        rows.append(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} |")
    return rows


def piece_shares(suffix: str, checked: Path, data: Path, rounds: int) -> list[str]:
    """Table rows: the check's own time in an epoch (:func:`check_share`) with each chunk read and
    checked in pieces of ``store._PIECE_BYTES`` (what the loader does) and read whole, then checked,
    alternating over ``rounds`` rounds of 5 epochs each; medians."""
    sizes = {f"{softlabels.store._PIECE_BYTES // 1024} KiB pieces": softlabels.store._PIECE_BYTES, "whole chunks": 1 << 40}
    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in sizes}
    real = softlabels.store._PIECE_BYTES
    try:
        for i in range(rounds):
            for name in (list(sizes) if i % 2 == 0 else list(sizes)[::-1]):
                softlabels.store._PIECE_BYTES = sizes[name]
                shares[name].append(check_share(checked, data, 5))
    finally:
        softlabels.store._PIECE_BYTES = real
    return [f"| {suffix} | {name} | {np.median([s for s, _ in got]):.2%} | {np.median([r for _, r in got]):.0f} GB/s |"
            for name, got in shares.items()]


def check_alone(suffix: str, checked: Path, data: Path, rows: int, pairs: int) -> str:
    """A table row: the check's cost as the median of ``pairs`` checked/skipped epoch ratios."""
    with_check, without = [], []
    for i in range(pairs):
        for run in ((loader_epoch, unchecked_epoch) if i % 2 else (unchecked_epoch, loader_epoch)):
            (with_check if run is loader_epoch else without).append(run(checked, data))
    with_check, without = np.array(with_check), np.array(without)
    ratios = with_check / without
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(2000, len(ratios))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    spread = np.percentile(without, 90) / np.percentile(without, 10) - 1
    share, rate = check_share(checked, data, 20)
    return (f"| {suffix} | {rows / np.median(without):,.0f} rows/s | {rows / np.median(with_check):,.0f} rows/s | "
            f"{np.median(ratios) - 1:+.1%} | {low - 1:+.1%} to {high - 1:+.1%} | {spread:.0%} (90th/10th percentile) | "
            f"{share:.1%} ({rate:.0f} GB/s) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=100, help="epoch pairs measuring the check alone")
    parser.add_argument("--piece-rounds", type=int, default=12, help="rounds comparing chunks read in pieces and whole")
    args = parser.parse_args()
    print("| checksum | GB/s, 512 KiB in cache | GB/s, 64 MiB |\n| --- | ---: | ---: |")
    print("\n".join(checksum_rates()) + "\n")
    print(f"{args.rows:,} x {args.classes} float16 logits ({args.rows * args.classes * 2 / 1e6:.0f} MB), softlabels "
          f"{softlabels.__version__}, best of {args.repeats} alternating runs, page cache warm\n")
    print("| format | path | without checksums | with checksums | cost | run-to-run spread |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    skipped_rows, piece_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".zarr", ".h5"):
            checked, unchecked, data = write_caches(Path(tmp), args.rows, args.classes, suffix)
            size = args.rows * args.classes * 2
            times = {key: [] for key in ("read checked", "read unchecked", "loader checked", "loader unchecked")}
            for _ in range(args.repeats):  # alternating, best of each: the machine is shared and noisy
                times["read checked"].append(read_chunks(checked))
                times["read unchecked"].append(read_chunks(unchecked))
                times["loader checked"].append(loader_epoch(checked, data))
                times["loader unchecked"].append(loader_epoch(unchecked, data))
            best = {key: min(values) for key, values in times.items()}
            spread = {key: (max(v) - min(v)) / min(v) for key, v in times.items()}
            for what, unit, scale in (("read", "GB/s", size / 1e9), ("loader", "rows/s", args.rows)):
                plain, checked_s = best[f"{what} unchecked"], best[f"{what} checked"]
                noise = max(spread[f"{what} unchecked"], spread[f"{what} checked"])
                label = "whole-chunk `Cache.read`" if what == "read" else "`SoftTargetLoader`, inputs, batch 1024"
                digits = 2 if unit == "GB/s" else 0
                print(f"| {suffix} | {label} | {scale / plain:,.{digits}f} {unit} | {scale / checked_s:,.{digits}f} {unit} | "
                      f"{checked_s / plain - 1:+.1%} | {noise:.0%} |")
            skipped_rows.append(check_alone(suffix, checked, data, args.rows, args.pairs))
            piece_rows += piece_shares(suffix, checked, data, args.piece_rounds)
    print(f"\nThe format-2 loader with every CRC-32C comparison skipped, against the same loader checking, "
          f"{args.pairs} pairs of epochs:\n")
    print("| format | check skipped (median) | checked (median) | cost: median of the pairs | 95% interval | spread of one epoch "
          "| the check's own time in an epoch (median of 20) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(skipped_rows))
    print(f"\nThe check's own time in an epoch with each chunk read and checked in pieces (what the loader does) "
          f"and read whole, then checked: medians of {args.piece_rounds} alternating rounds of 5 epochs:\n")
    print("| format | chunk read | the check's own time in an epoch | CRC-32C rate |\n| --- | --- | ---: | ---: |")
    print("\n".join(piece_rows))


if __name__ == "__main__":
    main()
