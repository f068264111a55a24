"""Knowledge-distillation losses: pure functions of student logits, teacher logits and labels.

With student logits ``s``, teacher logits ``t``, temperature ``T`` and hard-label weight ``alpha``,
``p = softmax(t / T)`` (teacher) and ``q = softmax(s / T)`` (student), each sample's loss is::

    alpha * CE(y, s)  +  (1 - alpha) * T^2 * KL

with ``KL = KL(p || q)`` (forward, Hinton et al. 2015) or ``KL(q || p)`` (reverse). The ``T^2``
factor keeps the soft term's gradients the same size as ``T`` changes. A sample whose label is ``-1``
has no hard term (its CE is zero), so an unlabeled transfer set trains on the soft term alone. The
batch loss is the mean over samples.

Sparse targets (see :mod:`softlabels.sparse`) replace ``KL`` as follows, with ``p_c = exp(z_c / T -
lse_T)`` exact for every stored class ``c``:

* top-k: the ``K`` kept classes plus one "rest" bucket. The teacher's rest mass is ``p_r = 1 - sum_k
  p_k``; the student's is its own mass outside the same classes, ``q_r = 1 - sum_k q_k``. The loss is
  the KL between these ``K + 1``-bucket distributions, so with ``K = C`` it is the dense KL exactly,
  and the tail is matched, not renormalised away.
* sampled: ``S`` draws from the proposal ``pi`` (the teacher at ``T_p``) with importance weights ``w_c
  = p_c / pi_c``. Forward: ``KL ~ (1/S) sum_draws w_c (log p_c - log q_c)``, whose expectation is
  ``sum_c p_c (log p_c - log q_c)``. Reverse: ``KL ~ sum_c q_c log q_c - (1/S) sum_draws (q_c / pi_c)
  log p_c``. Both are unbiased in value and gradient.
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
    teacher_logits: torch.Tensor | dict[str, torch.Tensor] | None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
    kl: str = "forward",
) -> torch.Tensor:
    """Mean distillation loss of a batch (see the module docstring for the formula).

    ``teacher_logits`` is a ``[B, C]`` tensor, or a sparse batch as the loader serves it (a dict of
    the cache's arrays plus ``temperatures`` and, for sampled, ``proposal_temperature``).
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
    if isinstance(teacher_logits, dict):
        soft = sparse_kl_divergence(student_logits, teacher_logits, temperature=temperature, kl=kl)
        loss = (1.0 - alpha) * temperature**2 * soft
        if labels is not None and alpha > 0:
            loss = loss + alpha * F.cross_entropy(student_logits.float(), labels, ignore_index=NO_LABEL, reduction="none")
        return loss.mean()
    if teacher_logits is None:
        if labels is None or not (labels != NO_LABEL).any():
            return student_logits.sum() * 0.0
        return F.cross_entropy(student_logits.float(), labels, ignore_index=NO_LABEL)
    loss = (1.0 - alpha) * temperature**2 * kl_divergence(student_logits, teacher_logits, temperature=temperature, kl=kl)
    if labels is not None and alpha > 0:
        # ignore_index gives unlabeled samples a hard term of exactly zero
        loss = loss + alpha * F.cross_entropy(student_logits.float(), labels, ignore_index=NO_LABEL, reduction="none")
    return loss.mean()


def _log_partition(targets: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    temperatures = [float(t) for t in targets["temperatures"]]
    for i, t in enumerate(temperatures):
        if abs(t - temperature) < 1e-6:
            return targets["logsumexp"][:, i].float()
    raise ValueError(f"temperature {temperature:g} is not in the cache's grid {temperatures}; dump with it in --temperatures")


def sparse_kl_divergence(
    student_logits: torch.Tensor, targets: dict[str, torch.Tensor], *, temperature: float = 1.0, kl: str = "forward"
) -> torch.Tensor:
    """Per-sample KL from top-k or sampled targets (see the module docstring), unscaled.

    Example:
        >>> targets = {**sparsify(t, kind="topk", size=5), "temperatures": torch.tensor(DEFAULT_TEMPERATURES)}
        >>> sparse_kl_divergence(s, targets, temperature=4.0)
    """
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lse = _log_partition(targets, temperature)
    if "topk_logits" in targets:
        index = targets["topk_indices"].long()
        with torch.no_grad():
            log_p = targets["topk_logits"].float() / temperature - lse[:, None]
            p = log_p.exp()
            # With K = C nothing is outside; otherwise 1 - sum is exact up to float rounding.
            p_rest = torch.zeros_like(lse) if index.shape[1] == log_q.shape[1] else (1.0 - p.sum(1)).clamp(min=0.0)
        log_q_kept = log_q.gather(1, index)
        # The student's mass outside the kept classes. The floor (about 1e-13) keeps it finite when
        # nothing is outside, and keeps float noise in p_rest from being multiplied by a huge log.
        log_q_rest = torch.logsumexp(log_q.scatter(1, index, float("-inf")), dim=1).clamp(min=-30.0)
        if kl == "forward":
            kept = (torch.special.xlogy(p, p) - p * log_q_kept).sum(1)
            return kept + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
        q_kept, q_rest = log_q_kept.exp(), log_q_rest.exp()
        log_p_rest = p_rest.clamp(min=1e-12).log()
        return (q_kept * (log_q_kept - log_p)).sum(1) + q_rest * (log_q_rest - log_p_rest)
    index = targets["sample_indices"].long()
    counts = targets["sample_counts"].float()
    share = counts / counts.sum(1, keepdim=True)  # count / S
    proposal = float(targets["proposal_temperature"])
    with torch.no_grad():
        z = targets["sample_logits"].float()
        log_p = z / temperature - lse[:, None]
        log_pi = z / proposal - _log_partition(targets, proposal)[:, None]
    log_q_drawn = log_q.gather(1, index)
    if kl == "forward":
        weight = (log_p - log_pi).exp()
        return (share * weight * (log_p - log_q_drawn)).sum(1)
    q = log_q.exp()
    return (q * log_q).sum(1) - (share * (log_q_drawn - log_pi).exp() * log_p).sum(1)
