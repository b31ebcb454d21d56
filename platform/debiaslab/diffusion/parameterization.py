"""Prediction targets eps, x0 and v, with exact conversions (docs/algorithms.md §5.1).

With x_t = a x0 + s eps (a = alpha_t, s = sigma_t, a^2 + s^2 = 1) and v = a eps - s x0
(Salimans & Ho 2022, Eq. 11-12):
  x0 = (x_t - s eps)/a = a x_t - s v,     eps = (x_t - a x0)/s = s x_t + a v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from debiaslab.registry import Registry

TARGETS: Registry = Registry("prediction target")


@dataclass(frozen=True)
class Target:
    """A prediction target: how to build it, and how to turn a prediction of it into eps / x0.

    ``eps_error_factor(snr)`` is the factor f with ||eps - eps_hat||^2 = f(SNR) ||y - y_hat||^2 for
    this target y, the identity that makes weightings comparable across targets
    (docs/algorithms.md §5.2).
    """

    name: str
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, eps, a, s) -> y
    to_eps: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (y_hat, x_t, a, s) -> eps_hat
    to_x0: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (y_hat, x_t, a, s) -> x0_hat
    eps_error_factor: Callable[[Tensor], Tensor]  # SNR -> f


def _eps_from_x0(x0: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - a * x0) / s


def _x0_from_eps(eps: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - s * eps) / a


EPS = TARGETS.register("eps")(Target(
    name="eps",
    target=lambda x0, eps, a, s: eps,
    to_eps=lambda y, x_t, a, s: y,
    to_x0=_x0_from_eps,
    eps_error_factor=lambda snr: snr.new_ones(snr.shape),
))

X0 = TARGETS.register("x0")(Target(
    name="x0",
    target=lambda x0, eps, a, s: x0,
    to_eps=_eps_from_x0,
    to_x0=lambda y, x_t, a, s: y,
    eps_error_factor=lambda snr: snr,  # eps err = (a/s) x0 err
))

V = TARGETS.register("v")(Target(
    name="v",
    target=lambda x0, eps, a, s: a * eps - s * x0,
    to_eps=lambda v, x_t, a, s: s * x_t + a * v,
    to_x0=lambda v, x_t, a, s: a * x_t - s * v,
    eps_error_factor=lambda snr: snr / (1.0 + snr),  # eps err = a v err, a^2 = SNR/(1+SNR)
))


def eps_to_v(eps: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """v = a eps - s x0 = (eps - s x_t) / a."""
    return (eps - s * x_t) / a


def convert(y: Tensor, source: str, dest: str, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Convert a prediction of target ``source`` into target ``dest`` at the same x_t."""
    eps = TARGETS.get(source).to_eps(y, x_t, a, s)
    x0 = TARGETS.get(source).to_x0(y, x_t, a, s)
    return TARGETS.get(dest).target(x0, eps, a, s)
