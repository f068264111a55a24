"""Cache round trips through CacheWriter/open_cache and through plain zarr and h5py."""

import json
import os
import shutil
import subprocess
import sys
import zlib

import google_crc32c  # zarr's own CRC-32C: a second implementation, not the one softlabels uses
import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels import CacheWriter, Dense, Layout, Sampled, SoftlabelsError, TopK, open_cache
from softlabels.store import DamagedChunk, Record, chunk_checksum, default_chunk_rows
from softlabels.report import cache_report
from softlabels.verify import verify_cache

from .conftest import command_peak_mib, flip_hdf5_byte, reseal_zarr

MANIFEST = {"teacher": {"file": "t.pth"}, "dataset": {"spec": "x.npz", "fingerprint": "sha256:0"}}


def write_cache(path, logits, labels, chunk_rows, dtype="float16", item_axes=(), compress=False):
    layout = Layout(Dense(), len(logits), logits.shape[-1], dtype, chunk_rows, item_axes)
    with CacheWriter(path, layout, manifest=MANIFEST, compress_logits=compress) as writer:
        for index in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(index)
            writer.write_chunks(index, {"logits": logits[start:stop]}, labels[start:stop])
        writer.finish()


def forge_zarr_chunk(path, array, chunk, stored):
    """Replace ``array``'s chunk file with ``stored`` and its crc32c, as a forger would, the table of
    chunk checksums by place (``chunk_crc32c``) included: only the checks of what the file holds remain."""
    name = f"{array}/c/{chunk}" + "/0" * (zarr.open_group(str(path), mode="r")[array].ndim - 1)
    (path / name).write_bytes(stored + google_crc32c.value(stored).to_bytes(4, "little"))
    reseal_zarr(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 300),
    c=st.integers(1, 40),
    chunk_rows=st.integers(1, 128),
    dtype=st.sampled_from(["float16", "float32"]),
    suffix=st.sampled_from([".zarr", ".h5"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_preserves_every_row(tmp_path_factory, n, c, chunk_rows, dtype, suffix, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, c)) * 10).astype(np.float32)
    labels = rng.integers(-1, c, size=n)
    path = tmp_path_factory.mktemp("rt") / f"cache{suffix}"
    write_cache(path, logits, labels, chunk_rows, dtype)

    with open_cache(path) as cache:
        assert len(cache) == n and cache.num_classes == c
        got, got_labels = cache.read(0, n)
        np.testing.assert_array_equal(got["logits"], logits.astype(dtype))
        np.testing.assert_array_equal(got_labels, labels)
        rows = np.concatenate([chunk[1]["logits"] for chunk in cache.iter_chunks()])
        np.testing.assert_array_equal(rows, logits.astype(dtype))
        # shuffled blocks of one or two chunks, read into one buffer as the loader reads a window
        for block in (cache.chunk_rows, 2 * cache.chunk_rows):
            ranges = [(a, min(a + block, n)) for a in rng.permutation(np.arange(0, n, block)).tolist()]
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            got, got_labels = cache.read_ranges(ranges)
            np.testing.assert_array_equal(got["logits"], logits.astype(dtype)[rows])
            np.testing.assert_array_equal(got_labels, labels[rows])
        expected_crc = [
            chunk_checksum({"logits": logits[s:s + cache.chunk_rows].astype(dtype)}, labels[s:s + cache.chunk_rows])
            for s in range(0, n, cache.chunk_rows)
        ]
        np.testing.assert_array_equal(cache.checksums(), expected_crc)
    assert not path.with_name(path.name + ".partial").exists()


def test_every_file_of_a_zarr_cache_is_synced_before_it_is_complete_and_its_chunk_files_once(tmp_path, monkeypatch):
    import softlabels.durable
    import softlabels.store

    synced, synced_folders = [], []
    for module in (softlabels.store, softlabels.durable):
        real = module.fsync_file
        monkeypatch.setattr(module, "fsync_file", lambda path, real=real: synced.append(os.path.relpath(path, tmp_path)) or real(path))
    real_folder = softlabels.durable.fsync_directory
    monkeypatch.setattr(softlabels.durable, "fsync_directory",
                        lambda path: synced_folders.append(os.path.relpath(path, tmp_path)) or real_folder(path))
    write_cache(tmp_path / "c.zarr", np.ones((40, 3), np.float32), np.zeros(40, np.int64), chunk_rows=8)
    files = {os.path.relpath(os.path.join(folder, name), tmp_path) for folder, _, names in os.walk(tmp_path / "c.zarr") for name in names}
    as_written = {f.replace("c.zarr", "c.zarr.partial", 1) for f in files}
    assert as_written <= set(synced)  # each file, before the cache was moved into place
    chunk_files = [f for f in as_written if f.split(os.sep)[1] in ("logits", "labels") and os.sep + "c" + os.sep in f]
    assert len(chunk_files) == 10 and all(synced.count(f) == 1 for f in chunk_files)
    folders = {os.path.relpath(folder, tmp_path).replace("c.zarr", "c.zarr.partial", 1) for folder, _, _ in os.walk(tmp_path / "c.zarr")}
    assert len(folders) > 10 and folders <= set(synced_folders)  # each folder too: the names of what it holds


def test_fsync_all_tries_every_path_then_raises_the_first_error(tmp_path, monkeypatch):
    import softlabels.durable

    paths = [tmp_path / f"f{i}" for i in range(20)]
    for path in paths[::2]:
        path.write_bytes(b"x")
    tried = []
    real = softlabels.durable.fsync_file
    monkeypatch.setattr(softlabels.durable, "fsync_file", lambda path: tried.append(path) or real(path))
    with pytest.raises(FileNotFoundError):
        softlabels.durable.fsync_all([*((p, False) for p in paths), (tmp_path, True)])
    assert sorted(tried) == sorted(paths)
    softlabels.durable.fsync_all([*((p, False) for p in paths[::2]), (tmp_path, True)])
    taken, seen = [], []

    def paths_taken():
        for i in range(1000):
            taken.append(i)
            yield paths[0], False
    monkeypatch.setattr(softlabels.durable, "fsync_file", lambda path: seen.append(len(taken)))
    softlabels.durable.fsync_all(paths_taken())
    # a million paths must not be held at once: the k-th sync starts with a few dozen more taken, not all
    assert len(seen) == 1000 and max(count - k for k, count in enumerate(sorted(seen))) <= 48


def test_a_partial_zarr_commit_record_is_read_from_the_files_there_not_by_asking_after_every_declared_chunk(tmp_path, monkeypatch):
    import softlabels.store

    layout = Layout(Dense(), 4096 * 4, 3, "float16", 4)  # 4096 chunks declared
    writer = CacheWriter(tmp_path / "c.zarr", layout, manifest=MANIFEST)
    for chunk in (5, 4095):
        writer.write_chunks(chunk, {"logits": np.full((4, 3), chunk, np.float16)}, np.zeros(4, np.int64))
    writer.close()
    folder = tmp_path / "c.zarr.partial" / "chunk_crc32" / "c"
    (folder / "07").write_bytes((folder / "5").read_bytes())  # no name zarr writes: no chunk
    (folder / "4096").write_bytes((folder / "5").read_bytes())  # past the declared chunks
    asked = []
    real = os.path.exists
    monkeypatch.setattr(softlabels.store.os.path, "exists", lambda path: asked.append(path) or real(path))
    with open_cache(tmp_path / "c.zarr.partial", allow_incomplete=True) as cache:
        record = cache.checksums()
    assert len(asked) < 10
    assert np.flatnonzero(record >= 0).tolist() == [5, 4095]
    assert record[5] == chunk_checksum({"logits": np.full((4, 3), 5, np.float16)}, np.zeros(4, np.int64))


def test_plain_zarr_reads_a_row_and_the_manifest(tmp_path):
    logits = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    labels = np.arange(50) % 4
    write_cache(tmp_path / "c.zarr", logits, labels, chunk_rows=16)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    manifest = group.attrs["softlabels"]
    assert manifest["format"] == "softlabels-cache" and manifest["format_version"] == 2 and manifest["item_axes"] == []
    assert manifest["complete"] is True and manifest["num_samples"] == 50 and manifest["num_classes"] == 4
    np.testing.assert_array_equal(group["logits"][37], logits[37].astype(np.float16))
    assert group["labels"][37] == labels[37]
    assert group["logits"].chunks == (16, 4)


def test_plain_h5py_reads_a_row_and_the_manifest(tmp_path):
    logits = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    labels = np.full(50, -1)
    write_cache(tmp_path / "c.h5", logits, labels, chunk_rows=16, dtype="float32")
    with h5py.File(tmp_path / "c.h5", "r") as f:
        manifest = json.loads(f.attrs["softlabels"])
        assert manifest["dtype"] == "float32" and manifest["complete"] is True
        np.testing.assert_array_equal(f["logits"][49], logits[49])
        assert f["labels"][49] == -1


