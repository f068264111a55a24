"""Target kinds: top-k and sampled caches against dense computations, any item shape, convert."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from softlabels import Dense, Sampled, SoftTargets, TopK, kd_loss, kl_divergence, open_cache
from softlabels.cli import cli
from softlabels.errors import SoftlabelsError
from softlabels.kinds import DEFAULT_TEMPERATURES, KINDS
from softlabels.kinds.base import argmax, index_dtype

C = 30


def built(kind, t, rows=None):
    """What the loader serves for teacher logits ``t``: the kind's arrays as SoftTargets."""
    rows = torch.arange(len(t)) if rows is None else rows
    return SoftTargets(kind, {k: v.long() if not v.is_floating_point() else v for k, v in kind.build(t, rows=rows).items()})


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, C, generator=gen, dtype=torch.float64) * 3, torch.randn(6, C, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_with_k_equal_c_is_the_dense_loss(logits, kl, temperature):
    s, t = logits
    targets = built(TopK(k=C), t)
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
    targets = built(TopK(k=k), t)
    p = torch.softmax(t, 1)
    q = torch.softmax(s, 1)
    kept = t.topk(k, 1).indices
    pk, qk = p.gather(1, kept), q.gather(1, kept)
    p_rest, q_rest = 1 - pk.sum(1), 1 - qk.sum(1)
    expected = (pk * (pk / qk).log()).sum(1) + p_rest * (p_rest / q_rest).log()
    torch.testing.assert_close(targets.kl(s, temperature=1.0, kl="forward"), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl,proposal,temperature", [("forward", 1.0, 1.0), ("forward", 4.0, 2.0), ("reverse", 2.0, 2.0)])
def test_sampled_loss_and_gradient_average_to_the_dense_ones(logits, kl, proposal, temperature):
    """4000 independent draws of S = 12 in one batched call (draws are keyed by row, so 4000 rows of
    the same logits draw independently); the mean must lie within 4 standard errors. Seeded, so it
    cannot flake.

    The proposal is as flat as the target or flatter: then the importance weights are bounded and
    the standard error is a fair yardstick (a sharper proposal stays unbiased but heavy-tailed). A
    class the proposal almost never draws makes its gradient look deterministic over 4000 draws, so
    an absolute 1e-4 (gradients here are of order 0.01 to 0.3) covers those."""
    s, t = logits
    draws = 4000
    s_dense = s.clone().requires_grad_()
    dense = kl_divergence(s_dense, t, temperature=temperature, kl=kl)
    dense.sum().backward()
    kind = Sampled(samples=12, proposal_temperature=proposal, temperatures=(1.0, 2.0, 4.0))
    targets = built(kind, t.expand(draws, *t.shape), rows=torch.arange(draws))  # [draws, 6 items, C]
    s_draw = s.expand(draws, *s.shape).clone().requires_grad_()
    values = targets.kl(s_draw, temperature=temperature, kl=kl)
    values.sum().backward()
    values, grads = values.detach(), s_draw.grad
    value_error = (values.mean(0) - dense.detach()).abs()
    grad_error = (grads.mean(0) - s_dense.grad).abs()
    assert (value_error <= 4 * values.std(0) / draws**0.5 + 1e-4).all()
    assert (grad_error <= 4 * grads.std(0) / draws**0.5 + 1e-4).all()
    if kl == "forward":  # reverse weights q/pi are heavier-tailed: unbiased, but 4000 draws stay noisy
        assert grad_error.max() < 0.05 * s_dense.grad.abs().max()


def test_draws_are_keyed_by_seed_row_and_item_not_by_batch():
    t = torch.randn(40, 3, C)
    kind = Sampled(samples=12, sample_seed=3)
    whole = kind.build(t, rows=torch.arange(100, 140))
    parts = [kind.build(t[i:i + 7], rows=torch.arange(100 + i, 100 + min(i + 7, 40))) for i in range(0, 40, 7)]
    for name in whole:
        assert torch.equal(whole[name], torch.cat([p[name] for p in parts]))
    other_seed = Sampled(samples=12, sample_seed=4).build(t, rows=torch.arange(100, 140))
    assert not torch.equal(whole["sample_indices"], other_seed["sample_indices"])
    assert (whole["sample_counts"].sum(-1) == 12).all()
    # the same logits in two items, or two rows, draw differently
    same = kind.build(t[:1, :1].expand(2, 2, C), rows=torch.tensor([5, 6]))["sample_indices"]
    assert not torch.equal(same[0, 0], same[0, 1]) or not torch.equal(same[0, 0], same[1, 0])


@pytest.mark.parametrize("kind", [Dense(), TopK(k=4), Sampled(samples=9)], ids=lambda k: k.name)
def test_every_kind_works_on_any_leading_shape(kind):
    t = torch.randn(5, 3, 7, C)
    whole = kind.build(t, rows=torch.arange(5))
    flat = kind.build(t.reshape(-1, C), rows=torch.arange(105))
    for name, array in whole.items():
        assert array.shape[:3] == (5, 3, 7) and flat[name].shape[0] == 105
    s = torch.randn(5, 3, 7, C)
    served = built(kind, t)
    assert served.kl(s, temperature=4.0, kl="forward").shape == (5, 3, 7)
    stored = {k: v.numpy() for k, v in whole.items()}
    top = kind.top_class(stored)
    if isinstance(kind, Sampled):  # the best class it drew
        values, classes = kind.logits_at(stored)
        np.testing.assert_array_equal(np.take_along_axis(t.numpy(), top[..., None], -1)[..., 0], values.max(-1))
    else:
        np.testing.assert_array_equal(top, t.argmax(-1).numpy())
    if not isinstance(kind, Sampled):  # the dense and top-k loss on items equals the loss on flattened rows
        torch.testing.assert_close(served.kl(s, temperature=4.0, kl="forward").reshape(-1),
                                   built(kind, t.reshape(-1, C)).kl(s.reshape(-1, C), temperature=4.0, kl="forward"))


def test_one_place_holds_the_sparse_defaults():
    from softlabels.cli import dump as dump_command
    defaults = {p.name: p.default for p in dump_command.params}
    assert Sampled().proposal_temperature == defaults["proposal_temperature"] == 4.0
    assert Sampled().sample_seed == defaults["sample_seed"]
    assert Sampled().temperatures == TopK().temperatures == DEFAULT_TEMPERATURES
    assert set(KINDS) == {"dense", "topk", "sampled"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_is_the_first_maximum_with_nan_counted_largest(dtype):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 3.0, nan], [2.0, 5.0, 5.0, 1.0], [-inf] * 4, [1.0, inf, inf, 0.0], [nan, 9, 9, 9]], dtype=dtype)
    assert argmax(logits).tolist() == [1, 1, 0, 1, 0]
    rows = torch.randn(6, 5, 300, dtype=torch.float64).round(decimals=1).to(dtype)[:, ::2]  # ties, a strided view
    assert torch.equal(argmax(rows), rows.max(-1).indices)


