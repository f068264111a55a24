"""The shuffled loader: every row once per epoch, global batches a function of (seed, epoch) for any
number of ranks or DataLoader workers, mid-epoch resume, whole-chunk reads."""

import gc
import os
import textwrap
import threading

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader

from softlabels import CacheWriter, Dense, Layout, SoftTargetLoader, open_cache, open_data
from softlabels.loader import _concat, _take, _Window

from .conftest import make_npz


def write_cache(path, source, y):
    """A cache whose logits encode the row index (row i -> [i, -i])."""
    n = len(source)
    logits = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32)
    manifest = {"dataset": {"spec": source.spec, "fingerprint": source.fingerprint()}}
    with CacheWriter(path, Layout(Dense(), n, 2, "float32", 64), manifest=manifest) as w:
        for i in range(w.num_chunks):
            s, e = w.chunk_bounds(i)
            w.write_chunks(i, {"logits": logits[s:e]}, y[s:e])
        w.finish()
    return open_cache(path)


@pytest.fixture
def pair(tmp_path):
    """A 1000-row npz dataset and its cache."""
    source = open_data(str(make_npz(tmp_path / "d.npz", n=1000, features=3, classes=2)))
    x, y = source.read(0, 1000)
    return source, write_cache(tmp_path / "c.zarr", source, y), x, y


def collect(loader, epoch=None, workers=0):
    if epoch is not None:
        loader.set_epoch(epoch)
    if workers:
        return list(DataLoader(loader, batch_size=None, num_workers=workers))
    return list(loader)


def assert_aligned(batches, x, y):
    for b in batches:
        i = b.indices.numpy()
        np.testing.assert_array_equal(b.inputs.numpy(), x[i])
        np.testing.assert_array_equal(b.labels.numpy(), y[i])
        np.testing.assert_array_equal(b.teacher_logits["logits"].numpy()[:, 0], i)


def indices(batches):
    return [b.indices.numpy() for b in batches]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for p, q in zip(indices(a), indices(b)):
        np.testing.assert_array_equal(p, q)


def test_every_row_exactly_once_and_rows_stay_aligned(pair):
    source, cache, x, y = pair
    loader = SoftTargetLoader(source, cache, batch_size=100, seed=3, shuffle_chunks=4)
    batches = collect(loader, 0)
    assert [len(b.indices) for b in batches] == [100] * 10
    idx = np.concatenate(indices(batches))
    assert sorted(idx.tolist()) == list(range(1000))
    assert_aligned(batches, x, y)
    np.testing.assert_array_equal(idx, loader.order(0))


def test_order_is_a_function_of_seed_and_epoch(pair):
    source, cache, _, _ = pair

    def order(seed, epoch):
        loader = SoftTargetLoader(source, cache, batch_size=37, seed=seed)
        return np.concatenate(indices(collect(loader, epoch)))
    a = order(0, 0)
    np.testing.assert_array_equal(a, order(0, 0))
    assert not np.array_equal(a, order(0, 1))
    assert not np.array_equal(a, order(1, 0))
    assert not np.array_equal(a, np.arange(1000))  # actually shuffled
    assert sorted(order(0, 1).tolist()) == list(range(1000))


def test_reads_whole_chunks_only(pair, monkeypatch):
    source, cache, _, _ = pair
    reads = []
    original = type(cache).read_ranges
    monkeypatch.setattr(type(cache), "read_ranges", lambda self, ranges, reuse=None, order=None: reads.extend(ranges) or original(self, ranges, reuse, order))
    collect(SoftTargetLoader(source, cache, batch_size=32, seed=0), 0)
    assert sorted(reads) == [cache.chunk_bounds(i) for i in range(cache.num_chunks)]


def test_drop_last_and_unshuffled(pair):
    source, cache, _, _ = pair
    loader = SoftTargetLoader(source, cache, batch_size=300, shuffle=False, drop_last=True)
    batches = collect(loader, 0)
    assert len(loader) == len(batches) == loader.batches_per_epoch == 3
    np.testing.assert_array_equal(np.concatenate(indices(batches)), np.arange(900))


