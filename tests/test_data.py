"""Data specs: every form reads the same rows, fingerprints follow content, bad specs are refused."""

import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import zarr

from softlabels import SoftlabelsError, open_data
from softlabels.data import Source, default_workers
from softlabels.store import ZarrRows
from .conftest import flip_hdf5_byte


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.normal(size=(50, 3, 4)).astype(np.float32), rng.integers(0, 6, 50)


def test_every_array_format_reads_the_same_rows_and_fingerprint(tmp_path, arrays, monkeypatch):
    x, y = arrays
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    group = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    group.create_array("x", data=x, chunks=(16, 3, 4))
    group.create_array("y", data=y, chunks=(16,))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    (tmp_path / "userdata.py").write_text(textwrap.dedent("""
        import numpy as np, torch
        class Pairs(torch.utils.data.Dataset):
            def __init__(self, path):
                d = np.load(path)
                self.x, self.y = d["x"], d["y"]
            def __len__(self):
                return len(self.x)
            def __getitem__(self, i):
                return torch.from_numpy(self.x[i]), int(self.y[i])
    """))
    monkeypatch.chdir(tmp_path)
    specs = ["plain.npz", "packed.npz", "d.zarr", "d.h5", f"userdata:Pairs?path={tmp_path / 'plain.npz'}"]
    sources = [open_data(spec) for spec in specs]
    assert isinstance(sources[0]._open()[0], np.memmap)  # uncompressed npz members are mapped, not loaded
    for source in sources:
        assert len(source) == 50 and source.input_shape == (3, 4) and source.has_labels
        xs, ys = source.read(10, 27)
        np.testing.assert_array_equal(xs, x[10:27])
        np.testing.assert_array_equal(ys, y[10:27])
    ids = np.array([7, 3, 7, 49, 0, 4, 5])
    for source in sources:  # arrays in memory or mapped gather at once, the others read runs of rows
        xs, ys = source.take(ids)
        np.testing.assert_array_equal(xs, x[ids])
        np.testing.assert_array_equal(ys, y[ids])
        assert xs.flags.writeable and ys.dtype == np.int64
        for bad in (-1, 50):
            with pytest.raises(SoftlabelsError, match=f"has rows 0 to 49, not row {bad}$"):
                source.take(np.array([2, bad]))
    assert len({s.fingerprint() for s in sources[:4]}) == 1
    assert sources[4].fingerprint().startswith("sampled-sha256:")


@pytest.mark.parametrize("codecs", ["bytes", "zstd", "zstd+crc32c", "bytes+crc32c"])
def test_a_zarr_datasets_rows_read_from_its_chunk_files_are_zarrs(tmp_path, arrays, codecs):
    x, y = arrays
    compressors = {"bytes": [], "zstd": [zarr.codecs.ZstdCodec()], "zstd+crc32c": [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()],
                   "bytes+crc32c": [zarr.codecs.Crc32cCodec()]}[codecs]
    group = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    group.create_array("x", shape=x.shape, chunks=(16, 3, 4), dtype=x.dtype, compressors=compressors, fill_value=-2.5)[:] = x
    group.create_array("y", shape=y.shape, chunks=(16,), dtype=y.dtype, compressors=compressors)[:] = y
    group.create_array("x_across", shape=x.shape, chunks=(16, 3, 2), dtype=x.dtype)[:] = x  # not along rows only
    group.create_array("classes", shape=(), dtype="int64")[...] = 6  # a scalar beside the rows, read by no one
    source = open_data(str(tmp_path / "d.zarr"))
    assert isinstance(source._open()[0], ZarrRows)  # read from its chunk files, not through zarr
    assert not isinstance(ZarrRows.wrap(tmp_path / "d.zarr", "x_across", group["x_across"]), ZarrRows)
    for start, stop in [(0, 50), (5, 6), (15, 17), (31, 50), (48, 50), (16, 32)]:
        xs, ys = source.read(start, stop)
        np.testing.assert_array_equal(xs, x[start:stop])
        np.testing.assert_array_equal(ys, y[start:stop])
    (tmp_path / "d.zarr" / "x" / "c" / "1" / "0" / "0").unlink()  # zarr reads a missing chunk as its fill value
    (tmp_path / "d.zarr" / "y" / "c" / "3").unlink()  # the short last chunk of a 1-D array
    plain = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    expected = np.asarray(plain["x"][:]), np.asarray(plain["y"][:])
    assert (expected[0][16:32] == -2.5).all() and (expected[1][48:] == 0).all()
    xs, ys = open_data(str(tmp_path / "d.zarr")).read(0, 50)
    np.testing.assert_array_equal(xs, expected[0])
    np.testing.assert_array_equal(ys, expected[1])
    if "crc32c" in codecs:  # a damaged chunk is refused by name, as zarr refuses it
        chunk = tmp_path / "d.zarr" / "x" / "c" / "2" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[3] ^= 0x10
        chunk.write_bytes(bytes(data))
        with pytest.raises(SoftlabelsError, match=r"d.zarr/x: chunk 2 \(rows 32-47\) is damaged"):
            open_data(str(tmp_path / "d.zarr")).read_inputs(30, 40)


