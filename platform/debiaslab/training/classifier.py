"""The classifier trainer: p(label | x_t, t) on noisy images, or a head on feature-table rows,
trained by the shared `Trainer` (same atomic checkpoints, exact resume, Ray Train, DDP = one
process), and `load_classifier` for sampling-time guidance. What it trains on is in
``classifier_data``; its per-timestep validation and plot in ``classifier_eval``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.config import ClassifierConfig, ExperimentConfig, check_name, to_dict
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.errors import CheckpointError, ConfigError, DataError, describe_error
from debiaslab.training.classifier_data import (
    INPUT_FEATURES,
    INPUT_IMAGES,
    ClassifierData,
    load_classifier_data,
    split_data,
    timestep_bounds,
)
from debiaslab.training.classifier_eval import classifier_logits, evaluate_classifier
from debiaslab.training.loop import (
    STREAM_NOISE,
    StepBatch,
    Trainer,
    TrainResult,
    TrainTask,
    select_device,
)

RUN_SUFFIX = "classifier"  # the classifier run is "<experiment>.classifier"
# the classifier settings a resume may not change (besides model.*, train.*, diffusion.*)
RESUME_COMPARED = ("input", "label", "features", "timestep_range", "class_names", "rows_hash")


def classifier_experiment(cfg: ExperimentConfig, section: str = "classifier",
                          run_suffix: str = RUN_SUFFIX) -> ExperimentConfig:
    """An auxiliary model's run config: named ``<name>.<run_suffix>``, with config section
    ``section`` (a ClassifierConfig: ``classifier``, or a method's own such as a discriminator)
    as its ``classifier`` section and that section's ``model`` and ``train`` as its model and
    train sections; everything else is shared, so run folders, Ray storage and resume checks work
    unchanged and never meet the score model's or another auxiliary model's."""
    name = f"{cfg.name}.{run_suffix}"
    check_name("name", name)
    aux = getattr(cfg, section)
    if not isinstance(aux, ClassifierConfig):
        raise ConfigError(f"{section}: an auxiliary model's section must be a classifier "
                          f"section (model, train, label, input, ...), got {type(aux).__name__}")
    if type(aux) is not ClassifierConfig:  # a method's subclass: the trainer reads the base part
        aux = ClassifierConfig(**{f.name: getattr(aux, f.name)
                                  for f in dataclasses.fields(ClassifierConfig)})
    return dataclasses.replace(cfg, name=name, model=aux.model, train=aux.train, classifier=aux)


# ------------------------------------------------------------------------------------ task


class ClassifierTask(TrainTask):
    """Cross-entropy classifier on `ClassifierData` (the training rows). Noisy images: t ~
    U{lo..hi} (``classifier.timestep_range``, default 0..T-1 of ``diffusion.schedule``) and the
    noise come from the per-step generators, so resume is exact and DDP equals one process."""

    kind = "classifier"

    def __init__(self, cfg: ExperimentConfig, data: ClassifierData) -> None:
        from debiaslab.nets import NETS, is_classifier

        if data.kind != cfg.classifier.input:
            raise ConfigError(f"classifier.input={cfg.classifier.input} but the rows are "
                              f"{data.kind}; set classifier.input={data.kind}")
        if not is_classifier(cfg.model.net):
            allowed = [n for n in NETS.names() if is_classifier(n)]
            raise ConfigError(f"classifier.model.net: {cfg.model.net} is not a classifier; "
                              f"allowed: {', '.join(allowed)}")
        if data.num_outputs < 2 or len(data) == 0:
            raise DataError(f"a classifier needs rows and at least 2 labels, got {len(data)} "
                            f"rows and {data.class_names}")
        self.cfg = cfg
        self.data = data
        self.schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        self.t_lo, self.t_hi = timestep_bounds(cfg)
        self.num_classes = data.num_outputs
        self.rows_hash = data.rows_hash()  # once: features tables can be large

    def num_rows(self) -> int:
        return len(self.data)

    def build_model(self) -> nn.Module:
        from debiaslab.nets import build_net

        d = self.data
        self.net = build_net(self.cfg.model, shape=d.shape, num_classes=d.num_cond_classes,
                             num_outputs=d.num_outputs, where="classifier.model",
                             resolve=load_trunk)
        self.conditional = getattr(self.net, "num_classes_cond", None) is not None
        if self.conditional and d.cond is None:
            raise ConfigError("classifier.model.class_conditional: the rows carry no class "
                              "labels to condition on")
        self.time_input = d.kind == INPUT_IMAGES or d.timesteps is not None
        takes_time = getattr(self.net, "time_conditional", True)
        if self.time_input != takes_time:
            hint = ("give the rows' timesteps or use net mlp_head" if takes_time else
                    "set classifier.model.options.time_conditional: true")
            raise ConfigError(f"classifier.model.net={self.cfg.model.net}: the features "
                              f"{'have' if self.time_input else 'have no'} per-row timesteps; "
                              f"{hint}")
        return self.net

    def make_batch(self, plan: StepBatch) -> dict[str, Tensor]:
        """Inputs and labels of this rank's rows; noisy images: t and noise for the global
        batch from the step's noise generator, this rank's slice kept."""
        idx, d = plan.indices, self.data
        batch = {"x": d.float_inputs(idx), "label": d.labels[idx]}
        if d.kind == INPUT_IMAGES:
            g = plan.generator(STREAM_NOISE)
            batch["t"] = plan.mine(torch.randint(self.t_lo, self.t_hi + 1, (plan.size,),
                                                 generator=g))
            batch["noise"] = plan.mine(torch.randn((plan.size,) + d.shape, generator=g))
        elif d.timesteps is not None:
            batch["t"] = d.timesteps[idx]
        if self.conditional:
            batch["y"] = d.cond[idx]  # type: ignore[index]
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy per sample [B]."""
        logits = classifier_logits(model, batch["x"], t=batch.get("t"),
                                   noise=batch.get("noise"), schedule=self.schedule,
                                   y=batch.get("y"))
        return F.cross_entropy(logits.float(), batch["label"], reduction="none")

    def content_hash(self) -> str:
        return self.data.source_hash or self.rows_hash

    def data_state(self) -> dict[str, Any]:
        return {"shape": list(self.data.shape), "num_classes": self.data.num_outputs,
                "class_names": list(self.data.class_names), "content_hash": self.content_hash()}

    def extra_state(self) -> dict[str, Any]:
        """What `load_classifier` needs to rebuild the network without the training data."""
        c, d = self.cfg.classifier, self.data
        return {"classifier": {
            "net": self.cfg.model.net, "model": to_dict(self.cfg.model),
            "shape": list(d.shape), "num_outputs": d.num_outputs,
            "class_names": list(d.class_names), "num_cond_classes": d.num_cond_classes,
            "schedule": self.cfg.diffusion.schedule,
            "num_timesteps": self.cfg.diffusion.num_timesteps,
            "input": d.kind, "time_input": bool(self.time_input), "label": c.label,
            "features": c.features if d.kind == INPUT_FEATURES else "",
            "timestep_range": [self.t_lo, self.t_hi],
            "ema": self.cfg.train.ema_decay > 0, "rows_hash": self.rows_hash,
        }}

    def check_state(self, state: dict[str, Any], source: Path, resume: bool = True) -> None:
        """Besides shape and label count: on resume, the same rows, labels, input and timestep
        range (``classifier.*`` keys are not part of the compared config)."""
        super().check_state(state, source, resume)
        saved = state.get("classifier")
        if saved is None or not resume:  # fine-tuning may start from other rows
            return
        ours = self.extra_state()["classifier"]
        diffs = [f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in RESUME_COMPARED
                 if saved.get(k) != ours[k]]
        if diffs:
            shown = "; ".join(d[:120] for d in diffs)
            raise CheckpointError(f"{source}: the classifier's rows or labels differ from the "
                                  f"checkpoint's ({shown}); use a new name or output_dir")


# ------------------------------------------------------------------------------------ train


@dataclass
class ClassifierResult:
    """A trained classifier: the training result, the final network (EMA weights when
    train.ema_decay > 0; eval mode) and the validation per timestep bucket."""

    train: TrainResult
    model: nn.Module
    evaluation: dict[str, Any] = field(default_factory=dict)
    num_train: int = 0
    num_val: int = 0


def train_classifier(cfg: ExperimentConfig, data: ClassifierData,
                     run_dir: str | Path | None = None, **kwargs: Any) -> ClassifierResult:
    """Train the classifier of ``cfg`` (a classifier run's config, `classifier_experiment`) in
    this process on the training part of ``data``'s stratified split, then evaluate the final
    weights (EMA when train.ema_decay > 0) on the held-out part. ``kwargs`` go to `Trainer`."""
    train_rows, val_rows = split_data(cfg, data)
    trainer = Trainer(cfg, ClassifierTask(cfg, train_rows), run_dir or cfg.run_dir, **kwargs)
    result = trainer.fit()
    model = trainer.ema.shadow
    model.eval()
    evaluation = evaluate_config(cfg, model, val_rows)  # NaN without validation rows
    return ClassifierResult(train=result, model=model, evaluation=evaluation,
                            num_train=len(train_rows), num_val=len(val_rows))


def evaluate_config(cfg: ExperimentConfig, model: nn.Module, val_rows: ClassifierData
                    ) -> dict[str, Any]:
    """`evaluate_classifier` with ``cfg``'s schedule, buckets, range and seed."""
    return evaluate_classifier(
        model, val_rows, schedule=build_schedule(cfg.diffusion.schedule,
                                                 cfg.diffusion.num_timesteps),
        buckets=cfg.classifier.val_buckets, seed=cfg.train.seed,
        timestep_range=timestep_bounds(cfg))


def validate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """The validation of a trained classifier run (e.g. after Ray Train): its checkpoint on the
    held-out rows of ``cfg``'s data (the same split the workers trained without)."""
    model, _ = load_classifier(checkpoint, device)
    _, val_rows = split_data(cfg, load_classifier_data(cfg))
    return evaluate_config(cfg, model, val_rows)


# ------------------------------------------------------------------------------------ load


def load_trunk(option: str, path: str) -> nn.Module:
    """build_net's resolver for options that name a trained classifier's checkpoint (the
    cascaded classifier's frozen trunk): the network, rebuilt from the checkpoint alone."""
    net, _ = load_classifier(path)
    return net


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained classifier from its checkpoint (file or run folder) alone: (network in
    eval mode without parameter gradients, on ``device``; info). The weights are the EMA's when
    the run had train.ema_decay > 0, else the model's. ``info``: net, model, shape,
    num_outputs, class_names, num_cond_classes, schedule, num_timesteps, input, time_input,
    label, features, timestep_range, ema, plus step and checkpoint."""
    from debiaslab.checkpoints import load_checkpoint, resolve_checkpoint
    from debiaslab.config import from_saved_dict
    from debiaslab.nets import build_net

    source = resolve_checkpoint(path)
    state = load_checkpoint(source, required=("model", "ema", "step", "classifier"))
    info = dict(state["classifier"])
    try:
        model_cfg = from_saved_dict({"model": info["model"]}).model
        net = build_net(model_cfg, shape=info["shape"], num_classes=info["num_cond_classes"],
                        num_outputs=info["num_outputs"], where="classifier.model",
                        resolve=load_trunk)
        net.load_state_dict(state["ema"]["shadow"] if info["ema"] else state["model"])
    except (ConfigError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{source}: cannot rebuild the classifier "
                              f"({describe_error(exc, lines=2)})") from None
    device = select_device(device) if isinstance(device, str) else device
    net.to(device).eval().requires_grad_(False)
    info.update(step=int(state["step"]), checkpoint=str(source))
    return net, info
