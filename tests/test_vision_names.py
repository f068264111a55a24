"""torchvision:NAME and timm:NAME where the vision extra is missing, as in .venv: the names pass the
code-from-files rule, a name that is not a plain model name is refused before anything is imported,
and building one asks for the extra. tests/test_vision.py covers the models themselves."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels import build_model
from softlabels.cli import cli
from softlabels.errors import SoftlabelsError
from softlabels.models import arch_names_code

INSTALL_HINT = "pip install 'softlabels[vision]'"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding images.npz (eight [3, 8, 8] images) and canary_mod.py, whose
    import would create the file CANARY; torchvision and timm are made unimportable."""
    monkeypatch.chdir(tmp_path)
    for module in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes an import fail
    rng = np.random.default_rng(0)
    np.savez("images.npz", x=rng.normal(size=(8, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 8))
    Path("canary_mod.py").write_text("import pathlib\npathlib.Path('CANARY').write_text('imported')\n")
    yield tmp_path
    sys.modules.pop("canary_mod", None)


def checkpoint_recording(arch: str) -> str:
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    torch.save({"arch": arch, "arch_kwargs": {}, "input_shape": [3, 8, 8], "num_classes": 4,
                "state_dict": layer.state_dict()}, "recorded.pth")
    return "recorded.pth"


def evaluate_error(ckpt: str) -> str:
    """The one line that ``evaluate`` fails with."""
    result = CliRunner().invoke(cli, ["evaluate", "--model", ckpt, "--data", "images.npz"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("arch,names_code", [
    ("mlp", False), ("torchvision:resnet18", False), ("timm:resnet18", False), ("timm:any_name", False),
    ("torchvision.models:resnet18", True), ("os:system", True), ("hf:config.json", True), (["mlp"], True), (7, True),
])
def test_vision_names_are_built_in_specs(arch, names_code):
    assert arch_names_code(arch) is names_code


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "timm:resnet18"])
def test_a_recorded_vision_name_passes_the_code_check_and_asks_for_the_extra(workdir, arch):
    line = evaluate_error(checkpoint_recording(arch))
    assert INSTALL_HINT in line and "names code" not in line and "--trust-code" not in line, line
    with pytest.raises(SoftlabelsError, match=re.escape(INSTALL_HINT)):
        build_model(arch, input_shape=(3, 32, 32), num_classes=10)


@pytest.mark.parametrize("arch", ["torchvision:os.system", "timm:../canary_mod", "timm:canary_mod.x", "torchvision:",
                                  "timm:resnet18.a1_in1k", "torchvision:resnet18 "])
def test_a_recorded_name_that_is_not_a_plain_model_name_is_refused(workdir, arch):
    line = evaluate_error(checkpoint_recording(arch))
    assert line.startswith(f"error: architecture '{arch}' does not name a model: ") and "such as" in line, line
    assert not Path("CANARY").exists()


def test_a_recorded_arch_that_is_not_a_string_is_a_one_line_error(workdir):
    assert re.search(r"field 'arch'\) is not a non-empty string: \['mlp'\]", evaluate_error(checkpoint_recording(["mlp"])))


def test_a_torchvision_that_fails_to_import_is_a_one_line_error(workdir, monkeypatch):
    # as PyPI's torchvision does beside a torch it was not built for
    Path("broken/torchvision").mkdir(parents=True)
    Path("broken/torchvision/__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.delitem(sys.modules, "torchvision.models")
    monkeypatch.syspath_prepend("broken")
    line = evaluate_error(checkpoint_recording("torchvision:resnet18"))
    assert line == (f"error: cannot import torchvision.models, RuntimeError: operator torchvision::nms does not exist "
                    f"(it must be the release built for torch {torch.__version__})"), line