def test_a_damaged_hdf5_dataset_chunk_is_named_with_its_rows(tmp_path, arrays):
    x, y = arrays
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(16, 3, 4), fletcher32=True)
        f.create_dataset("y", data=y, chunks=(16,), fletcher32=True)
    flip_hdf5_byte(tmp_path / "d.h5", "x", 2, 5)
    flip_hdf5_byte(tmp_path / "d.h5", "y", 1, 3)
    source = open_data(str(tmp_path / "d.h5"))
    np.testing.assert_array_equal(source.read(0, 16)[0], x[:16])  # the other chunks still read
    with pytest.raises(SoftlabelsError, match=r"^dataset .*d.h5: array 'x' chunk 2 \(rows 32-47\) is damaged \(OSError: .*filter"):
        source.read_inputs(20, 50)
    with pytest.raises(SoftlabelsError, match=r"array 'y' chunk 1 \(rows 16-31\) is damaged"):
        source.read(0, 16 * 1 + 5)
    with pytest.raises(SoftlabelsError, match=r"array 'x' chunk 2 \(rows 32-47\) is damaged"):
        source.fingerprint()


def test_fingerprint_changes_with_one_value(tmp_path, arrays):
    x, y = arrays
    np.savez(tmp_path / "a.npz", x=x, y=y)
    x2 = x.copy()
    x2[37, 1, 2] += 1e-3
    np.savez(tmp_path / "b.npz", x=x2, y=y)
    assert open_data(str(tmp_path / "a.npz")).fingerprint() != open_data(str(tmp_path / "b.npz")).fingerprint()


def test_unlabeled_data_reads_minus_one(tmp_path, arrays):
    np.savez(tmp_path / "u.npz", x=arrays[0])
    source = open_data(str(tmp_path / "u.npz"))
    assert not source.has_labels
    assert (source.read(0, 5)[1] == -1).all()


