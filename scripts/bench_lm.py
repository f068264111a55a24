"""Token caches for language models: students' quality per kind of cached target, dump speed and
loader speed. Prints Markdown for BENCHMARKS.md.

    python scripts/bench_lm.py --workdir /tmp/bench_lm                      # every section, ~40 min on 2 cores
    python scripts/bench_lm.py --workdir /tmp/bench_lm --sections dump,loader --reuse

The recipe is scripts/demo_lm.sh's, with more epochs: the help texts of the standard library's
``pydoc_data/topics.py`` (one document per topic; every tenth topic, in sorted order from the fourth,
held out), a byte-level BPE tokenizer trained on the training topics, windows of 64 tokens, the
built-in decoder ``gpt`` as teacher (4 layers, 256 wide, 3.7M parameters) trained on the training
text's next tokens, and two ``gpt`` students (2 x 128 and 1 x 64) trained in one pass per
configuration.

Sections:
  quality  held-out nats per token and ECE of the students: next tokens alone (CE), dense KD, top-k
           (renormalised, exact tail, tail to the gold token) and compact sampled targets, each at
           three sizes, with each cache's bytes per token (soft targets only: alpha = 0, T = 1)
  dump     wall time of `dump` over the teacher's bare forward pass on the same batches (dense, top-k,
           sampled), alternating, the median of --repeats rounds
  loader   tokens/s the SoftTargetLoader serves from each cache (inputs included) against the tokens/s
           the small student consumes in training from the same cache
  allocator  the dump command's time with glibc's malloc as it comes against freed memory kept for
           reuse (softlabels.keep_freed_memory, which the command calls); not run by default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import softlabels
from softlabels import Dense, Sampled, SoftTargetLoader, StudentSpec, TopK, TrainConfig, open_cache, open_data
from softlabels.dump import iter_logits
from softlabels.store import remove_path

sys.path.insert(0, str(Path(__file__).parent))
import lm_corpus  # noqa: E402  (scripts/lm_corpus.py: the demo's corpus and tokenizer)

SEQ_LEN, VOCAB, BATCH = 64, 2048, 16
STUDENT_LR = 2e-3
TEACHER = (4, 256, 4)  # layers, width, heads
STUDENTS = {"gpt-2x128": (2, 128, 4), "gpt-1x64": (1, 64, 2)}
TEMPERATURE = 1.0
TOPK_SIZES = (4, 16, 64)
SAMPLE_SIZES = (8, 24, 96)
TAILS = {"renormalize": "renormalised", "exact": "exact tail", "gold": "tail to the gold token"}


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def softlabels_cli(*args: str, log: Path) -> None:
    """Run ``softlabels ARGS`` as the demo does, its output appended to ``log``; stop on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ softlabels {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "softlabels", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"softlabels {args[0]} failed (exit {done.returncode}); end of {log}:\n" + "\n".join(tail))


def make_corpus(root: Path) -> dict[str, str]:
    """The demo's corpus and tokenizer under ``root``; returns the text specs and a description."""
    described = lm_corpus.make_corpus(root, VOCAB)
    specs = {split: f"text:{root / 'corpus' / split}?tokenizer={root / 'tokenizer.json'}&seq_len={SEQ_LEN}"
             for split in ("train", "heldout")}
    return {**specs, "description": "; ".join(described)}


def arch(layers: int, width: int, heads: int) -> str:
    return f"gpt?layers={layers}&dim={width}&heads={heads}"


