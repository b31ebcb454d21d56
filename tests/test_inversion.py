"""Tests of debiaslab.diffusion.inversion: DDIM inversion against diffusers' DDIMInverseScheduler
and the closed form on Gaussian data, round trips through the ddim sampler, the h-space recorder.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor, nn

from debiaslab.diffusion import samplers
from debiaslab.diffusion.denoiser import Denoiser, VPDenoiser
from debiaslab.diffusion.guidance import HSpaceGuidance
from debiaslab.diffusion.inversion import HRecorder, Inversion, ddim_invert
from debiaslab.diffusion.noise import SampleNoise
from debiaslab.diffusion.schedules import VPSchedule, build_schedule
from debiaslab.errors import ConfigError

SHAPE = (3, 8, 8)
SEEDS = list(range(4))
GAUSS_MU = 0.3  # data x0 ~ N(GAUSS_MU, GAUSS_S^2) per dimension
GAUSS_S = 0.5
GAUSS_BATCH = 16
GAUSS_SHAPE = (1, 32, 32)  # 16 * 1024 = 16384 independent scalars
GAUSS_N = GAUSS_BATCH * math.prod(GAUSS_SHAPE)
SIGMAS_TOL = 4.0  # tolerance in standard errors of a sample mean / standard deviation
# float64 roundoff bound of one run compared with an exact recursion: F64_OPS_PER_STEP roundings
# (u = 2^-53) per step of values up to F64_SCALE, accumulated over the steps and amplified by at
# most 1/alpha_T (an error in x at a noisy level is an error / alpha in x/alpha, which the chain
# carries; linear schedule: 1/alpha_995 = 160). 1000 steps: 2.8e-9; measured 5e-14.
F64_EPS = 2.0**-53
F64_OPS_PER_STEP = 16
F64_SCALE = 10.0


def f64_tol(steps: int, alpha_min: float = 1.0) -> float:
    return F64_OPS_PER_STEP * steps * F64_EPS * F64_SCALE / alpha_min


# ------------------------------------------------------------------------------------------------
# Fixtures: the exact denoiser of Gaussian data, a nonlinear eps net, a tiny UNet


class GaussianDenoiser(Denoiser):
    """The exact eps of x0 ~ N(mu, s^2) per dimension on the VP chain. With abar = abar_t,
    x_t = sqrt(abar) x0 + sqrt(1 - abar) z is Gaussian, so E[x0 | x_t] = mu + sqrt(abar) s^2
    (x_t - sqrt(abar) mu)/(abar s^2 + 1 - abar) and eps*(x_t, t) = (x_t - sqrt(abar) E[x0 | x_t])/
    sqrt(1 - abar) = sqrt(1 - abar)(x_t - sqrt(abar) mu)/(abar s^2 + 1 - abar). A float64 anchor
    parameter makes the samplers and the inversion run in float64."""

    def __init__(self, schedule: VPSchedule, mu: float = GAUSS_MU, s: float = GAUSS_S) -> None:
        self.schedule = schedule
        self.net = nn.Linear(1, 1).double()
        self.mu = mu
        self.s = s

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        abar = self.schedule.abar(t).to(x_t).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


class TanhEps(nn.Module):
    """A smooth nonlinear eps "network" (float64), dependent on x and t."""

    def __init__(self, channels: int = SHAPE[0]) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.conv = nn.Conv2d(channels, channels, 3, padding=1).double()

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        u = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return 0.8 * x * (u + 0.1) / (u + 0.2) + 0.3 * torch.tanh(self.conv(x)) * torch.cos(3 * u)


@pytest.fixture(autouse=True)
def float32_default() -> Iterator[None]:
    """Other test modules may change the global default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def linear() -> VPSchedule:
    return build_schedule("linear")


@pytest.fixture(scope="module")
def tanh_denoiser(linear: VPSchedule) -> VPDenoiser:
    return VPDenoiser(TanhEps(), linear)


