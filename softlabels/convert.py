"""New caches from existing ones, without running the teacher: a sparse kind from a dense cache, a
view cache with fewer views, or a version-1 cache rewritten in the current format.

Example::

    convert_cache("train.zarr", "train-top10.zarr", kind=TopK(k=10))
    convert_cache("views64.zarr", "views16.zarr", keep_views=16)   # the first 16 views of each sample
    convert_cache("old-v1.h5", "new.h5")          # same kind, current format version
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import SoftlabelsError
from .kinds import TargetKind
from .durable import exclusive
from .store import (Cache, CacheWriter, Layout, backend_name, check_replaceable, chunk_checksum, directory_bytes, open_cache,
                    partial_path, remove_path)
from .views import GROUP as VIEW_RECORDS, Views

# Fields the writer sets itself from the layout; everything else (teacher, dataset, ...) carries over.
_LAYOUT_FIELDS = {"format", "format_version", "num_samples", "num_classes", "dtype", "chunk_rows", "item_axes",
                  "compress_logits", "complete", "records"}


def convert_cache(
    src: str | Path, dst: str | Path, *, kind: TargetKind | None = None, keep_views: int | None = None,
    overwrite: bool = False, progress: bool = True,
) -> int:
    """Write ``src`` to ``dst`` as ``kind`` (from a dense cache), or with ``kind=None`` as the same
    kind in the current format; ``keep_views`` keeps the first views of a view cache, their records
    with them. Return the new cache's size on disk in bytes."""
    dst = Path(dst)
    backend_name(dst)  # a path of another suffix is refused before anything is read, made or replaced
    source, target = Path(src).resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:  # --overwrite would replace what is read
        where = "the source cache" if target == source else "inside the source cache" if source in target.parents else "around the source cache"
        raise SoftlabelsError(f"{dst} is {where} {src}: write the converted cache to another path")
    with open_cache(src) as cache, exclusive(dst, "convert"):
        count = Views.count_of(cache)  # the manifest's views are carried over (or cut): refused as training refuses them
        old_kind = cache.kind
        if kind is not None and old_kind.full_logits(cache.read(0, min(1, len(cache)))[0]) is None:
            raise SoftlabelsError(f"{src} is a {old_kind.name} cache; only a cache of full logits (dense) converts to another kind")
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise SoftlabelsError(f"{dst} already exists; pass --overwrite to replace it")
            check_replaceable(dst)
        new_kind = kind or old_kind
        new_kind.validate(num_classes=cache.num_classes, where=f"converting {src}")
        settings = set(old_kind.settings())
        manifest = {key: value for key, value in cache.manifest.items() if key not in _LAYOUT_FIELDS | settings}
        manifest["converted_from"] = {"path": str(Path(src).resolve()), "format_version": cache.manifest["format_version"],
                                      **old_kind.settings(), "dtype": cache.layout.dtype}
        item_axes, records = cache.layout.item_axes, cache.layout.records
        views = slice(None)
        if keep_views is not None:
            if count is None:
                raise SoftlabelsError(f"--keep-views: {src} is not a view cache")
            if not 1 <= keep_views <= count:
                raise SoftlabelsError(f"--keep-views must be between 1 and the {count} views of {src}, got {keep_views}")
            views = slice(0, keep_views)
            item_axes = ((item_axes[0][0], keep_views), *item_axes[1:])
            records = tuple(dataclasses.replace(r, shape=(keep_views, *r.shape[1:])) if r.name.startswith(VIEW_RECORDS) else r
                            for r in records)  # the views' own parameters; a row's other records stay whole
            manifest["views"] = {**cache.manifest["views"], "count": keep_views}
            manifest["teacher_accuracy"] = None  # the dump's count covered views that are gone; inspect counts the kept ones
        layout = Layout(new_kind, len(cache), cache.num_classes, cache.layout.dtype, cache.chunk_rows, item_axes, records)
        _convert_chunks(cache, src, dst, layout, manifest, new_kind, old_kind if kind is not None else None, views,
                        keep_views is not None, progress)
    return directory_bytes(dst)


def _convert_chunks(cache: Cache, src: str | Path, dst: Path, layout: Layout, manifest: dict[str, Any], new_kind: TargetKind,
                    old_kind: TargetKind | None, views: slice, keep_views: bool, progress: bool) -> None:
    """Write every chunk of ``cache`` to ``dst``, rebuilt as ``new_kind`` from ``old_kind``'s full
    logits if given, each checked against the commit record first (a chunk file moved since the dump
    passes its own crc32c). A conversion does not resume: on failure its partial cache is removed."""
    writer = CacheWriter(dst, layout, manifest=manifest, compress_logits=bool(cache.manifest.get("compress_logits")))
    try:
        with writer:
            recorded = cache.checksums()
            chunks = tqdm(cache.iter_chunks(), total=cache.num_chunks, unit="chunk", desc="convert", disable=None if progress else True)
            for index, (start, targets, labels) in enumerate(chunks):
                records = cache.read_records(start, start + len(labels))
                if chunk_checksum(targets, labels, records) != recorded[index]:
                    raise SoftlabelsError(f"{src}: chunk {index} does not match its commit record; run softlabels verify {src}")
                kept = {name: r[:, views] if name.startswith(VIEW_RECORDS) else r for name, r in records.items()}
                if keep_views:
                    targets, labels = {name: t[:, views] for name, t in targets.items()}, labels[:, views]
                if old_kind is not None:
                    logits = torch.from_numpy(old_kind.full_logits(targets))
                    rows = torch.arange(start, start + len(labels))
                    targets = {k: v.numpy() for k, v in new_kind.build(logits, rows=rows, store_dtype=logits.dtype).items()}
                writer.write_chunks(index, targets, labels, kept)
            writer.finish()
    except BaseException:
        remove_path(partial_path(dst))
        raise
