"""Shuffled loader rows/s over caches of each kind of stored target, in one format: dense float16
logits, top-k K = 10 converted from them (class indices compressed), and dense logits compressed
(`--compress-logits`). Prints one JSON line, the best epoch of each cache.

Run it with two versions on PYTHONPATH, alternating, to compare their read paths on the same files
(the caches are written once, by whichever version runs first, and reused):

    git archive <commit> | tar -x -C /tmp/base
    for i in 1 2 3; do
        PYTHONPATH=/tmp/base python scripts/bench_loader_kinds.py --format .h5 --workdir /tmp/blk
        python scripts/bench_loader_kinds.py --format .h5 --workdir /tmp/blk
    done
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from softlabels import CacheWriter, Dense, Layout, SoftTargetLoader, TopK, open_cache, open_data
from softlabels.convert import convert_cache

CLASSES, FEATURES, CHUNK_ROWS = 1000, 64, 256


def make_dense(path: Path, source, compress: bool) -> Path:
    """Teacher-like float16 logits, 16 distinct chunks reused round-robin (generating them all would
    dominate the run)."""
    if path.exists():
        return path
    rows = len(source)
    pool = np.random.default_rng(1).normal(0, 2, size=(16, CHUNK_ROWS, CLASSES)).astype(np.float16)
    labels = np.asarray(source.labels())
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": rows}}
    with CacheWriter(path, Layout(Dense(), rows, CLASSES, "float16", CHUNK_ROWS), manifest=manifest,
                     compress_logits=compress) as writer:
        for chunk in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(chunk)
            writer.write_chunks(chunk, {"logits": pool[chunk % 16][:stop - start]}, labels[start:stop])
        writer.finish()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=[".h5", ".zarr"], default=".h5")
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per cache; the best is reported")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_loader_kinds"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"inputs-{args.rows}.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.normal(size=(args.rows, FEATURES)).astype(np.float32), y=rng.integers(0, CLASSES, args.rows))
    source = open_data(str(data))
    dense = make_dense(args.workdir / f"dense-{args.rows}{args.format}", source, compress=False)
    caches = {"dense": dense, "topk": args.workdir / f"topk-{args.rows}{args.format}",
              "dense compressed": make_dense(args.workdir / f"gzip-{args.rows}{args.format}", source, compress=True)}
    if not caches["topk"].exists():
        convert_cache(dense, caches["topk"], kind=TopK(k=10), progress=False)
    rates = {}
    for name, path in caches.items():
        cache = open_cache(path)
        best = 0.0
        for epoch in range(args.epochs):
            began, rows = time.perf_counter(), 0
            for batch in SoftTargetLoader(source, cache, batch_size=1024, seed=epoch):
                rows += len(batch.indices)
            best = max(best, rows / (time.perf_counter() - began))
        rates[name] = round(best)
    print(json.dumps({"format": args.format, "rows_per_second": rates}))


if __name__ == "__main__":
    main()
