"""``text:`` data specs: UTF-8 files tokenised with a ``tokenizers`` JSON and packed into windows."""

import json
import os
import random
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from softlabels import open_data
from softlabels.errors import SoftlabelsError
from softlabels.text import _stderr_held

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


def variant(tokenizer_path: Path, out: Path, **changes) -> Path:
    """A copy of the tokenizer's JSON with some top-level fields replaced."""
    settings = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    out.write_text(json.dumps({**settings, **changes}), encoding="utf-8")
    return out


def test_padding_and_truncation_in_the_file_are_switched_off(corpus, tmp_path):
    docs, files, tokenizer_path = corpus
    plain = open_data(f"text:{docs}?tokenizer={tokenizer_path}&seq_len={SEQ_LEN}")
    padding = {"strategy": {"Fixed": 2_000_000_000}, "direction": "Right", "pad_to_multiple_of": None,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "[UNK]"}  # would allocate 2e9 tokens per document
    truncation = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    both = variant(tokenizer_path, tmp_path / "t.json", padding=padding, truncation=truncation)
    source = open_data(f"text:{docs}?tokenizer={both}&seq_len={SEQ_LEN}")
    np.testing.assert_array_equal(source.read(0, len(source))[0], plain.read(0, len(plain))[0])


REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": " " * 100}


@pytest.mark.parametrize(
    "normalizer,pre_tokenizer,refused",
    [
        ({"type": "Sequence", "normalizers": [REPLACE_SPACE] * 6}, None, "1e+12 times longer"),
        ({"type": "Replace", "pattern": {"Regex": "x*"}, "content": "a"}, None, "inf times longer"),
        ({"type": "Replace", "pattern": {"String": ""}, "content": "a"}, None, "inf times longer"),
        (None, {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False,
                                                        "trim_offsets": True, "use_regex": True}] * 6}, "4.1e+03 times longer"),
        ({"type": "Prepend", "prepend": "a" * 2000}, None, "2e+03 times longer"),
    ],
)
def test_a_tokenizer_that_could_lengthen_text_too_far_is_refused(corpus, tmp_path, normalizer, pre_tokenizer, refused):
    docs, files, tokenizer_path = corpus
    hostile = variant(tokenizer_path, tmp_path / "t.json", normalizer=normalizer, pre_tokenizer=pre_tokenizer)
    with pytest.raises(SoftlabelsError, match=re.escape(refused) + r" \(its normalizer and pre-tokenizer\), more than the 1024"):
        open_data(f"text:{docs}?tokenizer={hostile}&seq_len={SEQ_LEN}")


def test_common_normalizers_and_pre_tokenizers_are_accepted(corpus, tmp_path):
    docs, files, tokenizer_path = corpus
    # Llama's normalizer (12) with T5's rule for runs of spaces (1.5), then GPT-2's pre-tokenizer (4)
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                      {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
                                                      {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"},
                                                      {"type": "Replace", "pattern": {"Regex": r"\p{Zs}+"}, "content": " "}]}
    pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    accepted = variant(tokenizer_path, tmp_path / "t.json", normalizer=normalizer, pre_tokenizer=pre_tokenizer)
    assert len(open_data(f"text:{docs}?tokenizer={accepted}&seq_len={SEQ_LEN}")) > 0


def test_a_replace_regex_python_cannot_read_is_refused_for_that_reason(corpus, tmp_path):
    docs, files, tokenizer_path = corpus
    hex_digits = {"type": "Replace", "pattern": {"Regex": r"\h+"}, "content": "x"}  # Oniguruma's \h, which re lacks
    hostile = variant(tokenizer_path, tmp_path / "t.json", normalizer=hex_digits)
    with pytest.raises(SoftlabelsError, match=r"its Replace normalizer's regex '\\\\h\+' is not one softlabels can read to "
                                              "bound how far it lengthens a text"):
        open_data(f"text:{docs}?tokenizer={hostile}&seq_len={SEQ_LEN}")