@pytest.mark.parametrize("store", [torch.float16, torch.bfloat16, torch.float32])
def test_a_dense_items_finiteness_is_that_of_its_stored_logits(store):
    # float16's largest value is 65504; from 65520 up a float32 rounds to Inf
    edges = [65503.0, 65519.0, 65520.0, -65520.0, 3.0e38, 3.4e38, float("inf"), -float("inf"), float("nan")]
    logits = torch.randn(len(edges), 7)
    logits[torch.arange(len(edges)), torch.arange(len(edges)) % 7] = torch.tensor(edges)
    logits = torch.cat([logits, torch.randn(5, 7)]).reshape(2, 7, 7)  # a leading item axis
    stored = Dense().build(logits, rows=torch.arange(2), store_dtype=store)
    expected = torch.isfinite(stored["logits"].float()).all(-1)
    assert torch.equal(Dense().finite(logits, stored), expected)
    assert not expected.all() and expected.any()


def test_a_float16_top_k_cache_keeps_the_teachers_tail_and_its_own_kl_is_zero():
    # top logits near 30, where float16 steps are 1/64: their rounding moves the kept probabilities by
    # up to 1.6%, which a log-partition of the unrounded logits would take out of the tail
    torch.manual_seed(0)
    z = torch.randn(4000, 600) * 3
    z[::2, 0] += 28  # confident rows: a tiny tail; the others keep a large one
    kind = TopK(k=8, temperatures=(1.0, 2.0))
    targets = kind.build(z, rows=torch.arange(len(z)), store_dtype=torch.float16)
    for j, t in enumerate(kind.temperatures):
        kept = (targets["topk_logits"].float() / t - targets["logsumexp"][:, j:j + 1]).exp().sum(-1)
        true_rest = 1 - torch.softmax(z.double() / t, -1).gather(-1, targets["topk_indices"]).sum(-1)
        assert ((1 - kept) - true_rest).abs().max() < 1e-5
    own = kind.kl(z, targets, temperature=1.0, kl="forward")  # the teacher as its own student
    assert own.mean() < 1e-6 and own.max() < 1e-5


