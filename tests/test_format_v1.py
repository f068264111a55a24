"""Version-1 caches (checked in under fixtures/v1, written by softlabels 0.1.0 before format 2) keep
working: they open, train, verify and inspect, and `convert --upgrade` rewrites them as version 2."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
import zstandard
from click.testing import CliRunner

from softlabels import SoftlabelsError, open_cache
from softlabels.cli import cli

from .conftest import command_peak_mib

V1 = Path(__file__).resolve().parent / "fixtures" / "v1"
CACHES = ["dense-v1.zarr", "topk-v1.h5", "sampled-v1.zarr"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def v1(tmp_path):
    shutil.copytree(V1, tmp_path / "v1")
    return tmp_path / "v1"


@pytest.mark.parametrize("name", CACHES)
def test_a_version_1_cache_opens_verifies_and_inspects(v1, name):
    with open_cache(v1 / name) as cache:
        assert cache.manifest["format_version"] == 1 and cache.items == () and len(cache) == 96
        targets, labels = cache.read(0, 96)
        assert labels.shape == (96,) and all(a.shape[0] == 96 for a in targets.values())
        np.testing.assert_array_equal(labels, np.load(v1 / "data.npz")["y"])
    verified = run("verify", v1 / name, "--recompute", 32, "--teacher", v1 / "teacher.pth", "--data", v1 / "data.npz")
    assert verified.exit_code == 0 and "3 chunks checked, 32 rows recomputed (max |difference| 0)" in verified.output, verified.output
    inspected = run("inspect", v1 / name)
    assert inspected.exit_code == 0 and "softlabels-cache v1" in inspected.output and "96 samples x 5 classes" in inspected.output


@pytest.mark.parametrize("name", CACHES)
def test_a_version_1_cache_trains_students(v1, tmp_path, name):
    out = tmp_path / "run"
    result = run("train-student", "--cache", v1 / name, "--data", v1 / "data.npz", "--student", "linear", "--epochs", 2,
                 "--temperature", 4, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())[0]["student"] == "linear"


@pytest.mark.parametrize("name", CACHES)
def test_upgrade_rewrites_a_version_1_cache_as_version_2_with_the_same_bytes(v1, tmp_path, name):
    new = tmp_path / name.replace("-v1", "-v2")
    result = run("convert", v1 / name, new, "--upgrade", "--quiet")
    assert result.exit_code == 0 and "format v2" in result.output, result.output
    with open_cache(v1 / name) as old_cache, open_cache(new) as new_cache:
        assert new_cache.manifest["format_version"] == 2 and new_cache.manifest["item_axes"] == []
        assert new_cache.kind == old_cache.kind
        assert new_cache.manifest["teacher"] == old_cache.manifest["teacher"]
        assert new_cache.manifest["converted_from"]["format_version"] == 1
        old, new_targets = old_cache.read(0, 96), new_cache.read(0, 96)
        for key in old[0]:
            assert old[0][key].tobytes() == new_targets[0][key].tobytes()
        np.testing.assert_array_equal(old_cache.checksums(), new_cache.checksums())
    verified = run("verify", new)
    assert verified.exit_code == 0 and verified.output.strip() == f"ok: {new}: 3 chunks checked", verified.output
    if name.endswith(".zarr"):  # version 2 carries the store's own chunk checksum
        codecs = json.loads((new / "labels" / "zarr.json").read_text())["codecs"]
        assert any(codec["name"] == "crc32c" for codec in codecs)


def test_upgrade_needs_one_mode_and_refuses_to_overwrite(v1, tmp_path):
    nothing = run("convert", v1 / "dense-v1.zarr", tmp_path / "x.zarr")
    assert nothing.exit_code == 2 and "give --top-k K, --sample S, --keep-views V or --upgrade" in nothing.output
    both = run("convert", v1 / "dense-v1.zarr", tmp_path / "x.zarr", "--upgrade", "--top-k", 2)
    assert both.exit_code == 2 and "--upgrade rewrites a cache as it is: give it alone" in both.output
    assert not (tmp_path / "x.zarr").exists()
    upgraded = run("convert", v1 / "dense-v1.zarr", tmp_path / "x.zarr", "--upgrade", "--quiet")
    assert upgraded.exit_code == 0 and "dense cache, format v2" in upgraded.output, upgraded.output
    again = run("convert", v1 / "dense-v1.zarr", tmp_path / "x.zarr", "--upgrade", "--quiet")
    assert again.exit_code == 1 and "already exists" in again.output
    zarr.open_group(str(tmp_path / "x.zarr"), mode="r")  # untouched and readable


def _arrays(path):
    """Every array of a cache as plain zarr or h5py reads it."""
    if path.suffix == ".zarr":
        return {name: array[:] for name, array in zarr.open_group(str(path), mode="r").arrays()}
    with h5py.File(path, "r") as f:
        return {name: array[:] for name, array in f.items()}


@pytest.mark.parametrize("name", CACHES)
def test_a_version_1_cache_read_directly_gives_the_bytes_zarr_and_h5py_read_and_a_chunk_never_stored_its_fill(v1, name):
    if name.endswith(".zarr"):  # version 1 stored no chunk equal to the fill value: zarr reads the fill value
        (v1 / name / "labels" / "c" / "1").unlink()
    plain = _arrays(v1 / name)
    with open_cache(v1 / name) as cache:
        readers = cache._arrays._raw  # every array read directly, none through zarr; in HDF5 the compressed ones
        assert set(readers) == set(plain) - {"chunk_crc32"}
        assert all(readers.values()) if name.endswith(".zarr") else readers["labels"] and readers["topk_indices"]
        for ranges in ([(0, 96)], [(64, 96), (0, 32)], [(17, 70)]):
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            targets, labels = cache.read_ranges(ranges) if len(ranges) > 1 else cache.read(*ranges[0])
            for key, values in targets.items():
                assert values.tobytes() == plain[key][rows].tobytes(), key
            assert labels.tobytes() == plain["labels"][rows].tobytes()
        assert cache.labels().tobytes() == plain["labels"].tobytes()
        assert cache.checksums().tobytes() == plain["chunk_crc32"].tobytes()
    if name.endswith(".zarr"):
        assert (plain["labels"][32:64] == -1).all()


@pytest.mark.parametrize("name, array, edit", [
    ("dense-v1.zarr", "logits", lambda codecs: codecs + [{"name": "gzip", "configuration": {"level": 1}}] * 2),
    ("dense-v1.zarr", "labels", lambda codecs: codecs[:1] + [{"name": "gzip", "configuration": {"level": 1}}]),
    ("sampled-v1.zarr", "sample_indices", lambda codecs: codecs + [{"name": "crc32c"}]),
    ("dense-v1.zarr", "chunk_crc32", lambda codecs: codecs + [{"name": "zstd", "configuration": {"level": 0, "checksum": False}}] * 2),
    ("topk-v1.h5", "labels", {"compression": "gzip", "shuffle": True}),
    ("topk-v1.h5", "chunk_crc32", {"compression": "gzip"}),
], ids=["gzip gzip", "gzip labels", "crc32c", "zstd zstd commit record", "hdf5 shuffle", "hdf5 gzip commit record"])
def test_a_version_1_array_stored_through_codecs_version_1_never_wrote_is_refused_on_open(v1, name, array, edit):
    # zarr and h5py would decode whatever chain an array names, with no bound on what it makes
    path = v1 / name
    if name.endswith(".zarr"):
        meta = json.loads((path / array / "zarr.json").read_text())
        meta["codecs"] = edit(meta["codecs"])
        (path / array / "zarr.json").write_text(json.dumps(meta))
        message = rf"array '{array}' is not stored as softlabels stores it \(codecs bytes, optionally zstd;"
    else:
        with h5py.File(path, "r+") as f:
            values, chunks = f[array][:], f[array].chunks
            del f[array]
            f.create_dataset(array, data=values, chunks=chunks, **edit)
        message = rf"array '{array}' is stored through HDF5 filters \[[0-9, ]+\], not the pipelines softlabels writes"
    with pytest.raises(SoftlabelsError, match=message):
        open_cache(path)


def test_a_version_1_zstd_chunk_that_would_decode_past_its_size_is_damaged_and_never_decoded_whole(v1):
    path = v1 / "dense-v1.zarr"
    code, lines, intact = command_peak_mib("inspect", str(path))
    assert code == 0 and lines == []
    # a frame that does not declare its size (so zstd cannot refuse it up front) of 256 MiB of zeros
    writer = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    frame = b"".join(writer.compress(bytes(64 << 20)) for _ in range(4)) + writer.flush()
    (path / "labels" / "c" / "1").write_bytes(frame)
    code, lines, bombed = command_peak_mib("inspect", str(path))
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path}: array 'labels' chunk 1 (rows 32-63) is damaged (")
    assert bombed < intact + 64  # MiB: zarr's zstd decoded all 256
    (path / "labels" / "c" / "1").write_bytes(frame[:1000])  # short enough to pass for a frame of the chunk
    with open_cache(path) as cache:
        for read in (lambda: cache.read(0, 96), cache.labels):
            with pytest.raises(SoftlabelsError, match=r"array 'labels' chunk 1 \(rows 32-63\) is damaged "
                                                      r"\(its zstd frame declares None bytes, not 256\)"):
                read()
