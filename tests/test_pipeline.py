"""End to end on MNIST-1D: dump, compare with the teacher's own forward pass, distill, repeat exactly."""

import json
import shutil
import textwrap

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from softlabels import SoftlabelsError, load_model, open_data
from softlabels.cli import cli

from .conftest import TRANSFER


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def teacher_forward(teacher_path, spec):
    model = load_model(teacher_path).model
    x, _ = open_data(spec).read(0, len(open_data(spec)))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_cache_matches_the_teachers_forward_pass(tmp_path, teacher_path, suffix):
    out = tmp_path / f"test{suffix}"
    run("dump", "--teacher", teacher_path, "--data", "mnist1d://test", "--out", out, "--batch-size", 100, "--chunk-rows", 256)
    expected = teacher_forward(teacher_path, "mnist1d://test")
    if suffix == ".zarr":
        group = zarr.open_group(str(out), mode="r")
        stored, labels, manifest = group["logits"][:], group["labels"][:], group.attrs["softlabels"]
    else:
        with h5py.File(out, "r") as f:
            stored, labels, manifest = f["logits"][:], f["labels"][:], json.loads(f.attrs["softlabels"])
    assert stored.dtype == np.float16 and stored.shape == (1000, 10)
    np.testing.assert_array_equal(stored.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2**-10, atol=1e-3)
    np.testing.assert_array_equal(labels, open_data("mnist1d://test").labels())
    assert manifest["complete"] and manifest["teacher"]["arch"] == "cnn1d"
    assert manifest["teacher_accuracy"] == pytest.approx((expected.argmax(1) == labels).mean())
    assert manifest["dataset"]["fingerprint"] == open_data("mnist1d://test").fingerprint()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_path):
    root = tmp_path_factory.mktemp("caches")
    run("dump", "--teacher", teacher_path, "--data", TRANSFER, "--out", root / "transfer.zarr", "--quiet")
    run("dump", "--teacher", teacher_path, "--data", "mnist1d://test", "--out", root / "test.h5", "--quiet")
    return root


