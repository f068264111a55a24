"""The CLI as a user meets it: help, exit codes, one-line errors, a real subprocess."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from softlabels import SoftlabelsError, open_cache
from softlabels.checkpoint import save_checkpoint
from softlabels.errors import user_message
from softlabels.cli import cli
from softlabels.runs import read_predictions
from softlabels.store import chunk_checksum

from .conftest import make_npz, reseal_zarr

README = Path(__file__).resolve().parent.parent / "README.md"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_ending_in_an_example_and_is_in_the_readme(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    tail = result.output.strip().splitlines()
    example_at = max(i for i, line in enumerate(tail) if line.strip() == "Example:")
    assert all("softlabels" in line or line.strip().startswith("--") or not line.strip() for line in tail[example_at + 1:])
    assert f"softlabels {command}" in tail[-1] or f"softlabels {command}" in "\n".join(tail[example_at:])
    assert f"softlabels {command}" in README.read_text()
    for option in re.findall(r"--[a-z][a-z0-9_-]*", result.output):
        assert "_" not in option, f"{option} should use dashes"


@pytest.mark.parametrize("args, line", [
    (["dump", "--bogus"], "No such option '--bogus'. Did you mean '--out'? (see softlabels dump --help)"),
    (["dump"], "Missing option '--teacher'. (see softlabels dump --help)"),
    (["inspect"], "Missing argument 'PATH'. (see softlabels inspect --help)"),
    (["frobnicate"], "No such command 'frobnicate'. (see softlabels --help)"),
    (["--nope", "inspect", "c.zarr"], "No such option '--nope'. (see softlabels --help)"),
    (["train-student", "--batch-size", "-4", "--student", "mlp", "--out", "r"],
     "Invalid value for '--batch-size': -4 is not in the range x>=1. (see softlabels train-student --help)"),
    (["convert", "a.zarr", "b.zarr"], "give --top-k K, --sample S, --keep-views V or --upgrade (see softlabels convert --help)"),
])
def test_usage_errors_are_one_line_with_exit_code_2(tmp_path, args, line):
    done = subprocess.run([sys.executable, "-m", "softlabels", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and done.stderr == f"error: {line}\n"


def test_help_is_still_shown_in_full(tmp_path):
    top = subprocess.run([sys.executable, "-m", "softlabels", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and top.stdout.startswith("Usage: softlabels [OPTIONS] COMMAND [ARGS]...")
    assert all(f"  {command} " in top.stdout for command in cli.commands) and "--debug" in top.stdout
    bare = subprocess.run([sys.executable, "-m", "softlabels"], capture_output=True, text=True)
    assert bare.stdout + bare.stderr == top.stdout  # no command: the help
    dump = subprocess.run([sys.executable, "-m", "softlabels", "dump", "-h"], capture_output=True, text=True)
    assert dump.returncode == 0 and dump.stdout.startswith("Usage: softlabels dump [OPTIONS]") and "--overwrite" in dump.stdout
    module = subprocess.run([sys.executable, "-m", "softlabels.cli", "dump", "-h"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout == dump.stdout  # the module the command lives in runs it too


def console_script() -> list[str]:
    """What the installed ``softlabels`` command runs: the entry point pyproject.toml names, called as pip's script calls it."""
    import tomllib

    target = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["scripts"]["softlabels"]
    module, function = target.split(":")
    return ["-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def interrupted_while_importing(args: list[str]) -> subprocess.CompletedProcess | None:
    """Run ``python ARGS --help`` and send it SIGINT while it imports torch (seen in its memory
    maps), or ``None`` if it finished first."""
    # A shell without job control starts background jobs with SIGINT ignored, which the child would
    # inherit (and then rightly keep ignoring): it gets the default, as from a terminal.
    child = subprocess.Popen([sys.executable, *args, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{child.pid}/maps")
    deadline = time.monotonic() + 30
    try:
        while child.poll() is None and time.monotonic() < deadline:
            if "libtorch" in maps.read_text():
                child.send_signal(signal.SIGINT)
                break
            time.sleep(0.002)
    except FileNotFoundError:  # it ended between the poll and the read
        pass
    out, err = child.communicate(timeout=60)
    return None if child.returncode == 0 and out.startswith("Usage:") else subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the command import torch")
@pytest.mark.parametrize("entry", ["python -m softlabels", "console script"])
def test_ctrl_c_while_the_command_imports_its_libraries_ends_it_in_one_line(entry):
    args = ["-m", "softlabels"] if entry == "python -m softlabels" else console_script()
    for attempt in range(5):  # the signal lands within torch's import unless the command finished first
        done = interrupted_while_importing(args)
        if done is not None:
            assert (done.returncode, done.stdout, done.stderr) == (130, "", "error: interrupted\n")
            return
    pytest.fail("the command finished before it could be interrupted five times out of five")


def assert_one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_dump_chunks_follow_the_inputs_a_loader_window_holds(tmp_path, npz_data, linear_teacher, monkeypatch):
    monkeypatch.setattr("softlabels.store._MAX_DEFAULT_CHUNK_INPUT_BYTES", 64 * 12 * 4)  # 64 samples of 12 float32
    for out in (tmp_path / "c.zarr", tmp_path / "c.h5"):
        result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out)
        assert result.exit_code == 0, result.output
        with open_cache(out) as cache:
            assert cache.chunk_rows == 64
    monkeypatch.undo()
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", tmp_path / "d.zarr").exit_code == 0
    with open_cache(tmp_path / "d.zarr") as cache:
        assert cache.chunk_rows == 300  # 5 float16 logits a sample: all 300 samples in one chunk


def test_dump_cli_writes_a_cache_and_summary(tmp_path, npz_data, linear_teacher):
    out = tmp_path / "c.h5"
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out, "--chunk-rows", 64)
    assert result.exit_code == 0, result.output
    assert re.search(r"300 samples x 5 classes, .* MiB on disk, .* teacher accuracy \d+\.\d+% on 300 labeled", result.output)
    with open_cache(out) as cache:
        assert (len(cache), cache.num_classes, cache.chunk_rows) == (300, 5, 64)
        assert cache.manifest["teacher"]["arch"] == "linear"


@pytest.mark.parametrize("args, message", [
    (["--proposal-temperature", "2"], "--proposal-temperature applies to --sample"),
    (["--top-k", "3", "--sample-seed", "4"], "--sample-seed applies to --sample"),
    (["--temperatures", "1,2"], "--temperatures applies to --top-k or --sample"),
    (["--compact"], "--compact applies to --sample"),
    (["--compact", "--top-k", "3"], "--compact applies to --sample"),
    (["--top-k", "3", "--sample", "2"], "give --top-k or --sample, not both"),
    (["--top-k", "3", "--temperatures", "nan"], "Invalid value for '--temperatures': 'nan' is not a comma-separated list of positive numbers"),
    (["--top-k", "3", "--temperatures", ""], "Invalid value for '--temperatures': '' is not a comma-separated list of positive numbers"),
    (["--sample", "3", "--proposal-temperature", "nan"], "Invalid value for '--proposal-temperature': must be a positive number, got nan"),
])
def test_sampling_options_that_would_be_ignored_are_usage_errors(tmp_path, npz_data, linear_teacher, args, message):
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", tmp_path / "c.zarr", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--teacher", "missing.pth", "--arch", "linear"], "checkpoint not found"),
        (["--arch", "linear", "--data", "nowhere.npz"], "no such file"),
        (["--arch", "linear", "--data", "what is this"], "cannot parse data spec"),
        (["--arch", "linear", "--data", "mnist1d://validation"], "unknown MNIST-1D split"),
        ([], "bare state dict: pass --arch"),
        (["--arch", "nosuchnet"], "unknown architecture 'nosuchnet'"),
        (["--arch", "nosuchmodule_abc:make"], "cannot import architecture"),
        (["--arch", "mlp"], "does not fit architecture 'mlp'"),
        (["--arch", "linear", "--device", "meta"], "device 'meta' is not supported: use auto, cpu, cuda or cuda:N"),
        (["--arch", "linear", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["--arch", "linear", "--resume", "--overwrite"], "give --resume or --overwrite, not both"),
        (["--arch", "linear", "--views", str(10**30), "--augment", "noise?std=0.1"],
         "--views must be a number of views per sample from 1 to 65,536, got 1000000000000000000000000000000"),
    ],
)
def test_dump_errors_are_one_line(tmp_path, npz_data, linear_teacher, args, pattern):
    defaults = {"--teacher": linear_teacher, "--data": npz_data, "--out": tmp_path / "c.zarr"}
    for flag in ("--teacher", "--data"):
        if flag not in args:
            args = args + [flag, defaults[flag]]
    result = run("dump", *args, "--out", defaults["--out"])
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("out", ["kept", "kept.txt", "new/sub/c.txt"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("command", ["dump", "convert"])
def test_an_output_without_a_cache_suffix_is_refused_first_and_nothing_is_touched(tmp_path, npz_data, linear_teacher,
                                                                                  command, overwrite, out):
    cache = tmp_path / "cache" / "c.zarr"
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", cache).exit_code == 0
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes").write_text("mine")
    (tmp_path / "kept.txt").write_text("mine too")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = {"dump": ["dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out"],
            "convert": ["convert", cache, "--top-k", "2"]}[command]
    result = run(*args, tmp_path / out, *overwrite)
    assert_one_line_error(result, f"^error: cache path {re.escape(str(tmp_path / out))} must end in .zarr, .h5 or .hdf5$")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "kept" / "notes").read_text() == "mine" and (tmp_path / "kept.txt").read_text() == "mine too"


def test_existing_cache_is_kept_without_overwrite(tmp_path, npz_data, linear_teacher):
    out = tmp_path / "c.zarr"
    first = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out)
    assert first.exit_code == 0 and f"wrote {out}" in first.output
    before = sorted(p.read_bytes() for p in out.rglob("*") if p.is_file())
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out)
    assert_one_line_error(result, "already exists; pass --overwrite")
    resumed = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out, "--resume")
    assert_one_line_error(resumed, "is complete already: there is nothing to resume")
    assert sorted(p.read_bytes() for p in out.rglob("*") if p.is_file()) == before
    replaced = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out, "--overwrite")
    assert replaced.exit_code == 0 and f"wrote {out}: 300 samples x 5 classes" in replaced.output
    with open_cache(out) as cache:
        assert len(cache) == 300 and cache.manifest["complete"]