@pytest.mark.parametrize("temperatures", [DEFAULT_TEMPERATURES, (0.5, 1.0, 3.0, 7.3)])
def test_the_log_partition_grid_is_logsumexp_at_each_temperature_item_by_item(temperatures):
    # 600 items of 2000 classes span several blocks of the CPU computation (1 MiB of logits each)
    torch.manual_seed(0)
    z = torch.randn(600, 2000) * 4
    z[0, 5], z[1, :], z[2, 7], z[3, 9] = float("inf"), float("-inf"), float("-inf"), float("nan")
    kind = TopK(k=3, temperatures=temperatures)
    grid = kind.grid(z)
    expected = torch.stack([torch.logsumexp(z / t, -1) for t in temperatures], -1)
    exact = all(math.log2(t).is_integer() for t in temperatures)  # z / T is then exact
    torch.testing.assert_close(grid, expected, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6, equal_nan=True)
    assert torch.isnan(grid[3]).all() and (grid[0] == float("inf")).all() and (grid[1] == float("-inf")).all()
    # an item's values are the same whatever else is in its batch, and with the largest logit given
    assert torch.equal(torch.cat([kind.grid(z[i:i + 7]) for i in range(0, 600, 7)]).nan_to_num(), grid.nan_to_num())
    assert torch.equal(kind.grid(z[4:], z[4:].amax(-1)), grid[4:])
    assert kind.grid(z.reshape(20, 30, 2000)).shape == (20, 30, len(temperatures))
    assert kind.grid(torch.empty(0, 3, 2000)).shape == (0, 3, len(temperatures))


def test_a_grid_naming_a_temperature_twice_is_refused():
    # the log-partition of a temperature is looked up by its value: a repeated one would read another column
    with pytest.raises(SoftlabelsError, match=r"temperatures must differ from each other, got \[4.0, 4.0, 8.0\]"):
        TopK(k=3, temperatures=(4.0, 4.0, 8.0)).validate(num_classes=10, where="cache")


def test_dump_refuses_a_bare_module_as_its_teacher(tmp_path, npz_data):
    from softlabels import dump, open_data

    with pytest.raises(SoftlabelsError, match=r"the teacher must be a softlabels.load_model\(...\) result, got a Linear"):
        dump(torch.nn.Linear(4, 3), open_data(str(npz_data)), tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "c.zarr.partial").exists()


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
    assert manifest["format_version"] == 2 and manifest["item_axes"] == []
    assert group["topk_indices"].dtype == np.uint8 and group["topk_logits"].shape == (1000, 3)
    np.testing.assert_array_equal(group["topk_indices"][:].astype(np.int64), z.topk(3, 1).indices.numpy())
    # float16 logits: the log-partition that gives the K logits as stored the teacher's mass of the K classes
    z8, stored = z.numpy() / 8.0, group["topk_logits"][:].astype(np.float64) / 8.0
    exact = np.exp(np.take_along_axis(z8, group["topk_indices"][:].astype(np.int64), 1)).sum(1)
    expected = torch.logsumexp(z / 8.0, 1).numpy() + np.log(np.exp(stored).sum(1) / exact)
    np.testing.assert_allclose(group["logsumexp"][:, 3], expected, rtol=1e-5)

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
    assert report["kind"]["kind"] == "topk" and report["kind"]["k"] == 4 and report["teacher_accuracy_of"] is None
    dense_report = json.loads(CliRunner().invoke(cli, ["inspect", str(dense), "--json"]).output)
    assert report["bytes_per_sample"] < 0.95 * dense_report["bytes_per_sample"] and report["statistic"]["name"] == "top-k mass"
    assert 0.5 < report["statistic"]["mean"] <= 1.0
    assert report["compression_vs_dense_float32"] == pytest.approx(1000 * 10 * 4 / report["bytes_on_disk"])
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


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_sampled_dump_has_the_same_bytes_for_any_batch_size(tmp_path, npz_data, linear_teacher, suffix):
    from softlabels import dump, load_model, open_data
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    caches = []
    for batch_size in (7, 64):
        out = tmp_path / f"b{batch_size}{suffix}"
        dump(teacher, open_data(str(npz_data)), out, batch_size=batch_size, chunk_rows=50,
             kind=Sampled(samples=12, sample_seed=9), progress=False)
        with open_cache(out) as cache:
            targets, labels = cache.read(0, 300)
            caches.append({**targets, "labels": labels, "chunk_crc32": cache.checksums()})
    for name in caches[0]:  # every stored array, and the commit record over their bytes
        assert caches[0][name].tobytes() == caches[1][name].tobytes(), name


