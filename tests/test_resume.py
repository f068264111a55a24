"""Training survives being killed: checkpoints, --resume to bit-identical weights, refused option
changes, no silent overwrite, and the caller's random state left as it was."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from softlabels import StudentSpec, TrainConfig, open_cache, open_data, train_students
from softlabels import train as train_module
from softlabels.durable import exclusive
from softlabels.cli import cli

from .conftest import flip_tensor_bit

ZOO = textwrap.dedent("""
    import os
    import time
    from pathlib import Path
    from torch import nn

    Path("CANARY").write_text("imported")

    class Sleepy(nn.Module):
        '''A student with dropout that sleeps per step, so a run lasts long enough to be killed.'''
        def __init__(self, num_classes):
            super().__init__()
            self.delay = float(os.environ.get("STEP_DELAY", "0"))
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, num_classes))
        def forward(self, x):
            time.sleep(self.delay)
            return self.net(x)

    class TrainFails(nn.Module):
        '''Fine in eval mode (the shape check), failing at its first training step.'''
        def __init__(self, num_classes):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))
        def forward(self, x):
            if self.training:
                raise RuntimeError("cannot train")
            return self.net(x)
""")

STUDENTS = ["--student", "zoo:Sleepy", "--student", "mlp?width=16"]
COMMON = ["--epochs", "3", "--batch-size", "32", "--checkpoint-every", "4", "--device", "cpu", "--seed", "1", "--quiet"]


@pytest.fixture
def setup(tmp_path, npz_data, linear_teacher, monkeypatch):
    """A working directory with zoo.py, a 300-row cache (10 steps of 32 per epoch) and its data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo.py").write_text(ZOO)
    done = CliRunner().invoke(cli, ["dump", "--teacher", str(linear_teacher), "--arch", "linear", "--data", str(npz_data),
                                    "--out", "c.zarr", "--chunk-rows", "32", "--quiet"])
    assert done.exit_code == 0, done.output
    yield tmp_path
    sys.modules.pop("zoo", None)


