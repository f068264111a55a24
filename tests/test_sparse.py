"""Sparse soft targets: top-k and sampled caches, their losses against dense computations, convert."""

import json

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from softlabels import kd_loss, kl_divergence, open_cache
from softlabels.cli import cli
from softlabels.losses import sparse_kl_divergence
from softlabels.sparse import DEFAULT_TEMPERATURES, index_dtype, sparsify

C = 30


def batch_targets(targets, temperatures=DEFAULT_TEMPERATURES, proposal=None):
    served = {**targets, "temperatures": torch.tensor(temperatures, dtype=torch.float64)}
    if proposal is not None:
        served["proposal_temperature"] = torch.tensor(proposal, dtype=torch.float64)
    return served


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, C, generator=gen, dtype=torch.float64) * 3, torch.randn(6, C, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_with_k_equal_c_is_the_dense_loss(logits, kl, temperature):
    s, t = logits
    targets = batch_targets(sparsify(t, kind="topk", size=C))
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    labels = torch.tensor([1, -1, 4, 0, -1, 29])
    dense = kd_loss(s1, t, labels, temperature=temperature, alpha=0.3, kl=kl)
    sparse = kd_loss(s2, targets, labels, temperature=temperature, alpha=0.3, kl=kl)
    dense.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-6)