@pytest.mark.parametrize("command", ["dump", "convert"])
def test_overwrite_replaces_a_cache_and_nothing_else(tmp_path, npz_data, linear_teacher, command):
    cache = tmp_path / "c.zarr"
    teach = ["--teacher", linear_teacher, "--arch", "linear"]
    assert run("dump", *teach, "--data", npz_data, "--out", cache).exit_code == 0
    data = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")  # a dataset, not a cache
    data["x"], data["y"] = np.zeros((300, 12), np.float32), np.zeros(300, np.int64)
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"], f["y"] = np.zeros((300, 12), np.float32), np.zeros(300, np.int64)
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("mine")
    shutil.copytree(cache, tmp_path / "noted.zarr")
    (tmp_path / "noted.zarr" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for target, why in [("data.zarr", "it has no softlabels manifest"), ("data.h5", "it has no softlabels manifest"),
                        ("mine.zarr", "it has no readable zarr.json"),
                        ("noted.zarr", "it holds notes.txt, which is no part of a cache")]:
        out = tmp_path / target
        args = {"dump": ["dump", *teach, "--data", tmp_path / "data.zarr" if target == "data.zarr" else npz_data, "--out", out],
                "convert": ["convert", cache, out, "--top-k", "2"]}[command]
        assert_one_line_error(run(*args, "--overwrite"), rf"^error: {re.escape(str(out))} is not a softlabels cache "
                                                         rf"\({why}\): --overwrite replaces only a cache")
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    (cache / f"zarr.{'0a' * 16}.partial").write_text("{")  # what zarr leaves of a zarr.json write a kill stopped
    replaced = run("dump", *teach, "--data", npz_data, "--out", cache, "--overwrite")  # a cache is replaced
    assert replaced.exit_code == 0 and f"wrote {cache}: 300 samples" in replaced.output


def test_moved_data_is_named_with_the_option_that_finds_it(tmp_path, npz_data, linear_teacher):
    out = tmp_path / "c.zarr"
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out).exit_code == 0
    moved = npz_data.rename(tmp_path / "moved.npz")
    train = ["train-student", "--cache", out, "--student", "linear", "--epochs", "1", "--quiet"]
    result = run(*train, "--out", tmp_path / "a")
    assert_one_line_error(result, rf"data spec {npz_data}: no such file or directory \(where cache {out} was dumped from it; "
                                  r"if the data moved, pass --data PATH\)")
    assert run(*train, "--data", moved, "--out", tmp_path / "b").exit_code == 0


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_labels_out_of_range_are_refused_and_leave_no_partial_cache_to_block_the_next_dump(tmp_path, linear_teacher, suffix):
    data = make_npz(tmp_path / "d.npz", classes=9)
    out = tmp_path / f"c{suffix}"
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", data, "--out", out)
    assert_one_line_error(result, r"label \d+ at sample \d+ is out of range for a teacher with 5 classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "linear_teacher.pth"]  # nothing was committed
    fixed = make_npz(tmp_path / "fixed.npz", classes=5)
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", fixed, "--out", out).exit_code == 0


def test_dataset_without_x(tmp_path, linear_teacher):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 12)))
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", tmp_path / "d.npz", "--out", tmp_path / "c.zarr")
    assert_one_line_error(result, "has no array 'x' \\(found: inputs; use x \\[and y\\] for samples, input_ids")