def train_args(out, *extra):
    return ["train-student", "--cache", "c.zarr", *STUDENTS, *COMMON, "--out", str(out), *extra]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def weights(run_dir, name):
    return torch.load(run_dir / name / "student.pth", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    for name in ("Sleepy", "mlp"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def metrics(run_dir, name):
    return [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]


def checkpoint_position(path):
    try:
        return torch.load(path, weights_only=True)["position"]
    except Exception:  # not written yet
        return None


def start_and_kill(root, out, *extra, until):
    """Start train-student in a subprocess, SIGKILL it as soon as its checkpoint satisfies ``until``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_DELAY": "0.02"}
    cmd = [sys.executable, "-m", "softlabels"] + [str(a) for a in train_args(out, *extra)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    position = None
    while time.time() < deadline and proc.poll() is None:
        position = checkpoint_position(out / "checkpoint.pt")
        if position is not None and until(position):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]  # killed, not finished
    return position


@pytest.mark.slow
def test_a_run_killed_twice_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(setup):
    root = setup
    whole = subprocess.run([sys.executable, "-m", "softlabels"] + train_args(root / "whole"), cwd=root,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "wrote" in whole.stdout

    killed = root / "killed"
    first = start_and_kill(root, killed, until=lambda p: True)  # the first checkpoint: mid-epoch, step 4
    assert first == {"epoch": 0, "batches": 4}
    assert not (killed / "summary.json").exists()
    second = start_and_kill(root, killed, "--resume", until=lambda p: p["epoch"] >= 1 and p["batches"] > 0)
    assert second["epoch"] >= 1 and second["batches"] in (4, 8)  # a mid-epoch checkpoint after an epoch's end
    assert len(metrics(killed, "mlp")) == second["epoch"]  # metrics.jsonl never runs ahead of the checkpoint's epochs
    resumed = subprocess.run([sys.executable, "-m", "softlabels"] + train_args(killed, "--resume"), cwd=root,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert_same_weights(root / "whole", killed)
    for name in ("Sleepy", "mlp"):
        assert without_seconds(metrics(killed, name)) == without_seconds(metrics(root / "whole", name))
        assert [r["epoch"] for r in metrics(killed, name)] == [1, 2, 3]
    summary = json.loads((killed / "summary.json").read_text())
    assert [row["student"] for row in summary] == ["Sleepy", "mlp"]
    assert not list(killed.rglob("*.tmp")) and not list(killed.rglob("*.staging"))


@pytest.mark.parametrize("steps", [3, 10, 14, 29])
def test_an_interrupted_run_resumes_exactly_from_any_checkpoint(setup, monkeypatch, steps):
    """In process: the run stops at a step (an exception, like a kill), then resumes."""
    cache = open_cache("c.zarr")
    source = open_data("data.npz")
    config = TrainConfig(epochs=3, batch_size=32, device="cpu", checkpoint_every=1, seed=2)
    students = [StudentSpec("mlp", {"width": 8}), StudentSpec("zoo:Sleepy")]  # Sleepy has dropout: its random state counts
    train_students(students, source=source, cache=cache, config=config, out_dir="whole", progress=False)
    original, taken = train_module._step, []

    def step(*args):
        if len(taken) == steps:
            raise KeyboardInterrupt
        taken.append(1)
        original(*args)
    monkeypatch.setattr(train_module, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        train_students(students, source=source, cache=cache, config=config, out_dir="cut", progress=False)
    monkeypatch.setattr(train_module, "_step", original)
    position = torch.load("cut/checkpoint.pt", weights_only=True)["position"]
    assert position == {"epoch": steps // 10, "batches": steps % 10}
    train_students(students, source=source, cache=cache, config=config, out_dir="cut", progress=False, resume=True)
    for name in ("mlp", "Sleepy"):
        a, b = weights(setup / "whole", name), weights(setup / "cut", name)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert metrics(setup / "cut", name) == [{**r, "seconds": s["seconds"]} for r, s in
                                                zip(metrics(setup / "whole", name), metrics(setup / "cut", name))]


def test_the_checkpoint_loads_safely_and_holds_the_whole_state(setup):
    result = run(*train_args("r"))
    assert result.exit_code == 0, result.output
    saved = torch.load("r/checkpoint.pt", weights_only=True)
    assert saved["position"] == {"epoch": 3, "batches": 0}
    student = saved["students"]["Sleepy"]
    assert set(student) >= {"model", "optimizer", "schedule", "rng", "history", "loss_sum", "loss_count"}
    assert isinstance(student["rng"]["cpu"], torch.Tensor) and student["rng"]["cpu"].dtype == torch.uint8
    assert saved["options"]["config"]["lr"] == 0.003 and saved["options"]["student"] == ["Sleepy=zoo:Sleepy", "mlp=mlp {\"width\": 16}"]
    assert saved["options"]["cache_identity"]["teacher.sha256"] == open_cache("c.zarr").manifest["teacher"]["sha256"]


@pytest.mark.parametrize("change, message", [
    (["--lr", "0.01"], "--lr was 0.003, now 0.01"),
    (["--temperature", "2"], "--temperature was 4.0, now 2.0"),
    (["--hard-labels-only"], "--hard-labels-only was False, now True"),
])
def test_resume_with_other_options_is_refused_naming_the_option(setup, change, message):
    assert run(*train_args("r")).exit_code == 0
    before = (setup / "r" / "checkpoint.pt").read_bytes()
    result = run(*train_args("r"), "--resume", *change)
    assert result.exit_code == 1
    assert result.output.strip() == f"error: cannot resume r: {message}"
    assert (setup / "r" / "checkpoint.pt").read_bytes() == before


def test_resume_on_other_targets_is_refused(setup):
    for k in (5, 3):  # two caches converted from one: the same teacher, data and dates
        assert run("convert", "c.zarr", f"t{k}.zarr", "--top-k", k).exit_code == 0
    common = ["--student", "mlp?width=16", "--epochs", "1", "--device", "cpu", "--quiet"]
    assert run("train-student", "--cache", "t5.zarr", *common, "--out", "k").exit_code == 0
    result = run("train-student", "--cache", "t3.zarr", *common, "--out", "k", "--resume")
    assert result.output.strip() == "error: cannot resume k: --cache t3.zarr is not the cache the run started from t5.zarr (its kind differs)"


def test_a_flipped_bit_in_a_checkpoints_tensor_is_refused_by_the_zip_crc(setup):
    assert run(*train_args("r")).exit_code == 0
    flip_tensor_bit(Path("r/checkpoint.pt"))
    result = run(*train_args("r"), "--resume")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(r"^error: cannot read checkpoint r/checkpoint.pt: its member \S+/data/\S+ fails its CRC-32", result.output)


DAMAGED_STATES = {  # what a stranger's checkpoint may hold, each applied to the state of student mlp
    "optimizer state of another shape": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
    "optimizer state missing a moment": lambda s: s["optimizer"]["state"][0].pop("exp_avg_sq"),
    "negative optimizer step": lambda s: s["optimizer"]["state"][1].update(step=torch.tensor(-5.0)),
    "learning rate of a string": lambda s: s["optimizer"]["param_groups"][0].update(lr="x"),
    "one beta": lambda s: s["optimizer"]["param_groups"][0].update(betas=(5.0,)),
    "infinite weight decay": lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=float("inf")),
    "schedule of a string": lambda s: s["schedule"].update(last_epoch="x"),
    "schedule of other learning rates": lambda s: s["schedule"].update(base_lrs=[5.0] * len(s["schedule"]["base_lrs"])),
    "amsgrad switched on": lambda s: s["optimizer"]["param_groups"][0].update(amsgrad=True),
    "gradient ascent": lambda s: s["optimizer"]["param_groups"][0].update(maximize=True),
    "another weight decay": lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=1e30),
    "metrics of other names": lambda s: s.update(metrics={"a": 1}),
    "metrics not the last epoch's": lambda s: s["metrics"].update(accuracy=0.5),
    "history of a string loss": lambda s: s["history"][0].update(train_loss="x"),
    "history of an accuracy of 2": lambda s: s["history"][-1].update(eval_accuracy=2.0),
    "loss terms of a list": lambda s: s.update(terms=[1]),
    "seconds below zero": lambda s: s.update(seconds=-5.0),
}


@pytest.mark.parametrize("damage", ["not a dict", "states missing", "bad weights", "bad random state", "bad history",
                                    "position before its history", "history of strings", *DAMAGED_STATES])
def test_a_damaged_checkpoint_is_refused_in_one_line(setup, damage):
    """Before anything of the run is written: what the checkpoint holds would otherwise fail steps
    later in a traceback, or write metrics.jsonl and summary.json that report refuses."""
    assert run(*train_args("r")).exit_code == 0
    written = {path: path.read_bytes() for path in Path("r").rglob("*") if path.is_file()}
    saved = torch.load("r/checkpoint.pt", weights_only=True)
    if damage == "not a dict":
        saved = [saved]
    elif damage == "states missing":
        saved["students"] = {}
    elif damage == "bad weights":
        saved["students"]["Sleepy"]["model"] = {"net.1.weight": torch.zeros(3)}
    elif damage == "bad random state":
        saved["students"]["mlp"]["rng"]["cpu"] = torch.zeros(5, dtype=torch.uint8)
    elif damage == "bad history":
        saved["students"]["mlp"]["history"] = "none"
    elif damage == "position before its history":  # it would train an epoch again and write it twice
        saved["position"]["epoch"] -= 1
    elif damage in DAMAGED_STATES:
        DAMAGED_STATES[damage](saved["students"]["mlp"])
    else:
        for record in saved["students"]["mlp"]["history"]:
            record["epoch"] = str(record["epoch"])
    torch.save(saved, "r/checkpoint.pt")
    written[Path("r/checkpoint.pt")] = Path("r/checkpoint.pt").read_bytes()
    result = run(*train_args("r"), "--resume")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    expected = "is not a train-student checkpoint" if damage == "not a dict" else "checkpoint.pt is damaged"
    assert result.output.startswith("error: ") and expected in result.output, result.output
    assert {path: path.read_bytes() for path in Path("r").rglob("*") if path.is_file()} == written


def test_optimizer_settings_another_torch_version_adds_or_drops_do_not_stop_a_resume(setup):
    """A group or schedule saved without a setting this torch has gets its default; one this torch
    lacks is ignored."""
    assert run(*train_args("r", "--epochs", "1")).exit_code == 0
    saved = torch.load("r/checkpoint.pt", weights_only=True)
    for student in saved["students"].values():
        for group in student["optimizer"]["param_groups"]:
            del group["amsgrad"]
            group["a_later_setting"] = 1.0
        del student["schedule"]["_is_initial"]
        student["schedule"]["verbose"] = False
    torch.save(saved, "r/checkpoint.pt")
    result = run(*train_args("r", "--epochs", "1"), "--resume")
    assert result.exit_code == 0, result.output


def test_resume_with_other_students_is_refused_before_their_code_is_imported(setup):
    assert run(*train_args("r")).exit_code == 0
    os.remove("CANARY")
    sys.modules.pop("zoo", None)
    result = run("train-student", "--cache", "c.zarr", "--student", "mlp?width=16", *COMMON, "--out", "r", "--resume")
    assert result.output.strip() == ("error: cannot resume r: --student was Sleepy=zoo:Sleepy, mlp=mlp {\"width\": 16}, "
                                     "now mlp=mlp {\"width\": 16}")
    assert not os.path.exists("CANARY")  # the recorded zoo:Sleepy was never imported


def test_an_existing_run_is_not_overwritten_without_overwrite(setup):
    first = run(*train_args("r"))
    assert first.exit_code == 0 and "wrote r/summary.json" in first.output
    before = weights(setup / "r", "mlp")
    again = run(*train_args("r"))
    assert again.exit_code == 1
    assert again.output.strip() == "error: r already holds a training run: pass --resume to continue it or --overwrite to replace it"
    assert all(torch.equal(before[k], weights(setup / "r", "mlp")[k]) for k in before)
    (setup / "r" / "notes.txt").write_text("mine")
    # a replacement that cannot start (a student that cannot be built) leaves the run as it was
    broken = run("train-student", "--cache", "c.zarr", "--student", "mlp?width=-3", *COMMON, "--out", "r", "--overwrite")
    assert broken.exit_code == 1 and "mlp: width must be an integer of at least 1, got -3" in broken.output
    assert (setup / "r" / "summary.json").exists() and all(torch.equal(before[k], weights(setup / "r", "mlp")[k]) for k in before)
    replaced = run("train-student", "--cache", "c.zarr", "--student", "mlp?width=16", *COMMON, "--out", "r", "--overwrite", "--lr", "0.01")
    assert replaced.exit_code == 0 and "wrote r/summary.json" in replaced.output
    # the replaced run's other student is gone with it; what the run did not write stays
    assert not (setup / "r" / "Sleepy").exists() and (setup / "r" / "notes.txt").read_text() == "mine"
    replaced = run(*train_args("r"), "--overwrite", "--lr", "0.01")
    assert replaced.exit_code == 0 and "wrote r/summary.json" in replaced.output
    assert torch.load("r/checkpoint.pt", weights_only=True)["options"]["config"]["lr"] == 0.01
    finished = run(*train_args("r"), "--resume", "--lr", "0.01")  # a finished run resumes to the same outputs
    assert finished.exit_code == 0 and "wrote r/summary.json" in finished.output


def test_a_replacement_that_fails_in_its_first_steps_leaves_the_run_as_it_was(setup):
    assert run(*train_args("r")).exit_code == 0
    before = {name: (setup / "r" / name).read_bytes() for name in ("summary.json", "checkpoint.pt", "config.json", "mlp/student.pth")}
    failed = run("train-student", "--cache", "c.zarr", "--student", "zoo:TrainFails", *COMMON, "--out", "r", "--overwrite")
    assert failed.exit_code == 1 and "cannot train" in failed.output
    assert {name: (setup / "r" / name).read_bytes() for name in before} == before
    assert run(*train_args("r"), "--resume").exit_code == 0  # still the run it was


def test_one_process_at_a_time_writes_a_run_and_a_killed_write_leaves_no_temporary_behind(setup):
    with exclusive(setup / "r", "train-student"):
        held = run(*train_args("r"))
    assert held.exit_code == 1 and held.output.strip() == "error: another train-student is writing r (it holds r.lock)"
    assert not (setup / "r").exists() and not (setup / "r.lock").exists()
    (setup / "r" / "mlp").mkdir(parents=True)
    for left in ("checkpoint.pt.4242.tmp", "mlp/student.pth.4242.tmp"):  # what a kill -9 mid-write leaves
        (setup / "r" / left).write_bytes(b"x" * 1000)
    (setup / "r" / "notes.tmp").write_text("mine")
    assert run(*train_args("r")).exit_code == 0
    assert sorted(p.name for p in (setup / "r").rglob("*.tmp")) == ["notes.tmp"]


def test_resume_without_a_checkpoint_starts_the_run(setup):
    result = run(*train_args("fresh"), "--resume")
    assert result.exit_code == 0 and "wrote fresh/summary.json" in result.output
    assert (setup / "fresh" / "mlp" / "student.pth").exists()


def test_train_students_gives_the_caller_its_random_state_and_cudnn_choices_back(setup, monkeypatch):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # training picks deterministic kernels, unbenchmarked
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    config = TrainConfig(epochs=1, batch_size=64, device="cpu")
    train_students([StudentSpec("zoo:Sleepy"), StudentSpec("mlp")], source=open_data("data.npz"), cache=open_cache("c.zarr"),
                   config=config, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_workers_do_not_change_what_is_trained(setup):
    source, cache = open_data("data.npz"), open_cache("c.zarr")
    for workers, out in ((0, "w0"), (2, "w2")):
        config = TrainConfig(epochs=2, batch_size=32, device="cpu", num_workers=workers)
        train_students([StudentSpec("zoo:Sleepy"), StudentSpec("mlp")], source=source, cache=cache, config=config,
                       out_dir=out, progress=False)
    assert_same_weights(setup / "w0", setup / "w2")


def test_every_run_file_is_synced_under_a_temporary_name_then_renamed_over_its_own(setup, monkeypatch):
    """No run file is ever half-written: each reaches its name by a rename of a temporary file whose
    bytes were fsynced first, and a write that fails midway leaves the file it would replace as it was."""
    synced, renamed = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        renamed.append((os.path.abspath(src), os.path.abspath(dst), os.path.abspath(src) in synced))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert run(*train_args("r")).exit_code == 0
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "replace", real_replace)
    files = ["checkpoint.pt", "config.json", "summary.json", "mlp/student.pth", "mlp/metrics.jsonl", "Sleepy/student.pth",
             "Sleepy/metrics.jsonl"]
    for name in files:
        target = os.path.abspath(f"r/{name}")
        ways = [(src, was_synced) for src, dst, was_synced in renamed if dst == target]
        assert ways and all(was_synced and src != target for src, was_synced in ways), (name, ways)

    from softlabels.durable import write_atomically

    before = (setup / "r" / "summary.json").read_bytes()

    def half(f):
        f.write(b'[{"student": "cut')
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        write_atomically(setup / "r" / "summary.json", half)
    assert (setup / "r" / "summary.json").read_bytes() == before
    assert not list((setup / "r").glob("*.tmp"))
