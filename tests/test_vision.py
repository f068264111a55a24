"""Architectures torchvision:NAME and timm:NAME (the vision extra): built offline with the asked
number of classes, loaded from local weights, recorded in checkpoints as built-in names, used from
the command line as teacher and student.

``bash scripts/test_vision.sh`` (and so CI) runs this file in .venv-vision, which has the extra, with
SOFTLABELS_REQUIRE_VISION=1: there a missing torchvision or timm fails the tests. Elsewhere, as in the
main suite's .venv, they skip.
"""

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file


def _require(module: str):
    if os.environ.get("SOFTLABELS_REQUIRE_VISION") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


torchvision = _require("torchvision")
timm = _require("timm")

from softlabels import build_model, load_model, open_cache, save_checkpoint  # noqa: E402
from softlabels.cli import cli  # noqa: E402
from softlabels.errors import SoftlabelsError  # noqa: E402

ARCHS = ["torchvision:resnet18", "timm:resnet18"]
SHAPE = (3, 32, 32)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection fails: models are built here, never downloaded."""

    def refuse(*args, **kwargs):
        raise OSError(f"a test tried to connect to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def trained_bn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode after one training-mode pass, so that its batch-norm statistics differ
    from a freshly built model's as much as its weights do."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *SHAPE))
    return model.eval()


def python(script: str, tmp_path, **env: str) -> str:
    """Run ``script`` in a fresh interpreter (so that no module is imported yet) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_softlabels_imports_neither_library_until_a_model_is_built(tmp_path):
    out = python("""
        import sys
        import softlabels, softlabels.cli
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")))
    """, tmp_path)
    assert out == "[]\n"


def test_names_resolve_offline_and_nothing_is_downloaded(tmp_path):
    homes = {name: tmp_path / name for name in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME")}
    for home in homes.values():
        home.mkdir()
    out = python("""
        import socket
        import torch
        from softlabels import build_model

        def refuse(*args, **kwargs):
            raise OSError("no network")

        socket.socket.connect = refuse
        for arch in ("torchvision:resnet18", "timm:resnet18"):
            model = build_model(arch, input_shape=(3, 32, 32), num_classes=7).eval()
            print(arch, list(model(torch.zeros(2, 3, 32, 32)).shape))
    """, tmp_path, HF_HUB_OFFLINE="1", **{name: str(home) for name, home in homes.items()})
    assert out == "torchvision:resnet18 [2, 7]\ntimm:resnet18 [2, 7]\n"
    assert [path for home in homes.values() for path in home.rglob("*")] == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [3, 11])
def test_num_classes_is_passed_through(arch, num_classes):
    model = build_model(arch, input_shape=SHAPE, num_classes=num_classes).eval()
    assert model(torch.zeros(2, *SHAPE)).shape == (2, num_classes)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_input_shape_may_be_unknown(arch):
    model = build_model(arch, input_shape=None, num_classes=6).eval()
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 6)
    with pytest.raises(SoftlabelsError, match="needs the input shape"):  # unlike a built-in one
        build_model("mlp", input_shape=None, num_classes=6)


def test_keyword_arguments_reach_the_constructor():
    timm_model = build_model("timm:resnet18", input_shape=(1, 32, 32), num_classes=4, kwargs={"in_chans": 1})
    assert timm_model.conv1.weight.shape == (64, 1, 7, 7)
    tv_model = build_model("torchvision:resnet18", input_shape=SHAPE, num_classes=4, kwargs={"zero_init_residual": True})
    assert all(block.bn2.weight.abs().sum() == 0 for block in tv_model.layer1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file_give_the_original_outputs(tmp_path, arch, suffix):
    torch.manual_seed(1)
    original = trained_bn(build_model(arch, input_shape=SHAPE, num_classes=5))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(original.state_dict(), path)
    else:
        save_file(original.state_dict(), str(path))
    loaded = load_model(path, arch=arch, input_shape=SHAPE, num_classes=5)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), original(x))
    assert (loaded.arch, loaded.num_classes) == (arch, 5)