def test_without_a_cache_serves_inputs_and_labels(pair):
    source, _, x, y = pair
    batches = collect(SoftTargetLoader(source, None, batch_size=128, seed=1), 2)
    assert all(b.teacher_logits is None for b in batches)
    idx = np.concatenate(indices(batches))
    assert sorted(idx.tolist()) == list(range(1000))
    np.testing.assert_array_equal(np.concatenate([b.labels.numpy() for b in batches]), y[idx])


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("ranks", [1, 2, 4, 3])
def test_every_number_of_ranks_trains_on_the_same_global_batches(pair, ranks, drop_last):
    source, cache, x, y = pair
    make = lambda **kw: SoftTargetLoader(source, cache, batch_size=60, seed=4, shuffle_chunks=2, drop_last=drop_last, **kw)  # noqa: E731
    reference = collect(make(), 1)
    whole = collect(make(shards=ranks), 1)
    per_rank = [collect(make(shards=ranks, shard=r), 1) for r in range(ranks)]
    # 1000 rows: 16 batches of 60, then the incomplete last one of 40 unless it is dropped
    assert [len(b.labels) for b in reference] == [60] * 16 + ([] if drop_last else [40])
    assert_same_batches(whole, reference)
    assert [make(shards=ranks).batch_rows(b) for b in range(len(reference))] == [len(b.labels) for b in reference]
    assert all(len(batches) == len(reference) for batches in per_rank)  # every rank takes the same steps
    for r, batches in enumerate(per_rank):
        assert_aligned(batches, x, y)
        for b, part in zip(reference, batches):
            n = len(b.labels)
            np.testing.assert_array_equal(part.indices.numpy(), b.indices.numpy()[r * n // ranks:(r + 1) * n // ranks])
    # together the ranks train on every row of every batch, the last one included
    assert sorted(np.concatenate([i for batches in per_rank for i in indices(batches)]).tolist()) == \
        sorted(np.concatenate(indices(reference)).tolist())


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_rank_left_no_row_of_the_last_batch_gets_an_empty_batch_it_can_step_on(tmp_path, shuffle):
    # 1025 rows in batches of 64: the last batch holds 1 row, which rank 1 of 2 takes
    source = open_data(str(make_npz(tmp_path / "d.npz", n=1025, features=3, classes=2)))
    x, y = source.read(0, 1025)
    cache = write_cache(tmp_path / "c.zarr", source, y)
    ranks = [collect(SoftTargetLoader(source, cache, batch_size=64, seed=3, shuffle=shuffle, shards=2, shard=r), e)
             for r in (0, 1) for e in range(3)]
    for batches in ranks:
        assert len(batches) == 17
        assert_aligned(batches, x, y)
    for e in range(3):
        zero, one = ranks[e][-1], ranks[3 + e][-1]
        assert (len(zero.labels), len(one.labels)) == (0, 1)
        assert tuple(zero.inputs.shape) == (0, 3) and tuple(zero.teacher_logits["logits"].shape) == (0, 2)
        whole = collect(SoftTargetLoader(source, cache, batch_size=64, seed=3, shuffle=shuffle), e)
        np.testing.assert_array_equal(one.indices.numpy(), whole[-1].indices.numpy())


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [2, 3])
def test_dataloader_workers_serve_the_batches_of_one_process_in_the_same_order(pair, workers):
    source, cache, x, y = pair
    loader = SoftTargetLoader(source, cache, batch_size=64, seed=5, shuffle_chunks=3)
    alone = collect(loader, 2)
    together = collect(loader, 2, workers=workers)
    assert_same_batches(together, alone)
    assert_aligned(together, x, y)
    sharded = SoftTargetLoader(source, cache, batch_size=64, seed=5, shuffle_chunks=3, shards=2, shard=1)
    assert_same_batches(collect(sharded, 2, workers=workers), collect(sharded, 2))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_under_dataloader_workers_the_last_batch_used_gives_the_state_to_resume_from(pair):
    source, cache, x, y = pair
    loader = SoftTargetLoader(source, cache, batch_size=100, seed=2, shuffle_chunks=2)
    loader.set_epoch(3)
    served = list(DataLoader(loader, batch_size=None, num_workers=2))
    assert [b.position for b in served] == list(range(10))
    assert loader.state_dict() == {"epoch": 3, "batches": 0}  # the workers served them, not this copy
    state = loader.state_dict(served[5])
    assert state == {"epoch": 3, "batches": 6}
    resumed = SoftTargetLoader(source, cache, batch_size=100, seed=2, shuffle_chunks=2)
    resumed.load_state_dict(state)
    rest = list(DataLoader(resumed, batch_size=None, num_workers=2))
    assert [b.position for b in rest] == list(range(6, 10))
    assert_same_batches(rest, served[6:])
    assert_aligned(rest, x, y)


@pytest.mark.parametrize("stop", [0, 1, 6, 9, 10])
def test_a_resumed_epoch_serves_exactly_the_rest_without_reading_skipped_windows(pair, monkeypatch, stop):
    source, cache, x, y = pair
    make = lambda: SoftTargetLoader(source, cache, batch_size=100, seed=2, shuffle_chunks=2)  # noqa: E731
    first = make()
    first.set_epoch(3)
    full = []
    for batch in first:
        full.append(batch)
        if len(full) == stop:
            assert first.state_dict() == {"epoch": 3, "batches": stop}
    reads = []
    original = type(cache).read_ranges
    monkeypatch.setattr(type(cache), "read_ranges", lambda self, ranges, reuse=None, order=None: reads.extend(ranges) or original(self, ranges, reuse, order))
    resumed = make()
    resumed.load_state_dict({"epoch": 3, "batches": stop})
    resumed.set_epoch(3)  # the trainer's loop calls it again: the resumed position stays
    assert len(resumed) == 10 - stop
    rest = list(resumed)
    assert_same_batches(rest, full[stop:])
    assert_aligned(rest, x, y)
    # Windows of 2 blocks (128 rows): only those that the remaining rows (positions >= 100 * stop) fall in are read.
    windows = {p // 128 for p in range(100 * stop, 1000)}
    order = np.concatenate(indices(full))
    blocks = {int(r) // 64 for w in windows for r in order[w * 128:(w + 1) * 128]}
    assert sorted(reads) == sorted(cache.chunk_bounds(b) for b in blocks)
    if stop >= 6:
        assert len(reads) <= cache.num_chunks // 2 + 1
    assert_same_batches(collect(resumed, 3, workers=2), full[stop:])  # the same with workers
    resumed.set_epoch(4)  # another epoch starts from its first batch
    assert len(collect(resumed)) == 10


def test_a_loader_state_outside_the_epoch_is_refused(pair):
    source, cache, _, _ = pair
    loader = SoftTargetLoader(source, cache, batch_size=100)
    with pytest.raises(Exception, match="outside the epoch's 0..10 batches"):
        loader.load_state_dict({"epoch": 0, "batches": 11})
    with pytest.raises(Exception, match="a loader state is"):
        loader.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_kept_after_their_window_are_not_overwritten_when_its_memory_is_reused(pair, shuffle):
    source, cache, x, y = pair  # 1000 rows in 16 chunks: windows of 2 chunks, read into the same memory in turn
    batches = collect(SoftTargetLoader(source, cache, batch_size=48, seed=3, shuffle=shuffle, shuffle_chunks=2), 0)
    assert len(batches) == 21
    assert_aligned(batches, x, y)  # checked only once every window has been read


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_window_is_read_into_memory_its_batches_let_go_and_never_into_memory_a_batch_holds(pair, monkeypatch, shuffle):
    source, cache, x, y = pair
    read = SoftTargetLoader._read_window
    fresh = []
    monkeypatch.setattr(SoftTargetLoader, "_read_window",
                        lambda self, pool, group, perm, buffers: fresh.append(not buffers) or read(self, pool, group, perm, buffers))
    loader = SoftTargetLoader(source, cache, batch_size=48, seed=3, shuffle=shuffle, shuffle_chunks=2)  # 48 spans windows
    windows = -(-1000 // (2 * cache.chunk_rows)) if shuffle else -(-1000 // cache.chunk_rows)
    for batch in loader:  # each batch dropped once used: later windows take the memory of earlier ones
        assert_aligned([batch], x, y)
    assert len(fresh) == windows and fresh.count(True) < windows // 2
    batches = collect(loader, 1)  # every batch held: no window's memory is read into again while a batch refers to it
    assert_aligned(batches, x, y)


@pytest.mark.parametrize("shuffle", [True, False])
def test_labels_kept_from_every_batch_keep_no_window_of_logits_alive_during_the_epoch(tmp_path, shuffle):
    import tracemalloc

    n, classes = 16384, 250  # 16 MB of float32 logits, 128 KB of labels
    source = open_data(str(make_npz(tmp_path / "d.npz", n=n, features=1, classes=2)))
    logits = np.random.default_rng(0).normal(size=(n, classes)).astype(np.float32)
    _, y = source.read(0, n)
    with CacheWriter(tmp_path / "c.zarr", Layout(Dense(), n, classes, "float32", 64),
                     manifest={"dataset": {"spec": source.spec, "fingerprint": source.fingerprint()}}) as w:
        for i in range(w.num_chunks):
            a, b = w.chunk_bounds(i)
            w.write_chunks(i, {"logits": logits[a:b]}, y[a:b])
        w.finish()
    loader = SoftTargetLoader(source, open_cache(tmp_path / "c.zarr"), batch_size=128, seed=0, shuffle=shuffle)  # Zarr labels are read into window memory too
    tracemalloc.start()
    try:
        kept = [batch.labels for batch in loader]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(k) for k in kept) == n
    assert peak < logits.nbytes / 4  # a few windows of logits at most during the epoch, not one per batch kept


def test_read_ranges_reads_into_the_buffers_it_is_given_and_grows_them(pair):
    _, cache, _, _ = pair
    reuse = {}
    first, _ = cache.read_ranges([(128, 192), (0, 64)], reuse)
    kept = first["logits"].copy()
    second, labels = cache.read_ranges([(64, 128), (192, 256)], reuse)
    np.testing.assert_array_equal(second["logits"][:, 0], np.r_[64:128, 192:256])
    assert np.shares_memory(first["logits"], second["logits"]) and np.shares_memory(reuse["logits"], second["logits"])
    np.testing.assert_array_equal(kept[:, 0], np.r_[128:192, 0:64])
    third, _ = cache.read_ranges([(0, 320)], reuse)  # more rows than the buffer holds: a larger one
    np.testing.assert_array_equal(third["logits"][:, 0], np.arange(320))
    assert reuse["logits"].nbytes >= 320 * 2 * 4 and np.shares_memory(reuse["logits"], third["logits"])


def loader_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("softlabels-")]


def test_read_threads_end_with_the_epoch_or_an_abandoned_iteration(pair):
    source, cache, _, _ = pair
    loader = SoftTargetLoader(source, cache, batch_size=50, seed=0)
    for epoch in range(3):
        collect(loader, epoch)
    assert loader_threads() == []
    it = iter(loader)
    next(it)
    assert loader_threads() != []
    del it
    gc.collect()
    assert loader_threads() == []


def test_hdf5_data_and_cache_are_reopened_in_each_worker(tmp_path, monkeypatch):
    opened, real_init = tmp_path / "opened.log", h5py.File.__init__

    def logged_init(self, name, *args, **kwargs):  # which process opens which file
        if isinstance(name, (str, os.PathLike)):  # h5py also reopens by file id
            with open(opened, "a") as log:
                log.write(f"{os.getpid()} {os.path.basename(os.fspath(name))}\n")
        real_init(self, name, *args, **kwargs)
    monkeypatch.setattr(h5py.File, "__init__", logged_init)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 4)).astype(np.float32)
    y = rng.integers(0, 2, 700)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(50, 4))
        f.create_dataset("y", data=y)
    source = open_data(str(tmp_path / "d.h5"))
    cache = write_cache(tmp_path / "c.h5", source, y)
    loader = SoftTargetLoader(source, cache, batch_size=32, seed=1, shuffle_chunks=2)
    source.read(0, 10), cache.read(0, 10)  # handles open in the parent before the workers fork
    opened.unlink()
    batches = collect(loader, 0, workers=2)
    assert sorted(np.concatenate(indices(batches)).tolist()) == list(range(700))
    assert_aligned(batches, x, y)
    assert_same_batches(batches, collect(loader, 0))
    by_worker = {}
    for line in opened.read_text().splitlines():
        pid, name = line.split()
        if int(pid) != os.getpid():
            by_worker.setdefault(pid, set()).add(name)
    assert list(by_worker.values()) == [{"d.h5", "c.h5"}] * 2  # each worker opened both files itself