def _written_as_the_readme_says(path, logits, labels, chunk_rows):
    """A dense version-2 cache written with plain zarr or h5py from the README's format section alone."""
    n, c = logits.shape
    chunks = -(-n // chunk_rows)
    crc32 = np.array([zlib.crc32(labels[s:s + chunk_rows].astype("<i8").tobytes(),
                                 zlib.crc32(logits[s:s + chunk_rows].astype("<f2").tobytes()))
                      for s in range(0, n, chunk_rows)], dtype=np.int64)
    manifest = {"format": "softlabels-cache", "format_version": 2, "kind": "dense", "item_axes": [], "num_samples": n,
                "num_classes": c, "dtype": "float16", "chunk_rows": chunk_rows, "compress_logits": False, "complete": True,
                "teacher": {"file": "t.pth"}, "dataset": {"spec": "x.npz", "fingerprint": "sha256:0", "num_samples": n}}
    if path.suffix == ".zarr":
        from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
        group = zarr.open_group(str(path), mode="w")
        group.create_array("logits", shape=(n, c), chunks=(chunk_rows, c), dtype="float16", serializer=BytesCodec(endian="little"),
                           compressors=[Crc32cCodec()], config={"write_empty_chunks": True})[:] = logits.astype(np.float16)
        group.create_array("labels", shape=(n,), chunks=(chunk_rows,), dtype="int64", serializer=BytesCodec(endian="little"),
                           compressors=[ZstdCodec(), Crc32cCodec()], config={"write_empty_chunks": True})[:] = labels
        group.create_array("chunk_crc32", shape=(chunks,), chunks=(chunks,), dtype="int64", compressors=[Crc32cCodec()])[:] = crc32
        group.attrs["softlabels"] = manifest
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("logits", data=logits.astype(np.float16), chunks=(chunk_rows, c), fletcher32=True)
            f.create_dataset("labels", data=labels, chunks=(chunk_rows,), compression="lzf", fletcher32=True)
            f.create_dataset("chunk_crc32", data=crc32)
            table = f.create_dataset("chunk_crc32c", data=np.array(
                [[google_crc32c.value(logits[s:s + chunk_rows].astype("<f2").tobytes())] for s in range(0, n, chunk_rows)], dtype=np.uint32))
            table.attrs["arrays"] = json.dumps(["logits"])
            f.attrs["softlabels"] = json.dumps(manifest)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_cache_written_with_plain_zarr_or_h5py_from_the_readme_reads_on_the_fast_path(tmp_path, suffix):
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(70, 9)).astype(np.float16), rng.integers(-1, 9, 70)
    path = tmp_path / f"plain{suffix}"
    _written_as_the_readme_says(path, logits, labels, chunk_rows=16)
    with open_cache(path) as cache:
        assert cache._arrays._raw["logits"] is not None  # read directly, checksums checked
        targets, got = cache.read_ranges([(48, 70), (0, 32)])
        np.testing.assert_array_equal(targets["logits"], logits[np.r_[48:70, 0:32]])
        np.testing.assert_array_equal(got, labels[np.r_[48:70, 0:32]])
        np.testing.assert_array_equal(cache.checksums(), [chunk_checksum({"logits": logits[s:s + 16]}, labels[s:s + 16])
                                                          for s in range(0, 70, 16)])


@pytest.mark.parametrize("kind", [Dense(), TopK(k=4)], ids=["dense", "topk"])
def test_chunk_files_written_directly_are_the_bytes_zarr_writes(tmp_path, kind):
    rng = np.random.default_rng(0)
    n = 70  # the last chunk holds 6 rows: stored padded, as zarr pads it
    arrays = ({"logits": rng.normal(size=(n, 3, 9)).astype(np.float16)} if isinstance(kind, Dense) else
              {"topk_logits": rng.normal(size=(n, 3, 4)).astype(np.float16), "topk_indices": rng.integers(0, 9, (n, 3, 4)),
               "logsumexp": rng.normal(size=(n, 3, 4)).astype(np.float32)})
    labels, record = rng.integers(-1, 9, (n, 3)), {"views/x": rng.normal(size=(n, 2)).astype(np.float32)}
    layout = Layout(kind, n, 9, "float16", 16, (("view", 3),), (Record("views/x", np.dtype(np.float32), (2,)),))
    for name in ("direct", "zarr"):
        writer = CacheWriter(tmp_path / f"{name}.zarr", layout, manifest=MANIFEST)
        if name == "zarr":
            writer._writers = {}  # every array through zarr-python
        else:
            assert set(writer._writers) == {*arrays, "labels", "views/x", "chunk_crc32"}
        for first in (4, 0, 2):
            a, b = first * 16, min(n, (first + 2) * 16)
            writer.write_chunks(first, {k: v[a:b] for k, v in arrays.items()}, labels[a:b], {k: v[a:b] for k, v in record.items()})
        writer.finish()

    def files(path):
        return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    direct, plain = files(tmp_path / "direct.zarr"), files(tmp_path / "zarr.zarr")
    assert len(direct) > 20 and direct.keys() == plain.keys()
    assert [name for name in direct if direct[name] != plain[name] and not name.endswith("zarr.json")] == []


def test_a_cache_replaced_by_a_killed_writer_is_whole_never_half_removed(tmp_path, monkeypatch):
    import shutil

    import softlabels.store as store

    path, labels = tmp_path / "c.zarr", np.zeros(64, dtype=np.int64)
    write_cache(path, np.zeros((64, 5), dtype=np.float32), labels, chunk_rows=16)
    real = store.remove_path

    def killed_while_removing_the_old_cache(target):
        if target.name.endswith(".replaced") and target.exists():
            shutil.rmtree(target / "logits")
            raise KeyboardInterrupt
        real(target)

    monkeypatch.setattr(store, "remove_path", killed_while_removing_the_old_cache)
    with pytest.raises(KeyboardInterrupt):
        write_cache(path, np.ones((64, 5), dtype=np.float32), labels, chunk_rows=16)
    monkeypatch.undo()
    with open_cache(path) as cache:
        assert cache.manifest["complete"] and (cache.read(0, 64)[0]["logits"] == 1).all()
    write_cache(path, np.full((64, 5), 2, dtype=np.float32), labels, chunk_rows=16)  # the leftover is cleared
    assert not (tmp_path / "c.zarr.replaced").exists() and (open_cache(path).read(0, 64)[0]["logits"] == 2).all()


def test_incomplete_cache_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter(path, Layout(Dense(), 20, 3, "float16", 8), manifest=MANIFEST)
    writer.write_chunks(0, {"logits": np.zeros((8, 3))}, np.zeros(8, dtype=np.int64))
    writer.close()
    assert not path.exists()
    with pytest.raises(SoftlabelsError, match="incomplete"):
        open_cache(str(path) + ".partial")
    assert open_cache(str(path) + ".partial", allow_incomplete=True).manifest["complete"] is False


def test_finish_refuses_missing_chunks(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, Layout(Dense(), 20, 3, "float16", 8), manifest=MANIFEST) as writer:
        writer.write_chunks(0, {"logits": np.zeros((8, 3))}, np.zeros(8, dtype=np.int64))
        with pytest.raises(RuntimeError, match="chunk 1"):
            writer.finish()
    assert not path.exists()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_partial_caches_commit_record_reads_as_zarr_and_h5py_read_it(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    writer = CacheWriter(path, Layout(Dense(), 40, 4, "float16", 8), manifest=MANIFEST)
    logits = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    for chunk in (1, 3):
        writer.write_chunks(chunk, {"logits": logits[chunk * 8:chunk * 8 + 8]}, np.full(8, chunk, dtype=np.int64))
    recorded = writer.recorded_checksums()
    writer.close()
    expected = [-1, chunk_checksum({"logits": logits[8:16].astype(np.float16)}, np.full(8, 1)), -1,
                chunk_checksum({"logits": logits[24:32].astype(np.float16)}, np.full(8, 3)), -1]
    assert recorded.tolist() == expected
    partial = tmp_path / f"c{suffix}.partial"
    plain = zarr.open_group(str(partial), mode="r") if suffix == ".zarr" else h5py.File(partial, "r")
    assert np.asarray(plain["chunk_crc32"][:]).tolist() == expected
    if suffix == ".zarr":  # a record torn by a crash (cut short, or its bytes not all on disk) is no commit
        (partial / "chunk_crc32" / "c" / "3").write_bytes((partial / "chunk_crc32" / "c" / "3").read_bytes()[:5])
        _flip_a_byte(partial / "chunk_crc32" / "c" / "1")
        assert CacheWriter.resume(path).recorded_checksums().tolist() == [-1] * 5


def test_an_arrays_metadata_cut_short_is_refused_in_one_line(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    (path / "logits" / "zarr.json").write_bytes((path / "logits" / "zarr.json").read_bytes()[:40])
    with pytest.raises(SoftlabelsError, match="its arrays' metadata cannot be read"):
        open_cache(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "format_version": 3}
    with pytest.raises(SoftlabelsError, match="newer"):
        open_cache(path)


def test_manifest_that_disagrees_with_arrays_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "num_classes": 3}
    with pytest.raises(SoftlabelsError, match="shape"):
        open_cache(path)


@pytest.mark.parametrize("field, value", [("num_samples", -1), ("num_classes", 0), ("chunk_rows", 0), ("dtype", "int8")])
def test_a_manifest_field_of_an_impossible_value_is_named(tmp_path, field, value):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], field: value}
    with pytest.raises(SoftlabelsError, match=rf"manifest field '{field}' has an impossible value {value!r}"):
        open_cache(path)