@pytest.mark.parametrize(
    "args",
    [["--batch-size", "-4"], ["--temperature", "0"], ["--alpha", "1.5"], ["--kl", "sideways"], ["--epochs", "0"],
     ["--seed", "-1"], ["--num-workers", str(10**30)]],
)
def test_invalid_option_values_are_usage_errors(tmp_path, args):
    result = run("train-student", "--data", "x.npz", "--hard-labels-only", "--student", "mlp", "--out", tmp_path, *args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and f"Invalid value for '{args[0]}'" in result.output


@pytest.mark.parametrize("args, name", [
    (["dump", "--teacher", "t.pth", "--data", "x.npz", "--out", " "], "--out"),
    (["train-student", "--data", "x.npz", "--hard-labels-only", "--student", "mlp", "--out", ""], "--out"),
    (["train-student", "--data", "x.npz", "--hard-labels-only", "--student", "mlp", "--out", "r", "--tensorboard", ""], "--tensorboard"),
    (["convert", "c.zarr", "", "--top-k", "2"], "DST"),
    (["report", "r", "--out", ""], "--out"),
    (["compare", "r", "--plot", ""], "--plot"),
])
def test_an_empty_output_path_is_refused_not_taken_for_the_current_directory(tmp_path, monkeypatch, args, name):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2 and f"Invalid value for '{name}': must not be empty" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, pattern", [
    (["--temperature", "nan"], "temperature must be > 0, got nan"),
    (["--lr", "nan"], "learning rate must be > 0 and weight decay >= 0, got nan"),
    (["--student", "../x=linear"], "student name '../x' names no directory of its own in the run"),
    (["--student", "a=linear", "--student", "a=mlp"], "two students are named 'a': give each its own name"),
    (["--student", "summary.json=mlp"], "student name 'summary.json' is the name of a file of the run itself"),
    (["--student", "mlp?width=0"], "mlp: width must be an integer of at least 1, got 0"),
    (["--student", "cnn1d?kernel_size=abc"], "cnn1d: kernel_size must be an integer of at least 1, got 'abc'"),
])
def test_bad_training_options_are_one_line_errors_that_write_nothing(tmp_path, npz_data, args, pattern):
    result = run("train-student", "--data", npz_data, "--hard-labels-only", "--student", "linear", "--out", tmp_path / "r", *args)
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "r").exists() and not (tmp_path / "x").exists()


