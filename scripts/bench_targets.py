"""What building a language-model teacher's targets costs: each kind's ``build`` on one batch of logits,
and ``dump`` over the teacher's bare forward pass, for a teacher the size of the LM demo's.

    python scripts/bench_targets.py --rounds 3

To compare two versions, run the same script against each (the library is imported from PYTHONPATH):

    git archive BASE | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python scripts/bench_targets.py
    python scripts/bench_targets.py

The teacher has random weights (only speed is measured): ``gpt`` 4 layers x 256, vocabulary 2,048,
over 1,772 random windows of 64 tokens (113,408 tokens, the demo's training windows), batch 256
windows. Each round times a bare forward pass (``iter_logits``, outputs discarded) then the dump of
one kind to a new .zarr path; a ratio is the dump's time over the forward pass just before it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import softlabels
from softlabels import Dense, Sampled, TopK, open_data
from softlabels.checkpoint import save_checkpoint
from softlabels.dump import iter_logits
from softlabels.models import build_model
from softlabels.store import remove_path

VOCAB, SEQ_LEN, WINDOWS, BATCH = 2048, 64, 1772, 256
KINDS = {
    "dense, float16": Dense(),
    "top-k, K = 16, T = 1": TopK(k=16, temperatures=(1.0,)),
    "top-k, K = 16, grid 1, 2, 4, 8": TopK(k=16),
    "sampled, S = 24, T = 1": Sampled(samples=24, proposal_temperature=1.0, temperatures=(1.0,)),
    "sampled, S = 24, T = 1, compact": Sampled(samples=24, proposal_temperature=1.0, temperatures=(1.0,), compact=True),
}


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def bench_build(rounds: int) -> None:
    """Each kind's ``build`` on one batch of logits, best of ``rounds``."""
    logits = torch.randn(BATCH * SEQ_LEN, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    rows = torch.arange(len(logits))
    print(f"\n`build` on one batch: {len(logits):,} tokens x {VOCAB:,} float32 logits, best of {rounds}\n")
    print("| cache | build (ms) |\n| --- | ---: |")
    for name, kind in KINDS.items():
        best = min(timed(lambda: kind.build(logits, rows=rows, store_dtype=torch.float16)) for _ in range(rounds))
        print(f"| {name} | {best * 1e3:.0f} |")


def bench_dump(root: Path, rounds: int) -> None:
    ids = np.random.default_rng(0).integers(0, VOCAB, (WINDOWS, SEQ_LEN)).astype(np.int64)
    np.savez(root / "windows.npz", input_ids=ids)
    kwargs = {"layers": 4, "dim": 256, "heads": 4}
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(SEQ_LEN,), num_classes=VOCAB, kwargs=kwargs)
    save_checkpoint(root / "teacher.pth", model, arch="gpt", arch_kwargs=kwargs, input_shape=(SEQ_LEN,), num_classes=VOCAB)
    teacher, data = softlabels.load_model(root / "teacher.pth"), open_data(str(root / "windows.npz"))

    def forward_only() -> None:
        for _ in iter_logits(teacher.model, data, batch_size=BATCH, device="cpu"):
            pass

    def dump(kind) -> None:
        softlabels.dump(teacher, data, root / "speed.zarr", batch_size=BATCH, device="cpu", kind=kind, progress=False)

    forward_only()  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in KINDS}
    for _ in range(rounds):
        for name, kind in KINDS.items():
            forward = timed(forward_only)
            remove_path(root / "speed.zarr")
            ratios[name].append(timed(lambda: dump(kind)) / forward)
    print(f"\n`dump` over the bare forward pass: {WINDOWS * SEQ_LEN:,} tokens, {torch.get_num_threads()} torch threads, "
          f"median of {rounds} rounds (lowest-highest)\n")
    print("| cache | dump time / forward time |\n| --- | ---: |")
    for name, values in ratios.items():
        print(f"| {name} | {float(np.median(values)):.3f} ({min(values):.2f}-{max(values):.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"softlabels from {Path(softlabels.__file__).parent}")
    bench_build(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        bench_dump(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