def prepare(root: Path, args: argparse.Namespace, log: Path) -> dict:
    """Corpus, tokenizer, teacher and caches (each made unless --reuse finds it)."""
    began = time.perf_counter()
    specs = make_corpus(root)
    archs = {name: arch(*shape) for name, shape in {"teacher": TEACHER, **STUDENTS}.items()}
    teacher = root / "teacher" / "teacher" / "student.pth"
    if not (args.reuse and teacher.exists()):
        softlabels_cli("train-student", "--data", specs["train"], "--hard-labels-only", "--student", f"teacher={archs['teacher']}",
                       "--eval-data", specs["heldout"], "--epochs", str(args.teacher_epochs), "--batch-size", str(BATCH),
                       "--lr", str(args.teacher_lr), "--out", str(root / "teacher"), "--overwrite", "--quiet", log=log)
    teacher_seconds = time.perf_counter() - began
    dump = ["dump", "--teacher", str(teacher), "--quiet", "--overwrite"]
    sparse = ["--temperatures", f"{TEMPERATURE:g}"]
    caches = {"heldout": ["--data", specs["heldout"]], "dense": ["--data", specs["train"]]}
    for k in TOPK_SIZES:
        caches[f"top{k}"] = ["--data", specs["train"], "--top-k", str(k), *sparse]
    for s in SAMPLE_SIZES:
        caches[f"sampled{s}"] = ["--data", specs["train"], "--sample", str(s), "--proposal-temperature", f"{TEMPERATURE:g}", *sparse,
                                 "--compact"]
    for name, options in caches.items():
        path = root / f"{name}.zarr"
        if not (args.reuse and path.exists()):
            softlabels_cli(*dump, *options, "--out", str(path), log=log)
    reports = {}
    for name in caches:
        done = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(root / f"{name}.zarr"), "--json"],
                              capture_output=True, text=True, check=True)
        reports[name] = json.loads(done.stdout)
    teacher_summary = json.loads((root / "teacher" / "summary.json").read_text())[0]
    return {"specs": specs, "archs": archs, "teacher": teacher, "reports": reports,
            "teacher_summary": teacher_summary, "prepare_seconds": time.perf_counter() - began, "teacher_seconds": teacher_seconds}


def bench_quality(root: Path, setup: dict, args: argparse.Namespace, log: Path) -> None:
    specs, archs, reports = setup["specs"], setup["archs"], setup["reports"]
    students = [a for name in STUDENTS for a in ("--student", f"{name}={archs[name]}")]
    common = [*students, "--eval-cache", str(root / "heldout.zarr"), "--epochs", str(args.epochs), "--batch-size", str(BATCH),
              "--lr", f"{STUDENT_LR:g}", "--temperature", f"{TEMPERATURE:g}", "--alpha", "0", "--overwrite", "--quiet"]
    runs = [("CE only (next tokens)", None, ["--data", specs["train"], "--hard-labels-only"], "ce"),
            ("dense KD", "dense", ["--cache", str(root / "dense.zarr")], "dense")]
    for k in TOPK_SIZES:
        for tail, said in TAILS.items():
            runs.append((f"top-k K = {k}, {said}", f"top{k}", ["--cache", str(root / f"top{k}.zarr"), "--topk-tail", tail], f"top{k}-{tail}"))
    for s in SAMPLE_SIZES:
        runs.append((f"sampled S = {s} (compact)", f"sampled{s}", ["--cache", str(root / f"sampled{s}.zarr")], f"sampled{s}"))
    results, began = {}, time.perf_counter()
    for label, cache, options, out in runs:
        run_dir = root / "runs" / out
        if not (args.reuse and (run_dir / "summary.json").exists()):
            softlabels_cli("train-student", *options, *common, "--out", str(run_dir), log=log)
        results[label] = (cache, {e["student"]: e for e in json.loads((run_dir / "summary.json").read_text())})
    seconds = time.perf_counter() - began

    heldout = reports["heldout"]["tokens"]
    teacher = setup["teacher_summary"]
    dense = results["dense KD"][1]
    print("\n### Students' quality per kind of cached target\n")
    print(f"Corpus: {setup['specs']['description']}. Byte-level BPE, vocabulary {VOCAB:,}; windows of {SEQ_LEN} tokens "
          f"({reports['dense']['shape'][0]:,} training, {reports['heldout']['shape'][0]:,} held-out). Teacher: gpt "
          f"{TEACHER[0]} x {TEACHER[1]} ({teacher['params'] / 1e6:.1f}M parameters), {args.teacher_epochs} epochs on the next "
          f"tokens (batch {BATCH} windows, lr {args.teacher_lr:g}): {heldout['teacher_nats_per_token']:.3f} held-out nats per token, "
          f"{teacher['eval_accuracy']:.1%} next-token accuracy. Students: "
          + ", ".join(f"gpt {l} x {w} ({dense[n]['params'] / 1e6:.2f}M parameters)" for n, (l, w, _) in STUDENTS.items())
          + f", both in each command, {args.epochs} epochs, batch {BATCH} windows, lr {STUDENT_LR:g} cosine, soft targets only "
          f"(alpha = 0) at T = {TEMPERATURE:g}; CE only: the same students on the next tokens. Nats and ECE on the held-out "
          f"windows (positions with a next token); bytes per token: the cache on disk (Zarr) over its tokens. "
          f"Training the {len(runs)} configurations took {seconds / 60:.0f} min.\n")
    names = list(STUDENTS)
    header = ["targets", "bytes per token"]
    for name in names:
        header += [f"{name} nats", "vs dense", f"{name} ECE"]
    row(*header)
    row("---", *["---:"] * (len(header) - 1))
    for label, (cache, entries) in results.items():
        size = "-" if cache is None else f"{reports[cache]['tokens']['bytes_per_token']:,.1f}"
        cells = []
        for name in names:
            nats = entries[name]["eval_nats"]
            cells += [f"{nats:.3f}", f"{(nats / dense[name]['eval_nats'] - 1) * 100:+.1f}%", f"{entries[name]['ece']:.3f}"]
        row(label, size, *cells)
    extra = []
    for cache in [f"top{k}" for k in TOPK_SIZES] + [f"sampled{s}" for s in SAMPLE_SIZES]:
        stat = reports[cache]["statistic"]
        extra.append(f"{cache}: {stat['name']} {stat['mean']:.3g}")
    print("\nPer-token statistics of the caches (top-k: the teacher's mass kept at T = 1; sampled: distinct tokens drawn): "
          + "; ".join(extra) + ".")


