"""Code named inside a checkpoint or a cache runs only when the user names it too, or trusts the file.

Each route gets a canary: the named function would create the file CANARY in the working directory,
so a refused route leaves no CANARY and a one-line error that says how to allow it.
"""

import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import save_file

from softlabels import load_model, open_cache, source_for_cache
from softlabels.cli import cli
from softlabels.errors import SoftlabelsError

from .conftest import make_npz

CANARY_MODULE = textwrap.dedent("""
    import pathlib
    import numpy as np
    import torch

    def make_model(input_shape, num_classes):
        pathlib.Path("CANARY").write_text("model")
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], num_classes))

    def make_data():
        pathlib.Path("CANARY").write_text("data")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 12)).astype(np.float32)
        return [(x[i], int(i % 5)) for i in range(40)]
""")
MODULE_FORMS = ["canary_mod:{}", "canary_mod.py:{}"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding canary_mod.py, a good teacher, a good student and array data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canary_mod.py").write_text(CANARY_MODULE)
    make_npz(tmp_path / "data.npz", n=40, features=12, classes=5)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    torch.save({"arch": "linear", "input_shape": [12], "num_classes": 5, "state_dict": layer.state_dict()}, "good.pth")
    yield tmp_path
    sys.modules.pop("canary_mod", None)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, spec, option):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert f"names code '{spec}'" in lines[0] and f"pass {option} {spec}" in lines[0] and "--trust-code" in lines[0], lines[0]
    assert not Path("CANARY").exists()


def evil_checkpoint(arch, arch_kwargs=None) -> str:
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs or {}, "input_shape": [12], "num_classes": 5,
                "state_dict": layer.state_dict()}, "evil.pth")
    return "evil.pth"


def cache_naming(data_spec) -> str:
    """A cache whose manifest records ``data_spec`` (dumped with the user's consent), CANARY removed."""
    result = run("dump", "--teacher", "good.pth", "--data", data_spec, "--out", "named.zarr", "--quiet")
    assert result.exit_code == 0, result.output
    assert Path("CANARY").read_text() == "data"
    Path("CANARY").unlink()
    assert open_cache("named.zarr").manifest["dataset"]["spec"] == data_spec
    return "named.zarr"


# -- architectures named inside checkpoints ------------------------------------------------------

CHECKPOINT_ROUTES = {
    "dump": lambda ckpt: ["dump", "--teacher", ckpt, "--data", "data.npz", "--out", "out.zarr", "--quiet"],
    "evaluate": lambda ckpt: ["evaluate", "--model", ckpt, "--data", "data.npz"],
    "verify --recompute": lambda ckpt: ["verify", "good.zarr", "--recompute", "4", "--teacher", ckpt],
    "train-student --eval-teacher": lambda ckpt: ["train-student", "--cache", "good.zarr", "--student", "linear", "--epochs", "1",
                                                  "--eval-data", "data.npz", "--eval-teacher", ckpt, "--out", "runs", "--quiet"],
}


@pytest.mark.parametrize("form", MODULE_FORMS)
@pytest.mark.parametrize("route", sorted(CHECKPOINT_ROUTES))
def test_an_architecture_named_in_a_checkpoint_is_refused_until_the_user_allows_it(workdir, route, form):
    assert run("dump", "--teacher", "good.pth", "--data", "data.npz", "--out", "good.zarr", "--quiet").exit_code == 0
    spec = form.format("make_model")
    args = CHECKPOINT_ROUTES[route](evil_checkpoint(spec))
    assert_refused(run(*args), spec, "--arch")

    # train-student has no --arch for its --eval-teacher: there the only consent is --trust-code
    consents = [["--trust-code"]] + ([] if route.startswith("train-student") else [["--arch", spec]])
    for consent in consents:
        result = run(*args, *consent, *(["--overwrite"] if route.startswith(("dump", "train-student")) else []))
        if route == "verify --recompute":  # it loaded, then found it is not the cache's teacher
            assert result.exit_code == 1 and "is not the teacher this cache was dumped with" in result.output, result.output
        else:
            assert result.exit_code == 0, result.output
        assert "names code" not in result.output
        assert Path("CANARY").read_text() == "model"
        Path("CANARY").unlink()


def test_a_stdlib_function_named_in_a_checkpoint_never_runs(workdir):
    evil_checkpoint("subprocess:run", {"args": ["touch", "CANARY"]})
    assert_refused(run("evaluate", "--model", "evil.pth", "--data", "data.npz"), "subprocess:run", "--arch")
    with pytest.raises(SoftlabelsError, match="names code 'subprocess:run'"):
        load_model("evil.pth")
    assert not Path("CANARY").exists()


def test_a_safetensors_description_is_held_to_the_same_rule(workdir):
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    save_file(layer.state_dict(), "evil.safetensors", metadata={"softlabels": json.dumps({"arch": "canary_mod:make_model"})})
    assert_refused(run("evaluate", "--model", "evil.safetensors", "--data", "data.npz"), "canary_mod:make_model", "--arch")
    loaded = load_model("evil.safetensors", input_shape=(12,), trust_code=True)
    assert loaded.arch == "canary_mod:make_model" and Path("CANARY").exists()