@pytest.mark.parametrize("section, update, message", [
    ("teacher", {"params": "many"}, r"'teacher.params' is not a count, got 'many'"),
    ("dataset", {"num_samples": -3}, r"'dataset.num_samples' is not a count"),
    ("teacher", {"classes": ["a", "b", "c"]}, r"'teacher.classes' is not a list of distinct class names, one for each of the 2 classes"),
    ("teacher", {"classes": ["a", "a"]}, r"'teacher.classes' is not a list of distinct class names"),
    ("dataset", {"classes": ["a", 3]}, r"'dataset.classes' is not a list of distinct class names"),
    ("tokens", {"seq_len": "64", "tokenizer": None}, r"'tokens.seq_len' is not a count"),
    ("tokens", {"tokenizer": "bpe"}, r"'tokens' is not an object with a 'tokenizer' object or null"),
    ("tokens", {"tokenizer": {"sha256": 7}}, r"'tokens.tokenizer.sha256' is not a string"),
])
def test_manifest_descriptions_of_the_wrong_type_are_refused_on_open(tmp_path, section, update, message):
    # what inspect prints and the class and tokenizer checks compare, from a cache that may be a stranger's
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    manifest = group.attrs["softlabels"]
    group.attrs["softlabels"] = {**manifest, section: {**manifest.get(section, {}), **update}}
    with pytest.raises(SoftlabelsError, match=message):
        open_cache(path)


@pytest.mark.parametrize("manifest, message", [
    ('{"format": "softlabels-cache", ', "its 'softlabels' manifest is damaged: not valid JSON (Expecting property name "
                                       "enclosed in double quotes at character 31)"),
    ("[" * 100_000 + "]" * 100_000, "its 'softlabels' manifest is damaged: nested deeper than JSON that Python reads"),
    ("[1, 2]", "its 'softlabels' manifest is invalid (list, not a JSON object)"),
])
def test_an_hdf5_manifest_that_is_not_a_json_object_is_reported_damaged_not_missing(tmp_path, manifest, message):
    path = tmp_path / "c.h5"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    with h5py.File(path, "r+") as f:
        f.attrs["softlabels"] = manifest
    before = path.read_bytes()
    for command in (["inspect", str(path)], ["verify", str(path)]):
        done = subprocess.run([sys.executable, "-m", "softlabels", *command], capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr == f"error: {path}: {message}\n"
    assert path.read_bytes() == before


def test_not_a_cache_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(SoftlabelsError, match="not a softlabels cache"):
        open_cache(tmp_path / "other.zarr")
    with pytest.raises(SoftlabelsError, match="must end in"):
        open_cache(tmp_path / "cache.txt")


@pytest.mark.parametrize("row_bytes,zarr_rows,h5_rows", [(20, 4096, 4096), (2000, 1024, 256), (4000, 512, 128),
                                                       (100000, 16, 16), (4 * 3 * 1000 * 2, 64, 16)])
def test_default_chunks_hold_about_two_mebibytes_in_zarr_and_half_a_mebibyte_in_hdf5(row_bytes, zarr_rows, h5_rows):
    assert default_chunk_rows(row_bytes, "c.zarr") == zarr_rows
    assert default_chunk_rows(row_bytes, "c.h5") == h5_rows == default_chunk_rows(row_bytes, "c.hdf5")


@pytest.mark.parametrize("row_bytes", [20, 2000])
def test_default_chunks_match_at_most_256_mib_of_array_inputs(row_bytes):
    image = 3 * 224 * 224 * 4  # 588 KiB: 445 of them in 256 MiB
    assert default_chunk_rows(row_bytes, "c.zarr", input_row_bytes=image) == 256
    assert default_chunk_rows(row_bytes, "c.zarr", input_row_bytes=100 << 20) == 16  # never fewer than 16
    assert default_chunk_rows(row_bytes, "c.zarr", input_row_bytes=40 * 4) == (4096 if row_bytes == 20 else 1024)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_rows_with_item_axes_round_trip_and_chunk_along_samples_only(tmp_path, suffix):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4, 3, 7)).astype(np.float32)
    labels = rng.integers(-1, 7, size=(50, 4, 3))
    path = tmp_path / f"c{suffix}"
    write_cache(path, logits, labels, chunk_rows=16, dtype="float32", item_axes=(("view", 4), ("crop", 3)))
    with open_cache(path) as cache:
        assert cache.items == (4, 3) and cache.manifest["item_axes"] == [{"name": "view", "size": 4}, {"name": "crop", "size": 3}]
        got, got_labels = cache.read(10, 40)
        np.testing.assert_array_equal(got["logits"], logits[10:40])
        np.testing.assert_array_equal(got_labels, labels[10:40])
        np.testing.assert_array_equal(cache.teacher_top1(), logits.argmax(-1))
    if suffix == ".zarr":  # plain zarr reads row i, view v
        group = zarr.open_group(str(path), mode="r")
        assert group["logits"].chunks == (16, 4, 3, 7) and group["labels"].chunks == (16, 4, 3)
        np.testing.assert_array_equal(group["logits"][33, 2], logits[33, 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array, chunk_file", [("logits", "logits/c/2/0"), ("labels", "labels/c/2")],
                         ids=["raw logits", "zstd labels"])
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_zarr_chunk_fails_when_read_naming_array_chunk_and_rows(tmp_path, damage, array, chunk_file):
    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.arange(64, dtype=np.int64) % 5, chunk_rows=16)
    chunk_file = path / chunk_file
    _flip_a_byte(chunk_file) if damage == "flip" else chunk_file.unlink()
    with open_cache(path) as cache:
        cache.read(0, 32)  # the other chunks still read
        with pytest.raises(SoftlabelsError, match=rf"array '{array}' chunk 2 \(rows 32-47\) is damaged"):
            cache.read(16, 64)
        with pytest.raises(SoftlabelsError, match=rf"array '{array}' chunk 2 \(rows 32-47\)"):
            list(cache.iter_chunks())
    if damage == "flip":  # plain zarr refuses it too: the store's own crc32c codec
        with pytest.raises(Exception, match="checksum"):
            zarr.open_group(str(path), mode="r")[array][32:48]


def test_a_complete_cache_missing_a_commit_record_chunk_is_refused_not_read_short(tmp_path):
    # A deleted record chunk reads as "never written" (the fill value): its rows would silently drop out
    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.arange(64, dtype=np.int64) % 5, chunk_rows=16)
    files = sorted((path / "chunk_crc32" / "c").iterdir())
    files[-1].unlink()
    recorded = zarr.open_group(str(path), mode="r")["chunk_crc32"][:]
    missing = int(np.flatnonzero(recorded < 0)[0])
    expected = rf"array 'chunk_crc32' chunk {missing} \(rows {16 * missing}-{16 * missing + 15}\) is damaged \(the cache is complete"
    with pytest.raises(SoftlabelsError, match=expected):  # a reader's open counts the record's files
        open_cache(path)
    with open_cache(path, allow_incomplete=True) as cache:  # as inspect and verify open it
        with pytest.raises(SoftlabelsError, match=expected):
            cache_report(cache)
        # the rows themselves are read and checked chunk by chunk, the record aside
        np.testing.assert_array_equal(cache.read(0, 64)[1], np.arange(64) % 5)
    # verify names the missing entry and still compares every other chunk with its record: a chunk
    # file copied over another passes its own crc32c in a cache without their table by place (one
    # written before it)
    other, source = [c for c in range(4) if c != missing][:2]
    (path / "labels" / "c" / str(other)).write_bytes((path / "labels" / "c" / str(source)).read_bytes())
    shutil.rmtree(path / "chunk_crc32c")
    problems = verify_cache(path).problems
    assert any(p.startswith(f"chunk {missing} ") and "never written" in p for p in problems), problems
    assert any(p.startswith(f"chunk {other} ") and "checksum mismatch" in p for p in problems), problems


