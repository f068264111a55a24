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

__version__ = "0.1.0"

from .allocator import keep_freed_memory  # noqa: E402
from .checkpoint import load_model, save_checkpoint  # noqa: E402
from .data import open_data  # noqa: E402
from .dump import dump, iter_logits  # noqa: E402
from .errors import SoftlabelsError  # noqa: E402
from .kinds import Dense, Sampled, SoftTargets, TargetKind, TopK  # noqa: E402
from .loader import Batch, SoftTargetLoader, source_for_cache  # noqa: E402
from .losses import KDTerms, kd_loss, kd_terms, kl_divergence  # noqa: E402
from .models import build_model  # noqa: E402
from .store import Cache, CacheWriter, Layout, open_cache  # noqa: E402
from .train import StudentSpec, TrainConfig, evaluate, train_students  # noqa: E402

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
