"""Noise schedules: discrete VP (linear, cosine) with timestep respacing, and EDM sigmas.

Conventions (docs/algorithms.md §0): x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t); SNR_t = abar_t / (1 - abar_t); the EDM/VE noise level of step t is
sigma_edm(t) = sigma_t / alpha_t = sqrt(1/SNR_t), and x_ve = x_t / alpha_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from debiaslab.errors import ConfigError
from debiaslab.registry import Registry

SCHEDULES: Registry = Registry("noise schedule")
SPACINGS: Registry = Registry("timestep spacing")

DEFAULT_NUM_TIMESTEPS = 1000
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
COSINE_OFFSET_S = 0.008
COSINE_MAX_BETA = 0.999


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A discrete variance-preserving schedule given by its cumulative products abar_t, t=0..T-1."""

    alphas_cumprod: Tensor  # float64, [T]
    name: str = "custom"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def betas(self) -> Tensor:
        prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    @property
    def sigmas_edm(self) -> Tensor:
        """sigma_edm(t) = sqrt((1 - abar_t) / abar_t), increasing in t."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def abar(self, t: Tensor) -> Tensor:
        """abar at (possibly fractional) timesteps t [B], float64.

        Integer t index the table exactly; fractional t interpolate log sigma_edm linearly, the
        inverse of :meth:`t_from_sigma` (k-diffusion's convention).
        """
        t = torch.as_tensor(t, dtype=torch.float64, device="cpu").clamp(0, self.num_timesteps - 1)
        log_sigma = self.sigmas_edm.log()
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo.to(torch.float64)
        ls = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
        return torch.where(w == 0, self.alphas_cumprod[lo], 1.0 / (1.0 + (2 * ls).exp()))

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) at timesteps t [B], shaped [B,1,...] to broadcast against ``like``."""
        abar = self.abar(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().to(like.device, like.dtype).view(shape)
        sigma = (1.0 - abar).sqrt().to(like.device, like.dtype).view(shape)
        return alpha, sigma

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t = abar_t / (1 - abar_t), float64 [B]."""
        abar = self.abar(t)
        return abar / (1.0 - abar)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Continuous timestep whose sigma_edm equals ``sigma`` (log-sigma interpolation)."""
        log_sigmas = self.sigmas_edm.log()
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device="cpu").log().reshape(-1)
        log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return lo.to(torch.float64) + w

    def timesteps(self, num_steps: int, spacing: str = "leading") -> Tensor:
        """Respaced original timestep indices, descending (first = noisiest), as int64
        [num_steps]."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ConfigError(
                f"sampling steps must be in 1..{self.num_timesteps}, got {num_steps}"
            )
        ts = SPACINGS.get(spacing)(self.num_timesteps, num_steps)
        return torch.as_tensor(ts, dtype=torch.long).flip(0)


@SCHEDULES.register("linear")
def linear_schedule(
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    beta_start: float = LINEAR_BETA_START,
    beta_end: float = LINEAR_BETA_END,
) -> VPSchedule:
    """Ho et al. 2020: beta_t = linspace(beta_start, beta_end, T) (scaled to T=1000 defaults)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1.0 - betas, 0), name="linear")


@SCHEDULES.register("cosine")
def cosine_schedule(num_timesteps: int = DEFAULT_NUM_TIMESTEPS, s: float = COSINE_OFFSET_S,
                    **_: float) -> VPSchedule:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2,
    with betas clipped at 0.999 (the same discretisation as diffusers' squaredcos_cap_v2)."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), COSINE_MAX_BETA)
             for i in range(num_timesteps)]
    betas_t = torch.tensor(betas, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1.0 - betas_t, 0), name="cosine")


@SPACINGS.register("leading")
def leading_spacing(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' default for DDPM/DDIM: 0, k, 2k, ... with k = T // N."""
    step = num_timesteps // num_steps
    return [i * step for i in range(num_steps)]


@SPACINGS.register("trailing")
def trailing_spacing(num_timesteps: int, num_steps: int) -> list[int]:
    """Lin et al. 2024 ("Common diffusion noise schedules are flawed"): always includes T-1.

    diffusers' grid bit for bit: round(arange(T, 0, -T/N)) - 1 with numpy's arange arithmetic
    (x_i = T + i (x_1 - x_0), x_1 = fl(T - T/N)) and round half to even. For some N (e.g. 61)
    numpy's arange yields an (N+1)-th value ~1e-13 that diffusers turns into t = -1; we keep N.
    """
    delta = (num_timesteps - num_timesteps / num_steps) - num_timesteps  # numpy arange's fill
    return [round(num_timesteps + i * delta) - 1 for i in reversed(range(num_steps))]


@SPACINGS.register("linspace")
def linspace_spacing(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "linspace" grid bit for bit: np.linspace(0, T-1, N).round(), i.e. round(i * step)
    with step = fl((T-1)/(N-1)) in float64 (numpy's linspace arithmetic), the last point exactly
    T-1, and round half to even. Not the exact rational round(i (T-1)/(N-1)): numpy's rounded
    step breaks ties such as 15 * 999/30 = 499.5 (-> 499.49999999999994 -> 499, where the exact
    tie would round to 500), which moves one timestep for ~9% of the step counts.
    N = 1 gives [T-1] (diffusers' DDIM/DDPM would give [0], a useless one-step grid).
    guided-diffusion's space_timesteps("N") accumulates the step instead (and gives [0] at N = 1),
    so it agrees with this grid only for most N, not all."""
    if num_steps == 1:
        return [num_timesteps - 1]
    step = (num_timesteps - 1) / (num_steps - 1)
    return [round(i * step) for i in range(num_steps - 1)] + [num_timesteps - 1]


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, Eq. 5:
    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    descending, with a final 0 appended (N+1 values, float64)."""
    if num_steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sig = (sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho))
    return torch.cat([sig**rho, torch.zeros(1, dtype=torch.float64)])


def build_schedule(name: str, num_timesteps: int = DEFAULT_NUM_TIMESTEPS) -> VPSchedule:
    """Look up a schedule by its config name."""
    return SCHEDULES.get(name)(num_timesteps)


def respaced_timestep(index: int, respacing: int, num_timesteps: int) -> int:
    """The original timestep of step ``index`` of guided-diffusion's ``space_timesteps(T,
    "N")`` chain (one section): the stride (T-1)/(N-1) is accumulated from 0 and each partial
    sum rounded (half to even). Minority Guidance (docs/algorithms.md §1.2) perturbs at step
    60 of 100 of T = 1000: t = 605."""
    if not 0 <= index < respacing <= num_timesteps:
        raise ConfigError(f"respaced timestep: need 0 <= index < respacing <= T, got {index}, "
                          f"{respacing}, {num_timesteps}")
    if respacing == 1:
        return 0
    stride = (num_timesteps - 1) / (respacing - 1)
    position = 0.0
    for _ in range(index):
        position += stride
    return round(position)
