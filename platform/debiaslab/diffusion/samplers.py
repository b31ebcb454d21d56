"""Samplers: pure functions with one signature, registered in ``SAMPLERS`` (STYLE.md item 5).

``x0 = sampler(denoiser, seeds, shape, steps=..., cond=..., device=..., progress=..., callback=...,
**options)``. Guidance wraps the denoiser (guidance.py); VP samplers call it with ORIGINAL timestep
indices. ``callback`` (k-diffusion's per-step hook) sees each step's state; see ``StepCallback``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.diffusion.noise import SampleNoise
from debiaslab.diffusion.schedules import karras_sigmas
from debiaslab.errors import ConfigError
from debiaslab.progress import progress as progress_bar
from debiaslab.registry import Registry
from debiaslab.strict import check_options

SamplerFn = Callable[..., Tensor]
SAMPLERS: Registry[SamplerFn] = Registry("sampler")

StepCallback = Callable[[dict[str, Any]], Any]
"""k-diffusion's per-step hook: called after every step with a dict
``{"i": step index (0 = first), "t": original timestep index (int) of the step's denoiser call for
the VP samplers, sigma_i (float) for edm_heun, "x": the state after the step, "denoised": the x0
estimate the step used}``. It only observes: it must not modify the tensors in place, and its return
value is ignored by the samplers (``inversion.ddim_invert`` keeps it)."""

COMMON_ARGS = ("denoiser", "seeds", "shape", "steps", "cond", "device", "progress", "callback")
DDPM_VARIANCES = ("fixed_small", "fixed_large")
CLIP_X0_RANGE = 1.0  # data lives in [-1, 1]; VP samplers clip x0_hat to it by default (clip_x0)
EDM_SIGMA_MIN = 0.002  # Karras et al. 2022, Table 1 (VP/VE/EDM sampling defaults)
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0
EDM_MAX_GAMMA = math.sqrt(2.0) - 1.0  # Algorithm 2: gamma_i = min(S_churn/N, sqrt(2) - 1)


# --------------------------------------------------------------------------------------------
# Shared plumbing


def _check_steps(steps: int, upper: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"sampling steps must be an integer, got {steps!r}")
    if steps < 1 or (upper is not None and steps > upper):
        bound = f"1..{upper}" if upper is not None else ">= 1"
        raise ConfigError(f"sampling steps must be in {bound}, got {steps}")


def _resolve_device_dtype(denoiser: Denoiser, device: torch.device | str | None
                          ) -> tuple[torch.device, torch.dtype]:
    """Device: the given one, else that of the denoiser's network parameters, else CPU.
    Dtype of the sampling state: float64 for a float64 network, else float32 (low-precision
    networks are expected to run under autocast; the state stays float32)."""
    param = None
    net = getattr(denoiser, "net", None)
    if isinstance(net, nn.Module):
        param = next(net.parameters(), None)
    dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
    if device is not None:
        return torch.device(device), dtype
    return (param.device if param is not None else torch.device("cpu")), dtype


def _prepare(denoiser: Denoiser, seeds: Sequence[int], shape: Sequence[int],
             cond: dict[str, Any] | None, device: torch.device | str | None
             ) -> tuple[torch.device, SampleNoise, dict[str, Any]]:
    if len(seeds) == 0:
        raise ConfigError("sampling needs at least one seed")
    if len(shape) != 3:
        raise ConfigError(f"sample shape must be (C, H, W), got {tuple(shape)}")
    dev, dtype = _resolve_device_dtype(denoiser, device)
    noise = SampleNoise(seeds, tuple(shape), device=dev, dtype=dtype)
    cond = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in (cond or {}).items()}
    return dev, noise, cond


def _steps(n: int, progress: bool, name: str) -> Iterable[int]:
    return progress_bar(range(n), desc=name, unit="step", disable=not progress, leave=False)


def _timestep_batch(t: int, batch: int, device: torch.device) -> Tensor:
    """The original timestep index ``t`` repeated over the batch (int64 [B])."""
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# VP samplers (discrete time, eps interface)


@SAMPLERS.register("ddpm")
def ddpm(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    steps: int,
    cond: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    spacing: str = "leading",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, on a respaced chain (Nichol & Dhariwal 2021,
    §4; guided-diffusion ``SpacedDiffusion``).

    Kept steps t_N > ... > t_1 with abar'_i = abar[t_i], abar'_0 = 1 and beta'_i = 1 -
    abar'_i/abar'_{i-1}. With x0_hat = (x_t - sqrt(1 - abar'_i) eps)/sqrt(abar'_i) (Tweedie; clipped
    to [-1, 1] when ``clip_x0``, the default, like guided-diffusion's clip_denoised=True and
    diffusers' clip_sample=True), the posterior q(x_{i-1} | x_i, x0_hat) of Ho et al. Eq. 6-7:
      mu = sqrt(abar'_{i-1}) beta'_i/(1 - abar'_i) x0_hat
           + sqrt(1 - beta'_i)(1 - abar'_{i-1})/(1 - abar'_i) x_i,
      var = (1 - abar'_{i-1})/(1 - abar'_i) beta'_i ("fixed_small") or beta'_i ("fixed_large",
      whose lowest step uses the next step's posterior variance, like guided-diffusion).
    x_{i-1} = mu + sqrt(var) z, with no noise at the last step.
    Guidance acting on the ancestral mean (Dhariwal & Nichol 2021, Algorithm 1, guided-diffusion's
    ``condition_mean``) enters through ``denoiser.mean_shift(x_i, t_i, var)``: when it returns a
    tensor, mu <- mu + shift before the noise is added (at every step, the last included).
    """
    if variance not in DDPM_VARIANCES:
        raise ConfigError(f"unknown ddpm variance {variance!r}; allowed: "
                          f"{', '.join(DDPM_VARIANCES)}")
    dev, noise, cond = _prepare(denoiser, seeds, shape, cond, device)
    ts = denoiser.schedule.timesteps(steps, spacing)
    abar = denoiser.schedule.alphas_cumprod[ts]  # float64, descending in t
    abar_prev = torch.cat([abar[1:], abar.new_ones(1)])
    beta = 1.0 - abar / abar_prev
    post_var = (1.0 - abar_prev) / (1.0 - abar) * beta
    if variance == "fixed_small":
        var = post_var
    else:
        var = beta.clone()
        var[-1] = post_var[-2] if len(ts) > 1 else post_var[-1]
    coef_x0 = abar_prev.sqrt() * beta / (1.0 - abar)
    coef_xt = (1.0 - beta).sqrt() * (1.0 - abar_prev) / (1.0 - abar)

    with torch.no_grad():
        x = noise.draw()
        for i in _steps(len(ts), progress, "ddpm"):
            t_batch = _timestep_batch(ts[i], len(x), dev)
            eps = denoiser(x, t_batch, **cond)
            a_t = float(abar[i])
            x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            if clip_x0:
                x0 = x0.clamp(-CLIP_X0_RANGE, CLIP_X0_RANGE)
            mu = float(coef_x0[i]) * x0 + float(coef_xt[i]) * x
            var_i = torch.full((len(x),) + (1,) * (x.ndim - 1), float(var[i]), dtype=x.dtype,
                               device=x.device)
            shift = denoiser.mean_shift(x, t_batch, var_i, **cond)
            x = mu if shift is None else mu + shift
            if i < len(ts) - 1:
                x = x + math.sqrt(float(var[i])) * noise.draw()
            if callback is not None:
                callback({"i": i, "t": int(ts[i]), "x": x, "denoised": x0})
    return x


