"""Names that become folders or labels: plain (one folder inside another) and distinct.

Example::

    plain_name("mlp"), plain_name("../mlp")        # (True, False)
    distinct(["kd", "kd", "kd-2"])                 # ['kd', 'kd-3', 'kd-2']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def plain_name(value: Any) -> bool:
    """A name that stays one directory inside another (no separators, no ``..``)."""
    return isinstance(value, str) and bool(value) and Path(value).name == value and value not in (".", "..")


def distinct(names: list[str], taken: Iterable[str] = ()) -> list[str]:
    """``names`` made distinct: a name already used (by an earlier name or in ``taken``) becomes the
    first of ``NAME-2``, ``NAME-3``, ... that no name in ``names`` or ``taken`` is."""
    used, given = set(taken), set(names)
    result = []
    for name in names:
        unique, n = name, 1
        while unique in used or (unique != name and unique in given):
            n += 1
            unique = f"{name}-{n}"
        used.add(unique)
        result.append(unique)
    return result