def test_students_of_one_architecture_are_numbered_past_the_names_given(tmp_path, npz_data):
    result = run("train-student", "--data", npz_data, "--hard-labels-only", "--student", "linear", "--student", "linear",
                 "--student", "linear-2=mlp?width=4", "--epochs", "1", "--quiet", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [row["student"] for row in rows] == ["linear", "linear-3", "linear-2"]
    assert torch.load(tmp_path / "r" / "linear-2" / "student.pth", weights_only=True)["arch"] == "mlp"
    assert torch.load(tmp_path / "r" / "linear-3" / "student.pth", weights_only=True)["arch"] == "linear"


def test_a_model_of_fewer_classes_than_the_data_is_refused_in_one_line(tmp_path, npz_data):
    small = tmp_path / "small.pth"  # npz_data has labels 0..4
    save_checkpoint(small, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), arch="linear", arch_kwargs={},
                    input_shape=(12,), num_classes=3)
    who = f"the model evaluated on {npz_data}"
    assert_one_line_error(run("evaluate", "--model", small, "--data", npz_data), f"{who} has 3 classes, but the data has label 4")
    result = run("train-student", "--data", npz_data, "--hard-labels-only", "--student", "linear", "--eval-data", npz_data,
                 "--eval-teacher", small, "--out", tmp_path / "r")
    assert_one_line_error(result, f"the teacher run on {npz_data} has 3 classes, but the data has label 4")
    result = run("train-student", "--data", npz_data, "--hard-labels-only", "--student", "linear", "--num-classes", "3",
                 "--out", tmp_path / "r")
    assert_one_line_error(result, r"each student \(--num-classes, or the cache's or teacher's classes\) has 3 classes, but the data has label 4")
    assert not (tmp_path / "r").exists()


