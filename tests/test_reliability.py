"""Crash safety, resumption, locking, verification and refusal of untrustworthy caches."""

import errno
import re
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels import SoftlabelsError, dump, load_model, open_cache, open_data
from softlabels.cli import cli
from softlabels.store import CacheWriter, chunk_checksum
from softlabels.verify import verify_cache

from .conftest import committed, dump_args, flip_hdf5_byte, make_npz, reseal_zarr, run_dump

def kill_after(root, out, chunks: int) -> None:
    """Start a dump and SIGKILL it once ``chunks`` chunks are committed (0: as soon as it runs)."""
    proc = subprocess.Popen(dump_args(root, out), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = Path(str(out) + ".partial")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if chunks == 0 or committed(partial) >= chunks:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted((path / "logits").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_identical_bytes(slow_setup):
    root = slow_setup
    reference = root / "reference.zarr"
    assert run_dump(root, reference).returncode == 0
    expected = zarr.open_group(str(reference), mode="r")["logits"][:]
    for chunks in (0, 1, 7, 14):  # commits come in small groups (dump._WRITE_GROUP), so not every count is seen
        out = root / f"killed{chunks}.zarr"
        kill_after(root, out, chunks)
        assert not out.exists(), "a killed dump must never leave a cache at PATH"
        if Path(str(out) + ".partial").exists():
            plain = run_dump(root, out)
            assert plain.returncode == 1 and "holds an interrupted dump: pass --resume" in plain.stderr
        resumed = run_dump(root, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        got = zarr.open_group(str(out), mode="r")["logits"][:]
        assert got.tobytes() == expected.tobytes()
        assert chunk_files(out) == chunk_files(reference)
        assert open_cache(out).manifest["complete"] is True


@pytest.mark.slow
def test_resume_refuses_other_options_and_says_what_differs(slow_setup):
    root = slow_setup
    out = root / "c.zarr"
    kill_after(root, out, 3)
    args = dump_args(root, out, "--resume")
    args[args.index("--batch-size") + 1] = "64"
    done = subprocess.run(args, cwd=root, capture_output=True, text=True)
    assert done.returncode == 1
    assert "batch size was 50, now 64" in done.stderr
    other = make_npz(root / "other.npz", n=2000, features=12, classes=5, seed=9)
    args = dump_args(root, out, "--resume")
    args[args.index(str(root / "data.npz"))] = str(other)
    done = subprocess.run(args, cwd=root, capture_output=True, text=True)
    assert done.returncode == 1 and "dataset fingerprint was" in done.stderr


@pytest.mark.slow
def test_hdf5_killed_dump_resumes_or_restarts_to_the_same_values(slow_setup):
    root = slow_setup
    reference = root / "reference.h5"
    assert run_dump(root, reference).returncode == 0
    for chunks in (2, 12):
        out = root / f"killed{chunks}.h5"
        kill_after(root, out, chunks)
        assert not out.exists()
        resumed = run_dump(root, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        with h5py.File(out, "r") as f, h5py.File(reference, "r") as g:
            assert f["logits"][:].tobytes() == g["logits"][:].tobytes()
    out = root / "garbage.h5"
    Path(str(out) + ".partial").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    resumed = run_dump(root, out, "--resume")
    assert resumed.returncode == 0 and "unreadable" in resumed.stderr and "starting again" in resumed.stderr


@pytest.mark.slow
def test_second_dump_to_the_same_path_is_refused_and_a_killed_lock_is_not_stuck(slow_setup):
    root = slow_setup
    out = root / "c.zarr"
    slower = {**os.environ, "SLOW_DELAY": "0.5"}
    first = subprocess.Popen(dump_args(root, out), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=slower)
    while committed(Path(str(out) + ".partial")) < 1:
        time.sleep(0.01)
    second = run_dump(root, out)
    assert second.returncode == 1 and "another dump is writing" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = run_dump(root, out, "--resume")
    assert resumed.returncode == 0 and "chunks kept from the interrupted dump" in resumed.stdout, resumed.stderr
    assert open_cache(out).manifest["complete"] and not Path(str(out) + ".lock").exists()


def test_out_of_disk_space_keeps_a_resumable_partial(tmp_path, npz_data, linear_teacher, monkeypatch):
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    source = open_data(str(npz_data))
    dump(teacher, source, tmp_path / "ref.zarr", batch_size=32, chunk_rows=40, progress=False)
    original = CacheWriter.write_chunks

    def full_disk(self, first, targets, labels, records):
        """The disk fills up after the first three chunks."""
        fits = max(0, min(len(labels), (3 - first) * self.chunk_rows))
        if fits:
            original(self, first, {k: v[:fits] for k, v in targets.items()}, labels[:fits], records)
        if fits < len(labels):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheWriter, "write_chunks", full_disk)
    out = tmp_path / "c.zarr"
    with pytest.raises(SoftlabelsError, match="no space left on device.*--resume"):
        dump(teacher, source, out, batch_size=32, chunk_rows=40, progress=False)
    assert not out.exists()
    monkeypatch.setattr(CacheWriter, "write_chunks", original)
    result = dump(teacher, source, out, batch_size=32, chunk_rows=40, progress=False, resume=True)
    assert result.resumed_chunks == 3
    ref, got = open_cache(tmp_path / "ref.zarr"), open_cache(out)
    assert got.read(0, 300)[0]["logits"].tobytes() == ref.read(0, 300)[0]["logits"].tobytes()
    assert got.manifest["teacher_accuracy"] == ref.manifest["teacher_accuracy"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_data_that_fails_to_read_is_named_and_an_interrupted_overwrite_resumes_over_the_old_cache(
        tmp_path, npz_data, linear_teacher, monkeypatch, suffix):
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    source = open_data(str(npz_data))
    out = tmp_path / f"c{suffix}"
    dump(teacher, source, out, batch_size=32, chunk_rows=40, progress=False)
    old = {p: p.read_bytes() for p in sorted([out, *out.rglob("*")]) if p.is_file()}
    reference = open_cache(out).read(0, 300)[0]["logits"].tobytes()
    read = type(source).read

    def failing(self, start, stop):
        if start >= 160:
            raise OSError("transient read error")
        return read(self, start, stop)

    monkeypatch.setattr(type(source), "read", failing)
    with pytest.raises(SoftlabelsError, match=rf"^cannot read samples 160..191 of {re.escape(str(npz_data))}: OSError: "
                                              "transient read error$"):
        dump(teacher, source, out, batch_size=32, chunk_rows=40, progress=False, overwrite=True)
    assert {p: p.read_bytes() for p in sorted([out, *out.rglob("*")]) if p.is_file()} == old  # replaced only when done
    monkeypatch.setattr(type(source), "read", read)
    result = dump(teacher, source, out, batch_size=32, chunk_rows=40, progress=False, resume=True)
    assert result.resumed_chunks == 4 and not Path(f"{out}.partial").exists()
    with open_cache(out) as cache:
        assert cache.manifest["complete"] and cache.read(0, 300)[0]["logits"].tobytes() == reference


def test_nonfinite_teacher_output_stops_at_the_first_bad_sample(tmp_path, linear_teacher):
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    x[123, 4] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    args = ["dump", "--teacher", str(linear_teacher), "--arch", "linear", "--data", str(tmp_path / "nan.npz")]
    result = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "c.zarr")])
    assert result.exit_code == 1 and "NaN or Inf at sample 123" in result.output
    assert not (tmp_path / "c.zarr").exists()
    result = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "d.zarr"), "--allow-nonfinite"])
    assert result.exit_code == 0
    assert np.isnan(open_cache(tmp_path / "d.zarr").read(123, 124)[0]["logits"]).all()


