"""kd_loss against closed-form values and gradients computed independently in numpy."""

import numpy as np
import pytest
import torch

from softlabels import kd_loss, kd_terms, kl_divergence


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 7)) * 3
    t = rng.normal(size=(6, 7)) * 3
    y = np.array([0, 3, -1, 6, -1, 2])
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_forward_kd_value_and_gradient_match_closed_form(batch, temperature):
    s, t, y = batch
    alpha = 0.3
    p, q = softmax(t / temperature), softmax(s / temperature)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    q1 = softmax(s)
    labeled = y >= 0
    ce = np.zeros(len(y))
    ce[labeled] = -np.log(q1[labeled, y[labeled]])
    # the hard term is the mean over labeled rows, the soft term the mean over all rows
    expected = alpha * ce[labeled].mean() + (1 - alpha) * temperature**2 * kl.mean()
    # d/ds of T^2 KL(p||q) is T (q - p); of CE it is softmax(s) - onehot(y).
    onehot = np.zeros_like(s)
    onehot[labeled, y[labeled]] = 1
    grad = alpha * (q1 - onehot) * labeled[:, None] / labeled.sum() + (1 - alpha) * temperature * (q - p) / len(y)

    st = torch.tensor(s, requires_grad=True)
    loss = kd_loss(st, torch.tensor(t), torch.tensor(y), temperature=temperature, alpha=alpha)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(st.grad.numpy(), grad, rtol=1e-4, atol=1e-7)


def test_reverse_kl_value_and_gradient_match_closed_form(batch):
    s, t, _ = batch
    temperature = 2.0
    p, q = softmax(t / temperature), softmax(s / temperature)
    kl = (q * (np.log(q) - np.log(p))).sum(1, keepdims=True)
    # d/ds_j KL(q||p) = q_j (log q_j - log p_j - KL) / T, times T^2, averaged over the batch.
    grad = temperature * q * (np.log(q) - np.log(p) - kl) / len(s)
    st = torch.tensor(s, requires_grad=True)
    loss = kd_loss(st, torch.tensor(t), None, temperature=temperature, alpha=0.0, kl="reverse")
    loss.backward()
    assert loss.item() == pytest.approx(temperature**2 * kl.mean(), rel=1e-5)
    np.testing.assert_allclose(st.grad.numpy(), grad, rtol=1e-4, atol=1e-7)


def test_forward_and_reverse_differ_and_vanish_when_equal(batch):
    s, t, _ = batch
    st, tt = torch.tensor(s), torch.tensor(t)
    assert kl_divergence(st, tt).mean() != pytest.approx(kl_divergence(st, tt, kl="reverse").mean().item())
    assert kl_divergence(tt, tt).abs().max().item() < 1e-12


def test_temperature_squared_scaling(batch):
    s, t, _ = batch
    st, tt = torch.tensor(s), torch.tensor(t)
    for temperature in (1.0, 3.0, 8.0):
        loss = kd_loss(st, tt, None, temperature=temperature, alpha=0.0)
        assert loss.item() == pytest.approx(temperature**2 * kl_divergence(st, tt, temperature=temperature).mean().item())


def test_unlabeled_rows_contribute_only_the_soft_term(batch):
    s, t, _ = batch
    st = torch.tensor(s, requires_grad=True)
    unlabeled = torch.full((len(s),), -1)
    hard_only = kd_loss(st, torch.tensor(t), unlabeled, alpha=1.0)
    hard_only.backward()
    assert hard_only.item() == 0.0
    assert st.grad.abs().max().item() == 0.0
    soft = kd_loss(torch.tensor(s), torch.tensor(t), unlabeled, temperature=2.0, alpha=0.4)
    assert soft.item() == pytest.approx(0.6 * 4.0 * kl_divergence(torch.tensor(s), torch.tensor(t), temperature=2.0).mean().item())


def test_no_teacher_is_cross_entropy_over_labeled_rows(batch):
    s, _, y = batch
    labeled = y >= 0
    expected = torch.nn.functional.cross_entropy(torch.tensor(s[labeled]), torch.tensor(y[labeled]))
    assert kd_loss(torch.tensor(s), None, torch.tensor(y)).item() == pytest.approx(expected.item())


def test_a_mixed_view_weighs_both_labels_by_lam(batch):
    s, t, y = batch
    partner = np.array([5, 3, 1, -1, 4, 0])
    lam = np.array([0.25, 1.0, 0.5, 0.7, 0.1, 0.0])
    log_q = np.log(softmax(s))
    ce_own = np.where(y >= 0, -log_q[np.arange(6), np.maximum(y, 0)], 0.0)
    ce_partner = np.where(partner >= 0, -log_q[np.arange(6), np.maximum(partner, 0)], 0.0)
    expected = (lam * ce_own + (1 - lam) * ce_partner).sum() / (y >= 0).sum()
    mix = (torch.tensor(partner), torch.tensor(lam, dtype=torch.float32))
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0, mix=mix)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # lam = 1 everywhere is the unmixed loss
    unmixed = kd_loss(torch.tensor(s), None, torch.tensor(y), mix=(torch.tensor(partner), torch.ones(6)))
    assert unmixed.item() == pytest.approx(kd_loss(torch.tensor(s), None, torch.tensor(y)).item(), rel=1e-6)


def test_the_hard_term_weighs_the_same_with_and_without_a_teacher(batch):
    s, t, y = batch
    baseline = kd_loss(torch.tensor(s), None, torch.tensor(y))
    assert kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0).item() == pytest.approx(baseline.item())


def test_items_on_leading_axes_are_rows_like_any_other(batch):
    s, t, y = batch
    flat = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=2.0, alpha=0.3)
    items = kd_loss(torch.tensor(s).reshape(2, 3, 7), torch.tensor(t).reshape(2, 3, 7), torch.tensor(y).reshape(2, 3),
                    temperature=2.0, alpha=0.3)
    assert items.item() == pytest.approx(flat.item(), rel=1e-6)


def test_float16_teacher_logits_are_accepted(batch):
    s, t, y = batch
    full = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y))
    half = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float16), torch.tensor(y))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=1e-2)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"alpha": 1.5}, {"kl": "sideways"}])
def test_invalid_arguments_are_refused(batch, kwargs):
    s, t, y = batch
    with pytest.raises(ValueError):
        kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), **kwargs)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.99, 1.0])
def test_the_terms_are_what_the_loss_weighs(batch, alpha):
    """train-student logs the two terms as kd_terms gives them: no KL solved back from the loss,
    which near alpha = 1 would divide float32 rounding by 1 - alpha."""
    s, t, y = (torch.tensor(a) for a in batch)
    hard, soft = kd_terms(s, t, y, temperature=3.0)
    assert torch.equal(soft, kl_divergence(s, t, temperature=3.0).mean())
    assert torch.equal(hard, kd_loss(s, None, y))
    weighed = kd_terms(s, t, y, temperature=3.0).loss(temperature=3.0, alpha=alpha)
    assert torch.equal(weighed, kd_loss(s, t, y, temperature=3.0, alpha=alpha))
    assert kd_terms(s, None, y).soft is None
