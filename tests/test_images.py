"""Image folders: layouts, decoding, class names, corrupt files, resuming, and crops from source images."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from softlabels import SoftTargetLoader, load_model, open_cache, open_data
from softlabels.augment import parse_augment, view_generator
from softlabels.checkpoint import save_checkpoint
from softlabels.data import UNUSABLE
from softlabels.errors import SoftlabelsError
from softlabels.models import build_model

from .test_cli import assert_one_line_error, run

CLASSES = ["ant", "bee", "cow"]


def make_folder(root, per_class=6, sizes=((24, 32), (40, 30), (28, 28)), flat=False, seed=0):
    """Random RGB images of mixed sizes, PNG and JPEG alternately, in one subfolder per class (or flat)."""
    rng = np.random.default_rng(seed)
    files = []
    for c, name in enumerate(CLASSES):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            path = folder / f"{name}{i:02d}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return root


def save_teacher(path, size=16, classes=3, names=None):
    torch.manual_seed(0)
    model = build_model("cnn2d", input_shape=(3, size, size), num_classes=classes, kwargs={"channels": 4})
    save_checkpoint(path, model, arch="cnn2d", arch_kwargs={"channels": 4}, input_shape=(3, size, size), num_classes=classes,
                    classes=names)
    return path


def expected_pixels(path, size, resize, mean=0.0, std=1.0):
    """An image as torchvision's Resize(resize) + CenterCrop(size) + ToTensor + Normalize make it, with pillow."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    if w <= h:
        new = (resize, int(resize * h / w))
    else:
        new = (int(resize * w / h), resize)
    image = image.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return ((pixels - mean) / std).transpose(2, 0, 1)


def test_class_folders_decode_as_torchvision_would(tmp_path):
    root = make_folder(tmp_path / "imgs")
    source = open_data(f"imagefolder:{root}?size=16&resize=20&mean=0.5&std=0.25")
    assert source.classes == CLASSES and len(source) == 18 and source.input_shape == (3, 16, 16)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert source.files == [str(p.relative_to(root)) for p in files]
    x, y = source.read(0, 18)
    assert y.tolist() == [CLASSES.index(p.parent.name) for p in files]
    for i in (0, 7, 17):
        np.testing.assert_allclose(x[i], expected_pixels(files[i], 16, 20, 0.5, 0.25), rtol=0, atol=1e-6)
    # the manifest's view of it: the names of the classes and the transform
    assert source.describe() == {"classes": CLASSES, "transform": {"size": 16, "resize": 20, "channels": 3,
                                                                   "mean": [0.5] * 3, "std": [0.25] * 3}}


def test_flat_folder_is_unlabelled_and_same_size_images_need_no_size(tmp_path):
    root = make_folder(tmp_path / "flat", per_class=2, sizes=((20, 24),), flat=True)
    source = open_data(f"imagefolder:{root}")
    assert source.classes is None and not source.has_labels and source.input_shape == (3, 20, 24)
    x, y = source.read(0, len(source))
    assert (y == -1).all()
    first = sorted(root.iterdir())[0]
    np.testing.assert_allclose(x[0], np.asarray(Image.open(first), dtype=np.float32).transpose(2, 0, 1) / 255, rtol=0, atol=1e-7)
    gray = open_data(f"imagefolder:{root}?channels=1")
    assert gray.input_shape == (1, 20, 24)


@pytest.mark.parametrize("make, pattern", [
    (lambda root: root.mkdir(), r"holds no images"),
    (lambda root: (root / "a").mkdir(parents=True), r"class folder 'a' holds no images"),
    (lambda root: make_folder(root), r"mixed sizes need \?size=S"),
    (lambda root: (make_folder(root), shutil.copy(next(root.rglob("*.png")), root / "stray.png")), r"both class folders and images"),
])
def test_folder_errors_are_one_line(tmp_path, make, pattern):
    root = tmp_path / "imgs"
    make(root)
    teacher = save_teacher(tmp_path / "t.pth")
    result = run("dump", "--teacher", teacher, "--data", f"imagefolder:{root}", "--out", tmp_path / "c.zarr", "--quiet")
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "c.zarr.partial").exists()