ITEMS = textwrap.dedent("""
    import os
    import numpy as np

    class Logged:
        '''300 items; every __getitem__ appends "pid index" to a log file.'''
        def __init__(self, log):
            self.log = log
        def __len__(self):
            return 300
        def __getitem__(self, i):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {i}\\n")
            return np.full(3, i, dtype=np.float32), i % 4
""")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_dataset_read_item_by_item_is_read_in_the_workers_each_item_once(tmp_path, monkeypatch):
    (tmp_path / "itemzoo.py").write_text(ITEMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "items.log"
    source = open_data(f"itemzoo:Logged?log={log}")
    loader = SoftTargetLoader(source, None, batch_size=20, seed=0, shuffle_chunks=2)
    expected = collect(loader, 1)
    log.unlink()
    batches = collect(loader, 1, workers=3)
    assert_same_batches(batches, expected)
    for b in batches:
        np.testing.assert_array_equal(b.inputs.numpy()[:, 0], b.indices.numpy())
        np.testing.assert_array_equal(b.labels.numpy(), b.indices.numpy() % 4)
    reads = [line.split() for line in log.read_text().splitlines()]
    assert str(os.getpid()) not in {pid for pid, _ in reads}  # the main process read no item
    assert len({pid for pid, _ in reads}) == 3
    assert sorted(int(i) for _, i in reads) == list(range(300))  # each item read once, by one worker


def test_take_and_concat_index_every_array_of_dict_targets():
    window = _Window(np.arange(6.0)[:, None], np.arange(6), {"a": np.arange(12).reshape(6, 2), "b": np.arange(6) * 10},
                     np.arange(6))
    part = _take(window, np.array([4, 1]))
    assert part.teacher_logits["a"].tolist() == [[8, 9], [2, 3]] and part.teacher_logits["b"].tolist() == [40, 10]
    joined = _concat([part, _take(window, slice(0, 1))])
    assert joined.teacher_logits["a"].tolist() == [[8, 9], [2, 3], [0, 1]] and joined.teacher_logits["b"].tolist() == [40, 10, 0]
    assert joined.indices.tolist() == [4, 1, 0]
