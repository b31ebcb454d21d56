"""Load a trained checkpoint as a sampling denoiser and generate images with per-sample seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from debiaslab.config import ExperimentConfig, from_dict
from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.diffusion.guidance import ClassifierFreeGuidance
from debiaslab.diffusion.losses import build_loss
from debiaslab.diffusion.samplers import sample as run_sampler, sampler_options
from debiaslab.errors import CheckpointError, ConfigError, describe_error
from debiaslab.training.checkpoint import load_checkpoint, resolve_checkpoint
from debiaslab.training.loop import build_net, select_device

LABEL_SEED_OFFSET = 7_777_777  # labels drawn for mode "uniform" use their own stream


@dataclass
class TrainedModel:
    """A checkpoint restored for sampling."""

    cfg: ExperimentConfig
    model: nn.Module
    denoiser: Denoiser
    shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    step: int
    checkpoint: Path

    @property
    def null_label(self) -> int | None:
        return getattr(self.denoiser.net, "null_label", None)


def load_trained(path: str | Path, *, use_ema: bool = True, device: str = "auto") -> TrainedModel:
    """Restore the (EMA) model of a checkpoint file or of a run folder's latest checkpoint."""
    ckpt_path = resolve_checkpoint(path)
    state = load_checkpoint(ckpt_path, required=("model", "ema", "step", "config", "data"))
    try:
        cfg = from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt_path}: its embedded config is invalid ({exc})") from None
    try:
        data = state["data"]
        shape = tuple(int(v) for v in data["shape"])
        loss = build_loss(cfg)
        model = loss.wrap(build_net(cfg, shape, int(data["num_classes"])))
        weights = state["ema"]["shadow"] if use_ema else state["model"]
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_path}: does not hold a model of its own config "
                              f"({describe_error(exc, lines=2)})") from None
    model = model.to(select_device(device)).eval().requires_grad_(False)
    return TrainedModel(cfg=cfg, model=model, denoiser=loss.denoiser(model), shape=shape,
                        num_classes=int(data["num_classes"]), class_names=list(data["class_names"]),
                        step=int(state["step"]), checkpoint=ckpt_path)


def sample_labels(mode: str, num_classes: int, seeds: list[int]) -> Tensor | None:
    """Class labels per seed: ``balanced`` (seed mod C), ``uniform`` (random per seed), ``none``."""
    if mode == "none" or num_classes <= 1:
        return None
    if mode == "balanced":
        return torch.tensor([s % num_classes for s in seeds], dtype=torch.long)
    if mode == "uniform":
        return torch.tensor(
            [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
                s + LABEL_SEED_OFFSET))) for s in seeds], dtype=torch.long)
    raise ConfigError(f"sample.labels: unknown mode {mode!r}; allowed: balanced, uniform, none")


def generate(
    trained: TrainedModel,
    sampler: str,
    seeds: list[int],
    *,
    steps: int,
    labels: Tensor | None = None,
    cfg_omega: float = 0.0,
    batch_size: int = 100,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    clip_x0: bool | None = None,
) -> Tensor:
    """Images in [-1, 1], [N, C, H, W] on CPU; row i depends only on seeds[i] (and labels[i]).

    ``clip_x0`` (cfg.sample.clip_x0; None = the sampler's default) is passed to samplers that
    have that option (the VP samplers) unless ``options`` sets it (options win); samplers
    without it (edm_heun) ignore it.
    """
    options = dict(options or {})
    if clip_x0 is not None and "clip_x0" in sampler_options(sampler):
        options.setdefault("clip_x0", bool(clip_x0))
    denoiser: Denoiser = trained.denoiser
    if labels is not None and trained.null_label is None:
        raise ConfigError("sample.labels: this model is unconditional; use labels=none")
    if cfg_omega > 0:
        if trained.null_label is None:
            raise ConfigError("sample.cfg_omega: needs a class-conditional model")
        denoiser = ClassifierFreeGuidance(denoiser, cfg_omega, trained.null_label)
    device = next(trained.model.parameters()).device
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        cond = {}
        if labels is not None:
            cond["y"] = labels[start:start + batch_size].to(device)
        x = run_sampler(sampler, denoiser, chunk, trained.shape, steps=steps, cond=cond,
                        device=device, progress=progress, **options)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)
