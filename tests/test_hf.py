"""Hugging Face causal LMs: a local directory as a teacher, ``hf:config.json`` as a student."""

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels import load_model, open_cache
from softlabels.checkpoint import file_sha256, save_checkpoint
from softlabels.cli import cli
from softlabels.errors import SoftlabelsError
from softlabels.models import arch_names_code, build_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, SEQ_LEN = 300, 16


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 saved as safetensors with a tokenizer.json, and the model object itself."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model = tiny_gpt2()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, model


def ids(n: int = 3, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


def test_teacher_logits_are_the_models_own(gpt2):
    directory, model = gpt2
    teacher = load_model(directory, input_shape=(SEQ_LEN,))
    x = ids()
    with torch.no_grad():
        np.testing.assert_array_equal(teacher.model(x).numpy(), model(input_ids=x).logits.numpy())
    assert not teacher.model.training
    assert teacher.num_classes == VOCAB
    described = teacher.describe()
    assert described["arch"] == f"hf:{directory}" and described["file"] == "tiny-gpt2"
    assert described["tokenizer"]["vocab_size"] == 3  # the tokenizer's tokens, fewer than the logits
    assert described["params"] == sum(p.numel() for p in model.parameters())


def test_teacher_sha256_covers_config_and_weights(gpt2, tmp_path):
    directory, _ = gpt2
    first = load_model(directory).sha256
    assert load_model(directory).sha256 == first
    other = tmp_path / "other"
    tiny_gpt2(seed=1).save_pretrained(other, safe_serialization=True)
    assert load_model(other).sha256 != first
    copy = copy_of(directory, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    assert load_model(copy).sha256 != first


def test_directories_that_are_refused(gpt2, tmp_path):
    directory, model = gpt2
    copy = copy_of(directory, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    with pytest.raises(SoftlabelsError, match=r"names remote code \(auto_map\)"):
        load_model(copy)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SoftlabelsError, match="takes at most 64 positions, but the windows have 65"):
        load_model(copy, input_shape=(65,))
    with pytest.raises(SoftlabelsError, match="outputs 300 logits"):
        load_model(copy, num_classes=10)
    with pytest.raises(SoftlabelsError, match="names its own architecture"):
        load_model(copy, arch="gpt")
    (copy / "config.json").write_text(json.dumps({**config, "n_positions": "64"}))  # a field of the wrong type
    with pytest.raises(SoftlabelsError, match=r"HF configuration .*config.json"):
        load_model(copy)
    (copy / "config.json").write_text(json.dumps(config))
    weights = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights[:8] + b"{not json" + weights[17:])  # a damaged header
    with pytest.raises(SoftlabelsError, match=r"cannot load the HF model in .*: .*"):
        load_model(copy)
    (copy / "model.safetensors").unlink()
    torch.save(model.state_dict(), copy / "pytorch_model.bin")
    with pytest.raises(SoftlabelsError, match="an HF directory without weights"):
        load_model(copy)


def test_a_teacher_with_missing_weights_is_refused(gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = copy_of(gpt2[0], tmp_path)
    tensors = load_file(copy / "model.safetensors")
    # as many values as the model has parameters, so that only the names tell that one is missing
    tensors["transformer.unused"] = tensors.pop("transformer.ln_f.weight")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SoftlabelsError, match="the weights lack 1 tensors of the model, e.g. 'transformer.ln_f.weight'"):
        load_model(copy)


def test_without_transformers(gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SoftlabelsError, match=r"pip install 'softlabels\[lm\]'"):
        load_model(gpt2[0])


def test_student_from_a_config_saves_and_reloads_with_consent(gpt2, tmp_path):
    directory, _ = gpt2
    arch = f"hf:{directory / 'config.json'}"
    assert arch_names_code(arch)
    student = build_model(arch, input_shape=(SEQ_LEN,), num_classes=VOCAB)
    x = ids()
    assert student(x).shape == (3, SEQ_LEN, VOCAB)
    assert build_model(f"hf:{directory}", input_shape=(SEQ_LEN,), num_classes=VOCAB)(x).shape == (3, SEQ_LEN, VOCAB)
    with pytest.raises(SoftlabelsError, match="has vocab_size 300, but there are 301 classes"):
        build_model(arch, input_shape=(SEQ_LEN,), num_classes=VOCAB + 1)
    with pytest.raises(SoftlabelsError, match="HF configuration not found"):
        build_model(f"hf:{tmp_path / 'none.json'}", input_shape=(SEQ_LEN,), num_classes=VOCAB)

    path = tmp_path / "student.pth"
    save_checkpoint(path, student.eval(), arch=arch, arch_kwargs={}, input_shape=(SEQ_LEN,), num_classes=VOCAB)
    with pytest.raises(SoftlabelsError, match="names code .* pass --arch"):
        load_model(path)
    for loaded in (load_model(path, arch=arch), load_model(path, trust_code=True)):
        assert loaded.arch == arch and loaded.num_classes == VOCAB
        with torch.no_grad():
            np.testing.assert_array_equal(loaded.model(x).numpy(), student(x).numpy())


def test_dump_through_the_cli(gpt2, tmp_path):
    directory, _ = gpt2
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, input_ids=ids(n=10).numpy())
    out = tmp_path / "c.zarr"
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(directory), "--data", str(tokens), "--out", str(out),
                                      "--top-k", "5", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        targets, _ = cache.read(0, len(cache))
        assert len(cache) == 10 and cache.items == (SEQ_LEN,) and cache.num_classes == VOCAB
        assert targets["topk_logits"].shape == targets["topk_indices"].shape == (10, SEQ_LEN, 5)
        assert (targets["topk_indices"] < VOCAB).all()
        teacher = cache.manifest["teacher"]
        assert teacher["arch"] == f"hf:{directory}" and teacher["sha256"] == load_model(directory).sha256


