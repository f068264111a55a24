"""Recorded augmentation views (view caches) against the baselines they stand in for: student accuracy,
bytes per view on disk, and the cost of replaying views and of dumping them. Prints Markdown for
BENCHMARKS.md; progress goes to stderr.

    python scripts/bench_views.py --workdir /tmp/benchviews 2>/tmp/benchviews.log | tee /tmp/benchviews.md
    python scripts/bench_views.py --quick          # smoke run: few epochs, few views
    python scripts/bench_views.py --sections mnist1d,replay   # without the image table

Optional extra: the image table uses scikit-learn's bundled digits (1797 8x8 images, nothing is
downloaded): `pip install scikit-learn`. Without it, the image table is skipped with a message (on
stderr and in the output) and the other sections still run.

1. MNIST-1D (the main table), on its 4000 training samples alone. The teacher, a `cnn1d` with 64
   channels, is trained by `softlabels train-student --hard-labels-only` on the 4000 labels with
   shift/scale/noise augmentation. The student `mlp?width=100&depth=2` trains for `--epochs` epochs
   (default 300), T = 4, alpha = 0 (soft targets only; scratch rows use the labels), seed 0, always
   from the same initial weights, on the augmentation `shift?max=6`, `scale?max=0.25`,
   `noise?std=0.15`, `mixup?alpha=1`. Every row but one is a `softlabels` command (printed with the
   table): scratch, scratch with fresh augmented views (`--hard-labels-only --augment`), KD from a
   one-view cache (plain `dump`), online function matching (`--online-teacher --augment`), and
   view caches: one `dump --views 64`, of which `convert --keep-views` keeps the first 16, 4 and 1
   views, and `convert --top-k 3` makes top-k view caches at V = 16 and 64. The remaining row,
   augmented inputs trained against the one-view cache's targets for the clean input, is refused by
   `train-student` (and `train_students`) on a cache without views, so the script trains it with
   `SoftTargetLoader(source, cache, augment=pipeline)` and the loop of `train_students` (AdamW,
   TrainConfig's lr and weight decay, cosine schedule, `kd_loss`), checked here to reproduce
   `train_students` exactly without augmentation.
2. Images: the same comparison on scikit-learn's digits upscaled to 1x16x16 (1297 train / 500 test,
   fixed split), with `crop?size=16,16&scale=0.6,1`, `flip`, `cutmix?alpha=1`; teacher
   `cnn2d?channels=32&depth=2` (trained with crop and flip), student the same MLP, `--image-epochs`
   epochs (default 100, to keep the whole run under about 45 minutes on 2 cores).
3. The cost of replay: SoftTargetLoader rows/s over a V = 16 view cache (views replayed) against
   the one-view cache of the same data (no replay), and `dump --views 16` against the teacher's
   bare forward pass on the same views; alternating runs, best of `--repeats`, in one torch thread
   (`--timing-threads`) so that another process on the shared machine does not stall the other.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import softlabels
from softlabels import SoftTargetLoader, TrainConfig, build_model, kd_loss, load_model, open_cache, open_data
from softlabels.augment import Pipeline, parse_augment
from softlabels.dump import TeacherForward
from softlabels.train import StudentSpec, evaluate, train_students
from softlabels.views import Views

BEGAN = time.perf_counter()

SIGNAL_AUGMENT = ("shift?max=6", "scale?max=0.25", "noise?std=0.15", "mixup?alpha=1")
SIGNAL_TEACHER_AUGMENT = ("shift?max=6", "scale?max=0.25", "noise?std=0.15")
IMAGE_AUGMENT = ("crop?size=16,16&scale=0.6,1", "flip", "cutmix?alpha=1")
IMAGE_TEACHER_AUGMENT = ("crop?size=16,16&scale=0.6,1", "flip")
STUDENT = "mlp?width=100&depth=2"
STUDENT_NAME = "mlp"  # the name train-student gives it: its initial weights are seeded from (seed, name)
TOP_K = 3


def log(message: str) -> None:
    print(f"[{time.perf_counter() - BEGAN:7.0f} s] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs `softlabels` commands in a subprocess and remembers them for the tables."""

    def __init__(self, workdir: Path, reuse: bool):
        self.workdir, self.reuse = workdir, reuse
        self.commands: dict[str, list[str]] = {}

    def show(self, args: list[str]) -> str:
        text = shlex.join(["softlabels", *args])
        return text.replace(str(self.workdir) + "/", "$W/")

    def __call__(self, section: str, *args: str, done: Path | None = None) -> str:
        """Run ``softlabels ARGS`` (skipped when ``done`` exists and --reuse is given); return stdout."""
        args = [str(a) for a in args]
        self.commands.setdefault(section, []).append(self.show(args))
        if done is not None and self.reuse and done.exists():
            log(f"reusing {done}")
            return ""
        log(self.show(args))
        began = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "softlabels", *args], capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(f"command failed ({result.returncode}): {self.show(args)}")
        log(f"  done in {time.perf_counter() - began:.0f} s")
        return result.stdout