def test_stderr_held_by_two_threads_comes_back_to_the_stderr_they_found():
    found = os.fstat(2).st_ino
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with _stderr_held():
            first_in.set()
            second_in.wait(1)  # the second thread waits for this one to come out, or holds a copy of its stderr
        first_out.set()

    def second():
        first_in.wait()
        with _stderr_held():
            second_in.set()
            first_out.wait(1)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert os.fstat(2).st_ino == found


def test_a_regex_that_backtracks_too_long_is_a_one_line_error(corpus, tmp_path, capfd):
    docs, files, tokenizer_path = corpus
    split = {"type": "Split", "pattern": {"Regex": r"(\w+\s?)*$"}, "behavior": "Isolated", "invert": False}
    hostile = variant(tokenizer_path, tmp_path / "t.json", pre_tokenizer=split)
    (tmp_path / "doc.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")
    with pytest.raises(SoftlabelsError, match=r"tokenizer .* failed on text file .*doc.txt: .*retry-limit") as caught:
        open_data(f"text:{tmp_path / 'doc.txt'}?tokenizer={hostile}&seq_len={SEQ_LEN}")
    assert "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""  # nor the message Rust prints when it panics


def test_token_ids_beyond_the_vocabulary_are_refused(corpus, tmp_path):
    docs, files, tokenizer_path = corpus
    settings = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    vocab = settings["model"]["vocab"]
    word = max(vocab, key=vocab.get)  # a merged token the documents use
    vocab[word] = 3_000_000_000  # no int32, and far past the vocabulary's 300 tokens
    hostile = variant(tokenizer_path, tmp_path / "t.json", model=settings["model"])
    with pytest.raises(SoftlabelsError, match=r"gives text file .* token id 3000000000, beyond its vocabulary of 300 tokens"):
        open_data(f"text:{docs}?tokenizer={hostile}&seq_len={SEQ_LEN}")


def test_a_caches_text_spec_runs_only_the_tokenizer_the_cache_records(corpus, tmp_path, monkeypatch):
    """train-student --cache without --data reopens the recorded text: spec; its tokenizer file may
    have been replaced by anyone since, and is checked before it is run."""
    import zarr
    from click.testing import CliRunner

    from softlabels import open_cache, source_for_cache
    from softlabels.checkpoint import save_checkpoint
    from softlabels.cli import cli
    from softlabels.models import build_model

    docs, files, tokenizer_path = corpus
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    spec = f"text:{docs}?tokenizer=shared/tokenizer.json&seq_len={SEQ_LEN}"
    vocab = open_data(spec).tokenizer["vocab_size"]
    teacher = build_model("gpt", input_shape=(SEQ_LEN,), num_classes=vocab, kwargs={"layers": 1, "dim": 16, "heads": 2})
    save_checkpoint("teacher.pth", teacher, arch="gpt", arch_kwargs={"layers": 1, "dim": 16, "heads": 2},
                    input_shape=(SEQ_LEN,), num_classes=vocab)
    dumped = CliRunner().invoke(cli, ["dump", "--teacher", "teacher.pth", "--data", spec, "--out", "shared/c.zarr", "--quiet"])
    assert dumped.exit_code == 0, dumped.output
    with open_cache("shared/c.zarr") as cache:
        assert len(source_for_cache(cache)) == len(cache)  # the honest workflow: no --data needed

    variant(tokenizer_path, shared / "tokenizer.json", truncation=None, added_tokens=[])  # another file
    result = CliRunner().invoke(cli, ["train-student", "--cache", "shared/c.zarr", "--student", "linear", "--out", "run", "--quiet"])
    assert result.exit_code == 1, result.output
    assert re.search(r"cache shared/c.zarr was made with tokenizer sha256 \w{12}\.\.\., but .*tokenizer.json has \w{12}\.\.\.: "
                     r"it is not run \(pass --data to use it\)", result.output), result.output
    assert len(result.output.strip().splitlines()) == 1

    group = zarr.open_group("shared/c.zarr", mode="r+")
    manifest = dict(group.attrs["softlabels"])
    group.attrs["softlabels"] = {**manifest, "tokens": {**manifest["tokens"], "tokenizer": None}}
    with open_cache("shared/c.zarr") as cache, pytest.raises(SoftlabelsError, match="records no tokenizer sha256 for its text dataset"):
        source_for_cache(cache)