def test_topk_keeps_the_tail_mass_as_a_rest_bucket(logits):
    s, t = logits
    k = 3
    targets = batch_targets(sparsify(t, kind="topk", size=k))
    p = torch.softmax(t, 1)
    q = torch.softmax(s, 1)
    kept = t.topk(k, 1).indices
    pk, qk = p.gather(1, kept), q.gather(1, kept)
    p_rest, q_rest = 1 - pk.sum(1), 1 - qk.sum(1)
    expected = (pk * (pk / qk).log()).sum(1) + p_rest * (p_rest / q_rest).log()
    torch.testing.assert_close(sparse_kl_divergence(s, targets, temperature=1.0), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl,proposal,temperature", [("forward", 1.0, 1.0), ("forward", 4.0, 2.0), ("reverse", 2.0, 2.0)])
def test_sampled_loss_and_gradient_average_to_the_dense_ones(logits, kl, proposal, temperature):
    """Seeded, so it cannot flake: 4000 draws of S = 12; the mean must lie within 4 standard errors.

    The proposal is as flat as the target or flatter: then the importance weights are bounded and
    the standard error is a fair yardstick (a sharper proposal stays unbiased but heavy-tailed). A
    class the proposal almost never draws makes its gradient look deterministic over 4000 draws, so
    an absolute 1e-4 (gradients here are of order 0.01 to 0.3) covers those."""
    s, t = logits
    s_dense = s.clone().requires_grad_()
    dense = kl_divergence(s_dense, t, temperature=temperature, kl=kl)
    dense.sum().backward()
    values, grads = [], []
    for draw in range(4000):
        grid = (1.0, 2.0, 4.0)
        targets = batch_targets(sparsify(t, kind="sampled", size=12, proposal_temperature=proposal, seed=draw,
                                         temperatures=grid), temperatures=grid, proposal=proposal)
        s_draw = s.clone().requires_grad_()
        value = sparse_kl_divergence(s_draw, targets, temperature=temperature, kl=kl)
        value.sum().backward()
        values.append(value.detach())
        grads.append(s_draw.grad)
    values, grads = torch.stack(values), torch.stack(grads)
    value_error = (values.mean(0) - dense.detach()).abs()
    grad_error = (grads.mean(0) - s_dense.grad).abs()
    assert (value_error <= 4 * values.std(0) / 4000**0.5 + 1e-4).all()
    assert (grad_error <= 4 * grads.std(0) / 4000**0.5 + 1e-4).all()
    if kl == "forward":  # reverse weights q/pi are heavier-tailed: unbiased, but 4000 draws stay noisy
        assert grad_error.max() < 0.05 * s_dense.grad.abs().max()


def test_sampling_is_seeded():
    t = torch.randn(5, C)
    a = sparsify(t, kind="sampled", size=12, seed=3, start_row=100)
    b = sparsify(t, kind="sampled", size=12, seed=3, start_row=100)
    c = sparsify(t, kind="sampled", size=12, seed=4, start_row=100)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sample_indices"], c["sample_indices"])
    assert (a["sample_counts"].sum(1) == 12).all()


def test_index_dtype_is_the_smallest_that_holds_c():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16 and index_dtype(70000) == np.uint32


@pytest.fixture
def dumped(tmp_path, teacher_path):
    def dump(out, *args):
        result = CliRunner().invoke(cli, ["dump", "--teacher", str(teacher_path), "--data", "mnist1d://test",
                                          "--out", str(tmp_path / out), "--chunk-rows", "128", *args])
        assert result.exit_code == 0, result.output
        return tmp_path / out
    return dump


def test_topk_and_sampled_caches_read_with_plain_zarr_and_h5py(dumped, teacher):
    from softlabels import open_data
    x, _ = open_data("mnist1d://test").read(0, 1000)
    with torch.no_grad():
        z = teacher.model(torch.from_numpy(x)).double()
    topk = dumped("topk.zarr", "--top-k", "3")
    group = zarr.open_group(str(topk), mode="r")
    manifest = group.attrs["softlabels"]
    assert manifest["kind"] == "topk" and manifest["k"] == 3 and manifest["temperatures"] == list(DEFAULT_TEMPERATURES)
    assert group["topk_indices"].dtype == np.uint8 and group["topk_logits"].shape == (1000, 3)
    np.testing.assert_array_equal(group["topk_indices"][:].astype(np.int64), z.topk(3, 1).indices.numpy())
    np.testing.assert_allclose(group["logsumexp"][:, 3], torch.logsumexp(z / 8.0, 1).numpy(), rtol=1e-5)

    sampled = dumped("sampled.h5", "--sample", "12", "--sample-seed", "5")
    with h5py.File(sampled, "r") as f:
        manifest = json.loads(f.attrs["softlabels"])
        counts, indices, values = f["sample_counts"][:], f["sample_indices"][:].astype(np.int64), f["sample_logits"][:]
    assert manifest["kind"] == "sampled" and manifest["samples"] == 12 and manifest["sample_seed"] == 5
    assert (counts.sum(1) == 12).all()
    np.testing.assert_allclose(values[counts > 0], np.take_along_axis(z.numpy(), indices, 1)[counts > 0], rtol=2e-3, atol=2e-3)
    again = dumped("again.h5", "--sample", "12", "--sample-seed", "5")
    with h5py.File(again, "r") as f:
        np.testing.assert_array_equal(f["sample_indices"][:], indices)


def test_inspect_train_and_convert_serve_every_kind(dumped, tmp_path):
    dense = dumped("dense.zarr", "--store-dtype", "float32")
    converted = tmp_path / "conv.zarr"
    result = CliRunner().invoke(cli, ["convert", str(dense), str(converted), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    direct = dumped("direct.zarr", "--top-k", "4", "--store-dtype", "float32")
    a, b = open_cache(converted).read(0, 1000)[0], open_cache(direct).read(0, 1000)[0]
    np.testing.assert_array_equal(a["topk_indices"], b["topk_indices"])
    np.testing.assert_allclose(a["logsumexp"], b["logsumexp"], rtol=1e-6)
    report = json.loads(CliRunner().invoke(cli, ["inspect", str(converted), "--json"]).output)
    assert report["kind"] == "topk" and report["size"] == 4
    assert report["bytes_per_sample"] < 4 * 10 and 0.5 < report["mean_topk_mass"] <= 1.0
    assert report["compression_vs_dense_float32"] > 1
    for cache in (converted, dumped("s.zarr", "--sample", "6")):
        out = tmp_path / f"run-{cache.stem}"
        result = CliRunner().invoke(cli, ["train-student", "--cache", str(cache), "--student", "mlp", "--epochs", "15",
                                          "--temperature", "2", "--eval-cache", str(dense), "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary[0]["teacher_agreement"] > 0.3
    bad = CliRunner().invoke(cli, ["train-student", "--cache", str(converted), "--student", "mlp", "--temperature", "3",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "temperature 3 is not in the cache's grid" in bad.output
