"""Load a trained checkpoint as a sampling denoiser and generate images with per-sample seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from debiaslab.checkpoints import load_checkpoint, resolve_checkpoint
from debiaslab.config import ExperimentConfig, from_saved_dict
from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.diffusion.guidance import GuidanceContext, build_guidance, spec_fields
from debiaslab.diffusion.losses import LOSSES
from debiaslab.diffusion.samplers import sample as run_sampler
from debiaslab.diffusion.samplers import sampler_options
from debiaslab.errors import CheckpointError, ConfigError, describe_error
from debiaslab.training.loop import build_score_net, select_device

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
        cfg = from_saved_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt_path}: its embedded config is invalid ({exc})") from None
    try:
        data = state["data"]
        shape = tuple(int(v) for v in data["shape"])
        net = build_score_net(cfg, shape, int(data["num_classes"]))
        model, denoiser = LOSSES.get(cfg.diffusion.loss).sampling_model(cfg, net)
        weights = state["ema"]["shadow"] if use_ema else state["model"]
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_path}: does not hold a model of its own config "
                              f"({describe_error(exc, lines=2)})") from None
    model = model.to(select_device(device)).eval().requires_grad_(False)
    return TrainedModel(cfg=cfg, model=model, denoiser=denoiser, shape=shape,
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


def guidance_checkpoint(cfg: ExperimentConfig | None, checkpoint: str,
                        artifact: str = "classifier",
                        artifacts: Mapping[str, str | Path] | None = None) -> Path:
    """A guidance entry's auxiliary model: the given file or run folder; for "" the recipe's
    artifact ``artifact`` (the sample stage's input of that name in ``artifacts``, else the one
    the run's stage records hold, else the auxiliary-model stage's run folder
    ``<output_dir>/runs/<name>.<artifact>``)."""
    if checkpoint:
        return Path(checkpoint).expanduser().resolve()
    if artifacts and artifacts.get(artifact) is not None:
        return Path(artifacts[artifact]).resolve()
    if cfg is None:
        raise ConfigError(f"sample.guidance: give checkpoint: <file or run folder> (no recipe "
                          f"artifact {artifact!r} here)")
    from debiaslab.records import recorded_outputs

    recorded = recorded_outputs(cfg).get(artifact)  # unreadable records are skipped
    if recorded:
        return Path(recorded)
    return cfg.run_dir.with_name(f"{cfg.name}.{artifact}")


def classifier_checkpoint(cfg: ExperimentConfig | None, checkpoint: str,
                          default: str | Path | None = None) -> Path:
    """:func:`guidance_checkpoint` of the recipe's ``classifier`` artifact (``default``: the
    sample stage's input)."""
    return guidance_checkpoint(cfg, checkpoint, "classifier",
                               None if default is None else {"classifier": default})


def resolve_guidance(cfg: ExperimentConfig, entries: Any = None,
                     classifier: str | Path | None = None,
                     artifacts: Mapping[str, str | Path] | None = None) -> list[dict[str, Any]]:
    """``sample.guidance`` with every field filled in and auxiliary-model checkpoints made
    absolute (what is shipped to Ray workers and recorded with the samples). ``artifacts``: the
    recipe's auxiliary models by artifact name, used for entries with checkpoint "" (each entry
    names its artifact); ``classifier``: shorthand for ``artifacts={"classifier": ...}``."""
    known = dict(artifacts or {})
    if classifier is not None:
        known.setdefault("classifier", classifier)
    out = []
    for entry in (cfg.sample.guidance if entries is None else entries):
        full = spec_fields(entry)
        if "checkpoint" in full:
            full["checkpoint"] = str(guidance_checkpoint(
                cfg, str(full["checkpoint"]), str(full.get("artifact", "classifier")), known))
        out.append(full)
    return out


def load_guidance_classifier(checkpoint: str, device: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The default classifier loader of guidance components (training.classifier checkpoints)."""
    from debiaslab.training.classifier import load_classifier

    if not checkpoint:
        raise ConfigError("sample.guidance classifier: no checkpoint (resolve_guidance first)")
    return load_classifier(checkpoint, device)


def guided_denoiser(trained: TrainedModel, sampler: str,
                    guidance: Any = ()) -> Denoiser:
    """The trained model's denoiser wrapped in the configured guidance components."""
    device = next(trained.model.parameters()).device
    ctx = GuidanceContext(sampler=sampler, null_label=trained.null_label,
                          num_classes=trained.num_classes, device=device,
                          load_classifier=load_guidance_classifier)
    return build_guidance(trained.denoiser, list(guidance or ()), ctx)


def seed_labels(trained: TrainedModel, mode: str, seeds: list[int], denoiser: Denoiser
                ) -> tuple[Tensor | None, Tensor | None]:
    """(labels the network is conditioned on, labels recorded with the images) for ``seeds``:
    class labels of ``sample.labels`` for a conditional model; for an unconditional one no
    labels, and the guidance's per-image targets (if any) are recorded instead."""
    labels = sample_labels(mode, trained.num_classes, seeds)
    if trained.null_label is None:
        labels = None
    recorded = labels
    sample_cond = getattr(denoiser, "sample_cond", None)
    if recorded is None and sample_cond is not None:
        recorded = sample_cond(seeds).get("guidance_target")
    return labels, recorded


def generate(
    trained: TrainedModel,
    sampler: str,
    seeds: list[int],
    *,
    steps: int,
    labels: Tensor | None = None,
    guidance: Any = (),
    batch_size: int = 100,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    clip_x0: bool | None = None,
    denoiser: Denoiser | None = None,
) -> Tensor:
    """Images in [-1, 1], [N, C, H, W] on CPU; row i depends only on seeds[i] (and labels[i]).

    ``guidance``: ``sample.guidance`` entries (built by :func:`guided_denoiser`), or pass a
    ready ``denoiser``. ``clip_x0`` (cfg.sample.clip_x0; None = the sampler's default) is passed
    to samplers that have that option (the VP samplers) unless ``options`` sets it (options
    win); samplers without it (edm_heun) ignore it.
    """
    options = dict(options or {})
    if clip_x0 is not None and "clip_x0" in sampler_options(sampler):
        options.setdefault("clip_x0", bool(clip_x0))
    if labels is not None and trained.null_label is None:
        raise ConfigError("sample.labels: this model is unconditional; use labels=none")
    if denoiser is None:
        denoiser = guided_denoiser(trained, sampler, guidance)
    device = next(trained.model.parameters()).device
    sample_cond = getattr(denoiser, "sample_cond", None)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        cond = {k: v.to(device) for k, v in (sample_cond(chunk) if sample_cond else {}).items()}
        if labels is not None:
            cond["y"] = labels[start:start + batch_size].to(device)
        x = run_sampler(sampler, denoiser, chunk, trained.shape, steps=steps, cond=cond,
                        device=device, progress=progress, **options)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)