def test_a_zstd_chunk_of_the_wrong_size_with_a_valid_crc32c_fails_when_read(tmp_path):
    # a frame of 8 labels where the chunk holds 16: whatever the buffer held before must not show through
    from numcodecs import Zstd

    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.arange(64, dtype=np.int64) % 5, chunk_rows=16)
    frame = Zstd(level=1).encode(np.arange(8, dtype="<i8"))
    forge_zarr_chunk(path, "labels", 1, bytes(frame))
    with open_cache(path) as cache:
        reuse = {}
        cache.read_ranges([(32, 48)], reuse)  # the buffer now holds chunk 2's labels
        with pytest.raises(SoftlabelsError, match=r"array 'labels' chunk 1 \(rows 16-31\) is damaged \(its zstd frame declares 64 bytes, not 128\)"):
            cache.read_ranges([(16, 32)], reuse)


def test_a_zstd_frame_cut_short_with_a_valid_crc32c_and_header_fails_when_read_and_the_rest_reads_as_written(tmp_path):
    from numcodecs import Zstd

    path = tmp_path / "c.zarr"
    labels = np.random.default_rng(0).integers(0, 5, 64)
    write_cache(path, np.ones((64, 5), dtype=np.float32), labels, chunk_rows=16)
    frame = bytes(Zstd(level=1).encode(np.ascontiguousarray(labels[16:32], "<i8")))[:-6]  # declares 128 bytes, holds fewer
    forge_zarr_chunk(path, "labels", 1, frame)
    with open_cache(path) as cache:
        with pytest.raises(SoftlabelsError, match=r"array 'labels' chunk 1 \(rows 16-31\) is damaged \(its zstd frame does not decode to 128 bytes"):
            cache.read(16, 32)
        np.testing.assert_array_equal(cache.read_ranges([(48, 64), (0, 16)])[1], np.concatenate([labels[48:], labels[:16]]))


@pytest.mark.parametrize("after", [b"second frame", b"\x00garbage"], ids=["a second frame", "garbage"])
def test_a_zstd_frame_followed_by_more_bytes_with_a_valid_crc32c_fails_when_read_as_plain_zarr_fails(tmp_path, after):
    from numcodecs import Zstd

    path = tmp_path / "c.zarr"
    labels = np.arange(64, dtype=np.int64) % 5
    write_cache(path, np.ones((64, 5), dtype=np.float32), labels, chunk_rows=16)
    frame = bytes(Zstd(level=1).encode(np.ascontiguousarray(labels[16:32], "<i8")))
    stored = frame + (frame if after == b"second frame" else after)
    forge_zarr_chunk(path, "labels", 1, stored)
    with open_cache(path) as cache, pytest.raises(SoftlabelsError, match=r"array 'labels' chunk 1 \(rows 16-31\) is damaged \(its zstd frame does not decode to 128 bytes"):
        cache.read(16, 32)
    with pytest.raises(Exception):
        zarr.open_group(str(path), mode="r")["labels"][16:32]


@pytest.mark.parametrize("chunk_file", ["logits/c/1/0", "labels/c/1"], ids=["raw logits", "zstd labels"])
def test_a_pipe_in_place_of_a_chunk_file_fails_when_read_instead_of_blocking(tmp_path, chunk_file):
    import signal

    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    (path / chunk_file).unlink()
    os.mkfifo(path / chunk_file)
    signal.alarm(20)  # a blocked read fails the test instead of hanging it
    try:
        with open_cache(path) as cache, pytest.raises(SoftlabelsError, match=r"chunk 1 .* is damaged \(its chunk file is not a regular file\)"):
            cache.read(0, 64)
    finally:
        signal.alarm(0)


def test_chunks_of_more_than_a_gibibyte_are_refused_when_written_or_read(tmp_path):
    with pytest.raises(SoftlabelsError, match=r"a chunk of 2,000,000 rows of array 'logits' holds 4,000,000,000 bytes"):
        CacheWriter(tmp_path / "w.zarr", Layout(Dense(), 10**7, 1000, "float16", 2_000_000), manifest=MANIFEST)
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "num_samples": 2**40, "chunk_rows": 2**40}
    with pytest.raises(SoftlabelsError, match="holds .* bytes, more than 1,073,741,824"):
        open_cache(path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw logits", "zstd logits"])
def test_direct_chunk_reads_return_what_zarr_returns(tmp_path, compress):
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(77, 3, 9)).astype(np.float16), rng.integers(-1, 9, size=(77, 3))
    layout = Layout(Dense(), 77, 9, "float16", 16, (("view", 3),))
    with CacheWriter(tmp_path / "c.zarr", layout, manifest=MANIFEST, compress_logits=compress) as writer:
        for index in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(index)
            writer.write_chunks(index, {"logits": logits[start:stop]}, labels[start:stop])
        writer.finish()
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    with open_cache(tmp_path / "c.zarr") as cache:
        assert set(cache._arrays._raw) == {"logits", "labels"} and all(cache._arrays._raw.values())
        for start, stop in [(0, 77), (5, 40), (64, 77), (17, 18)]:
            targets, got = cache.read(start, stop)
            np.testing.assert_array_equal(targets["logits"], group["logits"][start:stop])
            np.testing.assert_array_equal(got, group["labels"][start:stop])
        targets, got = cache.read_ranges([(64, 77), (0, 32), (48, 64)])
        rows = np.r_[64:77, 0:32, 48:64]
        np.testing.assert_array_equal(targets["logits"], group["logits"][:][rows])
        np.testing.assert_array_equal(got, group["labels"][:][rows])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("kind", [Dense(), TopK(k=3), Sampled(samples=4)], ids=["dense", "topk", "sampled"])
