"""Performance of softlabels, as ratios measured within one run. Prints Markdown for BENCHMARKS.md.

    python scripts/bench.py                       # every section, 1 GB and 8 GB caches
    python scripts/bench.py --sections dump,stream --big-gb 0

Sections:
  dump      wall time of `dump` over the teacher's bare forward pass (same data, batch, device): the median of
            alternating rounds, with the teacher on every core and on one
  stream    loader rows/s against raw chunk-file reads of the same arrays, sequential whole-chunk reads and
            per-row reads, C = 1000, >= 1 GB (best of 3 alternating runs)
  train     an epoch from the cache against an epoch on hard labels (same loop), and against online
            distillation (the teacher run at every step), with the ideal speed-up measured
  students  K = 4 students in one command against 4 commands: chunk reads and wall time
  memory    peak RSS of `softlabels train-student` over a 1 GB and an 8 GB cache (C = 1000)
  tokens    tokens/s the loader serves from a top-k K = 32 token cache of --tokens tokens (windows of
            512, vocabulary 32,768) with its input ids, against raw reads of the same chunk files
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr

import softlabels
from softlabels import CacheWriter, SoftTargetLoader, StudentSpec, TrainConfig, kd_loss, open_cache, open_data
from softlabels.checkpoint import LoadedModel
from softlabels.dump import iter_logits
from softlabels.store import Cache
from softlabels.tokens import GOLD, gold_record, token_manifest

CLASSES = 1000
FEATURES = 16


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def make_synthetic_cache(root: Path, rows: int, fmt: str = ".zarr") -> Path:
    """A cache of teacher-like float16 logits over zarr inputs, C = 1000, written chunk by chunk."""
    data = root / f"inputs-{rows}.zarr"
    rng = np.random.default_rng(0)
    if not data.exists():
        group = zarr.open_group(str(data), mode="w")
        x = group.create_array("x", shape=(rows, FEATURES), chunks=(4096, FEATURES), dtype="float32")
        y = group.create_array("y", shape=(rows,), chunks=(4096,), dtype="int64")
        for s in range(0, rows, 65536):
            n = min(65536, rows - s)
            x[s:s + n] = rng.normal(size=(n, FEATURES)).astype(np.float32)
            y[s:s + n] = rng.integers(0, CLASSES, n)
    source = open_data(str(data))
    chunk_rows = softlabels.store.default_chunk_rows(CLASSES * 2, fmt)
    path = root / f"synthetic-{rows}-chunks-{chunk_rows}{fmt}"  # a kept workdir's cache of other chunks is not this one
    if path.exists():
        return path
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": rows}}
    # A pool of 64 distinct chunks, reused round-robin: generating 4e9 normals would dominate the run.
    pool = rng.normal(0.0, 2.0, size=(64, chunk_rows, CLASSES)).astype(np.float32)
    pool[:, np.arange(chunk_rows), rng.integers(0, CLASSES, chunk_rows)] += 10.0
    pool = pool.astype(np.float16)
    labels = np.asarray(open_data(str(data)).labels())
    layout = softlabels.Layout(softlabels.Dense(), rows, CLASSES, "float16", chunk_rows)
    with CacheWriter(path, layout, manifest=manifest) as w:
        for i in range(w.num_chunks):
            a, b = w.chunk_bounds(i)
            w.write_chunks(i, {"logits": pool[i % 64][: b - a]}, labels[a:b])
        w.finish()
    return path


def bench_dump(root: Path, sizes: list[int], rounds: int, threads: list[int]) -> None:
    print("\n### Dump overhead\n")
    batch = 256
    print(f"Samples of 256 features, C = {CLASSES}, batch {batch}, CPU, float16 storage. {rounds} rounds, each a "
          "bare forward pass (outputs discarded), a dump to .zarr and one to .h5, in rotating order; a ratio is a "
          "dump's time over its round's forward pass, shown as the median of the rounds (lowest-highest). Each "
          "dump writes a new path (the previous output is removed before the clock starts).\n")
    row("teacher", "samples", "torch threads", "forward pass (s, median)", "dump to .zarr / forward", "dump to .h5 / forward")
    row("---", "---:", "---:", "---:", "---:", "---:")
    default_threads = torch.get_num_threads()
    for width in (1024, 4096):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, CLASSES),
        )
        teacher = LoadedModel(model, root / "teacher.pth", "0" * 64, "mlp-bench")
        params = sum(p.numel() for p in model.parameters())
        for rows in sizes:
            x = np.random.default_rng(0).normal(size=(rows, 256)).astype(np.float32)
            np.savez(root / "dump-inputs.npz", x=x)
            source = open_data(str(root / "dump-inputs.npz"))

            def forward_only():
                for _ in iter_logits(model, source, batch_size=batch, device="cpu"):
                    pass

            def dump_to(fmt):
                out = root / f"bench-dump{fmt}"
                softlabels.store.remove_path(out)
                return timed(lambda: softlabels.dump(teacher, source, out, batch_size=batch, device="cpu", progress=False))

            runs = {"forward": lambda: timed(forward_only), ".zarr": lambda: dump_to(".zarr"), ".h5": lambda: dump_to(".h5")}
            names = list(runs)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                forward_only()  # warm-up
                times = {name: [] for name in names}
                for r in range(rounds):
                    for name in names[r % 3:] + names[:r % 3]:
                        times[name].append(runs[name]())
                ratios = {fmt: sorted(d / f for d, f in zip(times[fmt], times["forward"])) for fmt in (".zarr", ".h5")}
                row(f"MLP 256-{width}-{width}-{CLASSES} ({params / 1e6:.1f}M parameters)", f"{rows:,}", n_threads,
                    f"{float(np.median(times['forward'])):.2f}", *(_median_range(ratios[fmt]) for fmt in (".zarr", ".h5")))
    torch.set_num_threads(default_threads)


def _median_range(values: list[float]) -> str:
    return f"{float(np.median(values)):.3f} ({min(values):.2f}-{max(values):.2f})"


def bench_stream(root: Path, rows: int) -> None:
    print("\n### Streaming soft targets\n")
    for fmt in (".zarr", ".h5"):
        path = make_synthetic_cache(root, rows, fmt)
        inputs = root / f"inputs-{rows}.zarr"
        cache = open_cache(path)
        source = softlabels.source_for_cache(cache)

        def sequential():
            for _ in cache.iter_chunks():
                pass

        def shuffled():
            loader = SoftTargetLoader(source, cache, batch_size=1024, seed=0)
            for _ in loader:
                pass

        # The limit: the chunk files of everything the loader reads (logits, labels, inputs), read raw.
        # The page cache is warmed by the first of 3 alternating runs of each; the best of each is kept.
        raw_s = seq_s = loader_s = math.inf
        for _ in range(3):
            raw_s = min(raw_s, timed(lambda: (raw_chunk_reads(path), raw_chunk_reads(path, "labels"), raw_chunk_reads(inputs, "x"))))
            seq_s = min(seq_s, timed(sequential))
            loader_s = min(loader_s, timed(shuffled))
        # the raw zarr/h5py array: what a naive per-row Dataset would index
        logits = zarr.open_group(str(path), mode="r")["logits"] if fmt == ".zarr" else h5py.File(path, "r")["logits"]
        probe = np.random.default_rng(1).choice(rows, 400, replace=False)
        row_s = timed(lambda: [np.asarray(logits[int(i)]) for i in probe])
        seq_rate, loader_rate, row_rate, raw_rate = rows / seq_s, rows / loader_s, len(probe) / row_s, rows / raw_s
        size = cache.nbytes_on_disk() / 1e9
        print(f"{fmt} cache: {rows:,} x {CLASSES} float16 ({rows * CLASSES * 2 / 1e9:.2f} GB of logits, {size:.2f} GB on disk), "
              f"{cache.chunk_rows} rows per chunk, page cache warm.\n")
        row("reader", "rows/s", "loader over it")
        row("---", "---:", "---:")
        row("raw reads of the logits, labels and inputs chunk files, shuffled, one reused buffer (the limit)",
            f"{raw_rate:,.0f}", f"{loader_rate / raw_rate:.2f}x")
        row("sequential whole-chunk reads (logits only)", f"{seq_rate:,.0f}", f"{loader_rate / seq_rate:.2f}x")
        row("naive per-row `__getitem__` (400 random rows)", f"{row_rate:,.0f}", f"{loader_rate / row_rate:,.0f}x")
        row("SoftTargetLoader, shuffled, with inputs, batch 1024", f"{loader_rate:,.0f}", "1.00x")
        print()
        cache.close()


def raw_chunk_reads(path: Path, name: str = "logits") -> None:
    """Read every stored chunk of array ``name`` once, in shuffled order, into one reused buffer,
    checking nothing: what the storage and the page cache allow, for the loader to be measured against."""
    order = np.random.default_rng(0)
    if path.suffix == ".zarr":
        files = sorted((path / name / "c").rglob("*"))
        files = [files[i] for i in order.permutation(len(files)) if files[i].is_file()]
        buffer = memoryview(bytearray(max(f.stat().st_size for f in files)))
        for file in files:
            with open(file, "rb", buffering=0) as f:
                f.readinto(buffer)
        return
    with h5py.File(path, "r") as f:
        places = []
        f[name].id.chunk_iter(lambda info: places.append((info.byte_offset, info.size)))
    buffer = memoryview(bytearray(max(size for _, size in places)))
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in order.permutation(len(places)):
            where, size = places[i]
            os.preadv(fd, [buffer[:size]], where)
    finally:
        os.close(fd)


TOKEN_VOCAB, TOKEN_K, TOKEN_LEN = 32768, 32, 512


def make_token_cache(root: Path, tokens: int) -> Path:
    """A top-k K = 32 token cache over random token windows, written chunk by chunk from a pool of
    synthetic chunks (sorted logits, class indices, log-partitions, gold log-probabilities)."""
    windows = -(-tokens // TOKEN_LEN)
    data = root / f"tokens-{windows}.npz"
    rng = np.random.default_rng(0)
    if not data.exists():
        np.savez(data, input_ids=rng.integers(0, TOKEN_VOCAB, (windows, TOKEN_LEN), dtype=np.int32))
    kind, items, records = softlabels.TopK(k=TOKEN_K), (("token", TOKEN_LEN),), (gold_record(TOKEN_LEN),)
    row_bytes = softlabels.Layout(kind, windows, TOKEN_VOCAB, "float16", 1, items, records).row_bytes
    chunk_rows = softlabels.store.default_chunk_rows(row_bytes, ".zarr")
    path = root / f"tokens-top{TOKEN_K}-{windows}-chunks-{chunk_rows}.zarr"
    if path.exists():
        return path
    source = open_data(str(data))
    layout = softlabels.Layout(kind, windows, TOKEN_VOCAB, "float16", chunk_rows, items, records)
    rows = layout.chunk_rows
    pool = [{
        "topk_logits": -np.sort(-rng.normal(0.0, 3.0, (rows, TOKEN_LEN, TOKEN_K)), axis=-1).astype(np.float16),
        "topk_indices": rng.integers(0, TOKEN_VOCAB, (rows, TOKEN_LEN, TOKEN_K)).astype(np.uint16),
        "logsumexp": rng.normal(8.0, 1.0, (rows, TOKEN_LEN, len(kind.temperatures))).astype(np.float32),
    } for _ in range(8)]
    gold = -rng.exponential(2.0, (rows, TOKEN_LEN)).astype(np.float16)
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": windows},
                "tokens": token_manifest(source, TOKEN_VOCAB)}
    with CacheWriter(path, layout, manifest=manifest) as w:
        for i in range(w.num_chunks):
            a, b = w.chunk_bounds(i)
            w.write_chunks(i, {k: v[: b - a] for k, v in pool[i % 8].items()}, source.read(a, b)[1], {GOLD: gold[: b - a]})
        w.finish()
    return path


def bench_tokens(root: Path, tokens: int) -> None:
    print("\n### Streaming a token cache\n")
    began = time.perf_counter()
    path = make_token_cache(root, tokens)
    made = time.perf_counter() - began
    cache = open_cache(path)
    source = softlabels.source_for_cache(cache)
    count = len(cache) * TOKEN_LEN
    batch = 64  # windows: 32,768 tokens

    def serve():
        for _ in SoftTargetLoader(source, cache, batch_size=batch, seed=0):
            pass

    raw, served = [], []
    for _ in range(2):  # alternating, best of each
        raw.append(timed(lambda: [raw_chunk_reads(path, name) for name in ("topk_logits", "topk_indices", "logsumexp", GOLD, "labels")]))
        served.append(timed(serve))
    size = cache.nbytes_on_disk() / 1e9
    print(f"Top-k K = {TOKEN_K} token cache (Zarr): {len(cache):,} windows of {TOKEN_LEN} tokens ({count:,} tokens), vocabulary "
          f"{TOKEN_VOCAB:,}, {size:.2f} GB on disk ({cache.nbytes_on_disk() / count:.1f} B per token), {cache.chunk_rows} windows "
          f"per chunk, written in {made:.0f} s (0 s: reused); page cache warm, best of 2.\n")
    row("reader", "tokens/s", "GB/s", "loader over it")
    row("---", "---:", "---:", "---:")
    row("raw reads of every array's chunk files, shuffled, one reused buffer (the limit)", f"{count / min(raw):,.0f}",
        f"{size / min(raw):.2f}", f"{min(raw) / min(served):.2f}x")
    row(f"SoftTargetLoader, shuffled, with input ids, batch {batch} windows", f"{count / min(served):,.0f}",
        f"{size / min(served):.2f}", "1.00x")
    print()
    cache.close()


def _epoch_seconds(source, cache, student, *, hard: bool, batch_size: int) -> float:
    config = TrainConfig(epochs=1, batch_size=batch_size, hard_labels_only=hard, device="cpu")
    return timed(lambda: softlabels.train_students([StudentSpec(*student)], source=source, cache=None if hard else cache,
                                                   config=config, num_classes=cache.num_classes, progress=False))


def bench_train(root: Path, rows: int) -> None:
    print("\n### Training from the cache\n")
    print("One epoch, the same `train_students` loop; the hard-label run reads inputs and labels, the cached run "
          "also the logits and adds the KD loss. Best of 2.\n")
    row("data", "student", "hard labels only (s)", "from the cache (s)", "ratio")
    row("---", "---", "---:", "---:", "---:")
    cache = open_cache(make_synthetic_cache(root, rows))
    source = softlabels.source_for_cache(cache)
    student = ("mlp", {"width": 256, "depth": 1})
    hard = min(_epoch_seconds(source, cache, student, hard=True, batch_size=1024) for _ in range(2))
    soft = min(_epoch_seconds(source, cache, student, hard=False, batch_size=1024) for _ in range(2))
    row(f"synthetic, {rows:,} rows, C = {CLASSES}, batch 1024", "mlp 16-256-1000", f"{hard:.2f}", f"{soft:.2f}", f"{soft / hard:.3f}")

    teacher_path = root / "mnist1d-teacher" / "teacher" / "student.pth"
    if not teacher_path.exists():
        softlabels.train_students([StudentSpec("cnn1d", {"channels": 64}, name="teacher")], source=open_data("mnist1d://train"),
                                  cache=None, config=TrainConfig(epochs=10, hard_labels_only=True, device="cpu"),
                                  out_dir=teacher_path.parent.parent, num_classes=10, progress=False)
    teacher = softlabels.load_model(teacher_path)
    labeled = root / "mnist1d-transfer-labeled.npz"
    cache_path = root / "mnist1d-transfer-labeled.zarr"
    if not cache_path.exists():  # the teacher's argmax as hard labels, so both runs train on the same rows
        transfer = open_data("mnist1d://transfer?n=40000&seed=1")
        x = transfer.read(0, len(transfer))[0]
        with torch.inference_mode():
            y = teacher.model(torch.from_numpy(x)).argmax(1).numpy()
        np.savez(labeled, x=x, y=y)
        softlabels.dump(teacher, open_data(str(labeled)), cache_path, device="cpu", progress=False)
    mcache = open_cache(cache_path)
    msource = softlabels.source_for_cache(mcache)
    hard = min(_epoch_seconds(msource, mcache, ("mlp", {}), hard=True, batch_size=128) for _ in range(2))
    soft = min(_epoch_seconds(msource, mcache, ("mlp", {}), hard=False, batch_size=128) for _ in range(2))
    row("MNIST-1D transfer, 40,000 rows, C = 10, batch 128", "mlp 40-100-100-10", f"{hard:.2f}", f"{soft:.2f}", f"{soft / hard:.3f}")
    print()
    transfer = msource

    # Online distillation runs the teacher at every step; the same loop below serves both.
    loader = SoftTargetLoader(transfer, mcache, batch_size=128, seed=0)

    def epoch(online: bool) -> float:
        torch.manual_seed(0)
        student = softlabels.build_model("mlp", input_shape=(40,), num_classes=10)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        model = teacher.model.eval()

        def run():
            for batch in loader:
                if online:
                    with torch.inference_mode():
                        targets = model(batch.inputs)
                else:
                    targets = batch.teacher_logits
                loss = kd_loss(student(batch.inputs), targets, batch.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return timed(run)

    def teacher_pass():
        with torch.inference_mode():
            for batch in loader:
                teacher.model(batch.inputs)

    t_teacher = min(timed(teacher_pass) for _ in range(2))
    t_cached = min(epoch(False) for _ in range(2))
    t_online = min(epoch(True) for _ in range(2))
    ideal = (t_teacher + t_cached) / t_cached
    print(f"Online against cached distillation, MNIST-1D transfer (40,000 rows), teacher cnn1d-64 "
          f"({sum(p.numel() for p in teacher.model.parameters()):,} parameters), student mlp, batch 128:\n")
    row("measure", "seconds per epoch")
    row("---", "---:")
    row("t_teacher: teacher forward over the epoch", f"{t_teacher:.2f}")
    row("t_student: student epoch from the cache", f"{t_cached:.2f}")
    row("online epoch (teacher at every step)", f"{t_online:.2f}")
    print(f"\nSpeed-up of the cache over online distillation: {t_online / t_cached:.2f}x; ideal "
          f"(t_teacher + t_student) / t_student = {ideal:.2f}x; reached {t_online / t_cached / ideal:.0%} of the ideal.\n")


def bench_students(root: Path, rows: int) -> None:
    print("\n### Many students, one read\n")
    cache = open_cache(make_synthetic_cache(root, rows))
    source = softlabels.source_for_cache(cache)
    reads = []
    original = Cache.read_ranges  # the loader's one read path
    Cache.read_ranges = lambda self, ranges, reuse=None, order=None: reads.extend(b - a for a, b in ranges) or original(self, ranges, reuse, order)
    config = TrainConfig(epochs=1, batch_size=1024, device="cpu")
    students = [StudentSpec("linear", name=f"linear-{i}") for i in range(4)]
    try:
        together = timed(lambda: softlabels.train_students(students, source=source, cache=cache, config=config, progress=False))
        reads_together = sum(reads)
        reads.clear()
        apart = sum(timed(lambda s=s: softlabels.train_students([s], source=source, cache=cache, config=config, progress=False))
                    for s in students)
        reads_apart = sum(reads)
    finally:
        Cache.read_ranges = original
    print(f"4 linear students (16 -> {CLASSES}), one epoch over {rows:,} rows, C = {CLASSES}:\n")
    row("run", "rows read from the cache", "seconds")
    row("---", "---:", "---:")
    row("one command, 4 x --student", f"{reads_together:,}", f"{together:.1f}")
    row("4 commands, one student each", f"{reads_apart:,}", f"{apart:.1f}")
    print(f"\nReads: {reads_apart / reads_together:.1f}x fewer in one command; wall time {apart / together:.2f}x shorter.\n")


def peak_rss_mb(args: list[str]) -> float:
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def bench_memory(root: Path, small_rows: int, big_gb: float) -> None:
    print("\n### Memory against cache size\n")
    sizes = [small_rows] + ([int(big_gb * 1e9 / (CLASSES * 2))] if big_gb else [])
    row("cache (logits)", "rows", "peak RSS of train-student, MB")
    row("---", "---:", "---:")
    peaks = []
    for rows in sizes:
        path = make_synthetic_cache(root, rows)
        peak = peak_rss_mb([sys.executable, "-m", "softlabels", "train-student", "--cache", str(path), "--student", "linear",
                            "--epochs", "1", "--batch-size", "1024", "--device", "cpu", "--quiet", "--overwrite",
                            "--out", str(root / "mem-run")])
        peaks.append(peak)
        row(f"{rows * CLASSES * 2 / 1e9:.2f} GB", f"{rows:,}", f"{peak:,.0f}")
    if len(peaks) == 2:
        print(f"\nGrowth from the small to the large cache: {peaks[1] - peaks[0]:+.0f} MB.\n")


def main() -> None:
    softlabels.keep_freed_memory()  # as the softlabels command does: measured as users run it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="dump,stream,train,students,memory,tokens")
    parser.add_argument("--rows", type=int, default=524288, help="rows of the C = 1000 cache (524288 = 1.05 GB)")
    parser.add_argument("--dump-rows", default="16384,65536", help="dataset sizes of the dump section, comma-separated")
    parser.add_argument("--dump-rounds", type=int, default=7, help="rounds of the dump section (forward, .zarr, .h5 each)")
    parser.add_argument("--dump-threads", default=f"{torch.get_num_threads()},1",
                        help="torch threads of the dump section's teacher, comma-separated (1 leaves the writer a core)")
    parser.add_argument("--big-gb", type=float, default=8.0, help="size of the large cache for the memory section (0: skip)")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="tokens of the token cache (tokens section)")
    parser.add_argument("--workdir", help="keep generated caches here between runs")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"zarr {zarr.__version__}. Command: `python scripts/bench.py {' '.join(sys.argv[1:])}`".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if "dump" in sections:
            bench_dump(root, [int(n) for n in args.dump_rows.split(",")], args.dump_rounds,
                       [int(n) for n in args.dump_threads.split(",")])
        if "stream" in sections:
            bench_stream(root, args.rows)
        if "train" in sections:
            bench_train(root, args.rows)
        if "students" in sections:
            bench_students(root, args.rows)
        if "memory" in sections:
            bench_memory(root, args.rows, args.big_gb)
        if "tokens" in sections:
            bench_tokens(root, args.tokens)


if __name__ == "__main__":
    main()
