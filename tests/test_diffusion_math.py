"""Schedules, prediction-target conversions and the weighting identities of
docs/algorithms.md §5.2."""

import math

import pytest
import torch

import debiaslab.methods  # noqa: F401  (registers the debias weighting)
from debiaslab.diffusion.denoiser import EDMDenoiser, EDMPrecond, VPDenoiser
from debiaslab.diffusion.losses import DenoisingLoss, EDMLoss
from debiaslab.diffusion.parameterization import TARGETS, convert, eps_to_v
from debiaslab.diffusion.schedules import build_schedule, karras_sigmas
from debiaslab.diffusion.weighting import WEIGHTINGS, build_weighting
from debiaslab.errors import ConfigError


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def linear():
    return build_schedule("linear")


def test_linear_schedule_matches_ho_et_al(linear):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(linear.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert torch.allclose(linear.betas, betas)
    snr = linear.snr(torch.arange(1000))
    # docs/algorithms.md §5.2: SNR ranges ~4e-5 .. 9999 for this schedule
    assert 3.5e-5 < snr[-1] < 4.5e-5 and 9998 < snr[0] < 10000


def test_cosine_schedule_matches_nichol_dhariwal():
    sch = build_schedule("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 990]:
        assert sch.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sch.betas.max() <= 0.999 + 1e-12


def test_fractional_t_interpolates_and_inverts(linear):
    t = torch.tensor([0.0, 3.0, 3.5, 500.25, 999.0])
    abar = linear.abar(t)
    assert abar[1] == linear.alphas_cumprod[3] and abar[4] == linear.alphas_cumprod[999]
    assert linear.alphas_cumprod[4] < abar[2] < linear.alphas_cumprod[3]
    sigma = ((1 - abar) / abar).sqrt()
    assert torch.allclose(linear.t_from_sigma(sigma), t, atol=1e-9)


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_respacing(linear, spacing, expected):
    assert linear.timesteps(10, spacing).tolist() == expected


def test_respacing_errors(linear):
    with pytest.raises(ConfigError):
        linear.timesteps(0)
    with pytest.raises(ConfigError):
        linear.timesteps(1001)
    with pytest.raises(ConfigError):
        linear.timesteps(10, "middle")


def test_karras_sigmas():
    s = karras_sigmas(18)
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1] == 0 and (s[:-1].diff() < 0).all()


def _random_state(linear, n=64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 3, 4, 4, generator=g)
    eps = torch.randn(n, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    a, s = linear.alpha_sigma(t, x0)
    return x0, eps, t, a, s, a * x0 + s * eps


def test_target_conversions_are_exact(linear):
    x0, eps, _, a, s, x_t = _random_state(linear)
    v = a * eps - s * x0
    for name, y in {"eps": eps, "x0": x0, "v": v}.items():
        tgt = TARGETS.get(name)
        assert torch.allclose(tgt.target(x0, eps, a, s), y)
        assert torch.allclose(tgt.to_eps(y, x_t, a, s), eps, atol=1e-8)
        assert torch.allclose(tgt.to_x0(y, x_t, a, s), x0, atol=1e-6)
        for dest, y_dest in {"eps": eps, "x0": x0, "v": v}.items():
            assert torch.allclose(convert(y, name, dest, x_t, a, s), y_dest, atol=1e-6)
    assert torch.allclose(eps_to_v(eps, x_t, a, s), v, atol=1e-8)


@pytest.mark.parametrize("weighting,params", [
    ("constant", {}), ("snr", {}), ("min_snr", {"gamma": 5.0}), ("p2", {"gamma": 1.0, "k": 1.0}),
    ("debias", {}), ("edm", {"sigma_data": 0.5}),
])
def test_weighting_identities_hold_for_every_target(linear, weighting, params):
    """lambda_eps ||eps - eps^||^2 == lambda_y ||y - y^||^2 for y in {x0, v}
    (docs/algorithms.md §5.2)."""
    x0, eps, t, a, s, x_t = _random_state(linear)
    eps_hat = eps + 0.3 * torch.randn_like(eps)  # any prediction, expressed in every target
    x0_hat = TARGETS.get("eps").to_x0(eps_hat, x_t, a, s)
    w = build_weighting(weighting, **params)
    snr = linear.snr(t)
    losses = {}
    for name in ["eps", "x0", "v"]:
        tgt = TARGETS.get(name)
        y, y_hat = tgt.target(x0, eps, a, s), tgt.target(x0_hat, eps_hat, a, s)
        losses[name] = w(snr, name) * ((y - y_hat) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses["x0"], losses["eps"], rtol=1e-6)
    assert torch.allclose(losses["v"], losses["eps"], rtol=1e-6)


def test_debias_weights_closed_forms(linear):
    snr = linear.snr(torch.arange(1000))
    w = WEIGHTINGS.get("debias")()
    assert torch.allclose(w(snr, "eps"), 1 / snr.sqrt())
    assert torch.allclose(w(snr, "x0"), snr.sqrt())
    assert torch.allclose(w(snr, "v"), snr.sqrt() / (1 + snr))
    assert torch.allclose(w(snr, "x0", apply="as_is"), 1 / snr.sqrt())  # the released code's FLAG
    lo, hi = w(snr, "eps").min().item(), w(snr, "eps").max().item()
    assert 0.0099 < lo < 0.0101 and 150 < hi < 160  # "range ~0.01 .. 157"
    ms = WEIGHTINGS.get("min_snr")(gamma=5.0)
    assert torch.allclose(ms(snr, "x0"), snr.clamp(max=5))
    assert torch.allclose(ms(snr, "v"), snr.clamp(max=5) / (snr + 1))
    p2 = WEIGHTINGS.get("p2")(gamma=1.0, k=1.0)
    assert torch.allclose(p2(snr, "eps"), 1 / (1 + snr))
    edm = WEIGHTINGS.get("edm")(sigma_data=0.5)
    sigma2 = 1 / snr
    assert torch.allclose(edm(snr, "x0"), (sigma2 + 0.25) / (sigma2 * 0.25))


def test_weighting_bad_params():
    with pytest.raises(ConfigError):
        build_weighting("p2", gamma=1.0, kk=2.0)
    with pytest.raises(ConfigError):
        build_weighting("min_snr", gamma=-1.0)


class Affine(torch.nn.Module):
    """A toy net F(x, t) = c x (t-independent) used to check losses by hand."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, t, **_):
        return self.c * x


def test_denoising_loss_is_per_sample_and_hand_computed(linear):
    x0, eps, t, a, s, x_t = _random_state(linear, n=8)
    loss = DenoisingLoss(linear, "eps", build_weighting("debias"))
    out = loss(Affine(0.5), x0, t, eps)
    assert out.shape == (8,)
    expected = (0.5 * x_t - eps).pow(2).flatten(1).mean(1) / linear.snr(t).sqrt()
    assert torch.allclose(out, expected)


def test_edm_precond_and_loss_hand_computed(linear):
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 50.0])
    loss = EDMLoss(linear)
    model = loss.wrap(Affine(0.0))  # F = 0 -> D(x) = c_skip x
    out = loss(model, x0, sigma, n)
    sd2 = 0.25
    c_skip = (sd2 / (sigma**2 + sd2)).view(-1, 1, 1, 1)
    lam = (sigma**2 + sd2) / (sigma**2 * sd2)
    expected = lam * ((c_skip * (x0 + sigma.view(-1, 1, 1, 1) * n) - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(out, expected)
    # the EDM denoiser in VP-eps form agrees with its direct D path
    den = EDMDenoiser(EDMPrecond(Affine(0.3)), linear)
    t = torch.tensor([10.0, 300.0, 700.0, 999.0])
    abar = linear.abar(t)
    sig = ((1 - abar) / abar).sqrt()
    x_t = torch.randn(4, 1, 2, 2, generator=g)
    D = den.denoise_edm(x_t / abar.sqrt().view(-1, 1, 1, 1), sig)
    assert torch.allclose(den.x0(x_t, t), D, atol=1e-8)


def test_vp_denoiser_targets_agree(linear):
    """The same underlying predictor expressed as x0 or v gives the same eps through VPDenoiser."""
    x0, eps, t, a, s, x_t = _random_state(linear, n=8)

    class Oracle(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, tt, **_):
            return TARGETS.get(self.name).target(x0, eps, a, s)

    for name in ["eps", "x0", "v"]:
        assert torch.allclose(VPDenoiser(Oracle(name), linear, name)(x_t, t), eps, atol=1e-6)
