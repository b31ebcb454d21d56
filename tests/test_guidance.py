"""Configured guidance (diffusion.guidance): classifier guidance in both published forms, CFG as a
component, composition, per-sample targets, and the config plumbing (sample.guidance, overrides).

Equality checks run in float64 (a float64 network makes the samplers keep a float64 state), so
the tolerances are roundoff-level, independent of the CPU's kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from debiaslab.config import apply_overrides, from_dict, load_config
from debiaslab.diffusion.denoiser import VPDenoiser
from debiaslab.diffusion.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ClassifierLogProb,
    GuidanceContext,
    build_guidance,
)
from debiaslab.diffusion.samplers import sample
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.errors import ConfigError

SHAPE = (1, 4, 4)
SEEDS = [3, 4, 5, 6]
NUM_CLASSES = 3
FLOAT64_ATOL = 1e-12  # a few float64 roundoffs accumulated over <= 10 steps of O(1) values


class TinyEps(nn.Module):
    """A smooth, nonlinear eps network (float64)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.2)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        flat = x.flatten(1)
        return torch.tanh(flat @ self.w + t.view(-1, 1).to(flat.dtype) / 1000).view_as(x)


class TinyClassifier(nn.Module):
    """logits = W x + b t / T: a time-dependent linear classifier on x_t (float64)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(16, NUM_CLASSES, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(NUM_CLASSES, generator=g, dtype=torch.float64))
        self.seen_t: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen_t.append(t.detach().clone())
        return x.double().flatten(1) @ self.w + self.b * t.double().view(-1, 1) / 1000


@pytest.fixture()
def parts():
    schedule = build_schedule("linear", 1000)
    den = VPDenoiser(TinyEps(), schedule)
    clf = TinyClassifier()
    return schedule, den, clf


def ctx_for(sampler: str, clf: nn.Module) -> GuidanceContext:
    return GuidanceContext(sampler=sampler, load_classifier=lambda path, device: (
        clf, {"num_outputs": NUM_CLASSES}))


def classifier_entry(**fields) -> dict:
    return {"type": "classifier", "checkpoint": "unused", **fields}


def test_scale_zero_is_bit_identical_to_unguided(parts):
    _, den, clf = parts
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        guided = build_guidance(den, [classifier_entry(scale=0.0, target=1)],
                                ctx_for(sampler, clf))
        cond = guided.sample_cond(SEEDS)
        assert torch.equal(sample(sampler, guided, SEEDS, SHAPE, steps=6, cond=cond),
                           sample(sampler, den, SEEDS, SHAPE, steps=6))


def test_log_prob_gradient_matches_finite_differences(parts):
    _, _, clf = parts
    log_prob = ClassifierLogProb(clf, NUM_CLASSES)
    guided = ClassifierGuidance(parts[1], log_prob, scale=1.0)
    x = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    target = torch.tensor([0, 2])
    grad = guided.gradient(x, t, target=target)
    h = 1e-6  # central differences: error O(h^2 * third derivative) + roundoff O(eps / h)
    for index in [(0, 0, 1, 2), (1, 0, 3, 0)]:
        e = torch.zeros_like(x)
        e[index] = h
        fd = (log_prob(x + e, t, target) - log_prob(x - e, t, target))[index[0]] / (2 * h)
        assert abs(float(fd) - float(grad[index])) < 1e-7


def test_classifier_sees_original_timesteps_under_respacing(parts):
    schedule, den, clf = parts
    for sampler, spacing in (("ddim", "leading"), ("ddpm", "trailing")):
        clf.seen_t.clear()
        guided = build_guidance(den, [classifier_entry(scale=1.0, target=0)],
                                ctx_for(sampler, clf))
        sample(sampler, guided, SEEDS, SHAPE, steps=5, cond=guided.sample_cond(SEEDS),
               spacing=spacing)
        expected = schedule.timesteps(5, spacing).tolist()
        seen = [int(t[0]) for t in clf.seen_t]
        assert seen == expected and max(seen) > 5  # indices of the 1000-step chain, not 0..4


def test_mean_shift_form_equals_hand_written_guided_diffusion_step(parts):
    """guided-diffusion p_sample with cond_fn: mu' = mu + s * var * grad log p(y | x_t, t),
    x_{t-1} = mu' + sqrt(var) z (no noise at t = 0), on a respaced 4-step chain."""
    schedule, den, clf = parts
    scale, steps, target = 1.7, 4, 2
    guided = build_guidance(den, [classifier_entry(scale=scale, target=target)],
                            ctx_for("ddpm", clf))
    assert guided.form == "mean_shift"
    ours = sample("ddpm", guided, SEEDS, SHAPE, steps=steps, cond=guided.sample_cond(SEEDS),
                  clip_x0=True)

    from debiaslab.diffusion.noise import SampleNoise

    noise = SampleNoise(SEEDS, SHAPE, device="cpu", dtype=torch.float64)
    ts = schedule.timesteps(steps, "leading")
    abar_all = schedule.alphas_cumprod
    x = noise.draw()
    log_prob = ClassifierLogProb(clf, NUM_CLASSES)
    y = torch.full((len(SEEDS),), target)
    for i, t in enumerate(ts.tolist()):
        abar = float(abar_all[t])
        abar_prev = float(abar_all[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        beta = 1 - abar / abar_prev
        var = (1 - abar_prev) / (1 - abar) * beta
        tt = torch.full((len(SEEDS),), t)
        eps = den(x, tt)
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        mu = (math.sqrt(abar_prev) * beta / (1 - abar) * x0
              + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x)
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(xg, tt, y).sum(), xg)
        mu = mu + scale * var * grad
        x = mu + math.sqrt(var) * noise.draw() if i < len(ts) - 1 else mu
    torch.testing.assert_close(ours, x, atol=FLOAT64_ATOL, rtol=0)


def test_eps_form_matches_dhariwal_nichol_eq14(parts):
    schedule, den, clf = parts
    guided = build_guidance(den, [classifier_entry(scale=2.5, target=1, form="eps")],
                            ctx_for("ddim", clf))
    x = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.full((4,), 400)
    cond = guided.sample_cond(SEEDS)
    _, sigma = schedule.alpha_sigma(t, x)
    grad = guided.gradient(x, t, target=cond["guidance_target"])
    torch.testing.assert_close(guided(x, t, **cond), den(x, t) - 2.5 * sigma * grad,
                               atol=FLOAT64_ATOL, rtol=0)


def test_balanced_targets_and_errors(parts):
    _, den, clf = parts
    guided = build_guidance(den, [classifier_entry(scale=1.0)], ctx_for("ddim", clf))
    assert guided.sample_cond([0, 1, 2, 3, 4])["guidance_target"].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ConfigError, match="target=3 is not a class"):
        build_guidance(den, [classifier_entry(target=3)], ctx_for("ddim", clf))
    with pytest.raises(ConfigError, match="mean_shift needs an ancestral sampler"):
        build_guidance(den, [classifier_entry(form="mean_shift")], ctx_for("ddim", clf))
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        build_guidance(den, [{"type": "cfg", "omega": 1.0}], ctx_for("ddim", clf))


