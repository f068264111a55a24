"""The rule for code named inside files: refused unless the user named it too, or trusts the file.

A spec the user types (``--arch``, ``--data``, ``--student``, an argument of an API call) may name
code, ``module:callable`` or ``file.py:callable``, and it is imported as asked. A spec read from
inside a file (a checkpoint's ``arch``, a cache manifest's ``dataset.spec``, ...) may come from a
stranger: it may name only built-in things (an architecture of :mod:`softlabels.models`, an
``mnist1d://`` dataset, an array file path), unless the user passes ``--trust-code``
(``trust_code=True``). When the user gives a spec for the same field, the file's spec is not used at
all. Every reader of a file calls :func:`check_recorded_spec` before it resolves anything the file
names, so nothing is imported before the check.

Example::

    arch = check_recorded_spec(described["arch"], names_code=arch_names_code(described["arch"]),
                               where="teacher.pth (field 'arch')", option="--arch", trust_code=False)
    # 'mlp' comes back as it is; 'os:system' raises SoftlabelsError("teacher.pth (field 'arch')
    # names code 'os:system', which is not run unless you ask for it: pass --arch os:system ...")
"""

from __future__ import annotations

import shlex

from .errors import SoftlabelsError


def check_recorded_spec(spec: object, *, names_code: bool, where: str, option: str, trust_code: bool) -> str:
    """Return ``spec`` if it may be used; refuse code that the user neither named nor trusted.

    ``where`` says which file and field the spec came from, ``option`` which command-line option
    gives the same spec explicitly.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SoftlabelsError(f"{where} is not a non-empty string: {spec!r}")
    if names_code and not trust_code:
        raise SoftlabelsError(
            f"{where} names code {spec!r}, which is not run unless you ask for it: pass {option} "
            f"{shlex.quote(spec)} to allow it, or --trust-code if you trust where the file came from"
        )
    return spec


def refuse_unpickling(array: object, where: str) -> None:
    """Refuse a Zarr array whose codecs or filters include a pickle codec (numcodecs' ``Pickle``, in
    Zarr format 2 or 3): reading it would unpickle bytes from the file, which can run code."""
    metadata = getattr(array, "metadata", None)
    codecs = [getattr(metadata, name, None) for name in ("codecs", "filters", "compressor")]  # format 3, then 2
    if "pickle" in repr(codecs).lower():
        raise SoftlabelsError(f"{where} uses a pickle codec, which runs code when read; it is not read")