# Heavier teachers for the dump's overhead, random weights (speed only): layers, width, heads; the
# windows each runs over; its batch in windows.
HEAVY = {"heavy": ((8, 512, 8), 1024, 256), "large": ((12, 1024, 16), 64, 16)}


def bench_dump(root: Path, setup: dict, args: argparse.Namespace) -> None:
    """Dump time over the bare forward pass, for the trained teacher over every training window and
    for heavier ones (:data:`HEAVY`) over the first windows (saved as .npz token data): the targets
    cost the same per token for all, so the heavier the teacher the smaller their share."""
    from softlabels.checkpoint import save_checkpoint
    from softlabels.models import build_model

    source = open_data(setup["specs"]["train"])
    teachers = {f"trained gpt {TEACHER[0]} x {TEACHER[1]}": (softlabels.load_model(setup["teacher"]), source, 256)}
    for name, ((layers, width, heads), windows, batch) in HEAVY.items():
        ids, _ = source.read(0, windows)
        np.savez(root / f"{name}-windows.npz", input_ids=ids)
        kwargs = {"layers": layers, "dim": width, "heads": heads}
        torch.manual_seed(0)
        model = build_model("gpt", input_shape=(SEQ_LEN,), num_classes=VOCAB, kwargs=kwargs)
        save_checkpoint(root / f"{name}.pth", model, arch="gpt", arch_kwargs=kwargs, input_shape=(SEQ_LEN,), num_classes=VOCAB)
        teachers[f"gpt {layers} x {width}"] = (softlabels.load_model(root / f"{name}.pth"), open_data(str(root / f"{name}-windows.npz")), batch)
    kinds = {"dense, float16": Dense(), "top-k, K = 16": TopK(k=16, temperatures=(TEMPERATURE,)),
             "sampled, S = 24": Sampled(samples=24, proposal_temperature=TEMPERATURE, temperatures=(TEMPERATURE,)),
             "sampled, S = 24, compact": Sampled(samples=24, proposal_temperature=TEMPERATURE, temperatures=(TEMPERATURE,), compact=True)}

    def timed(fn) -> float:
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began

    print("\n### Dump speed\n")
    print(f"Each teacher over its windows of {SEQ_LEN} tokens, CPU ({torch.get_num_threads()} threads), to .zarr. "
          f"{args.repeats} rounds, each a bare forward pass (the same batches through the same code path, "
          "`iter_logits`, outputs discarded) before the dump of each kind, every dump to a new path; a ratio is a "
          "dump's time over the forward pass just before it, shown as the median of the rounds (lowest-highest).\n")
    row("teacher", "parameters", "tokens", "batch (windows)", "forward tokens/s (median)", "cache", "dump tokens/s (median)",
        "dump time / forward time")
    row("---", "---:", "---:", "---:", "---:", "---", "---:", "---:")
    for label, (teacher, data, batch) in teachers.items():
        tokens = len(data) * SEQ_LEN

        def forward_only():
            for _ in iter_logits(teacher.model, data, batch_size=batch, device="cpu"):
                pass

        def dump(kind):
            remove_path(root / "speed.zarr")
            return timed(lambda: softlabels.dump(teacher, data, root / "speed.zarr", batch_size=batch, device="cpu", kind=kind,
                                                 progress=False))

        forward_only()  # warm-up
        forward, dumps = {name: [] for name in kinds}, {name: [] for name in kinds}
        for _ in range(args.repeats):
            for name, kind in kinds.items():
                forward[name].append(timed(forward_only))
                dumps[name].append(dump(kind))
        params = sum(p.numel() for p in teacher.model.parameters())
        every_forward = [t for times in forward.values() for t in times]
        for name in kinds:
            ratios = [d / f for d, f in zip(dumps[name], forward[name])]
            row(label, f"{params / 1e6:.1f}M", f"{tokens:,}", batch, f"{tokens / float(np.median(every_forward)):,.0f}", name,
                f"{tokens / float(np.median(dumps[name])):,.0f}", f"{float(np.median(ratios)):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")
    remove_path(root / "speed.zarr")


