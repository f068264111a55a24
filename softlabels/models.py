"""Built-in architectures and resolution of ``NAME``, ``torchvision:NAME``, ``timm:NAME``,
``hf:PATH`` or ``module:callable`` into a model.

Every architecture is a callable ``f(input_shape, num_classes, **kwargs) -> nn.Module``. Teachers and
students share this registry, so a trained student can serve as the next teacher. torchvision and
timm models come from :mod:`softlabels.vision`, Hugging Face ones from :mod:`softlabels.hf`.

Example::

    model = build_model("mlp", input_shape=(40,), num_classes=10, kwargs={"width": 64})
    model(torch.zeros(2, 40)).shape   # torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import SoftlabelsError
from .gpt import gpt
from .vision import is_vision_arch, vision_architecture

HF_PREFIX = "hf:"  # architecture hf:PATH, a Hugging Face configuration (softlabels.hf)


def _flat_features(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _check_sizes(arch: str, **sizes: Any) -> None:
    """Refuse sizes no layer can have: torch builds a zero-wide layer with a warning, and a string
    or a fraction fails deep inside it."""
    for name, value in sizes.items():
        least = 0 if name == "depth" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SoftlabelsError(f"{arch}: {name} must be an integer of at least {least}, got {value!r}")


def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Logistic regression on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_features(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 100, depth: int = 2) -> nn.Module:
    """``depth`` hidden layers of ``width`` ReLU units on the flattened input."""
    _check_sizes("mlp", width=width, depth=depth)
    layers: list[nn.Module] = [nn.Flatten()]
    features = _flat_features(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class _AddChannel(nn.Module):
    """Gives channel-less inputs (``[B, L]`` or ``[B, H, W]``) the single channel convolutions expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _with_head(features: nn.Sequential, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # The head's size is measured with a dummy forward so that any input length works.
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).flatten(1).shape[1]
    return nn.Sequential(*features, nn.Flatten(), nn.Linear(flat, num_classes))


def cnn1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int = 32,
    depth: int = 3,
    kernel_size: int = 5,
) -> nn.Module:
    """A 1-D CNN for ``[L]`` or ``[C, L]`` inputs: ``depth`` stride-2 convolutions, then a linear head."""
    if len(input_shape) not in (1, 2):
        raise SoftlabelsError(f"cnn1d needs inputs of shape [L] or [C, L], got {list(input_shape)}")
    _check_sizes("cnn1d", channels=channels, depth=depth, kernel_size=kernel_size)
    layers: list[nn.Module] = []
    in_channels = 1
    if len(input_shape) == 1:
        layers.append(_AddChannel())
    else:
        in_channels = input_shape[0]
    for i in range(depth):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv1d(in_channels, channels, kernel_size, stride, kernel_size // 2), nn.ReLU()]
        in_channels = channels
    return _with_head(nn.Sequential(*layers), input_shape, num_classes)


def cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32, depth: int = 2) -> nn.Module:
    """A small 2-D CNN for ``[H, W]`` or ``[C, H, W]`` inputs: ``depth`` conv-ReLU-maxpool blocks."""
    if len(input_shape) not in (2, 3):
        raise SoftlabelsError(f"cnn2d needs inputs of shape [H, W] or [C, H, W], got {list(input_shape)}")
    _check_sizes("cnn2d", channels=channels, depth=depth)
    layers: list[nn.Module] = []
    in_channels = 1
    if len(input_shape) == 2:
        layers.append(_AddChannel())
    else:
        in_channels = input_shape[0]
    for i in range(depth):
        out_channels = channels * 2**i
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = out_channels
    return _with_head(nn.Sequential(*layers), input_shape, num_classes)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "linear": linear,
    "mlp": mlp,
    "cnn1d": cnn1d,
    "cnn2d": cnn2d,
    "gpt": gpt,
}


@contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Put the working directory first on ``sys.path`` for one import, as ``python -m`` would, and
    take it off again so that no later import of the process finds a stray module there."""
    entry = str(Path.cwd())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def resolve_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``module:callable`` (or ``path/to/file.py:callable``) and return the callable.

    Only for specs the user gave (see :mod:`softlabels.trust`). The working directory is importable
    during the import, so a user's ``models.py`` next to their data needs no installation.

    Example::

        resolve_callable("softlabels.models:mlp")   # the function softlabels.models.mlp
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SoftlabelsError(f"{what} '{spec}' is not of the form module:callable")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise SoftlabelsError(f"cannot import {what} '{spec}': file {file} not found")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            with _working_directory_importable():
                module = importlib.import_module(module_name)
    except SoftlabelsError:
        raise
    except Exception as exc:  # an import can fail in any way the user's code can
        raise SoftlabelsError(f"cannot import {what} '{spec}': {type(exc).__name__}: {exc}") from exc
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise SoftlabelsError(f"cannot import {what} '{spec}': module '{module_name}' has no '{attr}'") from None
    if not callable(target):
        raise SoftlabelsError(f"{what} '{spec}' is not callable")
    return target


def arch_names_code(arch: str) -> bool:
    """Whether building ``arch`` would import code: anything but a built-in architecture or a
    ``torchvision:NAME``/``timm:NAME`` (NAME can only pick one of the library's own models).
    ``hf:PATH`` counts as code: the configuration it reads is the checkpoint's choice, not the user's."""
    return not isinstance(arch, str) or not (arch in ARCHITECTURES or is_vision_arch(arch))


def _arch_factory(arch: str) -> Callable[..., nn.Module]:
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch.startswith(HF_PREFIX):
        from .hf import hf_architecture

        return hf_architecture(arch[len(HF_PREFIX):])
    if is_vision_arch(arch):  # before module:callable, which it would otherwise look like
        return vision_architecture(arch)
    if ":" in arch:
        return resolve_callable(arch, what="architecture")
    names = ", ".join(ARCHITECTURES)
    raise SoftlabelsError(
        f"unknown architecture '{arch}': use one of {names}, torchvision:NAME, timm:NAME, hf:config.json, or module:callable"
    )


def build_model(
    arch: str,
    *,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build ``arch`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    A ``module:callable`` receives ``input_shape`` and ``num_classes`` only if its signature names them,
    so ``f(input_shape, num_classes, **kw)``, ``f(num_classes=..., **kw)`` and ``f(**kw)`` all work; an
    unknown ``input_shape`` is an error only where the parameter has no default.
    """
    factory = _arch_factory(arch)
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_shape" in params and "input_shape" not in kwargs:
        if input_shape is not None:
            kwargs["input_shape"] = tuple(input_shape)
        elif params["input_shape"].default is inspect.Parameter.empty:
            raise SoftlabelsError(f"architecture '{arch}' needs the input shape, which is unknown here")
    if "num_classes" in params and "num_classes" not in kwargs and num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except SoftlabelsError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a width of -1 read from a checkpoint
        raise SoftlabelsError(f"cannot build architecture '{arch}' with arguments {sorted(kwargs)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SoftlabelsError(f"architecture '{arch}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output_shape(
    model: nn.Module, sample: torch.Tensor, *, num_classes: int, name: str, items: tuple[int, ...] = ()
) -> None:
    """Refuse a model whose output for a batch of real inputs is not ``[batch, *items, num_classes]``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        hint = "" if sample.is_floating_point() else " (the inputs are token ids: use a language model, e.g. gpt or hf:CONFIG)"
        raise SoftlabelsError(
            f"{name} cannot take inputs of shape {list(sample.shape[1:])}: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    finally:
        model.train(was_training)
    expected = (sample.shape[0], *items, num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SoftlabelsError(
            f"{name} outputs {shape} for a batch of {sample.shape[0]}, but the cache has {list(expected[1:])} per sample"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
