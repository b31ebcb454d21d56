"""The classifier trainer: p(label | x_t, t) on noisy images, or a head on feature-table rows,
trained by the shared `Trainer` (same atomic checkpoints, exact resume, Ray Train, DDP = one
process); per-timestep validation, its plot, and `load_classifier` for sampling-time guidance.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.config import ClassifierConfig, ExperimentConfig, check_name, to_dict
from debiaslab.data.pixels import from_uint8
from debiaslab.diffusion.schedules import VPSchedule, build_schedule
from debiaslab.errors import CheckpointError, ConfigError, DataError, describe_error
from debiaslab.training.loop import (
    STREAM_NOISE,
    StepBatch,
    Trainer,
    TrainResult,
    TrainTask,
    select_device,
)

INPUT_IMAGES, INPUT_FEATURES = "noisy_images", "features"
LABEL_CLASS, ATTR_PREFIX, SIDE_PREFIX = "class", "attr:", "side:"
RUN_SUFFIX = "classifier"  # the classifier run is "<experiment>.classifier"
EVAL_BATCH = 256  # rows per forward pass in evaluate_classifier
_EVAL_SEED_STRIDE = 1_000_003
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


# ------------------------------------------------------------------------------------ data


@dataclass
class ClassifierData:
    """Rows a classifier trains on, aligned: inputs, integer labels 0..K-1 and the K names.

    ``inputs``: uint8 images [N, C, H, W] (kind noisy_images; noised at training time) or float
    features [N, ...] (kind features). ``timesteps``: per-row timesteps of the features (None: a
    time-free head). ``cond``: class labels to condition on (model.class_conditional).
    ``source_hash``: content hash of the dataset the rows come from; ``rows``: their indices in
    it (default 0..N-1).
    """

    kind: str
    inputs: Tensor
    labels: Tensor
    class_names: list[str]
    timesteps: Tensor | None = None
    cond: Tensor | None = None
    num_cond_classes: int = 0
    source_hash: str = ""
    rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in (INPUT_IMAGES, INPUT_FEATURES):
            raise ConfigError(f"classifier.input: unknown input {self.kind!r}; allowed: "
                              f"{INPUT_IMAGES}, {INPUT_FEATURES}")
        self.inputs = torch.as_tensor(self.inputs)
        if self.kind == INPUT_IMAGES and (self.inputs.dtype != torch.uint8
                                          or self.inputs.ndim != 4):
            raise DataError(f"noisy_images inputs must be uint8 [N, C, H, W], got "
                            f"{self.inputs.dtype} {tuple(self.inputs.shape)}")
        if self.kind == INPUT_FEATURES:
            self.inputs = self.inputs.float()
            if self.inputs.ndim < 2 or not torch.isfinite(self.inputs).all():
                raise DataError(f"features must be finite numbers [N, ...], got shape "
                                f"{tuple(self.inputs.shape)}")
        n = self.inputs.shape[0]
        self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long)
        if self.labels.shape != (n,):
            raise DataError(f"labels must be [N={n}] aligned to the rows, got "
                            f"{tuple(self.labels.shape)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in 0..{len(self.class_names) - 1} (one per class "
                            f"name), got {int(self.labels.min())}..{int(self.labels.max())}")
        for key in ("timesteps", "cond"):
            value = getattr(self, key)
            if value is not None:
                value = torch.as_tensor(np.asarray(value))
                if value.shape != (n,):
                    raise DataError(f"{key} must be [N={n}], got {tuple(value.shape)}")
                setattr(self, key, value.long() if key == "cond" else value.float())
        self.rows = torch.arange(n) if self.rows is None else torch.as_tensor(self.rows).long()
        self.class_names = [str(c) for c in self.class_names]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inputs.shape[1:])

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def subset(self, idx: Tensor | np.ndarray | Sequence[int]) -> "ClassifierData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)

        def pick(values: Tensor | None) -> Tensor | None:
            return None if values is None else values[idx]

        return dataclasses.replace(self, inputs=self.inputs[idx], labels=self.labels[idx],
                                   timesteps=pick(self.timesteps), cond=pick(self.cond),
                                   rows=self.rows[idx])

    def float_inputs(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` as float: images in [-1, 1], features as stored."""
        x = self.inputs[idx]
        return from_uint8(x) if self.kind == INPUT_IMAGES else x

    def rows_hash(self) -> str:
        """sha256 of what the rows mean: their indices, labels, class names, timesteps,
        conditioning labels and (features) values; the image content is ``source_hash``."""
        h = hashlib.sha256(f"{self.kind}|{self.source_hash}|{self.class_names}".encode())
        parts = [self.rows, self.labels, self.timesteps, self.cond]
        if self.kind == INPUT_FEATURES:
            parts.append(self.inputs)
        for part in parts:
            h.update(b"-" if part is None else part.contiguous().numpy().tobytes())
        return h.hexdigest()


