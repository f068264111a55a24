"""The dump's image path end to end: decoding, the teacher's bare forward pass, the dump, and a
student trained from the cache against the same student on hard labels, in images per second.

On a synthetic folder of photograph-like JPEGs (``scripts/image_folder.py``) decoded to
``size x size`` (shorter side ``size * 8 / 7``, centre crop), with randomly initialised models (no
weights are downloaded; throughput does not depend on them):

- **decode**: the dump's input pipeline alone (DataLoader workers decode, resize, normalise and batch;
  pinned memory on CUDA), no model; measured before and after the dump, the faster of the two;
- **forward**: the teacher under ``--precision`` autocast (and channels_last) on one batch of real
  pre-decoded images, repeated, on the device: the most the dump could do if decoding were free;
- **dump**: ``softlabels.dump`` of the whole folder (dense float16 Zarr cache), fingerprint included
  and, separately, without it;
- **students**: one epoch of ``--student`` from the cache (soft targets) and on hard labels alone,
  alternating, the better of two each.

The goal is a dump at 95% of the slower of decode and forward. Figures go to ``$OUT`` (or
``--out``) as ``bench_gpu.json`` and ``bench_gpu.md``. ``scripts/bench_gpu.sh`` runs it on a GPU
with a ResNet-50 teacher, or on the CPU with small models.

    python scripts/bench_gpu.py --device cuda --teacher torchvision:resnet50 --student torchvision:resnet18 \\
        --images 20000 --size 224 --precision bf16 --channels-last --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_folder import make_image_folder  # noqa: E402

import softlabels  # noqa: E402
from softlabels import StudentSpec, TrainConfig, build_model, open_cache, open_data, train_students  # noqa: E402
from softlabels.checkpoint import LoadedModel  # noqa: E402
from softlabels.data import default_workers  # noqa: E402
from softlabels.dump import TeacherForward, iter_batches, resolve_device  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(spec: str, batch_size: int, workers: int, device: torch.device) -> float:
    source = open_data(spec)
    began = time.perf_counter()
    count = 0
    for _, x, _, _ in iter_batches(source, batch_size=batch_size, device=device, num_workers=workers):
        count += len(x)
    synchronize(device)
    return count / (time.perf_counter() - began)


def forward_rate(teacher: LoadedModel, spec: str, batch_size: int, device: torch.device, precision: str,
                 channels_last: bool, images: int) -> float:
    x, _ = open_data(spec).read(0, batch_size)
    x = torch.from_numpy(x).to(device)
    forward = TeacherForward(teacher.model, device, precision, channels_last)
    for _ in range(3):  # warm-up: cuDNN picks its algorithms
        forward(x, "warm-up")
    synchronize(device)
    steps = max(1, images // batch_size)
    began = time.perf_counter()
    for _ in range(steps):
        forward(x, "timing")
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gpu"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_gpu/out")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teacher", default="torchvision:resnet50")
    parser.add_argument("--teacher-kwargs", type=json.loads, default={}, help="JSON keyword arguments of the teacher.")
    parser.add_argument("--student", default="torchvision:resnet18")
    parser.add_argument("--student-kwargs", type=json.loads, default={}, help="JSON keyword arguments of the student.")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--height", type=int, default=375, help="Source images' typical height (photographs: 375).")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: softlabels' own for the device).")
    args = parser.parse_args()

    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    folder_bytes = make_image_folder(args.workdir / "images", args.images, classes=args.classes,
                                     height=args.height, width=args.width)
    made = time.perf_counter() - began
    spec = f"imagefolder:{args.workdir / 'images'}?size={args.size}&resize={args.size * 8 // 7}"
    if args.workers is None:
        args.workers = default_workers(open_data(spec), device)
    shape = (3, args.size, args.size)
    torch.manual_seed(0)
    model = build_model(args.teacher, input_shape=shape, num_classes=args.classes, kwargs=args.teacher_kwargs)
    teacher = LoadedModel(model, Path(args.teacher.replace(":", "_")), "0" * 64, args.teacher, args.teacher_kwargs,
                          num_classes=args.classes, input_shape=shape)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "teacher": args.teacher, "student": args.student, "images": args.images,
        "folder_MiB": round(folder_bytes / 2**20, 1), "size": args.size, "precision": args.precision,
        "channels_last": args.channels_last, "batch_size": args.batch_size, "workers": args.workers,
        "teacher_params": sum(p.numel() for p in model.parameters()), "seconds_to_make_folder": round(made, 1),
    }
    rates: dict[str, float] = {}
    decode = [decode_rate(spec, args.batch_size, args.workers, device)]
    rates["forward"] = forward_rate(teacher, spec, args.batch_size, device, args.precision, args.channels_last, args.images)
    source = open_data(spec)
    t0 = time.perf_counter()
    source.fingerprint()
    fingerprint = time.perf_counter() - t0
    cache_path = args.workdir / "cache.zarr"
    result = softlabels.dump(teacher, source, cache_path, batch_size=args.batch_size, device=str(device),
                             precision=args.precision, channels_last=args.channels_last, num_workers=args.workers,
                             overwrite=True, progress=False)
    rates["dump"] = args.images / result.seconds  # the source's fingerprint was taken above: not in these seconds
    decode.append(decode_rate(spec, args.batch_size, args.workers, device))  # before and after: the faster counts
    rates["decode"] = max(decode)
    results["decode_before_and_after_the_dump"] = [round(r, 1) for r in decode]
    results["fingerprint_seconds"] = round(fingerprint, 2)
    results["dump_seconds"] = round(result.seconds, 2)
    cache = open_cache(cache_path)
    for name, hard in (("student_from_cache", False), ("student_hard_labels", True)) * 2:  # alternating, best of 2
        config = TrainConfig(epochs=1, batch_size=args.batch_size, device=str(device), num_workers=args.workers,
                             hard_labels_only=hard)
        t0 = time.perf_counter()
        train_students([StudentSpec(args.student, args.student_kwargs, name="student")], source=open_data(spec),
                       cache=None if hard else cache, config=config, num_classes=args.classes, progress=False)
        rates[name] = max(rates.get(name, 0.0), args.images / (time.perf_counter() - t0))
    slower = min(rates["decode"], rates["forward"])
    results["images_per_second"] = {k: round(v, 1) for k, v in rates.items()}
    results["dump_vs_slower_of_decode_and_forward"] = round(rates["dump"] / slower, 3)
    results["fingerprint_vs_dump"] = round(fingerprint / (fingerprint + result.seconds), 4)
    results["total_seconds"] = round(time.perf_counter() - began, 1)

    lines = [
        f"{results['device']}, torch {torch.__version__}; {args.images:,} JPEGs ({results['folder_MiB']} MiB) decoded to "
        f"{args.size} x {args.size} by {args.workers} workers; teacher {args.teacher} ({results['teacher_params']:,} params), "
        f"{args.precision}{', channels_last' if args.channels_last else ''}, batch {args.batch_size}",
        "",
        "| work | images/s | vs the slower of decode and forward |",
        "| --- | ---: | ---: |",
    ]
    for name in ("decode", "forward", "dump", "student_from_cache", "student_hard_labels"):
        lines.append(f"| {name.replace('_', ' ')} | {rates[name]:,.0f} | {rates[name] / slower:.2f} |")
    lines += ["", f"fingerprint {fingerprint:.2f} s against a dump of {result.seconds:.2f} s "
                  f"({results['fingerprint_vs_dump']:.1%} of both together); whole script {results['total_seconds']} s"]
    text = "\n".join(lines)
    print(text)
    (args.out / "bench_gpu.md").write_text(text + "\n")
    (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
