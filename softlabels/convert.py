"""Derive a sparse cache (top-k or sampled) from a dense one, without running the teacher again.

Example:
    >>> convert_cache("train.zarr", "train-top10.zarr", sparse={"kind": "topk", "k": 10})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .dump import sparse_settings
from .errors import SoftlabelsError
from .sparse import sparsify, to_rows
from .store import CacheWriter, directory_bytes, dump_lock, open_cache, sparse_size

# Fields the writer sets itself; everything else in the source manifest (teacher, dataset, ...) carries over.
_WRITER_FIELDS = {"format", "format_version", "kind", "num_samples", "num_classes", "dtype", "chunk_rows",
                  "compress_logits", "complete", "k", "samples", "temperatures", "proposal_temperature", "sample_seed"}


def convert_cache(src: str | Path, dst: str | Path, *, sparse: dict[str, Any], overwrite: bool = False, progress: bool = True) -> int:
    """Write the sparse form of the dense cache ``src`` to ``dst``; return its size on disk in bytes."""
    dst = Path(dst)
    settings = sparse_settings(sparse)
    if not settings:
        raise SoftlabelsError("convert needs --top-k K or --sample S")
    with open_cache(src) as cache, dump_lock(dst):
        if cache.kind != "dense":
            raise SoftlabelsError(f"{src} is a {cache.kind} cache; convert reads dense caches")
        if settings["kind"] == "topk" and sparse_size(settings) > cache.num_classes:
            raise SoftlabelsError(f"--top-k {settings['k']} exceeds the cache's {cache.num_classes} classes")
        if dst.exists() and not overwrite:
            raise SoftlabelsError(f"{dst} already exists; pass --overwrite to replace it")
        manifest = {key: value for key, value in cache.manifest.items() if key not in _WRITER_FIELDS}
        manifest["converted_from"] = {"path": str(Path(src).resolve()), "kind": "dense", "dtype": cache.manifest["dtype"]}
        with CacheWriter(
            dst, num_samples=len(cache), num_classes=cache.num_classes, chunk_rows=cache.chunk_rows,
            dtype=cache.manifest["dtype"], manifest=manifest, sparse=settings,
        ) as writer:
            for index, (start, logits, labels) in enumerate(
                tqdm(cache.iter_chunks(), total=cache.num_chunks, unit="chunk", desc="convert", disable=None if progress else True)
            ):
                targets = sparsify(
                    torch.from_numpy(logits), kind=settings["kind"], size=sparse_size(settings),
                    temperatures=tuple(settings["temperatures"]), proposal_temperature=settings.get("proposal_temperature", 1.0),
                    seed=settings.get("sample_seed", 0), start_row=start,
                )
                writer.write_chunk(index, to_rows({k: v.numpy() for k, v in targets.items()}, writer.row_dtype), labels)
            writer.finish()
    return directory_bytes(dst)