def test_evaluating_a_model_with_nan_weights_or_against_a_view_cache_is_a_one_line_error(tmp_path, npz_data, linear_teacher):
    broken = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    with torch.no_grad():
        broken[1].weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pth", broken, arch="linear", arch_kwargs={}, input_shape=(12,), num_classes=5)
    assert_one_line_error(run("evaluate", "--model", tmp_path / "nan.pth", "--data", npz_data), "outputs NaN or Inf")
    x = np.load(npz_data)["x"]
    x[130, 2] = np.nan  # NaN inputs, not damaged weights
    np.savez(tmp_path / "nan_inputs.npz", x=x, y=np.load(npz_data)["y"])
    assert_one_line_error(run("evaluate", "--model", linear_teacher, "--arch", "linear", "--data", tmp_path / "nan_inputs.npz"),
                          re.escape(f"the inputs of {tmp_path / 'nan_inputs.npz'} hold NaN or Inf (sample 130)"))
    views = tmp_path / "views.zarr"
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", views, "--views", "2",
               "--augment", "noise?std=0.1", "--quiet").exit_code == 0
    save_checkpoint(tmp_path / "ok.pth", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), arch="linear",
                    arch_kwargs={}, input_shape=(12,), num_classes=5)
    assert_one_line_error(run("evaluate", "--model", tmp_path / "ok.pth", "--cache", views),
                          r"the teacher's classes are \[2\] per sample \(a cache of recorded views\?\), the model's \[\]")


def test_an_online_teacher_that_cannot_take_the_data_is_refused_before_training(tmp_path):
    wide = make_npz(tmp_path / "wide.npz", features=20)
    teacher = tmp_path / "t.pth"
    save_checkpoint(teacher, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), arch="linear", arch_kwargs={},
                    input_shape=(12,), num_classes=5)
    result = run("train-student", "--data", wide, "--online-teacher", teacher, "--student", "linear", "--out", tmp_path / "r")
    assert_one_line_error(result, rf"teacher {teacher} cannot take inputs of shape \[20\]")
    assert not (tmp_path / "r").exists()


def test_a_diverging_student_stops_the_run_in_one_line(tmp_path, npz_data):
    result = run("train-student", "--data", npz_data, "--hard-labels-only", "--student", "mlp", "--epochs", "2",
                 "--lr", "1e30", "--eval-data", npz_data, "--out", tmp_path / "r")
    assert_one_line_error(result, r"student 'mlp' diverged: its loss is (nan|inf) in epoch 1; .*lower --lr")
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_loss_made_nan_by_the_cache_or_the_inputs_names_them_not_the_learning_rate(tmp_path, npz_data, linear_teacher, value):
    cache = tmp_path / "c.zarr"
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", cache, "--quiet").exit_code == 0
    group = zarr.open_group(str(cache), mode="r+")
    logits = group["logits"][:]
    logits[17, 2] = value  # rewritten with valid checksums: verify passes what the dump would have refused
    group["logits"][:] = logits
    assert group["chunk_crc32"].shape == (1,)
    group["chunk_crc32"][:] = [chunk_checksum({"logits": logits}, group["labels"][:])]
    reseal_zarr(cache)
    result = run("train-student", "--cache", cache, "--student", "mlp", "--epochs", 1, "--batch-size", 300, "--out", tmp_path / "r")
    assert_one_line_error(result, r"student 'mlp' has a loss of (nan|inf) in epoch 1: the cached 'logits' of dataset row 17 hold "
                                  r"NaN or \+Inf, which training cannot use: the cache was dumped with --allow-nonfinite, or is damaged$")
    x = np.load(npz_data)["x"]
    x[40, 3] = np.inf
    np.savez(tmp_path / "inf.npz", x=x, y=np.load(npz_data)["y"])
    result = run("train-student", "--data", tmp_path / "inf.npz", "--hard-labels-only", "--student", "mlp", "--epochs", 1,
                 "--batch-size", 300, "--out", tmp_path / "r2")
    assert_one_line_error(result, r"student 'mlp' has a loss of nan in epoch 1: the inputs of dataset row 40 hold NaN or Inf$")