@SAMPLERS.register("ddim")
def ddim(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    steps: int,
    cond: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    spacing: str = "leading",
    clip_x0: bool = True,
) -> Tensor:
    """DDIM, Song et al. 2021 Eq. 12 (docs/algorithms.md §3.2), from t_N down to abar = 1:
      x0_hat = (x_t - sqrt(1 - abar_t) eps)/sqrt(abar_t),
      sigma_t = eta sqrt((1 - abar_t/abar_n)(1 - abar_n)/(1 - abar_t)),
      x_n = sqrt(abar_n) x0_hat + sqrt(1 - abar_n - sigma_t^2) eps + sigma_t z.
    eta = 0 is the deterministic sampler, eta = 1 the ancestral one. With eta > 0 one noise draw per
    step, the last included (diffusers' order). ``clip_x0`` (default) clips x0_hat to [-1, 1] and
    re-derives eps from it (guided-diffusion's ``ddim_sample`` with clip_denoised; diffusers'
    DDIMScheduler with clip_sample=True).
    """
    if not eta >= 0.0:
        raise ConfigError(f"ddim eta must be >= 0, got {eta}")
    dev, noise, cond = _prepare(denoiser, seeds, shape, cond, device)
    ts = denoiser.schedule.timesteps(steps, spacing)
    abar = denoiser.schedule.alphas_cumprod[ts]
    abar_next = torch.cat([abar[1:], abar.new_ones(1)])  # "set_alpha_to_one" at the final step

    with torch.no_grad():
        x = noise.draw()
        for i in _steps(len(ts), progress, "ddim"):
            eps = denoiser(x, _timestep_batch(ts[i], len(x), dev), **cond)
            a_t, a_n = float(abar[i]), float(abar_next[i])
            x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            if clip_x0:
                x0 = x0.clamp(-CLIP_X0_RANGE, CLIP_X0_RANGE)
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
            sigma = eta * math.sqrt((1.0 - a_n) / (1.0 - a_t) * (1.0 - a_t / a_n))
            x = math.sqrt(a_n) * x0 + math.sqrt(max(1.0 - a_n - sigma**2, 0.0)) * eps
            if eta > 0:
                x = x + sigma * noise.draw()
            if callback is not None:
                callback({"i": i, "t": int(ts[i]), "x": x, "denoised": x0})
    return x


