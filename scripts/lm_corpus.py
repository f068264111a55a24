"""The language-model demo's corpus and tokenizer, for `scripts/demo_lm.sh` and `scripts/bench_lm.py`:
the help texts of the standard library's ``pydoc_data/topics.py``, one document per topic (every
tenth topic in sorted order, from the fourth, held out), and a byte-level BPE tokenizer trained on
the training topics with ``tokenizers``.

    python scripts/lm_corpus.py runs/demo_lm 2048     # writes corpus/{train,heldout}/ and tokenizer.json
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def make_corpus(root: Path, vocab: int) -> list[str]:
    """Write ``root/corpus/{train,heldout}/*.txt`` and ``root/tokenizer.json``; return a line per split."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    held_out = set(names[3::10])
    for split in ("train", "heldout"):
        shutil.rmtree(root / "corpus" / split, ignore_errors=True)
        (root / "corpus" / split).mkdir(parents=True)
    for name in names:
        (root / "corpus" / ("heldout" if name in held_out else "train") / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(sorted(str(p) for p in (root / "corpus" / "train").iterdir()),
                    trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.save(str(root / "tokenizer.json"))
    described = []
    for split in ("train", "heldout"):
        texts = [p.read_text(encoding="utf-8") for p in sorted((root / "corpus" / split).iterdir())]
        chars, tokens = sum(map(len, texts)), sum(len(tokenizer.encode(t).ids) for t in texts)
        described.append(f"{split} {len(texts)} topics, {chars:,} chars, {tokens:,} tokens ({chars / tokens:.2f} chars per token)")
    return described


if __name__ == "__main__":
    out = Path(sys.argv[1])
    lines = make_corpus(out, int(sys.argv[2]))
    print(f"byte-level BPE tokenizer, vocabulary {sys.argv[2]}, trained on the training topics: {out / 'tokenizer.json'}")
    print("\n".join(f"  {line}" for line in lines))