def bench_allocator(root: Path, setup: dict, args: argparse.Namespace) -> None:
    """The dump command's wall time with glibc's malloc as it comes (a ``MALLOC_`` variable set to its
    default value makes :func:`softlabels.keep_freed_memory` stand aside) against freed memory kept
    for reuse, alternating which goes first, the median of --repeats rounds."""
    out = root / "allocator.zarr"
    command = [sys.executable, "-m", "softlabels", "dump", "--teacher", str(setup["teacher"]), "--data", setup["specs"]["train"],
               "--out", str(out), "--batch-size", "256", "--quiet", "--overwrite"]
    kinds = {"dense, float16": [], "top-k, K = 16": ["--top-k", "16", "--temperatures", f"{TEMPERATURE:g}"],
             "sampled, S = 24, compact": ["--sample", "24", "--proposal-temperature", f"{TEMPERATURE:g}", "--temperatures",
                                          f"{TEMPERATURE:g}", "--compact"]}
    allocators = {"as it comes": {**os.environ, "MALLOC_TOP_PAD_": str(128 << 10)},
                  "kept": {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}}
    seconds = {(kind, name): [] for kind in kinds for name in allocators}
    for round_ in range(args.repeats):
        for kind, options in kinds.items():
            for name in (list(allocators) if round_ % 2 == 0 else list(allocators)[::-1]):
                remove_path(out)
                began = time.perf_counter()
                subprocess.run([*command, *options], env=allocators[name], check=True, capture_output=True)
                seconds[(kind, name)].append(time.perf_counter() - began)
    remove_path(out)
    print("\n### Dump speed with freed memory kept for reuse\n")
    print(f"`softlabels dump` of the trained demo teacher over the training windows (batch 256 windows of {SEQ_LEN} tokens, "
          f"{VOCAB:,} logits each: 134 MB of float32 logits a batch), whole command wall time including start-up, with "
          f"glibc's malloc as it comes and with freed memory kept (what the command does by default); {args.repeats} "
          "rounds, alternating which runs first, medians (lowest-highest).\n")
    row("cache", "malloc as it comes (s)", "freed memory kept (s)", "speed-up (median of the rounds)")
    row("---", "---:", "---:", "---:")
    for kind in kinds:
        plain, kept = seconds[(kind, "as it comes")], seconds[(kind, "kept")]
        ratios = [a / b for a, b in zip(plain, kept)]
        row(kind, f"{np.median(plain):.1f} ({min(plain):.1f}-{max(plain):.1f})", f"{np.median(kept):.1f} ({min(kept):.1f}-{max(kept):.1f})",
            f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


def bench_loader(root: Path, setup: dict, args: argparse.Namespace) -> None:
    name = list(STUDENTS)[-1]
    caches = {"dense": "dense", "top-k, K = 16": "top16", f"sampled, S = {SAMPLE_SIZES[1]}, compact": f"sampled{SAMPLE_SIZES[1]}"}
    print("\n### Loader speed against the student's consumption\n")
    print(f"Tokens per second the SoftTargetLoader serves (inputs, next-token labels and targets; shuffled, batch {BATCH} "
          f"windows of {SEQ_LEN}, one epoch, best of {args.repeats}) against the tokens per second the small student "
          f"(gpt {STUDENTS[name][0]} x {STUDENTS[name][1]}) trains on from the same cache: its optimizer steps alone, "
          f"and the whole epoch (loader included, `train_students`, no evaluation). One CPU process, "
          f"{torch.get_num_threads()} threads; the loader reads ahead in a background thread.\n")
    row("cache", "bytes per token", "loader tokens/s", "student steps tokens/s", "student epoch tokens/s", "loader / student steps")
    row("---", "---:", "---:", "---:", "---:", "---:")
    for label, cache_name in caches.items():
        cache = open_cache(root / f"{cache_name}.zarr")
        source = softlabels.source_for_cache(cache)
        tokens = len(source) * SEQ_LEN

        def serve():
            loader = SoftTargetLoader(source, cache, batch_size=BATCH, seed=0)
            loader.set_epoch(0)
            for _ in loader:
                pass

        loads, steps, epochs = [], [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            serve()
            loads.append(time.perf_counter() - began)
            began = time.perf_counter()
            summary = softlabels.train_students(
                [StudentSpec("gpt", dict(zip(("layers", "dim", "heads"), STUDENTS[name])), name=name)], source=source, cache=cache, out_dir=None, progress=False,
                config=TrainConfig(epochs=1, batch_size=BATCH, lr=STUDENT_LR, temperature=TEMPERATURE, alpha=0.0, device="cpu"))
            epochs.append(time.perf_counter() - began)
            steps.append(summary[0]["seconds"])
        per_token = setup["reports"][cache_name]["tokens"]["bytes_per_token"]
        row(label, f"{per_token:,.1f}", f"{tokens / min(loads):,.0f}", f"{tokens / min(steps):,.0f}", f"{tokens / min(epochs):,.0f}",
            f"{min(steps) / min(loads):.0f}x")


def main() -> None:
    softlabels.keep_freed_memory()  # as the softlabels command does: measured as users run it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="quality,dump,loader")
    parser.add_argument("--workdir", help="keep the corpus, teacher, caches and runs here (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="keep a teacher, caches and runs already in --workdir")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every student run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads here and in every command (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the softlabels commands
    sections = set(args.sections.split(","))
    import tokenizers

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"tokenizers {tokenizers.__version__}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp).absolute()
        root.mkdir(parents=True, exist_ok=True)
        log = root / "commands.log"
        setup = prepare(root, args, log)
        print(f"Corpus, tokenizer, teacher and caches: {setup['prepare_seconds'] / 60:.1f} min "
              f"(teacher {setup['teacher_seconds'] / 60:.1f} min); commands logged in {log}.")
        if "quality" in sections:
            bench_quality(root, setup, args, log)
        if "dump" in sections:
            bench_dump(root, setup, args)
        if "loader" in sections:
            bench_loader(root, setup, args)
        if "allocator" in sections:
            bench_allocator(root, setup, args)
    print(f"\nTotal run time {(time.perf_counter() - began) / 60:.0f} min.")


if __name__ == "__main__":
    main()
