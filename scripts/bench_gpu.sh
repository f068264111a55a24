#!/usr/bin/env bash
# The dump's image path measured in one run of at most 8 minutes (scripts/bench_gpu.py), figures to $OUT.
#
# With a CUDA GPU: first the CUDA tests (tests/test_cuda.py and the augmentations' device replay, log
# in $OUT/tests.txt), then a ResNet-50 teacher and a ResNet-18 student (torchvision), 20,000 synthetic
# JPEGs at 224 x 224, under bf16 autocast and then fp16, channels_last. Without one: the same script on the CPU
# with small CNNs and 2,000 small JPEGs, so that it ends in minutes on a 2-core machine.
#
# It runs with the python3 on PATH from this checkout's sources (PYTHONPATH), so it needs torch,
# torchvision and the core dependencies there. On a machine whose python3 lacks some (the device
# machine lacks zarr, numcodecs, donfig, google-crc32c, awscrt, isal, zstandard and mnist1d), put
# their wheels for its Python in ./.whl: they are installed into /tmp/site first.
#
#   OUT=/tmp/bench_gpu/out bash scripts/bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/bench_gpu/out}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  mkdir -p "$out" && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
  failed=0
  timeout 150 python3 -m pytest -q tests/test_cuda.py tests/test_augment.py::test_cuda_replays_what_the_cpu_does 2>&1 \
    | tee "$out/tests.txt" || failed=$?
  for precision in bf16 fp16; do
    timeout 170 python3 scripts/bench_gpu.py --device cuda --teacher torchvision:resnet50 --student torchvision:resnet18 \
      --images 20000 --size 224 --precision "$precision" --channels-last --batch-size 256 \
      --out "$out/$precision" || failed=$?
  done
  exit "$failed"  # every step runs: a failed one keeps the figures of the others
else
  timeout 470 python3 scripts/bench_gpu.py --device cpu --teacher cnn2d --teacher-kwargs '{"channels": 32}' \
    --student cnn2d --student-kwargs '{"channels": 8}' --images 2000 --height 96 --width 128 --size 64 \
    --precision fp32 --workers 2 --batch-size 128 --out "$out/cpu"
fi
