"""View caches: recorded augmentation views, dumped, replayed, trained on, verified and converted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import softlabels.train as train_module
from softlabels import SoftTargetLoader, StudentSpec, TrainConfig, dump, open_cache, open_data, source_for_cache, train_students
from softlabels.augment import Pipeline, parse_augment
from softlabels.convert import convert_cache
from softlabels.errors import SoftlabelsError
from softlabels.store import chunk_checksum
from softlabels.verify import verify_cache
from softlabels.views import Views, replay

from .conftest import reseal_zarr

DATA = "mnist1d://transfer?n=100&seed=3"
SIGNAL = ("shift?max=6", "scale?max=0.25", "noise?std=0.15", "mixup?alpha=1")


def signal_views(count: int = 3, seed: int = 5) -> Views:
    return Views(count, Pipeline(tuple(parse_augment(s) for s in SIGNAL), seed=seed))


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("views") / "v.zarr"
    dump(teacher, open_data(DATA), path, views=signal_views(), batch_size=48, device="cpu", chunk_rows=32, progress=False)
    return path


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_every_view_replays_to_the_input_the_teacher_saw(tmp_path, teacher, suffix):
    views = signal_views()
    source = open_data(DATA)
    path = tmp_path / f"v{suffix}"
    dump(teacher, source, path, views=views, batch_size=48, device="cpu", chunk_rows=32, progress=False)
    with open_cache(path) as cache:
        targets, labels = cache.read(0, len(cache))
        records = cache.read_records(0, len(cache))
        assert targets["logits"].shape == (100, 3, 10) and labels.shape == (100, 3)
        assert records["views/mixup.partner"].shape == (100, 3)
        x = torch.from_numpy(source.read(0, 100)[0])
        teacher.model.eval()
        for v in range(3):
            inputs, mix = replay(views.pipeline, source, x, {k: r[:, v] for k, r in records.items()}, np.arange(100))
            with torch.no_grad():
                fresh = teacher.model(inputs).to(torch.float16).float().numpy()
            stored = targets["logits"][:, v].astype(np.float32)
            np.testing.assert_allclose(fresh, stored, rtol=0, atol=2e-3 * np.abs(fresh).max())
            assert (fresh.argmax(-1) == stored.argmax(-1)).mean() >= 0.99
        # the stored parameters are what the keyed generator draws, independent of how the dump batched
        drawn = views.draw(np.arange(100), source)
        assert all(np.array_equal(drawn[k], records[k]) for k in drawn)


def test_views_do_not_depend_on_batch_size_and_partners_are_sample_indices(tmp_path, teacher, view_cache):
    other = tmp_path / "other.zarr"
    dump(teacher, open_data(DATA), other, views=signal_views(), batch_size=6, device="cpu", chunk_rows=32, progress=False)
    with open_cache(view_cache) as a, open_cache(other) as b:
        ra, rb = a.read_records(0, 100), b.read_records(0, 100)
        assert set(ra) == set(rb) and all(ra[k].tobytes() == rb[k].tobytes() for k in ra)
        ta, tb = a.read(0, 100)[0]["logits"], b.read(0, 100)[0]["logits"]
        assert np.abs(ta.astype(np.float32) - tb.astype(np.float32)).max() <= 2e-3 * np.abs(ta).max()
        partners = ra["views/mixup.partner"]
        # drawn from the whole dataset, not from a 2-sample forward batch
        assert partners.min() >= 0 and partners.max() < 100 and len(np.unique(partners)) > 40


def test_the_view_trained_on_is_a_pure_function_of_seed_epoch_and_sample():
    views = signal_views(count=4)
    samples = np.arange(50)
    seen = np.stack([views.view_of(3, epoch, samples) for epoch in range(8)])
    assert all(sorted(seen[:4, i]) == [0, 1, 2, 3] and sorted(seen[4:, i]) == [0, 1, 2, 3] for i in range(50))
    assert not np.array_equal(seen[:4], seen[4:])  # the order is reshuffled every cycle
    assert np.array_equal(views.view_of(3, 5, samples[::-1]), seen[5][::-1])  # per sample, whatever the batch
    assert not np.array_equal(views.view_of(4, 5, samples), seen[5])


def test_a_view_cache_trains_and_an_interrupted_run_resumes_exactly(tmp_path, view_cache, monkeypatch):
    cache, source = open_cache(view_cache), open_data(DATA)
    config = TrainConfig(epochs=4, batch_size=32, device="cpu", checkpoint_every=1, seed=1, alpha=0.3)
    students = [StudentSpec("mlp", {"width": 16})]
    whole = train_students(students, source=source, cache=cache, config=config, out_dir=tmp_path / "whole", progress=False)
    assert whole[0]["student"] == "mlp"
    original, taken = train_module._step, []

    def step(*args):
        if len(taken) == 5:
            raise KeyboardInterrupt
        taken.append(1)
        original(*args)
    monkeypatch.setattr(train_module, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        train_students(students, source=source, cache=cache, config=config, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_module, "_step", original)
    train_students(students, source=source, cache=cache, config=config, out_dir=tmp_path / "cut", progress=False, resume=True)
    a = torch.load(tmp_path / "whole" / "mlp" / "student.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "mlp" / "student.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loader_serves_the_chosen_views_targets_and_replayed_inputs(view_cache):
    cache, source = open_cache(view_cache), open_data(DATA)
    views = Views.from_manifest(cache.manifest, where="test")
    loader = SoftTargetLoader(source, cache, batch_size=40, seed=9)
    loader.set_epoch(2)
    targets, _ = cache.read(0, 100)
    records = cache.read_records(0, 100)
    x = torch.from_numpy(source.read(0, 100)[0])
    for batch in loader:
        i = batch.indices.numpy()
        v = views.view_of(9, 2, i)
        assert torch.equal(batch.teacher_logits.arrays["logits"], torch.from_numpy(targets["logits"][i, v]))
        inputs, mix = replay(views.pipeline, source, x[i], {k: r[i, v] for k, r in records.items()}, i)
        assert torch.equal(batch.inputs, inputs)
        assert torch.equal(batch.mix.lam, mix.lam) and torch.equal(batch.mix.partner_labels, mix.partner_labels)


def test_fresh_views_for_the_online_baselines_change_every_epoch_and_mix_labels():
    source = open_data("mnist1d://test")
    pipeline = Pipeline((parse_augment("shift?max=6"), parse_augment("mixup?alpha=1")), seed=1)
    loader = SoftTargetLoader(source, None, batch_size=100, shuffle=False, augment=pipeline)
    x, y = source.read(0, 100)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        record = pipeline.draw(np.arange(100), np.full(100, epoch), len(source), source.input_shape)
        partners = record["mixup.partner"]
        assert torch.equal(batch.inputs, pipeline.apply(torch.from_numpy(x), record, torch.from_numpy(source.take(partners)[0])))
        assert torch.equal(batch.labels, torch.from_numpy(y))
        assert torch.equal(batch.mix.partner_labels, torch.from_numpy(source.labels()[partners]))
        assert torch.equal(batch.mix.lam, torch.from_numpy(record["mixup.lam"]))
        epochs.append(batch.inputs)
    assert not torch.equal(epochs[0], epochs[1])


def test_online_function_matching_and_augmented_scratch_train_through_the_same_loop(tmp_path, teacher_path):
    base = [sys.executable, "-m", "softlabels", "train-student", "--data", "mnist1d://test", "--student", "mlp", "--epochs", "2",
            "--device", "cpu", "--quiet", "--augment", "shift?max=6", "--augment", "mixup?alpha=1"]
    online = subprocess.run(base + ["--online-teacher", str(teacher_path), "--out", str(tmp_path / "online")],
                            capture_output=True, text=True)
    scratch = subprocess.run(base + ["--hard-labels-only", "--out", str(tmp_path / "scratch")], capture_output=True, text=True)
    assert online.returncode == 0 and scratch.returncode == 0, online.stderr + scratch.stderr
    assert "online teacher" in json.loads((tmp_path / "online" / "summary.json").read_text())[0]["targets"]
    assert json.loads((tmp_path / "scratch" / "summary.json").read_text())[0]["targets"] == "hard labels, fresh augmented views"


def test_verify_replays_views_and_catches_edited_parameters(tmp_path, teacher, view_cache):
    report = verify_cache(view_cache, recompute=24, teacher=teacher, device="cpu")
    assert report.ok and report.rows_recomputed == 24 and report.max_abs_difference < 0.05
    # an edit that keeps every checksum consistent: only replaying the views can catch it
    edited = tmp_path / "edited.zarr"
    convert_cache(view_cache, edited, keep_views=3, progress=False)
    group = zarr.open_group(str(edited), mode="r+")
    offsets = group["views/shift.offset"]
    changed = offsets[:].copy()
    changed[:, :] = np.where(changed >= 0, changed - 6, changed + 6)
    offsets[:] = changed
    with_checksums(edited)
    assert verify_cache(edited).ok
    report = verify_cache(edited, recompute=100, teacher=teacher, device="cpu")
    assert any("stored parameter 'views/shift.offset'" in p for p in report.problems)
    assert any("cached logits differ from the teacher's" in p for p in report.problems)


def with_checksums(path):
    """Rewrite ``path``'s commit record and table of chunk checksums by place to match its arrays,
    as an editor who knows the format would."""
    reseal_zarr(path)
    with open_cache(path) as cache:
        sums = [chunk_checksum(*cache.read(*cache.chunk_bounds(c)), cache.read_records(*cache.chunk_bounds(c)))
                for c in range(cache.num_chunks)]
    zarr.open_group(str(path), mode="r+")["chunk_crc32"][:] = sums


@pytest.mark.parametrize("name, value, drawn", [
    ("views/mixup.lam", 7, "is 7.0, but mixup draws weights from 0 to 1"),
    ("views/shift.offset", 1000, "is 1000, but shift draws integers from -6 to 6"),
    ("views/partner.shift.offset", -1000, "is -1000, but shift draws integers from -6 to 6"),
    ("views/scale.factor", -3, "is -3.0, but scale draws numbers from 0.75 to 1.25"),
    ("views/mixup.partner", 10**9, "is 1000000000, but mixup draws sample indices 0 to 99"),
])
def test_train_student_refuses_a_stored_view_parameter_its_augmentation_never_draws(tmp_path, view_cache, name, value, drawn):
    edited = tmp_path / "edited.zarr"
    shutil.copytree(view_cache, edited)
    array = zarr.open_group(str(edited), mode="r+")[name]
    values = array[:]
    values[7] = value  # every view of sample 7, so whichever the epoch trains on
    array[:] = values
    with_checksums(edited)
    assert verify_cache(edited).ok  # the checksums cannot tell
    done = subprocess.run([sys.executable, "-m", "softlabels", "train-student", "--cache", str(edited), "--student", "linear",
                           "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"error: {edited}: stored view parameter '{name}' of sample 7 {drawn}\n"


def test_verify_recompute_reports_a_stored_view_parameter_its_augmentation_never_draws_and_replays_the_others(
        tmp_path, teacher, view_cache):
    edited = tmp_path / "edited.zarr"
    shutil.copytree(view_cache, edited)
    array = zarr.open_group(str(edited), mode="r+")["views/mixup.lam"]
    values = array[:]
    values[7] = 7
    array[:] = values
    with_checksums(edited)
    report = verify_cache(edited, recompute=100, teacher=teacher, device="cpu")  # every sample of the cache
    assert report.problems == [problem for problem in report.problems if problem.startswith("sample 7 view ")]
    assert len(report.problems) == 1 and "stored parameter 'views/mixup.lam' is 7.0" in report.problems[0]
    assert report.rows_recomputed == 99


@pytest.mark.parametrize("views, message", [
    ({"count": -1}, "manifest field 'views' must be an object with a positive 'count'"),
    ({"augment": [{"name": "os:system"}]}, "os:system"),
    ({"count": 2}, "the manifest records 2 views but the first item axis is ('view', "),
])
def test_verify_refuses_the_view_settings_training_refuses(tmp_path, view_cache, views, message):
    edited = tmp_path / "edited.zarr"
    shutil.copytree(view_cache, edited)
    group = zarr.open_group(str(edited), mode="r+")
    manifest = dict(group.attrs["softlabels"])
    manifest["views"] = {**manifest["views"], **views}
    group.attrs["softlabels"] = manifest
    report = verify_cache(edited)
    assert not report.ok and any(message in problem for problem in report.problems), report.problems
    with open_cache(edited) as cache, pytest.raises(SoftlabelsError, match=re.escape(message)):
        SoftTargetLoader(source_for_cache(cache), cache, batch_size=8)


@pytest.mark.parametrize("views, keep, message", [
    ([1], 1, "manifest field 'views' must be an object with a positive 'count'"),
    ({"count": "2"}, 1, "manifest field 'views' must be an object with a positive 'count'"),
    ({"count": 10**6}, 100, "the manifest records 1000000 views but the first item axis is ('view', 3)"),
    ([1], None, "manifest field 'views' must be an object with a positive 'count'"),  # carried over as it is
    ({"count": 2}, None, "the manifest records 2 views but the first item axis is ('view', 3)"),
])
def test_convert_refuses_the_view_count_training_refuses_and_writes_nothing(tmp_path, view_cache, views, keep, message):
    edited = tmp_path / "edited.zarr"
    shutil.copytree(view_cache, edited)
    group = zarr.open_group(str(edited), mode="r+")
    manifest = dict(group.attrs["softlabels"])
    manifest["views"] = {**manifest["views"], **views} if isinstance(views, dict) else views
    group.attrs["softlabels"] = manifest
    from softlabels import TopK
    with pytest.raises(SoftlabelsError, match=re.escape(f"{edited}: {message}")):
        convert_cache(edited, tmp_path / "out.zarr", keep_views=keep, kind=None if keep else TopK(k=3), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_convert_keeps_the_first_views_and_makes_sparse_view_caches(tmp_path, view_cache):
    kept = tmp_path / "kept.h5"
    convert_cache(view_cache, kept, keep_views=2, progress=False)
    topk = tmp_path / "top.zarr"
    from softlabels import TopK
    convert_cache(view_cache, topk, kind=TopK(k=3), progress=False)
    with open_cache(view_cache) as full, open_cache(kept) as few, open_cache(topk) as top:
        assert few.items == (2,) and few.manifest["views"]["count"] == 2
        assert np.array_equal(few.read(0, 100)[0]["logits"], full.read(0, 100)[0]["logits"][:, :2])
        r_full, r_few = full.read_records(0, 100), few.read_records(0, 100)
        assert all(np.array_equal(r_few[k], r_full[k][:, :2]) for k in r_full)
        assert top.read(0, 100)[0]["topk_logits"].shape == (100, 3, 3)
        assert all(np.array_equal(top.read_records(0, 100)[k], r_full[k]) for k in r_full)
        SoftTargetLoader(open_data(DATA), few, batch_size=32)  # its records still match its views


def test_inspect_shows_the_views(view_cache):
    done = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(view_cache)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "views        3 per sample, augment seed 5: shift?max=6 -> scale?max=0.25 -> noise?std=0.15&generator=keyed -> mixup?alpha=1" in done.stdout
    assert "per view" in done.stdout
    assert "views whose own label weighs at least half" in done.stdout  # a mixed view's own label may not be its answer


@pytest.mark.parametrize("args, message", [
    (["--views", "0", "--augment", "shift?max=3"], "--views must be a number of views per sample from 1 to 65,536"),
    (["--views", "2", "--augment", "blur"], "unknown augmentation"),
    (["--views", "2", "--augment", "shift?maxx=3"], "maxx"),
    (["--views", "2", "--augment", "crop?size=8,8"], "crop"),
    (["--views", "2"], "--views V and --augment SPEC go together"),
])
def test_bad_view_options_fail_in_one_line_and_write_nothing(tmp_path, teacher_path, args, message):
    out = tmp_path / "bad.zarr"
    done = subprocess.run([sys.executable, "-m", "softlabels", "dump", "--teacher", str(teacher_path), "--data", DATA,
                           "--out", str(out), "--device", "cpu", "--quiet", *args], capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("bad*"))


def test_augment_on_a_cache_without_views_is_refused(tmp_path, teacher):
    plain = tmp_path / "plain.zarr"
    dump(teacher, open_data(DATA), plain, device="cpu", progress=False)
    done = subprocess.run([sys.executable, "-m", "softlabels", "train-student", "--cache", str(plain), "--student", "mlp",
                           "--augment", "shift?max=3", "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 1 and "which has no views" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_views_replayed_in_dataloader_workers_are_the_same_batches(view_cache):
    loader = SoftTargetLoader(open_data(DATA), open_cache(view_cache), batch_size=20, seed=4)
    loader.set_epoch(1)
    alone = list(loader)
    workers = list(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2))
    assert len(alone) == len(workers) == 5
    for a, b in zip(alone, workers):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.teacher_logits.arrays["logits"], b.teacher_logits.arrays["logits"])
        assert torch.equal(a.mix.lam, b.mix.lam)


def test_plain_zarr_and_numpy_replay_a_view_as_the_readme_shows(tmp_path, teacher):
    path = tmp_path / "views.zarr"
    pipeline = Pipeline(tuple(parse_augment(s) for s in ("shift?max=6", "noise?std=0.15", "mixup?alpha=1")), seed=2)
    source = open_data(DATA)
    dump(teacher, source, path, views=Views(2, pipeline), device="cpu", progress=False)
    g = zarr.open_group(str(path), mode="r")
    std = g.attrs["softlabels"]["views"]["augment"][1]["std"]
    x = source.read(0, len(source))[0]
    def keyed_normals(seed, size):
        z = np.uint64(seed) + np.arange(1, (size + 1) // 2 + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        r = np.sqrt(-2 * np.log(((z >> np.uint64(32)) + np.uint64(1)) * 2.0**-32))
        angle = (z & np.uint64(0xFFFFFFFF)) * 2.0**-32 * 2 * np.pi
        return np.stack([r * np.cos(angle), r * np.sin(angle)], -1).reshape(-1)[:size].astype(np.float32)

    for i, v in [(0, 0), (17, 1), (99, 1)]:
        def one(row, prefix=""):
            offset = int(g[f"views/{prefix}shift.offset"][i, v])
            out = row[np.clip(np.arange(40) - offset, 0, 39)]
            seed = int(g[f"views/{prefix}noise.seed"][i, v])
            return out + np.float32(std) * keyed_normals(seed, 40)
        j, lam = int(g["views/mixup.partner"][i, v]), g["views/mixup.lam"][i, v]
        view = lam * one(x[i]) + (1 - lam) * one(x[j], "partner.")
        record = {name: r[i:i + 1, v] for name, r in open_cache(path).read_records(0, len(source)).items()}
        replayed, _ = replay(pipeline, source, torch.from_numpy(x[i:i + 1]), record, np.array([i]))
        np.testing.assert_allclose(view, replayed[0].numpy(), rtol=0, atol=1e-6)


def test_the_dump_and_inspect_count_a_mixed_view_cache_s_accuracy_alike(tmp_path, npz_data, linear_teacher):
    from click.testing import CliRunner

    from softlabels.cli import cli

    out = tmp_path / "mixed.zarr"
    done = CliRunner().invoke(cli, ["dump", "--teacher", str(linear_teacher), "--arch", "linear", "--data", str(npz_data),
                                    "--out", str(out), "--views", "4", "--augment", "mixup?alpha=1", "--store-dtype", "float32"])
    assert done.exit_code == 0, done.output
    # scored: labeled views whose own sample weighs at least half, recomputed from the stored arrays
    group = zarr.open_group(str(out), mode="r")
    labels, lam = group["labels"][:], group["views/mixup.lam"][:]
    scored = (labels >= 0) & (lam >= 0.5)
    assert 0 < scored.sum() < labels.size
    expected = float((group["logits"][:].argmax(-1) == labels)[scored].mean())
    assert group.attrs["softlabels"]["teacher_accuracy"] == pytest.approx(expected, abs=1e-12)
    report = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).output)
    assert report["teacher_accuracy"] == pytest.approx(expected, abs=1e-12)
