"""Image folders on this machine's CPUs: the decode-bound loader against raw decoding, and the
fingerprint against the dump.

On a synthetic folder of photograph-like JPEGs (``scripts/image_folder.py``, about 375 x 500 pixels),
decoded to ``size x size`` (shorter side resized to ``resize``, centre crop):

- **raw decode**: pillow alone (open, decode, convert to RGB, resize, crop, to a uint8 array), the
  files split over ``P`` processes, nothing else: the rate no loader of these files can beat;
- **loader**: ``SoftTargetLoader`` over a dense cache of the folder, one epoch through a DataLoader
  with ``P`` workers as ``train-student`` runs it (decode, normalise, batch, hand over), no training;
- **dump**: ``softlabels.dump`` of the folder with a linear teacher (the decode-bound case, where the
  fingerprint weighs most), with ``P`` workers; and the fingerprint alone (hash every file) on the
  same files, both with the files in the page cache.

Every measurement alternates with the others ``--repeats`` times; the best of each is reported, and
the ratios are of numbers from the same run. Prints Markdown for BENCHMARKS.md.

    python scripts/bench_images.py --workdir /tmp/bench_images --images 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_folder import make_image_folder  # noqa: E402

import softlabels  # noqa: E402
from softlabels import SoftTargetLoader, open_cache, open_data  # noqa: E402
from softlabels.checkpoint import LoadedModel  # noqa: E402


def _decode_files(args: tuple[list[str], int, int]) -> int:
    files, size, resize = args
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
        w, h = image.size
        new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
        np.asarray(image.crop((left, top, left + size, top + size)))
    return len(files)


def raw_decode(files: list[str], size: int, resize: int, processes: int, pool: ProcessPoolExecutor) -> float:
    """Images per second, pillow alone, the files in ``processes`` equal shares."""
    shares = [(files[p::processes], size, resize) for p in range(processes)]
    began = time.perf_counter()
    assert sum(pool.map(_decode_files, shares)) == len(files)
    return len(files) / (time.perf_counter() - began)


def loader_epoch(spec: str, cache_path: Path, workers: int) -> float:
    """Rows per second of one epoch of batches, as train-student reads them with ``workers`` workers."""
    cache = open_cache(cache_path)
    loader = SoftTargetLoader(open_data(spec), cache, batch_size=128, seed=0)
    batches = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=workers, generator=torch.Generator())
    began = time.perf_counter()
    rows = sum(len(batch.indices) for batch in batches)
    return rows / (time.perf_counter() - began)


def teacher(size: int) -> LoadedModel:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 10))
    return LoadedModel(model, Path("linear"), "0" * 64, "linear", num_classes=10, input_shape=(3, size, size))


def dump_seconds(spec: str, out: Path, size: int, workers: int) -> float:
    result = softlabels.dump(teacher(size), open_data(spec), out, num_workers=workers, overwrite=True, progress=False)
    return result.seconds


def fingerprint_seconds(spec: str) -> float:
    source = open_data(spec)
    began = time.perf_counter()
    source.fingerprint()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_images"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    root = args.workdir / "images"
    total = make_image_folder(root, args.images)
    spec = f"imagefolder:{root}?size={args.size}&resize={args.resize}"
    files = [str(root / name) for name in open_data(spec).files]
    cache_path = args.workdir / "cache.zarr"
    if not cache_path.exists():
        softlabels.dump(teacher(args.size), open_data(spec), cache_path, num_workers=max(args.workers), progress=False)
    with ProcessPoolExecutor(max(args.workers)) as pool:
        raw_decode(files[:64], args.size, args.resize, max(args.workers), pool)  # start the processes
        best: dict[str, float] = {}

        def keep(name: str, value: float, larger: bool = True) -> None:
            if name not in best or (value > best[name]) == larger:
                best[name] = value

        for _ in range(args.repeats):
            for w in args.workers:
                keep(f"raw{w}", raw_decode(files, args.size, args.resize, w, pool))
                keep(f"loader{w}", loader_epoch(spec, cache_path, w))
            w = max(args.workers)
            keep("dump", dump_seconds(spec, args.workdir / "dump.zarr", args.size, w), larger=False)
            keep("fingerprint", fingerprint_seconds(spec), larger=False)

    print(f"\n{args.images} JPEGs ({total / 2**20:.0f} MiB, about 375 x 500 pixels), decoded to "
          f"{args.size} x {args.size} (shorter side {args.resize}, centre crop); {os.cpu_count()} CPUs; best of {args.repeats}\n")
    print("| processes | raw decode (images/s) | loader (rows/s) | loader / raw |")
    print("| ---: | ---: | ---: | ---: |")
    for w in args.workers:
        print(f"| {w} | {best[f'raw{w}']:,.0f} | {best[f'loader{w}']:,.0f} | {best[f'loader{w}'] / best[f'raw{w}']:.2f} |")
    w = max(args.workers)
    print(f"\n| work ({w} workers) | seconds | share of the dump |")
    print("| --- | ---: | ---: |")
    print(f"| dump, linear teacher (fingerprint included) | {best['dump']:.2f} | 1.00 |")
    print(f"| fingerprint alone (sha256 of every file) | {best['fingerprint']:.2f} | {best['fingerprint'] / best['dump']:.3f} |")


if __name__ == "__main__":
    main()
