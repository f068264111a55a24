"""Recorded augmentation views: ``V`` views per sample, the teacher's targets for each, and the
parameters that made each view, so that a student sees exactly the input its target was made for.

A view cache has the item axis ``view`` (targets ``[N, V, ...]``, labels ``[N, V]``) and one record
per augmentation parameter under ``views/`` (``[N, V]`` or ``[N, V, k]``; see :mod:`softlabels.augment`
for what each holds). The manifest's ``views`` field holds ``count``, the augment ``seed``, the
``augment`` list with every setting, and the ``versions`` of the libraries replay depends on.

The parameters of view ``v`` of sample ``i`` are drawn from a generator keyed by
``(augment seed, i, v)`` alone, and mixing partners are sample indices drawn from the whole dataset,
so the views do not depend on batch size, rank or resumption. Training replays a view from its
stored record; which view a sample gets in an epoch is a pure function of ``(seed, epoch, sample)``:
every view once in each cycle of ``V`` epochs, in an order reshuffled every cycle.

Example::

    views = Views(4, Pipeline((Shift(max=6), MixUp(alpha=1.0)), seed=0))
    records = views.draw(np.arange(8), open_data("mnist1d://train"))
    records["views/mixup.partner"].shape   # (8, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch

from .augment import Pipeline
from .data import NO_LABEL, UNUSABLE, Source
from .errors import SoftlabelsError
from .kinds.base import positive_int
from .kinds.sampled import keyed_uniforms
from .store import Record

VIEW_AXIS = "view"
GROUP = "views/"


def replay_versions() -> dict[str, str]:
    """The versions of the libraries whose arithmetic a replayed view depends on."""
    return {"numpy": np.__version__, "torch": torch.__version__}


# Views per sample a cache may hold: each is a forward pass of the teacher and a row of targets.
MAX_VIEWS = 1 << 16


@dataclass(frozen=True)
class Views:
    """``count`` views per sample, made by ``pipeline``; ``where`` names the cache that records them."""

    count: int
    pipeline: Pipeline
    where: str = field(default="views", compare=False)

    def __post_init__(self) -> None:
        if not positive_int(self.count) or self.count > MAX_VIEWS:
            raise SoftlabelsError(f"--views must be a number of views per sample from 1 to {MAX_VIEWS:,}, got {self.count!r}")

    # -- the manifest and the records --------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"count": self.count, **self.pipeline.settings(), "versions": replay_versions()}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, where: str, trust_code: bool = False) -> "Views | None":
        """The views a cache's manifest records, checked; ``None`` for a cache without views."""
        count = _recorded_count(manifest, where)
        if count is None:
            return None
        pipeline = Pipeline.from_settings({k: v for k, v in manifest["views"].items() if k in ("seed", "augment")},
                                          where=f"{where}: manifest field 'views'", trust_code=trust_code)
        return cls(count, pipeline, where)

    @classmethod
    def count_of(cls, cache: Any) -> int | None:
        """The number of views a cache records (``None``: it has none), refused where its item axes
        disagree: a cache with views holds them on its first item axis, ``view``. (A cache without
        views may name an item axis of its teacher's outputs ``view`` too.) The augmentations are
        not built, so that a reader that keeps the views without replaying them (``convert``) needs
        no code they may name."""
        count = _recorded_count(cache.manifest, str(cache.path))
        axes = cache.layout.item_axes
        if count is not None and tuple(axes[:1]) != ((VIEW_AXIS, count),):
            raise SoftlabelsError(f"{cache.path}: the manifest records {count} views but the first item axis is "
                                  f"{tuple(axes[0]) if axes else 'missing'}")
        return count

    @classmethod
    def of_cache(cls, cache: Any, *, trust_code: bool = False) -> "Views | None":
        """The views a cache records (:meth:`from_manifest`), their count checked by :meth:`count_of`."""
        cls.count_of(cache)
        return cls.from_manifest(cache.manifest, where=str(cache.path), trust_code=trust_code)

    def records(self, input_shape: tuple[int, ...]) -> tuple[Record, ...]:
        """The store records of every parameter, ``views/<name>`` of shape ``[V, *tail]``."""
        return tuple(Record(GROUP + name, np.dtype(dtype), (self.count, *tail))
                     for name, (dtype, tail) in self.pipeline.record_arrays(input_shape).items())

    def check(self, layout_records: tuple[Record, ...], input_shape: tuple[int, ...], where: str) -> None:
        """Refuse a cache whose records are not what these views make from inputs of ``input_shape``
        (its view axis is checked by :meth:`of_cache`)."""
        self.pipeline.check_input(input_shape, where=where)
        if tuple(r for r in layout_records if r.name.startswith(GROUP)) != self.records(input_shape):
            raise SoftlabelsError(f"{where}: the stored view records do not match the recorded augmentations")

    # -- making views (dump, online training) ------------------------------------------------------

    def draw(self, samples: np.ndarray, source: Source) -> dict[str, np.ndarray]:
        """The records of every view of ``samples`` of ``source``: ``views/<name>`` -> ``[len(samples), V, *tail]``."""
        samples = np.asarray(samples, dtype=np.int64)
        flat = self.draw_views(np.repeat(samples, self.count), np.tile(np.arange(self.count), len(samples)), source)
        return {name: a.reshape(len(samples), self.count, *a.shape[1:]) for name, a in flat.items()}

    def draw_views(self, samples: np.ndarray, views: np.ndarray, source: Source) -> dict[str, np.ndarray]:
        """The records of view ``views[j]`` of sample ``samples[j]``: ``views/<name>`` -> ``[len(samples), *tail]``."""
        drawn = self.pipeline.draw(np.asarray(samples, dtype=np.int64), np.asarray(views, dtype=np.int64), len(source),
                                   source.input_shape, source)
        return {GROUP + name: a for name, a in drawn.items()}

    # -- replaying one view per sample (training, verify) ------------------------------------------

    def apply(self, source: Source, x: torch.Tensor | None, record: dict[str, np.ndarray], ids: np.ndarray) -> tuple[torch.Tensor, Mix | None]:
        """Replay one view per row: see :func:`replay`. A stored parameter holding a value its
        augmentation never draws (a lam of 7, a partner past the dataset) is refused first."""
        for name, bad, drawn in self._undrawn(source, record):
            row = int(np.flatnonzero(bad)[0])
            value = np.asarray(record[GROUP + name])[row]
            raise SoftlabelsError(f"{self.where}: stored view parameter '{GROUP}{name}' of sample {int(ids[row])} is "
                                  f"{value.tolist()}, but {drawn}")
        return replay(self.pipeline, source, x, record, ids)

    def replayable(self, source: Source, record: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
        """``[B]`` bool: the rows (samples ``ids``) of ``record`` whose every stored parameter holds a
        value its augmentation draws, which :meth:`apply` replays."""
        rows = np.ones(len(ids), bool)
        for _, bad, _ in self._undrawn(source, record):
            rows &= ~bad
        return rows

    def _undrawn(self, source: Source, record: dict[str, np.ndarray]) -> Iterable[tuple[str, np.ndarray, str]]:
        """:meth:`Pipeline.undrawn` of a record as the cache names its fields (under ``views/``)."""
        return self.pipeline.undrawn({name.removeprefix(GROUP): value for name, value in record.items()},
                                     source.input_shape, len(source))

    def view_of(self, seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
        """Which view each of ``samples`` trains on in ``epoch``: in epochs ``cV .. cV + V - 1`` every
        view once, in an order keyed by ``(seed, c, sample)``."""
        cycle, turn = divmod(epoch, self.count)
        if self.count == 1:
            return np.zeros(len(samples), np.int64)
        key = int(np.random.SeedSequence([seed, cycle]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        u = keyed_uniforms(key, torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64)), (self.count,), 1)[..., 0]
        # The view of rank `turn` in each sample's keyed order: a partition, not a sort (53-bit keys do not tie).
        return np.argpartition(u.numpy(), turn, axis=-1)[:, turn]


def _recorded_count(manifest: dict[str, Any], where: str) -> int | None:
    """The manifest field ``views``'s ``count``, checked; ``None`` for a cache without views."""
    settings = manifest.get("views")
    if settings is None:
        return None
    if not isinstance(settings, dict) or not positive_int(settings.get("count")):
        raise SoftlabelsError(f"{where}: manifest field 'views' must be an object with a positive 'count'")
    return settings["count"]


def mix_weights(records: Iterable[str]) -> list[str]:
    """Of the record names ``records``, those holding the weight of each view's own sample in a mixed
    view (mixup, cutmix)."""
    return [name for name in records if name.startswith(GROUP) and name.endswith(".lam")
            and not name.startswith(f"{GROUP}partner.")]


def scored_items(labels: np.ndarray, records: dict[str, np.ndarray], weights: list[str]) -> np.ndarray:
    """Per item, whether the teacher's accuracy is scored on it: labeled, and where a view is mixed
    with a partner, only where the sample's own label weighs at least half (``weights``:
    :func:`mix_weights`; ``records`` holds them). The dump, ``inspect`` and the report count alike."""
    scored = labels >= 0
    for name in weights:
        scored &= records[name] >= 0.5
    return scored


class Mix(NamedTuple):
    """What a mixed view means for the hard-label term: ``lam * CE(y) + (1 - lam) * CE(partner_labels)``."""

    partner_labels: torch.Tensor
    lam: torch.Tensor


def replay(pipeline: Pipeline, source: Source, x: torch.Tensor | None, record: dict[str, Any],
           ids: np.ndarray) -> tuple[torch.Tensor, Mix | None]:
    """Apply ``pipeline`` to the raw inputs ``x`` (``[B, ...]``) of rows ``ids`` of ``source``, with one
    record per row (``record`` maps each parameter, named with or without ``views/``, to ``[B, *tail]``);
    a mixing partner's raw inputs and label are read from ``source``. When the pipeline crops from the
    source's decoded images (``Pipeline.crops_from``), ``x`` is not used (pass ``None``): the source
    makes the crops. Returns the views and, with a mixer, their :class:`Mix`."""
    record = {name.removeprefix(GROUP): value for name, value in record.items()}
    partners = pipeline.partners(record)
    cropped = pipeline.crops_from(source)
    if cropped:
        x = pipeline.source_crops(source, ids, record)
    if partners is None:
        return pipeline.apply(x, record, cropped=cropped), None
    if cropped:
        partner_x, partner_y = pipeline.source_crops(source, partners, record, partner=True), source.labels_of(partners)
    else:
        partner_x, partner_y = source.take(np.asarray(partners))
        partner_x = torch.from_numpy(np.ascontiguousarray(partner_x))
    views = pipeline.apply(x, record, partner_x.to(x.device), cropped=cropped)
    lam = torch.as_tensor(pipeline.lam(record), dtype=torch.float32).cpu()
    # A partner the dump could not read (skipped, its inputs zeros) has no label to share the loss with.
    partner_y = np.where(partner_y == UNUSABLE, NO_LABEL, partner_y).astype(np.int64)
    return views, Mix(torch.from_numpy(partner_y), lam)