def test_bad_spec_values_are_refused(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=1)
    for query, pattern in (("size=0", "size must be"), ("size=16&resize=8", "resize must be"), ("channels=2", "channels"),
                           ("mean=0.1,0.2", "mean must be"), ("std=0", "std must be positive"), ("zoom=2", "unknown parameter")):
        with pytest.raises(SoftlabelsError, match=pattern):
            open_data(f"imagefolder:{root}?{query}")


def test_only_image_formats_are_opened(tmp_path):
    """An EPS file would make pillow start Ghostscript: it is refused as an image that does not decode."""
    root = tmp_path / "imgs"
    make_folder(root, per_class=1, sizes=((16, 16),), flat=True)
    (root / "zz.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    with pytest.raises(SoftlabelsError, match=r"cannot decode zz.png"):
        open_data(f"imagefolder:{root}").read(0, 4)


def test_fingerprint_covers_the_file_list_and_contents(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    spec = f"imagefolder:{root}?size=16"
    before = open_data(spec).fingerprint()
    assert open_data(spec).fingerprint() == before
    assert open_data(f"imagefolder:{root}?size=12").fingerprint() != before  # the transform is part of it
    one = next(root.rglob("*.png"))
    one.touch()  # a new mtime, the same bytes
    assert open_data(spec).fingerprint() == before
    data = bytearray(one.read_bytes())
    data[-20] ^= 1
    one.write_bytes(bytes(data))
    changed = open_data(spec).fingerprint()
    assert changed != before
    one.rename(one.with_name("zz" + one.name))
    assert open_data(spec).fingerprint() not in (before, changed)


def test_dump_records_classes_and_training_refuses_other_classes(tmp_path):
    root = make_folder(tmp_path / "train")
    other = make_folder(tmp_path / "other", per_class=2)
    (other / "cow").rename(other / "cat")
    teacher = save_teacher(tmp_path / "t.pth")
    result = run("dump", "--teacher", teacher, "--data", f"imagefolder:{root}?size=16", "--out", tmp_path / "c.zarr", "--quiet")
    assert result.exit_code == 0, result.output
    dataset = open_cache(tmp_path / "c.zarr").manifest["dataset"]
    assert dataset["classes"] == CLASSES and dataset["transform"]["size"] == 16
    result = run("train-student", "--cache", tmp_path / "c.zarr", "--student", "linear", "--epochs", "1", "--quiet",
                 "--eval-data", f"imagefolder:{other}?size=16", "--out", tmp_path / "runs")
    assert_one_line_error(result, r"classes other than training data .*'s \(the dataset lacks cow; only the dataset has cat\)")


def test_a_student_records_its_classes_and_no_model_meets_a_dataset_of_other_classes(tmp_path):
    root = make_folder(tmp_path / "train")
    other = make_folder(tmp_path / "other", per_class=2)
    (other / "cow").rename(other / "cat")
    same, changed = f"imagefolder:{root}?size=16", f"imagefolder:{other}?size=16"
    assert run("dump", "--teacher", save_teacher(tmp_path / "t.pth"), "--data", same, "--out", tmp_path / "c.zarr",
               "--quiet").exit_code == 0
    result = run("train-student", "--cache", tmp_path / "c.zarr", "--student", "linear", "--epochs", "1", "--quiet",
                 "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    student = tmp_path / "runs" / "linear" / "student.pth"
    assert load_model(student).classes == CLASSES
    refused = {  # the student as the next teacher, or evaluated, on folders whose label 2 is another class
        "dump": ["dump", "--teacher", student, "--data", changed, "--out", tmp_path / "d.zarr"],
        "evaluate": ["evaluate", "--model", student, "--data", changed],
        "online teacher": ["train-student", "--data", changed, "--online-teacher", student, "--student", "linear",
                           "--out", tmp_path / "online"],
        "evaluation teacher": ["train-student", "--data", same, "--hard-labels-only", "--student", "linear", "--eval-data",
                               changed, "--eval-teacher", student, "--out", tmp_path / "eval"],
    }
    for command in refused.values():
        assert_one_line_error(run(*command), r"classes other than (teacher|model) .*student.pth's "
                                             r"\(the dataset lacks cow; only the dataset has cat\)")
    assert not any((tmp_path / name).exists() for name in ("d.zarr", "d.zarr.partial", "online", "eval"))
    result = run("evaluate", "--model", student, "--data", same)
    assert result.exit_code == 0 and "accuracy" in result.output, result.output


def test_a_teachers_class_names_reach_students_trained_on_its_targets_over_unlabeled_images(tmp_path):
    labeled, flat = make_folder(tmp_path / "labeled", per_class=2), make_folder(tmp_path / "flat", per_class=2, flat=True)
    other = make_folder(tmp_path / "other", per_class=2)
    (other / "cow").rename(other / "cat")
    teacher = save_teacher(tmp_path / "t.pth", names=CLASSES)
    assert run("dump", "--teacher", teacher, "--data", f"imagefolder:{flat}?size=16", "--out", tmp_path / "c.zarr",
               "--quiet").exit_code == 0
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.manifest["teacher"]["classes"] == CLASSES and cache.manifest["dataset"]["classes"] is None
    train = ["train-student", "--cache", tmp_path / "c.zarr", "--student", "linear", "--epochs", "1", "--quiet"]
    assert run(*train, "--out", tmp_path / "runs").exit_code == 0
    assert load_model(tmp_path / "runs" / "linear" / "student.pth").classes == CLASSES
    assert_one_line_error(run(*train, "--eval-data", f"imagefolder:{other}?size=16", "--out", tmp_path / "r2"),
                          r"classes other than cache .*c.zarr's \(the dataset lacks cow; only the dataset has cat\)")
    # without a teacher, evaluation data of other classes than the training data's
    result = run("train-student", "--data", f"imagefolder:{labeled}?size=16", "--hard-labels-only", "--student", "linear",
                 "--eval-data", f"imagefolder:{other}?size=16", "--out", tmp_path / "r3")
    assert_one_line_error(result, r"classes other than training data imagefolder:.*labeled.*'s \(the dataset lacks cow")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_keeping_fewer_views_of_an_image_view_cache_keeps_each_rows_file_digest_whole(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    assert run("dump", "--teacher", save_teacher(tmp_path / "t.pth"), "--data", f"imagefolder:{root}?size=16",
               "--out", tmp_path / "v.zarr", "--views", "4", "--augment", "flip", "--quiet").exit_code == 0
    result = run("convert", tmp_path / "v.zarr", tmp_path / "v2.zarr", "--keep-views", "2")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "v.zarr") as full, open_cache(tmp_path / "v2.zarr") as kept:
        before, after = full.read_records(0, len(full)), kept.read_records(0, len(kept))
        assert after["dataset/sha256"].shape == (len(full), 8)
        np.testing.assert_array_equal(after["dataset/sha256"], before["dataset/sha256"])
        np.testing.assert_array_equal(after["views/flip.flip"], before["views/flip.flip"][:, :2])


def test_the_loader_decodes_only_a_few_batches_ahead_of_training(tmp_path, monkeypatch):
    import time

    from softlabels.images import ImageFolderSource

    root = make_folder(tmp_path / "imgs", per_class=20)  # 60 images: one chunk, one window of 30 batches of 2
    assert run("dump", "--teacher", save_teacher(tmp_path / "t.pth"), "--data", f"imagefolder:{root}?size=16",
               "--out", tmp_path / "c.zarr", "--quiet").exit_code == 0
    decoded, real = [], ImageFolderSource._decode
    monkeypatch.setattr(ImageFolderSource, "_decode", lambda self, i: decoded.append(i) or real(self, i))
    with open_cache(tmp_path / "c.zarr") as cache:
        loader = SoftTargetLoader(open_data(f"imagefolder:{root}?size=16"), cache, batch_size=2, seed=0)
        decoded.clear()
        batches = iter(loader)
        next(batches)
        time.sleep(1.0)  # time for the background thread to run ahead as far as it may
        assert len(decoded) <= 2 * 6, len(decoded)  # the batch served, the queue's 4, and one being made
        batches.close()


@pytest.mark.parametrize("size", ["?size=16", ""], ids=["sized", "as stored"])
def test_a_corrupt_first_image_is_skipped_like_any_other(tmp_path, size):
    root = make_folder(tmp_path / "imgs", sizes=((16, 16),))
    (root / "ant" / "ant00.jpg").write_bytes(b"junk")  # row 0
    args = ["dump", "--teacher", save_teacher(tmp_path / "t.pth"), "--data", f"imagefolder:{root}{size}", "--quiet"]
    assert_one_line_error(run(*args, "--out", tmp_path / "a.zarr"), r"cannot decode ant/ant00.jpg")
    result = run(*args, "--out", tmp_path / "b.zarr", "--skip-bad-files")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "b.zarr") as cache:
        assert cache.labels()[0] == UNUSABLE and (cache.labels()[1:] != UNUSABLE).all()
    shown = run("inspect", tmp_path / "b.zarr")
    assert shown.exit_code == 0 and "skipped      1 rows whose inputs could not be read" in shown.output, shown.output


def test_a_corrupt_image_stops_the_dump_and_resume_works_once_it_is_fixed_or_removed(tmp_path):
    root = make_folder(tmp_path / "imgs")
    teacher = save_teacher(tmp_path / "t.pth")
    spec = f"imagefolder:{root}?size=16"
    args = ["dump", "--teacher", teacher, "--data", spec, "--chunk-rows", 4, "--batch-size", 4, "--quiet", "--num-workers", 1]
    assert run(*args, "--out", tmp_path / "clean.zarr").exit_code == 0
    bad = root / "bee" / "bee03.png"  # row 9, in the third chunk
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    out = tmp_path / "c.zarr"
    result = run(*args, "--out", out)
    assert_one_line_error(result, r"cannot decode bee/bee03.png")  # raised in a worker, reported in one line
    partial = open_cache(str(out) + ".partial", allow_incomplete=True)
    assert (partial.checksums() >= 0).tolist() == [True, True, False, False, False]  # nothing past the last committed chunk
    # fixed: the resumed dump keeps the two chunks and ends with the bytes of an uninterrupted one
    bad.write_bytes(good)
    result = run(*args, "--out", out, "--resume")
    assert result.exit_code == 0 and "2 chunks kept" in result.output, result.output
    clean, resumed = open_cache(tmp_path / "clean.zarr"), open_cache(out)
    assert resumed.manifest["dataset"] == clean.manifest["dataset"]
    np.testing.assert_array_equal(resumed.read(0, 18)[0]["logits"], clean.read(0, 18)[0]["logits"])
    # removed: one row fewer; the chunks before the file are kept, the rest are written for the new rows
    bad.write_bytes(good[: len(good) // 2])
    shutil.rmtree(out)
    assert run(*args, "--out", out).exit_code == 1
    bad.unlink()
    result = run(*args, "--out", out, "--resume")
    assert result.exit_code == 0 and "2 chunks kept" in result.output, result.output
    fresh_out = tmp_path / "fresh.zarr"
    assert run(*args, "--out", fresh_out).exit_code == 0
    resumed, fresh = open_cache(out), open_cache(fresh_out)
    assert len(resumed) == 17 and resumed.manifest["dataset"] == fresh.manifest["dataset"]
    np.testing.assert_array_equal(resumed.read(0, 17)[0]["logits"], fresh.read(0, 17)[0]["logits"])
    assert run("verify", out).exit_code == 0


def test_skip_bad_files_records_the_file_and_training_leaves_it_out(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "ant" / "ant02.jpg").write_bytes(b"not a jpeg")
    teacher = save_teacher(tmp_path / "t.pth")
    out = tmp_path / "c.h5"
    result = run("dump", "--teacher", teacher, "--data", f"imagefolder:{root}?size=16", "--out", out, "--quiet",
                 "--chunk-rows", 4, "--skip-bad-files")
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    assert cache.manifest["skipped"] == [{"row": 2, "name": "ant/ant02.jpg"}]
    labels = cache.labels()
    assert labels[2] == UNUSABLE and (np.delete(labels, 2) >= 0).all()
    source = open_data(f"imagefolder:{root}?size=16")
    served = np.concatenate([b.indices.numpy() for b in SoftTargetLoader(source, cache, batch_size=5, seed=1)])
    assert sorted(served.tolist()) == [i for i in range(18) if i != 2]


def test_a_skipped_image_drawn_as_a_mixing_partner_shares_no_label_and_training_runs(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    (root / "ant" / "ant01.png").write_bytes(b"not a png")  # row 1
    augment = ["--augment", "crop?size=12,12&scale=0.2,1", "--augment", "cutmix?alpha=1"]
    assert run("dump", "--teacher", save_teacher(tmp_path / "t.pth", size=12), "--data", f"imagefolder:{root}?size=12",
               "--out", tmp_path / "v.zarr", "--views", 8, *augment, "--skip-bad-files", "--quiet").exit_code == 0
    cache = open_cache(tmp_path / "v.zarr")
    partners = cache.read_records(0, len(cache))["views/cutmix.partner"]
    assert (partners == 1).any()  # 64 draws among 9 rows: the skipped row is somebody's partner
    loader = SoftTargetLoader(open_data(f"imagefolder:{root}?size=12"), cache, batch_size=9, seed=0)
    mixes = []
    for epoch in range(12):  # one of each row's 8 views an epoch
        loader.set_epoch(epoch)
        mixes += [b.mix.partner_labels for b in loader]
    labels = torch.cat(mixes)
    assert (labels >= -1).all() and (labels == -1).any()
    result = run("train-student", "--cache", tmp_path / "v.zarr", "--student", "linear", "--epochs", 2, "--quiet",
                 "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output


def test_views_crop_each_image_at_its_own_resolution_and_replay_exactly(tmp_path):
    """A crop first in the pipeline is drawn for each image's own size and cut from the decoded image,
    not from the resized input; training replays exactly the inputs the teacher saw."""
    root = make_folder(tmp_path / "imgs", per_class=4)
    spec = f"imagefolder:{root}?size=12&resize=14"
    teacher_path = save_teacher(tmp_path / "t.pth", size=10)
    out = tmp_path / "v.zarr"
    augment = ["--augment", "crop?size=10,10&scale=0.2,1", "--augment", "flip", "--augment", "cutmix?alpha=1"]
    result = run("dump", "--teacher", teacher_path, "--data", spec, "--out", out, "--views", 3, *augment, "--quiet",
                 "--num-workers", 2, "--chunk-rows", 5)
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    source = open_data(spec)
    records = cache.read_records(0, len(source))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for i, v in ((0, 0), (5, 2), (11, 1)):
        # the box is drawn for the image's own size (as torchvision's RandomResizedCrop draws it)
        with Image.open(files[i]) as image:
            width, height = image.size
        box = parse_augment("crop?size=10,10&scale=0.2,1").draw(view_generator(0, i, v), (3, height, width), len(source))["box"]
        np.testing.assert_array_equal(records["views/crop.box"][i, v], box)
        # and cut from the full-resolution image: grid_sample over it, an independent bilinear resampler
        image = torch.from_numpy(np.asarray(Image.open(files[i]).convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy())[None]
        top, left, h, w = (float(b) for b in box)
        theta = torch.tensor([[[w, 0, 2 * left + w - 1], [0, h, 2 * top + h - 1]]], dtype=torch.float64)
        grid = torch.nn.functional.affine_grid(theta, (1, 3, 10, 10), align_corners=False)
        expected = torch.nn.functional.grid_sample(image.double(), grid, mode="bilinear", padding_mode="border",
                                                   align_corners=False)[0].float() / 255
        crop = source.crop(np.array([i]), box[None], (10, 10))[0]
        torch.testing.assert_close(crop, expected, rtol=0, atol=1e-4)
    # training replays each view's inputs bit for bit: the teacher on them gives the stored targets
    teacher = load_model(teacher_path).model.eval()
    loader = SoftTargetLoader(source, cache, batch_size=6, seed=3)
    loader.set_epoch(1)
    targets, _ = cache.read(0, len(source))
    for batch in loader:
        i = batch.indices.numpy()
        stored = targets["logits"][i, loader.views.view_of(3, 1, i)].astype(np.float32)
        with torch.no_grad():
            fresh = teacher(batch.inputs).to(torch.float16).float().numpy()
        np.testing.assert_allclose(fresh, stored, rtol=0, atol=1e-3 * np.abs(stored).max())
    assert run("verify", out, "--recompute", 6, "--teacher", teacher_path).exit_code == 0