def test_distilled_students_beat_chance_and_agree_with_the_teacher(tmp_path, caches):
    out = tmp_path / "kd"
    result = run(
        "train-student", "--cache", caches / "transfer.zarr", "--student", "mlp", "--student", "small=cnn1d?channels=16",
        "--eval-cache", caches / "test.h5", "--epochs", 10, "--out", out, "--quiet",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [s["student"] for s in summary] == ["mlp", "small"]
    for entry in summary:
        assert set(entry) >= {"student", "params", "eval_accuracy", "teacher_agreement", "seconds"}
        assert entry["eval_accuracy"] > 0.3 and entry["teacher_agreement"] > 0.35  # chance is 0.1
        metrics = [json.loads(line) for line in (out / entry["student"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, 11))
        assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert "mlp" in result.output and "small" in result.output
    # A student checkpoint is a teacher checkpoint: dump and evaluate take it without --arch.
    student = out / "mlp" / "student.pth"
    run("dump", "--teacher", student, "--data", "mnist1d://test", "--out", tmp_path / "next.zarr", "--quiet")
    evaluated = json.loads(run("evaluate", "--model", student, "--data", "mnist1d://test", "--json").output)
    assert evaluated["accuracy"] == pytest.approx(summary[0]["eval_accuracy"])


def state_bytes(path):
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v.numpy().tobytes() for k, v in state.items()}


def test_same_seed_gives_bit_identical_students_alone_or_together(tmp_path, caches):
    common = ["--cache", caches / "transfer.zarr", "--epochs", 2, "--seed", 5, "--quiet"]
    run("train-student", *common, "--student", "mlp", "--student", "cnn1d?channels=4", "--out", tmp_path / "a")
    run("train-student", *common, "--student", "mlp", "--student", "cnn1d?channels=4", "--out", tmp_path / "b")
    run("train-student", *common, "--student", "mlp", "--out", tmp_path / "alone")
    run("train-student", *common[:-3], "--seed", 6, "--quiet", "--student", "mlp", "--out", tmp_path / "other-seed")
    for name in ("mlp", "cnn1d"):
        assert state_bytes(tmp_path / "a" / name / "student.pth") == state_bytes(tmp_path / "b" / name / "student.pth")
    assert state_bytes(tmp_path / "a" / "mlp" / "student.pth") == state_bytes(tmp_path / "alone" / "mlp" / "student.pth")
    assert state_bytes(tmp_path / "a" / "mlp" / "student.pth") != state_bytes(tmp_path / "other-seed" / "mlp" / "student.pth")


def test_dataset_with_another_fingerprint_is_refused(tmp_path, caches):
    result = CliRunner().invoke(
        cli, ["train-student", "--cache", str(caches / "transfer.zarr"), "--data", "mnist1d://transfer?n=3000&seed=8",
              "--student", "mlp", "--out", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: dataset mnist1d://transfer?n=3000&seed=8 does not match cache")
    # a manifest whose fingerprint was removed or emptied does not turn the check off
    for fingerprint in (None, ""):
        copy = tmp_path / f"copy{fingerprint is None}.zarr"
        shutil.copytree(caches / "transfer.zarr", copy)
        group = zarr.open_group(str(copy), mode="r+")
        manifest = group.attrs["softlabels"]
        group.attrs["softlabels"] = {**manifest, "dataset": {**manifest["dataset"], "fingerprint": fingerprint}}
        result = CliRunner().invoke(cli, ["train-student", "--cache", str(copy), "--student", "mlp", "--out", str(tmp_path / "r")])
        assert result.exit_code == 1
        assert result.output == (f"error: cache {copy} records no dataset fingerprint (manifest field 'dataset.fingerprint'), "
                                 "so no data can be checked against it\n")


def test_unseen_teacher_and_student_as_module_callables(tmp_path, monkeypatch):
    (tmp_path / "zoo.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Teacher(nn.Module):
            def __init__(self, classes=10):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, classes))
            def forward(self, x):
                return self.net(x)

        def student(input_shape, num_classes, hidden=32):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
    """))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    import importlib
    monkeypatch.syspath_prepend(str(tmp_path))
    zoo = importlib.import_module("zoo")
    teacher = zoo.Teacher()
    torch.save(teacher.state_dict(), tmp_path / "teacher_sd.pth")
    run("dump", "--teacher", "teacher_sd.pth", "--arch", "zoo:Teacher", "--data", "mnist1d://test", "--out", "t.h5", "--quiet")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        stored = f["logits"][:]
    x, _ = open_data("mnist1d://test").read(0, 1000)
    with torch.no_grad():
        expected = teacher(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2**-10, atol=2**-14)
    # An untrained teacher has near-equal logits: float16 may round the top two to one value (a tie,
    # which argmax resolves to the lower class). Every other row keeps the teacher's argmax.
    top2 = np.sort(stored, axis=1)[:, -2:]
    differs = stored.argmax(1) != expected.argmax(1)
    assert (top2[differs, 0] == top2[differs, 1]).all()
    assert differs.mean() < 0.01
    run("train-student", "--cache", "t.h5", "--student", "zoo:student?hidden=16", "--epochs", 2, "--out", "runs", "--quiet")
    # The checkpoint names user code, so loading it needs the user's consent: the same spec, or trust.
    with pytest.raises(SoftlabelsError, match="names code 'zoo:student'"):
        load_model(tmp_path / "runs" / "student" / "student.pth")
    loaded = load_model(tmp_path / "runs" / "student" / "student.pth", arch="zoo:student")
    assert loaded.arch == "zoo:student" and loaded.arch_kwargs == {"hidden": 16}
    assert load_model(tmp_path / "runs" / "student" / "student.pth", trust_code=True).arch_kwargs == {"hidden": 16}


def test_student_whose_output_does_not_match_the_classes_is_refused(tmp_path, caches):
    result = CliRunner().invoke(
        cli, ["train-student", "--cache", str(caches / "test.h5"), "--student", "softlabels.models:mlp?num_classes=7",
              "--out", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "outputs [2, 7] for a batch of 2, but the cache has [10] per sample" in result.output


def test_reading_one_batch_of_logits_leaves_grad_mode_alone(teacher):
    from softlabels import iter_logits

    next(iter_logits(teacher.model, open_data("mnist1d://test"), batch_size=8))
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_chunks_one_batch_filled_are_written_from_the_batch_without_a_copy():
    from softlabels.dump import _joined

    batch = torch.arange(40, dtype=torch.float16).reshape(10, 4).numpy()  # a batch as the writer gets it
    other = np.arange(8, dtype=np.float16).reshape(2, 4)
    cases = [[batch[2:4], batch[4:5], batch[5:9]], [batch[2:4], batch[5:9]], [batch[8:10], other], [batch[:, :2], batch[:, 2:]],
             [batch[4:6], batch[2:4]], [batch[0:0], batch[0:3]]]
    for arrays in cases:
        np.testing.assert_array_equal(_joined(arrays), np.concatenate(arrays))
    assert np.shares_memory(_joined(cases[0]), batch) and not np.shares_memory(_joined(cases[1]), batch)
