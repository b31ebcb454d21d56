"""Tests of debiaslab.diffusion.samplers / noise / guidance: diffusers' schedulers run on the same
eps model and noise as independent references, exact Gaussian toys, seeding and bad input.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from debiaslab.diffusion.denoiser import Denoiser, VPDenoiser
from debiaslab.diffusion.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    HSpaceGuidance,
)
from debiaslab.diffusion.noise import SampleNoise
from debiaslab.diffusion.samplers import SAMPLERS, sample, sampler_options
from debiaslab.diffusion.schedules import VPSchedule, build_schedule
from debiaslab.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SEEDS = list(range(4))
SHAPE = (3, 8, 8)
NUM_CLASSES = 3
NULL_LABEL = NUM_CLASSES
DIFFUSERS_TOL = 1e-4  # max abs difference vs diffusers (float32) on O(1) samples
# DPM-Solver++ on the cosine schedule starts at t=999 where abar = 2.4e-9: x0_hat = (x - sigma eps)
# / alpha cancels catastrophically and amplifies float32 rounding by 1/alpha ~ 2e4. Measured at 10
# steps: ours(fp32) - ours(fp64) = 1.7e-4, diffusers(fp32) - ours(fp64) = 5.2e-4; so only this
# case gets a float32-conditioning tolerance (ddim/ddpm damp the first x0_hat by sqrt(abar_prev)).
COSINE_DPM_TOL = 1e-3
DIFFUSERS_BETA = {"linear": "linear", "cosine": "squaredcos_cap_v2"}

TOY_MU = 0.3  # data x0 ~ N(TOY_MU, TOY_S^2) per dimension
TOY_S = 0.5
TOY_SEEDS = list(range(64))
TOY_SHAPE = (1, 32, 32)  # 64 * 1024 = 65536 independent scalars
TOY_N = len(TOY_SEEDS) * math.prod(TOY_SHAPE)
TOY_SIGMAS_TOL = 4.0  # tolerance in standard errors of the sample mean / variance
PERTURB_SCALE = 0.2


# ------------------------------------------------------------------------------------------------
# Fixtures: a fixed nonlinear eps model, the exact Gaussian toy denoiser, an h-space stub


class EpsNet(nn.Module):
    """A fixed "trained" eps model: the exact eps of N(0, 0.5^2) data plus a random-conv
    perturbation that is nonlinear in x_t and t (scaled by sqrt(abar_t) so x0_hat stays O(1))."""

    def __init__(self, alphas_cumprod: Tensor, channels: int = SHAPE[0], hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.to(torch.float32))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
            self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
            self.temb = nn.Linear(2, hidden)
            self.yemb = nn.Embedding(NUM_CLASSES + 1, hidden)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        u = t.to(x.dtype) / len(self.abar)
        e = self.temb(torch.stack([torch.sin(math.pi * u), torch.cos(3 * u)], -1))
        if y is not None:
            e = e + self.yemb(y)
        h = torch.tanh(self.conv_in(x) + e[:, :, None, None])
        ab = self.abar[t.long()].view(-1, 1, 1, 1)
        var_data = 0.25
        eps_gauss = (1 - ab).sqrt() * x / (ab * var_data + 1 - ab)
        return eps_gauss + PERTURB_SCALE * ab.sqrt() * torch.tanh(self.conv_out(h))


class GaussianToy(Denoiser):
    """The exact denoiser of x0 ~ N(mu, s^2) per dimension: D(x; sigma) = mu + s^2/(s^2+sigma^2)
    (x - mu) in VE units, and eps*(x_t, t) = (x_t - alpha E[x0 | x_t])/sigma_t on the VP chain."""

    def __init__(self, schedule: VPSchedule, mu: float = TOY_MU, s: float = TOY_S) -> None:
        self.schedule = schedule
        self.net = nn.Identity()
        self.mu = mu
        self.s = s

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        a, sig = self.schedule.alpha_sigma(torch.as_tensor(t).reshape(-1).expand(len(x_t)), x_t)
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x_t - a * self.mu)
        return (x_t - a * x0) / sig

    def denoise_edm(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sig = torch.as_tensor(sigma).reshape(-1).expand(len(x)).to(x).view(-1, 1, 1, 1)
        return self.mu + self.s**2 / (self.s**2 + sig**2) * (x - self.mu)


class HStubNet(nn.Module):
    """A tiny encoder/decoder with an ``h_edit(fn)`` context manager like nets.unet.UNet's."""

    def __init__(self, channels: int = SHAPE[0], hidden: int = 8) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.enc = nn.Conv2d(channels, hidden, 3, padding=1)
            self.dec = nn.Conv2d(hidden, channels, 3, padding=1)
        self._edit: Callable[[Tensor, Tensor], Tensor] | None = None

    @contextlib.contextmanager
    def h_edit(self, fn: Callable[[Tensor, Tensor], Tensor] | None) -> Iterator[None]:
        previous, self._edit = self._edit, fn
        try:
            yield
        finally:
            self._edit = previous

    def h(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(self.enc(x)) * torch.cos(t.float() / 1000).view(-1, 1, 1, 1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.h(x, t)
        if self._edit is not None:
            h = self._edit(h, t)
        return 0.1 * self.dec(h) + 0.5 * x


class RecordingDenoiser(Denoiser):
    """Passes through to ``inner`` and records the timesteps it is called with."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.schedule = inner.schedule
        self.net = inner.net
        self.calls: list[Tensor] = []

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.calls.append(torch.as_tensor(t).clone())
        return self.inner(x_t, t, **cond)


@pytest.fixture(scope="module", autouse=True)
def float32_default() -> Iterator[None]:
    """These tests compare float32 runs; other test modules may change the global default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def schedules() -> dict[str, VPSchedule]:
    return {name: build_schedule(name) for name in ("linear", "cosine")}


@pytest.fixture(scope="module")
def eps_models(schedules: dict[str, VPSchedule]) -> dict[str, VPDenoiser]:
    return {name: VPDenoiser(EpsNet(s.alphas_cumprod), s) for name, s in schedules.items()}


# ------------------------------------------------------------------------------------------------
# Noise


def test_sample_noise_rows_match_diffusers_randn_tensor_with_generator_list() -> None:
    noise = SampleNoise(SEEDS, SHAPE)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    for _ in range(2):  # x_T, then one step's draw
        ref = randn_tensor((len(SEEDS),) + SHAPE, generator=gens, dtype=torch.float32)
        assert torch.equal(noise.draw(), ref)
    row = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEEDS[2]))
    assert torch.equal(SampleNoise([SEEDS[2]], SHAPE).draw()[0], row)


