"""Recorded augmentation views: each view's parameters are drawn from a generator keyed by
``(seed, sample, view)``, stored in the cache, and replayed exactly from the stored parameters alone.
Each augmentation is one type in one module; this registry is the only place that knows their names.

Adding an augmentation is one :class:`Augmentation` subclass plus one line in :data:`AUGMENTATIONS`;
a user's own is named as ``module:callable`` (or ``file.py:callable``) in ``--augment``.

Example::

    pipeline = Pipeline((parse_augment("shift?max=6"), parse_augment("mixup?alpha=1")), seed=0)
    pipeline.settings()
    # {'seed': 0, 'augment': [{'name': 'shift', 'max': 6}, {'name': 'mixup', 'alpha': 1.0}]}
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable
from urllib.parse import parse_qsl

from ..errors import SoftlabelsError
from ..models import resolve_callable
from ..trust import check_recorded_spec
from .base import Augmentation, Mixer, Pipeline, record_call, view_generator
from .image import Crop, CutMix, Flip
from .mix import MixUp
from .signal import Noise, Scale, Shift

log = logging.getLogger(__name__)

AUGMENTATIONS: dict[str, type[Augmentation]] = {aug.name: aug for aug in (Shift, Scale, Noise, Crop, Flip, MixUp, CutMix)}

# What a custom augmentation's manifest entry holds beside the settings its callable was called with.
_RESERVED = ("name", "callable", "version")


def _known() -> str:
    return f"known: {', '.join(AUGMENTATIONS)}, or module:callable for your own"


def _value(text: str) -> Any:
    """A spec value: a number, a list of numbers (``24,24``), or text where it is no number."""
    values = []
    for part in text.split(","):
        for kind in (int, float):
            try:
                part = kind(part)
                break
            except ValueError:
                continue
        values.append(part)
    return values[0] if len(values) == 1 else values


def parse_augment(spec: str, *, where: str = "--augment") -> Augmentation:
    """The augmentation of ``spec``: ``NAME[?key=value&...]`` for a built-in (values are numbers or
    comma-separated lists of them), or ``module:callable[?key=value&...]`` for the user's own, called
    with the settings and returning an :class:`Augmentation`. ``spec`` is the user's: code it names
    is imported.

    Example::

        parse_augment("crop?size=24,24&scale=0.35,1")
        # Crop(size=(24, 24), scale=(0.35, 1.0), ratio=(0.75, 1.3333333333333333))
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SoftlabelsError(f"{where}: empty augmentation spec ({_known()})")
    here = f"{where} {spec!r}"
    head, _, query = spec.strip().partition("?")
    settings: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key in settings:
            raise SoftlabelsError(f"{here}: {key} is given twice")
        settings[key] = _value(text)
    if ":" in head:
        reserved = [key for key in settings if key in _RESERVED]
        if reserved:
            raise SoftlabelsError(f"{here}: {', '.join(reserved)} cannot be a setting ({', '.join(_RESERVED)} are recorded beside them)")
        return _build(head, settings, here)
    if head not in AUGMENTATIONS:
        raise SoftlabelsError(f"{here}: unknown augmentation {head!r} ({_known()})")
    return AUGMENTATIONS[head].from_settings(settings, where=here)


def augmentation_from_settings(entry: Any, *, where: str, trust_code: bool = False) -> Augmentation:
    """The augmentation a manifest entry records. One naming a callable is built only as
    :func:`softlabels.trust.check_recorded_spec` allows: with ``trust_code``, or not at all."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SoftlabelsError(f"{where}: an augmentation entry is {{name: ..., settings}}, got {entry!r}")
    if "callable" not in entry:
        if entry["name"] not in AUGMENTATIONS:
            raise SoftlabelsError(f"{where}: unknown augmentation {entry['name']!r} ({_known()})")
        kind = AUGMENTATIONS[entry["name"]]
        return kind.from_settings({**kind.unrecorded, **entry}, where=where)
    target = entry["callable"]
    settings = {key: value for key, value in entry.items() if key not in _RESERVED}
    if not isinstance(target, str):
        raise SoftlabelsError(f"{where}: field 'callable' is not a module:callable string: {target!r}")
    check_recorded_spec(_spec(target, settings), names_code=True, where=f"{where} (field 'callable')",
                        option="--augment", trust_code=trust_code)
    augmentation = _build(target, settings, where)
    if augmentation.name != entry["name"]:
        raise SoftlabelsError(f"{where}: {target} now builds augmentation {augmentation.name!r}, "
                              f"but {entry['name']!r} was recorded")
    version = augmentation.settings()["version"]
    if version != entry.get("version"):
        log.warning("%s: %s is now version %s, but version %s was recorded: its views may not replay exactly",
                    where, target, version, entry.get("version"))
    return augmentation


def _spec(target: str, settings: dict[str, Any]) -> str:
    """The ``--augment`` spec that builds what ``target`` and ``settings`` record."""
    text = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in settings.items()}
    return target + ("?" + "&".join(f"{k}={v}" for k, v in text.items()) if text else "")


def _build(target: str, settings: dict[str, Any], where: str) -> Augmentation:
    """Call the user's ``target`` with ``settings`` and record the call in what it returns."""
    factory = resolve_callable(target, what="augmentation")
    try:
        augmentation = factory(**settings)
    except SoftlabelsError:
        raise
    except Exception as exc:  # the user's code can fail in any way
        raise SoftlabelsError(f"{where}: augmentation {target} failed to build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(augmentation, Augmentation) or not isinstance(getattr(augmentation, "name", None), str):
        raise SoftlabelsError(f"{where}: {target} returned {augmentation!r}, not an Augmentation with a name")
    return record_call(augmentation, {"name": augmentation.name, "callable": target, "version": _version(factory), **settings})


def _version(factory: Callable[..., Any]) -> str | None:
    """``__version__`` of the module that defines ``factory``, as text, or ``None``."""
    namespace = getattr(factory, "__globals__", None)
    if namespace is None:  # a class: its module, where imported by name
        module = sys.modules.get(getattr(factory, "__module__", ""))
        namespace = vars(module) if module is not None else {}
    version = namespace.get("__version__")
    return None if version is None else str(version)


__all__ = ["AUGMENTATIONS", "Augmentation", "Crop", "CutMix", "Flip", "MixUp", "Mixer", "Noise", "Pipeline", "Scale",
           "Shift", "augmentation_from_settings", "parse_augment", "view_generator"]
