"""The denoiser interface every sampler calls, and adapters from networks to it.

A :class:`Denoiser` maps a VP state x_t and (possibly fractional) original timesteps t [B] to an
eps prediction. Samplers only ever see this interface; guidance (guidance.py) wraps a denoiser in
another denoiser. EDM-space samplers use :meth:`Denoiser.denoise_edm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from debiaslab.diffusion.parameterization import TARGETS
from debiaslab.diffusion.schedules import VPSchedule

EDM_SIGMA_DATA = 0.5
# c_noise = ln(sigma)/4 is multiplied by this before the sinusoidal embedding
EDM_TIME_SCALE = 250.0


class Denoiser:
    """Base class: ``denoiser(x_t, t, **cond) -> eps_hat``; ``schedule`` and ``net`` attributes."""

    schedule: VPSchedule
    net: nn.Module

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        raise NotImplementedError

    def mean_shift(self, x_t: Tensor, t: Tensor, variance: Tensor, **cond: Any) -> Tensor | None:
        """Shift of the ancestral (DDPM) step's mean, or None for no shift (the default).

        Guidance components that act on the ancestral mean instead of on eps override it:
        Dhariwal & Nichol 2021, Algorithm 1 (guided-diffusion's ``condition_mean``),
        mu' = mu + s Sigma grad_{x_t} log p(y | x_t), returns s * variance * grad. ``x_t`` is the
        state before the step, ``t`` [B] its original timestep indices, ``variance`` the
        per-sample variance of the step's noise as a tensor broadcastable to x_t ([B, 1, 1, 1];
        0 at the last fixed_small step). The ``ddpm`` sampler calls it at every step, inside
        torch.no_grad() (take gradients under torch.enable_grad(), like ClassifierGuidance).
        """
        return None

    def x0(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Tweedie estimate x0_hat = (x_t - sigma_t eps_hat) / alpha_t."""
        a, s = self.schedule.alpha_sigma(t, x_t)
        return (x_t - s * self(x_t, t, **cond)) / a

    def denoise_edm(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """D(x; sigma) in EDM/VE units: x = x_t / alpha_t,
        D = x - sigma eps_hat(alpha x, t(sigma))."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = self.schedule.t_from_sigma(sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        sig = sigma.to(x.device, x.dtype).view(shape)
        x_t = x / (1.0 + sig**2).sqrt()
        return x - sig * self(x_t, t, **cond)


class VPDenoiser(Denoiser):
    """A network trained on the discrete VP process, predicting ``target`` in {eps, x0, v}."""

    def __init__(self, net: nn.Module, schedule: VPSchedule, target: str = "eps") -> None:
        self.net = net
        self.schedule = schedule
        self.target = TARGETS.get(target)

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        out = self.net(x_t, t.to(x_t.device, torch.float32), **cond)
        a, s = self.schedule.alpha_sigma(t, x_t)
        return self.target.to_eps(out, x_t, a, s)


class EDMPrecond(nn.Module):
    """Karras et al. 2022, Table 1 (preconditioning):
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    with c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
    c_in = 1/sqrt(sigma^2+sd^2),
    c_noise = ln(sigma)/4 (scaled by ``time_scale`` for our sinusoidal time embedding)."""

    def __init__(self, net: nn.Module, sigma_data: float = EDM_SIGMA_DATA,
                 time_scale: float = EDM_TIME_SCALE) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.time_scale = time_scale

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        view = (-1,) + (1,) * (x.ndim - 1)
        F_x = self.net(c_in.view(view) * x, self.time_scale * c_noise, **cond)
        return c_skip.view(view) * x + c_out.view(view) * F_x


class EDMDenoiser(Denoiser):
    """Adapts an :class:`EDMPrecond` model to the VP eps interface (and keeps its direct D path)."""

    def __init__(self, precond: EDMPrecond, schedule: VPSchedule) -> None:
        self.precond = precond
        self.net = precond.net
        self.schedule = schedule

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        a, s = self.schedule.alpha_sigma(t, x_t)
        sigma = s / a
        x = x_t / a
        return (x - self.precond(x, sigma.reshape(-1), **cond)) / sigma

    def denoise_edm(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return self.precond(x, sigma, **cond)
