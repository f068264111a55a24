"""softlabels: run a teacher once, cache its logits, distill many students from the cache.

The public API, in the order data flows through it::

    import softlabels
    teacher = softlabels.load_model("teacher.pth")
    softlabels.dump(teacher, softlabels.open_data("mnist1d://train"), "train.zarr", kind=softlabels.TopK(k=5))
    cache = softlabels.open_cache("train.zarr")
    loader = softlabels.SoftTargetLoader(softlabels.source_for_cache(cache), cache, batch_size=128)
    for batch in loader:
        loss = softlabels.kd_loss(model(batch.inputs), batch.teacher_logits, batch.labels, temperature=4.0)
"""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use: the command (see
# __main__.py) starts without torch, so a Ctrl-C while torch imports is its to tell in one line.
_PUBLIC = {
    "keep_freed_memory": "allocator",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint",
    "open_data": "data",
    "dump": "dump", "iter_logits": "dump",
    "SoftlabelsError": "errors",
    "Dense": "kinds", "Sampled": "kinds", "SoftTargets": "kinds", "TargetKind": "kinds", "TopK": "kinds",
    "Batch": "loader", "SoftTargetLoader": "loader", "source_for_cache": "loader",
    "KDTerms": "losses", "kd_loss": "losses", "kd_terms": "losses", "kl_divergence": "losses",
    "build_model": "models",
    "Cache": "store", "CacheWriter": "store", "Layout": "store", "open_cache": "store",
    "StudentSpec": "train", "TrainConfig": "train", "evaluate": "train", "train_students": "train",
}


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # softlabels.distributed.init()
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule softlabels.dump sets the package's 'dump' to it: the name stays the function's.
        if not (name in _PUBLIC and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Batch",
    "Cache",
    "CacheWriter",
    "Dense",
    "KDTerms",
    "Layout",
    "Sampled",
    "SoftTargets",
    "SoftTargetLoader",
    "SoftlabelsError",
    "StudentSpec",
    "TargetKind",
    "TopK",
    "TrainConfig",
    "build_model",
    "dump",
    "evaluate",
    "iter_logits",
    "keep_freed_memory",
    "kd_loss",
    "kd_terms",
    "kl_divergence",
    "load_model",
    "open_cache",
    "open_data",
    "save_checkpoint",
    "source_for_cache",
    "train_students",
]