@pytest.mark.parametrize("items", [(), (("view", 2),), (("token", 5),)], ids=["rows", "views", "tokens"])
def test_rows_read_into_a_given_order_are_the_rows_plain_zarr_and_h5py_read_in_that_order(tmp_path, suffix, compress, kind, items):
    rng = np.random.default_rng(7)
    n, c = 70, 9
    logits = torch.from_numpy(rng.normal(size=(n, *(size for _, size in items), c)).astype(np.float32))
    targets = {name: a.numpy() for name, a in kind.build(logits, rows=torch.arange(n), store_dtype=torch.float16).items()}
    labels = rng.integers(-1, c, size=(n, *(size for _, size in items)))
    path = tmp_path / f"c{suffix}"
    layout = Layout(kind, n, c, "float16", 16, items)
    with CacheWriter(path, layout, manifest=MANIFEST, compress_logits=compress) as writer:
        for index in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(index)
            writer.write_chunks(index, {name: a[start:stop] for name, a in targets.items()}, labels[start:stop])
        writer.finish()
    ranges = [(48, 64), (0, 16), (64, 70), (16, 48)]  # the short last chunk inside, as in a shuffled window
    rows = np.concatenate([np.arange(a, b) for a, b in ranges])
    perm = rng.permutation(len(rows))
    order = np.empty_like(perm)
    order[perm] = np.arange(len(perm))  # the row read i-th goes to order[i]: the result is rows[perm]
    plain = zarr.open_group(str(path), mode="r") if suffix == ".zarr" else h5py.File(path, "r")
    with open_cache(path) as cache:
        got, got_labels = cache.read_ranges(ranges, {}, order)
        for name in targets:
            np.testing.assert_array_equal(got[name], np.asarray(plain[name][:])[rows[perm]])
        np.testing.assert_array_equal(got_labels, np.asarray(plain["labels"][:])[rows[perm]])
    if suffix == ".h5":
        plain.close()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_impossible_value_read_into_another_order_names_the_chunk_that_holds_it(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    logits, labels = np.zeros((64, 4), np.float32), np.zeros(64, np.int64)
    write_cache(path, logits, labels, chunk_rows=16, dtype="float32")
    if suffix == ".zarr":  # label 9 of 4 classes in row 37 (chunk 2), its CRC-32C made to match
        group = zarr.open_group(str(path), mode="r+")
        group["labels"][37] = 9
    else:
        with h5py.File(path, "r+") as f:
            f["labels"][37] = 9
    order = np.arange(64)[::-1].copy()  # row 37 of the reading lands at row 26 of the result
    with open_cache(path) as cache:
        with pytest.raises(SoftlabelsError, match=r"array 'labels' chunk 2 \(rows 32-47\) is damaged"):
            cache.read_ranges([(0, 64)], {}, order)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_shuffled_ranges_with_the_short_last_chunk_inside_read_exactly_and_a_damaged_chunk_fails(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    logits = np.random.default_rng(0).normal(size=(150, 50)).astype(np.float32)
    write_cache(path, logits, np.arange(150, dtype=np.int64) % 50, chunk_rows=16, dtype="float32")
    ranges = [(128, 144), (16, 48), (144, 150), (96, 112), (0, 16)]  # chunk 9 holds rows 144-149 only
    rows = np.r_[128:144, 16:48, 144:150, 96:112, 0:16]
    with open_cache(path) as cache:
        targets, labels = cache.read_ranges(ranges)
        np.testing.assert_array_equal(targets["logits"], logits[rows])
        np.testing.assert_array_equal(labels, rows % 50)
    if suffix == ".zarr":
        _flip_a_byte(path / "logits/c/6/0")
    else:
        flip_hdf5_byte(path, "logits", chunk=6, offset=100)
    with open_cache(path) as cache:
        for order in (None, np.random.default_rng(1).permutation(len(rows))):  # as stored, and each row put in its place
            with pytest.raises(SoftlabelsError, match=r"array 'logits' chunk 6 \(rows 96-111\) is damaged \(its crc32c"):
                cache.read_ranges(ranges, {}, order)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("chunk, offset", [(0, 400_000), (1, 270_000)], ids=["second piece", "short last chunk"])
def test_chunks_read_and_checked_in_pieces_read_exactly_and_damage_in_a_later_piece_fails(tmp_path, suffix, chunk, offset):
    # 128 rows of 4,000 bytes: each chunk is read and checked in two pieces (store._PIECE_BYTES); the
    # short last chunk's 72 rows (288,000 bytes) end inside its second piece, its padding after them
    path = tmp_path / f"c{suffix}"
    logits = np.random.default_rng(1).normal(size=(200, 1000)).astype(np.float32)
    write_cache(path, logits, np.arange(200, dtype=np.int64) % 1000, chunk_rows=128, dtype="float32")
    with open_cache(path) as cache:
        targets, labels = cache.read_ranges([(128, 200), (0, 128)])
        np.testing.assert_array_equal(targets["logits"], logits[np.r_[128:200, 0:128]])
        np.testing.assert_array_equal(labels, np.r_[128:200, 0:128] % 1000)
    if suffix == ".zarr":
        data = bytearray((path / f"logits/c/{chunk}/0").read_bytes())
        data[offset] ^= 0x01
        (path / f"logits/c/{chunk}/0").write_bytes(bytes(data))
    else:
        flip_hdf5_byte(path, "logits", chunk=chunk, offset=offset, mask=0x01)
    rows = (0, 127) if chunk == 0 else (128, 199)
    with open_cache(path) as cache:
        with pytest.raises(SoftlabelsError, match=rf"array 'logits' chunk {chunk} \(rows {rows[0]}-{rows[1]}\) is damaged \(its crc32c"):
            cache.read_ranges([(128, 200), (0, 128)])


def test_an_hdf5_file_cut_inside_a_chunk_while_open_fails_naming_it(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path, np.ones((64, 50), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16, dtype="float32")
    with h5py.File(path, "r") as f:
        info = f["logits"].id.get_chunk_info(3)
    with open_cache(path) as cache:  # HDF5 refuses to open a cut file; this one is cut once open
        with open(path, "r+b") as f:
            f.truncate(info.byte_offset + 10)
        with pytest.raises(SoftlabelsError, match=r"array 'logits' chunk 3 \(rows 48-63\) is damaged \(the file ends inside it\)"):
            cache.read(0, 64)


def _rewrite_hdf5(path, name, **dataset_options):
    with h5py.File(path, "r+") as f:
        values, attrs = f[name][:], dict(f[name].attrs)
        chunks = f[name].chunks
        del f[name]
        f.create_dataset(name, data=values, chunks=chunks, **dataset_options).attrs.update(attrs)


@pytest.mark.parametrize("name, options", [
    ("logits", {"shuffle": True, "fletcher32": True}),
    ("labels", {"compression": "gzip", "shuffle": True, "fletcher32": True}),
    ("labels", {"fletcher32": True, "compression": "szip"} if h5py.h5z.filter_avail(h5py.h5z.FILTER_SZIP) else {"scaleoffset": 0, "fletcher32": True}),
    ("chunk_crc32", {"compression": "gzip", "fletcher32": True}),
    ("chunk_crc32c", {"compression": "lzf", "fletcher32": True}),
], ids=["shuffle", "shuffle and gzip", "other codec", "gzip commit record", "lzf read checksums"])
def test_an_hdf5_array_stored_through_filters_softlabels_never_writes_is_refused_on_open(tmp_path, name, options):
    # h5py would run them with no bound on what they make: softlabels decodes only its own pipelines
    path = tmp_path / "c.h5"
    write_cache(path, np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32), np.zeros(64, dtype=np.int64),
                chunk_rows=16, dtype="float32")
    _rewrite_hdf5(path, name, **options)  # same values, other stored bytes
    with pytest.raises(SoftlabelsError, match=rf"c.h5: array '{name}' is stored through HDF5 filters \[[0-9, ]+\], not the "
                                              r"pipelines softlabels writes"):
        open_cache(path)


@pytest.fixture(params=["liblzf", "python"])
def lzf_decoder(request, monkeypatch):
    """Each LZF decoder softlabels has: liblzf as h5py builds it, and its own where that is missing."""
    from softlabels import store

    if request.param == "python":
        monkeypatch.setattr(store, "_liblzf", lambda: None)
    elif store._liblzf() is None:
        pytest.skip("h5py exports no lzf_decompress here")
    return request.param


def _hdf5_cache(path, kind, compress, n=70, c=9, chunk_rows=16):
    """A cache of ``kind`` with random rows, a uint64 record (which LZF cannot shrink: stored as it is)
    and a float32 one; returns its targets, labels and records as written."""
    rng = np.random.default_rng(11)
    logits = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32))
    targets = {name: a.numpy() for name, a in kind.build(logits, rows=torch.arange(n), store_dtype=torch.float16).items()}
    labels = rng.integers(-1, c, size=n)
    records = {"views/seed": rng.integers(0, 2**64, size=n, dtype=np.uint64), "views/x": rng.normal(size=(n, 2)).astype(np.float32)}
    layout = Layout(kind, n, c, "float16", chunk_rows, (),
                    (Record("views/seed", np.dtype(np.uint64)), Record("views/x", np.dtype(np.float32), (2,))))
    with CacheWriter(path, layout, manifest=MANIFEST, compress_logits=compress) as writer:
        for index in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(index)
            writer.write_chunks(index, {name: a[start:stop] for name, a in targets.items()}, labels[start:stop],
                                {name: a[start:stop] for name, a in records.items()})
        writer.finish()
    return targets, labels, records


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("kind", [Dense(), TopK(k=3), Sampled(samples=4)], ids=["dense", "topk", "sampled"])
def test_compressed_hdf5_chunks_decoded_by_softlabels_are_the_bytes_h5py_reads(tmp_path, kind, compress, lzf_decoder):
    path = tmp_path / "c.h5"
    targets, labels, records = _hdf5_cache(path, kind, compress)
    with h5py.File(path, "r") as f:
        plain = {name: f[name][:] for name in [*targets, "labels", *records]}
        assert f["views/seed"].id.get_chunk_info(0).filter_mask == 1  # LZF could not shrink it: stored as it is
    ranges, rows = [(48, 64), (0, 16), (64, 70), (16, 48)], np.r_[48:64, 0:16, 64:70, 16:48]
    order = np.random.default_rng(2).permutation(70)  # the row read i-th lands at order[i]
    placed = np.empty_like(rows)
    placed[order] = rows
    with open_cache(path) as cache:
        compressed = {name for name, reader in cache._arrays._raw.items() if type(reader).__name__ == "_H5FilteredChunks"}
        assert compressed == {name for name in plain if compress or plain[name].dtype.kind != "f"}  # gzip, or LZF for integers
        reads = [(cache.read(0, 70), np.arange(70)), (cache.read(5, 37), np.arange(5, 37)),
                 (cache.read_ranges(ranges), rows), (cache.read_ranges(ranges, {}, order), placed)]
        for (got, got_labels), want in reads:
            for name in targets:
                assert got[name].tobytes() == plain[name][want].tobytes(), name
            assert got_labels.tobytes() == plain["labels"][want].tobytes()
        for name, values in cache.read_records(3, 70).items():
            assert values.tobytes() == plain[name][3:70].tobytes() == records[name][3:70].tobytes(), name


def _put_hdf5_chunk(path, name, chunk, data, compression=None, cut=0, mask=0):
    """Store ``data`` (bytes) as chunk ``chunk`` of array ``name``: compressed as h5py compresses it
    (``cut`` bytes then cut off its stream), followed by a valid fletcher32, as h5py computes it."""
    with h5py.File(path, "r+") as f:
        stream = np.frombuffer(data, np.uint8)
        if compression:
            tmp = f.create_dataset("tmp", data=stream, chunks=(len(stream),), compression=compression)
            stored_mask, stored = tmp.id.read_direct_chunk((0,))
            assert stored_mask == 0
            stream = np.frombuffer(stored[:len(stored) - cut], np.uint8)
            del f["tmp"]
        tmp = f.create_dataset("tmp", data=stream, chunks=(len(stream),), fletcher32=True)
        stored = tmp.id.read_direct_chunk((0,))[1]
        del f["tmp"]
        array = f[name]
        array.id.write_direct_chunk((chunk * array.chunks[0], *[0] * (array.ndim - 1)), stored, mask)