# ------------------------------------------------------------------------------------------------
# Against diffusers (same eps model, same x_T and noise)


def _diffusers_reference(kind: str, schedule_name: str, net: nn.Module, steps: int,
                         options: dict[str, Any]) -> Tensor:
    common = dict(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETA[schedule_name],
                  beta_start=1e-4, beta_end=0.02)
    step_kwargs: dict[str, Any] = {}
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    if kind == "ddpm":
        scheduler = DDPMScheduler(clip_sample=False, variance_type=options.get(
            "variance", "fixed_small"), **common)
        step_kwargs["generator"] = gens
    elif kind == "ddim":
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
        step_kwargs.update(eta=options.get("eta", 0.0), generator=gens)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                **common)
    scheduler.set_timesteps(steps)
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens, dtype=torch.float32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = net(x, t.expand(len(x)).to(torch.float32))
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


DIFFUSERS_CASES = [
    ("ddpm", "linear", {}),
    ("ddpm", "linear", {"variance": "fixed_large"}),
    ("ddpm", "cosine", {}),
    ("ddim", "linear", {"eta": 0.0}),
    ("ddim", "linear", {"eta": 0.5}),
    ("ddim", "cosine", {"eta": 0.0}),
    ("ddim", "cosine", {"eta": 0.5}),
    ("dpmpp_2m", "linear", {}),
    ("dpmpp_2m", "cosine", {}),
]


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name,schedule_name,options", DIFFUSERS_CASES)
def test_matches_diffusers_scheduler_loop(eps_models: dict[str, VPDenoiser], name: str,
                                          schedule_name: str, options: dict[str, Any],
                                          steps: int) -> None:
    den = eps_models[schedule_name]
    ref = _diffusers_reference(name, schedule_name, den.net, steps, options)
    ours = sample(name, den, SEEDS, SHAPE, steps=steps, **options)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert ref.abs().max() < 10  # a sane O(1) model: the tolerance below is meaningful
    tol = COSINE_DPM_TOL if (name, schedule_name) == ("dpmpp_2m", "cosine") else DIFFUSERS_TOL
    assert (ours - ref).abs().max().item() <= tol