def test_an_hf_student_trains_from_a_token_cache_under_its_folder_name(gpt2, tmp_path, monkeypatch):
    directory, _ = gpt2
    monkeypatch.chdir(tmp_path)
    np.savez("tok.npz", input_ids=ids(n=12).numpy())
    runner = CliRunner()
    done = runner.invoke(cli, ["dump", "--teacher", str(directory), "--data", "tok.npz", "--out", "c.zarr", "--top-k", "8",
                               "--device", "cpu", "--quiet"])
    assert done.exit_code == 0, done.output
    shutil.copytree(directory, "small")
    done = runner.invoke(cli, ["train-student", "--cache", "c.zarr", "--student", "hf:small/config.json", "--epochs", "1",
                               "--batch-size", "4", "--device", "cpu", "--out", "run", "--quiet"])
    assert done.exit_code == 0, done.output
    saved = torch.load(tmp_path / "run" / "small" / "student.pth", weights_only=True)
    assert saved["arch"] == f"hf:{tmp_path / 'small' / 'config.json'}"  # absolute: reloads from anywhere


@contextmanager
def no_hang(seconds: int = 20):
    """A read that blocks (a FIFO) fails the test instead of hanging it."""
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)


def sharded(directory, tmp_path):
    """A copy whose weights are one shard named by model.safetensors.index.json, as large models are saved."""
    copy = copy_of(directory, tmp_path)
    from safetensors import safe_open

    with safe_open(copy / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (copy / "model.safetensors").rename(copy / "model-00001-of-00001.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    return copy


def test_sha256_covers_exactly_the_weight_files_loaded(gpt2, tmp_path):
    directory, model = gpt2
    copy = sharded(directory, tmp_path)
    teacher = load_model(copy)
    x = ids()
    with torch.no_grad():
        np.testing.assert_array_equal(teacher.model(x).numpy(), model(input_ids=x).logits.numpy())
    # Files beside the weights that are not loaded, even a FIFO or a link to /dev/zero, are not read.
    os.mkfifo(copy / "zz.safetensors")
    (copy / "zero.safetensors").symlink_to("/dev/zero")
    with no_hang():
        assert load_model(copy).sha256 == teacher.sha256
    # The digest is the one of config.json and the shards, as earlier versions took it: the index is
    # not hashed, and must place each tensor in the one shard that holds it.
    expected = hashlib.sha256("".join(f"{f.name}\0{file_sha256(f)}\n" for f in
                                      [copy / "config.json", copy / "model-00001-of-00001.safetensors"]).encode())
    assert teacher.sha256 == expected.hexdigest()


def test_an_index_must_place_each_tensor_in_the_one_shard_that_holds_it(gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = gpt2
    copy = copy_of(directory, tmp_path)
    tensors = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, held in halves.items():
        save_file({name: tensors[name].contiguous() for name in held}, copy / shard)
    weight_map = {name: shard for shard, held in halves.items() for name in held}
    index = copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    load_model(copy)  # two shards, each tensor where the index says
    moved = names[0]
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**weight_map, moved: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SoftlabelsError, match=f"places tensor '{re.escape(moved)}' in model-00002-of-00002.safetensors, "
                                              "which does not hold it"):
        load_model(copy)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({name: tensors[name].contiguous() for name in [*halves["model-00002-of-00002.safetensors"], moved]},
              copy / "model-00002-of-00002.safetensors")
    with pytest.raises(SoftlabelsError, match=f"tensor '{re.escape(moved)}' is in two weight files"):
        load_model(copy)


def test_a_teachers_tokenizer_is_recorded_not_bounded_as_text_data_is(gpt2, tmp_path):
    """A teacher folder's tokenizer.json is only hashed and counted (the teacher reads token ids),
    so a normalizer that text data would refuse for how far it can lengthen a text does not stop it."""
    directory, _ = gpt2
    copy = copy_of(directory, tmp_path)
    settings = json.loads((copy / "tokenizer.json").read_text())
    settings["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": " "}, "content": " " * 100}] * 6}
    (copy / "tokenizer.json").write_text(json.dumps(settings))
    teacher = load_model(copy)
    assert teacher.tokenizer["sha256"] == file_sha256(copy / "tokenizer.json")


