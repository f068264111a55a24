"""What every augmentation is, and the pipeline that records and replays views.

For sample ``i`` and view ``v``, the parameters of every augmentation are drawn from
:func:`view_generator` ``(seed, i, v)``, stored next to the view's targets, and replayed from the
stored parameters alone: no generator is consulted on replay, so a view comes back bit for bit on any
batch size, worker count or device order.

A draw is one view's parameters, numpy scalars or arrays; :meth:`Augmentation.apply` takes a batch,
``x`` ``[B, *shape]`` and each parameter ``[B, *tail]`` (numpy or torch, on any device), and keeps
``x``'s dtype. Inputs are floating point.

Example::

    pipeline = Pipeline((Shift(max=6), MixUp(alpha=1.0)), seed=0)
    record = pipeline.draw(np.array([3, 7]), np.array([0, 0]), num_samples=100, shape=(40,))
    sorted(record)   # ['mixup.lam', 'mixup.partner', 'partner.shift.offset', 'shift.offset']
    views = pipeline.apply(x[[3, 7]], record, partner_x=x[pipeline.partners(record)])
"""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Iterator

import numpy as np
import torch

from ..errors import SoftlabelsError
from ..kinds.base import is_number

Params = dict[str, "torch.Tensor | np.ndarray"]
Declared = dict[str, tuple[np.dtype, tuple[int, ...]]]

# Record names become store record names ("views/shift.offset"), and "partner." prefixes the
# partner's copy of every per-input parameter, so no augmentation may be called "partner".
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PARTNER = "partner."


def view_generator(seed: int, sample: int, view: int) -> np.random.Generator:
    """The generator of one view's parameters: ``np.random.default_rng([seed, sample, view])``, so
    plain numpy reproduces every draw.

    Example::

        view_generator(0, 3, 1).integers(-6, 6, endpoint=True)   # the offset of shift?max=6, alone in a pipeline
    """
    return np.random.default_rng([seed, sample, view])


def per_sample(value: torch.Tensor | np.ndarray, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter ``[B]`` on ``x``'s device, shaped ``[B, 1, ...]`` to broadcast over ``x``'s other axes."""
    return torch.as_tensor(value, device=x.device, dtype=dtype).reshape(-1, *[1] * (x.dim() - 1))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Where arithmetic on ``x`` happens: float32 at least, so a float16 input is rounded once, at the end."""
    return torch.promote_types(x.dtype, torch.float32)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return f"{len(args)} {'integers' if args[0] is int else 'numbers'}, comma-separated"
    return "an integer" if hint is int else "a number"


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as a field of type ``hint`` wants it (tuples from lists, floats from ints), or ValueError."""
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and is_number(value):
        return float(value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal and isinstance(value, str) and value in args:
        return value
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    raise ValueError(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Augmentation:
    """Base of the augmentations. A subclass is a frozen dataclass whose fields are its settings, with
    a spec name (``name``) and one entry in :data:`softlabels.augment.AUGMENTATIONS`; its docstring
    says how each parameter is drawn and applied, so plain numpy can replay a view."""

    name: ClassVar[str]
    mixes: ClassVar[bool] = False
    # First in a pipeline over a source of decoded images (an image folder), it draws for each image's
    # own size and takes its views from the images (from_source), not from the resized inputs.
    crops_source: ClassVar[bool] = False
    # Settings added after caches were written, with the value those caches were made with: a
    # manifest entry without one means that value, not today's default (see augmentation_from_settings).
    unrecorded: ClassVar[dict[str, Any]] = {}

    # -- settings ----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """``{"name": ..., **fields}`` (tuples as lists); for one built by a user's callable (see
        :func:`softlabels.augment.parse_augment`), the recorded call, which is what rebuilds it."""
        call = self.__dict__.get("_call")
        if call is not None:
            return dict(call)
        return {"name": self.name, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, where: str) -> "Augmentation":
        """The augmentation with ``settings`` (``name`` optional), each checked; missing ones take the
        defaults; ``where`` names their source in the one-line error."""
        hints, own = typing.get_type_hints(cls), fields(cls)
        names = [f.name for f in own]
        allowed = f"its parameters: {', '.join(names)}" if names else "it has no parameters"
        for key in settings:
            if key != "name" and key not in names:
                raise SoftlabelsError(f"{where}: {cls.name} has no parameter '{key}' ({allowed})")
        if settings.get("name", cls.name) != cls.name:
            raise SoftlabelsError(f"{where}: settings of {settings['name']!r} given to {cls.name}")
        values = {}
        for f in own:
            if f.name not in settings:
                if f.default is MISSING:
                    raise SoftlabelsError(f"{where}: {cls.name} needs {f.name} ({allowed})")
                continue
            try:
                values[f.name] = _coerce(settings[f.name], hints[f.name])
            except ValueError:
                raise SoftlabelsError(f"{where}: {cls.name} {f.name} must be {_describe(hints[f.name])}, "
                                      f"got {settings[f.name]!r}") from None
        augmentation = cls(**values)
        augmentation.validate(where=where)
        return augmentation

    def validate(self, *, where: str) -> None:
        """Refuse settings out of range (a negative maximum, an empty size, ...)."""

    # -- shapes ------------------------------------------------------------------------------------

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        """Refuse a per-sample input ``shape`` (no batch axis) this augmentation cannot work on."""

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample shape that :meth:`apply` makes of ``shape`` (a crop changes it)."""
        return tuple(shape)

    # -- drawing and applying ----------------------------------------------------------------------

    def params(self, shape: tuple[int, ...]) -> Declared:
        """Each parameter of one view: its dtype and shape, e.g. ``{"offset": (int32, ())}``."""
        raise NotImplementedError

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        """One view's parameters for an input of ``shape``, as :meth:`params` declares them."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """``x`` ``[B, *shape]`` augmented with each view's parameters ``[B, *tail]``: pure and deterministic."""
        raise NotImplementedError

    def from_source(self, source: Any, ids: np.ndarray, params: Params) -> torch.Tensor:
        """With ``crops_source``: the views of rows ``ids`` made from ``source``'s decoded images."""
        raise NotImplementedError

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        """Per stored parameter of views ``[B, *tail]`` (from a cache, so anyone's): whether each view
        holds a value :meth:`draw` can make (``[B]`` bool) and those values in words. A parameter not
        listed is not checked (a user's augmentation lists none)."""
        return {}


