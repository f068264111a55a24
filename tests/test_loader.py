"""The shuffled loader: every row once per epoch, order a function of (seed, epoch), whole-chunk reads."""

import numpy as np
import pytest

from softlabels import CacheWriter, SoftTargetLoader, open_cache, open_data

from .conftest import make_npz


@pytest.fixture
def pair(tmp_path):
    """A 1000-row npz dataset and a cache whose logits encode the row index (row i -> [i, -i])."""
    data = make_npz(tmp_path / "d.npz", n=1000, features=3)
    source = open_data(str(data))
    x, y = source.read(0, 1000)
    logits = np.stack([np.arange(1000), -np.arange(1000)], axis=1).astype(np.float32)
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint()}}
    with CacheWriter(tmp_path / "c.zarr", num_samples=1000, num_classes=2, chunk_rows=64, dtype="float32", manifest=manifest) as w:
        for i in range(w.num_chunks):
            s, e = w.chunk_bounds(i)
            w.write_chunk(i, logits[s:e], y[s:e])
        w.finish()
    return source, open_cache(tmp_path / "c.zarr"), x, y


def collect(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_every_row_exactly_once_and_rows_stay_aligned(pair):
    source, cache, x, y = pair
    loader = SoftTargetLoader(source, cache, batch_size=100, seed=3, shuffle_chunks=4)
    batches = collect(loader, 0)
    assert [len(b.indices) for b in batches] == [100] * 10
    idx = np.concatenate([b.indices.numpy() for b in batches])
    assert sorted(idx.tolist()) == list(range(1000))
    for b in batches:
        i = b.indices.numpy()
        np.testing.assert_array_equal(b.inputs.numpy(), x[i])
        np.testing.assert_array_equal(b.labels.numpy(), y[i])
        np.testing.assert_array_equal(b.teacher_logits.numpy()[:, 0], i)
    np.testing.assert_array_equal(idx, loader.order(0))


def test_order_is_a_function_of_seed_and_epoch(pair):
    source, cache, _, _ = pair
    def order(seed, epoch):
        loader = SoftTargetLoader(source, cache, batch_size=37, seed=seed)
        return np.concatenate([b.indices.numpy() for b in collect(loader, epoch)])
    a = order(0, 0)
    np.testing.assert_array_equal(a, order(0, 0))
    assert not np.array_equal(a, order(0, 1))
    assert not np.array_equal(a, order(1, 0))
    assert not np.array_equal(a, np.arange(1000))  # actually shuffled
    assert sorted(order(0, 1).tolist()) == list(range(1000))


def test_reads_whole_chunks_only(pair, monkeypatch):
    source, cache, _, _ = pair
    reads = []
    original = type(cache).read
    monkeypatch.setattr(type(cache), "read", lambda self, a, b: reads.append((a, b)) or original(self, a, b))
    loader = SoftTargetLoader(source, cache, batch_size=32, seed=0)
    collect(loader, 0)
    assert len(reads) == cache.num_chunks
    assert sorted(reads) == [cache.chunk_bounds(i) for i in range(cache.num_chunks)]


def test_drop_last_and_unshuffled(pair):
    source, cache, _, _ = pair
    loader = SoftTargetLoader(source, cache, batch_size=300, shuffle=False, drop_last=True)
    batches = collect(loader, 0)
    assert len(loader) == len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([b.indices.numpy() for b in batches]), np.arange(900))


def test_without_a_cache_serves_inputs_and_labels(pair):
    source, _, x, y = pair
    batches = collect(SoftTargetLoader(source, None, batch_size=128, seed=1), 2)
    assert all(b.teacher_logits is None for b in batches)
    idx = np.concatenate([b.indices.numpy() for b in batches])
    assert sorted(idx.tolist()) == list(range(1000))
    np.testing.assert_array_equal(np.concatenate([b.labels.numpy() for b in batches]), y[idx])


def test_shards_read_disjoint_chunks_and_together_form_the_global_batches(pair):
    source, cache, _, _ = pair
    whole = SoftTargetLoader(source, cache, batch_size=60, seed=4, shuffle_chunks=2, shards=3)
    ranks = [SoftTargetLoader(source, cache, batch_size=60, seed=4, shuffle_chunks=2, shards=3, shard=r) for r in range(3)]
    global_batches = collect(whole, 1)
    rank_batches = [collect(r, 1) for r in ranks]
    assert 0 < len(global_batches) == len(whole) == len(rank_batches[0]) == len(rank_batches[1]) == len(rank_batches[2])
    for b, parts in zip(global_batches, zip(*rank_batches)):
        assert all(len(p.indices) == 20 for p in parts)
        np.testing.assert_array_equal(b.indices.numpy(), np.concatenate([p.indices.numpy() for p in parts]))
        np.testing.assert_array_equal(b.teacher_logits.numpy()[:, 0], b.indices.numpy())
    chunks = [set(np.concatenate([p.indices.numpy() for p in batches]) // 64) for batches in rank_batches]
    assert not (chunks[0] & chunks[1]) and not (chunks[0] & chunks[2]) and not (chunks[1] & chunks[2])
    served = np.concatenate([b.indices.numpy() for b in global_batches])
    assert len(set(served.tolist())) == len(served) >= 840  # no row twice; a few wait for the next epoch
    np.testing.assert_array_equal(served, whole.order(1))