def test_a_shard_the_index_names_but_the_folder_lacks_is_named(gpt2, tmp_path):
    directory, _ = gpt2
    copy = sharded(directory, tmp_path)
    (copy / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(SoftlabelsError, match=r"model.safetensors.index.json names weights file "
                                              r"model-00001-of-00001.safetensors, which is not in "):
        load_model(copy)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/abs/model.safetensors", "sub/model.safetensors",
                                   "pytorch_model.bin", "shard.dat"])
def test_an_index_may_name_only_safetensors_files_beside_it(gpt2, tmp_path, shard):
    directory, model = gpt2
    copy = sharded(directory, tmp_path)
    torch.save(model.state_dict(), copy / "pytorch_model.bin")  # a pickle transformers would load if named
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], shard)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SoftlabelsError, match=f"names weights file '{re.escape(shard)}': only \\*.safetensors files beside it are loaded"):
        load_model(copy)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_weights_and_configs_that_are_not_regular_files_are_refused(gpt2, tmp_path, kind):
    directory, _ = gpt2
    copy = sharded(directory, tmp_path)

    def replace(path):
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")

    replace(copy / "model-00001-of-00001.safetensors")
    with no_hang(), pytest.raises(SoftlabelsError, match=r"model-00001-of-00001.safetensors is not a regular file"):
        load_model(copy)
    replace(copy / "config.json")  # read by the teacher and by an hf: student
    with no_hang(), pytest.raises(SoftlabelsError, match=r"config.json is not a regular file"):
        build_model(f"hf:{copy}", input_shape=(SEQ_LEN,), num_classes=VOCAB)


def test_a_config_naming_its_own_weights_file_is_refused(gpt2, tmp_path):
    directory, model = gpt2
    copy = copy_of(directory, tmp_path)
    torch.save(model.state_dict(), copy / "adapter_model.bin")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(SoftlabelsError, match=r"names its own weights file \(transformers_weights\)"):
        load_model(copy)


def test_weights_smaller_than_the_configured_model_are_refused_before_it_is_allocated(gpt2, tmp_path, monkeypatch):
    directory, _ = gpt2
    copy = copy_of(directory, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "vocab_size": 10**6}))  # an embedding of 32M values
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was allocated before its weights were checked"))
    with pytest.raises(SoftlabelsError, match=r"the weights hold 24,416 values, fewer than the 32,014,816 parameters "
                                              r"of the model its config.json describes"):
        load_model(copy)