@pytest.mark.parametrize("name,steps,expected", [
    ("ddim", 10, list(range(900, -1, -100))),
    ("ddpm", 4, [999, 666, 333, 0]),  # with spacing="linspace" below
    ("dpmpp_2m", 5, [999, 799, 599, 400, 200]),  # round(linspace(0, 999, 6))[::-1][:-1]
])
def test_denoiser_sees_original_timesteps(eps_models: dict[str, VPDenoiser], name: str,
                                          steps: int, expected: list[int]) -> None:
    rec = RecordingDenoiser(eps_models["linear"])
    options = {"spacing": "linspace"} if name == "ddpm" else {}
    sample(name, rec, SEEDS[:2], SHAPE, steps=steps, **options)
    assert [int(t[0]) for t in rec.calls] == expected
    assert all(t.shape == (2,) for t in rec.calls)


# ------------------------------------------------------------------------------------------------
# Gaussian toy: exact denoiser, the samplers must recover N(mu, s^2)


def _assert_moments(x: Tensor, mu: float = TOY_MU, s: float = TOY_S) -> tuple[float, float]:
    x = x.double().flatten()
    assert x.numel() == TOY_N
    mean_err = abs(x.mean().item() - mu)
    var_err = abs(x.var().item() - s**2)
    se_mean = s / math.sqrt(TOY_N)
    se_var = s**2 * math.sqrt(2.0 / (TOY_N - 1))
    assert mean_err <= TOY_SIGMAS_TOL * se_mean, (mean_err, se_mean)
    assert var_err <= TOY_SIGMAS_TOL * se_var, (var_err, se_var)
    return mean_err, var_err


