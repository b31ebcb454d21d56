"""Balancing Act: distribution-guided debiasing in h-space (Parihar et al., CVPR 2024).

This first part holds the method's math, each function one equation of the paper or its released
code (docs/algorithms.md §3 restates them):

- :func:`ba_grid`: the 50-step DDIM grid tau_k = floor(k (T - 1) / (n - 1)) (§3.2), which is not
  our respacing rule;
- :func:`attribute_probs`: softmax(logits / T) with the released temperature T = 8 (§3.3);
- :func:`sample_guidance_loss`: L_s = -sum_i p_i[c_i] (§3.4);
- :func:`distribution_loss`: L = chi-square(p_hat, p_ref) or KL(p_hat || p_ref), p_hat the batch
  mean of the predicted attribute distributions (§3.5);
- :func:`guidance_step`: the released step size 1.5 beta_t^0.05 (§3.5);
- :func:`guided_h`: h <- sg(h) - step * s * grad_h (loss_scale * L), the gradient taken w.r.t. h
  only, through the attribute head (§3.5).

The config section, the h-extraction side table, the per-timestep heads and the recipe build on
these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from debiaslab.errors import ConfigError

TEMPERATURE = 8.0  # released: logits / 8 before the softmax
LOSS_SCALE = 300.0  # released: g = s * grad_h (300 L)
STEP_COEF = 1.5  # released: h <- sg(h) - 1.5 beta_t^0.05 g
STEP_POWER = 0.05
PROB_TOLERANCE = 1e-6  # p_ref must sum to 1 within this
DistributionLoss = Literal["chi2", "kl"]


def ba_grid(n_steps: int = 50, num_timesteps: int = 1000) -> list[int]:
    """The method's DDIM grid (Parihar et al. 2024, released diffusion_latent.py): tau_k =
    floor(k (T - 1) / (n - 1)) for k = 0..n-1, e.g. [0, 20, 40, 61, ..., 978, 999] for n = 50,
    T = 1000. Integer arithmetic, so no float rounding moves a step."""
    if n_steps < 2 or n_steps > num_timesteps:
        raise ConfigError(f"ba.n_steps: must be in [2, {num_timesteps}] (the model's timesteps), "
                          f"got {n_steps}")
    return [k * (num_timesteps - 1) // (n_steps - 1) for k in range(n_steps)]


def check_p_ref(p_ref: Sequence[float], loss: DistributionLoss, where: str = "ba.p_ref"
                ) -> Tensor:
    """p_ref as a float64 tensor: a probability vector (entries >= 0, summing to 1), with no zero
    entry under chi-square (it divides by p_ref). One-line errors naming the value."""
    values = [float(v) for v in p_ref]
    if len(values) < 2:
        raise ConfigError(f"{where}: needs one share per attribute class (at least 2), got "
                          f"{values}")
    if any(not (v == v) or v < 0 for v in values):
        raise ConfigError(f"{where}: shares must be >= 0, got {values}")
    if abs(sum(values) - 1.0) > PROB_TOLERANCE:
        raise ConfigError(f"{where}: shares must sum to 1, got {values} (sum {sum(values):g})")
    if loss == "chi2" and min(values) == 0.0:
        raise ConfigError(f"{where}: chi-square divides by each share; {values} has a zero "
                          f"entry: give it a small positive share or use ba.loss=kl")
    return torch.tensor(values, dtype=torch.float64)


def attribute_probs(logits: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Predicted attribute distribution of each sample, softmax(logits / T) (§3.3), [B, K]."""
    return torch.softmax(logits / temperature, dim=-1)


def sample_guidance_loss(probs: Tensor, target: Tensor) -> Tensor:
    """Sample guidance (§3.4): L_s = -sum_i p_i[c_i], each image pulled toward its own target
    class c_i. ``probs`` [B, K], ``target`` [B] class indices. A scalar."""
    return -probs.gather(1, target.long().view(-1, 1)).sum()


def distribution_loss(probs: Tensor, p_ref: Tensor, kind: DistributionLoss = "chi2") -> Tensor:
    """Distribution guidance (§3.5): p_hat = mean_i p_i over the batch, then
    chi2 = sum_k (p_hat_k - p_ref_k)^2 / p_ref_k (Pearson, the released form), or
    KL(p_hat || p_ref) = sum_k p_hat_k log(p_hat_k / p_ref_k). Zero, with zero gradient, at
    p_hat = p_ref. A scalar."""
    p_hat = probs.mean(dim=0)
    ref = p_ref.to(p_hat.device, p_hat.dtype)
    if kind == "chi2":
        return ((p_hat - ref) ** 2 / ref).sum()
    if kind == "kl":
        return torch.special.xlogy(p_hat, p_hat).sum() - (p_hat * torch.log(ref)).sum()
    raise ConfigError(f"ba.loss: chi2 or kl, got {kind!r}")


def guidance_step(beta_t: Tensor | float, coef: float = STEP_COEF, power: float = STEP_POWER
                  ) -> Tensor:
    """The released step size eta_t = 1.5 beta_t^0.05 (§3.5). On the linear schedule
    1e-4..0.02, beta_t^0.05 lies in [0.63, 0.82], so eta_t in [0.95, 1.23]: a mild decay
    toward t = 0."""
    return coef * torch.as_tensor(beta_t, dtype=torch.float64) ** power


def guided_h(h: Tensor, loss_fn: Callable[[Tensor], Tensor], *, scale: float, step: Tensor | float,
             loss_scale: float = LOSS_SCALE) -> Tensor:
    """One guidance update of the bottleneck (§3.5): h <- sg(h) - step * scale *
    grad_h (loss_scale * L(h)). ``loss_fn`` maps h [B, ...] to a scalar through the attribute
    head only, so no gradient flows through the UNet. Scale 0 returns h unchanged (the same
    tensor values, bit for bit)."""
    if scale == 0:
        return h.detach()
    with torch.enable_grad():
        h_req = h.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_scale * loss_fn(h_req), h_req)
    step_t = torch.as_tensor(step, dtype=h.dtype, device=h.device)
    return h.detach() - step_t * scale * grad
