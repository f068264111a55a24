"""Calibration: how far a model's confidence is from its accuracy, in bins of confidence.

The expected calibration error (ECE, Guo et al. 2017) is the mean over items of
``|confidence - accuracy|`` within each item's bin: ``sum_b |sum of confidences in b - hits in b| / N``.
The same bins are what a reliability diagram draws. Items are added batch by batch, so no array of
every prediction is ever needed.

Example::

    calibration = Calibration()
    calibration.add(np.array([0.9, 0.6, 0.95]), np.array([1.0, 0.0, 1.0]))
    calibration.ece()   # (0.1 + 0.6 + 0.05) / 3 = 0.25
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 15  # of confidence, equal widths over [0, 1]


class Calibration:
    """Confidence sums, hits and counts per bin of confidence."""

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.confidence, self.hits, self.count = (np.zeros(bins) for _ in range(3))

    def add(self, confidence: np.ndarray, hit: np.ndarray) -> None:
        """Add items: the probability of each one's top class and whether that class is its label."""
        index = np.minimum((confidence * self.bins).astype(int), self.bins - 1)
        np.add.at(self.confidence, index, confidence)
        np.add.at(self.hits, index, hit)
        np.add.at(self.count, index, 1)

    def ece(self) -> float | None:
        """The expected calibration error, ``None`` before any item."""
        total = self.count.sum()
        return float(np.abs(self.confidence - self.hits).sum() / total) if total else None

    def diagram(self) -> dict[str, Any]:
        """A reliability diagram's numbers: bin edges, and per bin the mean confidence, the accuracy
        and the number of items (``None`` for an empty bin's means)."""
        def mean(values: np.ndarray) -> list[float | None]:
            return [float(v / c) if c else None for v, c in zip(values, self.count)]

        return {
            "edges": np.linspace(0.0, 1.0, self.bins + 1).tolist(),
            "confidence": mean(self.confidence),
            "accuracy": mean(self.hits),
            "count": [int(c) for c in self.count],
            "ece": self.ece(),
        }
