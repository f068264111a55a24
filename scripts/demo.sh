#!/usr/bin/env bash
# The main job on the built-in MNIST-1D data, every step a plain softlabels command:
#   1. train a 1-D CNN teacher on the 4000 training labels (unless TEACHER=path is given),
#   2. dump its logits for the train and test splits and for 40,000 unlabeled transfer samples,
#   3. train three students on the 4000 hard labels alone (the scratch baseline),
#   4. distill the same three students from the cached soft targets of the transfer set,
#   5. print the comparison on the 1000 test samples,
#   6. write the report: figures of the runs and caches and an HTML page (runs/demo/report/index.html).
# Usage: bash scripts/demo.sh            (outputs under runs/demo; OUT=dir to change)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

out="${OUT:-runs/demo}"
epochs="${EPOCHS:-30}"
students=(--student linear --student mlp --student 'cnn1d?channels=16')
transfer='mnist1d://transfer?n=40000&seed=1'
mkdir -p "$out"

teacher="${TEACHER:-}"
runs=("$out/scratch" "$out/distilled")
if [ -z "$teacher" ]; then
  echo "== 1. teacher: cnn1d (64 channels) on the 4000 MNIST-1D training labels"
  softlabels train-student --data mnist1d://train --hard-labels-only --student 'teacher=cnn1d?channels=64' \
    --eval-data mnist1d://test --epochs "$epochs" --out "$out/teacher" --overwrite
  teacher="$out/teacher/teacher/student.pth"
  runs=("$out/teacher" "${runs[@]}")
fi

echo "== 2. dump the teacher's logits once"
softlabels dump --teacher "$teacher" --data mnist1d://train --out "$out/train.zarr" --overwrite
softlabels dump --teacher "$teacher" --data mnist1d://test --out "$out/test.zarr" --overwrite
softlabels dump --teacher "$teacher" --data "$transfer" --out "$out/transfer.zarr" --overwrite
softlabels inspect "$out/transfer.zarr"

echo "== 3. students from scratch on the 4000 hard labels"
softlabels train-student --data mnist1d://train --hard-labels-only "${students[@]}" \
  --eval-cache "$out/test.zarr" --epochs "$epochs" --out "$out/scratch" --overwrite

echo "== 4. the same students distilled from the cached transfer set (no labels, no teacher in the loop)"
softlabels train-student --cache "$out/transfer.zarr" "${students[@]}" \
  --eval-cache "$out/test.zarr" --epochs "$epochs" --out "$out/distilled" --overwrite

echo "== 5. test accuracy (1000 MNIST-1D test samples)"
softlabels compare "${runs[@]}"

echo "== 6. the report: learning curves, accuracy against size, calibration, the caches' statistics"
softlabels report "${runs[@]}" --cache "$out/transfer.zarr" --cache "$out/test.zarr" --out "$out/report" --overwrite --quiet