@pytest.mark.parametrize("arch,kwargs,shape", [("torchvision:resnet18", {}, SHAPE), ("timm:resnet18", {"in_chans": 1}, (1, 32, 32))])
def test_a_checkpoint_recording_a_vision_name_loads_without_trust_code(tmp_path, arch, kwargs, shape):
    torch.manual_seed(2)
    model = build_model(arch, input_shape=shape, num_classes=3, kwargs=kwargs).eval()
    save_checkpoint(tmp_path / "student.pth", model, arch=arch, arch_kwargs=kwargs, input_shape=shape, num_classes=3)
    loaded = load_model(tmp_path / "student.pth")
    assert (loaded.arch, loaded.arch_kwargs, loaded.num_classes, loaded.input_shape) == (arch, kwargs, 3, shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


@pytest.mark.parametrize("arch,kwargs", [
    ("torchvision:resnet18", {"weights": "DEFAULT"}), ("torchvision:resnet18", {"pretrained": True}),
    ("timm:resnet18", {"pretrained": True}), ("timm:resnet18", {"checkpoint_path": "resnet18.pth"}),
    ("timm:resnet18", {"pretrained_cfg_overlay": {"file": "resnet18.pth"}}),
])
def test_arguments_that_fetch_weights_are_refused(arch, kwargs):
    with pytest.raises(SoftlabelsError, match=f"does not take {next(iter(kwargs))}: .* weights come from a local"):
        build_model(arch, input_shape=SHAPE, num_classes=4, kwargs=kwargs)


def test_a_checkpoint_asking_for_a_download_is_a_one_line_error(tmp_path):
    model = build_model("timm:resnet18", input_shape=SHAPE, num_classes=3)
    save_checkpoint(tmp_path / "s.pth", model, arch="timm:resnet18", arch_kwargs={"pretrained": True}, input_shape=SHAPE, num_classes=3)
    np.savez(tmp_path / "x.npz", x=np.zeros((2, *SHAPE), np.float32))
    result = run("evaluate", "--model", tmp_path / "s.pth", "--data", tmp_path / "x.npz")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: architecture 'timm:resnet18' does not take pretrained"), result.output


@pytest.mark.parametrize("arch,message", [
    ("torchvision:resnt18", r"unknown architecture 'torchvision:resnt18': did you mean torchvision:resnet18\b"),
    ("timm:resnet_18", r"unknown architecture 'timm:resnet_18': did you mean timm:resnet18\b"),
    # in torchvision's registry, but a detection model: no logits
    ("torchvision:fasterrcnn_resnet50_fpn", r"unknown architecture 'torchvision:fasterrcnn_resnet50_fpn'"),
    ("timm:resnet18.a1_in1k", r"does not name a model"),  # a pretrained tag names a download
])
def test_unknown_names_are_refused_with_a_hint(arch, message):
    with pytest.raises(SoftlabelsError, match=message):
        build_model(arch, input_shape=SHAPE, num_classes=4)


@pytest.mark.parametrize("arch,kwargs,shape,expected", [
    ("torchvision:resnet18", {}, (1, 32, 32), r"takes images \[3, H, W\], not inputs of shape \[1, 32, 32\]"),
    ("torchvision:resnet18", {}, (40,), r"takes images \[3, H, W\], not inputs of shape \[40\]"),
    ("timm:resnet18", {"in_chans": 1}, SHAPE, r"takes images \[1, H, W\], not inputs of shape \[3, 32, 32\]"),
])
def test_inputs_must_be_images_with_the_models_channels(arch, kwargs, shape, expected):
    with pytest.raises(SoftlabelsError, match=expected):
        build_model(arch, input_shape=shape, num_classes=4, kwargs=kwargs)


def test_dump_train_and_evaluate_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, *SHAPE)).astype(np.float32), rng.integers(0, 4, 8)
    np.savez("x.npz", x=x, y=y)
    torch.manual_seed(0)
    teacher = trained_bn(torchvision.models.resnet18(num_classes=4))  # the weights as a user has them
    save_file(teacher.state_dict(), "t.safetensors")

    result = run("dump", "--teacher", "t.safetensors", "--arch", "torchvision:resnet18", "--num-classes", 4,
                 "--data", "x.npz", "--out", "c.zarr", "--store-dtype", "float32", "--quiet")
    assert result.exit_code == 0, result.output
    with open_cache("c.zarr") as cache:
        assert cache.manifest["teacher"]["arch"] == "torchvision:resnet18"
        targets, labels = cache.read(0, 8)
    with torch.no_grad():
        expected = teacher(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(targets["logits"], expected, rtol=1e-4, atol=1e-4)
    assert labels.tolist() == y.tolist()

    result = run("train-student", "--cache", "c.zarr", "--student", "timm:resnet18", "--epochs", 1, "--batch-size", 4,
                 "--device", "cpu", "--out", "runs", "--quiet")
    assert result.exit_code == 0, result.output
    saved = torch.load("runs/resnet18/student.pth", weights_only=True)
    assert (saved["arch"], saved["num_classes"], saved["input_shape"]) == ("timm:resnet18", 4, [3, 32, 32])

    result = run("evaluate", "--model", "runs/resnet18/student.pth", "--cache", "c.zarr", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    student = load_model("runs/resnet18/student.pth").model
    with torch.no_grad():
        predicted = student(torch.from_numpy(x)).argmax(1).numpy()
    assert metrics["samples"] == 8
    assert metrics["accuracy"] == pytest.approx(float((predicted == y).mean()))
    assert metrics["teacher_agreement"] == pytest.approx(float((predicted == expected.argmax(1)).mean()))


def test_an_image_folder_through_a_torchvision_teacher_with_views(tmp_path, monkeypatch):
    """A view cache of JPEGs and PNGs of mixed sizes, dumped by a torchvision teacher, replays each crop
    from its source image: the teacher on the replayed views gives the stored targets."""
    from PIL import Image

    from softlabels import SoftTargetLoader, open_data

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    torch.manual_seed(0)
    teacher = trained_bn(torchvision.models.resnet18(num_classes=2))
    torch.save(teacher.state_dict(), "t.pth")
    spec = "imagefolder:imgs?size=32&mean=0.485,0.456,0.406&std=0.229,0.224,0.225"
    result = run("dump", "--teacher", "t.pth", "--arch", "torchvision:resnet18", "--data", spec, "--out", "v.zarr",
                 "--views", 2, "--augment", "crop?size=32,32", "--augment", "flip", "--store-dtype", "float32", "--quiet",
                 "--num-workers", 0)  # worker processes talk over sockets, which no_network refuses
    assert result.exit_code == 0, result.output
    cache = open_cache("v.zarr")
    assert cache.manifest["dataset"]["classes"] == ["cat", "dog"]
    targets, _ = cache.read(0, 8)
    loader = SoftTargetLoader(open_data(spec), cache, batch_size=8, seed=0)
    batch = next(iter(loader))
    i = batch.indices.numpy()
    with torch.no_grad():
        fresh = teacher(batch.inputs).numpy()
    np.testing.assert_allclose(fresh, targets["logits"][i, loader.views.view_of(0, 0, i)], rtol=1e-4, atol=1e-4)