def dataset_labels(dataset: Any, label: str) -> tuple[np.ndarray, list[str]]:
    """(labels int64 [N] aligned to the dataset's rows, -1 for none; class names) of ``label``:
    "class" (the dataset's classes), "attr:<name>" (a 0/1 attribute: ["not <name>", "<name>"])
    or "side:<table>.<column>" (an integer side-table column joined by id; classes 0..max)."""
    if label == LABEL_CLASS:
        return dataset.labels.numpy().astype(np.int64), list(dataset.class_names)
    if label.startswith(ATTR_PREFIX):
        name = label[len(ATTR_PREFIX):]
        if name not in dataset.attr_names:
            raise ConfigError(f"classifier.label: {label!r}: the dataset has no attribute "
                              f"{name!r}; attributes: {', '.join(dataset.attr_names) or '(none)'}")
        column = dataset.attributes[:, dataset.attr_names.index(name)].numpy().astype(np.int64)
        return column, [f"not {name}", name]
    if label.startswith(SIDE_PREFIX):
        values = side_column(dataset, label[len(SIDE_PREFIX):], "classifier.label")
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ConfigError(f"classifier.label: {label!r} must be an integer column [N], got "
                              f"{values.dtype} {values.shape[1:]}")
        labels = values.astype(np.int64)
        count = int(labels.max()) + 1 if (labels >= 0).any() else 0
        return labels, [str(k) for k in range(count)]
    raise ConfigError(f"classifier.label: unknown label {label!r}; allowed: {LABEL_CLASS}, "
                      f"{ATTR_PREFIX}<name>, {SIDE_PREFIX}<table>.<column>")


def side_column(dataset: Any, spec: str, key: str) -> np.ndarray:
    """Side-table column ``<table>.<column>`` of ``dataset``'s folder aligned to its rows (the
    column is after the last dot: table names may hold dots, e.g. ``<run>.mscore``)."""
    from debiaslab.data.side_tables import join, read_side_table

    table, dot, column = spec.rpartition(".")
    if not (table and dot and column):
        raise ConfigError(f"{key}: {spec!r} must name a side table column as <table>.<column>")
    side = read_side_table(dataset.manifest.path, table, [column])
    return join(dataset.ids, side, column)


def image_data(dataset: Any, label: str = LABEL_CLASS, *,
               class_conditional: bool = False) -> ClassifierData:
    """A noisy-image classifier's rows of an ImageDataset: the rows that have a ``label``
    (see `dataset_labels`), conditioned on the dataset's class when ``class_conditional``."""
    labels, names = dataset_labels(dataset, label)
    keep = labels >= 0
    cond = None
    if class_conditional:
        cond = dataset.labels.numpy()
        keep &= cond >= 0
        cond = cond[keep]
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise DataError(f"{dataset.manifest.path}: no row has a {label!r} label")
    return ClassifierData(INPUT_IMAGES, dataset.images[torch.from_numpy(rows)], labels[keep],
                          names, cond=cond,
                          num_cond_classes=int(dataset.num_classes) if class_conditional else 0,
                          source_hash=str(dataset.content_hash), rows=torch.from_numpy(rows))


def feature_data(features: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                 class_names: Sequence[str], *, timesteps: np.ndarray | Tensor | None = None,
                 source_hash: str = "") -> ClassifierData:
    """A head's rows: float features [N, ...] (vectors or N-D tensors), int labels [N] in
    0..K-1 and K class names, optionally the timestep [N] each row was computed at."""
    return ClassifierData(INPUT_FEATURES, torch.as_tensor(np.asarray(features)), labels,
                          list(class_names), timesteps=timesteps, source_hash=source_hash)


def load_classifier_data(cfg: ExperimentConfig) -> ClassifierData:
    """``cfg.classifier``'s rows from the experiment's built training set (what Ray workers
    call): labels from ``classifier.label``; for input=features, the float side-table column
    ``classifier.features`` as inputs."""
    from debiaslab.data.locate import load_training_data

    c = cfg.classifier
    dataset = load_training_data(cfg)
    if c.input == INPUT_IMAGES:
        return image_data(dataset, c.label, class_conditional=cfg.model.class_conditional)
    if not c.features:
        raise ConfigError("classifier.features: input=features needs the side table column "
                          "<table>.<column> that holds the features")
    features = side_column(dataset, c.features, "classifier.features")
    labels, names = dataset_labels(dataset, c.label)
    keep = np.flatnonzero(labels >= 0)
    return ClassifierData(INPUT_FEATURES, torch.as_tensor(features[keep]), labels[keep], names,
                          source_hash=str(dataset.content_hash), rows=torch.from_numpy(keep))


