"""Safe loading and self-describing saving of model checkpoints (teachers and students alike).

Accepted forms, in the order they are recognised:

* ``.safetensors``: tensors only; the architecture comes from ``--arch`` or from the file's metadata.
* TorchScript archives and whole pickled modules: they run code when loaded, so only with
  ``trust_code=True``.
* ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``: a self-describing dict
  ``{"arch", "arch_kwargs", "state_dict", ...}`` (what :func:`save_checkpoint` writes), or a bare state
  dict that needs ``arch``.
* A directory holding ``config.json``: a Hugging Face causal LM with safetensors weights
  (:mod:`softlabels.hf`, needs ``transformers``).

A refused or failed safe load is never retried unsafely.

Example::

    save_checkpoint("student.pth", model, arch="mlp", arch_kwargs={}, input_shape=(40,), num_classes=3,
                    classes=["cat", "dog", "owl"])
    loaded = load_model("student.pth")
    loaded.arch, loaded.num_classes, loaded.classes   # ('mlp', 3, ['cat', 'dog', 'owl'])
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch
from torch import nn

from . import __version__
from .data import Source, check_classes
from .durable import write_atomically
from .errors import SoftlabelsError
from .models import arch_names_code, build_model, count_parameters
from .tokens import TokenSource, check_tokenizer
from .trust import check_recorded_spec

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile

# The most bytes of input and activations that the one-sample forward pass sizing a built-in model's
# head (models._with_head) may hold. The models softlabels trains need a few MB (a 3x224x224 image
# through cnn2d: 22 MB), while an input_shape read from a checkpoint can ask for any amount, and
# the real pass takes many times its activations' size besides (a cnn1d whose activations sum to 2.5
# GiB reached 17.7 GB).
_PROBE_BYTES = 1 << 30


@dataclass
class LoadedModel:
    """A model ready for inference plus what a cache manifest records about it."""

    model: nn.Module
    path: Path
    sha256: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    tokenizer: dict[str, Any] | None = None  # {"sha256", "vocab_size"} of a tokenizer shipped with the model
    classes: list[str] | None = None  # the name of each output class, in order, where the checkpoint records them

    @property
    def params(self) -> int:
        return count_parameters(self.model)

    def check_data(self, source: Source, role: str = "model") -> None:
        """Refuse a dataset whose class names or tokenizer differ from those this model recorded: its
        labels or token ids would mean something else to it."""
        check_classes(self.classes, source, f"{role} {self.path}")
        check_tokenizer({"tokenizer": self.tokenizer}, source, f"{role} {self.path}")

    def check_inputs(self, source: Source, role: str = "model") -> None:
        """Refuse a dataset whose inputs, of another shape than the model was made for, it cannot
        take (tried on two of them: a model that takes any size, with adaptive pooling, passes)."""
        shape = tuple(source.input_shape)
        if self.input_shape is not None and tuple(self.input_shape) != shape and not isinstance(source, TokenSource):
            x = torch.from_numpy(source.read(0, min(2, len(source)))[0])
            try:
                with torch.no_grad():
                    self.model.eval()(x.to(next(self.model.parameters(), x).device))
            except Exception as exc:
                raise SoftlabelsError(f"{role} {self.path} was made for inputs {list(self.input_shape)}, {source.spec} has "
                                      f"{list(shape)}, which it cannot take ({type(exc).__name__}: {' '.join(str(exc).split())})") from None

    def describe(self) -> dict[str, Any]:
        """The manifest's ``teacher`` record."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "params": self.params,
            **({"tokenizer": self.tokenizer} if self.tokenizer is not None else {}),
            **({"classes": self.classes} if self.classes is not None else {}),
        }


