"""Token windows for language-model teachers: each sample is a window of ``L`` token ids, and each
position is an item whose target is the teacher's distribution over the next token.

A token dataset holds ``input_ids [N, L]`` (integers), and optionally ``loss_mask [N, L]`` (1 where
a token is a target to predict) and ``segment_ids [N, L]`` (the document of each token, for windows
packed from several documents). The label of position ``t`` is the next token, ``input_ids[t + 1]``,
or ``-1`` where there is none to predict: at the window's last position, where ``loss_mask[t + 1]``
is 0, and across a document boundary. Items labelled ``-1`` carry no loss at all, KD or CE.

Example::

    source = open_data("tokens.npz")      # input_ids [N, 128]
    ids, labels = source.read(0, 2)       # [2, 128] each; labels[:, :-1] == ids[:, 1:] where unmasked
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import torch

from .data import NO_LABEL, LazySource, Source
from .errors import SoftlabelsError
from .kinds.base import log_partitions
from .store import Record

TOKEN_AXIS = "token"
GOLD = "tokens/gold_logprob"
_OPTIONAL = ("loss_mask", "segment_ids")
_FINGERPRINT_ROWS = 1 << 14
# What a token dataset may declare: a file of a few bytes can claim any shape. Every window is read
# whole (into a batch, a fingerprint block), so one holds at most _MAX_WINDOW tokens (the longest
# contexts of current models); the loader holds each epoch's order of the windows in memory (8 bytes
# a window), so there are at most _MAX_WINDOWS; and _MAX_TOKENS in all (their cache is terabytes).
_MAX_WINDOW = 1 << 20
_MAX_WINDOWS = 1 << 28
_MAX_TOKENS = 1 << 38
# Tokens read at once when a whole array is scanned (its largest id, its fingerprint): 32 MiB of int64.
_BLOCK_TOKENS = 1 << 22


def next_token_labels(ids: np.ndarray, loss_mask: np.ndarray | None = None, segments: np.ndarray | None = None) -> np.ndarray:
    """``[n, L]`` int64: ``ids[:, t + 1]`` where it is a target of position ``t``, else ``-1``.

    Example::

        next_token_labels(np.array([[5, 6, 7]]))   # array([[ 6,  7, -1]])
    """
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full(ids.shape, NO_LABEL, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, -1] = False
    if loss_mask is not None:
        keep[:, :-1] &= np.asarray(loss_mask)[:, 1:] != 0
    if segments is not None:
        segments = np.asarray(segments)
        keep[:, :-1] &= segments[:, 1:] == segments[:, :-1]
    labels[~keep] = NO_LABEL
    return labels


class TokenSource(LazySource):
    """Token windows held by array-likes that slice (numpy, zarr, h5py).

    ``opener()`` returns the named arrays (``input_ids`` and the optional ones). ``tokenizer``, when
    known, is ``{"sha256", "vocab_size"}`` of the tokenizer that made the ids; caches record it.
    """

    def __init__(self, spec: str, opener: Callable[[], dict[str, Any]], tokenizer: dict[str, Any] | None = None):
        super().__init__(spec, opener)
        self.tokenizer = tokenizer
        arrays = self._open()
        ids = arrays["input_ids"]
        if len(ids.shape) != 2 or not np.issubdtype(np.dtype(ids.dtype), np.integer):
            raise SoftlabelsError(f"dataset {spec}: 'input_ids' must be integer windows [N, L], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[1] < 2:
            raise SoftlabelsError(f"dataset {spec}: windows of {ids.shape[1]} token have no next token to predict (seq_len >= 2)")
        if ids.shape[1] > _MAX_WINDOW or ids.shape[0] > _MAX_WINDOWS or ids.shape[0] * ids.shape[1] > _MAX_TOKENS:
            raise SoftlabelsError(f"dataset {spec}: 'input_ids' {list(ids.shape)} declares more than softlabels reads "
                                  f"(at most {_MAX_WINDOWS:,} windows of at most {_MAX_WINDOW:,} tokens, {_MAX_TOKENS:,} in all)")
        for name in _OPTIONAL:
            array = arrays.get(name)
            if array is not None and (tuple(array.shape) != tuple(ids.shape) or np.dtype(array.dtype).kind not in "biu"):
                raise SoftlabelsError(f"dataset {spec}: '{name}' must be integers of the shape of input_ids "
                                      f"{list(ids.shape)}, got {array.dtype} {list(array.shape)}")

    def __len__(self) -> int:
        return int(self._open()["input_ids"].shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (int(self._open()["input_ids"].shape[1]),)

    @property
    def has_labels(self) -> bool:
        return True

    @property
    def label_shape(self) -> tuple[int, ...]:
        return self.input_shape

    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, or else the largest token id + 1 (read in blocks)."""
        if self.tokenizer is not None:
            return int(self.tokenizer["vocab_size"])
        ids, rows = self._open()["input_ids"], self._block_rows()
        return 1 + max(int(np.asarray(ids[s:s + rows]).max()) for s in range(0, len(self), rows))

    def _block_rows(self) -> int:
        """Windows of at most ``_BLOCK_TOKENS`` tokens (at least one), read at once by a whole scan."""
        return max(1, min(_FINGERPRINT_ROWS, _BLOCK_TOKENS // self.input_shape[0]))

    @property
    def chunk_rows(self) -> int | None:
        chunks = getattr(self._open()["input_ids"], "chunks", None)
        return int(chunks[0]) if chunks else None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids[start:stop]`` (int64) and their next-token labels (``-1`` where none)."""
        arrays = self._open()
        ids = np.require(self._read_rows("input_ids", arrays["input_ids"], start, stop).astype(np.int64), requirements=["C", "W"])
        if (ids < 0).any():
            raise SoftlabelsError(f"dataset {self.spec}: negative token id in windows {start}..{stop - 1}")
        optional = [None if arrays.get(name) is None else self._read_rows(name, arrays[name], start, stop) for name in _OPTIONAL]
        return ids, next_token_labels(ids, *optional)

    def fingerprint(self) -> str:
        """sha256 of the shapes, dtypes and every byte of the token arrays, read in blocks."""
        if self._fingerprint is None:
            arrays = self._open()
            present = ["input_ids", *(name for name in _OPTIONAL if arrays.get(name) is not None)]
            digest = hashlib.sha256(json.dumps([[name, list(arrays[name].shape), str(arrays[name].dtype)] for name in present]).encode())
            block = self._block_rows()
            for start in range(0, len(self), _FINGERPRINT_ROWS):
                stop = min(start + _FINGERPRINT_ROWS, len(self))
                for name in present:
                    # _FINGERPRINT_ROWS windows of each array in turn, read in smaller parts if long:
                    # the same bytes in the same order, so the same digest.
                    for part in range(start, stop, block):
                        rows = self._read_rows(name, arrays[name], part, min(part + block, stop))
                        digest.update(np.ascontiguousarray(rows).tobytes())
            self._fingerprint = "sha256:" + digest.hexdigest()
        return self._fingerprint


def gold_record(seq_len: int) -> Record:
    """The record a token cache keeps beside its targets: the teacher's log-probability of the
    actual next token at every position (0 where there is none), float16."""
    return Record(GOLD, np.dtype(np.float16), (seq_len,))


def gold_logprob(logits: torch.Tensor, labels: torch.Tensor, log_partition: torch.Tensor | None = None) -> torch.Tensor:
    """``log softmax(logits)[label]`` per item (``logits [..., V]``, ``labels [...]``), 0 where the
    label is ``-1``; float16, computed where the logits are. Given ``log_partition``, the items'
    ``logsumexp(logits)``, it is ``logits[label] - log_partition``: no pass over the vocabulary."""
    labels = labels.to(logits.device)
    index = labels.clamp(min=0).unsqueeze(-1)
    if log_partition is None:
        log_partition = log_partitions(logits.float(), (1.0,))[..., 0]
    picked = logits.gather(-1, index)[..., 0].float() - log_partition.float()
    return torch.where(labels >= 0, picked, torch.zeros_like(picked)).to(torch.float16)


def token_manifest(source: Source, vocab_size: int) -> dict[str, Any] | None:
    """What a cache records of a token dataset: its window length, the teacher's vocabulary size
    (its logits) and the tokenizer's sha256 and vocabulary size (``None`` when unknown)."""
    if not isinstance(source, TokenSource):
        return None
    return {"seq_len": source.input_shape[0], "vocab_size": vocab_size, "tokenizer": source.tokenizer}


def check_tokenizer(recorded: Any, source: Source, where: str) -> None:
    """Refuse a token dataset whose tokenizer differs from the one a cache or model recorded."""
    if not isinstance(source, TokenSource) or not isinstance(recorded, dict):
        return
    ours, theirs = source.tokenizer, recorded.get("tokenizer")
    if ours is not None and theirs is not None and ours.get("sha256") != theirs.get("sha256"):
        raise SoftlabelsError(f"{where} was made with tokenizer sha256 {str(theirs.get('sha256'))[:12]}..., "
                              f"but {source.spec} with {str(ours.get('sha256'))[:12]}...: the token ids do not mean the same")
