"""Sparse soft targets: the top-k logits of each sample, or classes sampled from the teacher.

Both kinds store, per sample, the log-partition function ``logsumexp(z / T)`` of the full teacher
logits ``z`` at each temperature ``T`` of a small grid, so a loss at any of those temperatures knows
the exact teacher probability of every stored class, ``p_c = exp(z_c / T - lse_T)``, and for top-k
the exact mass outside the kept classes, ``1 - sum_k p_k``.

``sampled`` draws ``S`` classes with replacement from the teacher's distribution at the proposal
temperature ``T_p`` and stores each distinct class once with its count (count 0 marks padding).
Draws come from a generator seeded with ``(seed, first row)`` of each batch, so a seed gives the same
cache.

Example:
    >>> targets = sparsify(torch.randn(4, 100), kind="topk", size=5, temperatures=(1.0, 4.0))
    >>> sorted(targets)
    ['logsumexp', 'topk_indices', 'topk_logits']
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("dense", "topk", "sampled")
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
FIELDS = {
    "dense": ("logits",),
    "topk": ("topk_logits", "topk_indices", "logsumexp"),
    "sampled": ("sample_logits", "sample_indices", "sample_counts", "logsumexp"),
}


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def count_dtype(samples: int) -> np.dtype:
    return index_dtype(samples + 1)


def target_dtype(kind: str, *, num_classes: int, size: int, store_dtype: str, temperatures: int) -> np.dtype:
    """One row of a cache's soft targets: a plain float row for dense, a structured row otherwise."""
    if kind == "dense":
        return np.dtype((store_dtype, (num_classes,)))
    draws, size = size, min(size, num_classes)  # S draws hit at most C distinct classes
    fields = [
        (FIELDS[kind][0], store_dtype, (size,)),
        (FIELDS[kind][1], index_dtype(num_classes), (size,)),
    ]
    if kind == "sampled":
        fields.append(("sample_counts", count_dtype(draws), (size,)))
    fields.append(("logsumexp", np.float32, (temperatures,)))
    return np.dtype(fields)


def sparsify(
    logits: torch.Tensor,
    *,
    kind: str,
    size: int,
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES,
    proposal_temperature: float = 1.0,
    seed: int = 0,
    start_row: int = 0,
) -> dict[str, torch.Tensor]:
    """The sparse targets of a batch of teacher logits ``[B, C]``, computed where the logits are."""
    z = logits.float()
    lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)
    if kind == "topk":
        values, indices = z.topk(size, dim=1)
        return {"topk_logits": values, "topk_indices": indices, "logsumexp": lse}
    if kind != "sampled":
        raise ValueError(f"unknown sparse kind {kind!r}")
    generator = torch.Generator(device=z.device).manual_seed(seed * 1_000_003 + start_row)
    draws = torch.multinomial(torch.softmax(z / proposal_temperature, dim=1), size, replacement=True, generator=generator)
    counts = torch.zeros_like(z).scatter_add_(1, draws, torch.ones_like(draws, dtype=z.dtype))
    # Distinct classes first (most drawn first), padding (count 0) after; ties broken by class index.
    top_counts, indices = counts.topk(min(size, z.shape[1]), dim=1, sorted=True)
    return {
        "sample_logits": z.gather(1, indices),
        "sample_indices": indices,
        "sample_counts": top_counts,
        "logsumexp": lse,
    }


def to_rows(targets: dict[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Pack arrays into a structured numpy array of ``dtype`` (one element per sample)."""
    rows = np.empty(len(next(iter(targets.values()))), dtype=dtype)
    for name in dtype.names:
        rows[name] = targets[name]
    return rows


def teacher_argmax(targets: np.ndarray) -> np.ndarray:
    """The teacher's top class per row of cached targets (for sampled, the best stored class)."""
    if targets.dtype.names is None:
        return torch.from_numpy(np.ascontiguousarray(targets)).argmax(1).numpy()
    if "topk_indices" in targets.dtype.names:
        return targets["topk_indices"][:, 0].astype(np.int64)
    best = torch.from_numpy(np.ascontiguousarray(targets["sample_logits"])).argmax(1).numpy()
    return targets["sample_indices"][np.arange(len(targets)), best].astype(np.int64)
