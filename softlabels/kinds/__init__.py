"""Target kinds: what a cache stores per item. Each kind is one type in one module; this registry
is the only place that knows their names.

Adding a kind is one module with a :class:`TargetKind` subclass (its settings, arrays, construction,
loss, statistics, and the :class:`~softlabels.kinds.base.Option` list by which ``dump`` and
``convert`` ask for it) plus one line in :data:`KINDS`.

Example::

    kind = kind_from_settings({"kind": "topk", "k": 5}, num_classes=100, where="--top-k")
    kind.settings()   # {'kind': 'topk', 'temperatures': [1.0, 2.0, 4.0, 8.0], 'k': 5}
"""

from __future__ import annotations

from typing import Any

from ..errors import SoftlabelsError
from .base import DEFAULT_TEMPERATURES, STORE_DTYPES, Option, SoftTargets, StoredArray, TargetKind
from .dense import Dense
from .sampled import Sampled
from .topk import TopK

KINDS: dict[str, type[TargetKind]] = {kind.name: kind for kind in (Dense, TopK, Sampled)}


def kind_from_settings(settings: dict[str, Any], *, num_classes: int, where: str, require_all: bool = False) -> TargetKind:
    """The kind named by ``settings["kind"]``, with its settings checked (``where`` names their source;
    ``require_all`` for a manifest, which must record every setting)."""
    name = settings.get("kind", "dense")
    if name not in KINDS:
        raise SoftlabelsError(f"{where}: unknown cache kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name].from_settings(settings, num_classes=num_classes, where=where, require_all=require_all)


__all__ = ["DEFAULT_TEMPERATURES", "KINDS", "STORE_DTYPES", "Dense", "Option", "Sampled", "SoftTargets", "StoredArray",
           "TargetKind", "TopK", "kind_from_settings"]