def record_call(augmentation: Augmentation, call: dict[str, Any]) -> Augmentation:
    """Mark ``augmentation`` as built by the user's callable, ``call`` being its manifest entry
    (``name``, ``callable``, ``version`` and the settings it was called with)."""
    object.__setattr__(augmentation, "_call", dict(call))  # not a field: equality stays the fields'
    return augmentation


@dataclass(frozen=True)
class Mixer(Augmentation):
    """An augmentation that mixes a sample's view with a partner's: the partner is a sample index
    drawn first, ``partner = rng.integers(num_samples)`` (from the whole dataset, never a batch
    position), and its own view is augmented by the pipeline's per-input augmentations before mixing.
    The stored ``lam`` is the weight of the sample's own label; the partner's is ``1 - lam``."""

    mixes: ClassVar[bool] = True

    def params(self, shape: tuple[int, ...]) -> Declared:
        return {"partner": (np.dtype(np.int64), ())}

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> dict[str, Any]:
        return {"partner": np.int64(rng.integers(num_samples))}

    def drawable(self, params: dict[str, np.ndarray], shape: tuple[int, ...], num_samples: int) -> dict[str, tuple[np.ndarray, str]]:
        partner = params["partner"]
        return {"partner": ((partner >= 0) & (partner < num_samples), f"sample indices 0 to {num_samples - 1}")}

    def apply(self, x: torch.Tensor, params: Params, partner: torch.Tensor) -> torch.Tensor:
        """``x`` mixed with ``partner``, the partner's augmented inputs ``[B, *shape]``."""
        raise NotImplementedError

    def lam(self, params: Params) -> torch.Tensor:
        """``[B]`` float32: the weight of each sample's own label."""
        return torch.as_tensor(params["lam"], dtype=torch.float32)


