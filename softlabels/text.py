"""Plain text as token windows: ``text:PATH?tokenizer=TOKENIZER_JSON&seq_len=L``.

``PATH`` is a UTF-8 text file or a folder; a folder means every regular file under it, recursively,
in the sorted order of their relative paths (``a/b.txt`` as a string), whatever their suffix. Each
file is one document, tokenised whole with a ``tokenizers`` JSON file (special tokens only where the
tokenizer's post-processor adds them). The documents are concatenated and cut into consecutive
windows of exactly ``L`` tokens; the last, incomplete window is dropped. ``segment_ids`` holds each
token's document index, so no position is trained to predict across a document boundary.

The windows are made once, at open, and kept in memory. Needs the ``tokenizers`` package
(``pip install 'softlabels[lm]'``), imported only here.

Example::

    source = open_data("text:corpus/?tokenizer=tokenizer.json&seq_len=128")
    source.tokenizer                  # {'sha256': '3f1c...', 'vocab_size': 32000}
    ids, labels = source.read(0, 4)   # [4, 128] each
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from .errors import MissingData, SoftlabelsError
from .tokens import TokenSource

_PARAMETERS = ("tokenizer", "seq_len")
INSTALL_HINT = "pip install 'softlabels[lm]'"


def read_tokenizer(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` in the JSON file ``path`` and what caches record of it:
    ``{"sha256": sha256 of the file's bytes, "vocab_size": tokens including added ones}``.

    Example::

        tokenizer, record = read_tokenizer("tokenizer.json")   # record["vocab_size"] == 32000
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SoftlabelsError(f"reading a tokenizer needs the tokenizers package: {INSTALL_HINT}") from None
    path = Path(path)
    if path.is_dir():
        raise SoftlabelsError(f"tokenizer {path} is a folder: give its tokenizer file, e.g. {path / 'tokenizer.json'}")
    if not path.is_file():
        raise SoftlabelsError(f"tokenizer file not found: {path}")
    try:
        data = path.read_bytes()
        # Parsed from the very bytes that are hashed, so the record names what was used.
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except OSError as exc:
        raise SoftlabelsError(f"cannot read tokenizer {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # tokenizers raises plain Exceptions for a file it cannot parse
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SoftlabelsError(f"tokenizer {path} is not a tokenizers JSON file ({reason})") from None
    return tokenizer, {"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": tokenizer.get_vocab_size()}


def open_text(spec: str) -> TokenSource:
    """Open ``text:PATH?tokenizer=T&seq_len=L`` (see the module docstring); its canonical spec has
    absolute paths."""
    path, tokenizer_path, seq_len = _parse(spec)
    tokenizer, record = read_tokenizer(tokenizer_path)
    documents = [np.asarray(tokenizer.encode(_read_utf8(file)).ids, dtype=np.int32) for file in _documents(path)]
    ids = np.concatenate(documents)
    windows = len(ids) // seq_len
    if windows == 0:
        raise SoftlabelsError(f"data spec {spec}: {len(ids)} tokens in all, not one window of {seq_len}")
    used = windows * seq_len
    segments = np.repeat(np.arange(len(documents), dtype=np.int32), [len(d) for d in documents])
    arrays = {"input_ids": ids[:used].reshape(windows, seq_len), "segment_ids": segments[:used].reshape(windows, seq_len)}
    canonical = f"text:{path}?tokenizer={quote(str(tokenizer_path), safe='/')}&seq_len={seq_len}"
    return TokenSource(canonical, lambda: arrays, tokenizer=record)


def _parse(spec: str) -> tuple[Path, Path, int]:
    rest = spec[len("text:"):]
    # The path is taken literally up to the first '?'. The values after it are %-decoded, but a '+'
    # stays a '+' (unlike in a URL's query), so that a path typed as it is means what it says.
    location, _, query = rest.partition("?")
    if not location:
        raise SoftlabelsError(f"data spec {spec}: no path after 'text:'")
    params: dict[str, str] = {}
    for key, _, value in (pair.partition("=") for pair in query.split("&") if pair):
        key, value = unquote(key), unquote(value)
        if key not in _PARAMETERS:
            raise SoftlabelsError(f"data spec {spec}: unknown parameter '{key}' (use tokenizer and seq_len)")
        if key in params:
            raise SoftlabelsError(f"data spec {spec}: parameter '{key}' given twice")
        params[key] = value
    missing = [key for key in _PARAMETERS if not params.get(key)]
    if missing:
        raise SoftlabelsError(f"data spec {spec}: missing {' and '.join(missing)} (text:PATH?tokenizer=T&seq_len=L)")
    try:
        seq_len = int(params["seq_len"])
    except ValueError:
        raise SoftlabelsError(f"data spec {spec}: seq_len must be an integer, got '{params['seq_len']}'") from None
    if seq_len < 2:
        raise SoftlabelsError(f"data spec {spec}: seq_len must be at least 2 (a window needs a next token to predict)")
    path = Path(location).expanduser().absolute()
    if not path.exists():
        raise MissingData(f"data spec {spec}: no such file or directory: {path}")
    return path, Path(params["tokenizer"]).expanduser().absolute(), seq_len


def _documents(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise SoftlabelsError(f"text folder {path} holds no files")
    return files


def _read_utf8(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SoftlabelsError(f"text file {file} is not UTF-8 (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise SoftlabelsError(f"cannot read text file {file}: {exc.strerror or exc}") from None
