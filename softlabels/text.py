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

import base64
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote

import numpy as np

from .checkpoint import file_sha256
from .errors import MissingData, SoftlabelsError
from .tokens import TokenSource

_PARAMETERS = ("tokenizer", "seq_len")
INSTALL_HINT = "pip install 'softlabels[lm]'"

try:
    from re import _parser as _regex_parser  # Python 3.11 and later
except ImportError:  # pragma: no cover
    import sre_parse as _regex_parser

# The most a tokenizer's normalizer and pre-tokenizer together may lengthen a text, in UTF-8 bytes.
# tokenizers holds the transformed text, with an alignment per byte, in memory: a Sequence of
# Replace(" " -> 100 spaces) multiplies a document until an allocation fails and the process aborts.
# Common tokenizers compute to far less: GPT-2's 4, BERT's 7.5, Llama's 12.
_MAX_GROWTH = 1024

# The most a step lengthens a text, bytes out per byte in, for the steps whose factor does not
# depend on their settings (Sequence, Replace, Prepend and Precompiled are computed).
_STEP_GROWTH = {
    # UAX #15's maximum expansion of the normal forms in UTF-8; lowercasing ('İ' -> 'i̇') 1.5
    "NFC": 3.0, "NFD": 3.0, "NFKC": 11.0, "NFKD": 11.0, "Lowercase": 1.5,
    # spaces around a CJK character (3 bytes to 5), then accents stripped after NFD, then lowercase
    "BertNormalizer": 5 / 3 * 3.0 * 1.5,
    "Strip": 1.0, "StripAccents": 1.0, "Nmt": 1.0,
    # every byte a character of up to 2 bytes, and a one-byte piece may get a 2-byte space in front
    "ByteLevel": 4.0,
    # a space becomes the replacement character (up to 4 bytes), and a piece may get one in front
    "Metaspace": 8.0,
    # pre-tokenizers that only split the text
    "BertPreTokenizer": 1.0, "CharDelimiterSplit": 1.0, "Digits": 1.0, "FixedLength": 1.0, "Punctuation": 1.0,
    "Split": 1.0, "UnicodeScripts": 1.0, "Whitespace": 1.0, "WhitespaceSplit": 1.0,
}


