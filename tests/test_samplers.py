"""Tests of debiaslab.diffusion.samplers / noise / guidance: diffusers' schedulers run on the same
eps model and noise as independent references, exact Gaussian toys, seeding and bad input.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import pytest
import torch
from conftest import one_line
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
# Tolerances are derived from float32 rounding, never fitted to one CPU's kernels (which differ:
# AVX2 vs AVX-512 conv kernels sum in other orders). Float32 unit roundoff u = 2^-24 ~ 6e-8.
F32_EPS = 2.0**-24
# Two float32 runs of the same sampler math (ours vs diffusers, which also keeps its schedule in
# float32; or a float32 vs a float64 network) differ by a few roundings per operation: allow
# F32_OPS_PER_STEP roundings of relative size u per step, on values up to F32_SCALE (|x_T| < 5,
# the O(1) model's samples < 10, asserted), accumulated over the steps (the VP updates do not
# expand errors). 10 steps: 9.5e-5, 25 steps: 2.4e-4; measured <= 6.5e-6 (ddpm, cosine).
F32_OPS_PER_STEP = 16
F32_SCALE = 10.0
# DPM-Solver++ on the cosine schedule starts at t=999 where alpha = sqrt(abar) = 4.9e-5: x0_hat =
# (x - sigma eps)/alpha cancels catastrophically, so one float32 rounding of |x_T| < 5 in eps or
# x - sigma eps becomes an x0_hat error of u |x_T|/alpha_1, which enters x_2 with the factor
# alpha_2 |expm1(-h_1)| (later steps do not expand it). _dpm_first_step_tol allows
# COSINE_DPM_ROUNDINGS such roundings: 10 steps 3.4e-3, 25 steps 1.4e-3; measured 3.6e-4, 1.5e-4.
COSINE_DPM_ROUNDINGS = 4
X_T_MAX = 5.0
# Batching/ordering checks run in float64 (model.double()): float64 roundoff 1.1e-16 x |x| <= 400
# (edm x_T = 80 z) x ~1e3 accumulated roundings (convs of <= 144 terms, 12 evaluations) < 5e-11
# bounds any batch-size-dependent kernel choice (measured 2e-15); a real coupling between samples
# (a shifted noise row, a label mix-up) changes them by O(0.1).
FLOAT64_BATCHING_ATOL = 1e-10
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


@contextlib.contextmanager
def other_conv_kernels() -> Iterator[None]:
    """Emulates another CPU's kernel choice on this one: PyTorch's native convolution instead of
    oneDNN's (a float32 edm_heun run then moves by 3.6e-6, the AVX2-vs-AVX-512 failure mode)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


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


@pytest.fixture(scope="module")
def eps_models64(schedules: dict[str, VPSchedule]) -> dict[str, VPDenoiser]:
    """The same models in float64 (the samplers then run in float64 from the same noise)."""
    return {name: VPDenoiser(EpsNet(s.alphas_cumprod).double(), s)
            for name, s in schedules.items()}


def f32_tol(steps: int) -> float:
    """Max abs difference of two float32 runs of ``steps`` sampler steps (see F32_OPS_PER_STEP)."""
    return F32_OPS_PER_STEP * steps * F32_EPS * F32_SCALE