def test_gaussian_toy_denoise_edm_agrees_with_vp_eps_path(schedules: dict[str, VPSchedule]
                                                          ) -> None:
    toy = GaussianToy(schedules["linear"])
    x = torch.randn(5, *TOY_SHAPE, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in (0.05, 0.7, 12.0):
        via_eps = Denoiser.denoise_edm(toy, x, torch.tensor(sigma, dtype=torch.float64))
        torch.testing.assert_close(via_eps, toy.denoise_edm(x, torch.tensor(sigma)),
                                   atol=1e-5, rtol=1e-5)


# Steps chosen so the sampler's discretisation bias on this toy is below one standard error
# (measured variance bias: Heun 30 steps +2.9%, 100 steps <0.3%; DDIM eta=0 (Euler) 50 steps -11%,
# 1000 steps -0.6%; DDPM fixed_small 250 steps -4.7%; DPM-Solver++(2M) 25 steps -5%, 100 <0.5%).
@pytest.mark.parametrize("name,steps,options", [
    ("edm_heun", 100, {}),
    ("edm_heun", 100, {"S_churn": 10.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.0}),
    ("ddim", 1000, {"eta": 0.0}),
    ("ddpm", 1000, {}),
    ("dpmpp_2m", 100, {}),
])
def test_gaussian_toy_recovers_data_distribution(schedules: dict[str, VPSchedule], name: str,
                                                 steps: int, options: dict[str, Any]) -> None:
    x = sample(name, GaussianToy(schedules["linear"]), TOY_SEEDS, TOY_SHAPE, steps=steps,
               **options)
    _assert_moments(x)


def test_edm_heun_is_second_order_on_the_exact_probability_flow(schedules: dict[str, VPSchedule]
                                                                ) -> None:
    """For Gaussian data the PF-ODE is solved in closed form: x(0) = mu + s/sqrt(s^2 + smax^2)
    (x_T - mu) with x_T = smax z. Heun must track it per sample, with error ~ 1/N^2."""
    sigma_max = 80.0
    seeds = TOY_SEEDS[:4]
    x_T = sigma_max * SampleNoise(seeds, TOY_SHAPE).draw().double()
    exact = TOY_MU + TOY_S / math.sqrt(TOY_S**2 + sigma_max**2) * (x_T - TOY_MU)
    errors = []
    for steps in (30, 60, 120):
        x = sample("edm_heun", GaussianToy(schedules["linear"]), seeds, TOY_SHAPE, steps=steps,
                   sigma_max=sigma_max)
        errors.append((x.double() - exact).abs().max().item())
    assert errors[2] < 3e-3  # measured 2.1e-3 (30 steps: 3.7e-2)
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # measured 4.3, 4.2


# ------------------------------------------------------------------------------------------------
# Per-sample seeding


@pytest.mark.parametrize("name,options", [
    ("ddpm", {}),
    ("ddim", {"eta": 0.7}),
    ("dpmpp_2m", {}),
    ("edm_heun", {"S_churn": 5.0}),
])
def test_samples_independent_of_batching_and_order(eps_models: dict[str, VPDenoiser],
                                                   name: str, options: dict[str, Any]) -> None:
    den = eps_models["linear"]
    seeds = list(range(8))
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    full = sample(name, den, seeds, SHAPE, steps=6, **options)
    batched = sample(name, den, seeds, SHAPE, steps=6, batch_size=3, **options)
    permuted = sample(name, den, perm, SHAPE, steps=6, batch_size=3, **options)
    # bit-identical on CPU here; the tolerance only absorbs batch-size-dependent conv kernels
    torch.testing.assert_close(batched, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(permuted, full[perm], atol=1e-6, rtol=0)
    assert not torch.allclose(full[0], full[1])


@pytest.mark.parametrize("name", ["ddim", "edm_heun"])
def test_float64_network_samples_in_float64_from_the_same_noise(
        schedules: dict[str, VPSchedule], eps_models: dict[str, VPDenoiser], name: str) -> None:
    net64 = EpsNet(schedules["linear"].alphas_cumprod).double()
    x64 = sample(name, VPDenoiser(net64, schedules["linear"]), SEEDS, SHAPE, steps=10)
    x32 = sample(name, eps_models["linear"], SEEDS, SHAPE, steps=10)
    assert x64.dtype == torch.float64 and x32.dtype == torch.float32
    assert (x64 - x32.double()).abs().max().item() < DIFFUSERS_TOL


def test_per_sample_cond_is_split_with_the_seeds(eps_models: dict[str, VPDenoiser]) -> None:
    den = eps_models["linear"]
    y = torch.tensor([0, 1, 2, 1, 0])
    full = sample("ddim", den, range(5), SHAPE, steps=5, cond={"y": y})
    batched = sample("ddim", den, range(5), SHAPE, steps=5, cond={"y": y}, batch_size=2)
    torch.testing.assert_close(batched, full, atol=1e-6, rtol=0)
    other = sample("ddim", den, range(5), SHAPE, steps=5, cond={"y": (y + 1) % NUM_CLASSES})
    assert not torch.allclose(other, full)


# ------------------------------------------------------------------------------------------------
# Guidance wrappers


class HandCFG(Denoiser):
    """(1 + w) eps(x, y) - w eps(x, null), two separate forwards."""

    def __init__(self, inner: VPDenoiser, omega: float) -> None:
        self.inner, self.schedule, self.net, self.omega = inner, inner.schedule, inner.net, omega

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        y = cond["y"]
        cond_eps = self.inner(x_t, t, y=y)
        uncond_eps = self.inner(x_t, t, y=torch.full_like(y, NULL_LABEL))
        return (1 + self.omega) * cond_eps - self.omega * uncond_eps


def test_cfg_at_zero_is_the_conditional_model(eps_models: dict[str, VPDenoiser]) -> None:
    den = eps_models["linear"]
    y = torch.tensor([0, 2, 1, 1])
    cfg = ClassifierFreeGuidance(den, omega=0.0, null_label=NULL_LABEL)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.full((4,), 500)
    assert torch.equal(cfg(x, t, y=y), den(x, t, y=y))
    guided = sample("ddim", cfg, SEEDS, SHAPE, steps=8, cond={"y": y})
    assert torch.equal(guided, sample("ddim", den, SEEDS, SHAPE, steps=8, cond={"y": y}))


@pytest.mark.parametrize("omega", [0.5, 3.0])
def test_cfg_equals_hand_combination(eps_models: dict[str, VPDenoiser], omega: float) -> None:
    den = eps_models["linear"]
    y = torch.tensor([0, 2, 1, 1])
    cfg = ClassifierFreeGuidance(den, omega=omega, null_label=NULL_LABEL)
    hand = HandCFG(den, omega)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 300, 600, 999])
    torch.testing.assert_close(cfg(x, t, y=y), hand(x, t, y=y), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cfg(x, t, y=y), den(x, t, y=y))
    for name in ("ddpm", "ddim"):
        ours = sample(name, cfg, SEEDS, SHAPE, steps=8, cond={"y": y})
        ref = sample(name, hand, SEEDS, SHAPE, steps=8, cond={"y": y})
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_classifier_guidance_moves_mean_toward_target(schedules: dict[str, VPSchedule]) -> None:
    """log p(target | x_t) = -||x_t - alpha_t c||^2 / 2 pulls samples toward c > mu."""
    toy = GaussianToy(schedules["linear"])
    target = 1.5

    def log_prob(x: Tensor, t: Tensor) -> Tensor:
        a, _ = toy.schedule.alpha_sigma(t, x)
        return -0.5 * ((x - a * target) ** 2).flatten(1).sum(1)

    seeds, steps = TOY_SEEDS[:8], 20
    plain = sample("ddim", toy, seeds, TOY_SHAPE, steps=steps).mean().item()
    weak = sample("ddim", ClassifierGuidance(toy, log_prob, scale=0.5), seeds, TOY_SHAPE,
                  steps=steps).mean().item()
    strong = sample("ddim", ClassifierGuidance(toy, log_prob, scale=2.0), seeds, TOY_SHAPE,
                    steps=steps).mean().item()
    assert abs(plain - TOY_MU) < 0.02
    assert plain + 0.05 < weak < strong < target
    zero = ClassifierGuidance(toy, log_prob, scale=0.0)
    assert torch.equal(sample("ddim", zero, seeds, TOY_SHAPE, steps=steps),
                       sample("ddim", toy, seeds, TOY_SHAPE, steps=steps))
    edm = sample("edm_heun", ClassifierGuidance(toy, log_prob, scale=2.0), seeds, TOY_SHAPE,
                 steps=steps).mean().item()
    assert plain + 0.05 < edm < target