def open_regular_file(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file (links followed): a
    FIFO would block the reader forever and a device such as ``/dev/zero`` never end.
    ``FileNotFoundError`` passes through for the caller to name what is missing."""
    try:
        # Without O_NONBLOCK, opening a FIFO blocks until a writer comes, before it can be checked.
        f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SoftlabelsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise SoftlabelsError(f"{path} is not a regular file")
    return f


def file_sha256(path: str | Path) -> str:
    """sha256 of a regular file's bytes (see :func:`open_regular_file`)."""
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    classes: list[str] | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint that :func:`load_model` (and ``dump --teacher``) rebuilds without ``--arch``.

    ``classes`` names each output class in order (an image folder's class names): a dataset whose
    names differ is then refused wherever the model meets it, instead of labels silently meaning
    other classes. ``tokenizer`` (``{"sha256", "vocab_size"}``) names the tokenizer of a language
    model's token ids: data made with another is refused likewise. The file holds only tensors, strings, numbers, lists and dicts, so it loads with
    ``weights_only=True``, and is written through a temporary file, fsynced and renamed, so it is
    never half-written.
    """
    payload = {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes),
        **({"classes": list(classes)} if classes is not None else {}),
        **({"tokenizer": dict(tokenizer)} if tokenizer is not None else {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "softlabels_version": __version__,
    }
    write_atomically(Path(path), lambda f: torch.save(payload, f))


def _zip_members(path: Path) -> list[str] | None:
    """The member names of a zip checkpoint (``None`` for another file), each member's CRC-32
    checked: ``torch.load`` does not check them, and a flipped byte in a tensor would load silently."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SoftlabelsError(f"cannot read checkpoint {path}: corrupt or truncated ({exc})") from exc
    if damaged is not None:
        raise SoftlabelsError(f"cannot read checkpoint {path}: its member {damaged} fails its CRC-32 (the file is damaged)")
    return names


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise SoftlabelsError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    if "softlabels" not in metadata:
        return tensors, {}
    try:
        described = json.loads(metadata["softlabels"])
    except (json.JSONDecodeError, RecursionError):
        described = None
    if not isinstance(described, dict):  # what it says of itself cannot be dropped silently: it may name its classes
        raise SoftlabelsError(f"safetensors checkpoint {path}: its metadata 'softlabels' is not a JSON object")
    return tensors, described


def read_torch_file(path: Path, trust_code: bool = False) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded weights-only (unless ``trust_code``) after every
    zip member's CRC-32 is checked; refusals and damage are one-line errors.

    Example::

        saved = read_torch_file(Path("runs/kd/checkpoint.pt"))
    """
    members = _zip_members(path)
    if members is not None and any(n.endswith("/constants.pkl") or "/code/" in n for n in members):  # TorchScript
        if not trust_code:
            raise SoftlabelsError(
                f"{path} is a TorchScript archive, which runs code when loaded; "
                "pass --trust-code only if you trust where it came from"
            )
        return torch.jit.load(str(path), map_location="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_code)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "global" in line.lower()), None)  # a class or function it names
        if refused is None or trust_code:  # garbage a pickle reader stumbled on, not an object it refused
            reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "not a pickle")
            raise SoftlabelsError(f"cannot read checkpoint {path}: corrupt or not a checkpoint ({reason})") from exc
        raise SoftlabelsError(
            f"refusing to load {path}: it holds Python objects that a weights-only load does not allow "
            f"({refused}); pass --trust-code only if you trust where it came from"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as exc:
        raise SoftlabelsError(f"cannot read checkpoint {path}: corrupt or truncated ({type(exc).__name__}: {exc})") from exc


def _strip_wrappers(state_dict: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _infer_num_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    # The classifier is registered last in nearly every model, so its output size is the first
    # dimension of the last tensor in the state dict. A wrong guess fails the shape check below with a
    # message that points at --num-classes.
    for tensor in reversed(list(state_dict.values())):
        if isinstance(tensor, torch.Tensor) and tensor.ndim >= 1:
            return int(tensor.shape[0])
    return None


def _load_state(model: nn.Module, state_dict: dict[str, Any], path: Path, arch: str, *, check_only: bool = False) -> None:
    """Load ``state_dict`` into ``model``, refusing a missing, unexpected or misshapen key in one line
    (with ``check_only``, only refuse: ``model`` may live on the meta device)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise SoftlabelsError(f"{path} does not fit architecture '{arch}': missing key '{key}'")
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise SoftlabelsError(f"{path} does not fit architecture '{arch}': '{key}' is not a tensor")
        if got.shape != tensor.shape:
            raise SoftlabelsError(
                f"{path} does not fit architecture '{arch}': key '{key}' has shape {list(got.shape)}, "
                f"the architecture expects {list(tensor.shape)} (wrong --arch-kwargs or --num-classes?)"
            )
    for key in state_dict:
        if key not in expected:
            raise SoftlabelsError(f"{path} does not fit architecture '{arch}': unexpected key '{key}'")
    if not check_only:
        model.load_state_dict(state_dict)


def _check_fit_before_building(arch: str, arch_kwargs: dict[str, Any], input_shape: Any, num_classes: int | None,
                               state_dict: dict[str, Any], path: Path, bounded: bool = True) -> None:
    """Refuse arguments that do not build the checkpoint's model before any memory is taken for it:
    a checkpoint's ``arch_kwargs`` (it may come from anyone) could ask for millions of layers or
    rows. A layer holds at least one tensor, so a depth beyond their count cannot fit; wide layers
    are built on the meta device, which allocates nothing, and compared with the state dict. There,
    where the file's ``input_shape`` is ``bounded`` (not the one the caller's data has, which the
    model will take anyway), the forward pass that sizes a head may hold at most ``_PROBE_BYTES``."""
    for key in ("depth", "layers"):
        value = arch_kwargs.get(key)
        if isinstance(value, int) and value > len(state_dict):
            raise SoftlabelsError(f"{path} does not fit architecture '{arch}': {key}={value}, "
                                  f"but the checkpoint holds {len(state_dict)} tensors")
    try:
        with torch.device("meta"), _probe_bytes_at_most(_PROBE_BYTES if bounded else None, path, input_shape):
            probe = build_model(arch, input_shape=input_shape, num_classes=num_classes, kwargs=arch_kwargs)
    except SoftlabelsError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device is checked once built
        return
    _load_state(probe, state_dict, path, arch, check_only=True)


@contextmanager
def _probe_bytes_at_most(limit: int | None, path: Path, input_shape: Any) -> Iterator[None]:
    """Refuse, within, any forward pass whose layers read and write more than ``limit`` bytes of
    tensors in all, each storage counted once (a view is no memory of its own): a bound of what a
    pass without gradients holds. On the meta device the pass itself allocates nothing, so the
    refusal comes before any memory is taken. ``None``: no bound."""
    if limit is None:
        yield
        return
    seen: dict[int, Any] = {}  # storages held, so that no id is reused by a later one
    total = 0

    def count(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        if next(module.children(), None) is not None:  # a container's tensors are its layers'
            return
        for tensor in (*inputs, *(output if isinstance(output, (tuple, list)) else (output,))):
            storage = tensor.untyped_storage() if isinstance(tensor, torch.Tensor) else None
            if storage is not None and id(storage) not in seen:
                seen[id(storage)] = storage
                total += storage.nbytes()
        if total > limit:
            raise SoftlabelsError(f"checkpoint {path}: its input_shape {list(input_shape)} asks for over {total / 2**30:.1f} GiB "
                                  f"of activations for one sample when the model is built (more than the {limit / 2**30:g} GiB "
                                  "allowed): the file is damaged or not made for inputs like these")

    handle = nn.modules.module.register_module_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    trust_code: bool = False,
) -> LoadedModel:
    """Load a checkpoint into an ``nn.Module`` in eval mode; see the module docstring for the forms.

    ``arch``/``arch_kwargs`` override what a self-describing checkpoint says; ``input_shape`` and
    ``num_classes`` fill in what a bare state dict cannot say. An architecture named inside the file
    must be a built-in one unless ``trust_code`` (see :mod:`softlabels.trust`): passing the same
    ``module:callable`` as ``arch`` is how a user allows it.
    """
    path = Path(path)
    if not path.exists():
        raise SoftlabelsError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "config.json").is_file():
        if arch is not None or arch_kwargs:
            raise SoftlabelsError(f"{path} is a Hugging Face model directory, which names its own architecture: drop --arch")
        from .hf import load_hf_teacher

        return load_hf_teacher(path, input_shape=input_shape, num_classes=num_classes)
    if path.is_dir():
        raise SoftlabelsError(f"checkpoint {path} is a folder without config.json: a Hugging Face model folder needs one "
                              "beside its weights; other checkpoints are files")
    if not path.is_file():
        raise SoftlabelsError(f"checkpoint is not a file: {path}")
    sha256 = file_sha256(path)

    if path.suffix == ".safetensors":
        state_dict, described = _read_safetensors(path)
    else:
        obj = read_torch_file(path, trust_code)
        if isinstance(obj, nn.Module):  # only reachable with trust_code
            obj.eval()
            name = arch or f"pickled:{type(obj).__name__}"
            return LoadedModel(obj, path, sha256, name, dict(arch_kwargs or {}), num_classes, input_shape)
        if not isinstance(obj, dict):
            raise SoftlabelsError(f"{path} holds a {type(obj).__name__}, not a state dict or a model")
        if isinstance(obj.get("state_dict"), dict):
            described = {k: v for k, v in obj.items() if k != "state_dict"}
            state_dict = obj["state_dict"]
        elif isinstance(obj.get("model"), dict):
            described, state_dict = {}, obj["model"]
        else:
            described, state_dict = {}, obj
        if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise SoftlabelsError(f"{path} is not a state dict: some values are not tensors")

    state_dict = _strip_wrappers(state_dict)
    described = _validated_description(described, path)
    if arch is None:
        if "arch" not in described:
            raise SoftlabelsError(f"{path} is a bare state dict: pass --arch NAME or module:callable")
        arch = check_recorded_spec(
            described["arch"], names_code=arch_names_code(described["arch"]), where=f"checkpoint {path} (field 'arch')",
            option="--arch", trust_code=trust_code,
        )
    if arch_kwargs is None:
        arch_kwargs = described.get("arch_kwargs", {})
    confirmed = input_shape is not None and tuple(described.get("input_shape", input_shape)) == tuple(input_shape)
    input_shape = described.get("input_shape", input_shape)
    num_classes = num_classes or described.get("num_classes") or _infer_num_classes(state_dict)
    names = described.get("classes")
    if names is not None and len(names) != num_classes:
        raise SoftlabelsError(f"checkpoint {path}: field 'classes' names {len(names)} classes, the model has {num_classes}")
    if not arch_names_code(arch):  # a built-in architecture, built from the file's arguments alone
        _check_fit_before_building(arch, arch_kwargs, input_shape, num_classes, state_dict, path, bounded=not confirmed)
    model = build_model(arch, input_shape=input_shape, num_classes=num_classes, kwargs=arch_kwargs)
    _load_state(model, state_dict, path, arch)
    model.eval()
    return LoadedModel(model, path, sha256, arch, dict(arch_kwargs), num_classes, input_shape, tokenizer=described.get("tokenizer"),
                       classes=names)


def _validated_description(described: dict[str, Any], path: Path) -> dict[str, Any]:
    """The fields of a self-describing checkpoint, each checked for type and range (the file may
    come from anyone); an absent field is left out."""
    checked: dict[str, Any] = {}
    if described.get("arch") is not None:
        checked["arch"] = described["arch"]  # a string or not, check_recorded_spec decides
    kwargs = described.get("arch_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise SoftlabelsError(f"checkpoint {path}: field 'arch_kwargs' is not an object of keyword arguments")
        checked["arch_kwargs"] = kwargs
    shape = described.get("input_shape")
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or not all(_positive_int(d) for d in shape):
            raise SoftlabelsError(f"checkpoint {path}: field 'input_shape' is not a list of positive integers: {shape!r}")
        checked["input_shape"] = tuple(int(d) for d in shape)
    classes = described.get("num_classes")
    if classes is not None:
        if not _positive_int(classes):
            raise SoftlabelsError(f"checkpoint {path}: field 'num_classes' is not a positive integer: {classes!r}")
        checked["num_classes"] = int(classes)
    names = described.get("classes")
    if names is not None:
        if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
            raise SoftlabelsError(f"checkpoint {path}: field 'classes' is not a list of class names")
        if len(set(names)) != len(names):
            raise SoftlabelsError(f"checkpoint {path}: field 'classes' names a class twice")
        checked["classes"] = names
    tokenizer = described.get("tokenizer")
    if tokenizer is not None:
        if not (isinstance(tokenizer, dict) and set(tokenizer) == {"sha256", "vocab_size"} and isinstance(tokenizer["sha256"], str)
                and _positive_int(tokenizer["vocab_size"])):
            raise SoftlabelsError(f"checkpoint {path}: field 'tokenizer' is not an object of 'sha256' and 'vocab_size'")
        checked["tokenizer"] = tokenizer
    return checked


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