def test_checkpoint_fields_are_validated_before_use(workdir):
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    for field, value, message in [("arch", 7, "'arch'.* not a non-empty string"),
                                  ("arch_kwargs", ["x"], "'arch_kwargs' is not an object"),
                                  ("input_shape", [12, -1], "'input_shape' is not a list of positive integers"),
                                  ("num_classes", "5", "'num_classes' is not a positive integer")]:
        described = {"arch": "linear", "input_shape": [12], "num_classes": 5, field: value}
        torch.save({**described, "state_dict": layer.state_dict()}, "odd.pth")
        result = run("evaluate", "--model", "odd.pth", "--data", "data.npz")
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(message, result.output), result.output


# -- datasets named inside cache manifests -------------------------------------------------------

CACHE_ROUTES = {
    "train-student": lambda cache: ["train-student", "--cache", cache, "--student", "linear", "--epochs", "1", "--out", "runs", "--quiet"],
    "train-student --eval-cache": lambda cache: ["train-student", "--cache", "good.zarr", "--student", "linear", "--epochs", "1",
                                                 "--eval-cache", cache, "--out", "runs", "--quiet"],
    "evaluate --cache": lambda cache: ["evaluate", "--model", "good.pth", "--cache", cache],
    "verify --recompute": lambda cache: ["verify", cache, "--recompute", "4", "--teacher", "good.pth"],
}


@pytest.mark.parametrize("form", MODULE_FORMS)
@pytest.mark.parametrize("route", sorted(CACHE_ROUTES))
def test_a_dataset_named_in_a_manifest_is_refused_until_the_user_allows_it(workdir, route, form):
    assert run("dump", "--teacher", "good.pth", "--data", "data.npz", "--out", "good.zarr", "--quiet").exit_code == 0
    spec = form.format("make_data")
    args = CACHE_ROUTES[route](cache_naming(spec))
    assert_refused(run(*args), spec, "--data")

    explicit = ["--eval-data", spec] if route == "train-student --eval-cache" else ["--data", spec]
    for consent in (["--trust-code"], explicit):
        result = run(*args, *consent, *(["--overwrite"] if route.startswith("train-student") else []))
        assert result.exit_code == 0, result.output
        assert Path("CANARY").read_text() == "data"
        Path("CANARY").unlink()


@pytest.mark.parametrize("form", MODULE_FORMS)
def test_commands_that_need_no_inputs_never_open_a_named_dataset(workdir, form):
    cache = cache_naming(form.format("make_data"))
    for args, output in [(["inspect", cache], "format       softlabels-cache"),
                         (["verify", cache], "ok: named.zarr: 1 chunks checked"),
                         (["convert", cache, "top2.zarr", "--top-k", "2", "--quiet"], "wrote top2.zarr: topk cache")]:
        result = run(*args)
        assert result.exit_code == 0 and output in result.output, result.output
        assert not Path("CANARY").exists()


@pytest.mark.parametrize("recorded", ["evil.py", "canary_mod.py", "file:///etc/passwd", "canary_mod:make_data?n=1"])
def test_a_manifest_path_may_name_only_array_files(workdir, recorded):
    cache_naming("canary_mod:make_data")
    zarr_group = zarr.open_group("named.zarr", mode="r+")
    manifest = dict(zarr_group.attrs["softlabels"])
    manifest["dataset"] = {**manifest["dataset"], "spec": recorded}
    zarr_group.attrs["softlabels"] = manifest
    with open_cache("named.zarr") as cache, pytest.raises(SoftlabelsError, match="names code"):
        source_for_cache(cache)
    assert not Path("CANARY").exists()


def test_a_zarr_array_with_a_pickle_codec_is_never_read(workdir):
    import numcodecs

    from softlabels.trust import refuse_unpickling
    group = zarr.open_group("pickled.zarr", mode="w", zarr_format=2)
    array = group.create_array("x", shape=(4, 3), dtype="float32", filters=[numcodecs.Pickle()], compressors=None)
    with pytest.raises(SoftlabelsError, match="uses a pickle codec, which runs code when read"):
        refuse_unpickling(array, "pickled.zarr: array 'x'")
    # opened as data, zarr 3.1 itself already refuses it; either way nothing is unpickled
    result = run("evaluate", "--model", "good.pth", "--data", "pickled.zarr")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "pickle" in result.output, result.output


def test_recorded_array_paths_open_as_written(workdir):
    assert run("dump", "--teacher", "good.pth", "--data", "data.npz", "--out", "arrays.zarr", "--quiet").exit_code == 0
    with open_cache("arrays.zarr") as cache:
        source = source_for_cache(cache)
        assert source.spec == str(Path("data.npz").resolve())
        assert np.array_equal(source.read(0, 40)[0], np.load("data.npz")["x"])


def test_the_working_directory_leaves_sys_path_after_a_user_spec_is_imported(workdir):
    before = list(sys.path)
    result = run("evaluate", "--model", "good.pth", "--data", "canary_mod:make_data")
    assert result.exit_code == 0, result.output
    assert Path("CANARY").read_text() == "data"
    assert sys.path == before


def test_the_api_defaults_to_refusing(workdir):
    evil_checkpoint("canary_mod:make_model")
    with pytest.raises(SoftlabelsError, match="pass --arch canary_mod:make_model"):
        load_model("evil.pth")
    assert not Path("CANARY").exists()
    assert load_model("evil.pth", arch="canary_mod:make_model").arch == "canary_mod:make_model"
    Path("CANARY").unlink()
    with open_cache(cache_naming("canary_mod:make_data")) as cache:
        with pytest.raises(SoftlabelsError, match="pass --data canary_mod:make_data"):
            source_for_cache(cache)
        assert not Path("CANARY").exists()
        assert len(source_for_cache(cache, trust_code=True)) == 40
        assert Path("CANARY").exists()
