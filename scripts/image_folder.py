"""A synthetic ImageNet-style folder for benchmarks: JPEGs of mixed sizes in one subfolder per class.

Each image is smooth random colour fields (a coarse random grid upsampled bicubically) plus fine
noise, saved as quality-90 JPEG: about the bytes and decode cost of a photograph of the same size,
unlike pure noise (which compresses badly) or flat colour (which decodes too fast). Image ``i`` is a
pure function of ``(seed, i)``; sizes vary around ``height x width`` as photographs' do.

    python scripts/image_folder.py /tmp/imgs --images 20000 --classes 100
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _write(args: tuple[Path, int, int, int, int, int]) -> int:
    root, i, classes, height, width, seed = args
    rng = np.random.default_rng([seed, i])
    h = int(height * rng.uniform(0.75, 1.25))
    w = int(width * rng.uniform(0.75, 1.25))
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    path = root / f"class{i % classes:03d}" / f"img{i:06d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path.stat().st_size


def make_image_folder(root: Path, images: int, *, classes: int = 10, height: int = 375, width: int = 500,
                      seed: int = 0, processes: int | None = None) -> int:
    """Write the folder (kept if it already holds ``images`` files); returns its bytes."""
    root = Path(root)
    existing = list(root.rglob("*.jpg")) if root.exists() else []
    if len(existing) == images:
        return sum(p.stat().st_size for p in existing)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, classes, height, width, seed) for i in range(images)]
    with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        return sum(pool.map(_write, jobs, chunksize=64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    args = parser.parse_args()
    total = make_image_folder(args.root, args.images, classes=args.classes, height=args.height, width=args.width)
    print(f"{args.root}: {args.images} JPEGs, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
