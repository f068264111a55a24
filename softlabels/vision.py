"""torchvision and timm classification models by name: architectures ``torchvision:NAME`` and
``timm:NAME`` (needs the vision extra, ``pip install 'softlabels[vision]'``; torchvision and timm are
imported here only, and only when such a model is built).

NAME is a plain identifier from the library's own list of classification models
(``torchvision.models.list_models(torchvision.models)``, ``timm.list_models()``). A name can
therefore select one of the library's constructors and nothing else, which makes these names
built-in architectures in the sense of :mod:`softlabels.trust`: a checkpoint may record them.

The model is built with random weights (torchvision ``weights=None``, timm ``pretrained=False``) and
nothing is downloaded: weights come from a local ``.pth`` or ``.safetensors`` file, e.g.
``dump --teacher resnet50.safetensors --arch torchvision:resnet50 --num-classes 1000``. Keyword
arguments that would fetch or read weights (``weights``, ``pretrained``, ``checkpoint_path``, ...)
are refused; ``num_classes`` and every other keyword argument go to the constructor. Inputs are
images ``[C, H, W]`` with C = 3 (timm: ``in_chans``).

Example::

    model = build_model("timm:resnet18", input_shape=(3, 32, 32), num_classes=10)
    model(torch.zeros(2, 3, 32, 32)).shape   # torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import SoftlabelsError

INSTALL_HINT = "pip install 'softlabels[vision]'"


@dataclass(frozen=True)
class _Library:
    """What softlabels needs to know of one model library."""

    prefix: str
    listing: str  # the call that lists the library's models, for error messages
    downloads: frozenset[str]  # keyword arguments that fetch or read weights
    names: Callable[[], list[str]]
    create: Callable[..., nn.Module]  # create(name, **kwargs), random weights
    channels: Callable[[dict[str, Any]], int]  # input channels of the model built with these kwargs


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SoftlabelsError(f"torchvision and timm models need the vision extra ({exc}): {INSTALL_HINT}") from None
    except Exception as exc:  # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise SoftlabelsError(
            f"cannot import {module}, {type(exc).__name__}: {exc} (it must be the release built for torch {torch.__version__})"
        ) from None


def _torchvision_names() -> list[str]:
    models = _import("torchvision.models")
    # Given the module, only the classification models: detection, segmentation and video models
    # do not map an image to logits.
    return models.list_models(module=models)


def _torchvision_create(name: str, **kwargs: Any) -> nn.Module:
    return _import("torchvision.models").get_model(name, weights=None, **kwargs)


def _timm_names() -> list[str]:
    return _import("timm").list_models()


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    return _import("timm").create_model(name, pretrained=False, **kwargs)


_LIBRARIES = {
    library.prefix: library
    for library in (
        _Library(
            prefix="torchvision:",
            listing="torchvision.models.list_models(torchvision.models)",
            # pretrained and pretrained_backbone are the old spellings of weights (True = download)
            downloads=frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone"}),
            names=_torchvision_names,
            create=_torchvision_create,
            channels=lambda kwargs: 3,
        ),
        _Library(
            prefix="timm:",
            listing="timm.list_models()",
            downloads=frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                                 "checkpoint_path", "cache_dir"}),
            names=_timm_names,
            create=_timm_create,
            channels=lambda kwargs: kwargs.get("in_chans", 3),
        ),
    )
}


def is_vision_arch(arch: str) -> bool:
    """Whether ``arch`` names a torchvision or timm model (valid or not)."""
    return arch.startswith(tuple(_LIBRARIES))


def vision_architecture(arch: str) -> Callable[..., nn.Module]:
    """The factory of architecture ``torchvision:NAME`` or ``timm:NAME``:
    ``f(input_shape=None, num_classes=None, **kwargs)``. NAME is checked here, first as a plain
    identifier (before anything is imported), then against the library's list of models.

    Example::

        vision_architecture("torchvision:resnet18")(input_shape=(3, 64, 64), num_classes=4)   # a ResNet
    """
    prefix = next(p for p in _LIBRARIES if arch.startswith(p))
    library, name = _LIBRARIES[prefix], arch[len(prefix):]
    if not name.isidentifier():
        raise SoftlabelsError(
            f"architecture '{arch}' does not name a model: {prefix}NAME takes a plain name from "
            f"{library.listing}, such as {prefix}resnet18"
        )
    names = library.names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(prefix + n for n in close)}? " if close else ""
        raise SoftlabelsError(f"unknown architecture '{arch}': {hint}{library.listing} lists the models")

    def build(input_shape: tuple[int, ...] | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        downloads = sorted(library.downloads & kwargs.keys())
        if downloads:
            raise SoftlabelsError(
                f"architecture '{arch}' does not take {', '.join(downloads)}: it is built with random weights and "
                "nothing is downloaded; weights come from a local .pth or .safetensors file (--teacher FILE)"
            )
        if input_shape is not None:
            channels = library.channels(kwargs)
            if len(input_shape) != 3 or input_shape[0] != channels:
                raise SoftlabelsError(
                    f"architecture '{arch}' takes images [{channels}, H, W], not inputs of shape {list(input_shape)}"
                )
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            return library.create(name, **kwargs)
        except Exception as exc:  # the libraries' constructors fail in many ways: assert, KeyError, TypeError
            raise SoftlabelsError(
                f"cannot build architecture '{arch}' with arguments {sorted(kwargs)}: {type(exc).__name__}: {exc}"
            ) from None

    return build

