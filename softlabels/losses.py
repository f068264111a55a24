"""Knowledge-distillation losses: pure functions of student logits, teacher targets and labels.

With student logits ``s``, teacher logits ``t``, temperature ``T`` and hard-label weight ``alpha``,
``p = softmax(t / T)`` (teacher) and ``q = softmax(s / T)`` (student), the batch loss is::

    alpha * mean over labeled items of CE(y, s)  +  (1 - alpha) * T^2 * mean over items of KL

with ``KL = KL(p || q)`` (forward, Hinton et al. 2015) or ``KL(q || p)`` (reverse). The ``T^2``
factor keeps the soft term's gradients the same size as ``T`` changes. An item whose label is ``-1``
has no hard term, so an unlabeled transfer set trains on the soft term alone. An input mixed from
two samples with weight ``lam`` (mixup, cutmix) has the hard term ``lam * CE(y) + (1 - lam) * CE(y2)``. Everything works on
the last axis: an item is a sample, a recorded view or a token alike.

Sparse cached targets bring their own KL (top-k with an exact tail bucket, unbiased sampled
estimates): see :mod:`softlabels.kinds`. This module depends on nothing else in softlabels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

KL_DIRECTIONS = ("forward", "reverse")


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, kl: str = "forward"
) -> torch.Tensor:
    """Per-sample ``KL(p || q)`` (forward) or ``KL(q || p)`` (reverse) at temperature ``T``, unscaled.

    The teacher's side carries no gradient, so it is computed once without autograd; for the forward
    direction ``KL = sum p log p - sum p log q``, and only the second term reaches the student.

    Example::

        kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3))   # tensor([0.])
    """
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kl == "forward":
        with torch.no_grad():
            p = log_p.exp()
            neg_entropy = (p * log_p).sum(-1)
        return neg_entropy - (p * log_q).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


class KDTerms(NamedTuple):
    """The two terms of a batch's distillation loss, before weighting."""

    hard: torch.Tensor  # mean cross-entropy over the labeled items (0, with a gradient path, when none is)
    soft: torch.Tensor | None  # mean KL at the temperature over the (masked) items; None without a teacher

    def loss(self, *, temperature: float, alpha: float) -> torch.Tensor:
        """``alpha * hard + (1 - alpha) * T^2 * soft`` (the hard term alone without a teacher)."""
        if self.soft is None:
            return self.hard
        loss = (1.0 - alpha) * temperature**2 * self.soft
        return loss + alpha * self.hard if alpha > 0 else loss


def kd_terms(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | Any | None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    kl: str = "forward",
    ignore_index: int = -1,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    tail: str = "exact",
) -> KDTerms:
    """The hard and soft terms that :func:`kd_loss` weighs, each a mean over its own items (the
    arguments are :func:`kd_loss`'s).

    Example::

        s, t = torch.randn(8, 10), torch.randn(8, 10)
        hard, soft = kd_terms(s, t, torch.tensor([3, -1, 0, 1, 2, -1, 9, 4]), temperature=2.0)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    hard = _cross_entropy(student_logits, labels, ignore_index, mix)
    if teacher is None:
        return KDTerms(hard, None)
    if isinstance(teacher, torch.Tensor):
        if tail != "exact":
            raise ValueError(f"tail {tail!r} applies to top-k targets, not to full teacher logits")
        soft = kl_divergence(student_logits, teacher, temperature=temperature, kl=kl)
    else:
        soft = teacher.kl(student_logits, temperature=temperature, kl=kl, tail=tail, labels=labels)
    if mask is not None:
        mask = mask.to(soft.device)
        soft = torch.where(mask, soft, torch.zeros_like(soft)).sum() / mask.sum().clamp(min=1)
    return KDTerms(hard, soft.mean())


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | Any | None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
    kl: str = "forward",
    ignore_index: int = -1,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    tail: str = "exact",
) -> torch.Tensor:
    """Mean distillation loss of a batch (see the module docstring for the formula).

    ``student_logits`` is ``[..., C]``. ``teacher`` is the teacher's logits ``[..., C]`` or the
    cached targets the loader serves (any object with ``kl(student_logits, temperature=, kl=)``
    returning the per-item KL, such as :class:`softlabels.kinds.SoftTargets`). ``teacher=None``
    gives the cross-entropy term alone (the scratch baseline through the same code). ``labels``
    (``[...]``) marks items without a label by ``ignore_index``; ``labels=None`` means none has one.

    The cross-entropy term is the mean over labeled items and the KL term the mean over all items,
    so the hard term weighs the same with or without a teacher, whatever share of a batch is labeled.
    ``mix=(partner_labels, lam)`` (each ``[...]``) makes an item's hard term
    ``lam * CE(labels) + (1 - lam) * CE(partner_labels)``, as for a mixup or cutmix view.
    ``mask`` (bool ``[...]``) keeps the KL term to the items where it is true (token positions with
    a next token to predict), averaged over those. ``tail`` chooses a top-k cache's treatment of the
    teacher's mass outside its K classes (:data:`softlabels.kinds.topk.TAILS`). :func:`kd_terms`
    gives the two terms before weighting.

    Example::

        s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        y = torch.tensor([3, -1, 0, 1, 2, -1, 9, 4])
        kd_loss(s, t, y, temperature=2.0, alpha=0.3).backward()
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    terms = kd_terms(student_logits, teacher, labels, temperature=temperature, kl=kl, ignore_index=ignore_index, mix=mix,
                     mask=mask, tail=tail)
    return terms.loss(temperature=temperature, alpha=alpha)


def _cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
                   mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labeled items, 0 (with a gradient path) when there are none."""
    if labels is None or not (labels != ignore_index).any():
        return student_logits.sum() * 0.0
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    if mix is None:
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index)
    partner_labels, lam = (t.reshape(-1) for t in mix)
    own = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    partner = F.cross_entropy(logits, partner_labels, ignore_index=ignore_index, reduction="none")
    return (lam * own + (1 - lam) * partner).sum() / (labels != ignore_index).sum()