def augment_args(specs: tuple[str, ...]) -> list[str]:
    return [a for spec in specs for a in ("--augment", spec)]


def pipeline_of(specs: tuple[str, ...], seed: int = 0) -> Pipeline:
    return Pipeline(tuple(parse_augment(s) for s in specs), seed=seed)


def summary_row(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())[0]


def inspect(run: Runner, section: str, cache: Path) -> dict:
    """``softlabels inspect --json``, without recording the command in the table's list."""
    result = subprocess.run([sys.executable, "-m", "softlabels", "inspect", "--json", str(cache)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"softlabels inspect {cache} failed")
    return json.loads(result.stdout)


def bytes_per_view(report: dict) -> float:
    return report["views"]["bytes_per_view"] if report.get("views") else report["bytes_per_sample"]


def teacher_accuracy(run: Runner, checkpoint: Path, data: str) -> float:
    result = subprocess.run([sys.executable, "-m", "softlabels", "evaluate", "--model", str(checkpoint), "--data", data, "--json"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"softlabels evaluate {checkpoint} failed")
    return json.loads(result.stdout)["accuracy"]


# -- the one row train-student refuses: augmented inputs against a one-view cache ---------------------


def _student_seed(seed: int, name: str) -> int:
    from softlabels.train import _student_seed as seeded  # the seed train_students gives a student of this name

    return seeded(seed, name)


def train_augmented_one_view(cache_path: Path, pipeline: Pipeline | None, *, epochs: int, student: StudentSpec) -> torch.nn.Module:
    """The student trained as `train_students` trains it (same initial weights, batches, optimizer,
    schedule and loss), but on ``pipeline``'s fresh views of each sample against the cache's targets
    for the clean sample: `SoftTargetLoader(source, cache, augment=pipeline)` and `kd_loss`."""
    config = TrainConfig(temperature=4.0, alpha=0.0, seed=0, device="cpu")
    cache = open_cache(cache_path)
    source = softlabels.source_for_cache(cache)
    loader = SoftTargetLoader(source, cache, batch_size=config.batch_size, seed=config.seed, augment=pipeline)
    state = torch.get_rng_state()
    torch.manual_seed(_student_seed(config.seed, student.name or student.arch))
    model = build_model(student.arch, input_shape=source.input_shape, num_classes=cache.num_classes, kwargs=student.kwargs)
    torch.set_rng_state(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = max(1, epochs * loader.batches_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            loss = kd_loss(model(batch.inputs), batch.teacher_logits, batch.labels, temperature=config.temperature,
                           alpha=config.alpha, kl=config.kl, mix=batch.mix)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def check_manual_loop(cache_path: Path, student: StudentSpec, workdir: Path) -> float:
    """The largest weight difference between the manual loop (no augmentation) and `train_students`
    on the same cache for 2 epochs: 0 when the loop is the same."""
    cache = open_cache(cache_path)
    out = workdir / "manual-loop-check"
    train_students([student], source=softlabels.source_for_cache(cache), cache=cache,
                   config=TrainConfig(epochs=2, temperature=4.0, alpha=0.0, seed=0, device="cpu"),
                   out_dir=out, progress=False, overwrite=True)
    reference = load_model(out / (student.name or student.arch) / "student.pth").model.state_dict()
    mine = train_augmented_one_view(cache_path, None, epochs=2, student=student).state_dict()
    return max(float((reference[k] - mine[k]).abs().max()) for k in reference)


# -- one comparison table (MNIST-1D or images) ---------------------------------------------------------


def comparison(run: Runner, *, section: str, root: Path, train: str, test: str, teacher_arch: str, teacher_epochs: int,
               teacher_augment: tuple[str, ...], augment: tuple[str, ...], epochs: int, dump_views: int,
               keep_views: tuple[int, ...], topk_views: tuple[int, ...]) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    teacher_run = root / "teacher"
    run(section, "train-student", "--data", train, "--student", f"teacher={teacher_arch}", "--hard-labels-only",
        *augment_args(teacher_augment), "--epochs", teacher_epochs, "--eval-data", test, "--out", teacher_run,
        "--quiet", "--overwrite", done=teacher_run / "summary.json")
    teacher = teacher_run / "teacher" / "student.pth"
    teacher_acc = teacher_accuracy(run, teacher, test)
    log(f"{section}: teacher test accuracy {teacher_acc:.1%}")

    one = root / "one-view.zarr"
    run(section, "dump", "--teacher", teacher, "--data", train, "--out", one, "--quiet", "--overwrite", done=one / "zarr.json")
    big = root / f"views{dump_views}.zarr"
    run(section, "dump", "--teacher", teacher, "--data", train, "--out", big, "--views", dump_views, *augment_args(augment),
        "--augment-seed", 0, "--quiet", "--overwrite", done=big / "zarr.json")
    caches = {dump_views: big}
    for v in keep_views:
        caches[v] = root / f"views{v}.zarr"
        run(section, "convert", big, caches[v], "--keep-views", v, "--quiet", "--overwrite", done=caches[v] / "zarr.json")
    topk = {}
    for v in topk_views:
        topk[v] = root / f"views{v}-top{TOP_K}.zarr"
        keep = ["--keep-views", v] if v != dump_views else []
        run(section, "convert", big, topk[v], *keep, "--top-k", TOP_K, "--quiet", "--overwrite", done=topk[v] / "zarr.json")

    common = ["--student", STUDENT, "--epochs", epochs, "--temperature", 4, "--alpha", 0, "--seed", 0, "--eval-data", test,
              "--eval-teacher", teacher, "--quiet", "--overwrite"]
    rows: list[dict] = []

    def student_run(label: str, name: str, *args, cache: Path | None = None) -> None:
        out = root / "runs" / f"e{epochs}" / name
        run(section, "train-student", *args, *common, "--out", out, done=out / "summary.json")
        summary = summary_row(out)
        per_view = bytes_per_view(inspect(run, section, cache)) if cache is not None else None
        rows.append({"label": label, "accuracy": summary["eval_accuracy"], "agreement": summary["teacher_agreement"],
                     "bytes_per_view": per_view, "seconds": summary["seconds"], "cache": cache})
        log(f"{section}: {label}: {summary['eval_accuracy']:.1%}")

    student_run("scratch (hard labels, no augmentation)", "scratch", "--data", train, "--hard-labels-only")
    student_run("scratch, fresh augmented views", "scratch-aug", "--data", train, "--hard-labels-only", *augment_args(augment))
    student_run("KD, one-view cache (plain `dump`)", "one-view", "--cache", one, cache=one)

    # Augmented inputs, one-view targets: not a softlabels command (refused), the library loop instead.
    label = "KD, fresh augmented views, one-view cache's targets (library loop)"
    spec = StudentSpec("mlp", {"width": 100, "depth": 2})
    if run.reuse and (root / "manual.json").exists():
        manual = json.loads((root / "manual.json").read_text())
    else:
        log(f"{section}: {label}")
        began = time.perf_counter()
        model = train_augmented_one_view(one, pipeline_of(augment), epochs=epochs, student=spec)
        test_source = open_data(test)
        x, _ = test_source.read(0, len(test_source))
        with torch.no_grad():
            teacher_top1 = load_model(teacher).model.eval()(torch.from_numpy(x)).argmax(-1).numpy()
        metrics = evaluate(model, test_source, teacher_top1=teacher_top1)
        manual = {"accuracy": metrics["accuracy"], "agreement": metrics["teacher_agreement"],
                  "seconds": time.perf_counter() - began}
        (root / "manual.json").write_text(json.dumps(manual))
    rows.append({"label": label, "accuracy": manual["accuracy"], "agreement": manual["agreement"],
                 "bytes_per_view": bytes_per_view(inspect(run, section, one)), "seconds": manual["seconds"], "cache": one})
    log(f"{section}: {label}: {manual['accuracy']:.1%}")

    student_run("online function matching (teacher on every fresh view)", "online", "--data", train, "--online-teacher", teacher,
                *augment_args(augment))
    for v in sorted(caches):
        student_run(f"view cache, V = {v}", f"views{v}", "--cache", caches[v], cache=caches[v])
    for v in sorted(topk):
        student_run(f"top-{TOP_K} view cache, V = {v}", f"views{v}-top{TOP_K}", "--cache", topk[v], cache=topk[v])
    return {"teacher_accuracy": teacher_acc, "rows": rows, "one": one, "caches": caches, "teacher": teacher}


def print_comparison(title: str, result: dict, commands: list[str], note: str, goal: bool) -> None:
    print(f"### {title}\n")
    print(note + "\n")
    rows = result["rows"]
    online = next(r["accuracy"] for r in rows if r["label"].startswith("online"))
    one_view = next(r["accuracy"] for r in rows if r["label"].startswith("KD, one-view"))
    print("| student trained on | test accuracy | vs online FM | vs one-view KD | agrees w/ teacher | bytes per view on disk |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.1%}"
        per_view = "-" if r["bytes_per_view"] is None else f"{r['bytes_per_view']:.0f}"
        print(f"| {r['label']} | {r['accuracy']:.1%} | {100 * (r['accuracy'] - online):+.1f} | "
              f"{100 * (r['accuracy'] - one_view):+.1f} | {agreement} | {per_view} |")
    views = [r for r in rows if r["label"].startswith("view cache") or r["label"].startswith("top-")]
    if goal:
        met = [r for r in views if r["accuracy"] >= online - 0.01 and r["accuracy"] >= one_view + 0.10]
        best = max(views, key=lambda r: r["accuracy"])
        print(f"\nGoal (some V <= 64 within 1 point of online function matching and at least 10 points above the "
              f"one-view cache): {'met by ' + ', '.join(r['label'] for r in met) if met else 'not met'}; the best view "
              f"cache ({best['label']}) is {100 * (best['accuracy'] - online):+.1f} points from online function matching "
              f"and {100 * (best['accuracy'] - one_view):+.1f} from the one-view cache.")
    print()
    print("<details><summary>commands</summary>\n\n```")
    for c in commands:
        print(c)
    print("```\n</details>\n")


# -- the image data ------------------------------------------------------------------------------------


def write_digits(root: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits  # the optional extra: main() says what to do without it
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1297], order[1297:]
    paths = root / "digits-train.npz", root / "digits-test.npz"
    root.mkdir(parents=True, exist_ok=True)
    for path, rows in zip(paths, (train, test)):
        if not path.exists():
            np.savez(path, x=np.ascontiguousarray(x[rows]), y=y[rows])
    return paths


# -- the cost of replay --------------------------------------------------------------------------------


def loader_rows_per_second(loader: SoftTargetLoader, epoch: int) -> float:
    loader.set_epoch(epoch)
    began = time.perf_counter()
    rows = sum(len(batch.labels) for batch in loader)
    return rows / (time.perf_counter() - began)


def target_bytes_per_row(cache_path: Path) -> int:
    """Bytes of cached targets per dataset row (every view's, for a view cache)."""
    layout = open_cache(cache_path).layout
    return sum(a.dtype.itemsize * a.width for a in layout.target_arrays()) * math.prod(layout.items)


def views_as_dataset(teacher_path: Path, views16: Path, workdir: Path) -> Path:
    """A one-view cache holding the same target bytes as ``views16``: the teacher's targets for each
    of its N x V recorded views, as rows of a dataset of the views made beforehand."""
    source, cache = open_data("mnist1d://train"), open_cache(views16)
    views = Views.from_manifest(cache.manifest, where=str(views16))
    n, count = len(source), views.count
    x, _ = source.read(0, n)
    records = {name: r.reshape(n * count, *r.shape[2:]) for name, r in cache.read_records(0, n).items()}
    rows = np.repeat(np.arange(n), count)
    made, _ = views.apply(source, torch.from_numpy(x[rows]), records, rows)
    data = workdir / "views16-as-rows.npz"
    np.savez(data, x=made.numpy(), y=source.read(0, n)[1][rows])
    out = workdir / "views16-as-rows.zarr"
    softlabels.dump(load_model(teacher_path), open_data(str(data)), out, device="cpu", overwrite=True, progress=False)
    return out


def replay_cost(teacher: Path, one: Path, views16: Path, augment: tuple[str, ...], workdir: Path, repeats: int) -> None:
    source = open_data("mnist1d://train")
    flat = views_as_dataset(teacher, views16, workdir)
    loaders = {
        "one-view cache, no augmentation (no replay)": (SoftTargetLoader(source, open_cache(one), batch_size=128, seed=0), one),
        "V = 16 view cache, one recorded view per sample replayed": (
            SoftTargetLoader(source, open_cache(views16), batch_size=128, seed=0), views16),
        "one-view cache of the V = 16 cache's 64,000 views, made beforehand (the same target bytes, no replay)": (
            SoftTargetLoader(open_data(str(flat.with_suffix(".npz"))), open_cache(flat), batch_size=128, seed=0), flat),
        "one-view cache with fresh augmented views (drawn, then applied)": (SoftTargetLoader(
            source, open_cache(one), batch_size=128, seed=0, augment=pipeline_of(augment)), one),
    }
    best = {name: 0.0 for name in loaders}
    for r in range(repeats):
        for name, (loader, _) in loaders.items():
            best[name] = max(best[name], loader_rows_per_second(loader, r))
        log(f"replay: loader repeat {r + 1}/{repeats}: " + ", ".join(f"{v:,.0f}" for v in best.values()))
    # For scale: the student's own training steps (forward, backward, AdamW) on the same number of rows.
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=source.input_shape, num_classes=10, kwargs={"width": 100, "depth": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = (torch.from_numpy(a) for a in source.read(0, len(source)))
    steps = 0.0
    for r in range(repeats):
        began = time.perf_counter()
        for i in range(0, len(y), 128):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps = max(steps, len(y) / (time.perf_counter() - began))
    names = list(loaders)
    base = best[names[0]]
    read = {name: best[name] * target_bytes_per_row(path) / 1e6 for name, (_, path) in loaders.items()}
    print(f"SoftTargetLoader over MNIST-1D's training samples (inputs from the npz), batch 128, an epoch per run, "
          f"best of {repeats} alternating runs; augmentation {', '.join(f'`{a}`' for a in augment)}. Target MB/s: the "
          f"cached targets read per second (a view cache reads every view of a row and trains on one).\n")
    print("| loader | rows/s | vs no replay | target MB/s read |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in best.items():
        print(f"| {name} | {value:,.0f} | {value / base:.3f} | {read[name]:.1f} |")
    print(f"| for scale: the student's training steps alone (`{STUDENT}`, batch 128, no loader) | {steps:,.0f} | | |")
    print(f"\nThe V = 16 view cache against the one-view cache of the same target bytes: "
          f"{read[names[1]] / read[names[2]]:.2f}x the target bytes per second; per row served, "
          f"{best[names[1]] / base:.3f}x the one-view cache of the samples.\n")


def dump_cost(teacher_path: Path, augment: tuple[str, ...], workdir: Path, repeats: int, views: int = 16, batch_size: int = 256) -> None:
    source = open_data("mnist1d://train")
    teacher = load_model(teacher_path)
    recorded = Views(views, pipeline_of(augment))
    n = len(source)
    rows_per_batch = batch_size // views

    def bare() -> dict[str, float]:
        """Draw, apply and run the teacher on every view, as the dump does, storing nothing."""
        forward = TeacherForward(teacher.model, torch.device("cpu"), "fp32")
        times = {"draw": 0.0, "apply": 0.0, "forward": 0.0}
        for start in range(0, n, rows_per_batch):
            stop = min(n, start + rows_per_batch)
            t0 = time.perf_counter()
            x, _ = source.read(start, stop)
            records = recorded.draw(np.arange(start, stop), source)
            t1 = time.perf_counter()
            flat = {name: r.reshape(-1, *r.shape[2:]) for name, r in records.items()}
            inputs, _ = recorded.apply(source, torch.from_numpy(x).repeat_interleave(views, 0), flat, np.repeat(np.arange(start, stop), views))
            t2 = time.perf_counter()
            forward(inputs, "views")
            t3 = time.perf_counter()
            times["draw"] += t1 - t0
            times["apply"] += t2 - t1
            times["forward"] += t3 - t2
        return times

    # The views once more, made up front, for the forward pass alone.
    inputs = []
    for start in range(0, n, rows_per_batch):
        stop = min(n, start + rows_per_batch)
        x, _ = source.read(start, stop)
        records = recorded.draw(np.arange(start, stop), source)
        flat = {name: r.reshape(-1, *r.shape[2:]) for name, r in records.items()}
        inputs.append(recorded.apply(source, torch.from_numpy(x).repeat_interleave(views, 0), flat, np.repeat(np.arange(start, stop), views))[0])

    def forward_only() -> float:
        forward = TeacherForward(teacher.model, torch.device("cpu"), "fp32")
        began = time.perf_counter()
        for batch in inputs:
            forward(batch, "views")
        return time.perf_counter() - began

    def dump() -> float:
        began = time.perf_counter()
        softlabels.dump(teacher, source, workdir / "dump-cost.zarr", batch_size=batch_size, device="cpu", views=recorded,
                        overwrite=True, progress=False)
        return time.perf_counter() - began

    best_dump = best_forward = math.inf
    best_bare = {"draw": math.inf, "apply": math.inf, "forward": math.inf, "total": math.inf}
    for r in range(repeats):
        best_dump = min(best_dump, dump())
        times = bare()
        if sum(times.values()) < best_bare["total"]:
            best_bare = {**times, "total": sum(times.values())}
        best_forward = min(best_forward, forward_only())
        log(f"replay: dump repeat {r + 1}/{repeats}: dump {best_dump:.2f} s, draw+apply+forward {best_bare['total']:.2f} s, "
            f"forward {best_forward:.2f} s")
    size = softlabels.store.directory_bytes(workdir / "dump-cost.zarr")
    print(f"`dump --views {views}` (library `softlabels.dump`, CPU, fp32 teacher, float16 targets, batch {batch_size} views "
          f"= {rows_per_batch} samples) of MNIST-1D's {n} training samples ({n * views:,} views, {size / 2**20:.1f} MiB) "
          f"against the same work without the store, best of {repeats} alternating runs. Teacher: the MNIST-1D table's "
          f"cnn1d ({teacher.params:,} parameters).\n")
    print("| work | seconds | dump / this |")
    print("| --- | ---: | ---: |")
    print(f"| `dump --views {views}` | {best_dump:.2f} | 1.00 |")
    print(f"| draw (`Views.draw`) + apply (`views.apply`) + teacher forward, nothing stored | {best_bare['total']:.2f} | "
          f"{best_dump / best_bare['total']:.2f} |")
    print(f"| of which draw | {best_bare['draw']:.2f} | |")
    print(f"| of which apply | {best_bare['apply']:.2f} | |")
    print(f"| of which forward | {best_bare['forward']:.2f} | |")
    print(f"| teacher forward alone, on the views made beforehand | {best_forward:.2f} | {best_dump / best_forward:.2f} |")
    store = best_dump - best_bare["total"]
    print(f"\nBeyond the teacher's forward pass the dump spends {best_dump - best_forward:.2f} s. In the bare loop, drawing the "
          f"views takes {best_bare['draw']:.2f} s and applying them {best_bare['apply']:.2f} s; the store (float16 targets "
          f"and the view records written in chunks by the writer thread, with checksums) is what remains, dump minus "
          f"the bare loop: {store:.2f} s{' (below 0: noise, the two runs did the same work)' if store < 0 else ''}.\n")


# -- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=300, help="student epochs, MNIST-1D table")
    parser.add_argument("--image-epochs", type=int, default=100, help="student epochs, image table")
    parser.add_argument("--teacher-epochs", type=int, default=100)
    parser.add_argument("--views", type=int, default=64, help="views of the one view dump (the others are kept from it)")
    parser.add_argument("--image-views", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the dump timings, best of (the loader's: 5)")
    parser.add_argument("--timing-threads", type=int, default=1,
                        help="torch threads for the replay timings (default 1: on a shared 2-core machine, 2 threads "
                             "wait on each other whenever another process holds a core, and the times vary 10-50x)")
    parser.add_argument("--workdir", type=Path, help="where caches and runs are kept (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="reuse teachers, caches and runs already in --workdir")
    parser.add_argument("--sections", default="mnist1d,image,replay")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 epochs, teachers 20 epochs, 16 views, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.image_epochs, args.teacher_epochs, args.views, args.image_views, args.repeats = 20, 20, 20, 16, 8, 2
    image_epochs = args.image_epochs
    sections = set(args.sections.split(","))
    unknown = sections - {"mnist1d", "image", "replay"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="bench-views-")
        args.workdir = Path(temporary.name)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run = Runner(workdir, args.reuse)
    log(f"workdir {workdir}; torch threads {torch.get_num_threads()}")

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"CPU only.\n")
    mnist = None
    keep = tuple(v for v in (16, 4, 1) if v < args.views)
    if "mnist1d" in sections:
        mnist = comparison(
            run, section="mnist1d", root=workdir / "mnist1d", train="mnist1d://train", test="mnist1d://test",
            teacher_arch="cnn1d?channels=64", teacher_epochs=args.teacher_epochs, teacher_augment=SIGNAL_TEACHER_AUGMENT,
            augment=SIGNAL_AUGMENT, epochs=args.epochs, dump_views=args.views, keep_views=keep,
            topk_views=tuple(sorted({v for v in (16, args.views) if v <= args.views})),
        )
        student = StudentSpec("mlp", {"width": 100, "depth": 2})
        difference = check_manual_loop(mnist["one"], student, workdir)
        log(f"manual loop against train_students, 2 epochs, no augmentation: max |weight difference| {difference:.3g}")
        print_comparison(
            "MNIST-1D", mnist, run.commands["mnist1d"],
            f"MNIST-1D's 4000 training samples alone (no transfer set); test accuracy on its 1000 test samples after "
            f"the last epoch. Teacher `cnn1d?channels=64`, trained {args.teacher_epochs} epochs on the 4000 labels with "
            f"{', '.join(f'`{a}`' for a in SIGNAL_TEACHER_AUGMENT)}: {mnist['teacher_accuracy']:.1%} test accuracy. "
            f"Student `{STUDENT}`, {args.epochs} epochs, batch 128, AdamW lr 3e-3, weight decay 1e-4, cosine schedule, "
            f"T = 4, alpha = 0 (KD rows: soft targets only), seed 0 (the same initial weights in every row). "
            f"Augmentation: {', '.join(f'`{a}`' for a in SIGNAL_AUGMENT)}, augment seed 0. The view caches are one "
            f"`dump --views {args.views}`; the smaller V are its first V views (`convert --keep-views`), the top-{TOP_K} "
            f"caches `convert --top-k {TOP_K}` of those. Bytes per view: the cache's size on disk over N x V "
            f"(`softlabels inspect`: float16 targets and the view's parameters). The library-loop row is refused by "
            f"`train-student` (`--augment` on a cache without views): it is `SoftTargetLoader(source, cache, "
            f"augment=pipeline)` with `kd_loss` and the optimizer and schedule of `train_students` (the loop without "
            f"augmentation matches `train_students`' weights to {difference:.1g} after 2 epochs); its target is the "
            f"teacher's output on the clean sample, also for a mixed input.", goal=True)
    if "image" in sections:
        if importlib.util.find_spec("sklearn") is None:
            message = ("the image table needs scikit-learn's bundled digits, an optional extra: pip install scikit-learn "
                       "(or run with --sections mnist1d,replay); skipping it")
            log(message)
            print(f"### Images\n\nNot measured: {message}.\n")
            sections.discard("image")
    if "image" in sections:
        train_path, test_path = write_digits(workdir / "digits")
        image = comparison(
            run, section="image", root=workdir / "digits", train=str(train_path), test=str(test_path),
            teacher_arch="cnn2d?channels=32&depth=2", teacher_epochs=args.teacher_epochs, teacher_augment=IMAGE_TEACHER_AUGMENT,
            augment=IMAGE_AUGMENT, epochs=image_epochs, dump_views=args.image_views,
            keep_views=tuple(v for v in (4,) if v < args.image_views), topk_views=(args.image_views,),
        )
        print_comparison(
            "Images: scikit-learn digits", image, run.commands["image"],
            f"scikit-learn's bundled digits (1797 8x8 images scaled to [0, 1] and upsampled bilinearly to 1x16x16; "
            f"a fixed split of 1297 training and 500 test images). Teacher `cnn2d?channels=32&depth=2`, trained "
            f"{args.teacher_epochs} epochs on the 1297 labels with {', '.join(f'`{a}`' for a in IMAGE_TEACHER_AUGMENT)}: "
            f"{image['teacher_accuracy']:.1%} test accuracy. Student `{STUDENT}`, {image_epochs} epochs, otherwise as "
            f"above. Augmentation: {', '.join(f'`{a}`' for a in IMAGE_AUGMENT)}. View caches: one "
            f"`dump --views {args.image_views}`, V = 4 kept from it.", goal=False)
    if "replay" in sections:
        if mnist is None:
            raise SystemExit("the replay section uses the MNIST-1D caches: run it with --sections mnist1d,replay")
        torch.set_num_threads(args.timing_threads)
        print(f"### The cost of replay\n\nIn the script's process, torch with {args.timing_threads} thread(s).\n")
        # The dump's timing leaves a V = 16 view cache made by this version (the table's may be reused).
        dump_cost(mnist["teacher"], SIGNAL_AUGMENT, workdir, args.repeats)
        replay_cost(mnist["teacher"], mnist["one"], workdir / "dump-cost.zarr", SIGNAL_AUGMENT, workdir, 2 if args.quick else 5)
    print(f"Total run time {time.perf_counter() - BEGAN:.0f} s.")
    log("done")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
