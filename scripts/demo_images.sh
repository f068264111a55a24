#!/usr/bin/env bash
# The vision demo on real images that scikit-learn ships, offline, every step a plain softlabels command:
#   1. write scikit-learn's 1,797 handwritten 8 x 8 digits as an image folder (1,297 train, 500 test),
#   2. train a small CNN teacher on the training images with random resized crops,
#   3. dump its targets for the plain training images (a one-view cache), for 8 recorded crops of each
#      (a view cache, each crop cut from the 8 x 8 source image) and for the test images,
#   4. train two smaller students five ways: from scratch, from scratch with the crops, from the
#      one-view cache, from the view cache, and online (the teacher run on every fresh crop),
#   5. print the comparison on the 500 test digits.
# Usage: bash scripts/demo_images.sh       (outputs under runs/digits; OUT=dir to change)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
python -c "import sklearn" 2>/dev/null || python -m pip install --quiet -e ".[demo]"

out="${OUT:-runs/digits}"
epochs="${EPOCHS:-40}"
images="$out/images"
train="imagefolder:$images/train?size=16&channels=1"
test="imagefolder:$images/test?size=16&channels=1"
crop=(--augment 'crop?size=16,16&scale=0.5,1&ratio=0.8,1.25')
students=(--student 'mlp?width=64' --student 'cnn2d?channels=8&depth=1')
common=(--eval-cache "$out/test.zarr" --epochs "$epochs" --overwrite --quiet)
mkdir -p "$out"

echo "== 1. scikit-learn's digits as an image folder"
rm -rf "$images"
python scripts/digits_folder.py "$images"

echo "== 2. teacher: cnn2d (32 channels) on the 1297 training digits, with random resized crops"
softlabels train-student --data "$train" --hard-labels-only --student 'teacher=cnn2d?channels=32' "${crop[@]}" \
  --eval-data "$test" --epochs "$epochs" --out "$out/teacher" --overwrite --quiet
teacher="$out/teacher/teacher/student.pth"

echo "== 3. dump: the plain images, 8 recorded crops of each, and the test images"
softlabels dump --teacher "$teacher" --data "$train" --out "$out/one-view.zarr" --overwrite --quiet
softlabels dump --teacher "$teacher" --data "$train" --out "$out/views.zarr" --views 8 "${crop[@]}" --overwrite --quiet
softlabels dump --teacher "$teacher" --data "$test" --out "$out/test.zarr" --overwrite --quiet
softlabels inspect "$out/views.zarr"

echo "== 4. two students, five ways"
softlabels train-student --data "$train" --hard-labels-only "${students[@]}" "${common[@]}" --out "$out/scratch"
softlabels train-student --data "$train" --hard-labels-only "${students[@]}" "${crop[@]}" "${common[@]}" --out "$out/scratch-crops"
softlabels train-student --cache "$out/one-view.zarr" "${students[@]}" "${common[@]}" --out "$out/one-view-cache"
softlabels train-student --cache "$out/views.zarr" "${students[@]}" "${common[@]}" --out "$out/view-cache"
softlabels train-student --data "$train" --online-teacher "$teacher" "${crop[@]}" "${students[@]}" "${common[@]}" --out "$out/online"

echo "== 5. test accuracy (500 digits)"
softlabels compare "$out/teacher" "$out/scratch" "$out/scratch-crops" "$out/one-view-cache" "$out/view-cache" "$out/online"
