"""Version-1 caches (checked in under fixtures/v1, written by softlabels 0.1.0 before format 2) keep
working: they open, train, verify and inspect, and `convert --upgrade` rewrites them as version 2."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from softlabels import open_cache
from softlabels.cli import cli

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