def test_composition_cfg_then_classifier_in_list_order(parts):
    _, den, clf = parts

    class CondEps(TinyEps):
        def forward(self, x, t, y=None):
            return super().forward(x, t) + 0.1 * (y.double().view(-1, 1, 1, 1) if y is not None
                                                  else 0)

    cden = VPDenoiser(CondEps(), den.schedule)
    ctx = ctx_for("ddim", clf)
    ctx.null_label = NUM_CLASSES
    guided = build_guidance(cden, [{"type": "cfg", "omega": 0.8},
                                   classifier_entry(scale=1.5, target=0)], ctx)
    assert isinstance(guided, ClassifierGuidance)
    assert isinstance(guided.inner, ClassifierFreeGuidance)
    hand = ClassifierGuidance(ClassifierFreeGuidance(cden, 0.8, NUM_CLASSES),
                              ClassifierLogProb(clf, NUM_CLASSES), 1.5, "eps", 0)
    y = torch.tensor([0, 1, 2, 1])
    cond = {**guided.sample_cond(SEEDS), "y": y}
    a = sample("ddim", guided, SEEDS, SHAPE, steps=5, cond=dict(cond))
    b = sample("ddim", hand, SEEDS, SHAPE, steps=5, cond=dict(cond))
    assert torch.equal(a, b)


