"""Guidance wraps a denoiser in another denoiser, so samplers need no guidance flags.

Three kinds cover the methods: a gradient term from a classifier on x_t (classifier / minority
guidance), a combination of conditional and unconditional predictions (CFG, CBDM), and an edit of
the UNet's h-space bottleneck during the forward pass (distribution guidance, Balancing Act).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.registry import Registry

GUIDANCE: Registry = Registry("guidance")

LogProbFn = Callable[..., Tensor]  # (x_t, t, **cond) -> log p(target | x_t) [B]
HEditFn = Callable[[Tensor, Tensor], Tensor]  # (h, t) -> h'


class Guided(Denoiser):
    """Base for wrappers: delegates ``schedule`` and ``net`` to the inner denoiser."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.schedule = inner.schedule
        self.net = inner.net


@GUIDANCE.register("classifier")
class ClassifierGuidance(Guided):
    """Dhariwal & Nichol 2021, Algorithm 2 / Eq. 14 in eps form:
    eps' = eps - w sigma_t grad_{x_t} log p(y | x_t, t)."""

    def __init__(self, inner: Denoiser, log_prob: LogProbFn, scale: float) -> None:
        super().__init__(inner)
        self.log_prob = log_prob
        self.scale = scale

    def gradient(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """grad_{x_t} log p(y | x_t, t), computed with autograd even inside torch.no_grad()."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x, t, **cond).sum(), x)
        return grad

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        eps = self.inner(x_t, t, **cond)
        if self.scale == 0:
            return eps
        _, s = self.schedule.alpha_sigma(torch.as_tensor(t).reshape(-1).expand(len(x_t)), x_t)
        return eps - self.scale * s * self.gradient(x_t, t, **cond)


@GUIDANCE.register("cfg")
class ClassifierFreeGuidance(Guided):
    """Ho & Salimans 2022, Eq. 6 (CBDM's form, ALGORITHMS §4.3):
    eps~ = (1 + omega) eps(x_t, y) - omega eps(x_t, null). One batched forward for both halves."""

    def __init__(self, inner: Denoiser, omega: float, null_label: int) -> None:
        super().__init__(inner)
        self.omega = omega
        self.null_label = null_label

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        y = cond.pop("y", None)
        if y is None or self.omega == 0:
            return self.inner(x_t, t, y=y, **cond)
        t = torch.as_tensor(t).reshape(-1).expand(len(x_t))
        null = torch.full_like(y, self.null_label)
        both = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in cond.items()}
        eps = self.inner(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **both)
        eps_cond, eps_uncond = eps.chunk(2)
        return (1 + self.omega) * eps_cond - self.omega * eps_uncond


@GUIDANCE.register("h_edit")
class HSpaceGuidance(Guided):
    """Edits the UNet bottleneck h_t during the forward pass (Parihar et al. 2024, §3.5 form):
    the decoder runs on ``edit(h, t)`` with the original skip connections."""

    def __init__(self, inner: Denoiser, edit: HEditFn) -> None:
        super().__init__(inner)
        self.edit = edit

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with self.net.h_edit(self.edit):
            return self.inner(x_t, t, **cond)