def test_predictions_that_are_no_npz_archive_are_refused_in_one_line(tmp_path):
    with open(tmp_path / "eval_predictions.npz", "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(SoftlabelsError, match="cannot read predictions .*: not an .npz archive"):
        read_predictions(tmp_path / "eval_predictions.npz")


def test_inspect_json_and_evaluate(tmp_path, npz_data, linear_teacher):
    out = tmp_path / "c.zarr"
    run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", out, "--store-dtype", "float32")
    report = json.loads(run("inspect", out, "--json").output)
    assert report["complete"] and report["shape"] == [300, 5] and report["dtype"] == "float32"
    assert report["labeled_items"] == 300 and 0 <= report["teacher_accuracy"] <= 1
    assert report["statistic"]["name"] == "entropy" and 0 < report["statistic"]["mean"] <= np.log(5) + 1e-9
    result = run("evaluate", "--model", linear_teacher, "--arch", "linear", "--cache", out, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    # The teacher agrees with its own cached logits, and its accuracy is the one the cache recorded.
    assert metrics["teacher_agreement"] == 1.0
    assert metrics["accuracy"] == pytest.approx(report["teacher_accuracy"])
    line = run("evaluate", "--model", linear_teacher, "--arch", "linear", "--cache", out).output
    assert f"accuracy {metrics['accuracy']:.2%}, {metrics['nats']:.4f} nats per sample, ECE" in line, line


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{teacher}", "--arch", "linear", "--data", "{empty}"],
    ["dump", "--teacher", "{teacher}", "--arch", "linear", "--data", "{empty}", "--out", "{out}/c.zarr"],
    ["train-student", "--data", "{empty}", "--hard-labels-only", "--student", "linear", "--out", "{out}/run"],
    ["train-student", "--data", "{data}", "--hard-labels-only", "--student", "linear", "--eval-data", "{empty}", "--out", "{out}/run"],
])
def test_data_without_rows_is_refused_in_one_line(tmp_path, npz_data, linear_teacher, command):
    empty = make_npz(tmp_path / "empty.npz", n=0)
    (tmp_path / "out").mkdir()
    result = run(*[a.format(teacher=linear_teacher, empty=empty, data=npz_data, out=tmp_path / "out") for a in command])
    assert_one_line_error(result, f"^error: dataset {re.escape(str(empty))} is empty$")
    assert list((tmp_path / "out").iterdir()) == []


def test_inspect_refuses_what_is_not_a_cache(tmp_path):
    (tmp_path / "notes.zarr").mkdir()
    assert_one_line_error(run("inspect", tmp_path / "notes.zarr"), "not a softlabels cache")


