"""On a CUDA device: the dump's device path (autocast, pinned host copies, writes overlapped with the
next batch) stores what the CPU path stores, and students train there as repeatably as on the CPU.

Skipped without a CUDA device; ``scripts/bench_gpu.sh`` runs them on one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels import Sampled, TopK, dump, load_model, open_cache, open_data
from softlabels.augment import Pipeline
from softlabels.augment.signal import Noise, Shift
from softlabels.cli import cli
from softlabels.views import Views

from .conftest import TRANSFER
from .test_pipeline import state_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def stored(path):
    with open_cache(path) as cache:
        return cache.read(0, len(cache))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_fp32_dump_on_cuda_stores_what_the_cpu_dump_stores(tmp_path, teacher_path, suffix):
    teacher, source = load_model(teacher_path), open_data("mnist1d://test")
    dump(teacher, source, tmp_path / f"cpu{suffix}", device="cpu", batch_size=100, progress=False)
    dump(teacher, source, tmp_path / f"gpu{suffix}", device="cuda", batch_size=100, progress=False)
    (cpu, cpu_labels), (gpu, gpu_labels) = stored(tmp_path / f"cpu{suffix}"), stored(tmp_path / f"gpu{suffix}")
    assert np.array_equal(cpu_labels, gpu_labels)
    # cuDNN's convolutions may use TF32: float16-stored logits agree to a few of their last bits.
    np.testing.assert_allclose(gpu["logits"].astype(np.float32), cpu["logits"].astype(np.float32), rtol=1e-2, atol=2e-2)
    assert (gpu["logits"].argmax(-1) != cpu["logits"].argmax(-1)).sum() <= 2  # near-ties only


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_autocast_dump_on_cuda_verifies_and_ranks_as_fp32_does(tmp_path, teacher_path, precision):
    out = tmp_path / "amp.zarr"
    run("dump", "--teacher", teacher_path, "--data", "mnist1d://test", "--out", out, "--device", "cuda",
        "--precision", precision, "--quiet")
    result = run("verify", out, "--recompute", 1000, "--teacher", teacher_path, "--device", "cuda")
    assert result.output.startswith("ok: ")
    with open_cache(out) as cache:
        assert cache.manifest["precision"] == precision
    with torch.no_grad():
        expected = load_model(teacher_path).model(torch.from_numpy(open_data("mnist1d://test").read(0, 1000)[0]))
    agree = (stored(out)[0]["logits"].argmax(-1) == expected.argmax(-1).numpy()).mean()
    assert agree >= 0.98


def test_a_view_cache_dumped_on_cuda_holds_the_cpu_views(tmp_path, teacher_path):
    teacher, source = load_model(teacher_path), open_data("mnist1d://transfer?n=200&seed=3")
    views = Views(4, Pipeline((Shift(max=6), Noise(std=0.1)), seed=3))
    for device in ("cpu", "cuda"):
        dump(teacher, source, tmp_path / f"{device}.zarr", device=device, views=views,
             batch_size=64, progress=False)
    with open_cache(tmp_path / "cpu.zarr") as cpu, open_cache(tmp_path / "cuda.zarr") as gpu:
        cpu_records, gpu_records = cpu.read_records(0, 200), gpu.read_records(0, 200)
        assert cpu_records.keys() == gpu_records.keys()
        for name in cpu_records:  # the drawn view parameters are the host's, whatever the device
            assert np.array_equal(cpu_records[name], gpu_records[name]), name
        (cpu_targets, _), (gpu_targets, _) = cpu.read(0, 200), gpu.read(0, 200)
    np.testing.assert_allclose(gpu_targets["logits"].astype(np.float32), cpu_targets["logits"].astype(np.float32),
                               rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("kind", [TopK(k=16), Sampled(samples=24, proposal_temperature=2.0),
                                  Sampled(samples=8, compact=True)], ids=["topk", "sampled", "compact"])
def test_sparse_targets_built_on_cuda_equal_those_built_on_the_cpu(kind):
    logits = torch.randn(64, 5, 1000, generator=torch.Generator().manual_seed(0)) * 3
    rows = torch.arange(1000, 1064)
    cpu = kind.build(logits, rows=rows, store_dtype=torch.float16)
    gpu = kind.build(logits.cuda(), rows=rows.cuda(), store_dtype=torch.float16)
    assert cpu.keys() == gpu.keys()
    for name, value in cpu.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(gpu[name].cpu().float(), value.float(), rtol=2e-3, atol=2e-3, msg=name)
        else:  # classes, counts: the draws are keyed by row and item, not by the device's generator
            assert torch.equal(gpu[name].cpu(), value), name


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_the_same_seed_on_cuda_gives_bit_identical_students(tmp_path, teacher_path, kind):
    cache = tmp_path / "transfer.zarr"
    options = ["--top-k", 4] if kind == "topk" else []
    run("dump", "--teacher", teacher_path, "--data", TRANSFER, "--out", cache, "--quiet", *options)
    common = ["--cache", cache, "--epochs", 2, "--seed", 5, "--device", "cuda", "--quiet",
              "--student", "mlp", "--student", "cnn1d?channels=8"]
    run("train-student", *common, "--out", tmp_path / "a")
    run("train-student", *common, "--out", tmp_path / "b")
    for name in ("mlp", "cnn1d"):
        a, b = state_bytes(tmp_path / "a" / name / "student.pth"), state_bytes(tmp_path / "b" / name / "student.pth")
        assert a == b, name

