"""Figures and the HTML report of real (small) runs and caches, compare --plot, and TensorBoard
scalars: every number a figure shows is checked against the files it came from, recomputed here."""

import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from matplotlib.image import imread

from softlabels.calibration import Calibration
from softlabels.cli import cli

from .conftest import TRANSFER

TEACHER_T = 4.0  # train-student's default --temperature, the report's second entropy temperature


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def metrics(run_dir, student):
    return [json.loads(line) for line in (run_dir / student / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo in small: a teacher trained for 2 epochs, its caches (test split, transfer set, and
    4 recorded views of the test split), a scratch run and a distilled run, then the report."""
    root = tmp_path_factory.mktemp("demo")
    epochs = ["--epochs", 2, "--quiet"]
    ok("train-student", "--data", "mnist1d://train", "--hard-labels-only", "--student", "teacher=cnn1d?channels=8",
       "--eval-data", "mnist1d://test", "--out", root / "teacher", *epochs)
    teacher = root / "teacher" / "teacher" / "student.pth"
    ok("dump", "--teacher", teacher, "--data", "mnist1d://test", "--out", root / "test.zarr", "--quiet", "--chunk-rows", 256)
    ok("dump", "--teacher", teacher, "--data", TRANSFER, "--out", root / "transfer.zarr", "--quiet", "--chunk-rows", 512)
    ok("dump", "--teacher", teacher, "--data", "mnist1d://test", "--out", root / "views.zarr", "--quiet", "--views", 4,
       "--augment", "shift?max=6", "--chunk-rows", 128)
    ok("train-student", "--data", "mnist1d://train", "--hard-labels-only", "--student", "linear", "--student", "mlp?width=32",
       "--eval-cache", root / "test.zarr", "--out", root / "scratch", *epochs)
    ok("train-student", "--cache", root / "transfer.zarr", "--student", "linear", "--student", "mlp?width=32",
       "--eval-cache", root / "test.zarr", "--out", root / "distilled", "--tensorboard", root / "tb", *epochs)
    runs = [root / "teacher", root / "scratch", root / "distilled"]
    caches = [root / "transfer.zarr", root / "test.zarr", root / "views.zarr"]
    ok("report", *runs, *[a for c in caches for a in ("--cache", c)], "--out", root / "report", "--quiet")
    return root


def figure(demo, stem):
    return json.loads((demo / "report" / f"{stem}.json").read_text())


def probabilities(logits, temperature=1.0):
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def test_report_folder_is_complete_and_self_contained(demo):
    out = demo / "report"
    listed = json.loads((out / "report.json").read_text())["figures"]
    pngs = sorted(out.glob("*.png"))
    assert sorted(f["png"] for f in listed) == [p.name for p in pngs]
    expected = {"accuracy-vs-params", "learning-curves", "agreement", "reliability", "transfer-entropy", "transfer-mass-kept",
                "test-entropy", "test-mass-kept", "test-class-accuracy", "views-entropy", "views-mass-kept",
                "views-class-accuracy", "views-view-spread"}
    assert {p.stem for p in pngs} == expected  # transfer has no labels, so no accuracy per class
    for png in pngs:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 150 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
        assert png.with_suffix(".json").is_file()
    page = (out / "index.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sorted(s for s in sources if s.endswith(".png")) == [p.name for p in pngs]
    assert all((out / s).is_file() for s in sources)  # only files beside the page, nothing external
    assert "http" not in page.lower().replace("http-equiv", "")
    # the tables compare and inspect print, as they print them
    compared = ok("compare", demo / "teacher", demo / "scratch", demo / "distilled").output.strip()
    inspected = ok("inspect", demo / "test.zarr").output.strip()
    for table in (compared, inspected):
        assert table.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page
    assert not [p for p in demo.iterdir() if p.name.endswith(".partial")]


def test_run_figures_equal_metrics_and_summaries(demo):
    curves = figure(demo, "learning-curves")["series"]
    agreement = figure(demo, "agreement")
    names = [(s["run"], s["student"]) for s in curves]
    assert names == [("teacher", "teacher"), ("scratch", "linear"), ("scratch", "mlp"), ("distilled", "linear"),
                     ("distilled", "mlp")]
    for series in curves:
        records = metrics(demo / series["run"], series["student"])
        assert series["epoch"] == [1, 2]
        assert series["train_loss"] == [r["train_loss"] for r in records]
        assert series["eval_accuracy"] == [r["eval_accuracy"] for r in records]
    # the teacher run was evaluated without a teacher, so it has no agreement
    assert [(s["run"], s["student"]) for s in agreement["series"]] == names[1:]
    for series in agreement["series"]:
        assert series["teacher_agreement"] == [r["teacher_agreement"] for r in metrics(demo / series["run"], series["student"])]
    # the teacher is found by its checkpoint's hash in the distilled run's cache, and drawn as a line
    points = figure(demo, "accuracy-vs-params")
    teacher_row = summary(demo / "teacher")[0]
    assert points["teacher"] == {"run": "teacher", "student": "teacher", "params": teacher_row["params"],
                                 "eval_accuracy": teacher_row["eval_accuracy"]}
    expected = [{"run": name, "student": row["student"], "params": row["params"], "eval_accuracy": row["eval_accuracy"]}
                for name in ("scratch", "distilled") for row in summary(demo / name)]
    assert points["points"] == expected


def independent_ece(confidence, correct, bins=15):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        upper = confidence <= edges[b + 1] if b == bins - 1 else confidence < edges[b + 1]
        inside = (confidence >= edges[b]) & upper
        if inside.any():
            total += inside.sum() / len(confidence) * abs(confidence[inside].mean() - correct[inside].mean())
    return total


def test_reliability_ece_equals_an_independent_computation(demo):
    panels = figure(demo, "reliability")["panels"]
    assert [(p["run"], p["student"]) for p in panels] == [("teacher", "teacher"), ("scratch", "linear"), ("scratch", "mlp"),
                                                          ("distilled", "linear"), ("distilled", "mlp")]
    for panel in panels:
        with np.load(demo / panel["run"] / panel["student"] / "eval_predictions.npz", allow_pickle=False) as saved:
            predicted, confidence, labels = saved["predicted"], saved["confidence"], saved["labels"]
        assert predicted.shape == labels.shape == (1000,)
        correct = (predicted == labels).astype(float)
        assert panel["ece"] == pytest.approx(independent_ece(confidence, correct), abs=1e-12)
        row = next(r for r in summary(demo / panel["run"]) if r["student"] == panel["student"])
        assert panel["ece"] == pytest.approx(row["ece"], abs=1e-12)  # what train-student reported
        assert correct.mean() == pytest.approx(row["eval_accuracy"])
        assert sum(panel["count"]) == 1000
        filled = [i for i, c in enumerate(panel["count"]) if c]
        assert sum(panel["count"][i] * panel["accuracy"][i] for i in filled) == pytest.approx(correct.sum())


def test_calibration_bins_edges_like_the_independent_definition():
    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.uniform(0.1, 1.0, 500), np.arange(16) / 15])  # values on every bin edge too
    correct = (rng.uniform(size=confidence.size) < confidence).astype(float)
    calibration = Calibration()
    calibration.add(confidence[:200], correct[:200])
    calibration.add(confidence[200:], correct[200:])
    assert calibration.ece() == pytest.approx(independent_ece(confidence, correct), abs=1e-12)
    assert Calibration().ece() is None


def test_entropy_histograms_equal_the_cache(demo):
    group = zarr.open_group(str(demo / "transfer.zarr"), mode="r")
    logits = group["logits"][:]
    data = figure(demo, "transfer-entropy")
    assert [t["temperature"] for t in data["temperatures"]] == [1.0, TEACHER_T]
    for entry in data["temperatures"]:
        p = probabilities(logits, entry["temperature"])
        entropy = -(p * np.log(p)).sum(-1)
        edges = np.linspace(0, math.log(10), 31)
        np.testing.assert_allclose(entry["edges"], edges)
        assert entry["counts"] == np.histogram(entropy, bins=edges)[0].tolist()
        assert entry["mean"] == pytest.approx(entropy.mean(), rel=1e-9)
    inspected = json.loads(ok("inspect", demo / "transfer.zarr", "--json").output)
    assert data["temperatures"][0]["mean"] == pytest.approx(inspected["statistic"]["mean"], rel=1e-9)


def test_mass_kept_curve_ends_at_one_never_decreases_and_equals_the_cache(demo):
    logits = zarr.open_group(str(demo / "test.zarr"), mode="r")["logits"][:]
    data = figure(demo, "test-mass-kept")
    for entry in data["temperatures"]:
        curve = np.array(entry["mass"])
        assert entry["k"] == list(range(1, 11))
        assert curve[-1] == pytest.approx(1.0, abs=1e-12)
        assert (np.diff(curve) >= 0).all()
        p = -np.sort(-probabilities(logits, entry["temperature"]), axis=-1)
        np.testing.assert_allclose(curve, np.cumsum(p, -1).mean(0), rtol=1e-9)
        for level, k in entry["k_for_level"].items():
            assert curve[k - 1] >= float(level) and (k == 1 or curve[k - 2] < float(level))
    # spread over more classes at the training temperature: more classes for the same mass
    low, high = data["temperatures"]
    assert high["k_for_level"]["0.9"] >= low["k_for_level"]["0.9"]


def test_class_accuracy_and_view_spread_equal_the_cache(demo):
    group = zarr.open_group(str(demo / "test.zarr"), mode="r")
    logits, labels = group["logits"][:], group["labels"][:]
    data = figure(demo, "test-class-accuracy")
    predicted = logits.argmax(-1)
    for c in range(10):
        assert data["labeled"][c] == int((labels == c).sum())
        assert data["correct"][c] == int(((labels == c) & (predicted == c)).sum())
    assert sum(data["correct"]) / 1000 == pytest.approx(group.attrs["softlabels"]["teacher_accuracy"])

    views = zarr.open_group(str(demo / "views.zarr"), mode="r")["logits"][:]  # [N, V, C]
    p = probabilities(views)
    distance = 0.5 * np.abs(p - p.mean(1, keepdims=True)).sum(-1).mean(-1)
    spread = figure(demo, "views-view-spread")
    assert spread["views"] == 4
    edges = np.array(spread["edges"])
    np.testing.assert_allclose(edges, np.linspace(0, 1, len(edges)))
    assert spread["counts"] == np.histogram(distance, bins=edges)[0].tolist()
    assert spread["mean"] == pytest.approx(distance.mean(), rel=1e-9)
    top = views.argmax(-1)
    assert spread["samples_with_disagreeing_top_class"] == int((top != top[:, :1]).any(1).sum())


def test_bad_input_is_one_line_error_and_writes_nothing(demo, tmp_path):
    before = (demo / "report" / "index.html").read_bytes()
    (tmp_path / "empty-run").mkdir()
    assert_one_line_error(run("report", tmp_path / "empty-run", "--out", tmp_path / "r"), "has no summary.json")
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(demo / "test.zarr", incomplete)
    group = zarr.open_group(str(incomplete), mode="r+")
    group.attrs["softlabels"] = {**group.attrs["softlabels"], "complete": False}
    assert_one_line_error(run("report", "--cache", incomplete, "--out", tmp_path / "r"), "incomplete")
    assert_one_line_error(run("report", demo / "scratch", "--out", demo / "report"), "already exists: pass --overwrite")
    assert (demo / "report" / "index.html").read_bytes() == before
    # a folder of someone's files is never replaced, even with --overwrite
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert_one_line_error(run("report", demo / "scratch", "--out", tmp_path / "notes", "--overwrite"), "not a softlabels report")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # a run whose metrics hold something other than numbers
    damaged = tmp_path / "damaged"
    shutil.copytree(demo / "scratch", damaged)
    (damaged / "mlp" / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": "__import__(\'os\')"}\n')
    assert_one_line_error(run("report", damaged, "--out", tmp_path / "r"), r"metrics.jsonl, line 1: 'train_loss' must be a number")
    # run options that are a pipe (reading would block forever) or an endless device
    piped = tmp_path / "piped"
    shutil.copytree(demo / "distilled", piped)
    (piped / "config.json").unlink()
    os.mkfifo(piped / "config.json")
    assert_one_line_error(run("report", piped, "--out", tmp_path / "r"), "cannot read run options .*config.json: not a regular file")
    (piped / "config.json").unlink()
    (piped / "config.json").symlink_to("/dev/zero")
    assert_one_line_error(run("report", piped, "--out", tmp_path / "r"), "cannot read run options .*config.json: not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "empty-run", "incomplete.zarr", "notes", "piped"]


def test_overwrite_replaces_a_report(demo, tmp_path):
    out = tmp_path / "report"
    ok("report", demo / "scratch", "--out", out, "--quiet")
    ok("report", "--cache", demo / "test.zarr", "--out", out, "--overwrite", "--quiet")
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json", "test-class-accuracy.json",
                                                     "test-class-accuracy.png", "test-entropy.json", "test-entropy.png",
                                                     "test-mass-kept.json", "test-mass-kept.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_compare_plot_draws_accuracy_against_parameters(demo, tmp_path):
    out = tmp_path / "acc.png"
    result = ok("compare", demo / "teacher", demo / "scratch", demo / "distilled" / "summary.json", "--plot", out)
    assert "distilled" in result.output and f"wrote {out}" in result.output
    assert imread(out).shape[2] in (3, 4)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["teacher"]["student"] == "teacher"
    assert [(p["run"], p["student"], p["params"], p["eval_accuracy"]) for p in data["points"]] == [
        (name, row["student"], row["params"], row["eval_accuracy"]) for name in ("scratch", "distilled") for row in summary(demo / name)]
    before = out.read_bytes()
    assert_one_line_error(run("compare", demo / "scratch", "--plot", out), f"{out} exists; pass --overwrite to replace it")
    assert out.read_bytes() == before
    ok("compare", demo / "scratch", "--plot", out, "--overwrite")
    assert [p["run"] for p in json.loads(out.with_suffix(".json").read_text())["points"]] == ["scratch"] * len(summary(demo / "scratch"))
    assert_one_line_error(run("compare", tmp_path, "--plot", tmp_path / "other.png"), f"{tmp_path} is not a finished train-student run: it has no summary.json")


def test_loss_terms_in_metrics(demo):
    for record in metrics(demo / "scratch", "mlp"):  # hard labels only: the loss is the cross-entropy
        assert record["train_ce"] == pytest.approx(record["train_loss"]) and record["train_kl"] is None
    for record in metrics(demo / "distilled", "mlp"):  # no labels in the transfer set: the soft term alone
        assert record["train_ce"] is None
        assert record["train_kl"] * 0.5 * TEACHER_T**2 == pytest.approx(record["train_loss"], rel=1e-5)


def test_tensorboard_scalars_equal_metrics(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for student in ("linear", "mlp"):
        events = EventAccumulator(str(demo / "tb" / student))
        events.Reload()
        records = metrics(demo / "distilled", student)
        for tag, field in [("loss/train", "train_loss"), ("loss/soft_kl", "train_kl"), ("eval/accuracy", "eval_accuracy"),
                           ("eval/teacher_agreement", "teacher_agreement"), ("eval/ece", "ece"), ("lr", "lr")]:
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [1, 2]
            assert [s.value for s in scalars] == pytest.approx([r[field] for r in records], rel=1e-6)
        assert "loss/hard_ce" not in events.Tags()["scalars"]  # no labels, no hard term
        rates = [s.value for s in events.Scalars("rows_per_second")]
        assert len(rates) == 2 and all(r > 1000 for r in rates)


def test_tensorboard_without_the_extra_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    result = run("train-student", "--data", "mnist1d://train", "--hard-labels-only", "--student", "linear",
                 "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb", "--epochs", 1, "--quiet")
    assert_one_line_error(result, r"--tensorboard needs the tensorboard package: pip install 'softlabels\[tensorboard\]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_names_from_files_are_escaped_and_drawn_as_written(demo, tmp_path):
    """A run directory named with HTML and matplotlib's math markup, given twelve times (more runs than
    markers, the same run twice): the report is written, the name escaped in the page, every run plotted."""
    odd = tmp_path / 'run$\\foo$<script>"x"'
    shutil.copytree(demo / "scratch", odd)
    out = tmp_path / "report"
    ok("report", *[odd] * 2, *[demo / "scratch"] * 10, "--out", out, "--quiet")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    points = json.loads((out / "accuracy-vs-params.json").read_text())["points"]
    assert len(points) == 12 * 2  # two students per run
    assert imread(out / "accuracy-vs-params.png").ndim == 3


def test_runs_that_share_a_folder_name_are_told_apart(demo, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(demo / "scratch", tmp_path / parent / "kd")
    runs = [tmp_path / "a" / "kd", tmp_path / "b" / "kd", demo / "scratch"]
    table = ok("compare", *runs, "--plot", tmp_path / "acc.png").output
    assert "a/kd" in table and "b/kd" in table
    points = json.loads((tmp_path / "acc.json").read_text())["points"]
    assert list(dict.fromkeys(p["run"] for p in points)) == ["a/kd", "b/kd", "scratch"]
    ok("report", *runs, "--out", tmp_path / "report", "--quiet")
    curves = json.loads((tmp_path / "report" / "learning-curves.json").read_text())["series"]
    assert list(dict.fromkeys(s["run"] for s in curves)) == ["a/kd", "b/kd", "scratch"]


@pytest.mark.parametrize("params", [(20_000, 60_000), (900, 3_000_000)])
def test_log_axis_ticks_are_plain_text(params):
    """Names are drawn as written (no math text), so the log axis's numbers must not be math text either."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib import rc_context
    from softlabels.figures import DRAW

    points = [{"run": "r", "student": f"s{i}", "params": p, "eval_accuracy": 0.5 + i / 10} for i, p in enumerate(params)]
    with rc_context({"text.parse_math": False}):
        fig = Figure()
        FigureCanvasAgg(fig)
        DRAW["accuracy_vs_params"](fig, {"points": points, "teacher": None})
        fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?[kM]?", label) for label in labels), labels


@pytest.mark.parametrize("field, value, message", [
    ("eval_accuracy", 1.5, "'eval_accuracy' must be a share from 0 to 1, got 1.5"),
    ("teacher_agreement", -0.2, "'teacher_agreement' must be a share from 0 to 1, got -0.2"),
    ("ece", 5.0, "'ece' must be a share from 0 to 1, got 5.0"),
    ("params", -5, "'params' must not be negative, got -5"),
    ("params", 10**400, "'params' must be a number or null, got 1000000"),
    ("params", 2.5, "'params' must be a parameter count (an integer from 0 to 2**53), got 2.5"),
    ("student", "dup", "two entries name one student"),
])
def test_a_summary_with_impossible_figures_is_refused(demo, tmp_path, field, value, message):
    import shutil

    run_dir = tmp_path / "edited"
    shutil.copytree(demo / "scratch", run_dir)
    rows = summary(run_dir)
    rows[0][field] = value
    if field == "student":
        rows[1]["student"] = value
    (run_dir / "summary.json").write_text(json.dumps(rows))
    for command in (["compare", run_dir], ["report", run_dir, "--out", tmp_path / "r"]):
        result = run(*command)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    (run_dir / "summary.json").write_text("[]")
    assert_one_line_error(run("compare", run_dir), r"is not a train-student summary \(a non-empty JSON list of objects\)")


def test_inspect_of_an_incomplete_cache_counts_sizes_over_the_rows_written(tmp_path):
    from softlabels import CacheWriter, Dense, Layout

    path = tmp_path / "half.zarr"
    logits = np.random.default_rng(0).normal(size=(256, 10)).astype(np.float32)
    writer = CacheWriter(path, Layout(Dense(), 256, 10, "float32", 64), manifest={"teacher": {}, "dataset": {}})
    writer.write_chunks(0, {"logits": logits[:128]}, np.zeros(128, np.int64))  # 2 of the 4 chunks
    writer.close()
    partial = tmp_path / "half.zarr.partial"  # where a cache is written until it is complete
    result = run("inspect", partial, "--json")
    assert result.exit_code == 1, result.output  # incomplete
    report = json.loads(result.output)
    assert not report["complete"] and report["bytes_per_sample"] == report["bytes_on_disk"] / 128
    assert report["compression_vs_dense_float32"] == pytest.approx(128 * 10 * 4 / report["bytes_on_disk"])


@pytest.mark.parametrize("predicted, labels, dtype", [(-3, 1, np.int64), (2, -7, np.int64), (2, 1, np.uint8)])
def test_predictions_outside_the_classes_or_unsigned_are_refused(tmp_path, predicted, labels, dtype):
    from softlabels.errors import SoftlabelsError
    from softlabels.runs import read_predictions

    path = tmp_path / "eval_predictions.npz"
    np.savez(path, predicted=np.array([predicted, 0], dtype=dtype), confidence=np.array([0.5, 0.9]),
             labels=np.array([labels, 0], dtype=dtype))
    message = "must hold classes" if dtype == np.int64 else "array 'predicted' is missing or not of signed integers"
    with pytest.raises(SoftlabelsError, match=message):
        read_predictions(path)


def test_inspect_of_a_cache_with_no_chunk_written_yet_says_so(tmp_path):
    from softlabels import CacheWriter, Dense, Layout

    CacheWriter(tmp_path / "empty.zarr", Layout(Dense(), 256, 10, "float32", 64), manifest={"teacher": {}, "dataset": {}}).close()
    result = run("inspect", tmp_path / "empty.zarr.partial")
    assert result.exit_code == 1 and "Traceback" not in result.output and "error" not in result.output, result.output
    assert "(INCOMPLETE)" in result.output and re.search(r"on disk      [\d.]+ MiB, no sample written yet\n", result.output)