def read_tokenizer(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` in the JSON file ``path`` and what caches record of it:
    ``{"sha256": sha256 of the file's bytes, "vocab_size": tokens including added ones}``. Its
    padding and truncation are switched off (before it encodes a text, see :func:`open_text`, the
    growth of a text through it is bounded too).

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
    # A document is tokenised whole: padding would add tokens (a fixed length of 2e9 allocates them
    # all) and truncation would drop the document's end.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, {"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": tokenizer.get_vocab_size()}


def _check_growth(settings: dict[str, Any], path: Path) -> None:
    """Refuse a tokenizer (``settings``, its JSON) whose normalizer and pre-tokenizer could make a
    text more than ``_MAX_GROWTH`` times longer, or longer without bound."""
    growth = _growth(settings.get("normalizer"), path) * _growth(settings.get("pre_tokenizer"), path)
    if growth > _MAX_GROWTH:
        raise SoftlabelsError(f"tokenizer {path} could make a text {growth:.3g} times longer (its normalizer and "
                              f"pre-tokenizer), more than the {_MAX_GROWTH} softlabels accepts")


def _growth(step: Any, path: Path) -> float:
    """The most ``step`` (a normalizer or pre-tokenizer, as JSON) lengthens a text, bytes out per byte in."""
    if step is None:
        return 1.0
    kind = step.get("type")
    if kind == "Sequence":
        factor = 1.0
        for inner in step.get("normalizers", step.get("pretokenizers")) or []:
            factor *= _growth(inner, path)
        return factor
    if kind == "Replace":
        return _replace_growth(step["pattern"], step["content"], path)
    if kind == "Prepend":  # once in front of every piece of text, a piece being at least a byte
        return 1.0 + len(step["prepend"].encode())
    if kind == "Precompiled":
        return _precompiled_growth(step["precompiled_charsmap"])
    if kind not in _STEP_GROWTH:
        raise SoftlabelsError(f"tokenizer {path}: its {kind} step is not one softlabels knows how far it lengthens a text")
    return _STEP_GROWTH[kind]


def _replace_growth(pattern: dict[str, str], content: str, path: Path) -> float:
    """Content bytes per byte of the shortest text the pattern matches; infinite when the pattern
    can match nothing (an empty string, a regex such as ``x*``), which inserts content everywhere."""
    if not content:
        return 1.0
    if "String" in pattern:
        shortest = len(pattern["String"].encode())
    else:
        # Python's reading of the Oniguruma regex, in characters (each at least a byte). A property
        # class (\p{Zs}, \P{L}), which Python's re lacks, matches one character, as '.' does.
        regex = re.sub(r"\\[pP]\{[^}]*\}", ".", pattern["Regex"])
        try:
            shortest = _regex_parser.parse(regex).getwidth()[0]
        except Exception:
            raise SoftlabelsError(f"tokenizer {path}: its Replace normalizer's regex {pattern['Regex']!r} is not one "
                                  "softlabels can read to bound how far it lengthens a text") from None
    return max(1.0, len(content.encode()) / shortest) if shortest else float("inf")


def _precompiled_growth(charsmap: str | None) -> float:
    """A SentencePiece character map replaces a string of at least a byte by one of its stored
    strings, which follow the map's trie (its size in the first 4 bytes), each ending in a 0 byte."""
    blob = base64.b64decode(charsmap or "")
    replacements = blob[4 + int.from_bytes(blob[:4], "little"):].split(b"\0")
    return float(max(1, *map(len, replacements)))


def check_recorded_tokenizer(spec: str, tokens: Any, where: str) -> None:
    """Refuse the ``text:`` spec that a cache records unless its tokenizer file has the sha256 the
    cache records (``tokens``, its manifest's field): a cache may come from anyone, and its spec
    then tokenises only with the tokenizer its dump used, checked before any text is read."""
    tokenizer_path = _parse(spec)[1]
    expected = (tokens.get("tokenizer") or {}).get("sha256") if isinstance(tokens, dict) else None
    if not isinstance(expected, str):
        raise SoftlabelsError(f"{where} records no tokenizer sha256 for its text dataset {spec}: pass --data")
    try:
        found = file_sha256(tokenizer_path)
    except FileNotFoundError:
        raise SoftlabelsError(f"{where}: tokenizer file not found: {tokenizer_path}") from None
    if found != expected:
        raise SoftlabelsError(f"{where} was made with tokenizer sha256 {expected[:12]}..., but {tokenizer_path} "
                              f"has {found[:12]}...: it is not run (pass --data to use it)")


def open_text(spec: str) -> TokenSource:
    """Open ``text:PATH?tokenizer=T&seq_len=L`` (see the module docstring); its canonical spec has
    absolute paths."""
    path, tokenizer_path, seq_len = _parse(spec)
    tokenizer, record = read_tokenizer(tokenizer_path)
    # Its settings as tokenizers has just parsed them (so nested no deeper than it accepts)
    _check_growth(json.loads(tokenizer.to_str()), tokenizer_path)
    with _stderr_held():
        documents = [_encode(tokenizer, record["vocab_size"], file, tokenizer_path) for file in _documents(path)]
    ids = np.concatenate(documents)
    windows = len(ids) // seq_len
    if windows == 0:
        raise SoftlabelsError(f"data spec {spec}: {len(ids)} tokens in all, not one window of {seq_len}")
    used = windows * seq_len
    segments = np.repeat(np.arange(len(documents), dtype=np.int32), [len(d) for d in documents])
    arrays = {"input_ids": ids[:used].reshape(windows, seq_len), "segment_ids": segments[:used].reshape(windows, seq_len)}
    canonical = f"text:{path}?tokenizer={quote(str(tokenizer_path), safe='/')}&seq_len={seq_len}"
    return TokenSource(canonical, lambda: arrays, tokenizer=record)


def _encode(tokenizer: Any, vocab_size: int, file: Path, tokenizer_path: Path) -> np.ndarray:
    """The token ids of ``file``, each checked to be one of the tokenizer's ``vocab_size`` tokens."""
    try:
        ids = np.asarray(tokenizer.encode(_read_utf8(file)).ids, dtype=np.int64)
    except SoftlabelsError:
        raise
    except BaseException as exc:
        # A Rust panic (a regex that backtracks too long) reaches Python as pyo3's PanicException,
        # which derives from BaseException; a KeyboardInterrupt must still interrupt.
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SoftlabelsError(f"tokenizer {tokenizer_path} failed on text file {file}: {reason}") from None
    beyond = ids[ids >= vocab_size]
    if len(beyond):
        raise SoftlabelsError(f"tokenizer {tokenizer_path} gives text file {file} token id {int(beyond[0])}, "
                              f"beyond its vocabulary of {vocab_size} tokens")
    return ids.astype(np.int32)


_STDERR = threading.Lock()


@contextmanager
def _stderr_held() -> Iterator[None]:
    """Hold what the process writes to its stderr (file descriptor 2) meanwhile, and write it out
    afterwards unless the block raises: Rust prints a panic's message (and backtrace) there itself
    before Python sees the PanicException, which the caller reports in one line instead."""
    sys.stderr.flush()
    with _STDERR, tempfile.TemporaryFile() as held:  # one thread at a time: each puts back the stderr it found
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


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
