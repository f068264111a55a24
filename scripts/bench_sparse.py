"""Sparse soft targets against dense ones: bytes per sample, student accuracy, share of the KD gain, ECE.

The task is generated offline and has 1000 classes in 100 groups of 10 similar classes (Gaussian
class means scattered around their group's mean, in 32 dimensions), so a teacher's soft targets carry
real information about which classes resemble each other (a nearest-true-mean classifier gets about
74%). A teacher MLP learns from 100 labels per class; students (a small MLP) learn either from 5
labels per class (scratch) or from the teacher's targets on 30,000 unlabeled transfer samples, stored
in each form. Everything runs in one process.

    python scripts/bench_sparse.py            # prints the Markdown table for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import softlabels
from softlabels import StudentSpec, TrainConfig, open_cache, open_data
from softlabels.convert import convert_cache
from softlabels.store import directory_bytes

CLASSES, GROUPS, DIM = 1000, 100, 16


def make_task(root: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    group_means = rng.normal(0.0, 3.0, size=(GROUPS, DIM))
    class_means = np.repeat(group_means, CLASSES // GROUPS, axis=0) + rng.normal(0.0, 0.6, size=(CLASSES, DIM))

    def draw(per_class: int | None, total: int | None = None, labeled: bool = True):
        y = np.repeat(np.arange(CLASSES), per_class) if per_class else rng.integers(0, CLASSES, total)
        y = rng.permutation(y)
        x = (class_means[y] + rng.normal(0.0, 1.0, size=(len(y), DIM))).astype(np.float32)
        return {"x": x, "y": y} if labeled else {"x": x}

    paths = {}
    for name, arrays in {
        "teacher-train": draw(100), "scratch-train": draw(5), "transfer": draw(None, 30000, labeled=False), "test": draw(10),
    }.items():
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], **arrays)
    return paths


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def student_metrics(out: Path, test) -> tuple[float, float]:
    model = softlabels.load_model(out / "student" / "student.pth").model
    logits, labels = softlabels.train.predict(model, test)
    return float((logits.argmax(1) == labels).mean()), expected_calibration_error(logits, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_task(root)
        test = open_data(str(paths["test"]))
        teacher_dir = root / "teacher"
        softlabels.train_students(
            [StudentSpec("mlp", {"width": 256, "depth": 2}, name="student")], source=open_data(str(paths["teacher-train"])),
            cache=None, config=TrainConfig(epochs=10, batch_size=256, hard_labels_only=True, device="cpu"),
            out_dir=teacher_dir, num_classes=CLASSES, progress=False,
        )
        teacher = softlabels.load_model(teacher_dir / "student" / "student.pth")
        teacher_accuracy, _ = student_metrics(teacher_dir, test)
        student = StudentSpec("mlp", {"width": 128, "depth": 1}, name="student")

        def train(cache_path: Path | None, name: str) -> tuple[float, float]:
            out = root / f"run-{name}"
            if cache_path is None:
                source, cache, hard = open_data(str(paths["scratch-train"])), None, True
            else:
                cache = open_cache(cache_path)
                source, hard = softlabels.source_for_cache(cache), False
            config = TrainConfig(epochs=args.epochs, batch_size=256, temperature=args.temperature, alpha=0.0,
                                 hard_labels_only=hard, device="cpu")
            softlabels.train_students([student], source=source, cache=cache, config=config, out_dir=out,
                                      num_classes=CLASSES, progress=False)
            return student_metrics(out, test)

        grid = (args.temperature,)
        dense32 = root / "dense32.zarr"
        softlabels.dump(teacher, open_data(str(paths["transfer"])), dense32, store_dtype="float32", device="cpu", progress=False)
        caches = {"dense float32": dense32}
        caches["dense float16"] = root / "dense16.zarr"
        softlabels.dump(teacher, open_data(str(paths["transfer"])), caches["dense float16"], device="cpu", progress=False)
        for k in (1, 5, 10, 20):
            caches[f"top-k, K = {k}"] = root / f"top{k}.zarr"
            convert_cache(dense32, caches[f"top-k, K = {k}"], kind=softlabels.TopK(k=k, temperatures=grid), progress=False)
        for s in (4, 12, 32):
            caches[f"sampled, S = {s}"] = root / f"sampled{s}.zarr"
            convert_cache(dense32, caches[f"sampled, S = {s}"], progress=False, kind=softlabels.Sampled(
                samples=s, proposal_temperature=args.temperature, sample_seed=0, temperatures=grid))

        scratch_accuracy, scratch_ece = train(None, "scratch")
        results = {name: train(path, name.replace(" ", "").replace(",", "-").replace("=", "")) for name, path in caches.items()}
        dense_gain = results["dense float32"][0] - scratch_accuracy
        n = len(open_data(str(paths["transfer"])))
        dense_bytes = directory_bytes(dense32) / n

        print(f"Task: {CLASSES} classes in {GROUPS} groups, {DIM}-D inputs; teacher MLP 16-256-256-1000 trained on "
              f"100 labels per class reaches {teacher_accuracy:.1%} on the {len(test):,} test samples. Student MLP "
              f"16-128-1000, {args.epochs} epochs, T = {args.temperature:g}, soft targets only (alpha = 0) on "
              f"{n:,} unlabeled transfer samples; scratch: the same student on 5 labels per class. "
              f"Bytes per sample are the cache's size on disk over its rows (Zarr, logits uncompressed). "
              f"Total run time {time.perf_counter() - began:.0f} s.\n")
        print("| soft targets | bytes per sample | vs dense float32 | test accuracy | share of dense KD gain | ECE |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| none (scratch, 5 labels per class) | - | - | {scratch_accuracy:.1%} | 0% | {scratch_ece:.3f} |")
        for name, path in caches.items():
            accuracy, ece = results[name]
            per_sample = directory_bytes(path) / n
            share = (accuracy - scratch_accuracy) / dense_gain if dense_gain > 0 else float("nan")
            print(f"| {name} | {per_sample:.1f} | 1/{dense_bytes / per_sample:.0f} | {accuracy:.1%} | {share:.0%} | {ece:.3f} |")
        print(f"\nDense KD gain over scratch: {dense_gain * 100:+.1f} points.")


if __name__ == "__main__":
    main()