def _x0(batch: int = len(SEEDS), shape: tuple[int, ...] = SHAPE, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn((batch,) + shape, generator=gen, dtype=torch.float64).tanh()


def _ddim_from(latents: Tensor, denoiser: Denoiser, steps: int, monkeypatch: pytest.MonkeyPatch,
               **options: Any) -> Tensor:
    """The ``ddim`` sampler started from ``latents`` instead of seeded noise (eta = 0 draws
    nothing else): its noise source is replaced for this call."""

    class GivenNoise:
        def __init__(self, seeds: Any, shape: Any, device: Any = None, dtype: Any = None) -> None:
            pass

        def draw(self) -> Tensor:
            return latents

    with monkeypatch.context() as patch:
        patch.setattr(samplers, "SampleNoise", GivenNoise)
        return samplers.ddim(denoiser, list(range(len(latents))), tuple(latents.shape[1:]),
                             steps=steps, eta=0.0, clip_x0=False, **options)


# ------------------------------------------------------------------------------------------------
# Structure, callback, and diffusers' DDIMInverseScheduler as a reference


def test_inversion_structure_and_callback(tanh_denoiser: VPDenoiser, linear: VPSchedule) -> None:
    x0 = _x0()
    seen: list[dict[str, Any]] = []

    def callback(info: dict[str, Any]) -> int:
        seen.append(info)
        return 10 + info["i"]

    inv = ddim_invert(tanh_denoiser, x0, steps=5, callback=callback)
    assert isinstance(inv, Inversion)
    assert inv.timesteps.tolist() == [0, 200, 400, 600, 800]  # leading grid, ascending
    assert torch.equal(inv.timesteps, linear.timesteps(5, "leading").flip(0))
    assert len(inv.trajectory) == 6 and inv.latents is inv.trajectory[-1]
    assert torch.equal(inv.trajectory[0], x0) and inv.latents.dtype == torch.float64
    assert inv.records == [10, 11, 12, 13, 14]
    assert [s["i"] for s in seen] == list(range(5))
    assert [s["t"] for s in seen] == [0, 200, 400, 600, 800]
    assert all(type(s["t"]) is int for s in seen)
    assert all(s["x"] is inv.trajectory[i + 1] for i, s in enumerate(seen))
    assert torch.equal(seen[0]["denoised"], x0)  # abar = 1 at the start: x0_hat = x0 exactly
    plain = ddim_invert(tanh_denoiser, x0, steps=5)
    assert plain.records == [] and torch.equal(plain.latents, inv.latents)


def test_first_steps_match_hand_computation(tanh_denoiser: VPDenoiser, linear: VPSchedule) -> None:
    """Two steps of the docstring's update by hand (trailing grid for 2 steps: 499, 999)."""
    x0 = _x0()
    abar = linear.alphas_cumprod

    def eps(x: Tensor, t: int) -> Tensor:
        return tanh_denoiser.net(x, torch.full((len(x),), float(t)))

    with torch.no_grad():
        x1 = abar[499].sqrt() * x0 + (1 - abar[499]).sqrt() * eps(x0, 499)
        e = eps(x1, 999)
        x0_hat = (x1 - (1 - abar[499]).sqrt() * e) / abar[499].sqrt()
        x2 = abar[999].sqrt() * x0_hat + (1 - abar[999]).sqrt() * e
    inv = ddim_invert(tanh_denoiser, x0, steps=2, spacing="trailing")
    assert inv.timesteps.tolist() == [499, 999]
    # float64, ~15 operations on |x| < 10, amplified by 1/alpha_499 = 2.2: 1e-13 is ~20x that
    torch.testing.assert_close(inv.trajectory[1], x1, atol=1e-13, rtol=0)
    torch.testing.assert_close(inv.latents, x2, atol=1e-13, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_matches_diffusers_ddim_inverse_scheduler(tanh_denoiser: VPDenoiser, linear: VPSchedule,
                                                  spacing: str, steps: int) -> None:
    """diffusers' loop (``for t in timesteps: x = step(unet(x, t), t, x)``) on our float64 abar
    table (its own is float32), so the two differ by float64 roundoff only. For T % N == 0 its
    "previous timestep" t - T//N is our grid's previous point."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMInverseScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                               clip_sample=False, set_alpha_to_one=True,
                                               timestep_spacing=spacing)
    scheduler.alphas_cumprod = linear.alphas_cumprod.clone()
    scheduler.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    x = x0 = _x0()
    with torch.no_grad():
        for t in scheduler.timesteps:
            e = tanh_denoiser.net(x, t.expand(len(x)).to(torch.float32))
            x = scheduler.step(e, int(t), x).prev_sample
    inv = ddim_invert(tanh_denoiser, x0, steps=steps, spacing=spacing)
    assert inv.timesteps.tolist() == scheduler.timesteps.tolist()
    alpha_min = float(linear.alphas_cumprod[inv.timesteps[-1]].sqrt())
    torch.testing.assert_close(inv.latents, x, atol=f64_tol(steps, alpha_min), rtol=0)


def test_sample_then_invert_round_trip_shrinks_with_steps(tanh_denoiser: VPDenoiser,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a nonlinear model: x_T -> ddim -> x0 -> invert -> x_T'. Each inverted step evaluates eps
    at the other end of the sampler's step, an O(h^2) local error, so |x_T' - x_T| = O(1/N)."""
    x_T = SampleNoise(SEEDS, SHAPE, dtype=torch.float64).draw()
    errors = []
    for steps in (25, 50, 100):
        x0 = _ddim_from(x_T, tanh_denoiser, steps, monkeypatch)
        errors.append((ddim_invert(tanh_denoiser, x0, steps=steps).latents - x_T).abs().max())
    # first order: measured 0.97, 0.50, 0.25 (|x0| < 12)
    assert errors[0] / errors[1] > 1.5 and errors[1] / errors[2] > 1.5


# ------------------------------------------------------------------------------------------------
# Gaussian data: the exact inversion error in closed form


def _gaussian_affine_maps(schedule: VPSchedule, steps: int, mu: float = GAUSS_MU,
                          s: float = GAUSS_S) -> tuple[tuple[float, float], tuple[float, float]]:
    """Error analysis in xbar = x/alpha, sigma = sqrt((1 - abar)/abar) units (Song et al. 2021,
    Eq. 14: DDIM is Euler's method for d xbar = eps d sigma). For Gaussian data the exact eps of a
    state x labelled t is eps = k (x/alpha_t - mu), k = sigma_t/(s^2 + sigma_t^2). With sigma_0 = 0
    (abar_0 = 1), d_i = sigma_i - sigma_{i-1}, rho_i = alpha_{i-1}/alpha_i (the inversion feeds
    the state at level i-1 to eps labelled i):
      inversion step i:  xbar_i = xbar_{i-1} + d_i k_i (rho_i xbar_{i-1} - mu),
      sampler step i:    xbar_{i-1} = xbar_i - d_i k_i (xbar_i - mu).
    Each is affine, so latents = p x0 + q and the round trip x0' = P x0 + Q in closed form; per
    step pair the round trip error is d_i k_i (rho_i - 1) + O(d^2) = O(h^2), in total O(1/N).
    Returns ((p, q), (P, Q)). An independent derivation: scalars in xbar, not the VP tensor code."""
    ts = schedule.timesteps(steps, "leading").flip(0)
    abar = [1.0] + schedule.alphas_cumprod[ts].tolist()
    sig = [math.sqrt((1 - a) / a) for a in abar]
    p, q = 1.0, 0.0  # xbar = p x0 + q
    for i in range(1, steps + 1):
        d, k, rho = sig[i] - sig[i - 1], sig[i] / (s**2 + sig[i] ** 2), math.sqrt(abar[i - 1] /
                                                                                  abar[i])
        p, q = p * (1 + d * k * rho), q * (1 + d * k * rho) - d * k * mu
    latents = (math.sqrt(abar[-1]) * p, math.sqrt(abar[-1]) * q)
    for i in range(steps, 0, -1):
        d, k = sig[i] - sig[i - 1], sig[i] / (s**2 + sig[i] ** 2)
        p, q = p * (1 - d * k), q * (1 - d * k) + d * k * mu
    return latents, (p, q)


def _gaussian_data(seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((GAUSS_BATCH,) + GAUSS_SHAPE, generator=gen, dtype=torch.float64)
    return GAUSS_MU + GAUSS_S * z


def test_invert_then_sample_reconstructs_gaussian_data(linear: VPSchedule,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    den = GaussianDenoiser(linear)
    x0 = _gaussian_data()
    errors = {}
    for steps in (50, 100, 200):
        inv = ddim_invert(den, x0, steps=steps)
        rec = _ddim_from(inv.latents, den, steps, monkeypatch)
        (p, q), (P, Q) = _gaussian_affine_maps(linear, steps)
        alpha_T = float(linear.alphas_cumprod[inv.timesteps[-1]].sqrt())
        tol = f64_tol(2 * steps, alpha_T)
        torch.testing.assert_close(inv.latents, p * x0 + q, atol=tol, rtol=0)
        torch.testing.assert_close(rec, P * x0 + Q, atol=tol, rtol=0)
        # first order: |P - 1| ~ 2.7/N, |Q| ~ 1.6/N on this grid
        assert abs(P - 1) < 3 / steps and abs(Q) < 2 / steps
        errors[steps] = (rec - x0).abs().max().item()
    assert errors[50] / errors[100] > 1.5 and errors[100] / errors[200] > 1.5  # ~2: first order
    # 200 steps: |P - 1| max|x0| + |Q| < 3/200 * 2.8 + 2/200 = 0.052 (|x0| < mu + 5 s); meas. 0.030
    assert errors[200] < 0.052


def test_inverted_gaussian_data_are_standard_normal(linear: VPSchedule) -> None:
    """For x0 ~ N(mu, s^2) the exact probability-flow map ends at x_T ~ N(alpha_T mu,
    abar_T s^2 + 1 - abar_T) = N(0.002, 1.0) at t = 999 (linear schedule); DDIM inversion adds the
    O(1/N) discretisation bias of _gaussian_affine_maps: latents ~ N(p mu + q, (p s)^2)."""
    den = GaussianDenoiser(linear)
    steps = 500
    latents = ddim_invert(den, _gaussian_data(seed=1), steps=steps).latents.flatten()
    (p, q), _ = _gaussian_affine_maps(linear, steps)
    mean_bias, std_bias = p * GAUSS_MU + q, p * GAUSS_S - 1.0
    assert abs(mean_bias) < 0.01 and abs(std_bias) < 0.001  # 500 steps: 5.3e-3, 4.9e-4
    se_mean = 1.0 / math.sqrt(GAUSS_N)
    se_std = 1.0 / math.sqrt(2.0 * (GAUSS_N - 1))
    assert abs(latents.mean().item()) <= SIGMAS_TOL * se_mean + abs(mean_bias)
    assert abs(latents.std().item() - 1.0) <= SIGMAS_TOL * se_std + abs(std_bias)


# ------------------------------------------------------------------------------------------------
# h-space recorder


def _tiny_unet() -> nn.Module:
    unet_mod = pytest.importorskip("debiaslab.nets.unet")
    with torch.random.fork_rng():
        torch.manual_seed(2)
        unet = unet_mod.UNet(1, 1, image_size=8, model_channels=16, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=())
        nn.init.normal_(unet.out[-1].weight, std=0.05)  # the zero-init output would give eps = 0
    return unet.eval()


def test_h_recorder_records_unet_h_per_step(linear: VPSchedule) -> None:
    unet = _tiny_unet()
    den = VPDenoiser(unet, linear)
    x0 = _x0(batch=3, shape=(1, 8, 8)).float()
    plain = ddim_invert(den, x0, steps=4)
    with HRecorder(den.net) as rec:
        assert unet._h_edit_fn is not None
        inv = ddim_invert(den, x0, steps=4, callback=rec)
    assert unet._h_edit_fn is None  # the h_edit is removed on leaving the block
    assert torch.equal(inv.latents, plain.latents)  # recording does not change results
    assert len(inv.records) == 4 and rec.history == inv.records
    with torch.no_grad():
        for i, h in enumerate(inv.records):
            assert h.shape == (3,) + unet.h_shape() and h.device.type == "cpu"
            assert not h.requires_grad
            t = torch.full((3,), float(inv.timesteps[i]))
            _, h_ref = unet(inv.trajectory[i], t, return_h=True)  # h at (x_{t_{i-1}}, t_i)
            assert torch.equal(h, h_ref)
    assert not torch.equal(inv.records[0], inv.records[1])


def test_h_recorder_misuse_is_a_config_error(linear: VPSchedule) -> None:
    unet = _tiny_unet()
    den = VPDenoiser(unet, linear)
    x0 = _x0(batch=2, shape=(1, 8, 8)).float()
    rec = HRecorder(unet)
    with pytest.raises(ConfigError, match="inside") as err:
        ddim_invert(den, x0, steps=2, callback=rec)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="h_edit"):
        HRecorder(nn.Linear(2, 2))
    # an inner h_edit (HSpaceGuidance) wins, so the recorder sees no forward
    with HRecorder(unet) as rec, pytest.raises(ConfigError, match="no forward"):
        ddim_invert(HSpaceGuidance(den, lambda h, t: h), x0, steps=2, callback=rec)
    assert unet._h_edit_fn is None  # restored after the error too
    with pytest.raises(ConfigError, match="already active"):
        with rec, rec:
            pass
    assert unet._h_edit_fn is None


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("x0,steps,spacing,match", [
    (torch.zeros(3, 8, 8), 5, "leading", "x0"),
    (torch.zeros(0, 3, 8, 8), 5, "leading", "x0"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.long), 5, "leading", "x0"),
    ([[0.0]], 5, "leading", "x0"),
    (torch.zeros(2, 3, 8, 8), 0, "leading", "steps"),
    (torch.zeros(2, 3, 8, 8), 1001, "leading", "steps"),
    (torch.zeros(2, 3, 8, 8), 2.5, "leading", "steps"),
    (torch.zeros(2, 3, 8, 8), True, "leading", "steps"),
    (torch.zeros(2, 3, 8, 8), 5, "quadratic", "spacing"),
])
def test_bad_input_is_a_one_line_config_error(tanh_denoiser: VPDenoiser, x0: Any, steps: Any,
                                              spacing: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        ddim_invert(tanh_denoiser, x0, steps=steps, spacing=spacing)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# The Asyrp / Balancing Act convention: eps at the step's start, on the floor grid


def test_current_convention_records_h_at_the_states_the_sampler_meets(linear: VPSchedule
                                                                     ) -> None:
    """eps_at=current: x0 sits at the first grid level, step i evaluates eps(x_{t_i}, t_i), so
    record i is the bottleneck of a direct forward pass of (trajectory[i], t_i), for the first
    N - 1 grid timesteps (balancing_act's 0, 20, ..., 978 for N = 50)."""
    from debiaslab.methods.balancing_act import ba_grid

    unet = _tiny_unet()
    den = VPDenoiser(unet, linear)
    x0 = _x0(batch=2, shape=(1, 8, 8)).float()
    with HRecorder(den.net) as rec:
        inv = ddim_invert(den, x0, steps=50, spacing="floor", eps_at="current", callback=rec)
    assert inv.timesteps.tolist() == ba_grid(50)[:-1] and len(inv.records) == 49
    assert len(inv.trajectory) == 50 and torch.equal(inv.trajectory[0], x0)
    with torch.no_grad():
        for i in (0, 1, 24, 48):
            t = torch.full((2,), float(inv.timesteps[i]))
            _, h_ref = unet(inv.trajectory[i], t, return_h=True)
            assert torch.equal(inv.records[i], h_ref)
    # the step itself: x_{t_1} from x0 at abar_{t_0} with eps(x0, t_0)
    a0, a1 = (float(linear.alphas_cumprod[t]) for t in ba_grid(50)[:2])
    with torch.no_grad():
        eps = unet(x0, torch.zeros(2))
    x0_hat = (x0 - math.sqrt(1 - a0) * eps) / math.sqrt(a0)
    torch.testing.assert_close(inv.trajectory[1], math.sqrt(a1) * x0_hat + math.sqrt(1 - a1) * eps,
                               atol=1e-6, rtol=0)


def test_current_convention_inversion_then_ddim_reconstructs(linear: VPSchedule,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Invert with eps_at=current over the 50-step floor grid, then run the eta = 0 ddim
    sampler on the same grid (999 -> ... -> 0 -> abar = 1) from the latents. On Gaussian data
    (exact eps, float64) the only error is the discretisation: each step pair evaluates eps at
    the two ends of one step, first order in the step. Measured max |x0' - x0| (|x0| < 2.3):
    0.441, 0.229, 0.117 at 25, 50, 100 steps (mean 0.043 at 50), about 1.75x the eps_at=target
    inversion's 0.264, 0.130, 0.065, whose eps mismatch is one step's end only. The error halves
    with the step count and stays below 1.25x the measured one at 50 steps (float64 roundoff is
    ~1e-12 here, so the margin is for the grid, not for the machine)."""
    import debiaslab.methods.balancing_act  # noqa: F401  (registers the floor spacing)

    den = GaussianDenoiser(linear)
    x0 = _gaussian_data(seed=2)
    errors = {}
    for steps in (25, 50, 100):
        inv = ddim_invert(den, x0, steps=steps, spacing="floor", eps_at="current")
        rec = _ddim_from(inv.latents, den, steps, monkeypatch, spacing="floor")
        errors[steps] = (rec - x0).abs().max().item()
    assert errors[25] / errors[50] > 1.6 and errors[50] / errors[100] > 1.6
    assert errors[50] < 1.25 * 0.229


def test_current_convention_needs_two_grid_points(tanh_denoiser: VPDenoiser) -> None:
    with pytest.raises(ConfigError, match="eps_at=current needs steps >= 2"):
        ddim_invert(tanh_denoiser, _x0(), steps=1, eps_at="current")
    with pytest.raises(ConfigError, match="eps_at: target or current, got 'middle'"):
        ddim_invert(tanh_denoiser, _x0(), steps=4, eps_at="middle")