def stratified_split(labels: Tensor | np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[Tensor, Tensor]:
    """(train, validation) row indices, sorted: round(val_fraction * n_c) random rows of each
    label c go to validation (at least one row of each label stays in training)."""
    labels = np.asarray(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"classifier.val_fraction: must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[:min(round(val_fraction * len(members)), len(members) - 1)])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return torch.from_numpy(train_idx).long(), torch.from_numpy(val_idx).long()


def split_data(cfg: ExperimentConfig, data: ClassifierData
               ) -> tuple[ClassifierData, ClassifierData]:
    """(training rows, validation rows) of ``data``: stratified by label,
    ``classifier.val_fraction`` held out, seeded by ``train.seed``."""
    train_idx, val_idx = stratified_split(data.labels, cfg.classifier.val_fraction,
                                          cfg.train.seed)
    return data.subset(train_idx), data.subset(val_idx)


def timestep_bounds(cfg: ExperimentConfig) -> tuple[int, int]:
    """Inclusive [lo, hi] of the training timesteps: ``classifier.timestep_range`` or 0..T-1."""
    T = cfg.diffusion.num_timesteps
    rng = cfg.classifier.timestep_range
    if not rng:
        return 0, T - 1
    if len(rng) != 2 or not 0 <= rng[0] <= rng[1] <= T - 1:
        raise ConfigError(f"classifier.timestep_range: must be [lo, hi] with 0 <= lo <= hi <= "
                          f"{T - 1} (diffusion.num_timesteps - 1), got {list(rng)}")
    return int(rng[0]), int(rng[1])


# ------------------------------------------------------------------------------------ task


def classifier_logits(model: nn.Module, x: Tensor, *, t: Tensor | None = None,
                      noise: Tensor | None = None, schedule: VPSchedule | None = None,
                      y: Tensor | None = None) -> Tensor:
    """Logits of ``model``: on x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise when ``noise`` is
    given (noisy images), else on ``x`` (features), at float timesteps t (if any)."""
    if noise is not None:
        if schedule is None or t is None:
            raise ValueError("noisy inputs need the timesteps t and the schedule")
        a, s = schedule.alpha_sigma(t, x)
        x = a * x + s * noise
    args = () if t is None else (t.to(x.device, torch.float32),)
    return model(x, *args, **({} if y is None else {"y": y}))


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


# ------------------------------------------------------------------------------------ evaluate


def bucket_edges(lo: int, hi: int, buckets: int) -> list[int]:
    """Integer edges of ``buckets`` equal-width buckets over lo..hi: bucket b is
    edges[b]..edges[b+1]-1 (fewer buckets when the range is narrower than ``buckets``)."""
    width = hi - lo + 1
    buckets = max(1, min(buckets, width))
    return [lo + (width * b) // buckets for b in range(buckets + 1)]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: ClassifierData, *, schedule: VPSchedule,
                        buckets: int, seed: int, timestep_range: tuple[int, int] | None = None,
                        device: str | torch.device | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy per timestep bucket (equal-width buckets over the
    timestep range, default 0..T-1), deterministic.

    Noisy images: every row is scored once in every bucket, at a timestep drawn uniformly from
    the bucket and with noise, both from the row's own generator (seed, row index). Features with
    timesteps: rows fall into the bucket of their timestep; without: one bucket of all rows.
    Returns lists ``t_lo``, ``t_hi``, ``accuracy``, ``loss``, ``count`` and the means
    ``accuracy_mean``, ``loss_mean`` over all scored rows (NaN where nothing was scored).
    """
    lo, hi = timestep_range or (0, schedule.num_timesteps - 1)
    time_free = data.kind == INPUT_FEATURES and data.timesteps is None
    edges = [lo, hi + 1] if time_free else bucket_edges(lo, hi, buckets)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, nb = len(data), len(edges) - 1
    correct, loss_sum, count = np.zeros(nb), np.zeros(nb), np.zeros(nb, dtype=np.int64)
    if data.kind == INPUT_IMAGES and n:
        for b in range(nb):
            for s in range(0, n, EVAL_BATCH):
                idx = torch.arange(s, min(s + EVAL_BATCH, n))
                t, noise = _eval_draws(data, idx, b, edges, seed)
                y = (data.cond[idx].to(device) if data.cond is not None and _conditional(model)
                     else None)
                logits = classifier_logits(model, data.float_inputs(idx).to(device),
                                           t=t.to(device), noise=noise.to(device),
                                           schedule=schedule, y=y)
                _accumulate(logits, data.labels[idx], b, correct, loss_sum, count)
    elif n:
        if time_free:
            which = torch.zeros(n, dtype=torch.long)
        else:
            cuts = torch.tensor(edges[1:-1], dtype=torch.float32)
            which = torch.bucketize(data.timesteps, cuts, right=True)
        for s in range(0, n, EVAL_BATCH):
            idx = torch.arange(s, min(s + EVAL_BATCH, n))
            t = None if data.timesteps is None else data.timesteps[idx].to(device)
            logits = classifier_logits(model, data.float_inputs(idx).to(device), t=t)
            for b in which[idx].unique().tolist():
                mask = which[idx] == b
                _accumulate(logits[mask.to(logits.device)], data.labels[idx][mask], b, correct,
                            loss_sum, count)
    model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty buckets: NaN
        return {
            "t_lo": edges[:-1], "t_hi": [e - 1 for e in edges[1:]],
            "accuracy": (correct / count).tolist(), "loss": (loss_sum / count).tolist(),
            "count": count.tolist(), "accuracy_mean": float(correct.sum() / count.sum()),
            "loss_mean": float(loss_sum.sum() / count.sum()),
        }


def _eval_draws(data: ClassifierData, idx: Tensor, bucket: int, edges: list[int], seed: int
                ) -> tuple[Tensor, Tensor]:
    """Timesteps (uniform in the bucket) and noise of rows ``idx`` in ``bucket``, each from the
    generator of (seed, row, bucket): the same whatever the batching or the other rows."""
    nb = len(edges) - 1
    lo, width = edges[bucket], edges[bucket + 1] - edges[bucket]
    t = torch.empty(len(idx), dtype=torch.long)
    noise = torch.empty((len(idx),) + data.shape)
    for i, row in enumerate(data.rows[idx].tolist()):
        g = torch.Generator().manual_seed((seed * _EVAL_SEED_STRIDE + row) * nb + bucket)
        t[i] = lo + int(torch.randint(0, width, (1,), generator=g))
        noise[i] = torch.randn(data.shape, generator=g)
    return t, noise


def _conditional(model: nn.Module) -> bool:
    return getattr(model, "num_classes_cond", None) is not None


def _accumulate(logits: Tensor, labels: Tensor, bucket: int, correct: np.ndarray,
                loss_sum: np.ndarray, count: np.ndarray) -> None:
    logits = logits.float().cpu()
    correct[bucket] += float((logits.argmax(1) == labels).sum())
    loss_sum[bucket] += float(F.cross_entropy(logits, labels, reduction="sum"))
    count[bucket] += len(labels)


def evaluation_metrics(evaluation: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Flat MLflow metrics of an evaluation: ``val/accuracy``, ``val/loss`` and per bucket
    ``val/accuracy_t<lo>-<hi>``, ``val/loss_t<lo>-<hi>``."""
    out = {f"{prefix}/accuracy": evaluation["accuracy_mean"],
           f"{prefix}/loss": evaluation["loss_mean"]}
    for lo, hi, acc, loss in zip(evaluation["t_lo"], evaluation["t_hi"],
                                 evaluation["accuracy"], evaluation["loss"]):
        out[f"{prefix}/accuracy_t{lo}-{hi}"] = acc
        out[f"{prefix}/loss_t{lo}-{hi}"] = loss
    return out


def plot_classifier_evaluation(evaluation: dict[str, Any], title: str = "") -> Any:
    """A matplotlib Figure of validation accuracy (left axis) and cross-entropy (right axis) per
    timestep bucket (no pyplot state: save it with ``fig.savefig``)."""
    from matplotlib.figure import Figure

    mid = [(lo + hi) / 2 for lo, hi in zip(evaluation["t_lo"], evaluation["t_hi"])]
    fig = Figure(figsize=(6.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(mid, evaluation["accuracy"], "o-", color="tab:blue", label="accuracy")
    ax.set_xlabel("timestep t (bucket centre)")
    ax.set_ylabel("validation accuracy", color="tab:blue")
    ax.set_ylim(0.0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(mid, evaluation["loss"], "s--", color="tab:red", label="cross-entropy")
    ax2.set_ylabel("validation cross-entropy", color="tab:red")
    ax.set_title(title or "classifier validation per timestep bucket")
    return fig


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