@dataclass(frozen=True)
class Pipeline:
    """Augmentations applied in order, with at most one :class:`Mixer`, last, and the seed that keys
    every draw.

    A record holds one array per parameter: ``"<aug>.<param>"`` for the sample's per-input
    augmentations, ``"<mixer>.<param>"`` for the mixer's and ``"partner.<aug>.<param>"`` for the
    partner's per-input augmentations. Each view's draws come from :func:`view_generator`
    ``(seed, sample, view)`` in that order: the sample's augmentations in list order, the mixer, the
    partner's augmentations in list order.

    Example::

        pipeline = Pipeline((Crop(size=(24, 24)), Flip()), seed=1)
        record = pipeline.draw(np.arange(8), np.zeros(8, int), num_samples=1000, shape=(3, 32, 32))
        pipeline.apply(images[:8], record).shape   # torch.Size([8, 3, 24, 24])
    """

    augmentations: tuple[Augmentation, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "augmentations", tuple(self.augmentations))
        augs = self.augmentations
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise SoftlabelsError(f"augment seed must be an integer in [0, 2**63), got {self.seed!r}")
        for aug in augs:
            if not isinstance(aug, Augmentation):
                raise SoftlabelsError(f"{aug!r} is not an Augmentation")
            name = getattr(aug, "name", None)
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "partner":
                raise SoftlabelsError(f"augmentation name {name!r} must be lowercase letters, digits "
                                      "and _, starting with a letter, and not 'partner'")
        names = [aug.name for aug in augs]
        mixers = [aug.name for aug in augs if aug.mixes]
        if len(mixers) > 1:
            raise SoftlabelsError(f"at most one mixer per pipeline, got {' and '.join(mixers)}")
        if mixers and not augs[-1].mixes:
            raise SoftlabelsError(f"mixer {mixers[0]} must come last (it mixes the augmented views), "
                                  f"got {', '.join(names)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SoftlabelsError(f"augmentation {', '.join(repeated)} is listed twice; give each at most once")

    @property
    def mixer(self) -> Mixer | None:
        return self.augmentations[-1] if self.augmentations and self.augmentations[-1].mixes else None

    @property
    def _per_input(self) -> tuple[Augmentation, ...]:
        return self.augmentations[:-1] if self.mixer else self.augmentations

    # -- shapes and layout -------------------------------------------------------------------------

    def check_input(self, shape: tuple[int, ...], *, where: str) -> None:
        """Refuse a per-sample input ``shape`` that some augmentation cannot take, where it sees it."""
        for aug in self.augmentations:
            aug.check_input(tuple(shape), where=where)
            shape = aug.output_shape(shape)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample shape of a view of an input of ``shape``."""
        for aug in self.augmentations:
            shape = aug.output_shape(shape)
        return tuple(shape)

    def _layout(self, shape: tuple[int, ...]) -> list[tuple[str, Augmentation, tuple[int, ...], Declared]]:
        """``(prefix, augmentation, shape it sees, its parameters)`` in draw order."""
        seen, steps = tuple(shape), []
        for aug in self.augmentations:
            steps.append(("", aug, seen))
            seen = aug.output_shape(seen)
        if self.mixer:
            steps += [(_PARTNER, aug, s) for _, aug, s in steps[:-1]]
        return [(prefix, aug, s, {k: (np.dtype(d), tuple(t)) for k, (d, t) in aug.params(s).items()})
                for prefix, aug, s in steps]

    def record_arrays(self, shape: tuple[int, ...]) -> Declared:
        """Each record array of one view of an input of ``shape``: its dtype and shape."""
        return {f"{prefix}{aug.name}.{p}": spec for prefix, aug, _, declared in self._layout(shape)
                for p, spec in declared.items()}

    # -- drawing -----------------------------------------------------------------------------------

    def draw(self, samples: np.ndarray, views: np.ndarray, num_samples: int, shape: tuple[int, ...],
             source: Any = None) -> dict[str, np.ndarray]:
        """The record of view ``views[b]`` of sample ``samples[b]`` for each ``b``: arrays ``[B, *tail]``.

        Each value is cast to its declared dtype here, so what is stored is exactly what is applied.
        When the views are cropped from ``source``'s decoded images (:meth:`crops_from`), the crop of a
        sample (and of its partner) is drawn for that image's own shape, ``source.native_shape(i)``.
        """
        layout = self._layout(shape)
        native = source.native_shape if self.crops_from(source) else None
        first = self.augmentations[0] if self.augmentations else None
        samples, views = np.asarray(samples).reshape(-1), np.asarray(views).reshape(-1)
        record = {f"{prefix}{aug.name}.{p}": np.empty((len(samples), *tail), dtype)
                  for prefix, aug, _, declared in layout for p, (dtype, tail) in declared.items()}
        for b, (sample, view) in enumerate(zip(samples.tolist(), views.tolist(), strict=True)):
            rng = view_generator(self.seed, sample, view)
            for prefix, aug, seen, declared in layout:
                if native is not None and aug is first:
                    seen = native(sample if not prefix else int(record[f"{self.mixer.name}.partner"][b]))
                values = aug.draw(rng, seen, num_samples)
                if values.keys() != declared.keys():
                    raise SoftlabelsError(f"augmentation {aug.name} drew {sorted(values)}, but declares {sorted(declared)}")
                for p, (dtype, tail) in declared.items():
                    value = np.asarray(values[p]).astype(dtype)
                    if value.shape != tail:
                        raise SoftlabelsError(f"augmentation {aug.name} drew {p} of shape {list(value.shape)}, "
                                              f"but declares {list(tail)}")
                    record[f"{prefix}{aug.name}.{p}"][b] = value
        return record

    def partners(self, record: dict[str, Any]) -> np.ndarray | None:
        """The partner sample of each view of ``record`` (``None`` without a mixer)."""
        if self.mixer is None:
            return None
        partners = record[f"{self.mixer.name}.partner"]
        return np.asarray(partners.cpu() if isinstance(partners, torch.Tensor) else partners, dtype=np.int64)

    def undrawn(self, record: dict[str, Any], shape: tuple[int, ...], num_samples: int) -> Iterator[tuple[str, np.ndarray, str]]:
        """Each parameter of ``record`` (one view per row, ``[B, *tail]``, for inputs of ``shape`` from
        a dataset of ``num_samples``) holding values its augmentation never draws: its name, which rows
        hold one (``[B]`` bool), and what the augmentation draws."""
        for prefix, aug, seen, _ in self._layout(shape):
            params = {p: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
                      for p, v in self._params(record, prefix, aug).items()}
            for p, (ok, words) in aug.drawable(params, seen, num_samples).items():
                bad = ~np.asarray(ok)
                if bad.any():
                    yield f"{prefix}{aug.name}.{p}", bad, f"{aug.name} draws {words}"

    # -- replaying ---------------------------------------------------------------------------------

    @staticmethod
    def _params(record: dict[str, Any], prefix: str, aug: Augmentation) -> Params:
        head = f"{prefix}{aug.name}."
        return {key[len(head):]: value for key, value in record.items() if key.startswith(head)}

    def crops_from(self, source: Any) -> bool:
        """Whether the views start as crops of ``source``'s decoded images, each at its own resolution
        (an image folder's, see :mod:`softlabels.images`), rather than as its inputs augmented."""
        return bool(self._per_input) and self._per_input[0].crops_source and getattr(source, "native_images", False)

    def source_crops(self, source: Any, ids: np.ndarray, record: dict[str, Any], partner: bool = False) -> torch.Tensor:
        """With :meth:`crops_from`: the first augmentation's views of rows ``ids`` (the partners' with
        ``partner``), made by ``source`` from its decoded images."""
        first = self._per_input[0]
        return first.from_source(source, ids, self._params(record, _PARTNER if partner else "", first))

    def _replay(self, x: torch.Tensor, record: dict[str, Any], prefix: str, cropped: bool) -> torch.Tensor:
        for aug in self._per_input[1 if cropped else 0:]:
            x = aug.apply(x, self._params(record, prefix, aug))
        return x

    def apply(self, x: torch.Tensor, record: dict[str, Any], partner_x: torch.Tensor | None = None, *,
              cropped: bool = False) -> torch.Tensor:
        """The views that ``record`` describes, from the raw inputs ``x`` ``[B, *shape]`` and, with a
        mixer (only then), the partners' raw inputs ``partner_x`` ``[B, *shape]``; with ``cropped``,
        ``x`` and ``partner_x`` are already the first augmentation's output (:meth:`source_crops`)."""
        if self.mixer is not None and partner_x is None:
            raise SoftlabelsError(f"{self.mixer.name} mixes each view with a partner: pass the partners' raw inputs as partner_x")
        if self.mixer is None and partner_x is not None:
            raise SoftlabelsError("no augmentation mixes views, so there are no partner inputs to pass")
        views = self._replay(x, record, "", cropped)
        if self.mixer is None:
            return views
        partners = self._replay(partner_x, record, _PARTNER, cropped)
        return self.mixer.apply(views, self._params(record, "", self.mixer), partners)

    def lam(self, record: dict[str, Any]) -> torch.Tensor | None:
        """The weight of each view's own label, ``[B]`` float32 (``None`` without a mixer)."""
        return None if self.mixer is None else self.mixer.lam(self._params(record, "", self.mixer))

    # -- manifest ----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The manifest form: ``{"seed": ..., "augment": [each augmentation's settings]}``."""
        return {"seed": self.seed, "augment": [aug.settings() for aug in self.augmentations]}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, where: str, trust_code: bool = False) -> "Pipeline":
        """The pipeline a manifest records; an entry naming a callable is built only as
        :func:`softlabels.trust.check_recorded_spec` allows (``--augment`` or ``trust_code``)."""
        from . import augmentation_from_settings  # the registry's module imports this one

        if (not isinstance(settings, dict) or set(settings) - {"seed", "augment"}
                or not isinstance(settings.get("augment"), list)):
            raise SoftlabelsError(f"{where}: augmentation settings are {{seed: int, augment: [entries]}}, got {settings!r}")
        augs = tuple(augmentation_from_settings(entry, where=f"{where} augment[{i}]", trust_code=trust_code)
                     for i, entry in enumerate(settings["augment"]))
        try:
            return cls(augs, settings.get("seed", 0))
        except SoftlabelsError as exc:
            raise SoftlabelsError(f"{where}: {exc}") from None
