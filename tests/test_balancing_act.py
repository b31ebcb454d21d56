"""Balancing Act's math (methods/balancing_act.py): the grid, the losses, the guidance update."""

from __future__ import annotations

import pytest
import torch

from debiaslab.errors import ConfigError
from debiaslab.methods.balancing_act import (
    attribute_probs,
    ba_grid,
    check_p_ref,
    distribution_loss,
    guidance_step,
    guided_h,
    sample_guidance_loss,
)


def test_grid_equals_the_official_list():
    """The released grid: int(k * 999 / 49), k = 0..49 (float arithmetic, as released)."""
    grid = ba_grid(50, 1000)
    assert grid == [int(k * 999 / 49) for k in range(50)]
    assert grid[:4] == [0, 20, 40, 61] and grid[-3:] == [958, 978, 999] and len(set(grid)) == 50
    assert ba_grid(10, 100) == [int(k * 99 / 9) for k in range(10)]
    with pytest.raises(ConfigError, match=r"ba.n_steps: must be in \[2, 1000\].*got 1"):
        ba_grid(1, 1000)


@pytest.mark.parametrize("p_ref, loss, message", [
    ([0.5, 0.6], "chi2", r"ba.p_ref: shares must sum to 1, got \[0.5, 0.6\] \(sum 1.1\)"),
    ([1.0, 0.0], "chi2", r"ba.p_ref: chi-square divides by each share; \[1.0, 0.0\] has a zero"),
    ([-0.5, 1.5], "kl", r"ba.p_ref: shares must be >= 0"),
    ([1.0], "kl", r"ba.p_ref: needs one share per attribute class"),
])
def test_bad_p_ref_is_one_line(p_ref, loss, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_p_ref(p_ref, loss)
    assert "\n" not in str(info.value)


def test_a_zero_share_is_allowed_under_kl():
    assert check_p_ref([1.0, 0.0], "kl").tolist() == [1.0, 0.0]


def _head(seed: int = 0, features: int = 12, classes: int = 2) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(features, classes).double()


@pytest.mark.parametrize("kind", ["chi2", "kl"])
def test_distribution_gradient_equals_finite_differences(kind):
    """grad_h of 300 * L(p_hat(h), p_ref) through a linear head, against central differences
    in float64: the truncation error is O(eps^2) ~ 1e-12 relative, so 1e-6 is loose."""
    head = _head()
    h = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    p_ref = check_p_ref([0.3, 0.7], kind)

    def loss(x):
        return 300.0 * distribution_loss(attribute_probs(head(x.flatten(1))), p_ref, kind)

    hr = h.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(hr), hr)
    eps = 1e-6
    fd = torch.zeros_like(h)
    for index in range(h.numel()):
        step = torch.zeros(h.numel(), dtype=torch.float64)
        step[index] = eps
        step = step.view_as(h)
        fd.view(-1)[index] = (loss(h + step) - loss(h - step)) / (2 * eps)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert grad.abs().max() > 1e-4  # not vacuous: p_hat is away from p_ref


@pytest.mark.parametrize("kind", ["chi2", "kl"])
def test_no_gradient_when_the_batch_matches_the_reference(kind):
    """At p_hat = p_ref the loss is 0 and stationary: a batch of two mirrored samples whose
    predictions average to (0.5, 0.5) under a head with opposite class weights."""
    head = torch.nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, -0.5, 0.0]]))
    h = torch.tensor([[0.3, 0.1, -0.2, 0.7]], dtype=torch.float64)
    batch = torch.cat([h, -h]).requires_grad_(True)
    p_ref = check_p_ref([0.5, 0.5], kind)
    value = distribution_loss(attribute_probs(head(batch)), p_ref, kind)
    (grad,) = torch.autograd.grad(value, batch)
    assert abs(float(value.detach())) < 1e-15 and grad.abs().max() < 1e-15


def test_sample_guidance_pulls_each_image_toward_its_target():
    head = _head(1)
    h = torch.randn(4, 12, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 0])

    def loss(x):
        return sample_guidance_loss(attribute_probs(head(x)), target)

    new = guided_h(h, loss, scale=1.0, step=0.01)
    before = attribute_probs(head(h)).gather(1, target.view(-1, 1))
    after = attribute_probs(head(new)).gather(1, target.view(-1, 1))
    assert bool((after > before).all())


def test_scale_zero_is_the_identity_and_the_step_is_the_released_one():
    head = _head(2)
    h = torch.randn(3, 12)
    p_ref = check_p_ref([0.5, 0.5], "chi2")
    out = guided_h(h, lambda x: distribution_loss(attribute_probs(head.float()(x)), p_ref),
                   scale=0.0, step=1.0)
    assert torch.equal(out, h)
    assert float(guidance_step(0.02)) == pytest.approx(1.5 * 0.02 ** 0.05, rel=1e-12)
    lo, hi = float(guidance_step(1e-4)), float(guidance_step(0.02))
    assert 0.94 < lo < 0.95 and 1.23 < hi < 1.24  # 1.5 x [0.631, 0.822]


def test_guidance_moves_the_batch_mean_toward_p_ref():
    """One update with a small step lowers chi-square: p_hat moves toward p_ref."""
    head = _head(3)
    h = torch.randn(16, 12, dtype=torch.float64) + 1.0
    p_ref = check_p_ref([0.5, 0.5], "chi2")

    def loss(x):
        return distribution_loss(attribute_probs(head(x), 1.0), p_ref)

    new = guided_h(h, loss, scale=1.0, step=1e-3)
    with torch.no_grad():
        assert float(loss(new)) < float(loss(h))
