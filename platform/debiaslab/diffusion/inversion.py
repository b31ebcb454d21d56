"""Deterministic DDIM inversion (the eta = 0 sampler run towards noise) and a recorder of the UNet's
h-space along it, for methods that edit or classify h_t of real images.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.diffusion.samplers import (
    StepCallback,
    _check_steps,
    _resolve_device_dtype,
    _timestep_batch,
)
from debiaslab.errors import ConfigError


@dataclass
class Inversion:
    """The result of :func:`ddim_invert`."""

    latents: Tensor  # x at the noisiest grid timestep: what the ddim sampler starts from
    trajectory: list[Tensor]  # [x0, x_{t_1}, ..., x_{t_N}], N + 1 states; the last is ``latents``
    timesteps: Tensor  # int64 [N], t_1 < ... < t_N: the timestep eps was evaluated at, per step
    records: list[Any] = field(default_factory=list)  # callback's return value per step, or []


def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    steps: int,
    spacing: str = "leading",
    cond: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
    eps_at: Literal["target", "current"] = "target",
) -> Inversion:
    """DDIM inversion: Song et al. 2021, Eq. 12 with eta = 0 (Eq. 13-14: x/sqrt(abar) moves by
    eps d sqrt((1 - abar)/abar)) integrated towards noise (§5.4), as in Mokady et al. 2023
    (null-text inversion, §3 "DDIM inversion") and diffusers' ``DDIMInverseScheduler``.

    Grid: t_1 < ... < t_N, the ``ddim`` sampler's ``schedule.timesteps(steps, spacing)`` reversed,
    with abar_0 := 1 for the start x_{t_0} := x0 (the sampler's final "abar = 1" state). Step i:
      eps = eps_theta(x_{t_{i-1}}, t_i),
      x0_hat = (x_{t_{i-1}} - sqrt(1 - abar_{i-1}) eps)/sqrt(abar_{i-1}),
      x_{t_i} = sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps.
    eps is evaluated at the current state but at the TARGET timestep t_i (diffusers'
    ``DDIMInverseScheduler`` and the null-text inversion code do the same: their step(eps, t, x)
    gets eps = unet(x, t) with x at the previous level). So step i uses the timestep label of the
    sampler step it undoes (t_i -> t_{i-1}, which evaluates eps(x_{t_i}, t_i)), only at the other
    end of the step; the first step evaluates eps(x0, t_1) and has x0_hat = x0 exactly. The
    inversion is therefore the sampler's inverse up to eps(x_{t_{i-1}}, t_i) - eps(x_{t_i}, t_i)
    per step, which vanishes as the steps shrink. No x0 clipping (the ddim sampler's
    ``clip_x0=False`` is the matching one; a clip is not invertible).

    ``eps_at="current"`` is the Asyrp / Balancing Act convention instead (Kwon et al. 2023,
    Parihar et al. 2024, docs/algorithms.md §3.2): x0 is the state AT the first grid timestep
    t_1 (abar_{t_1}, not 1), and each step evaluates eps at its own start, eps(x_{t_i}, t_i), to
    reach x_{t_{i+1}}: N - 1 steps, whose records hold h(x_{t_i}, t_i) for t_1 .. t_{N-1}: the
    bottleneck at the very (state, timestep) pairs the sampler meets. ``timesteps`` are then the
    N - 1 evaluation timesteps and the last state is x_{t_N}.

    x0 [B, C, H, W] is cast to the samplers' state dtype (float64 for a float64 network, else
    float32) on ``device`` (default: the network's). ``callback`` gets {"i", "t" = t_i, "x" =
    x_{t_i}, "denoised" = x0_hat} after each step (see ``samplers.StepCallback``); its return
    values, one per step, form ``records``. Use :class:`HRecorder` to record h-space.
    """
    if not isinstance(x0, Tensor) or x0.ndim != 4 or len(x0) == 0 or not x0.is_floating_point():
        got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ConfigError(f"ddim_invert needs x0 as a float tensor [B, C, H, W] with B >= 1, "
                          f"got {got}")
    schedule = denoiser.schedule
    _check_steps(steps, schedule.num_timesteps)
    grid = schedule.timesteps(steps, spacing).flip(0)  # ascending
    levels = schedule.alphas_cumprod[grid]
    if eps_at == "target":  # from abar = 1 through every grid level; eps at the step's end
        ts, abar, abar_prev = grid, levels, torch.cat([levels.new_ones(1), levels[:-1]])
    elif eps_at == "current":  # from x0 at the first level; eps at the step's start
        if steps < 2:
            raise ConfigError("ddim_invert eps_at=current needs steps >= 2 (x0 sits at the "
                              "first grid timestep)")
        ts, abar, abar_prev = grid[:-1], levels[1:], levels[:-1]
    else:
        raise ConfigError(f"ddim_invert eps_at: target or current, got {eps_at!r}")
    dev, dtype = _resolve_device_dtype(denoiser, device)
    cond = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in (cond or {}).items()}

    records: list[Any] = []
    with torch.no_grad():
        x = x0.detach().to(dev, dtype)
        trajectory = [x]
        for i in range(len(ts)):
            eps = denoiser(x, _timestep_batch(ts[i], len(x), dev), **cond)
            a_cur, a_next = float(abar_prev[i]), float(abar[i])
            x0_hat = (x - math.sqrt(1.0 - a_cur) * eps) / math.sqrt(a_cur)
            x = math.sqrt(a_next) * x0_hat + math.sqrt(1.0 - a_next) * eps
            trajectory.append(x)
            if callback is not None:
                records.append(callback({"i": i, "t": int(ts[i]), "x": x, "denoised": x0_hat}))
    return Inversion(latents=x, trajectory=trajectory, timesteps=ts, records=records)


class HRecorder:
    """Records the UNet bottleneck h (the middle-block output, Kwon et al. 2023 "Asyrp") of every
    forward while active; as a step callback it returns the h of the step's last forward.

        with HRecorder(denoiser.net) as rec:
            inv = ddim_invert(denoiser, x0, steps=50, callback=rec)
        inv.records  # one CPU tensor [B, *net.h_shape()] per step, h at (x_{t_{i-1}}, t_i)

    Entering installs ``net.h_edit(fn)`` with fn(h, t) storing h (detached, copied to the CPU) and
    returning h unchanged, so results are bit-identical; leaving removes it. Every returned h is
    also appended to ``history``, which records sampler runs too (samplers ignore callback
    returns). An h_edit entered inside the block (e.g. ``HSpaceGuidance``) takes precedence and
    hides h from the recorder: a step without a recorded forward is an error.
    """

    def __init__(self, net: Any) -> None:
        if not callable(getattr(net, "h_edit", None)):
            raise ConfigError(f"HRecorder needs a network with an h_edit(fn) context manager "
                              f"(nets.unet.UNet), got {type(net).__name__}")
        self.net = net
        self.history: list[Tensor] = []
        self._last: Tensor | None = None
        self._stack: contextlib.ExitStack | None = None

    def _record(self, h: Tensor, t: Tensor) -> Tensor:
        self._last = h.detach().to("cpu", copy=True)
        return h

    def __enter__(self) -> HRecorder:
        if self._stack is not None:
            raise ConfigError("HRecorder is already active; enter it once")
        stack = contextlib.ExitStack()
        stack.enter_context(self.net.h_edit(self._record))
        self._stack, self._last = stack, None
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __call__(self, info: dict[str, Any]) -> Tensor:
        if self._stack is None:
            raise ConfigError("HRecorder records only inside `with HRecorder(net) as rec:`")
        if self._last is None:
            raise ConfigError(f"HRecorder saw no forward through net.h_edit in step "
                              f"{info.get('i')}; is another h_edit active inside it?")
        h, self._last = self._last, None
        self.history.append(h)
        return h
