#!/usr/bin/env bash
# Distilling a small language model from token-level caches, fully offline on the CPU, every step a
# plain softlabels command:
#   1. write a corpus from text that ships with Python: the help texts of the standard library's
#      pydoc_data/topics.py (79 topics, about 465,000 characters), one document per topic, every tenth
#      topic held out; train a byte-level BPE tokenizer (vocabulary 2,048) on the training topics,
#   2. train the teacher, the built-in decoder `gpt` (4 layers of width 256, 3.7M parameters), on the
#      training text's next tokens (unless TEACHER=checkpoint is given),
#   3. dump the teacher over the training windows once per kind (dense, top-k, sampled) and once over
#      the held-out windows (for the students' agreement with the teacher),
#   4. train two smaller students per kind of target, both in one pass: the next tokens alone (CE),
#      dense KD, top-k with each treatment of the tail, sampled,
#   5. print held-out nats per token, ECE and each cache's bytes per token.
# Usage: bash scripts/demo_lm.sh     (outputs under runs/demo_lm, OUT=dir to change; about 12 minutes
#        on 2 CPU cores; TEACHER_EPOCHS and EPOCHS change the training lengths)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

out="${OUT:-runs/demo_lm}"
teacher_epochs="${TEACHER_EPOCHS:-6}"
epochs="${EPOCHS:-3}"
vocab=2048
seq_len=64
batch=16  # windows per step: more steps per epoch take the small models past the unigram plateau sooner
temperature=1  # the usual temperature for language models; sparse caches keep its log-partition only
topk_sizes=(4 16)
sample_sizes=(12 48)
mkdir -p "$out"

echo "== 1. corpus (the help texts of the standard library's pydoc_data/topics.py) and tokenizer"
python scripts/lm_corpus.py "$out" "$vocab"
train="text:$out/corpus/train?tokenizer=$out/tokenizer.json&seq_len=$seq_len"
heldout="text:$out/corpus/heldout?tokenizer=$out/tokenizer.json&seq_len=$seq_len"

teacher="${TEACHER:-}"
if [ -z "$teacher" ]; then
  echo "== 2. teacher: gpt, 4 layers of width 256, on the training text's next tokens ($teacher_epochs epochs)"
  softlabels train-student --data "$train" --hard-labels-only --student 'teacher=gpt?layers=4&dim=256&heads=4' \
    --eval-data "$heldout" --epochs "$teacher_epochs" --batch-size "$batch" --lr 1e-3 --out "$out/teacher" --overwrite --quiet \
    | tail -n 2
  teacher="$out/teacher/teacher/student.pth"
fi

echo "== 3. dump the teacher's targets once per kind (windows of $seq_len tokens)"
dump() { softlabels dump --teacher "$teacher" --quiet --overwrite "$@"; }
dump --data "$heldout" --out "$out/heldout.zarr"
dump --data "$train" --out "$out/dense.zarr"
caches=(dense)
for k in "${topk_sizes[@]}"; do
  dump --data "$train" --out "$out/top$k.zarr" --top-k "$k" --temperatures "$temperature"
  caches+=("top$k")
done
for s in "${sample_sizes[@]}"; do
  # drawn from the teacher at the training temperature, so only the tokens and their counts are kept
  dump --data "$train" --out "$out/sampled$s.zarr" --sample "$s" --proposal-temperature "$temperature" \
    --temperatures "$temperature" --compact
  caches+=("sampled$s")
done
softlabels inspect "$out/top${topk_sizes[-1]}.zarr"

echo "== 4. students gpt 2x128 and gpt 1x64, both in each command: next tokens alone, then distilled from each cache ($epochs epochs)"
common=(--student 'gpt-2x128=gpt?layers=2&dim=128&heads=4' --student 'gpt-1x64=gpt?layers=1&dim=64&heads=2'
        --eval-cache "$out/heldout.zarr" --epochs "$epochs" --batch-size "$batch" --lr 2e-3
        --temperature "$temperature" --alpha 0 --overwrite --quiet)
train_student() { echo "   $1"; softlabels train-student "${@:2}" "${common[@]}" --out "$out/runs/$1" > /dev/null; }
train_student ce --data "$train" --hard-labels-only
train_student dense --cache "$out/dense.zarr"
runs=("ce:-" "dense:dense")
for k in "${topk_sizes[@]}"; do
  for tail in renormalize exact gold; do
    train_student "top$k-$tail" --cache "$out/top$k.zarr" --topk-tail "$tail"
    runs+=("top$k-$tail:top$k")
  done
done
for s in "${sample_sizes[@]}"; do
  train_student "sampled$s" --cache "$out/sampled$s.zarr"
  runs+=("sampled$s:sampled$s")
done

echo "== 5. held-out nats per token (lower is better), ECE, and each cache's bytes per token"
for c in heldout "${caches[@]}"; do softlabels inspect "$out/$c.zarr" --json > "$out/$c.inspect.json"; done
python - "$out" "${runs[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out, runs = Path(sys.argv[1]), [r.split(":") for r in sys.argv[2:]]
tails = {"renormalize": "renormalised", "exact": "exact tail", "gold": "tail to the gold token"}
heldout = json.loads((out / "heldout.inspect.json").read_text())["tokens"]
print(f"teacher: {heldout['teacher_nats_per_token']:.3f} nats per token on the held-out text; "
      f"students: soft targets only (alpha 0) at T = 1; CE only: the next tokens alone")
rows = []
for run, cache in runs:
    if run.startswith("top"):
        k, tail = run[3:].split("-")
        label = f"top-k K={k}, {tails[tail]}"
    elif run.startswith("sampled"):
        label = f"sampled S={run[7:]} (compact)"
    else:
        label = {"ce": "CE only", "dense": "dense KD"}[run]
    size = "-" if cache == "-" else f"{json.loads((out / f'{cache}.inspect.json').read_text())['tokens']['bytes_per_token']:,.1f}"
    rows.append((label, size, json.loads((out / "runs" / run / "summary.json").read_text())))
students = [entry["student"] for entry in rows[0][2]]
header = ["targets", "bytes/token"] + [f"{s} {m}" for s in students for m in ("nats", "ECE")]
table = [header] + [[label, size] + [f"{v:.3f}" for e in summary for v in (e["eval_nats"], e["ece"])] for label, size, summary in rows]
widths = [max(len(r[i]) for r in table) for i in range(len(header))]
for i, r in enumerate(table):
    print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0:
        print("  ".join("-" * w for w in widths))
EOF