@pytest.mark.slow
def test_real_subprocess_round_trip(tmp_path, npz_data, linear_teacher):
    exe = [sys.executable, "-m", "softlabels"]
    out = tmp_path / "c.zarr"
    done = subprocess.run(
        exe + ["dump", "--teacher", str(linear_teacher), "--arch", "linear", "--data", str(npz_data), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    failed = subprocess.run(exe + ["inspect", str(tmp_path / "missing.zarr")], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"error: cache not found: {tmp_path / 'missing.zarr'}"
    debug = subprocess.run(exe + ["--debug", "inspect", str(tmp_path / "missing.zarr")], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_batch_norm_student_that_a_one_row_last_batch_would_stop_is_refused_before_training(tmp_path, npz_data, monkeypatch):
    from softlabels import SoftTargetLoader, open_data
    from softlabels.train import _check_one_row_batches

    (tmp_path / "bn.py").write_text("from torch import nn\n"
                                    "def make(num_classes):\n"
                                    "    return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train-student", "--data", npz_data, "--student", "bn:make", "--hard-labels-only", "--epochs", "1", "--quiet"]
    # 300 rows in batches of 23 leave a last batch of one row
    refused = run(*args, "--batch-size", 23, "--out", tmp_path / "one")
    assert refused.exit_code == 1 and refused.output.strip() == (
        "error: student 'make' has batch norm, which cannot train on one row: the last batch of every epoch holds 1 "
        "(300 rows in batches of 23); choose another --batch-size")
    assert not (tmp_path / "one").exists()
    trained = run(*args, "--batch-size", 26, "--out", tmp_path / "two")  # a last batch of 14 rows
    assert trained.exit_code == 0 and (tmp_path / "two" / "make" / "student.pth").is_file(), trained.output
    # under torchrun each rank takes a slice of the last batch: 2 rows over 2 ranks leave each a single row
    import bn
    source = open_data(str(npz_data))
    _check_one_row_batches(bn.make(5), "make", SoftTargetLoader(source, None, batch_size=42, shards=2, shard=0))  # 3 rows a rank
    with pytest.raises(SoftlabelsError, match=r"holds 2 \(300 rows in batches of 298\), 1 of them on a rank of 2"):
        _check_one_row_batches(bn.make(5), "make", SoftTargetLoader(source, None, batch_size=298, shards=2, shard=1))


def test_evaluate_on_inputs_of_another_shape_says_which_shapes(tmp_path, npz_data):
    assert run("train-student", "--data", npz_data, "--student", "mlp", "--hard-labels-only", "--epochs", "1", "--quiet",
               "--out", tmp_path / "r").exit_code == 0
    narrow = make_npz(tmp_path / "narrow.npz", features=10)
    result = run("evaluate", "--model", tmp_path / "r" / "mlp" / "student.pth", "--data", narrow)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.match(rf"error: model .*student.pth was made for inputs \[12\], {re.escape(str(narrow))} has \[10\], which it cannot take",
                    result.output), result.output


def test_an_error_raised_in_a_dataloader_worker_is_told_by_its_own_last_line_with_the_samples(tmp_path, monkeypatch, linear_teacher):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.py").write_text(
        "import numpy as np\nimport torch\n"
        "class Items:\n"
        "    def __len__(self):\n        return 40\n"
        "    def __getitem__(self, i):\n"
        "        if i == 30 and torch.utils.data.get_worker_info() is not None:  # past the fingerprint's reads\n"
        "            raise ValueError('item 30 is broken')\n"
        "        return np.zeros(12, np.float32), 0\n"
        "def make():\n    return Items()\n")
    result = run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", "items.py:make", "--out", "c.zarr",
                 "--num-workers", 1, "--batch-size", 8)
    assert result.exit_code == 1 and result.output == "error: cannot read samples 24..31 of items.py:make: ValueError: item 30 is broken\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.py", "linear_teacher.pth"]  # no partial: nothing was committed
    raised = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "items.py", line 6, in __getitem__\nValueError: item 30 is broken\n')
    assert user_message(raised) == ("ValueError: item 30 is broken (in a DataLoader worker; rerun with --num-workers 0 --debug "
                                    "for the traceback)")


def test_an_output_folder_is_made_where_missing_and_a_file_in_its_way_is_a_one_line_error(tmp_path, monkeypatch, npz_data, linear_teacher):
    monkeypatch.chdir(tmp_path)
    dump = ["dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--quiet", "--out"]
    assert run(*dump, "new/sub/c.zarr").exit_code == 0 and open_cache("new/sub/c.zarr").num_classes == 5
    Path("file").write_text("keep me")
    train = ["train-student", "--data", npz_data, "--hard-labels-only", "--student", "mlp", "--epochs", 1, "--quiet"]
    for args, message in (
        ([*dump, "file/c.zarr"], "cannot write file/c.zarr: File exists (file)"),
        (["convert", "new/sub/c.zarr", "file/t.zarr", "--top-k", 2], "cannot write file/t.zarr: File exists (file)"),
        ([*train, "--out", "file"], "--out file is a file, not a folder"),
        ([*train, "--out", "file/run"], "cannot write file/run: File exists (file)"),
        ([*train, "--out", "run", "--tensorboard", "file"], "--tensorboard file is a file, not a folder"),
    ):
        assert_one_line_error(run(*args), re.escape(message))
    assert Path("file").read_text() == "keep me" and not Path("run").exists()
    assert run(*train, "--out", "trained").exit_code == 0
    for args, message in ((["report", "trained", "--out", "file/report"], "cannot write file/report: File exists (file)"),
                          (["compare", "trained", "--plot", "file/a.png"], "cannot write file/a.png: File exists (file)")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run(*args)
        assert_one_line_error(result, "^error: " + re.escape(message) + "$")
        assert not caught, [str(w.message) for w in caught]  # matplotlib's too: a run without evaluation has nothing to label
    assert Path("file").read_text() == "keep me"


def test_a_plot_keeps_the_name_it_is_given(tmp_path, monkeypatch, npz_data):
    monkeypatch.chdir(tmp_path)
    train = ["train-student", "--data", npz_data, "--hard-labels-only", "--student", "mlp", "--epochs", 1, "--quiet"]
    assert run(*train, "--out", "trained").exit_code == 0
    upper = run("compare", "trained", "--plot", "a.PNG")
    assert upper.exit_code == 2 and "must name a .png file (FILE.png, in lower case)" in upper.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = run("compare", "trained", "--plot", "a.png")
    assert drawn.exit_code == 0 and drawn.output.endswith("wrote a.png\n") and not caught
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".PNG", ".json")) == ["a.json", "a.png"]


