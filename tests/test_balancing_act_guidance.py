"""Balancing Act's heads and guidance components (methods/balancing_act.py): the h_heads
network, the h-space edit (scale 0, window, batch modes, CFG's conditional half, no gradient
through the UNet), the image-space baseline, and their one-line errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from debiaslab.diffusion import samplers
from debiaslab.diffusion.denoiser import VPDenoiser
from debiaslab.diffusion.guidance import GuidanceContext, build_guidance
from debiaslab.diffusion.schedules import SPACINGS, build_schedule
from debiaslab.errors import ConfigError
from debiaslab.methods.balancing_act import (
    AttributeTerms,
    BAGuidanceSpec,
    HHeads,
    attribute_probs,
    ba_grid,
    distribution_loss,
    guidance_step,
)
from debiaslab.nets.unet import UNet

GRID = ba_grid(10)[:-1]  # heads at 0, 111, ..., 888; the sampler's first step, 999, has none
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def schedule():
    return build_schedule("linear")


def _unet(class_conditional: bool = False) -> UNet:
    with torch.random.fork_rng():
        torch.manual_seed(2)
        unet = UNet(1, 1, image_size=8, model_channels=16, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(),
                    num_classes=3 if class_conditional else None)
        nn.init.normal_(unet.out[-1].weight, std=0.05)  # the zero-init output would give eps = 0
    return unet.eval()


def _heads(unet: UNet, groups=(2,), hidden: int = 0, seed: int = 0) -> HHeads:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = HHeads(unet.h_shape(), sum(groups), grid=GRID, groups=groups, hidden=hidden)
        for w in heads.weights:  # large enough that p_hat is far from uniform
            w.data.mul_(20)
    return heads.eval()


def _info(heads: HHeads, grid=GRID, attributes=("attr:bold",)) -> dict[str, Any]:
    return {"checkpoint": "heads.pt", "h_heads": {
        "grid": list(grid), "groups": heads.groups, "attributes": list(attributes)}}


def _ctx(heads: HHeads, info: dict[str, Any] | None = None, null_label=None) -> GuidanceContext:
    return GuidanceContext(sampler="ddim", null_label=null_label,
                           load_classifier=lambda path, device: (heads, info or _info(heads)))


def _guided(den, heads, null_label=None, info=None, **entry) -> Any:
    entry = {"type": "balancing_act", "checkpoint": "heads.pt", **entry}
    return build_guidance(den, [entry], _ctx(heads, info, null_label))


def _sample(den, seeds=range(4), **cond) -> torch.Tensor:
    return samplers.ddim(den, list(seeds), SHAPE, steps=10, eta=1.0, spacing="floor",
                         cond=cond or None)


def test_floor_spacing_is_the_methods_grid(schedule):
    assert SPACINGS.get("floor")(1000, 50) == ba_grid(50)
    assert schedule.timesteps(50, "floor").tolist() == ba_grid(50)[::-1]  # 999, 978, ..., 0


def test_each_row_gets_the_head_of_its_timestep():
    heads = HHeads((2, 2, 2), 4, grid=[0, 20, 40], groups=(2, 2))
    h = torch.randn(5, 2, 2, 2)
    t = torch.tensor([0.0, 40.0, 20.0, 0.0, 19.0])  # 19: nearest head is 20's
    out = heads(h, t)
    w, b = heads.weights[0], heads.biases[0]
    for row, k in enumerate([0, 2, 1, 0, 1]):
        torch.testing.assert_close(out[row], h[row].flatten() @ w[k] + b[k])
    assert [p.shape for p in heads.split(out)] == [(5, 2), (5, 2)]
    mlp = HHeads((2, 2, 2), 3, grid=[0, 20], hidden=7)
    assert mlp(h, 20.0).shape == (5, 3) and mlp.weights[0].shape == (2, 8, 7)


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": []}, r"h_heads: grid must be a non-empty ascending list"),
    ({"grid": [0, 20, 20]}, r"h_heads: grid must be a non-empty ascending list"),
    ({"grid": [0], "groups": (2, 3)}, r"groups \[2, 3\] .* must sum to num_outputs=4"),
    ({"grid": [0], "hidden": -1}, r"hidden must be >= 0"),
])
def test_bad_heads_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        HHeads((2, 2, 2), 4, **kwargs)
    assert "\n" not in str(info.value)


def test_scale_zero_is_bit_identical_to_unguided(schedule):
    unet = _unet()
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    plain = _sample(den)
    assert torch.equal(_sample(_guided(den, heads, scale=0.0)), plain)
    guided = _sample(_guided(den, heads, scale=50.0))
    assert not torch.equal(guided, plain) and torch.isfinite(guided).all()


def test_the_gradient_flows_through_the_heads_only(schedule):
    """The edit differentiates the loss w.r.t. h through the heads: no UNet parameter, and no
    input of the UNet, takes part in the backward pass."""
    unet = _unet()
    for p in unet.parameters():
        p.requires_grad_(True)
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    x = torch.randn(4, *SHAPE, requires_grad=True)
    guided = _guided(den, heads, scale=50.0)
    with torch.no_grad():
        out = guided(x, torch.full((4,), 111.0))
    assert not out.requires_grad and x.grad is None
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is None for p in heads.parameters())  # autograd.grad, not backward


def _edit(guided, h, t, y=None, batch=None, targets=None):
    return guided.edit(h, torch.full((len(h),), float(t)), targets, y, batch or len(h))


def test_one_edit_is_the_released_update(schedule):
    """h' = h - 1.5 beta_t^0.05 s grad_h(300 chi2(p_hat, p_ref)), by hand with autograd."""
    unet, den = _unet(), None
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet, seed=1)
    guided = _guided(den, heads, scale=2.0, p_ref=[[0.3, 0.7]])
    h = torch.randn(6, *unet.h_shape())
    got = _edit(guided, h, 222)
    hr = h.clone().requires_grad_(True)
    probs = attribute_probs(heads(hr, 222.0).double(), 8.0)
    loss = 300.0 * distribution_loss(probs, torch.tensor([0.3, 0.7], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, hr)
    step = guidance_step(schedule.betas[222])
    torch.testing.assert_close(got, h - float(step) * 2.0 * grad, rtol=1e-5, atol=1e-6)
    # a small step moves the batch toward p_ref: the loss falls (s = 2 overshoots these heads)
    small = _edit(_guided(den, heads, scale=0.01, p_ref=[[0.3, 0.7]]), h, 222)
    after = distribution_loss(attribute_probs(heads(small, 222.0).double()),
                              torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert after < loss.detach() / 300.0


def test_per_sample_and_batch_modes_agree_at_batch_size_one(schedule):
    unet = _unet()
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    batch = _guided(den, heads, scale=3.0, scale_mode="batch")
    per = _guided(den, heads, scale=3.0, scale_mode="per_sample")
    h1 = torch.randn(1, *unet.h_shape())
    assert torch.equal(_edit(batch, h1, 111), _edit(per, h1, 111))
    h4 = torch.randn(4, *unet.h_shape())  # at B = 4, per_sample s is batch 4 s
    four = _guided(den, heads, scale=12.0, scale_mode="batch")
    torch.testing.assert_close(_edit(per, h4, 111), _edit(four, h4, 111))
    assert not torch.allclose(_edit(per, h4, 111), _edit(batch, h4, 111))


def test_the_window_and_the_headless_first_step(schedule):
    unet = _unet()
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    guided = _guided(den, heads, scale=5.0, window=[333, 555])
    h = torch.randn(3, *unet.h_shape())
    assert torch.equal(_edit(guided, h, 222), h)  # before the window
    assert not torch.equal(_edit(guided, h, 444), h)  # inside
    assert torch.equal(_edit(guided, h, 999), _edit(_guided(den, heads, scale=5.0), h, 999))
    assert torch.equal(_edit(_guided(den, heads, scale=5.0), h, 999), h)  # no head at 999


@pytest.mark.parametrize("entry, info_grid, message", [
    ({"window": [333, 1200]}, GRID, r"window: 1200 is not a timestep with a head \(0, 111, "),
    ({"window": [500, 555]}, GRID, r"window: 500 is not a timestep with a head"),
    ({"window": [555, 333]}, GRID, r"window: \[lo, hi\] timesteps with lo <= hi"),
    ({}, GRID[:-1], r"9 heads for a grid of 8 timesteps; retrain the h_classifier"),
    ({"p_ref": [[0.5, 0.6]]}, GRID, r"p_ref\[0\]: shares must sum to 1"),
    ({"p_ref": [[1.0, 0.0]]}, GRID, r"p_ref\[0\]: chi-square divides by each share"),
    ({"p_ref": [[0.5, 0.5], [0.5, 0.5]]}, GRID, r"p_ref: one share list per attribute"),
    ({"mode": "sample", "target": [2]}, GRID, r"target\[0\]: 2 is not a class of attr:bold"),
])
def test_bad_guidance_is_one_line(schedule, entry, info_grid, message):
    unet = _unet()
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    with pytest.raises(ConfigError, match=message) as info:
        _guided(den, heads, info=_info(heads, grid=info_grid), scale=1.0, **entry)
    assert "\n" not in str(info.value)


def test_under_cfg_the_statistics_use_the_conditional_half_only(schedule):
    """The CFG wrapper doubles the batch [cond; uncond]; p_hat is the conditional rows' mean,
    the conditional rows are edited as if they were the whole batch, and the unconditional
    ones are left as they are."""
    unet = _unet(class_conditional=True)
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    guided = _guided(den, heads, null_label=3, scale=5.0)
    h = torch.randn(6, *unet.h_shape())
    y = torch.tensor([0, 1, 2, 3, 3, 3])
    out = _edit(guided, h, 111, y=y, batch=3)
    assert torch.equal(out[3:], h[3:])
    torch.testing.assert_close(out[:3], _edit(guided, h[:3], 111))
    # with a CFG wrapper inside (no labels visible here), the second half is the unconditional
    torch.testing.assert_close(_edit(guided, h, 111, batch=3)[:3], out[:3])
    # and the whole cfg + balancing_act stack samples
    cfg_stack = build_guidance(den, [{"type": "balancing_act", "checkpoint": "heads.pt",
                                      "scale": 5.0}, {"type": "cfg", "omega": 1.0}],
                               _ctx(heads, null_label=3))
    x = _sample(cfg_stack, y=torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(x).all()


def test_two_attributes_sum_their_terms():
    heads = HHeads((2, 2, 2), 4, grid=[0], groups=(2, 2))
    spec = BAGuidanceSpec(p_ref=((0.5, 0.5), (0.2, 0.8)))
    terms = AttributeTerms(spec, [2, 2], ["attr:bold", "attr:even"], "g")
    logits = heads(torch.randn(5, 2, 2, 2), 0.0)
    a, b = logits.split([2, 2], 1)
    expected = (distribution_loss(attribute_probs(a.double()), torch.tensor([0.5, 0.5]))
                + distribution_loss(attribute_probs(b.double()), torch.tensor([0.2, 0.8])))
    torch.testing.assert_close(terms.loss(logits, None), expected)


def test_balanced_sample_targets_cover_the_joint_classes():
    spec = BAGuidanceSpec(mode="sample")
    terms = AttributeTerms(spec, [2, 2], ["attr:bold", "attr:even"], "g")
    assert terms.sample_targets(range(4)).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    fixed = AttributeTerms(BAGuidanceSpec(mode="sample", target=(1, -1)), [2, 2], ["a", "b"], "g")
    assert fixed.sample_targets(range(3)).tolist() == [[1, 0], [1, 1], [1, 0]]


def test_sample_guidance_pulls_each_image_toward_its_target(schedule):
    unet = _unet()
    den = VPDenoiser(unet, schedule)
    heads = _heads(unet)
    guided = _guided(den, heads, mode="sample", scale=1.0)
    h = torch.randn(4, *unet.h_shape())
    targets = torch.tensor([[0], [1], [0], [1]])
    out = _edit(guided, h, 111, targets=targets)
    before = attribute_probs(heads(h, 111.0)).gather(1, targets)
    after = attribute_probs(heads(out, 111.0)).gather(1, targets)
    assert (after >= before).all() and (after > before).any()


def test_image_space_guidance_differentiates_through_the_unet(schedule):
    """The baseline's eps' = eps + sqrt(1 - abar_t) s grad_{x_t} L(C(x0_hat(x_t))): equal to a
    hand-written autograd step, and identical to unguided at scale 0."""
    from debiaslab.nets.classifier import EncoderClassifier

    unet = _unet()
    den = VPDenoiser(unet, schedule)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        clf = EncoderClassifier(1, 2, image_size=8, model_channels=8, channel_mult=(1, 2),
                                num_res_blocks=1, attention_resolutions=()).eval()
    info = {"checkpoint": "clf.pt", "input": "noisy_images", "label": "attr:bold",
            "num_outputs": 2, "time_input": True}
    ctx = GuidanceContext(sampler="ddim", load_classifier=lambda p, d: (clf, info))
    entry = {"type": "image_attribute", "checkpoint": "clf.pt", "scale": 4.0, "mode": "sample",
             "target": [1]}
    guided = build_guidance(den, [entry], ctx)
    x, t = torch.randn(3, *SHAPE), torch.full((3,), 300.0)
    out = guided(x, t, ba_target=torch.ones(3, 1, dtype=torch.long))
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        eps = den(xr, t)
        a, s = schedule.alpha_sigma(t, xr)
        probs = attribute_probs(clf((xr - s * eps) / a, torch.zeros(3)).double())
        (grad,) = torch.autograd.grad(-4.0 * probs[:, 1].sum(), xr)
    with torch.no_grad():
        torch.testing.assert_close(out, den(x, t) + s * grad.float(), rtol=1e-4, atol=1e-6)
    zero = build_guidance(den, [{**entry, "scale": 0.0}], ctx)
    with torch.no_grad():
        assert torch.equal(zero(x, t, ba_target=torch.ones(3, 1, dtype=torch.long)), den(x, t))
    assert math.isfinite(float(out.abs().max()))