def test_teacher_output_of_the_wrong_shape_is_refused_before_any_write(slow_setup):
    root = slow_setup
    torch.manual_seed(0)
    torch.save({"fc.weight": torch.zeros(5, 12), "fc.bias": torch.zeros(5)}, root / "flat.pth")
    args = dump_args(root, root / "c.zarr")
    args[args.index("slowzoo:Slow")] = "slowzoo:Flat"
    args[args.index(str(root / "slow.pth"))] = str(root / "flat.pth")
    done = subprocess.run(args, cwd=root, capture_output=True, text=True)
    assert done.returncode == 1 and "must output [batch, ..., classes]" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "c.zarr").exists() and not (root / "c.zarr.partial").exists()


@pytest.fixture
def cache_and_teacher(tmp_path, npz_data, linear_teacher):
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    out = tmp_path / "c.zarr"
    dump(teacher, open_data(str(npz_data)), out, chunk_rows=50, progress=False)
    return out, linear_teacher


def verify(*args):
    return CliRunner().invoke(cli, ["verify", *[str(a) for a in args]])


def test_verify_passes_an_intact_cache_and_recomputes_rows(cache_and_teacher):
    out, teacher = cache_and_teacher
    result = verify(out, "--recompute", 40, "--teacher", teacher, "--arch", "linear")
    assert result.exit_code == 0, result.output
    # whole dump batches (of 256 rows here) are rerun, at least the 40 rows asked for
    recomputed = re.search(r"ok: .*: 6 chunks checked, (\d+) rows recomputed \(max \|difference\| ([\d.e-]+)\)", result.output)
    assert recomputed and int(recomputed[1]) >= 40 and float(recomputed[2]) == 0.0, result.output
    # 300 rows: batches of 256 and 44, either drawn first; at least the rows asked for, whichever it is
    teacher = load_model(teacher, arch="linear", input_shape=(12,))
    assert sorted({verify_cache(out, recompute=100, teacher=teacher, seed=seed).rows_recomputed for seed in range(6)}) == [256, 300]