def test_h_space_guidance_with_stub_net(schedules: dict[str, VPSchedule]) -> None:
    den = VPDenoiser(HStubNet(), schedules["linear"])
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    t = torch.full((4,), 400)
    identity = HSpaceGuidance(den, lambda h, t: h)
    assert torch.equal(identity(x, t), den(x, t))
    shift = HSpaceGuidance(den, lambda h, t: h + 0.3)
    net = den.net
    expected = 0.1 * net.dec(net.h(x, t.float()) + 0.3) + 0.5 * x
    torch.testing.assert_close(shift(x, t), expected)
    assert net._edit is None  # the edit is scoped to the forward
    plain = sample("ddim", den, SEEDS, SHAPE, steps=5)
    assert torch.equal(sample("ddim", identity, SEEDS, SHAPE, steps=5), plain)
    assert not torch.allclose(sample("ddim", shift, SEEDS, SHAPE, steps=5), plain)


def test_h_space_guidance_with_unet(schedules: dict[str, VPSchedule]) -> None:
    unet_mod = pytest.importorskip("debiaslab.nets.unet")
    with torch.random.fork_rng():
        torch.manual_seed(2)
        unet = unet_mod.UNet(3, 3, image_size=8, model_channels=16, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(), num_heads=1)
        nn.init.normal_(unet.out[-1].weight, std=0.05)  # the zero-init output would hide edits
    den = VPDenoiser(unet.eval(), schedules["linear"])
    plain = sample("ddim", den, SEEDS[:2], SHAPE, steps=4)
    identity = sample("ddim", HSpaceGuidance(den, lambda h, t: h), SEEDS[:2], SHAPE, steps=4)
    shifted = sample("ddim", HSpaceGuidance(den, lambda h, t: h + 1.0), SEEDS[:2], SHAPE, steps=4)
    assert torch.equal(identity, plain)
    assert not torch.allclose(shifted, plain)


