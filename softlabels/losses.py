"""Knowledge-distillation losses: pure functions of student logits, teacher logits and labels.

With student logits ``s``, teacher logits ``t``, temperature ``T`` and hard-label weight ``alpha``,
``p = softmax(t / T)`` (teacher) and ``q = softmax(s / T)`` (student), each sample's loss is::

    alpha * CE(y, s)  +  (1 - alpha) * T^2 * KL

with ``KL = KL(p || q)`` (forward, Hinton et al. 2015) or ``KL(q || p)`` (reverse). The ``T^2``
factor keeps the soft term's gradients the same size as ``T`` changes. A sample whose label is ``-1``
has no hard term (its CE is zero), so an unlabeled transfer set trains on the soft term alone. The
batch loss is the mean over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import NO_LABEL

KL_DIRECTIONS = ("forward", "reverse")


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, kl: str = "forward"
) -> torch.Tensor:
    """Per-sample ``KL(p || q)`` (forward) or ``KL(q || p)`` (reverse) at temperature ``T``, unscaled.

    The teacher's side carries no gradient, so it is computed once without autograd; for the forward
    direction ``KL = sum p log p - sum p log q``, and only the second term reaches the student.

    Example:
        >>> kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3))
        tensor([0.])
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


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
    kl: str = "forward",
) -> torch.Tensor:
    """Mean distillation loss of a batch (see the module docstring for the formula).

    ``teacher_logits=None`` gives plain cross-entropy on the labeled samples (a scratch baseline
    through the same code); ``labels=None`` means no sample has a label.

    Example:
        >>> s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        >>> y = torch.tensor([3, -1, 0, 1, 2, -1, 9, 4])
        >>> kd_loss(s, t, y, temperature=2.0, alpha=0.3).backward()
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None:
        if labels is None or not (labels != NO_LABEL).any():
            return student_logits.sum() * 0.0
        return F.cross_entropy(student_logits.float(), labels, ignore_index=NO_LABEL)
    loss = (1.0 - alpha) * temperature**2 * kl_divergence(student_logits, teacher_logits, temperature=temperature, kl=kl)
    if labels is not None and alpha > 0:
        # ignore_index gives unlabeled samples a hard term of exactly zero
        loss = loss + alpha * F.cross_entropy(student_logits.float(), labels, ignore_index=NO_LABEL, reduction="none")
    return loss.mean()
