"""Denoising losses. Each returns a per-sample vector [B]; only the training loop reduces it.

A loss also owns its noise-level distribution (``sample_noise_level``), knows how to wrap a
trained network as a sampling :class:`~debiaslab.diffusion.denoiser.Denoiser`, and may hold frozen
pretrained modules (``frozen_modules``) that the trainer keeps out of training and checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from debiaslab.diffusion.denoiser import Denoiser, EDMDenoiser, EDMPrecond, VPDenoiser
from debiaslab.diffusion.parameterization import TARGETS
from debiaslab.diffusion.schedules import VPSchedule, build_schedule
from debiaslab.diffusion.weighting import Weighting, build_weighting
from debiaslab.registry import Registry

LOSSES: Registry = Registry("loss")


def mean_per_sample(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


class DiffusionLoss:
    """Interface: noise levels, per-sample loss, and the matching sampling denoiser."""

    schedule: VPSchedule

    def wrap(self, net: nn.Module) -> nn.Module:
        """The module that is trained (e.g. EDM preconditioning around the raw network)."""
        return net

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Pretrained modules this loss evaluates but never trains (e.g. TIW-DSM's time-dependent
        discriminator). The trainer moves them to its device, sets ``requires_grad_(False)`` and
        ``eval()``, and keeps them out of DDP, the optimizer, the EMA and the checkpoint: the loss
        must rebuild them from its config (e.g. load their own checkpoint) in ``from_config``."""
        return {}

    def setup(self, class_counts: Tensor, null_label: int | None) -> None:
        """Called once by the trainer with the training set's per-class counts and the
        network's null label (None for an unconditional network)."""

    def draw_inputs(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Extra per-sample loss inputs for a global batch of `batch`, drawn from the trainer's
        per-step generator (the trainer hands each rank its slice)."""
        return {}

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x0: Tensor, level: Tensor, noise: Tensor,
                 **cond: Any) -> Tensor:
        raise NotImplementedError

    def denoiser(self, model: nn.Module) -> Denoiser:
        raise NotImplementedError

    @classmethod
    def sampling_model(cls, cfg: Any, net: nn.Module) -> tuple[nn.Module, Denoiser]:
        """(the module whose weights a checkpoint holds, its sampling denoiser) for a raw
        network, WITHOUT building the loss: sampling never constructs training-only state such
        as frozen modules. Default: the VP eps/x0/v parameterization of ``cfg.diffusion``."""
        d = cfg.diffusion
        return net, VPDenoiser(net, build_schedule(d.schedule, d.num_timesteps), d.target)


@LOSSES.register("denoising")
class DenoisingLoss(DiffusionLoss):
    """Ho et al. 2020, Eq. 14 generalised: L = lambda(SNR_t) ||y - F(x_t, t)||^2, y in {eps, x0, v},
    t ~ U{0..T-1}, x_t = alpha_t x0 + sigma_t eps; lambda from the weighting registry (§5.2)."""

    def __init__(self, schedule: VPSchedule, target: str, weighting: Weighting,
                 apply: str = "equivalent") -> None:
        self.schedule = schedule
        self.target = TARGETS.get(target)
        self.weighting = weighting
        self.apply = apply

    @classmethod
    def from_config(cls, cfg: Any) -> "DenoisingLoss":
        diffusion = cfg.diffusion
        return cls(build_schedule(diffusion.schedule, diffusion.num_timesteps), diffusion.target,
                   build_weighting(diffusion.weighting, **diffusion.weighting_params),
                   diffusion.weighting_apply)

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.schedule.num_timesteps, (batch,), generator=generator)

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, s = self.schedule.alpha_sigma(t, x0)
        return a * x0 + s * noise, a, s

    def weight(self, t: Tensor, like: Tensor) -> Tensor:
        w = self.weighting(self.schedule.snr(t), self.target.name, self.apply)  # type: ignore[arg-type]
        return w.to(like.device, like.dtype)

    def __call__(self, model: nn.Module, x0: Tensor, level: Tensor, noise: Tensor,
                 **cond: Any) -> Tensor:
        x_t, a, s = self.noisy(x0, level, noise)
        out = model(x_t, level.to(x0.device, torch.float32), **cond)
        y = self.target.target(x0, noise, a, s)
        mse = mean_per_sample((out.float() - y) ** 2)
        return self.weight(level, mse) * mse

    def denoiser(self, model: nn.Module) -> Denoiser:
        return VPDenoiser(model, self.schedule, self.target.name)


@LOSSES.register("edm")
class EDMLoss(DiffusionLoss):
    """Karras et al. 2022, Eq. 8 / Table 1: ln sigma ~ N(P_mean, P_std^2),
    L = lambda(sigma) ||D(y + sigma n; sigma) - y||^2, lambda = (sigma^2 + sd^2)/(sigma sd)^2."""

    def __init__(self, schedule: VPSchedule, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_data: float = 0.5) -> None:
        self.schedule = schedule
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    @classmethod
    def from_config(cls, cfg: Any) -> "EDMLoss":
        diffusion = cfg.diffusion
        return cls(build_schedule(diffusion.schedule, diffusion.num_timesteps),
                   diffusion.edm_p_mean, diffusion.edm_p_std, diffusion.sigma_data)

    def wrap(self, net: nn.Module) -> nn.Module:
        return EDMPrecond(net, self.sigma_data)

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> Tensor:
        return (self.p_mean + self.p_std * torch.randn(batch, generator=generator)).exp()

    def __call__(self, model: nn.Module, x0: Tensor, level: Tensor, noise: Tensor,
                 **cond: Any) -> Tensor:
        sigma = level.to(x0.device, x0.dtype)
        view = (-1,) + (1,) * (x0.ndim - 1)
        D_x = model(x0 + sigma.view(view) * noise, sigma, **cond)
        return self.loss_weight(sigma) * mean_per_sample((D_x.float() - x0) ** 2)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoiser(self, model: nn.Module) -> Denoiser:
        precond = model if isinstance(model, EDMPrecond) else EDMPrecond(model, self.sigma_data)
        return EDMDenoiser(precond, self.schedule)

    @classmethod
    def sampling_model(cls, cfg: Any, net: nn.Module) -> tuple[nn.Module, Denoiser]:
        d = cfg.diffusion
        precond = EDMPrecond(net, d.sigma_data)
        return precond, EDMDenoiser(precond, build_schedule(d.schedule, d.num_timesteps))


def build_loss(cfg: Any) -> DiffusionLoss:
    """Build the configured loss of an ExperimentConfig (``diffusion.loss`` names a LOSSES
    entry; method losses read their own config section, e.g. ``cbdm``). Method losses are
    registered by the method plugins (debiaslab.plugins.load, run at every entry point)."""
    return LOSSES.get(cfg.diffusion.loss).from_config(cfg)
