"""scikit-learn's bundled handwritten digits written out as an image folder, offline.

The 1,797 8 x 8 grayscale digits (UCI ML hand-written digits, 16 grey levels, bundled with
scikit-learn, so nothing is downloaded) become PNG files in ``ROOT/train/<digit>/`` and
``ROOT/test/<digit>/``: the first 1,297 images train, the last 500 test. They are the real images a
widely installed package ships; the other images scikit-learn bundles are two photographs.

    python scripts/digits_folder.py runs/digits/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

TRAIN = 1297


def write_digits(root: Path) -> tuple[int, int]:
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels to 0..255
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = root / ("train" if i < TRAIN else "test") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return TRAIN, len(pixels) - TRAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    train, test = write_digits(args.root)
    print(f"{args.root}: {train} training and {test} test digits")


if __name__ == "__main__":
    main()
