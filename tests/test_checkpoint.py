"""Checkpoint forms, architecture resolution and refusal of anything that would run code."""

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from softlabels import SoftlabelsError, build_model, load_model, save_checkpoint

from .conftest import flip_tensor_bit


def test_self_describing_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(12,), num_classes=5, kwargs={"width": 16, "depth": 1})
    save_checkpoint(tmp_path / "s.pth", model, arch="mlp", arch_kwargs={"width": 16, "depth": 1}, input_shape=(12,), num_classes=5)
    loaded = load_model(tmp_path / "s.pth")
    assert (loaded.arch, loaded.arch_kwargs, loaded.num_classes, loaded.input_shape) == ("mlp", {"width": 16, "depth": 1}, 5, (12,))
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert not loaded.model.training


def test_class_names_round_trip_and_a_bad_classes_field_is_refused(tmp_path):
    model = build_model("linear", input_shape=(4,), num_classes=3)
    save_checkpoint(tmp_path / "named.pth", model, arch="linear", arch_kwargs={}, input_shape=(4,), num_classes=3,
                    classes=["ant", "bee", "cow"])
    save_checkpoint(tmp_path / "plain.pth", model, arch="linear", arch_kwargs={}, input_shape=(4,), num_classes=3)
    assert load_model(tmp_path / "named.pth").classes == ["ant", "bee", "cow"]
    assert load_model(tmp_path / "plain.pth").classes is None
    payload = torch.load(tmp_path / "plain.pth", weights_only=True)
    for bad, message in [("ant", "is not a list of class names"), (["ant", 7, "cow"], "is not a list of class names"),
                         ([], "is not a list of class names"), (["ant", "bee"], "names 2 classes, the model has 3"),
                         (["ant", "bee", "ant"], "names a class twice")]:
        torch.save({**payload, "classes": bad}, tmp_path / "bad.pth")
        with pytest.raises(SoftlabelsError, match=rf"checkpoint .*bad.pth: field 'classes' {message}"):
            load_model(tmp_path / "bad.pth")


def test_bare_state_dict_needs_arch(linear_teacher):
    with pytest.raises(SoftlabelsError, match="--arch"):
        load_model(linear_teacher)
    assert load_model(linear_teacher, arch="linear", input_shape=(12,)).num_classes == 5


def test_safetensors_with_arch(tmp_path):
    model = build_model("linear", input_shape=(12,), num_classes=5)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", arch="linear", input_shape=(12,))
    x = torch.randn(2, 12)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_safetensors_metadata_describes_the_model_and_a_malformed_one_is_refused(tmp_path):
    model = build_model("linear", input_shape=(4,), num_classes=2)
    described = {"arch": "linear", "input_shape": [4], "num_classes": 2, "classes": ["cat", "dog"]}
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata={"softlabels": json.dumps(described)})
    loaded = load_model(tmp_path / "m.safetensors")
    assert (loaded.arch, loaded.input_shape, loaded.classes) == ("linear", (4,), ["cat", "dog"])
    for bad in ['{"arch": "linear", "classes": ["cat"', '["linear"]']:
        save_file(model.state_dict(), str(tmp_path / "bad.safetensors"), metadata={"softlabels": bad})
        with pytest.raises(SoftlabelsError, match="metadata 'softlabels' is not a JSON object"):
            load_model(tmp_path / "bad.safetensors", arch="linear", input_shape=(4,))


def test_state_dict_that_does_not_fit_names_the_key(linear_teacher):
    with pytest.raises(SoftlabelsError, match=r"key '1.weight' has shape \[5, 12\]"):
        load_model(linear_teacher, arch="linear", input_shape=(7,))
    with pytest.raises(SoftlabelsError, match=r"expects \[100, 12\]"):
        load_model(linear_teacher, arch="mlp", input_shape=(12,))
    state = torch.load(linear_teacher)
    del state["1.bias"]
    torch.save(state, linear_teacher)
    with pytest.raises(SoftlabelsError, match="missing key '1.bias'"):
        load_model(linear_teacher, arch="linear", input_shape=(12,))


