"""Token caches: next-token labels, a token dump's arrays and bytes, losses over positions, and bad input."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from softlabels import CacheWriter, Dense, Sampled, TopK, dump, kd_loss, open_cache, open_data, save_checkpoint
from softlabels.checkpoint import load_model
from softlabels.errors import SoftlabelsError
from softlabels.kinds.base import SoftTargets
from softlabels.models import build_model
from softlabels.tokens import TokenSource, gold_logprob, next_token_labels
from softlabels.verify import verify_cache

GPT = {"layers": 1, "dim": 32, "heads": 2}


@pytest.fixture
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60, size=(48, 12))
    mask = np.ones_like(ids)
    mask[:, :3] = 0  # a prompt whose tokens are not predicted
    np.savez(tmp_path / "tok.npz", input_ids=ids, loss_mask=mask)
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(12,), num_classes=60, kwargs=GPT)
    save_checkpoint(tmp_path / "gpt.pth", model, arch="gpt", arch_kwargs=GPT, input_shape=(12,), num_classes=60)
    return tmp_path


def test_the_label_of_a_position_is_the_next_token_where_it_is_a_target():
    ids = np.array([[5, 6, 7, 8, 9]])
    assert next_token_labels(ids).tolist() == [[6, 7, 8, 9, -1]]
    assert next_token_labels(ids, loss_mask=np.array([[1, 1, 0, 1, 1]])).tolist() == [[6, -1, 8, 9, -1]]
    assert next_token_labels(ids, segments=np.array([[0, 0, 0, 1, 1]])).tolist() == [[6, 7, -1, 9, -1]]


def test_a_token_dump_stores_every_position_and_the_gold_log_prob(tokens):
    teacher = load_model(tokens / "gpt.pth")
    source = open_data(str(tokens / "tok.npz"))
    result = dump(teacher, source, tokens / "c.zarr", kind=TopK(k=5), device="cpu", batch_size=16, progress=False)
    assert result.labeled == 48 * 9  # 12 positions: those predicting prompt tokens 1 and 2, and the last, have none
    with open_cache(tokens / "c.zarr") as cache:
        targets, labels = cache.read(0, 48)
        gold = cache.read_records(0, 48)["tokens/gold_logprob"]
        assert targets["topk_logits"].shape == (48, 12, 5) and cache.layout.item_axes == (("token", 12),)
        assert cache.manifest["tokens"] == {"seq_len": 12, "vocab_size": 60, "tokenizer": None}
        ids, expected = source.read(0, 48)
        assert np.array_equal(labels, expected)
        with torch.no_grad():
            log_p = torch.log_softmax(teacher.model(torch.from_numpy(ids)).float(), -1).numpy()
        where = labels >= 0
        picked = np.take_along_axis(log_p, np.maximum(labels, 0)[..., None], -1)[..., 0]
        np.testing.assert_allclose(gold[where], picked[where], rtol=2e-3, atol=2e-3)
        assert (gold[~where] == 0).all()


@pytest.mark.parametrize("kind", [Dense(), TopK(k=4), TopK(k=4, temperatures=(2.0,)), Sampled(samples=6),
                                  Sampled(samples=6, proposal_temperature=1.0, temperatures=(1.0,), compact=True)])
@pytest.mark.parametrize("store", [torch.float32, torch.float16])
def test_the_gold_log_prob_is_the_same_with_or_without_the_kinds_log_partition(kind, store):
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0)) * 4
    logits[..., 0] += 25  # top logits where float16 steps are 1/64
    labels = torch.randint(-1, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    lse = kind.log_partition_at_one(logits, kind.build(logits, rows=torch.arange(3), store_dtype=store))
    assert (lse is None) == (isinstance(kind, Dense) or 1.0 not in kind.temperatures or getattr(kind, "compact", False))
    alone = gold_logprob(logits, labels)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.equal(alone[labels < 0], torch.zeros_like(alone[labels < 0]))
    torch.testing.assert_close(alone[labels >= 0].double(), expected[labels >= 0], atol=1e-2, rtol=1e-3)
    if lse is not None:
        shared = gold_logprob(logits, labels, lse)
        assert (shared != alone).float().mean() < 0.05 and torch.allclose(shared.float(), alone.float(), atol=1e-2)


def test_a_token_cache_has_the_same_bytes_for_any_batch_size(tokens):
    teacher = load_model(tokens / "gpt.pth")
    source = open_data(str(tokens / "tok.npz"))
    for batch in (5, 16):
        dump(teacher, source, tokens / f"b{batch}.zarr", kind=Sampled(samples=8), device="cpu", batch_size=batch,
             chunk_rows=8, progress=False)
    with open_cache(tokens / "b5.zarr") as a, open_cache(tokens / "b16.zarr") as b:
        assert all(np.array_equal(x, y) for x, y in zip(a.read(0, 48)[0].values(), b.read(0, 48)[0].values()))
        assert np.array_equal(a.read_records(0, 48)["tokens/gold_logprob"], b.read_records(0, 48)["tokens/gold_logprob"])


def test_an_interrupted_token_dump_resumes_to_the_same_bytes(tokens, monkeypatch):
    teacher = load_model(tokens / "gpt.pth")
    source = open_data(str(tokens / "tok.npz"))
    dump(teacher, source, tokens / "whole.zarr", kind=TopK(k=4), device="cpu", batch_size=8, chunk_rows=8, progress=False)
    original = CacheWriter.write_chunks

    def full_disk(self, first, targets, labels, records):
        """The disk fills up after the first two chunks, however the writer groups them."""
        fits = max(0, min(len(labels), (2 - first) * self.chunk_rows))
        if fits:
            original(self, first, {k: v[:fits] for k, v in targets.items()}, labels[:fits],
                     {k: v[:fits] for k, v in records.items()})
        if fits < len(labels):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(CacheWriter, "write_chunks", full_disk)
    with pytest.raises(SoftlabelsError, match="--resume"):
        dump(teacher, source, tokens / "cut.zarr", kind=TopK(k=4), device="cpu", batch_size=8, chunk_rows=8, progress=False)
    monkeypatch.setattr(CacheWriter, "write_chunks", original)
    result = dump(teacher, source, tokens / "cut.zarr", kind=TopK(k=4), device="cpu", batch_size=8, chunk_rows=8,
                  progress=False, resume=True)
    assert result.resumed_chunks == 2
    with open_cache(tokens / "whole.zarr") as a, open_cache(tokens / "cut.zarr") as b:
        assert np.array_equal(a.checksums(), b.checksums())


def test_top_k_tail_mass_is_the_dense_mass_outside_the_k_at_every_grid_temperature():
    z = torch.randn(3, 7, 50) * 3
    kind = TopK(k=6)
    targets = kind.build(z, rows=torch.arange(3))
    for j, t in enumerate(kind.temperatures):
        p_dense = torch.softmax(z / t, -1)
        kept = p_dense.gather(-1, targets["topk_indices"]).sum(-1)
        p_k = torch.exp(targets["topk_logits"] / t - targets["logsumexp"][..., j:j + 1])
        torch.testing.assert_close(1 - p_k.sum(-1), 1 - kept, atol=1e-5, rtol=0)


def test_masked_positions_contribute_nothing():
    student = torch.randn(2, 6, 30, requires_grad=True)
    teacher = torch.randn(2, 6, 30)
    labels = torch.tensor([[3, 4, -1, 5, 6, -1], [-1, -1, 1, 2, 3, -1]])
    mask = labels != -1
    loss = kd_loss(student, teacher, labels, mask=mask, alpha=0.5)
    loss.backward()
    assert (student.grad[~mask] == 0).all() and (student.grad[mask] != 0).any()
    changed = student.detach().clone()
    changed[~mask] = 100.0
    assert kd_loss(changed, teacher, labels, mask=mask, alpha=0.5).item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_tail_treatments_differ_as_documented():
    z = torch.randn(4, 40) * 2
    s = torch.randn(4, 40, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    kind = TopK(k=5)
    targets = SoftTargets(kind, kind.build(z, rows=torch.arange(4)))
    exact = targets.kl(s, temperature=1.0, kl="forward")
    renorm = targets.kl(s, temperature=1.0, kl="forward", tail="renormalize")
    gold = targets.kl(s, temperature=1.0, kl="forward", tail="gold", labels=labels)
    # renormalised: the K probabilities scaled to sum to 1
    p = torch.softmax(z, -1)
    top = p.topk(5, -1)
    p_hat = top.values / top.values.sum(-1, keepdim=True)
    log_q = torch.log_softmax(s, -1).gather(-1, top.indices)
    torch.testing.assert_close(renorm, (p_hat * (p_hat.log() - log_q)).sum(-1), atol=1e-5, rtol=1e-4)
    # gold: the tail's mass on the label, its own bucket when the label is outside the K
    rest = 1 - top.values.sum(-1)
    expected = []
    for i in range(4):
        probs, classes = top.values[i].tolist(), top.indices[i].tolist()
        if labels[i].item() in classes:
            probs[classes.index(labels[i].item())] += rest[i].item()
        else:
            probs.append(rest[i].item())
            classes.append(labels[i].item())
        probs, lq = torch.tensor(probs), torch.log_softmax(s[i], -1)[classes]
        expected.append((probs * (probs.log() - lq)).sum())
    torch.testing.assert_close(gold, torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(exact, renorm) and not torch.allclose(exact, gold)


def test_compact_sampled_gradients_are_the_dense_kl_gradients_on_average():
    torch.manual_seed(0)
    z = torch.randn(1, 2, 20) * 2
    s = torch.randn(1, 2, 20, requires_grad=True)
    dense = kd_loss(s, z, None, temperature=2.0, alpha=0.0)
    (want,) = torch.autograd.grad(dense, s)
    total = torch.zeros_like(s)
    draws = 400
    for seed in range(draws):
        kind = Sampled(samples=50, proposal_temperature=2.0, sample_seed=seed, compact=True)
        targets = SoftTargets(kind, kind.build(z, rows=torch.arange(1)))
        assert set(targets.arrays) == {"sample_indices", "sample_counts"}
        (got,) = torch.autograd.grad(kd_loss(s, targets, None, temperature=2.0, alpha=0.0), s)
        total += got
    torch.testing.assert_close(total / draws, want, atol=0.01, rtol=0)
    with pytest.raises(SoftlabelsError, match="proposal temperature"):
        SoftTargets(kind, kind.build(z, rows=torch.arange(1))).kl(s, temperature=1.0, kl="forward")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_compact_dump_stores_the_draws_of_a_full_one_and_verifies(tokens, suffix):
    teacher = load_model(tokens / "gpt.pth")
    source = open_data(str(tokens / "tok.npz"))
    full, compact = tokens / f"full{suffix}", tokens / f"compact{suffix}"
    for path, kind in ((full, Sampled(samples=8)), (compact, Sampled(samples=8, compact=True))):
        dump(teacher, source, path, kind=kind, device="cpu", batch_size=16, chunk_rows=16, progress=False)
    with open_cache(full) as a, open_cache(compact) as b:
        assert set(b.read(0, 48)[0]) == {"sample_indices", "sample_counts"}
        for name, drawn in b.read(0, 48)[0].items():
            assert np.array_equal(drawn, a.read(0, 48)[0][name])
    done = run("verify", compact, "--recompute", 16, "--teacher", tokens / "gpt.pth", "--device", "cpu")
    assert done.returncode == 0 and "16 rows recomputed (their draws rebuilt)" in done.stdout, done.stderr
    report = json.loads(run("inspect", compact, "--json").stdout)
    assert report["dtype"] is None  # no logits stored
    # the stored draws cannot tell the teacher's top class: inspect says what it counts, and the
    # dump's count from the teacher's logits, which the full dump made from the same logits
    with open_cache(full) as a:
        assert report["teacher_accuracy_of"] == "most drawn class"
        assert report["dump_teacher_accuracy"] == a.manifest["teacher_accuracy"] == b.manifest["teacher_accuracy"]
    assert f"counting the most drawn class (the dump's own count: {report['dump_teacher_accuracy']:.2%})" in run("inspect", compact).stdout
    # other weights under the recorded checkpoint's name draw other tokens, and verify names the rows
    with torch.no_grad():
        teacher.model.tokens.weight.mul_(3)
    report = verify_cache(compact, recompute=16, teacher=teacher, source=source, device="cpu")
    assert not report.ok and report.rows_recomputed == 16
    assert "of the stored draws differ from those the teacher's logits give" in report.problems[0], report.problems


def test_a_compact_dump_refuses_nan_logits(tokens):
    teacher = load_model(tokens / "gpt.pth")
    with torch.no_grad():
        teacher.model.norm.weight[0] = float("nan")
    with pytest.raises(SoftlabelsError, match="NaN or Inf"):
        dump(teacher, open_data(str(tokens / "tok.npz")), tokens / "nan.zarr", kind=Sampled(samples=8, compact=True),
             device="cpu", progress=False)
    assert not (tokens / "nan.zarr").exists()


def test_every_kind_reports_the_teachers_own_accuracy(tokens):
    teacher = load_model(tokens / "gpt.pth")
    source = open_data(str(tokens / "tok.npz"))
    ids, labels = source.read(0, 48)
    with torch.no_grad():
        top1 = teacher.model(torch.from_numpy(ids)).argmax(-1).numpy()
    expected = (top1 == labels)[labels >= 0].mean()
    for name, kind in (("dense", Dense()), ("top", TopK(k=3)), ("sampled", Sampled(samples=4, compact=True))):
        result = dump(teacher, source, tokens / f"{name}.zarr", kind=kind, device="cpu", batch_size=16, progress=False)
        assert result.teacher_accuracy == pytest.approx(expected), name


def test_agreement_with_the_teacher_counts_the_positions_with_a_next_token(tokens):
    from softlabels import evaluate

    source = open_data(str(tokens / "tok.npz"))
    ids, labels = source.read(0, 48)
    torch.manual_seed(1)
    student = build_model("gpt", input_shape=(12,), num_classes=60, kwargs=GPT).eval()
    with torch.no_grad():
        ours = student(torch.from_numpy(ids)).argmax(-1).numpy()
        theirs = load_model(tokens / "gpt.pth").model(torch.from_numpy(ids)).argmax(-1).numpy()
    targets = labels >= 0  # the prompt's 3 masked positions and each window's last have none
    assert 0 < targets.mean() < 1
    result = evaluate(student, source, teacher_top1=theirs, device="cpu")
    assert result["teacher_agreement"] == pytest.approx((ours == theirs)[targets].mean())


def test_a_vocabulary_beyond_65536_tokens_uses_uint32_indices():
    arrays = {a.name: a.dtype for a in TopK(k=4).arrays(70_000, "float16")}
    assert arrays["topk_indices"] == np.uint32
    assert {a.name: a.dtype for a in TopK(k=4).arrays(65_536, "float16")}["topk_indices"] == np.uint16


def test_a_dataset_of_another_tokenizer_is_refused(tokens):
    source = open_data(str(tokens / "tok.npz"))
    other = TokenSource(source.spec, source._opener, tokenizer={"sha256": "b" * 64, "vocab_size": 60})
    from softlabels.tokens import check_tokenizer
    with pytest.raises(SoftlabelsError, match="tokenizer sha256 aaaaaaaaaaaa"):
        check_tokenizer({"tokenizer": {"sha256": "a" * 64, "vocab_size": 60}}, other, "cache c.zarr")


def run(*args):
    return subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("make, message", [
    (lambda d: np.savez(d / "bad.npz", tokens=np.zeros((4, 8), int)), "has no array 'x'"),
    (lambda d: np.savez(d / "bad.npz", input_ids=np.zeros((4, 1), int)), "seq_len >= 2"),
    (lambda d: np.savez(d / "bad.npz", input_ids=np.full((4, 12), 99)), "token ids go up to 99"),
    (lambda d: np.savez(d / "bad.npz", input_ids=np.ones((4, 16), int)), "this gpt takes windows of at most 12 tokens"),
])
def test_bad_token_input_fails_in_one_line(tokens, make, message):
    make(tokens)
    done = run("dump", "--teacher", tokens / "gpt.pth", "--data", tokens / "bad.npz", "--out", tokens / "bad.zarr",
               "--device", "cpu", "--quiet")
    assert done.returncode == 1 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tokens.glob("bad.zarr*"))


FLAT = (
    "import torch\n"
    "class FlatLM(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.embed = torch.nn.Embedding(60, 60)\n"
    "    def forward(self, ids):\n"
    "        return self.embed(ids).mean(1)  # one distribution per window, not one per position\n"
)


def test_a_teacher_whose_output_is_not_batch_positions_vocab_is_refused(tokens):
    (tokens / "flatlm.py").write_text(FLAT)
    torch.save({"embed.weight": torch.zeros(60, 60)}, tokens / "flat.pth")
    done = run("dump", "--teacher", tokens / "flat.pth", "--arch", tokens / "flatlm.py:FlatLM", "--data", tokens / "tok.npz",
               "--out", tokens / "x.zarr", "--device", "cpu", "--quiet")
    assert done.returncode == 1 and "expected [batch, token, classes]" in done.stderr, done.stderr
    assert not list(tokens.glob("x.zarr*"))


def test_augmenting_token_windows_is_refused(tokens):
    # a shift would show each position its own answer; noise or scale would change token ids
    done = run("train-student", "--data", tokens / "tok.npz", "--student", "gpt?layers=1&dim=16&heads=2", "--hard-labels-only",
               "--augment", "shift?max=4", "--epochs", "1", "--out", tokens / "aug")
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "token windows are ids, not values an augmentation may change"), done.stderr
    assert not (tokens / "aug").exists()


def test_a_student_that_cannot_take_token_ids_is_told_to_use_a_language_model(tokens):
    done = run("train-student", "--data", tokens / "tok.npz", "--student", "mlp", "--hard-labels-only", "--epochs", "1",
               "--out", tokens / "mlp")
    assert done.returncode == 1 and "(the inputs are token ids: use a language model, e.g. gpt or hf:CONFIG)" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape", [(2, 300_000_000), (1 << 29, 2), (1 << 19, 1 << 20)])
def test_a_token_array_that_declares_too_much_is_refused_before_it_is_read(tmp_path, shape):
    """A Zarr array of a few bytes whose chunks were never written may claim any shape."""
    import zarr

    group = zarr.open_group(tmp_path / "huge.zarr", mode="w")
    group.create_array("input_ids", shape=shape, dtype="int64", chunks=(1, min(shape[1], 1 << 16)))
    with pytest.raises(SoftlabelsError, match=r"'input_ids' \[.*\] declares more than softlabels reads \(at most "
                                              r"268,435,456 windows of at most 1,048,576 tokens, 274,877,906,944 in all\)"):
        open_data(str(tmp_path / "huge.zarr"))


def test_one_stray_token_id_does_not_size_the_students(tmp_path):
    from softlabels.train import class_count

    ids = np.random.default_rng(0).integers(0, 60, size=(8, 16))
    np.savez(tmp_path / "ok.npz", input_ids=ids)
    assert class_count(open_data(str(tmp_path / "ok.npz")), None) == ids.max() + 1
    ids[3, 5] = 10**12  # a gpt student's embedding would be 10**12 rows
    np.savez(tmp_path / "stray.npz", input_ids=ids)
    with pytest.raises(SoftlabelsError, match=r"its largest token id 1000000000000 would make 1,000,000,000,001 classes "
                                              r"for 128 tokens: pass --num-classes if that is right"):
        class_count(open_data(str(tmp_path / "stray.npz")), None)


def test_long_windows_are_scanned_in_parts_with_the_same_fingerprint(tokens, monkeypatch):
    import softlabels.tokens

    source = open_data(str(tokens / "tok.npz"))
    whole, vocab_size = source.fingerprint(), source.vocab_size()
    monkeypatch.setattr(softlabels.tokens, "_BLOCK_TOKENS", 30)  # two windows of 12 at a time
    reads = []
    read_rows = TokenSource._read_rows
    monkeypatch.setattr(TokenSource, "_read_rows", lambda self, name, array, start, stop:
                        reads.append(stop - start) or read_rows(self, name, array, start, stop))
    source = open_data(str(tokens / "tok.npz"))
    assert source.fingerprint() == whole and source.vocab_size() == vocab_size
    assert reads and max(reads) == 2
