"""``text:`` data specs: UTF-8 files tokenised with a ``tokenizers`` JSON and packed into windows."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from softlabels import open_data
from softlabels.errors import SoftlabelsError

tokenizers = pytest.importorskip("tokenizers")

SEQ_LEN = 16


def write_corpus(root: Path) -> list[Path]:
    """Four documents of made-up words, one in a subfolder; returned in the order text: reads them."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "zé", "ür"]
    files = [root / "b.txt", root / "a.txt", root / "sub" / "c.md", root / "a-z.txt"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        words = ("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(60, 120)))
        file.write_text(" ".join(words) + ".\n", encoding="utf-8")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 300) -> Path:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train([str(f) for f in files], tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    files = write_corpus(root / "docs")
    # A space and a '+' in the tokenizer's path: the canonical spec must still name it exactly.
    return root / "docs", files, train_tokenizer(files, root / "tok dir+x" / "tokenizer.json")


def test_windows_are_the_concatenated_documents(corpus):
    docs, files, tokenizer_path = corpus
    source = open_data(f"text:{docs}?tokenizer={tokenizer_path}&seq_len={SEQ_LEN}")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    per_file = [tokenizer.encode(f.read_text(encoding="utf-8")).ids for f in files]
    expected = np.concatenate(per_file)
    n = len(expected) // SEQ_LEN
    assert len(source) == n and source.input_shape == (SEQ_LEN,)
    ids, labels = source.read(0, n)
    np.testing.assert_array_equal(ids.ravel(), expected[: n * SEQ_LEN])
    segments = np.repeat(np.arange(len(files)), [len(p) for p in per_file])[: n * SEQ_LEN].reshape(n, SEQ_LEN)
    np.testing.assert_array_equal(source._open()["segment_ids"], segments)
    # The next token is the label, except at a window's end and across a document boundary.
    same_document = segments[:, 1:] == segments[:, :-1]
    assert not same_document.all()
    np.testing.assert_array_equal(labels[:, :-1], np.where(same_document, ids[:, 1:], -1))
    assert (labels[:, -1] == -1).all()
    assert source.tokenizer["vocab_size"] == tokenizer.get_vocab_size()


def test_canonical_spec_and_fingerprint_are_stable(corpus, monkeypatch):
    docs, files, tokenizer_path = corpus
    monkeypatch.chdir(docs.parent)
    first = open_data(f"text:docs?tokenizer=tok%20dir%2Bx/tokenizer.json&seq_len={SEQ_LEN}")
    assert first.spec.startswith(f"text:{docs}?tokenizer=/")
    again = open_data(first.spec)  # what a manifest records reopens to the same windows
    assert again.spec == first.spec and again.fingerprint() == first.fingerprint()
    assert again.tokenizer == first.tokenizer
    longer = open_data(first.spec.replace(f"seq_len={SEQ_LEN}", "seq_len=32"))
    assert longer.fingerprint() != first.fingerprint()


def test_a_single_file_and_another_tokenizer(corpus, tmp_path):
    docs, files, tokenizer_path = corpus
    single = open_data(f"text:{files[0]}?tokenizer={tokenizer_path}&seq_len=8")
    assert (single._open()["segment_ids"] == 0).all()
    other = train_tokenizer(files, tmp_path / "other.json", vocab_size=200)
    theirs = open_data(f"text:{files[0]}?tokenizer={other}&seq_len=8")
    assert theirs.tokenizer["sha256"] != single.tokenizer["sha256"]
    assert theirs.fingerprint() != single.fingerprint()


@pytest.mark.parametrize(
    "query,pattern",
    [
        ("seq_len=16", "missing tokenizer"),
        ("tokenizer=TOK", "missing seq_len"),
        ("", "missing tokenizer and seq_len"),
        ("tokenizer=TOK&seq_len=1", "seq_len must be at least 2"),
        ("tokenizer=TOK&seq_len=ten", "seq_len must be an integer"),
        ("tokenizer=TOK&seq_len=16&stride=8", "unknown parameter 'stride'"),
        ("tokenizer=TOK&seq_len=16&seq_len=8", "'seq_len' given twice"),
        ("tokenizer=TOK&seq_len=100000", r"tokens in all, not one window of 100000"),
        ("tokenizer=nowhere.json&seq_len=16", "tokenizer file not found"),
        ("tokenizer=DIR&seq_len=16", r"is a folder: give its tokenizer file, e.g. .*tokenizer.json"),
        ("tokenizer=BAD&seq_len=16", "is not a tokenizers JSON file"),
    ],
)
def test_bad_specs_are_one_line_errors(corpus, query, pattern):
    docs, files, tokenizer_path = corpus
    bad = docs.parent / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    query = query.replace("TOK", str(tokenizer_path)).replace("BAD", str(bad)).replace("DIR", str(tokenizer_path.parent))
    with pytest.raises(SoftlabelsError, match=pattern) as caught:
        open_data(f"text:{docs}?{query}")
    assert "\n" not in str(caught.value)


def test_missing_paths_non_utf8_and_no_tokenizers(corpus, tmp_path, monkeypatch):
    docs, files, tokenizer_path = corpus
    with pytest.raises(SoftlabelsError, match="no such file or directory"):
        open_data(f"text:{tmp_path / 'nowhere'}?tokenizer={tokenizer_path}&seq_len=16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoftlabelsError, match="holds no files"):
        open_data(f"text:{tmp_path / 'empty'}?tokenizer={tokenizer_path}&seq_len=16")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SoftlabelsError, match=r"latin1.txt is not UTF-8 \(invalid byte at offset 3\)"):
        open_data(f"text:{tmp_path}?tokenizer={tokenizer_path}&seq_len=16")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(SoftlabelsError, match=r"pip install 'softlabels\[lm\]'"):
        open_data(f"text:{docs}?tokenizer={tokenizer_path}&seq_len=16")


def test_a_model_trained_on_one_tokenizers_ids_refuses_data_from_another(corpus, tmp_path):
    """The student's checkpoint records the tokenizer; dump, evaluate and --eval-teacher refuse other token ids."""
    from click.testing import CliRunner

    from softlabels import load_model
    from softlabels.cli import cli

    docs, files, tokenizer_path = corpus
    ours = f"text:{docs}?tokenizer={tokenizer_path}&seq_len={SEQ_LEN}"
    theirs = f"text:{docs}?tokenizer={train_tokenizer(files, tmp_path / 'other.json', vocab_size=250)}&seq_len={SEQ_LEN}"

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    trained = run("train-student", "--data", ours, "--hard-labels-only", "--student", "gpt?layers=1&dim=16&heads=2",
                  "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    model = tmp_path / "run" / "gpt" / "student.pth"
    assert load_model(model).tokenizer == open_data(ours).tokenizer
    evaluated = run("evaluate", "--model", model, "--data", ours)
    assert evaluated.exit_code == 0 and ": accuracy " in evaluated.output and " nats per token (perplexity " in evaluated.output, evaluated.output
    for args in (["evaluate", "--model", model, "--data", theirs],
                 ["dump", "--teacher", model, "--data", theirs, "--out", tmp_path / "c.zarr", "--quiet"],
                 ["train-student", "--data", theirs, "--hard-labels-only", "--student", "linear", "--eval-data", theirs,
                  "--eval-teacher", model, "--out", tmp_path / "r2", "--quiet"]):
        result = run(*args)
        assert result.exit_code == 1 and "was made with tokenizer sha256" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c.zarr").exists()