def test_module_callable_architecture(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def tiny(num_classes, hidden=8):
            return torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, num_classes))
    """))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    model = build_model("my_models:tiny", input_shape=(12,), num_classes=5, kwargs={"hidden": 8})
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    loaded = load_model(tmp_path / "sd.pth", arch="my_models:tiny", arch_kwargs={"hidden": 8})
    x = torch.randn(2, 12)
    torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(SoftlabelsError, match="has no 'nope'"):
        build_model("my_models:nope", input_shape=(12,), num_classes=5)
    with pytest.raises(SoftlabelsError, match="cannot import"):
        build_model("no_such_module_xyz:f", input_shape=(12,), num_classes=5)
    with pytest.raises(SoftlabelsError, match="unknown architecture"):
        build_model("resnet9000", input_shape=(12,), num_classes=5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_a_command_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "payload": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SoftlabelsError, match="refusing to load"):
        load_model(tmp_path / "evil.pth", arch="linear")
    assert not (tmp_path / "pwned").exists()


def test_whole_pickled_module_needs_trust_code(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(SoftlabelsError, match="--trust-code"):
        load_model(tmp_path / "whole.pth")
    loaded = load_model(tmp_path / "whole.pth", trust_code=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_torchscript_needs_trust_code(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(4, 3))
    scripted.save(str(tmp_path / "ts.pt"))
    with pytest.raises(SoftlabelsError, match="TorchScript"):
        load_model(tmp_path / "ts.pt")
    assert load_model(tmp_path / "ts.pt", trust_code=True).model(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"junk" * 100, bytes(range(256)) * 2, None])
def test_missing_truncated_or_corrupt_checkpoint(tmp_path, linear_teacher, content):
    path = tmp_path / "bad.pth"
    if content is None:
        data = linear_teacher.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(SoftlabelsError, match="cannot read checkpoint") as raised:  # corrupt: no advice to trust its code
        load_model(path, arch="linear", input_shape=(12,))
    assert "--trust-code" not in str(raised.value)
    with pytest.raises(SoftlabelsError, match="not found"):
        load_model(tmp_path / "missing.pth")


def test_a_flipped_byte_in_a_tensor_is_refused_by_the_zip_crc(tmp_path):
    """torch.load would load the damaged weights without a word; the zip's CRC-32 catches them."""
    model = build_model("mlp", input_shape=(4,), num_classes=3, kwargs={"width": 8})
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, arch="mlp", arch_kwargs={"width": 8}, input_shape=(4,), num_classes=3)
    flip_tensor_bit(path)
    assert torch.load(path, weights_only=True)["state_dict"]  # what torch alone would accept
    with pytest.raises(SoftlabelsError, match=r"its member .*/data/\S+ fails its CRC-32 \(the file is damaged\)"):
        load_model(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 10**7}, "depth=10000000, but the checkpoint holds 6 tensors"),
    ({"width": 10**9}, "key '1.weight' has shape \\[100, 40\\], the architecture expects \\[1000000000, 40\\]"),
])
def test_arguments_that_do_not_build_the_checkpoints_model_are_refused_before_it_is_built(tmp_path, kwargs, message):
    """A stranger's checkpoint asking for millions of layers or rows: refused in a moment, nothing allocated."""
    model = build_model("mlp", input_shape=(40,), num_classes=3)
    save_checkpoint(tmp_path / "m.pth", model, arch="mlp", arch_kwargs={}, input_shape=(40,), num_classes=3)
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    saved["arch_kwargs"] = kwargs
    torch.save(saved, tmp_path / "huge.pth")
    with pytest.raises(SoftlabelsError, match=message):
        load_model(tmp_path / "huge.pth")


def test_an_input_shape_whose_activations_would_take_gigabytes_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A 16 KB cnn1d checkpoint recording inputs of 2**27 values: building it runs one sample through
    its layers to size the head, which took 17.7 GB. Refused on the meta device, nothing allocated."""
    import softlabels.checkpoint as checkpoint

    kwargs = {"channels": 1, "depth": 26, "kernel_size": 1}
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in build_model("cnn1d", input_shape=(2**27,), num_classes=10, kwargs=kwargs).state_dict().items()}
    torch.save({"arch": "cnn1d", "arch_kwargs": kwargs, "input_shape": [2**27], "num_classes": 10,
                "state_dict": {k: torch.zeros(shape) for k, shape in shapes.items()}}, tmp_path / "wide.pth")

    def on_meta_only(*args, **kw):  # a real build is what this must never reach
        assert torch.empty(0).is_meta, "the model was built on a real device"
        return build_model(*args, **kw)
    monkeypatch.setattr(checkpoint, "build_model", on_meta_only)
    with pytest.raises(SoftlabelsError, match=r"wide.pth: its input_shape \[134217728\] asks for over 1.5 GiB of activations "
                                              r"for one sample when the model is built \(more than the 1 GiB allowed\)"):
        load_model(tmp_path / "wide.pth")
    # given by the caller's data, the shape is the one the model will take anyway: no bound, on to the real build
    with pytest.raises(AssertionError, match="the model was built on a real device"):
        load_model(tmp_path / "wide.pth", input_shape=(2**27,))
    monkeypatch.undo()
    model = build_model("cnn1d", input_shape=(2**16,), num_classes=10, kwargs=kwargs)  # 0.7 MB: loads as before
    save_checkpoint(tmp_path / "fine.pth", model, arch="cnn1d", arch_kwargs=kwargs, input_shape=(2**16,), num_classes=10)
    assert load_model(tmp_path / "fine.pth").input_shape == (2**16,)