def test_verify_catches_flipped_truncated_and_missing_chunks(cache_and_teacher):
    out, _ = cache_and_teacher
    flipped, truncated, missing = out / "logits/c/1/0", out / "logits/c/3/0", out / "labels/c/5"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    missing.unlink()
    result = verify(out)
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 3
    assert bad[0].startswith("bad: chunk 1 (rows 50-99):")
    assert bad[1].startswith("bad: chunk 3 (rows 150-199):")
    assert bad[0] == "bad: chunk 1 (rows 50-99): array 'logits' is damaged (its crc32c does not match its bytes)"
    assert bad[1].startswith("bad: chunk 3 (rows 150-199): array 'logits' is damaged (its chunk file has ")
    assert bad[2] == "bad: chunk 5 (rows 250-299): array 'labels' is damaged (its chunk file is missing)"
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_verify_reports_a_damaged_commit_record_and_still_checks_every_chunk(cache_and_teacher):
    out, _ = cache_and_teacher
    record, flipped = out / "chunk_crc32/c/2", out / "logits/c/4/0"
    for path in (record, flipped):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    result = verify(out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    bad = [line for line in result.output.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 2
    assert bad[0].startswith("bad: ") and "array 'chunk_crc32' (the commit record) is damaged" in bad[0]
    assert bad[1] == "bad: chunk 4 (rows 200-249): array 'logits' is damaged (its crc32c does not match its bytes)"


def test_verify_catches_a_flipped_byte_in_hdf5(tmp_path, npz_data, linear_teacher):
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    out = tmp_path / "c.h5"
    dump(teacher, open_data(str(npz_data)), out, chunk_rows=50, progress=False)
    flip_hdf5_byte(out, "logits", chunk=2, offset=10, mask=0x40)
    result = verify(out)
    # the chunk fails the CRC-32C recorded for it before softlabels' CRC-32 gets to compare it
    assert result.exit_code == 1 and "bad: chunk 2 (rows 100-149): array 'logits' is damaged (its crc32c" in result.output


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_training_and_evaluation_stop_at_a_damaged_chunk_naming_it(tmp_path, npz_data, linear_teacher, suffix):
    teacher = load_model(linear_teacher, arch="linear", input_shape=(12,))
    out = tmp_path / f"c{suffix}"
    dump(teacher, open_data(str(npz_data)), out, chunk_rows=50, progress=False)
    if suffix == ".zarr":
        chunk = out / "logits/c/4/0"
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0x01
        chunk.write_bytes(bytes(data))
    else:
        flip_hdf5_byte(out, "logits", chunk=4, offset=100, mask=0x01)
    expected = "array 'logits' chunk 4 (rows 200-249) is damaged (its crc32c does not match its bytes)"
    assert expected in user_error("train-student", "--cache", out, "--student", "mlp", "--epochs", 1, "--out", tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()
    assert expected in user_error("evaluate", "--model", linear_teacher, "--arch", "linear", "--cache", out)


def test_a_complete_cache_whose_commit_record_lost_an_entry_is_refused_by_training_and_evaluation(cache_and_teacher, tmp_path):
    out, teacher = cache_and_teacher
    (out / "chunk_crc32/c/2").unlink()
    expected = "array 'chunk_crc32' chunk 2 (rows 100-149) is damaged (the cache is complete but the commit record has no entry for 1 chunk(s))"
    assert expected in user_error("train-student", "--cache", out, "--student", "mlp", "--epochs", 1, "--out", tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()
    assert expected in user_error("evaluate", "--model", teacher, "--arch", "linear", "--cache", out)


def test_verify_recompute_catches_logits_rewritten_with_valid_checksums(cache_and_teacher, tmp_path):
    out, teacher = cache_and_teacher
    group = zarr.open_group(str(out), mode="r+")
    logits = group["logits"][:]
    logits[:, 0] += 3.0
    group["logits"][:] = logits
    labels = group["labels"][:]
    group["chunk_crc32"][:] = [chunk_checksum({"logits": logits[s:s + 50]}, labels[s:s + 50]) for s in range(0, 300, 50)]
    reseal_zarr(out)
    assert verify(out).exit_code == 0  # the bytes match their checksums...
    result = verify(out, "--recompute", 20, "--teacher", teacher, "--arch", "linear")
    assert result.exit_code == 1 and "cached logits differ from the teacher's" in result.output  # ...the teacher does not
    other = tmp_path / "other.pth"
    torch.save({"1.weight": torch.zeros(5, 12), "1.bias": torch.zeros(5)}, other)
    result = verify(out, "--recompute", 20, "--teacher", other, "--arch", "linear")
    assert result.exit_code == 1 and "is not the teacher this cache was dumped with" in result.output


def user_error(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_readers_refuse_untrustworthy_caches(cache_and_teacher, tmp_path):
    out, teacher = cache_and_teacher
    group = zarr.open_group(str(out), mode="r+")
    manifest = dict(group.attrs["softlabels"])
    group.attrs["softlabels"] = {**manifest, "complete": False}
    assert "incomplete" in user_error("train-student", "--cache", out, "--student", "mlp", "--out", tmp_path / "r")
    group.attrs["softlabels"] = {**manifest, "format_version": 7}
    assert "format version 7, newer" in user_error("evaluate", "--model", teacher, "--arch", "linear", "--cache", out)
    group.attrs["softlabels"] = {**manifest, "num_samples": 301}
    assert "has shape [300, 5] but the manifest says [301, 5]" in user_error("train-student", "--cache", out, "--student", "mlp", "--out", tmp_path / "r")
    group.attrs["softlabels"] = manifest
    assert "--eval-data inputs have shape [40]" in user_error(
        "train-student", "--cache", out, "--student", "mlp", "--eval-data", "mnist1d://test", "--out", tmp_path / "r"
    )


VALID = {
    "format": "softlabels-cache", "format_version": 1, "kind": "dense", "num_samples": 300, "num_classes": 5,
    "dtype": "float16", "chunk_rows": 50, "complete": True, "teacher": {"sha256": "0"}, "dataset": {"spec": "x.npz"},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutation=st.one_of(
        st.tuples(st.just("replace"), st.sampled_from(sorted(VALID)), json_values),
        st.tuples(st.just("delete"), st.sampled_from(sorted(VALID)), st.none()),
        st.tuples(st.just("whole"), st.none(), json_values),
    )
)
def test_mutated_manifests_get_a_clean_error_never_a_crash(cache_and_teacher, mutation):
    out, _ = cache_and_teacher
    kind, key, value = mutation
    manifest = dict(VALID)
    if kind == "replace":
        manifest[key] = value
    elif kind == "delete":
        del manifest[key]
    else:
        manifest = value
    zarr.open_group(str(out), mode="r+").attrs["softlabels"] = manifest
    try:
        with open_cache(out) as cache:
            assert cache.manifest == manifest
    except SoftlabelsError as exc:
        assert str(exc) and "\n" not in str(exc)
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code in (0, 1) and "Traceback" not in result.output
    if result.exit_code == 1:
        assert result.output.startswith("error: ") or "INCOMPLETE" in result.output


def test_convert_refuses_chunk_files_moved_since_the_dump(cache_and_teacher, tmp_path):
    cache = cache_and_teacher[0]
    chunks = cache / "logits" / "c"
    first, second = (chunks / "1" / "0").read_bytes(), (chunks / "2" / "0").read_bytes()
    (chunks / "1" / "0").write_bytes(second)  # each keeps a valid crc32c of its own bytes
    (chunks / "2" / "0").write_bytes(first)
    result = CliRunner().invoke(cli, ["convert", str(cache), str(tmp_path / "out.zarr"), "--top-k", "2", "--quiet"])
    assert result.exit_code == 1 and result.output.strip() == (  # caught as it is read, against chunk_crc32c
        f"error: {cache}: array 'logits' chunk 1 (rows 50-99) is damaged (its chunk file is not the one written for it "
        "(its crc32c is not the one recorded in chunk_crc32c)); run softlabels verify for a full report")
    shutil.rmtree(cache / "chunk_crc32c")  # a cache written before it: the commit record still catches it
    result = CliRunner().invoke(cli, ["convert", str(cache), str(tmp_path / "out.zarr"), "--top-k", "2", "--quiet"])
    assert result.exit_code == 1 and result.output.strip() == (
        f"error: {cache}: chunk 1 does not match its commit record; run softlabels verify {cache}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []  # nor its partial cache


def test_convert_refuses_to_write_over_or_into_its_source(cache_and_teacher):
    cache = cache_and_teacher[0]
    before = sorted((p.relative_to(cache), p.read_bytes()) for p in cache.rglob("*") if p.is_file())
    for dst, where in ((cache, "the source cache"), (Path(f"{cache}/"), "the source cache"), (cache / "x.zarr", "inside the source cache")):
        assert user_error("convert", cache, dst, "--top-k", 2, "--overwrite") == (
            f"error: {dst} is {where} {cache}: write the converted cache to another path\n")
    assert sorted((p.relative_to(cache), p.read_bytes()) for p in cache.rglob("*") if p.is_file()) == before
    outer = cache.parent / "outer.zarr"  # a destination around the source
    inner = outer / "c.zarr"
    outer.mkdir()
    cache.rename(inner)
    assert user_error("convert", inner, outer, "--top-k", 2, "--overwrite") == (
        f"error: {outer} is around the source cache {inner}: write the converted cache to another path\n")
    assert inner.is_dir()


def test_a_damaged_first_chunk_is_refused_before_any_student_is_built(cache_and_teacher, tmp_path, monkeypatch):
    out = cache_and_teacher[0]
    (out / "logits" / "c" / "0" / "0").unlink()  # a cache that may declare any number of classes
    (tmp_path / "built.py").write_text(
        "import pathlib, torch\n"
        "def make(input_shape, num_classes):\n"
        "    pathlib.Path('BUILT').write_text(str(num_classes))\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    message = user_error("train-student", "--cache", out, "--student", "built:make", "--epochs", 1, "--out", tmp_path / "r")
    assert "array 'logits' chunk 0 (rows 0-49) is damaged (its chunk file is missing)" in message
    assert not (tmp_path / "BUILT").exists()


@pytest.mark.parametrize("kind, array, what", [
    (["--top-k", "3"], "topk_indices", "class index 5, beyond the 5 classes"),
    (["--sample", "4"], "sample_counts", "counts adding up to 5, not 4 draws"),
    ([], "labels", "label -7, outside -2..4"),
])
def test_values_no_dump_writes_are_refused_though_their_checksums_match(tmp_path, npz_data, linear_teacher, kind, array, what):
    out = tmp_path / "c.zarr"
    assert CliRunner().invoke(cli, ["dump", "--teacher", str(linear_teacher), "--arch", "linear", "--data", str(npz_data),
                                    "--out", str(out), "--chunk-rows", "50", "--quiet", *kind]).exit_code == 0
    with open_cache(out) as cache:
        names = [a.name for a in cache.layout.target_arrays()]
    group = zarr.open_group(str(out), mode="r+")
    values = group[array][:]
    at = (7, 0)[:values.ndim]
    values[at] = {"topk_indices": 5, "sample_counts": values[at] + 1, "labels": -7}[array]
    group[array][:] = values  # with its crc32c, and the commit record rewritten to match
    group["chunk_crc32"][:] = [chunk_checksum({n: group[n][s:s + 50] for n in names}, group["labels"][s:s + 50]) for s in range(0, 300, 50)]
    reseal_zarr(out)
    expected = f"array '{array}' chunk 0 (rows 0-49) is damaged (it holds {what})"
    assert expected in user_error("train-student", "--cache", out, "--student", "mlp", "--epochs", 1, "--out", tmp_path / "r")
    assert expected in user_error("evaluate", "--model", linear_teacher, "--arch", "linear", "--cache", out)
    result = verify(out)
    assert result.exit_code == 1 and "it holds" in result.output, result.output
