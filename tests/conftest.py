"""Shared fixtures: a private data directory, small datasets, and a small trained teacher."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import zarr

import numpy as np
import pytest
import torch

os.environ.setdefault("SOFTLABELS_DATA", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "softlabels-data"))

from softlabels import StudentSpec, TrainConfig, load_model, open_data, train_students  # noqa: E402

TRANSFER = "mnist1d://transfer?n=3000&seed=7"


@pytest.fixture(scope="session")
def teacher_path(request, tmp_path_factory) -> Path:
    """A cnn1d teacher trained for a few epochs on the 4000 MNIST-1D labels (about 85% test accuracy).

    Training it takes a while, so it is kept in pytest's cache, keyed by the sources that decide its
    weights: a change to any of them trains it anew.
    """
    sources = ["models.py", "train.py", "losses.py", "loader.py", "data.py", "checkpoint.py"]
    package = Path(__file__).resolve().parent.parent / "softlabels"
    key = hashlib.sha256(b"".join((package / name).read_bytes() for name in sources)).hexdigest()[:16]
    cached = request.config.cache.mkdir("softlabels-teacher") / f"{key}.pth"
    if not cached.exists():
        out = tmp_path_factory.mktemp("teacher")
        config = TrainConfig(epochs=8, hard_labels_only=True, device="cpu", lr=5e-3)
        train_students(
            [StudentSpec("cnn1d", {"channels": 32}, name="teacher")],
            source=open_data("mnist1d://train"),
            cache=None,
            config=config,
            out_dir=out,
            num_classes=10,
            progress=False,
        )
        shutil.copy(out / "teacher" / "student.pth", cached)
    return cached


@pytest.fixture(scope="session")
def teacher(teacher_path):
    return load_model(teacher_path)


def make_npz(path: Path, n: int = 300, features: int = 12, classes: int = 5, labels: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, features)).astype(np.float32)}
    if labels:
        arrays["y"] = rng.integers(0, classes, size=n).astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def npz_data(tmp_path) -> Path:
    return make_npz(tmp_path / "data.npz")


@pytest.fixture
def linear_teacher(tmp_path) -> Path:
    """A random linear teacher for 12 features and 5 classes, saved as a bare state dict."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    path = tmp_path / "linear_teacher.pth"
    torch.save(model.state_dict(), path)
    return path


SLOW_ZOO = textwrap.dedent("""
    import os
    import time
    import torch
    from torch import nn

    class Slow(nn.Module):
        '''A linear teacher that sleeps per batch, so a dump lasts long enough to be killed.'''
        def __init__(self):
            super().__init__()
            self.delay = float(os.environ.get("SLOW_DELAY", "0.04"))
            self.fc = nn.Linear(12, 5)
        def forward(self, x):
            time.sleep(self.delay)
            return self.fc(x) * 7

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 5)
        def forward(self, x):
            return self.fc(x).sum(1)
""")


@pytest.fixture
def slow_setup(tmp_path, monkeypatch):
    (tmp_path / "slowzoo.py").write_text(SLOW_ZOO)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    zoo = importlib.import_module("slowzoo")
    importlib.reload(zoo)
    torch.manual_seed(0)
    torch.save(zoo.Slow().state_dict(), tmp_path / "slow.pth")
    make_npz(tmp_path / "data.npz", n=2000, features=12, classes=5)
    return tmp_path


def dump_args(root, out, *extra):
    return [sys.executable, "-m", "softlabels", "dump", "--teacher", str(root / "slow.pth"), "--arch", "slowzoo:Slow",
            "--data", str(root / "data.npz"), "--out", str(out), "--batch-size", "50", "--chunk-rows", "100",
            "--device", "cpu", "--quiet", *extra]


def run_dump(root, out, *extra):
    done = subprocess.run(dump_args(root, out, *extra), cwd=root, capture_output=True, text=True, timeout=300)
    return done


def committed(partial: Path) -> int:
    try:
        if partial.name.endswith(".zarr.partial"):
            return int((zarr.open_group(str(partial), mode="r")["chunk_crc32"][:] >= 0).sum())
        with h5py.File(partial, "r", locking=False) as f:
            return int((f["chunk_crc32"][:] >= 0).sum())
    except Exception:
        return -1


def reseal_zarr(path: Path) -> None:
    """Record in a Zarr cache's ``chunk_crc32c`` the crc32c each chunk file now ends with, as a forger
    who rewrote chunks with plain zarr would: only the checks of what the chunks hold remain."""
    group = zarr.open_group(str(path), mode="r+")
    table = group["chunk_crc32c"]
    values = table[:]
    for column, name in enumerate(json.loads(table.attrs["arrays"])):
        tail = "/0" * (group[name].ndim - 1)
        for chunk in range(len(values)):
            values[chunk, column] = int.from_bytes((path / name / "c" / f"{chunk}{tail}").read_bytes()[-4:], "little")
    table[:] = values


def flip_hdf5_byte(path: Path, dataset: str, chunk: int, offset: int, mask: int = 0xFF) -> None:
    """Flip bits of one stored byte of ``dataset``'s chunk ``chunk`` (a chunk along the first axis)."""
    with h5py.File(path, "r") as f:
        array = f[dataset]
        start = array.id.get_chunk_info(chunk).byte_offset + offset
    with open(path, "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ mask]))


def command_peak_mib(*args: str) -> tuple[int, list[str], int]:
    """Run ``softlabels ARGS`` in a process of its own: its exit code, its stderr lines and the most
    memory it held at once (MiB), for telling a bounded read from one that decodes whatever it is given.
    The peak is Linux's VmHWM, its own: ``ru_maxrss`` counts the memory of the process that started it."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the peak memory of a process is read from Linux's /proc")
    script = ("import re, runpy, sys\n"
              "try:\n    runpy.run_module('softlabels', run_name='__main__')\n"
              "finally:\n    status = open('/proc/self/status').read()\n"
              "    print(int(re.search(r'VmHWM:\\s*(\\d+)', status).group(1)) // 1024, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    *lines, peak = done.stderr.splitlines()
    return done.returncode, lines, int(peak)


def flip_tensor_bit(path: Path) -> None:
    """Flip one bit of a tensor's bytes in a ``torch.save`` zip file: what ``torch.load`` alone would
    load without a word."""
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size >= 16)
    with open(path, "rb") as f:
        f.seek(member.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
    data = bytearray(path.read_bytes())
    data[member.header_offset + 30 + name_length + extra_length + 5] ^= 0x40
    path.write_bytes(bytes(data))