@pytest.mark.parametrize("name, size, codec", [("labels", 128, "LZF"), ("logits", 288, "gzip")])
@pytest.mark.parametrize("damage, why", [
    ("longer", r"its {codec} stream does not decode to {size} bytes: it decodes to more than {size} bytes"),
    ("shorter", r"its {codec} stream does not decode to {size} bytes: it decodes to {half} bytes"),
    ("cut", r"its {codec} stream does not decode to {size} bytes: "),
    ("larger than any stream", r"its stored chunk has 2332 bytes and filter mask 0, not at most"),
    ("stored as it is, shorter", r"its {codec} stream does not decode to {size} bytes: it holds {half} bytes"),
    # labels: fletcher32 of the stored bytes; logits: the read-checksum table's CRC-32C of the decoded
    # rows, unless the decoder refuses the stream first
    ("flipped byte", r"(its fletcher32 does not match its bytes|its crc32c does not match its bytes|its gzip stream does not decode)"),
], ids=["longer", "shorter", "cut", "too large", "stored shorter", "flipped"])
def test_a_compressed_hdf5_chunk_that_does_not_decode_to_its_bytes_is_damaged(tmp_path, name, size, codec, damage, why,
                                                                              lzf_decoder):
    path = tmp_path / "c.h5"  # chunks of 16 rows: labels of 128 bytes (LZF), logits of 9 float16 (gzip)
    logits = np.random.default_rng(0).normal(size=(64, 9)).astype(np.float32)
    write_cache(path, logits, np.arange(64) % 9, chunk_rows=16, compress=True)
    compression = "lzf" if codec == "LZF" else "gzip"
    if damage == "flipped byte":
        flip_hdf5_byte(path, name, chunk=1, offset=3)
    elif damage == "larger than any stream":
        _put_hdf5_chunk(path, name, 1, np.random.default_rng(1).bytes(2328))
    elif damage.startswith("stored as it is"):
        _put_hdf5_chunk(path, name, 1, bytes(size // 2), mask=1)
    else:
        data = {"longer": bytes(2 * size), "shorter": bytes(size // 2), "cut": (np.arange(size) % 4).astype(np.uint8).tobytes()}[damage]
        _put_hdf5_chunk(path, name, 1, data, compression, cut=3 if damage == "cut" else 0)
    with open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read(32, 64)[1], np.arange(32, 64) % 9)  # the other chunks still read
        with pytest.raises(SoftlabelsError, match=rf"array '{name}' chunk 1 \(rows 16-31\) is damaged \("
                                                  + why.format(codec=codec, size=size, half=size // 2)):
            cache.read(0, 64)


def test_a_gzip_chunk_that_would_inflate_past_its_bytes_is_damaged_and_never_inflated_whole(tmp_path):
    # chunks of 1 MiB of logits: a 256 KB stream (zeros) that inflates to 256 MiB passes for one by its size
    path = tmp_path / "c.h5"
    write_cache(path, np.zeros((8192, 128), np.float32), np.zeros(8192, np.int64), chunk_rows=4096, compress=True)
    code, lines, intact = command_peak_mib("inspect", str(path))
    assert code == 0 and lines == []
    deflate = zlib.compressobj(9)
    bomb = b"".join(deflate.compress(bytes(64 << 20)) for _ in range(4)) + deflate.flush()
    with h5py.File(path, "r+") as f:
        tmp = f.create_dataset("tmp", data=np.frombuffer(bomb, np.uint8), chunks=(len(bomb),), fletcher32=True)
        stored = tmp.id.read_direct_chunk((0,))[1]
        del f["tmp"]
        f["logits"].id.write_direct_chunk((4096, 0), stored, 0)
    code, lines, bombed = command_peak_mib("inspect", str(path))
    assert code == 1 and lines == [f"error: {path}: array 'logits' chunk 1 (rows 4096-8191) is damaged (its gzip stream does not "
                                   "decode to 1048576 bytes: it decodes to more than 1048576 bytes, the stream unfinished); "
                                   "run softlabels verify for a full report"]
    assert bombed < intact + 64  # MiB: h5py's gzip filter took all 256


@pytest.mark.parametrize("name", ["logits", "labels"])
def test_an_hdf5_array_of_rows_without_fletcher32_is_refused_not_read_unchecked(tmp_path, name):
    path = tmp_path / "c.h5"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    _rewrite_hdf5(path, name)  # no checksum: a changed byte would be read as data
    with pytest.raises(SoftlabelsError, match=rf"c.h5: array '{name}' is stored without HDF5's fletcher32 checksum"):
        open_cache(path)


@pytest.mark.parametrize("damage, message", [
    ("rows", r"array 'chunk_crc32c' is uint32 \[3, 1\], not uint32 \[chunks, 1\]"),
    ("names", r"array 'chunk_crc32c': its attribute 'arrays' is not a list of distinct names of the cache's arrays"),
    ("byte", r"array 'chunk_crc32c' is damaged"),
])
def test_a_damaged_or_malformed_hdf5_read_checksum_table_is_refused_in_one_line(tmp_path, damage, message):
    path = tmp_path / "c.h5"
    write_cache(path, np.ones((64, 50), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16, dtype="float32")
    if damage == "rows":
        with h5py.File(path, "r") as f:
            values = f["chunk_crc32c"][:3]
        with h5py.File(path, "r+") as f:
            attrs = dict(f["chunk_crc32c"].attrs)
            del f["chunk_crc32c"]
            f.create_dataset("chunk_crc32c", data=values, fletcher32=True).attrs.update(attrs)
    elif damage == "names":
        with h5py.File(path, "r+") as f:
            f["chunk_crc32c"].attrs["arrays"] = "5"
    else:
        flip_hdf5_byte(path, "chunk_crc32c", chunk=0, offset=2)
    with pytest.raises(SoftlabelsError, match=message):
        open_cache(path)


def test_a_damaged_hdf5_chunk_fails_when_read(tmp_path):
    path = tmp_path / "c.h5"
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    write_cache(path, logits, np.zeros(64, dtype=np.int64), chunk_rows=16, dtype="float32")
    flip_hdf5_byte(path, "logits", chunk=1, offset=100)
    with open_cache(path) as cache:
        cache.read(32, 64)  # the other chunks still read
        # softlabels reads uncompressed HDF5 chunks raw and checks the CRC-32C the writer recorded
        with pytest.raises(SoftlabelsError, match=r"array 'logits' chunk 1 \(rows 16-31\) is damaged \(its crc32c"):
            cache.read(0, 64)
    with h5py.File(path, "r") as f, pytest.raises(OSError, match="(?i)fletcher32|checksum|filter"):
        f["logits"][16:32]


@pytest.mark.parametrize("edit, array", [
    (lambda meta: meta["chunk_key_encoding"]["configuration"].update(separator="."), "logits"),  # read as fill values
    (lambda meta: meta["codecs"].pop(), "logits"),  # no crc32c: read unchecked
    (lambda meta: meta["codecs"].insert(1, {"name": "gzip", "configuration": {"level": 1}}), "labels"),
], ids=["chunk-key separator", "no crc32c", "another codec"])
def test_array_metadata_other_than_softlabels_writes_is_refused_on_open(tmp_path, edit, array):
    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    meta_path = path / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SoftlabelsError, match=rf"array '{array}' is not stored as softlabels stores it"):
        open_cache(path)


@pytest.mark.parametrize("name", ["x.npz", "x.h5", "run/student/metrics.jsonl", "run/student/eval_predictions.npz"])
def test_a_pipe_in_place_of_a_dataset_or_run_file_is_refused_instead_of_blocking(tmp_path, name):
    import signal

    from softlabels import open_data
    from softlabels.runs import read_metrics, read_predictions

    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    read = {".npz": open_data, ".h5": open_data, ".jsonl": read_metrics}.get(path.suffix, open_data)
    if path.name == "eval_predictions.npz":
        read = read_predictions
    signal.alarm(20)  # a blocked open fails the test instead of hanging it
    try:
        with pytest.raises(SoftlabelsError, match="not a regular file"):
            read(str(path))
    finally:
        signal.alarm(0)


def test_a_link_to_a_pipe_in_the_commit_record_is_refused_and_a_dangling_link_is_a_missing_entry(tmp_path):
    import signal

    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    os.mkfifo(tmp_path / "pipe")
    (path / "chunk_crc32" / "c" / "2").unlink()
    (path / "chunk_crc32" / "c" / "2").symlink_to(tmp_path / "pipe")
    signal.alarm(20)  # a blocked open fails the test instead of hanging it
    try:
        with pytest.raises(SoftlabelsError, match=r"chunk_crc32/c/2 is not a metadata or chunk file of a cache \(not a regular file\)"):
            open_cache(path)
    finally:
        signal.alarm(0)
    (path / "chunk_crc32" / "c" / "2").unlink()
    (path / "chunk_crc32" / "c" / "2").symlink_to(tmp_path / "gone")
    with pytest.raises(SoftlabelsError, match=r"the commit record has no entry for 1 chunk"):
        open_cache(path).check_commit_record()


@pytest.mark.parametrize("name", ["c.zarr/zarr.json", "c.zarr/logits/zarr.json", "c.zarr/chunk_crc32/c/0", "c.h5"])
def test_a_pipe_in_place_of_a_cache_file_zarr_or_h5py_would_read_is_refused_instead_of_blocking(tmp_path, name):
    import signal

    for suffix in (".zarr", ".h5"):
        write_cache(tmp_path / f"c{suffix}", np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    path = tmp_path / name
    if path.is_dir() or path.is_file():
        os.remove(path)
    os.mkfifo(path)
    signal.alarm(20)  # a blocked open fails the test instead of hanging it
    try:
        with pytest.raises(SoftlabelsError, match="not a regular file"):
            open_cache(tmp_path / name.split("/")[0]).checksums()
    finally:
        signal.alarm(0)


def declare_rows(small, huge, rows, complete=True):
    """A copy of the cache at ``small`` whose manifest and arrays declare ``rows`` rows: a few KB
    on disk that describe terabytes."""
    if small.suffix == ".zarr":
        shutil.copytree(small, huge)
        group = json.loads((huge / "zarr.json").read_text())
        manifest = group["attributes"]["softlabels"]
        manifest["num_samples"] = manifest["dataset"]["num_samples"] = rows
        manifest["complete"] = complete
        (huge / "zarr.json").write_text(json.dumps(group))
        for meta in huge.glob("*/zarr.json"):
            array = json.loads(meta.read_text())
            array["shape"][0] = -(-rows // manifest["chunk_rows"]) if meta.parent.name == "chunk_crc32" else rows
            meta.write_text(json.dumps(array))
        return
    with h5py.File(small, "r") as source, h5py.File(huge, "w") as out:
        manifest = json.loads(source.attrs["softlabels"])
        manifest["num_samples"] = manifest["dataset"]["num_samples"] = rows
        manifest["complete"] = complete
        out.attrs["softlabels"] = json.dumps(manifest)
        for name, array in source.items():
            first = -(-rows // manifest["chunk_rows"]) if name.startswith("chunk_crc32") else rows
            out.create_dataset(name, shape=(first, *array.shape[1:]), dtype=array.dtype, chunks=array.chunks,
                               fletcher32=array.fletcher32, compression=array.compression, fillvalue=array.fillvalue)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_small_cache_declaring_billions_of_rows_is_refused_before_its_checksums_are_read(tmp_path, suffix):
    small, huge = tmp_path / f"small{suffix}", tmp_path / f"huge{suffix}"
    write_cache(small, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    declare_rows(small, huge, 2**36)
    # every reader would otherwise read the commit record and the read checksums whole: 32 GiB and more
    message = r"the cache is complete but its store holds [\d,]+ commit-record entries at most, for 4,294,967,296 chunks"
    for allow_incomplete in (False, True):
        with pytest.raises(SoftlabelsError, match=message):
            open_cache(huge, allow_incomplete=allow_incomplete)
    with pytest.raises(SoftlabelsError, match=message):
        verify_cache(huge)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_small_partial_cache_declaring_more_than_its_filesystem_holds_is_refused(tmp_path, suffix):
    small, huge = tmp_path / f"small{suffix}", tmp_path / f"huge{suffix}"
    write_cache(small, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    declare_rows(small, huge, 2**50, complete=False)  # a partial cache holds few entries by right: its size is the bound
    with pytest.raises(SoftlabelsError, match=r"the cache declares 1,125,899,906,842,624 samples of 10 bytes, more than its filesystem holds"):
        open_cache(huge, allow_incomplete=True)


def test_verify_reports_each_lost_commit_record_entry_of_a_small_cache(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((96, 5), dtype=np.float32), np.zeros(96, dtype=np.int64), chunk_rows=16)
    for chunk in range(4):  # most of the record
        (path / "chunk_crc32" / "c" / str(chunk)).unlink()
    problems = verify_cache(path).problems
    assert [p.split(" (")[0] for p in problems if "never written" in p] == [f"chunk {c}" for c in range(4)], problems


def test_a_commit_record_chunked_otherwise_than_its_writers_chunk_it_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    meta = path / "chunk_crc32" / "zarr.json"
    array = json.loads(meta.read_text())
    array["chunk_grid"]["configuration"]["chunk_shape"] = [2**28]  # one chunk read whole: 2 GiB of entries
    meta.write_text(json.dumps(array))
    with pytest.raises(SoftlabelsError, match=r"array 'chunk_crc32' \(the commit record\) is chunked \[268435456\], not in chunks of 1 to 4096"):
        open_cache(path)


def write_record_cache(path):
    """A cache with a record under a group (``views/offset``), as a view cache stores its parameters."""
    layout = Layout(Dense(), 64, 5, "float16", 16, records=(Record("views/offset", np.dtype(np.int32), (1,)),))
    with CacheWriter(path, layout, manifest=MANIFEST) as writer:
        for chunk in range(4):
            writer.write_chunks(chunk, {"logits": np.full((16, 5), chunk, np.float16)}, np.full(16, chunk, np.int64),
                                {"views/offset": np.full((16, 1), chunk, np.int32)})
        writer.finish()


@pytest.mark.parametrize("damage", ["pipe", "device"])
def test_a_pipe_or_device_as_a_nested_arrays_metadata_is_refused_instead_of_blocking(tmp_path, damage):
    import signal

    path = tmp_path / "c.zarr"
    write_record_cache(path)
    assert open_cache(path).read_records(0, 64)["views/offset"][17, 0] == 1
    meta = path / "views" / "offset" / "zarr.json"
    meta.unlink()
    if damage == "pipe":
        os.mkfifo(meta)
    else:
        meta.symlink_to("/dev/zero")
    signal.alarm(20)  # a blocked open fails the test instead of hanging it
    try:
        with pytest.raises(SoftlabelsError, match=r"views/offset/zarr.json is not a metadata or chunk file of a cache \(not a regular file\)"):
            open_cache(path)
    finally:
        signal.alarm(0)


def test_a_link_to_a_folder_inside_a_zarr_cache_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    shutil.move(path / "views", tmp_path / "elsewhere")
    (path / "views").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SoftlabelsError, match=r"c.zarr/views is a link to a folder, which no cache holds"):
        open_cache(path)


@pytest.mark.parametrize("how", ["external link", "soft link", "external storage", "virtual"])
def test_an_hdf5_cache_reaching_outside_its_own_chunks_is_refused(tmp_path, how):
    import signal

    path = tmp_path / "c.h5"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    os.mkfifo(tmp_path / "pipe")
    with h5py.File(path, "r+") as f:
        record = f["chunk_crc32"][:]
        del f["chunk_crc32"]
        if how == "external link":
            f["chunk_crc32"] = h5py.ExternalLink(str(tmp_path / "pipe"), "/x")
        elif how == "soft link":
            f.create_dataset("elsewhere", data=record, chunks=(4,))
            f["chunk_crc32"] = h5py.SoftLink("/elsewhere")
        elif how == "external storage":
            f.create_dataset("chunk_crc32", shape=record.shape, dtype=record.dtype,
                             external=[(str(tmp_path / "pipe"), 0, h5py.h5f.UNLIMITED)])
        else:
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other.create_dataset("x", data=record)
            layout = h5py.VirtualLayout(shape=record.shape, dtype=record.dtype)
            layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=record.shape)
            f.create_virtual_dataset("chunk_crc32", layout)
    expected = {"external link": r"'chunk_crc32' is a ExternalLink, which no cache holds",
                "soft link": r"'chunk_crc32' is a SoftLink, which no cache holds",
                "external storage": r"array 'chunk_crc32' is stored in external files, which no cache is",
                "virtual": r"array 'chunk_crc32' is stored virtual, which no cache is"}[how]
    signal.alarm(20)  # a blocked read fails the test instead of hanging it
    try:
        with pytest.raises(SoftlabelsError, match=expected):
            open_cache(path).checksums()
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("name, read_by, why", [("labels", "softlabels", "the file does not have it"),
                                                ("logits", "h5py", "its chunk file is missing")])
def test_an_hdf5_chunk_the_file_does_not_store_is_damage_not_fill_values(tmp_path, name, read_by, why):
    """Chunks never stored would read as the fill value (labels -1, 'unlabeled'; logits 0) with every
    checksum of the chunks that are stored passing. Logits are read through h5py in a file without
    the read-checksum table."""
    path = tmp_path / "c.h5"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    with h5py.File(path, "r+") as f:
        old = f[name]
        settings = dict(shape=old.shape, dtype=old.dtype, chunks=old.chunks, compression=old.compression,
                        fletcher32=old.fletcher32, fillvalue=old.fillvalue)
        kept = old[:16]
        del f[name]
        f.create_dataset(name, **settings)[:16] = kept  # chunk 0 stored again, 1..3 never
        if read_by == "h5py":
            del f["chunk_crc32c"]
    with open_cache(path) as cache:
        assert (cache.read(0, 16)[0]["logits"] == 1).all() and (cache.read(0, 16)[1] == 0).all()
        with pytest.raises(DamagedChunk, match=rf"array '{name}' chunk 1 \(rows 16-31\) is damaged \({why}\)"):
            cache.read(0, 64)


def test_a_folder_that_is_no_array_inside_a_zarr_cache_reads_without_a_warning(tmp_path):
    import warnings

    path = tmp_path / "c.zarr"
    write_cache(path, np.ones((64, 5), dtype=np.float32), np.zeros(64, dtype=np.int64), chunk_rows=16)
    (path / "notes").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_cache(path).read(0, 64)[0]["logits"].shape == (64, 5)


def test_compressed_hdf5_targets_are_checked_by_the_read_checksum_table_and_labels_by_fletcher32(tmp_path, monkeypatch):
    """The table's CRC-32C of the decoded rows runs at hardware speed; fletcher32, computed by numpy,
    is kept for what the table does not cover."""
    import softlabels.store as store

    path = tmp_path / "c.h5"
    logits = np.random.default_rng(0).normal(size=(64, 9)).astype(np.float32)
    write_cache(path, logits, np.arange(64) % 9, chunk_rows=16, compress=True)
    with h5py.File(path, "r") as f:
        plain = f["logits"][:], f["labels"][:]
    calls = []
    original = store._fletcher32
    monkeypatch.setattr(store, "_fletcher32", lambda data: calls.append(len(data)) or original(data))
    with open_cache(path) as cache:
        targets, labels = cache.read(0, 64)
    np.testing.assert_array_equal(targets["logits"], plain[0])
    np.testing.assert_array_equal(labels, plain[1])
    assert len(calls) == 4  # one per labels chunk; none for the logits


@pytest.mark.parametrize("array, name", [("logits", "logits/c/{}/0"), ("labels", "labels/c/{}"), ("views/offset", "views/offset/c/{}/0")])
def test_a_zarr_chunk_file_copied_over_another_chunks_fails_when_read(tmp_path, array, name):
    """Its own crc32c passes; the table of them by place (chunk_crc32c) does not."""
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    (path / name.format(1)).write_bytes((path / name.format(2)).read_bytes())
    with open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read(32, 64)[1], np.repeat([2, 3], 16))  # the other chunks still read
        with pytest.raises(DamagedChunk, match=rf"array '{array}' chunk 1 \(rows 16-31\) is damaged \(its chunk file is not the one "
                                               r"written for it \(its crc32c is not the one recorded in chunk_crc32c\)\)"):
            cache.read(0, 64) if array != "views/offset" else cache.read_records(0, 64)
        with pytest.raises(DamagedChunk):
            list(cache.iter_chunks()) if array != "views/offset" else cache.read_records(16, 32)
    assert zarr.open_group(str(path), mode="r")[array][16:32] is not None  # plain zarr: the file passes its own crc32c


def test_the_table_of_chunk_checksums_by_place_is_each_zarr_chunk_files_own_crc32c(tmp_path):
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    table = zarr.open_group(str(path), mode="r")["chunk_crc32c"]
    assert json.loads(table.attrs["arrays"]) == ["logits", "labels", "views/offset"] and table.dtype == np.uint32
    files = ["logits/c/{}/0", "labels/c/{}", "views/offset/c/{}/0"]
    expected = [[google_crc32c.value((path / f.format(chunk)).read_bytes()[:-4]) for f in files] for chunk in range(4)]
    np.testing.assert_array_equal(table[:], np.array(expected, dtype=np.uint32))


def test_a_zarr_cache_without_the_table_of_chunk_checksums_by_place_reads_as_before(tmp_path):
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    shutil.rmtree(path / "chunk_crc32c")
    (path / "logits/c/1/0").write_bytes((path / "logits/c/2/0").read_bytes())
    with open_cache(path) as cache:
        assert cache.read(0, 64)[0]["logits"].shape == (64, 5)  # only the commit record can tell (verify)
    assert any("checksum mismatch" in p for p in verify_cache(path).problems)


@pytest.mark.parametrize("damage, expected", [
    ("shape", r"array 'chunk_crc32c' is uint32 \[4, 2\], not uint32 \[chunks, 3\] for the arrays it covers"),
    ("names", r"array 'chunk_crc32c': its attribute 'arrays' is not a list of distinct names of the cache's arrays"),
    ("bytes", r"array 'chunk_crc32c' chunk 0 is damaged \(its crc32c does not match its bytes\)"),
])
def test_a_damaged_table_of_chunk_checksums_by_place_is_refused_in_one_line(tmp_path, damage, expected):
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    group = zarr.open_group(str(path), mode="r+")
    if damage == "shape":
        names = json.loads(group["chunk_crc32c"].attrs["arrays"])
        del group["chunk_crc32c"]
        group.create_array("chunk_crc32c", shape=(4, 2), chunks=(4, 2), dtype="uint32", fill_value=0,
                           compressors=[zarr.codecs.Crc32cCodec()]).attrs["arrays"] = json.dumps(names)
    elif damage == "names":
        group["chunk_crc32c"].attrs["arrays"] = json.dumps(["logits", "logits", "labels"])
    else:
        chunk = path / "chunk_crc32c" / "c" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[0] ^= 1
        chunk.write_bytes(bytes(data))
    with pytest.raises(SoftlabelsError, match=expected):  # at the open, which makes the readers
        open_cache(path)


def test_a_dump_killed_in_its_finish_after_the_table_of_chunk_checksums_finishes_when_resumed(tmp_path):
    path = tmp_path / "c.zarr"
    layout = Layout(Dense(), 64, 5, "float16", 16)
    with CacheWriter(path, layout, manifest=MANIFEST) as writer:
        for chunk in range(4):
            writer.write_chunks(chunk, {"logits": np.full((16, 5), chunk, np.float16)}, np.full(16, chunk, np.int64))
        writer._backend.finish_read_checksums(layout)  # then killed: the cache was never published
    assert (tmp_path / "c.zarr.partial" / "chunk_crc32c").is_dir() and not path.exists()
    writer = CacheWriter.resume(path)
    writer.finish()
    with open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read(0, 64)[1], np.repeat(np.arange(4), 16))


def test_a_table_of_chunk_checksums_naming_no_array_of_the_cache_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    group = zarr.open_group(str(path), mode="r+")
    del group["chunk_crc32c"]
    group.create_array("chunk_crc32c", shape=(2**40, 1), chunks=(4096, 1), dtype="uint32", fill_value=0,
                       compressors=[zarr.codecs.Crc32cCodec()]).attrs["arrays"] = json.dumps(["nothing"])
    with pytest.raises(SoftlabelsError, match=r"its attribute 'arrays' is not a list of distinct names of the cache's arrays"):
        open_cache(path)


@pytest.mark.parametrize("name", [".zgroup", ".zattrs", ".zmetadata"])
def test_a_pipe_where_zarr_v2_keeps_its_metadata_does_not_block_the_reader(tmp_path, name):
    import signal

    path = tmp_path / "c.zarr"
    write_record_cache(path)
    os.mkfifo(path / name)
    signal.alarm(20)  # a blocked open fails the test instead of hanging it
    try:
        with open_cache(path) as cache:
            np.testing.assert_array_equal(cache.read(0, 64)[1], np.repeat(np.arange(4), 16))
    finally:
        signal.alarm(0)


def test_an_arrays_chunk_folder_may_be_a_link(tmp_path):
    """Chunks kept on another disk: softlabels alone reads a chunk folder, each file checked as it is opened."""
    path = tmp_path / "c.zarr"
    write_record_cache(path)
    shutil.move(path / "logits" / "c", tmp_path / "elsewhere")
    (path / "logits" / "c").symlink_to(tmp_path / "elsewhere")
    with open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read(0, 64)[0]["logits"][:, 0], np.repeat(np.arange(4), 16))
