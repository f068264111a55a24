"""Cache round trips through CacheWriter/open_cache and through plain zarr and h5py."""

import json

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels import CacheWriter, SoftlabelsError, open_cache
from softlabels.store import chunk_checksum, default_chunk_rows

MANIFEST = {"teacher": {"file": "t.pth"}, "dataset": {"spec": "x.npz", "fingerprint": "sha256:0"}}


def write_cache(path, logits, labels, chunk_rows, dtype="float16"):
    with CacheWriter(
        path, num_samples=len(logits), num_classes=logits.shape[1], chunk_rows=chunk_rows, dtype=dtype, manifest=MANIFEST
    ) as writer:
        for index in range(writer.num_chunks):
            start, stop = writer.chunk_bounds(index)
            writer.write_chunk(index, logits[start:stop], labels[start:stop])
        writer.finish()


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
        got_logits, got_labels = cache.read(0, n)
        np.testing.assert_array_equal(got_logits, logits.astype(dtype))
        np.testing.assert_array_equal(got_labels, labels)
        rows = np.concatenate([chunk[1] for chunk in cache.iter_chunks()])
        np.testing.assert_array_equal(rows, logits.astype(dtype))
        expected_crc = [
            chunk_checksum(logits[s:s + cache.chunk_rows].astype(dtype), labels[s:s + cache.chunk_rows])
            for s in range(0, n, cache.chunk_rows)
        ]
        np.testing.assert_array_equal(cache.checksums(), expected_crc)
    assert not path.with_name(path.name + ".partial").exists()


def test_plain_zarr_reads_a_row_and_the_manifest(tmp_path):
    logits = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    labels = np.arange(50) % 4
    write_cache(tmp_path / "c.zarr", logits, labels, chunk_rows=16)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    manifest = group.attrs["softlabels"]
    assert manifest["format"] == "softlabels-cache" and manifest["format_version"] == 1
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


def test_incomplete_cache_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter(path, num_samples=20, num_classes=3, chunk_rows=8, dtype="float16", manifest=MANIFEST)
    writer.write_chunk(0, np.zeros((8, 3)), np.zeros(8, dtype=np.int64))
    writer.close()
    assert not path.exists()
    with pytest.raises(SoftlabelsError, match="incomplete"):
        open_cache(str(path) + ".partial")
    assert open_cache(str(path) + ".partial", allow_incomplete=True).manifest["complete"] is False


def test_finish_refuses_missing_chunks(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, num_samples=20, num_classes=3, chunk_rows=8, dtype="float16", manifest=MANIFEST) as writer:
        writer.write_chunk(0, np.zeros((8, 3)), np.zeros(8, dtype=np.int64))
        with pytest.raises(RuntimeError, match="chunk 1"):
            writer.finish()
    assert not path.exists()


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "format_version": 2}
    with pytest.raises(SoftlabelsError, match="newer"):
        open_cache(path)


def test_manifest_that_disagrees_with_arrays_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    write_cache(path, np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64), chunk_rows=4)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "num_classes": 3}
    with pytest.raises(SoftlabelsError, match="shape"):
        open_cache(path)


def test_not_a_cache_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(SoftlabelsError, match="not a softlabels cache"):
        open_cache(tmp_path / "other.zarr")
    with pytest.raises(SoftlabelsError, match="must end in"):
        open_cache(tmp_path / "cache.txt")


@pytest.mark.parametrize("classes,dtype,rows", [(10, "float16", 4096), (1000, "float16", 256), (1000, "float32", 128), (50000, "float16", 16)])
def test_default_chunks_hold_about_half_a_mebibyte(classes, dtype, rows):
    assert default_chunk_rows(classes, dtype) == rows