def test_mnist1d_transfer_is_unlabeled_and_differs_from_train():
    transfer = open_data("mnist1d://transfer?n=200&seed=3")
    train = open_data("mnist1d://train")
    assert len(transfer) == 200 and transfer.input_shape == (40,) and not transfer.has_labels
    assert len(train) == 4000 and len(open_data("mnist1d://test")) == 1000
    assert not np.isin(transfer.read(0, 200)[0][:, 0], train.read(0, 4000)[0][:, 0]).any()
    assert open_data("mnist1d://transfer?n=200&seed=3").fingerprint() == transfer.fingerprint()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mnist1d://transfer?n=15", "multiple of 10"),
        ("mnist1d://transfer?n=100&seed=42", "seed 42"),
        ("mnist1d://transfer?n=100&seed=-5", r"seed must be an integer from 0 to 2\*\*32 - 1"),
        ("mnist1d://transfer?n=100&seed=4294967296", r"seed must be an integer from 0 to 2\*\*32 - 1"),
        ("mnist1d://transfer?size=10", "unknown parameter"),
        ("mnist1d://train?n=3", "takes no parameters"),
        ("s3://bucket/data.zarr", "unknown scheme"),
        ("missing.h5", "no such file"),
        ("no_such_module_q:make", "cannot import dataset"),
        ("", "empty data spec"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(SoftlabelsError, match=message):
        open_data(spec)


@pytest.mark.parametrize("n", ["1000010", "1000000000000"])
def test_a_transfer_set_past_a_million_samples_is_refused_at_once_not_generated(tmp_path, n):
    spec = f"mnist1d://transfer?n={n}&seed=3"
    done = subprocess.run([sys.executable, "-m", "softlabels", "train-student", "--data", spec, "--hard-labels-only",
                           "--student", "linear", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SOFTLABELS_DATA": str(tmp_path / "data")})
    assert done.returncode == 1
    assert done.stderr == f"error: data spec {spec}: n must be a positive multiple of 10 (one share per class) up to 1,000,000\n"
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_callable_may_be_named_by_a_file_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ds.py").write_text("import numpy as np\ndef make(n=3):\n    return [(np.full(4, i, np.float32), i) for i in range(n)]\n")
    source = open_data("sub/ds.py:make?n=5")
    x, y = source.read(0, 5)
    assert len(source) == 5 and x.shape == (5, 4) and list(y) == [0, 1, 2, 3, 4]


LABELLED_ITEMS = """
import numpy as np
import torch
LABELS = {"float": 1.5, "whole_float": 2.0, "text": "3", "bool": True, "float_tensor": torch.tensor(1.5),
          "float_in_a_tensor": torch.tensor([1.5]), "int": 2, "numpy_int": np.int64(2), "int_tensor": torch.tensor(2),
          "int_in_a_tensor": torch.tensor([2]), "int_in_an_array": np.array([2])}
def make(label):
    return [(np.full(4, i, np.float32), LABELS[label] if i == 3 else i % 3) for i in range(8)]
"""


@pytest.mark.parametrize("label, shown", [("float", "1.5"), ("whole_float", "2.0"), ("text", "'3'"), ("bool", "True"),
                                          ("float_tensor", "1.5"), ("float_in_a_tensor", "1.5")])
def test_a_dataset_label_that_is_no_integer_is_refused_in_one_line(tmp_path, monkeypatch, label, shown):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.py").write_text(LABELLED_ITEMS)
    spec = f"items.py:make?label={label}"
    done = subprocess.run([sys.executable, "-m", "softlabels", "train-student", "--data", spec, "--hard-labels-only",
                           "--student", "linear", "--num-workers", "0", "--out", "run"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == (f"error: dataset {spec}: the label of item 3 is {shown}, not an integer "
                           "(labels are class indices, or -1 for none)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("label", ["int", "numpy_int", "int_tensor", "int_in_a_tensor", "int_in_an_array"])
def test_a_dataset_label_may_be_any_integer_type(tmp_path, monkeypatch, label):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.py").write_text(LABELLED_ITEMS)
    assert open_data(f"items.py:make?label={label}").read(0, 8)[1].tolist() == [0, 1, 2, 2, 1, 2, 0, 1]


def test_a_class_mismatch_says_how_many_names_differ():
    from softlabels.data import check_classes

    class Renamed:  # a folder whose ten classes were renamed c0..c9
        spec, classes = "imagefolder:renamed", [f"c{i}" for i in range(10)]
    with pytest.raises(SoftlabelsError, match=r"\(the dataset lacks 0, 1, 2, 3, 4 and 5 more; only the dataset has c0, c1, c2, c3, c4 "
                                              r"and 5 more\)"):
        check_classes([str(i) for i in range(10)], Renamed(), "model m.pth")


@pytest.mark.parametrize("cores, on_cpu, on_gpu", [(2, 1, 1), (4, 3, 3), (8, 4, 4), (16, 4, 12), (64, 4, 60)])
def test_items_are_read_by_a_few_workers_beside_a_cpu_model_and_by_all_cores_but_four_beside_a_gpu_one(
        tmp_path, arrays, monkeypatch, cores, on_cpu, on_gpu):
    class Items(Source):
        reads_items = True
    np.savez(tmp_path / "d.npz", x=arrays[0], y=arrays[1])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers(Items(), torch.device("cpu")) == on_cpu
    assert default_workers(Items(), torch.device("cuda")) == on_gpu
    assert default_workers(open_data(str(tmp_path / "d.npz")), torch.device("cuda")) == 0  # arrays are copied, not decoded
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this machine share its cores
    assert default_workers(Items(), torch.device("cuda")) == max(min(4, cores // 4 - 1), cores // 4 - 4, 1)