def test_a_teacher_with_item_axes_dumps_rows_of_items(tmp_path, npz_data):
    """A teacher that outputs [batch, 3, C] (three views, say) fills [N, 3, C] rows, labels per item."""
    from softlabels import dump, open_data
    from softlabels.checkpoint import LoadedModel

    class ThreeViews(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 5)

        def forward(self, x):
            return torch.stack([self.fc(x), self.fc(-x), self.fc(2 * x)], dim=1)

    model = ThreeViews()
    teacher = LoadedModel(model, tmp_path / "t.pth", "0" * 64, "three-views")
    out = tmp_path / "views.zarr"
    dump(teacher, open_data(str(npz_data)), out, kind=TopK(k=2), item_axes=("view",), chunk_rows=64, batch_size=50, progress=False)
    x, y = np.load(npz_data)["x"], np.load(npz_data)["y"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    with open_cache(out) as cache:
        assert cache.items == (3,) and cache.manifest["item_axes"] == [{"name": "view", "size": 3}]
        targets, labels = cache.read(0, 300)
        assert targets["topk_indices"].shape == (300, 3, 2) and labels.shape == (300, 3)
        np.testing.assert_array_equal(labels, np.repeat(y[:, None], 3, axis=1))
        np.testing.assert_array_equal(targets["topk_indices"][..., 0], expected.argmax(-1).numpy())
        np.testing.assert_array_equal(cache.teacher_top1(), expected.argmax(-1).numpy())
    group = zarr.open_group(str(out), mode="r")  # plain zarr: row 7, view 2
    assert group["topk_logits"].chunks == (64, 3, 2)
    np.testing.assert_allclose(group["topk_logits"][7, 2].astype(np.float32), expected[7, 2].topk(2).values.numpy(), rtol=1e-3)
    wrong = CliRunner().invoke(cli, ["inspect", str(out)])
    assert wrong.exit_code == 0 and "300 samples x 3 views x 5 classes" in wrong.output


def test_students_train_on_a_cache_with_item_axes(tmp_path, npz_data, monkeypatch):
    """A cache of [N, 3, C] rows trains students that output [batch, 3, C]; one that outputs [batch, C] is refused."""
    from softlabels import SoftlabelsError, StudentSpec, TrainConfig, dump, open_data, train_students
    from softlabels.checkpoint import LoadedModel

    (tmp_path / "views_zoo.py").write_text(
        "import torch\n"
        "class ThreeViews(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(12, num_classes)\n"
        "    def forward(self, x):\n"
        "        return torch.stack([self.fc(x), self.fc(-x), self.fc(2 * x)], dim=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import views_zoo
    torch.manual_seed(0)
    model = views_zoo.ThreeViews(5)
    with torch.no_grad():
        model.fc.weight.mul_(5.0)  # a confident teacher, so that agreement measures learning
    teacher = LoadedModel(model, tmp_path / "t.pth", "0" * 64, "views_zoo:ThreeViews")
    source = open_data(str(npz_data))
    dump(teacher, source, tmp_path / "v.h5", kind=TopK(k=3), item_axes=("view",), chunk_rows=64, progress=False)
    cache = open_cache(tmp_path / "v.h5")
    config = TrainConfig(epochs=15, batch_size=32, lr=1e-2, alpha=0.0, device="cpu", temperature=4.0)
    summary = train_students([StudentSpec("views_zoo:ThreeViews")], source=source, cache=cache, config=config,
                             out_dir=tmp_path / "run", eval_source=source, eval_teacher_top1=cache.teacher_top1(), progress=False)
    # agreement over all 300 x 3 items; a 5-class guess agrees on about 20%
    assert 0.0 <= summary[0]["eval_accuracy"] <= 1.0 and summary[0]["teacher_agreement"] > 0.8
    with pytest.raises(SoftlabelsError, match=r"outputs \[2, 5\] for a batch of 2, but the cache has \[3, 5\] per sample"):
        train_students([StudentSpec("linear")], source=source, cache=cache, config=config, progress=False)