# ------------------------------------------------------------------------------------------------
# Bad input and plumbing


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_sampler_and_option_are_config_errors(eps_models: dict[str, VPDenoiser]) -> None:
    den = eps_models["linear"]
    with pytest.raises(ConfigError) as err:
        sample("euler_magic", den, SEEDS, SHAPE, steps=5)
    assert "euler_magic" in _one_line(err) and "ddim" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        sample("ddim", den, SEEDS, SHAPE, steps=5, etaa=0.3)
    assert "etaa" in _one_line(err) and "eta" in _one_line(err).split("allowed")[1]
    with pytest.raises(ConfigError, match="variance"):
        sample("ddpm", den, SEEDS, SHAPE, steps=5, variance="learned")
    with pytest.raises(ConfigError, match="spacing"):
        sample("ddim", den, SEEDS, SHAPE, steps=5, spacing="quadratic")
    with pytest.raises(ConfigError, match="eta"):
        sample("ddim", den, SEEDS, SHAPE, steps=5, eta=-0.1)
    with pytest.raises(ConfigError, match="seed"):
        sample("ddim", den, [], SHAPE, steps=5)
    with pytest.raises(ConfigError, match="batch_size"):
        sample("ddim", den, SEEDS, SHAPE, steps=5, batch_size=0)


@pytest.mark.parametrize("name,bad_steps", [
    ("ddpm", 0), ("ddpm", 1001), ("ddim", 0), ("ddim", 1001), ("dpmpp_2m", 0),
    ("dpmpp_2m", 1000), ("edm_heun", 0), ("edm_heun", 2.5),
])
def test_steps_out_of_range_are_config_errors(eps_models: dict[str, VPDenoiser], name: str,
                                              bad_steps: Any) -> None:
    with pytest.raises(ConfigError, match="steps") as err:
        sample(name, eps_models["linear"], SEEDS, SHAPE, steps=bad_steps)
    _one_line(err)


def test_registry_options_and_progress_bar(eps_models: dict[str, VPDenoiser],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert {"ddim", "ddpm", "dpmpp_2m", "edm_heun"} <= set(SAMPLERS.names())
    assert sampler_options("ddim") == {"eta": 0.0, "spacing": "leading", "clip_x0": False}
    assert sampler_options("dpmpp_2m") == {}
    x = sample("ddpm", eps_models["linear"], SEEDS[:1], SHAPE, steps=3, progress=True,
               clip_x0=True)
    assert "ddpm" in capsys.readouterr().err
    assert x.abs().max() <= 1.0 + 1e-6  # the last step returns the clipped x0_hat
    for name in ("ddim", "ddpm", "dpmpp_2m", "edm_heun"):  # one step works, samples are finite
        assert torch.isfinite(sample(name, eps_models["cosine"], SEEDS[:1], SHAPE, steps=1)).all()