@pytest.mark.parametrize("entries, needle", [
    ([{"type": "nope"}], "unknown guidance 'nope'"),
    ([{"omega": 1.0}], "sample.guidance[0]: expected a mapping with a type"),
    ([{"type": "cfg", "omegaa": 1.0}], "unknown config key 'sample.guidance[0].omegaa'"),
    ([{"type": "classifier", "form": "sideways"}], "sample.guidance[0].form: invalid value"),
    ([{"type": "h_edit"}], "is built by its method, not configured"),
    ([{"type": "cfg", "omega": float("nan")}], "must be a finite number"),
])
def test_bad_guidance_config_is_one_line(entries, needle):
    with pytest.raises(ConfigError) as err:
        cfg = from_dict({"sample": {"guidance": entries}})
        from debiaslab.config import validate

        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_guidance_fields_are_overridable_by_type_or_index():
    raw = {"sample": {"guidance": [{"type": "cfg", "omega": 0.8},
                                   {"type": "classifier", "scale": 1.0}]}}
    out = apply_overrides(raw, ["sample.guidance.cfg.omega=2.0", "sample.guidance.1.scale=3.5"])
    assert out["sample"]["guidance"] == [{"type": "cfg", "omega": 2.0},
                                         {"type": "classifier", "scale": 3.5}]
    with pytest.raises(ConfigError, match="type of exactly one entry"):
        apply_overrides(raw, ["sample.guidance.foo.omega=1"])
    with pytest.raises(ConfigError, match="past the end"):
        apply_overrides(raw, ["sample.guidance.5.omega=1"])
    cfg = load_config(None, ["sample.guidance=[{type: cfg, omega: 0.5}]"])
    assert cfg.sample.guidance == ({"type": "cfg", "omega": 0.5},)


class TinyConditionalClassifier(TinyClassifier):
    """p(target | x_t, t, y): TinyClassifier plus a per-class logit offset (class label y)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.c = nn.Parameter(torch.randn(4, 16, NUM_CLASSES, generator=g, dtype=torch.float64))
        self.seen_y: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.seen_y.append(y)
        per_class = torch.einsum("bd,bdk->bk", x.double().flatten(1), self.c[y])
        return super().forward(x, t) + per_class


def test_class_conditional_classifier_gets_each_samples_label(parts):
    """Minority Guidance's class-conditional variant: the guidance classifier is p(l | x_t, t, c)
    and receives each sample's own class label c (the score model's y)."""
    _, den, _ = parts
    clf = TinyConditionalClassifier()
    ctx = GuidanceContext(sampler="ddim", load_classifier=lambda path, device: (
        clf, {"num_outputs": NUM_CLASSES, "num_cond_classes": 4}))
    guided = build_guidance(den, [classifier_entry(scale=2.0, target=1)], ctx)
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    t = torch.full((4,), 400)
    y = torch.tensor([0, 3, 2, 1])
    cond = {**guided.sample_cond(SEEDS), "y": y}
    got = guided(x, t, **cond)
    assert torch.equal(clf.seen_y[-1], y)
    xg = x.clone().requires_grad_(True)
    log_p = torch.log_softmax(clf(xg, t.double(), y), -1)[:, 1].sum()
    (grad,) = torch.autograd.grad(log_p, xg)
    _, s = den.schedule.alpha_sigma(t, x)
    torch.testing.assert_close(got, den(x, t) - 2.0 * s * grad, atol=FLOAT64_ATOL, rtol=0)
    with pytest.raises(ConfigError) as exc:
        guided(x, t, **guided.sample_cond(SEEDS))  # no class labels
    assert "needs the samples' class labels" in str(exc.value)