@SAMPLERS.register("dpmpp_2m")
def dpmpp_2m(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    steps: int,
    cond: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    clip_x0: bool = True,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Algorithm 2 (data prediction,
    multistep), with diffusers' "midpoint" form and grid (``DPMSolverMultistepScheduler``).

    Grid (diffusers' timestep_spacing="linspace", bit for bit): with step = fl((T-1)/N) in float64,
      t_k = rint(k * step) for k = 0..N-1 (rint = round half to even), t_N = T-1, reversed and the
      k = 0 point dropped: t_i = (t_N, ..., t_1); then sigma = 0.
    i.e. np.linspace(0, T-1, N+1).round()[::-1][:-1] with numpy's rounded step, which breaks the
    exact ties of round(k (T-1)/N) (N = 30, k = 15: 499.49999999999994 -> 499, not 500).
    With lambda = log(alpha/sigma), h_i = lambda_{i+1} - lambda_i, x0_i = Tweedie(x_i) (clipped to
    [-1, 1] when ``clip_x0``, the default) and r_i = h_{i-1}/h_i:
      D_i = x0_i + 1/(2 r_i) (x0_i - x0_{i-1})            (D_i = x0_i at the first step)
      x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i.
    The final step (to sigma = 0) is first order and returns x0_hat. Deterministic after x_T.
    Clipping is the plain x0 clip of docs/algorithms.md (guided-diffusion's clip_denoised)
    applied to the data prediction the solver extrapolates; it equals diffusers'
    ``thresholding=True`` with ``sample_max_value=1.0`` (the dynamic threshold s is clamped to
    [1, 1], so x0 -> clamp(x0)/1).
    """
    schedule = denoiser.schedule
    _check_steps(steps, schedule.num_timesteps - 1)
    dev, noise, cond = _prepare(denoiser, seeds, shape, cond, device)
    ts = schedule.timesteps(steps + 1, "linspace")[:-1]
    abar = schedule.alphas_cumprod[ts]
    alpha = torch.cat([abar.sqrt(), abar.new_ones(1)])
    sigma = torch.cat([(1.0 - abar).sqrt(), abar.new_zeros(1)])
    lam = alpha.log() - sigma.log()  # +inf at the final sigma = 0

    with torch.no_grad():
        x = noise.draw()
        x0_prev: Tensor | None = None
        for i in _steps(len(ts), progress, "dpmpp_2m"):
            eps = denoiser(x, _timestep_batch(ts[i], len(x), dev), **cond)
            x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
            if clip_x0:
                x0 = x0.clamp(-CLIP_X0_RANGE, CLIP_X0_RANGE)
            if float(sigma[i + 1]) == 0.0:  # first-order step to sigma = 0 is exactly x0_hat
                x = x0
            else:
                h = float(lam[i + 1] - lam[i])
                D = x0
                if x0_prev is not None:
                    r = float(lam[i] - lam[i - 1]) / h
                    D = x0 + (x0 - x0_prev) / (2.0 * r)
                x = (float(sigma[i + 1]) / float(sigma[i])) * x \
                    - float(alpha[i + 1]) * math.expm1(-h) * D
            x0_prev = x0
            if callback is not None:
                callback({"i": i, "t": int(ts[i]), "x": x, "denoised": x0})
    return x


# --------------------------------------------------------------------------------------------
# EDM sampler (continuous sigma, D interface)


@SAMPLERS.register("edm_heun")
def edm_heun(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    steps: int,
    cond: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = EDM_RHO,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (Heun's 2nd-order method with optional churn), on the
    sigmas of Eq. 5 (``karras_sigmas``), in VE units x = x_t/alpha_t with D = denoise_edm:
      gamma_i = min(S_churn/N, sqrt(2)-1) if S_min <= sigma_i <= S_max else 0,
      sigma_hat = (1 + gamma_i) sigma_i, x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,
      d_i = (x_hat - D(x_hat; sigma_hat))/sigma_hat,
      x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d_i, and, unless sigma_{i+1} = 0, the Heun
      correction x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat)(d_i + d'_i)/2, d'_i at x_{i+1}.
    x_N = sigma_max z; returns x at sigma = 0 (where VE and VP coincide). With S_churn > 0 one
    noise draw per step (NVlabs/edm's order). ``callback`` gets t = sigma_i, x in VE units and
    denoised = D(x_hat; sigma_hat), the first evaluation (k-diffusion's ``sample_heun``).
    No x0 clipping, like NVlabs/edm (TIW-DSM's sampler): this sampler has no ``clip_x0`` option, and
    ``sampling.generate`` does not pass the config-level ``sample.clip_x0`` to it.
    """
    _check_steps(steps)
    if S_churn < 0 or S_noise < 0:
        raise ConfigError(f"edm_heun needs S_churn >= 0 and S_noise >= 0, got {S_churn}, {S_noise}")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"edm_heun needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    dev, noise, cond = _prepare(denoiser, seeds, shape, cond, device)
    sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).tolist()
    gamma_max = min(S_churn / steps, EDM_MAX_GAMMA)

    def D(x: Tensor, sig: float) -> Tensor:
        return denoiser.denoise_edm(x, torch.full((len(x),), sig, dtype=torch.float64), **cond)

    with torch.no_grad():
        x = sigmas[0] * noise.draw()
        for i in _steps(steps, progress, "edm_heun"):
            s_cur, s_next = sigmas[i], sigmas[i + 1]
            gamma = gamma_max if S_min <= s_cur <= S_max else 0.0
            s_hat = s_cur * (1.0 + gamma)
            x_hat = x
            if S_churn > 0:
                z = noise.draw()
                x_hat = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * z
            denoised = D(x_hat, s_hat)
            d = (x_hat - denoised) / s_hat
            x = x_hat + (s_next - s_hat) * d
            if s_next > 0:
                d_prime = (x - D(x, s_next)) / s_next
                x = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * d_prime)
            if callback is not None:
                callback({"i": i, "t": s_cur, "x": x, "denoised": denoised})
    return x


# --------------------------------------------------------------------------------------------
# Convenience entry point


def sampler_options(name: str) -> dict[str, Any]:
    """The sampler-specific keyword options of sampler ``name`` and their defaults."""
    params = inspect.signature(SAMPLERS.get(name)).parameters
    return {k: p.default for k, p in params.items() if k not in COMMON_ARGS}


def sample(
    name: str,
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    steps: int,
    cond: dict[str, Any] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """Run sampler ``name`` over ``seeds`` in batches of ``batch_size`` (default: one batch).

    Per-sample seeds make each image independent of the batching, except under guidance that
    couples a batch (e.g. distribution guidance). Tensors in ``cond`` whose leading dimension is
    len(seeds) are per-sample and split with the seeds; other values are passed to every batch.
    ``callback`` is passed to every batch's run (its step index "i" restarts at 0 per batch).
    """
    fn = SAMPLERS.get(name)
    check_options(f"sampler {name!r}", options, sampler_options(name))
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if n == 0:
        raise ConfigError("sampling needs at least one seed")
    if batch_size is None:
        batch_size = n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    cond = cond or {}
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        part_cond = {k: v[part] if isinstance(v, Tensor) and v.ndim and len(v) == n else v
                     for k, v in cond.items()}
        out.append(fn(denoiser, seeds[part], shape, steps=steps, cond=part_cond, device=device,
                      progress=progress, callback=callback, **options))
    return torch.cat(out)
