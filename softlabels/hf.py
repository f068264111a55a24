"""Hugging Face causal language models as teachers and students (needs ``transformers``:
``pip install 'softlabels[lm]'``, imported only inside these functions).

* A teacher is a local model directory: ``config.json`` and ``*.safetensors`` weights (pickled
  ``pytorch_model.bin`` files are never loaded). :func:`softlabels.checkpoint.load_model` hands any
  directory holding a ``config.json`` to :func:`load_hf_teacher`.
* A student is the architecture ``hf:PATH``, PATH a ``config.json`` or a directory holding one: a
  randomly initialised model of that configuration. A checkpoint recording ``hf:PATH`` reloads only
  with the user's consent (``--arch hf:PATH`` or ``--trust-code``), as it reads a configuration
  that the checkpoint names.

Both map ``input_ids [B, L]`` to logits ``[B, L, V]``, V the configuration's ``vocab_size``: the
model's logits, often more than its tokenizer's tokens (Qwen2: 151,936 logits, 151,665 tokens). Nothing
is downloaded and no configuration that needs remote code (``auto_map``) is accepted. Weights are
loaded in float32 whatever their stored dtype, so that ``--precision`` decides the computation.

Example::

    teacher = load_hf_teacher(Path("Qwen2.5-0.5B"))
    teacher.num_classes, teacher.tokenizer["vocab_size"]   # (151936, 151665)
    student = build_model("hf:student/config.json", input_shape=(128,), num_classes=151936)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import LoadedModel, file_sha256, open_regular_file
from .errors import SoftlabelsError
from .models import HF_PREFIX
from .text import INSTALL_HINT, read_tokenizer

# config.json and model.safetensors.index.json are small; a large model's index is about 100 KiB.
_MAX_JSON_BYTES = 16 << 20


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as ``input_ids [B, L]`` to logits ``[B, L, V]``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No key/value cache: every call is a whole window, and the cache would only take memory.
        return self.lm(input_ids=input_ids.long(), use_cache=False).logits


def load_hf_teacher(directory: str | Path, *, input_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None) -> LoadedModel:
    """Load the causal LM in ``directory`` in eval mode.

    ``sha256`` covers ``config.json`` and the weight files that are loaded: ``model.safetensors``, or
    else the shards ``model.safetensors.index.json`` names (the index itself is checked to name,
    for every tensor, the one shard that holds it, so the shards decide what is loaded); ``tokenizer`` is the record of
    the directory's ``tokenizer.json`` when there is one. ``input_shape`` (the windows ``[L]``) and
    ``num_classes`` are checked against the configuration when given.

    Example::

        teacher = load_hf_teacher("gpt2-local")
        teacher.model(torch.zeros(1, 16, dtype=torch.long)).shape   # torch.Size([1, 16, 50257])
    """
    directory = Path(directory).absolute()
    shards, weight_map = _weight_files(directory)
    config = _config(directory / "config.json")
    if getattr(config, "transformers_weights", None) is not None:  # transformers would load that file instead
        raise SoftlabelsError(f"HF configuration {directory / 'config.json'} names its own weights file "
                              "(transformers_weights), which softlabels does not follow")
    sha256 = _directory_sha256([directory / "config.json", *shards])  # before loading: each is checked to be a regular file
    vocab_size = _vocab_size(config, directory)
    if num_classes is not None and num_classes != vocab_size:
        raise SoftlabelsError(f"{directory} outputs {vocab_size} logits (vocab_size), not --num-classes {num_classes}")
    if input_shape is not None:
        _check_windows(config, tuple(input_shape), str(directory))
    transformers = _transformers()
    try:
        _check_weights(transformers, config, shards, weight_map, directory)
        lm, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            dtype=torch.float32, output_loading_info=True,
        )
    except SoftlabelsError:
        raise
    except Exception as exc:  # transformers and safetensors raise types of their own (a damaged header, a bad field)
        raise SoftlabelsError(f"cannot load the HF model in {directory}: {type(exc).__name__}: {_first_line(exc)}") from exc
    # transformers fills missing weights with random ones and only warns; a teacher must be whole.
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise SoftlabelsError(f"{directory}: the weights lack {len(missing)} tensors of the model, e.g. '{missing[0]}'")
    tokenizer = directory / "tokenizer.json"
    return LoadedModel(
        CausalLM(lm).eval(), directory, sha256,
        HF_PREFIX + str(directory), {}, vocab_size, input_shape,
        tokenizer=read_tokenizer(tokenizer)[1] if tokenizer.is_file() else None,
    )


def hf_architecture(path: str) -> Callable[..., nn.Module]:
    """The factory of architecture ``hf:PATH`` (``path`` is PATH): ``f(input_shape, num_classes)``
    builds a randomly initialised :class:`CausalLM` whose ``vocab_size`` must equal ``num_classes``.

    Example::

        hf_architecture("student/config.json")((128,), 4096)(torch.zeros(2, 128, dtype=torch.long)).shape
        # torch.Size([2, 128, 4096])
    """

    def build(input_shape: tuple[int, ...], num_classes: int | None = None) -> nn.Module:
        where = HF_PREFIX + path
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        config = _config(file)
        vocab_size = _vocab_size(config, where)
        if num_classes is not None and num_classes != vocab_size:
            raise SoftlabelsError(f"{where} has vocab_size {vocab_size}, but there are {num_classes} classes (logits) to learn")
        _check_windows(config, tuple(input_shape), where)
        lm = _transformers().AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
        return CausalLM(lm)

    return build


def _check_weights(transformers: Any, config: Any, shards: list[Path], weight_map: dict[str, str] | None,
                   directory: Path) -> None:
    """Refuse weights, read from their safetensors headers before any memory is allocated, that:

    - hold a tensor twice, in two shards, or that the index (``weight_map``) places in a shard that
      does not hold it: the shards alone then decide what is loaded, and their sha256 names it;
    - hold fewer values than the model, built on the meta device, has parameters: transformers
      allocates the whole model first and finds the missing tensors afterwards, so a config.json
      declaring a vocabulary of 10**8 beside weights without an embedding would take GBs."""
    from safetensors import safe_open

    stored, holder = 0, {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name in holder:
                    raise SoftlabelsError(f"{directory}: tensor '{name}' is in two weight files, {holder[name]} and {shard.name}")
                holder[name] = shard.name
                stored += math.prod(f.get_slice(name).get_shape())
    for name, shard in (weight_map or {}).items():
        if holder.get(name) != shard:
            raise SoftlabelsError(f"{directory}: model.safetensors.index.json places tensor '{name}' in {shard}, "
                                  f"which does not hold it")
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    needed = sum(p.numel() for p in lm.parameters())  # a tied weight counts once, as it is stored once
    if needed > stored:
        raise SoftlabelsError(f"{directory}: the weights hold {stored:,} values, fewer than the {needed:,} parameters "
                              "of the model its config.json describes")


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files transformers loads the weights from, and the index's map of tensor names to them:
    ``model.safetensors`` (no map), or else the shards ``model.safetensors.index.json`` names, which
    must be ``*.safetensors`` files of the directory itself (an index may name any path: another
    folder's file, or a pickled ``.bin`` that transformers would unpickle)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return [single], None
    if not index.exists():
        raise SoftlabelsError(f"{directory} is an HF directory without weights: no model.safetensors or "
                              "model.safetensors.index.json (pytorch_model.bin pickles are not loaded)")
    weight_map = _read_json(index, "HF weights index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SoftlabelsError(f"{index} has no weight_map of tensor names to files")
    for shard in weight_map.values():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard):
            raise SoftlabelsError(f"{index} names weights file {shard!r}: only *.safetensors files beside it are loaded")
        if not (directory / shard).exists():
            raise SoftlabelsError(f"{index} names weights file {shard}, which is not in {directory}")
    return [directory / shard for shard in sorted(set(weight_map.values()))], weight_map


def _read_json(file: Path, what: str) -> Any:
    """The JSON object in ``file`` (``what`` names it in errors), a regular file of at most
    ``_MAX_JSON_BYTES``: a FIFO would block the reader, a link to a device read without end."""
    try:
        with open_regular_file(file) as f:
            data = f.read(_MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise SoftlabelsError(f"{what} not found: {file}") from None
    if len(data) > _MAX_JSON_BYTES:
        raise SoftlabelsError(f"{what} {file} is larger than {_MAX_JSON_BYTES >> 20} MiB")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SoftlabelsError(f"cannot read {what} {file}: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise SoftlabelsError(f"{what} {file} is not a JSON object")
    return raw


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SoftlabelsError(f"Hugging Face models need the transformers package: {INSTALL_HINT}") from None
    # softlabels draws its own progress bars; the weights-loading bar would interleave with them
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _config(file: Path) -> Any:
    """The configuration in ``file``, refused when it needs remote code; read by ourselves first, so
    that ``auto_map`` is seen before transformers resolves anything."""
    raw = _read_json(file, "HF configuration")
    if "auto_map" in raw:
        raise SoftlabelsError(f"HF configuration {file} names remote code (auto_map), which softlabels never runs")
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(file), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers validates fields with exception types of its own
        raise SoftlabelsError(f"cannot use HF configuration {file}: {type(exc).__name__}: {_first_line(exc)}") from None


def _vocab_size(config: Any, where: Any) -> int:
    # Multimodal configurations keep the language model's size in their text configuration.
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise SoftlabelsError(f"the HF configuration of {where} has no positive vocab_size")
    return vocab_size


def _check_windows(config: Any, input_shape: tuple[int, ...], where: str) -> None:
    if len(input_shape) != 1:
        raise SoftlabelsError(f"{where} takes token windows [L], not inputs of shape {list(input_shape)}")
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and input_shape[0] > limit:
        raise SoftlabelsError(f"{where} takes at most {limit} positions, but the windows have {input_shape[0]} tokens")


def _directory_sha256(files: list[Path]) -> str:
    """sha256 over each file's name and sha256, in the given order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