def _dpm_first_step_tol(schedule: VPSchedule, steps: int) -> float:
    """COSINE_DPM_ROUNDINGS x u |x_T| / alpha_1 x alpha_2 |expm1(-h_1)| on dpmpp_2m's grid."""
    ts = schedule.timesteps(steps + 1, "linspace")[:2]
    abar = schedule.alphas_cumprod[ts]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    h = float((alpha[1] / sigma[1]).log() - (alpha[0] / sigma[0]).log())
    amplification = float(alpha[1]) * abs(math.expm1(-h)) / float(alpha[0])
    return COSINE_DPM_ROUNDINGS * F32_EPS * X_T_MAX * amplification


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
                         options: dict[str, Any], clip: bool) -> Tensor:
    """diffusers' loop; ``clip`` = our clip_x0: clip_sample for DDPM/DDIM (DDIM's step with
    use_clipped_model_output) and, for DPM-Solver++, thresholding with sample_max_value=1 (the
    dynamic threshold s is then clamped to [1, 1]: a plain clip to [-1, 1])."""
    common = dict(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETA[schedule_name],
                  beta_start=1e-4, beta_end=0.02)
    step_kwargs: dict[str, Any] = {}
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    if kind == "ddpm":
        scheduler = DDPMScheduler(clip_sample=clip, variance_type=options.get(
            "variance", "fixed_small"), **common)
        step_kwargs["generator"] = gens
    elif kind == "ddim":
        scheduler = DDIMScheduler(clip_sample=clip, set_alpha_to_one=True, **common)
        # our ddim re-derives eps from the clipped x0_hat (guided-diffusion's ddim_sample)
        step_kwargs.update(eta=options.get("eta", 0.0), generator=gens,
                           use_clipped_model_output=clip)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                thresholding=clip, sample_max_value=1.0,
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


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name,schedule_name,options", DIFFUSERS_CASES)
def test_matches_diffusers_scheduler_loop(schedules: dict[str, VPSchedule],
                                          eps_models: dict[str, VPDenoiser], name: str,
                                          schedule_name: str, options: dict[str, Any],
                                          steps: int, clip: bool) -> None:
    den = eps_models[schedule_name]
    ref = _diffusers_reference(name, schedule_name, den.net, steps, options, clip)
    ours = sample(name, den, SEEDS, SHAPE, steps=steps, clip_x0=clip, **options)
    if clip:  # the default
        assert torch.equal(ours, sample(name, den, SEEDS, SHAPE, steps=steps, **options))
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert ref.abs().max() < F32_SCALE  # a sane O(1) model: the tolerance below is meaningful
    assert (ref.abs().max() > 1.0) != clip  # this model's x0_hat leaves [-1, 1]: clipping acts
    if (name, schedule_name) == ("dpmpp_2m", "cosine"):
        tol = _dpm_first_step_tol(schedules[schedule_name], steps)
    else:
        tol = f32_tol(steps)
    assert (ours - ref).abs().max().item() <= tol


def test_timestep_grids_match_diffusers_for_every_step_count(schedules: dict[str, VPSchedule]
                                                             ) -> None:
    """dpmpp_2m's grid is DPMSolverMultistepScheduler's (timestep_spacing="linspace") for every N;
    the leading/linspace/trailing spacings of ddpm/ddim are DDIM/DDPMScheduler's for every N.
    Exceptions, both in diffusers: linspace at N = 1 (diffusers: [0], ours: [T-1]); trailing at
    62 of the N (e.g. 61), where numpy's arange adds a value ~1e-13 that becomes t = -1."""
    linear = schedules["linear"]
    T = linear.num_timesteps
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=T)
    for n in range(1, T):
        dpm.set_timesteps(n)
        rec = RecordingDenoiser(GaussianToy(linear))
        if n in (1, 2, 30, 999):  # the sampler itself, not just the schedule helper
            sample("dpmpp_2m", rec, SEEDS[:1], TOY_SHAPE, steps=n)
            assert [int(t[0]) for t in rec.calls] == dpm.timesteps.tolist()
        assert linear.timesteps(n + 1, "linspace")[:-1].tolist() == dpm.timesteps.tolist(), n
    extra_minus_one = 0
    for spacing in ("leading", "linspace", "trailing"):
        ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ddpm = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        for n in range(1, T + 1):
            ours = linear.timesteps(n, spacing).tolist()
            ddim.set_timesteps(n)
            ddpm.set_timesteps(n)
            ref = ddim.timesteps.tolist()
            assert ddpm.timesteps.tolist() == ref
            if spacing == "linspace" and n == 1:
                assert ref == [0] and ours == [T - 1]
            elif spacing == "trailing" and len(ref) == n + 1:
                assert ref[-1] == -1 and ours == ref[:-1], n
                extra_minus_one += 1
            else:
                assert ours == ref, (spacing, n)
    assert extra_minus_one == 62


