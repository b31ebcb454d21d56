"""Timestep loss weightings, multiplied onto a per-sample loss vector (docs/algorithms.md §5.2).

Every weighting is defined by its weight lambda(SNR) on the eps-prediction error
||eps - eps_hat||^2. For another target y the *equivalent* weight is lambda(SNR) f_y(SNR), with
f_y from :class:`~debiaslab.diffusion.parameterization.Target` (x0: SNR, v: SNR/(1+SNR)), so the
objective is the same whatever the network predicts. ``apply="as_is"`` instead multiplies the
target's MSE by lambda directly, as the Debias reference code does for every target ([FLAG] §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from debiaslab.diffusion.parameterization import TARGETS
from debiaslab.errors import ConfigError
from debiaslab.registry import Registry

WEIGHTINGS: Registry = Registry("loss weighting")

ApplyMode = Literal["equivalent", "as_is"]


class Weighting:
    """Base: ``eps_weight(snr)`` gives lambda on the eps error; ``__call__`` the target's weight."""

    def eps_weight(self, snr: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, snr: Tensor, target: str = "eps", apply: ApplyMode = "equivalent") -> Tensor:
        lam = self.eps_weight(snr)
        if apply == "as_is":
            return lam
        if apply != "equivalent":
            raise ConfigError(f"unknown weighting apply mode {apply!r}; allowed: as_is, equivalent")
        return lam * TARGETS.get(target).eps_error_factor(snr)


@WEIGHTINGS.register("constant")
@dataclass
class Constant(Weighting):
    """Ho et al. 2020, Eq. 14 ("L_simple"): lambda_t = 1 on the eps error."""

    def eps_weight(self, snr: Tensor) -> Tensor:
        return snr.new_ones(snr.shape)


@WEIGHTINGS.register("snr")
@dataclass
class SNRWeighting(Weighting):
    """lambda_t = 1/SNR_t on the eps error, i.e. the constant-weight x0 loss
    (docs/algorithms.md §5.2)."""

    def eps_weight(self, snr: Tensor) -> Tensor:
        return 1.0 / snr


@WEIGHTINGS.register("min_snr")
@dataclass
class MinSNR(Weighting):
    """Hang et al. 2023 (Min-SNR-gamma), eps form: lambda_t = min(SNR_t, gamma) / SNR_t."""

    gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ConfigError(f"min_snr gamma must be > 0, got {self.gamma}")

    def eps_weight(self, snr: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma) / snr


@WEIGHTINGS.register("p2")
@dataclass
class P2(Weighting):
    """Choi et al. 2022 (perception-prioritized), Eq. 8: lambda_t = 1 / (k + SNR_t)^gamma."""

    gamma: float = 1.0
    k: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"p2 k must be >= 0, got {self.k}")

    def eps_weight(self, snr: Tensor) -> Tensor:
        return 1.0 / (self.k + snr) ** self.gamma


@WEIGHTINGS.register("edm")
@dataclass
class EDMWeighting(Weighting):
    """Karras et al. 2022, Eq. 8/Table 1: lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 on the
    denoiser (x0) error; with sigma^2 = 1/SNR that is 1 + 1/(SNR sd^2) on the eps error."""

    sigma_data: float = 0.5

    def eps_weight(self, snr: Tensor) -> Tensor:
        return 1.0 + 1.0 / (snr * self.sigma_data**2)


def build_weighting(name: str, **params: float) -> Weighting:
    """Build a weighting from its config name and parameters (unknown parameters are errors)."""
    cls = WEIGHTINGS.get(name)
    try:
        return cls(**params)
    except TypeError:
        raise ConfigError(
            f"weighting {name!r} does not take parameters {sorted(params)}"
        ) from None