@pytest.mark.parametrize("label", [-2, -5])
def test_a_label_below_minus_one_is_refused_alike_by_every_command(tmp_path, linear_teacher, label):
    x = np.zeros((30, 12), np.float32)
    y = np.zeros(30, np.int64)
    y[7] = label  # -2 marks a row softlabels could not read: data may not claim it
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = re.escape(f"dataset {tmp_path / 'd.npz'}: label {label} of row 7 is below -1 (labels are class indices, or -1 for none)")
    teacher = ["--arch", "linear"]
    for args in (["dump", "--teacher", linear_teacher, *teacher, "--data", tmp_path / "d.npz", "--out", tmp_path / "c.zarr"],
                 ["train-student", "--data", tmp_path / "d.npz", "--hard-labels-only", "--student", "mlp", "--out", tmp_path / "r"],
                 ["evaluate", "--model", linear_teacher, *teacher, "--data", tmp_path / "d.npz"]):
        assert_one_line_error(run(*args), message)


def test_one_stray_label_does_not_size_every_students_output(tmp_path):
    y = np.zeros(200, np.int64)
    y[3] = 10**7
    np.savez(tmp_path / "d.npz", x=np.zeros((200, 12), np.float32), y=y)
    result = run("train-student", "--data", tmp_path / "d.npz", "--hard-labels-only", "--student", "mlp", "--out", tmp_path / "r")
    assert_one_line_error(result, re.escape(f"dataset {tmp_path / 'd.npz'}: its largest label 10000000 would make 10,000,001 "
                                            "classes for 200 samples: pass --num-classes if that is right"))
    assert not (tmp_path / "r").exists()


def test_a_damaged_chunk_met_in_a_dataloader_worker_is_told_in_its_own_words(tmp_path, monkeypatch, linear_teacher):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.py").write_text("import numpy as np\ndef make():\n    return [(np.full(12, i, np.float32), i % 5) for i in range(64)]\n")
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", "items.py:make", "--out", "c.zarr",
               "--chunk-rows", 16, "--quiet").exit_code == 0
    chunk = tmp_path / "c.zarr" / "logits" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # DamagedChunk cannot be rebuilt from a message: PyTorch re-raises it from the worker as a RuntimeError
    result = run("train-student", "--cache", "c.zarr", "--data", "items.py:make", "--student", "mlp", "--epochs", 1,
                 "--num-workers", 1, "--out", "r")
    assert result.exit_code == 1 and result.output == (
        "error: c.zarr: array 'logits' chunk 2 (rows 32-47) is damaged (its crc32c does not match its bytes); "
        "run softlabels verify for a full report\n"), result.output


def test_verify_takes_a_teacher_or_data_only_with_recompute(tmp_path, npz_data, linear_teacher):
    assert run("dump", "--teacher", linear_teacher, "--arch", "linear", "--data", npz_data, "--out", tmp_path / "c.zarr",
               "--quiet").exit_code == 0
    for extra in (["--teacher", linear_teacher], ["--data", npz_data]):
        result = run("verify", tmp_path / "c.zarr", *extra)
        assert result.exit_code == 2 and "--teacher and --data serve --recompute N" in result.output, result.output
    result = run("verify", tmp_path / "c.zarr", "--recompute", "5")
    assert result.exit_code == 2 and result.output.startswith("error: --recompute needs --teacher (see ") and "verify --help)" in result.output, result.output


def test_the_package_gives_its_public_names_and_its_submodules_on_first_use():
    code = ("import softlabels, types; "
            "assert isinstance(softlabels.distributed, types.ModuleType) and callable(softlabels.distributed.init); "
            "assert callable(softlabels.dump) and callable(softlabels.open_cache); "
            "import softlabels.dump; assert callable(softlabels.dump); "
            "print(hasattr(softlabels, 'no_such_name'), hasattr(softlabels, 'kinds.dense'), getattr(softlabels, '.dump', None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False False None", out.stderr