@pytest.mark.parametrize("name,steps,expected", [
    ("ddim", 10, list(range(900, -1, -100))),
    ("ddpm", 4, [999, 666, 333, 0]),  # with spacing="linspace" below
    ("dpmpp_2m", 5, [999, 799, 599, 400, 200]),  # round(linspace(0, 999, 6))[::-1][:-1]
    # diffusers' numpy linspace: 15 * fl(999/30) = 499.49999999999994 -> 499 (the exact tie 499.5
    # rounded half to even gave 500 before)
    ("dpmpp_2m", 30, [999, 966, 932, 899, 866, 832, 799, 766, 733, 699, 666, 633, 599, 566, 533,
                      499, 466, 433, 400, 366, 333, 300, 266, 233, 200, 166, 133, 100, 67, 33]),
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
    x = torch.randn(5, *TOY_SHAPE, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) * 3
    for value in (0.05, 0.7, 12.0):
        sigma = torch.tensor(value, dtype=torch.float64)
        via_eps = Denoiser.denoise_edm(toy, x, sigma)
        # float64: |x| < 20, sigma <= 12 amplifies roundings (u = 1.1e-16) by < 1e3 -> 1e-12
        torch.testing.assert_close(via_eps, toy.denoise_edm(x, sigma), atol=1e-12, rtol=1e-12)


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
    if "clip_x0" in sampler_options(name):  # N(0.3, 0.5^2) has 8% of its mass above 1
        options = {**options, "clip_x0": False}
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
def test_samples_independent_of_batching_and_order(eps_models64: dict[str, VPDenoiser],
                                                   name: str, options: dict[str, Any]) -> None:
    den = eps_models64["linear"]
    seeds = list(range(8))
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    full = sample(name, den, seeds, SHAPE, steps=6, **options)
    with other_conv_kernels():
        batched = sample(name, den, seeds, SHAPE, steps=6, batch_size=3, **options)
    permuted = sample(name, den, perm, SHAPE, steps=6, batch_size=3, **options)
    assert full.dtype == torch.float64
    # the tolerance only absorbs batch-size-dependent conv kernels (see FLOAT64_BATCHING_ATOL)
    torch.testing.assert_close(batched, full, atol=FLOAT64_BATCHING_ATOL, rtol=0)
    torch.testing.assert_close(permuted, full[perm], atol=FLOAT64_BATCHING_ATOL, rtol=0)
    assert not torch.allclose(full[0], full[1])


@pytest.mark.parametrize("name", ["ddim", "edm_heun"])
def test_float64_network_samples_in_float64_from_the_same_noise(
        schedules: dict[str, VPSchedule], eps_models: dict[str, VPDenoiser], name: str) -> None:
    net64 = EpsNet(schedules["linear"].alphas_cumprod).double()
    x64 = sample(name, VPDenoiser(net64, schedules["linear"]), SEEDS, SHAPE, steps=10)
    x32 = sample(name, eps_models["linear"], SEEDS, SHAPE, steps=10)
    assert x64.dtype == torch.float64 and x32.dtype == torch.float32
    assert (x64 - x32.double()).abs().max().item() < f32_tol(10)  # measured <= 8.4e-7


def test_per_sample_cond_is_split_with_the_seeds(eps_models64: dict[str, VPDenoiser]) -> None:
    den = eps_models64["linear"]
    y = torch.tensor([0, 1, 2, 1, 0])
    full = sample("ddim", den, range(5), SHAPE, steps=5, cond={"y": y})
    with other_conv_kernels():
        batched = sample("ddim", den, range(5), SHAPE, steps=5, cond={"y": y}, batch_size=2)
    torch.testing.assert_close(batched, full, atol=FLOAT64_BATCHING_ATOL, rtol=0)
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
def test_cfg_equals_hand_combination(eps_models64: dict[str, VPDenoiser], omega: float) -> None:
    """One batched forward of both halves vs two forwards: float64, so a batch-size-dependent
    conv kernel only shows at the FLOAT64_BATCHING_ATOL level."""
    den = eps_models64["linear"]
    y = torch.tensor([0, 2, 1, 1])
    cfg = ClassifierFreeGuidance(den, omega=omega, null_label=NULL_LABEL)
    hand = HandCFG(den, omega)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([10, 300, 600, 999])
    torch.testing.assert_close(cfg(x, t, y=y), hand(x, t, y=y), atol=FLOAT64_BATCHING_ATOL,
                               rtol=0)
    assert not torch.allclose(cfg(x, t, y=y), den(x, t, y=y))
    for name in ("ddpm", "ddim"):
        ours = sample(name, cfg, SEEDS, SHAPE, steps=8, cond={"y": y})
        ref = sample(name, hand, SEEDS, SHAPE, steps=8, cond={"y": y})
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref, atol=FLOAT64_BATCHING_ATOL, rtol=0)


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


def test_unknown_sampler_and_option_are_config_errors(eps_models: dict[str, VPDenoiser]) -> None:
    den = eps_models["linear"]
    with pytest.raises(ConfigError) as err:
        sample("euler_magic", den, SEEDS, SHAPE, steps=5)
    assert "euler_magic" in one_line(err) and "ddim" in one_line(err)
    with pytest.raises(ConfigError) as err:
        sample("ddim", den, SEEDS, SHAPE, steps=5, etaa=0.3)
    assert "etaa" in one_line(err) and "eta" in one_line(err).split("allowed")[1]
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
    one_line(err)


def test_registry_options_and_progress_bar(eps_models: dict[str, VPDenoiser],
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"ddim", "ddpm", "dpmpp_2m", "edm_heun"} <= set(SAMPLERS.names())
    assert sampler_options("ddim") == {"eta": 0.0, "spacing": "leading", "clip_x0": True}
    assert sampler_options("ddpm") == {"spacing": "leading", "variance": "fixed_small",
                                       "clip_x0": True}
    assert sampler_options("dpmpp_2m") == {"clip_x0": True}
    assert "clip_x0" not in sampler_options("edm_heun")
    # captured stderr is not a TTY: plain lines, no carriage returns (debiaslab.progress)
    monkeypatch.setenv("DEBIASLAB_PROGRESS_INTERVAL", "0")  # a line per step
    x = sample("ddpm", eps_models["linear"], SEEDS[:1], SHAPE, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "ddpm" in err and "\r" not in err and len(err.splitlines()) == 3  # one per step
    assert x.abs().max() <= 1.0  # clip_x0 by default: the last step returns the clipped x0_hat
    for name in ("ddim", "ddpm", "dpmpp_2m", "edm_heun"):  # one step works, samples are finite
        assert torch.isfinite(sample(name, eps_models["cosine"], SEEDS[:1], SHAPE, steps=1)).all()


# ------------------------------------------------------------------------------------------------
# x0 clipping (clip_x0, on by default for the VP samplers)


class ConstantX0(nn.Module):
    """An x0-predicting "network" that always predicts the constant ``value`` (out of [-1, 1])."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device/dtype

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_vp_samplers_clip_x0_by_default(schedules: dict[str, VPSchedule], name: str) -> None:
    den = VPDenoiser(ConstantX0(5.0), schedules["linear"], target="x0")
    clipped = sample(name, den, SEEDS, SHAPE, steps=6)
    # the last step returns x0_hat (abar = 1 after it), clipped to the data range
    assert torch.equal(clipped, torch.ones_like(clipped))
    unclipped = sample(name, den, SEEDS, SHAPE, steps=6, clip_x0=False)
    torch.testing.assert_close(unclipped, torch.full_like(unclipped, 5.0), atol=1e-3, rtol=0)


class TanhX0(nn.Module):
    """An x0-predicting "network", nonlinear in x and t, whose x0_hat leaves [-1, 1] at large t
    (|x0| < 0.8 + 1.6 t/1000), so a clip at one step shows in the next step's in-range output."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return 1.6 * torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)


def _hand_two_steps(name: str, den: VPDenoiser, clip: bool) -> Tensor:
    """Two steps by hand from docs/algorithms.md §3.2 / the dpmpp_2m docstring, in float64:
    DDIM (eta=0) on the leading grid (500, 0); DPM-Solver++ on (999, 500) then sigma = 0."""
    abar = den.schedule.alphas_cumprod
    x = SampleNoise(SEEDS, SHAPE, dtype=torch.float64).draw()

    def x0_hat(x: Tensor, t: int) -> Tensor:
        eps = den(x, torch.full((len(x),), t))
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        return x0.clamp(-1, 1) if clip else x0

    if name == "ddim":
        x0 = x0_hat(x, 500)
        eps = (x - abar[500].sqrt() * x0) / (1 - abar[500]).sqrt()
        x = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps
        return x0_hat(x, 0)  # abar_next = 1: x = x0_hat
    x0 = x0_hat(x, 999)
    a, s = abar[[999, 500]].sqrt(), (1 - abar[[999, 500]]).sqrt()
    h = (a[1] / s[1]).log() - (a[0] / s[0]).log()
    x = s[1] / s[0] * x - a[1] * torch.expm1(-h) * x0
    return x0_hat(x, 500)  # sigma_next = 0: x = x0_hat


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_clipped_steps_match_hand_computation(schedules: dict[str, VPSchedule],
                                              name: str) -> None:
    den = VPDenoiser(TanhX0(), schedules["linear"], target="x0")
    with torch.no_grad():
        hand = {clip: _hand_two_steps(name, den, clip) for clip in (True, False)}
    # the first step's clip moves the second step's input (the final x0_hat is in range here)
    assert hand[True].abs().max() <= 1.0 and not torch.allclose(hand[True], hand[False])
    # float64, ~20 operations on |x| < 10: 1e-12 is ~500x the roundoff
    torch.testing.assert_close(sample(name, den, SEEDS, SHAPE, steps=2), hand[True],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(sample(name, den, SEEDS, SHAPE, steps=2, clip_x0=False),
                               hand[False], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# Per-step callbacks (k-diffusion style)


CALLBACK_CASES = [
    ("ddpm", {}),
    ("ddpm", {"variance": "fixed_large"}),
    ("ddim", {}),
    ("ddim", {"eta": 0.5}),
    ("dpmpp_2m", {}),
    ("edm_heun", {}),
    ("edm_heun", {"S_churn": 5.0}),
]


@pytest.mark.parametrize("name,options", CALLBACK_CASES)
def test_callback_sees_every_step_and_changes_nothing(eps_models64: dict[str, VPDenoiser],
                                                      name: str, options: dict[str, Any]) -> None:
    steps = 5
    rec = RecordingDenoiser(eps_models64["linear"])
    infos: list[dict[str, Any]] = []
    x = sample(name, rec, SEEDS, SHAPE, steps=steps, callback=infos.append, **options)
    calls = [int(t[0]) for t in rec.calls]
    assert torch.equal(x, sample(name, rec, SEEDS, SHAPE, steps=steps, **options))  # bit-identical
    assert "callback" not in sampler_options(name)  # a common argument, not a sampler option
    assert len(infos) == steps and [d["i"] for d in infos] == list(range(steps))
    assert all(set(d) == {"i", "t", "x", "denoised"} for d in infos)
    assert all(d["x"].shape == d["denoised"].shape == x.shape for d in infos)
    assert torch.equal(infos[-1]["x"], x)
    if name == "edm_heun":
        from debiaslab.diffusion.schedules import karras_sigmas

        sigmas = karras_sigmas(steps).tolist()[:-1]
        assert [d["t"] for d in infos] == sigmas and all(type(d["t"]) is float for d in infos)
    else:  # one denoiser call per step, at the reported original timestep
        assert [d["t"] for d in infos] == calls and all(type(d["t"]) is int for d in infos)
        assert torch.equal(infos[-1]["x"], infos[-1]["denoised"])  # last step: x = x0_hat


def test_callback_runs_per_batch_through_sample(eps_models64: dict[str, VPDenoiser]) -> None:
    infos: list[dict[str, Any]] = []
    x = sample("ddim", eps_models64["linear"], range(5), SHAPE, steps=3, batch_size=2,
               callback=infos.append)
    assert [d["i"] for d in infos] == [0, 1, 2] * 3
    assert [len(d["x"]) for d in infos] == [2] * 3 + [2] * 3 + [1] * 3
    assert torch.equal(torch.cat([infos[k]["x"] for k in (2, 5, 8)]), x)


# ------------------------------------------------------------------------------------------------
# Ancestral mean shift (Dhariwal & Nichol 2021, Algorithm 1: mu' = mu + s Sigma grad log p)


SHIFT_C = 0.7


class ShiftedMean(Denoiser):
    """eps of ``inner``; mean_shift = SHIFT_C * variance (a classifier whose s grad log p is the
    constant SHIFT_C), recording its arguments. ``shift=False`` returns None instead."""

    def __init__(self, inner: Denoiser, shift: bool = True) -> None:
        self.inner = inner
        self.schedule = inner.schedule
        self.net = inner.net
        self.shift = shift
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.inner(x_t, t, **cond)

    def mean_shift(self, x_t: Tensor, t: Tensor, variance: Tensor, **cond: Any) -> Tensor | None:
        self.calls.append((x_t.clone(), t.clone(), variance.clone()))
        return SHIFT_C * variance if self.shift else None


def test_denoiser_mean_shift_defaults_to_none(eps_models64: dict[str, VPDenoiser]) -> None:
    den = eps_models64["linear"]
    x = torch.zeros(2, *SHAPE, dtype=torch.float64)
    assert den.mean_shift(x, torch.full((2,), 5), torch.ones(2, 1, 1, 1)) is None
    silent = ShiftedMean(den, shift=False)
    assert torch.equal(sample("ddpm", silent, SEEDS, SHAPE, steps=4),
                       sample("ddpm", den, SEEDS, SHAPE, steps=4))
    assert len(silent.calls) == 4  # called at every step, the last included


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_mean_shift_matches_hand_steps(eps_models64: dict[str, VPDenoiser],
                                            variance: str) -> None:
    """Three steps of Ho et al. 2020 Eq. 6-7 on the leading grid (666, 333, 0) by hand, float64,
    with mu' = mu + SHIFT_C var (guided-diffusion's condition_mean with the model variance)."""
    den = ShiftedMean(eps_models64["linear"])
    abar_table = den.schedule.alphas_cumprod
    ts = [666, 333, 0]
    abar = [float(abar_table[t]) for t in ts]
    abar_prev = abar[1:] + [1.0]
    beta = [1 - a / p for a, p in zip(abar, abar_prev)]
    post_var = [(1 - p) / (1 - a) * b for a, p, b in zip(abar, abar_prev, beta)]
    var = post_var if variance == "fixed_small" else beta[:2] + [post_var[1]]
    noise = SampleNoise(SEEDS, SHAPE, dtype=torch.float64)
    x = noise.draw()
    states = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            states.append(x)
            eps = den(x, torch.full((len(x),), t))
            x0 = ((x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])).clamp(-1, 1)
            mu = (math.sqrt(abar_prev[i]) * beta[i] / (1 - abar[i]) * x0
                  + math.sqrt(1 - beta[i]) * (1 - abar_prev[i]) / (1 - abar[i]) * x)
            x = mu + SHIFT_C * var[i]
            if i < 2:
                x = x + math.sqrt(var[i]) * noise.draw()
    out = sample("ddpm", den, SEEDS, SHAPE, steps=3, variance=variance)
    # float64, ~20 operations per step on |x| < 10: 1e-12 is ~100x the roundoff
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0)
    assert len(den.calls) == 3
    for i, (x_t, t, v) in enumerate(den.calls):
        torch.testing.assert_close(x_t, states[i], atol=1e-12, rtol=0)  # the state before step i
        assert t.dtype == torch.long and t.tolist() == [ts[i]] * len(SEEDS)
        assert v.shape == (len(SEEDS), 1, 1, 1) and v.dtype == torch.float64
        torch.testing.assert_close(v, torch.full_like(v, var[i]), atol=1e-15, rtol=1e-14)
    if variance == "fixed_small":
        assert torch.equal(den.calls[-1][2], torch.zeros_like(den.calls[-1][2]))  # last step
    plain = sample("ddpm", eps_models64["linear"], SEEDS, SHAPE, steps=3, variance=variance)
    assert not torch.allclose(out, plain)
