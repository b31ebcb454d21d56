"""Typed, strict experiment config: YAML files plus dotted ``--set a.b=c`` overrides.

Unknown keys and bad values are one-line :class:`ConfigError` s naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from debiaslab.errors import ConfigError
from debiaslab.registry import plugin_hint
from debiaslab.strict import (  # noqa: F401  (apply_overrides, load_yaml: the config API)
    apply_overrides,
    check_options,
    check_registered,
    convert,
    from_mapping,
    load_yaml,
    set_path,
)


@dataclass
class DataConfig:
    """Which images to train on and how to skew them (data build)."""

    source: str = "digits"
    path: str = ""
    source_options: dict[str, Any] = field(default_factory=dict)
    imbalance: str = "long_tail"  # data.sources.IMBALANCES
    imb_factor: float = 0.1
    bias_attribute: str = ""
    bias_ratio: float = 0.9
    reference_fraction: float = 0.05
    seed: int = 0
    dataset_dir: str = ""  # default: <output_dir>/data/<experiment name's data key>
    augment: str = "none"  # data.augment.AUGMENTS


@dataclass
class ModelConfig:
    """Score network architecture (nets.NETS registry)."""

    net: str = "unet"
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 32
    dropout: float = 0.0
    class_conditional: bool = True
    # keyword options only some networks take (e.g. the encoder classifier's pool); checked
    # against the network's constructor by nets.build_net
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """Forward process, prediction target and loss weighting (docs/algorithms.md §5)."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    target: str = "eps"
    weighting: str = "constant"
    weighting_params: dict[str, float] = field(default_factory=dict)
    weighting_apply: Literal["equivalent", "as_is"] = "equivalent"
    loss: str = "denoising"
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class TrainConfig:
    """Optimisation: AdamW with linear warm-up, gradient clipping, EMA, label dropout for CFG."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    # per_sample: each label dropped to the null label with prob label_dropout; batch: one coin
    # per step drops the whole batch's labels (the official CBDM code)
    label_dropout_mode: Literal["per_sample", "batch"] = "per_sample"
    init_from: str = ""  # fine-tune: start from this checkpoint (file or run folder)'s weights
    init_weights: Literal["ema", "model"] = "ema"  # which weights of init_from
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    # keys that may differ from the checkpoint's config when resuming (RESUME_ADJUSTABLE);
    # any other difference in what defines the run is refused
    resume_allow: tuple[str, ...] = ()


def _classifier_model() -> "ModelConfig":
    return ModelConfig(net="encoder_classifier", model_channels=32, channel_mult=(1, 2, 2),
                       num_res_blocks=1, attention_resolutions=(), class_conditional=False)


def _classifier_train() -> "TrainConfig":
    return TrainConfig(steps=1000, batch_size=128, lr=3e-4, warmup_steps=0, ema_decay=0.0,
                       label_dropout=0.0, checkpoint_every=500)


@dataclass
class ClassifierConfig:
    """An auxiliary classifier trained by a recipe's classifier stage (training.classifier):
    p(label | x_t, t) on noisy images, or a head on the rows of a feature side table."""

    # which column is the label: "class", "attr:<name>" or "side:<table>.<column>"
    label: str = "class"
    input: Literal["noisy_images", "features"] = "noisy_images"
    features: str = ""  # input=features: the side table column "<table>.<column>"
    # timesteps t of the noisy inputs (diffusion.schedule's forward process): drawn uniformly
    # from 0..T-1, or from timestep_range [lo, hi] (inclusive) when it is set
    timestep_range: tuple[int, ...] = ()
    val_fraction: float = 0.1  # stratified hold-out for the per-timestep validation plot
    val_buckets: int = 10  # timestep buckets of that plot
    model: ModelConfig = field(default_factory=_classifier_model)
    train: TrainConfig = field(default_factory=_classifier_train)


@dataclass
class SampleConfig:
    """Sampling: sampler, steps, per-sample seeds, labels and guidance."""

    samplers: tuple[str, ...] = ("ddim", "dpmpp_2m")
    steps: int = 50
    num_samples: int = 100
    batch_size: int = 100
    seed_start: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    # guidance components wrapped around the model in list order (diffusion.guidance.GUIDANCE),
    # e.g. [{type: cfg, omega: 1.0}, {type: classifier, scale: 2.0, target: 3}]
    guidance: tuple[dict[str, Any], ...] = ()
    labels: Literal["balanced", "uniform", "none"] = "balanced"
    use_ema: bool = True
    # clip x0_hat to the data range [-1, 1] at every step of the VP samplers (ddpm, ddim,
    # dpmpp_2m), like guided-diffusion's clip_denoised and diffusers' clip_sample; ignored by
    # edm_heun (no clipping, as NVlabs/edm). sample.options.<sampler>.clip_x0 overrides it.
    clip_x0: bool = True


@dataclass
class MetricsConfig:
    """Evaluation protocol (docs/algorithms.md §6): extractor, reference set and metric settings."""

    extractor: str = "digits"
    inception_weights: str = ""
    reference: str = ""  # dataset folder; default: the source's full balanced set
    k: int = 5
    lof_k: int = 20
    head_fraction: float = 0.5
    bootstrap: int = 200
    kid_subset_size: int = 1000
    batch_size: int = 256
    seed: int = 0


@dataclass
class DistributedConfig:
    """Ray: whether heavy stages run on Ray, and with which resources (distributed/)."""

    # where stages run: auto = each stage's default (recipes.Stage.backend), or local / ray for
    # every stage
    backend: Literal["auto", "local", "ray"] = "auto"
    address: str = ""  # "" starts a local Ray (address="local"); "auto" or ray://... joins one
    num_workers: int = 1  # Ray Train DDP workers
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    storage_path: str = ""  # Ray Train storage; default <output_dir>/ray_results (absolute)
    object_store_memory_gb: float = 2.0
    map_concurrency: int = 1  # Ray Data actor-pool size for map jobs
    map_batch_size: int = 256
    map_num_cpus: float = 0.5
    map_num_gpus: float = 0.0


@dataclass
class TrackingConfig:
    """MLflow: experiment and run names (embedded SQLite store unless MLFLOW_TRACKING_URI)."""

    enabled: bool = True
    experiment: str = "debiaslab"
    run_name: str = ""
    group: str = ""  # runs that differ only by seed share a group (tag debiaslab.group); "" = name


@dataclass
class ExperimentConfig:
    """The unit of reproducibility: one YAML in configs/experiments/."""

    name: str = "experiment"
    # the method's recipe of stages (recipes.RECIPES): what `debiaslab run` executes
    recipe: str = "diffusion"
    output_dir: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # the running stage's input artifacts, {artifact: {path, hash}}: bound by the recipe engine
    # (recipes.bind_inputs; load_config drops a file's), so Ray workers and losses find what
    # earlier stages produced (e.g. a discriminator the score model's loss reads)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    # method-owned top-level sections (register_section), by name; read one as cfg.<name>
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        """``cfg.<section>`` for a method-owned section (its defaults when the config has none)."""
        if name in SECTIONS:
            value = self.__dict__.get("sections", {}).get(name)
            return SECTIONS[name]() if value is None else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}"
                             f"{plugin_hint()}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / "runs" / self.name

    @property
    def init_checkpoint(self) -> Path | None:
        """train.init_from as an absolute path (None when training from scratch)."""
        return Path(self.train.init_from).resolve() if self.train.init_from else None

    @property
    def dataset_path(self) -> Path:
        if self.data.dataset_dir:
            return Path(self.data.dataset_dir).resolve()
        return Path(self.output_dir).resolve() / "data" / dataset_key(self.data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# method-owned sections: a method module declares its own typed top-level section

SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> type:
    """Give a method its own top-level config section (``minority:`` for methods.minority_guidance),
    as strict as the built-in ones: YAML and ``--set minority.n_iter=3`` set it, ``cfg.minority``
    reads it, to_dict writes it (defaults included), sweeps vary it. A section may define
    ``check(self, cfg)`` (called by :func:`validate`) and ``affects_training = True`` when the
    score model's training depends on it (else resume ignores it)."""
    builtin = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if not dataclasses.is_dataclass(cls) or name in builtin or SECTIONS.get(name, cls) is not cls:
        raise ValueError(f"config section {name!r}: needs a dataclass and a new name")
    SECTIONS[name] = cls
    return cls


def with_section(cfg: ExperimentConfig, name: str, value: Any) -> ExperimentConfig:
    """``cfg`` with section ``name`` replaced (dataclasses.replace for method-owned sections)."""
    return dataclasses.replace(cfg, sections={**cfg.sections, name: value})


# The train stage's own keys; every section with ``affects_training`` is added (training_keys).
TRAIN_KEYS = ("model.", "diffusion.", "train.", "data.augment", "distributed.num_workers")


def training_keys() -> tuple[str, ...]:
    """The config keys that define a trained score model: TRAIN_KEYS plus every registered
    section whose ``affects_training`` is true (``cbdm.``, for instance)."""
    return TRAIN_KEYS + tuple(f"{name}." for name, cls in SECTIONS.items()
                              if getattr(cls, "affects_training", False))


def resume_ignored() -> tuple[str, ...]:
    """RESUME_IGNORED plus every method section the score model's training does not read."""
    return RESUME_IGNORED + tuple(f"{name}." for name, cls in SECTIONS.items()
                                  if not getattr(cls, "affects_training", False))


def dataset_key(data: DataConfig) -> str:
    """A readable folder name for a built dataset (e.g. ``digits-lt0.1-s0``), plus a short hash of
    ``data.path`` (absolute) and ``data.source_options`` when they are set, so two image folders
    never share a dataset folder."""
    key = {"none": data.source, "long_tail": f"{data.source}-lt{data.imb_factor:g}",
           "attribute_bias": f"{data.source}-bias-{data.bias_attribute}{data.bias_ratio:g}"
                             f"-ref{data.reference_fraction:g}"}[data.imbalance]
    key = f"{key}-s{data.seed}"
    if data.path or data.source_options:  # where the images come from is part of the key
        import hashlib
        import json

        path = data.path if "://" in data.path or not data.path else str(Path(data.path).resolve())
        blob = json.dumps({"path": path, "options": data.source_options}, sort_keys=True,
                          default=str)
        key += "-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
    return key


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build a config from a plain dict (missing keys take their defaults), strictly: the
    built-in sections and every registered method section (SECTIONS)."""
    raw = dict(raw or {})
    sections = {name: convert(raw.pop(name), cls, name) if name in raw else cls()
                for name, cls in SECTIONS.items()}
    cfg = from_mapping(ExperimentConfig, raw, skip=("sections",), also_allowed=sorted(SECTIONS))
    return dataclasses.replace(cfg, sections=sections)


# Keys older versions wrote that no longer mean anything (they are dropped from the configs
# embedded in old checkpoints; in a user's YAML they are unknown keys like any other).
REMOVED_KEYS = ("diffusion.formulation", "sample.cfg_omega")


def drop_removed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved config dict without the REMOVED_KEYS."""
    import copy

    out = copy.deepcopy(raw or {})
    for dotted in REMOVED_KEYS:
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def from_saved_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """The config embedded in a checkpoint or sent to a worker (older keys tolerated)."""
    return from_dict(drop_removed_keys(raw))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML, JSON and MLflow."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
    if isinstance(cfg, ExperimentConfig):  # method sections at the top level, defaults included
        out.pop("sections", None)
        for name in SECTIONS:
            out[name] = plain(dataclasses.asdict(getattr(cfg, name)))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults), apply overrides, validate types and names."""
    raw = load_yaml(path) if path else {}
    # a run folder's config.yaml records the stage's bound inputs; they are bound afresh for
    # every stage (recipes.bind_inputs), so a config file's are dropped, never trusted
    raw = {k: v for k, v in raw.items() if k != "inputs"}
    cfg = from_dict(apply_overrides(raw, overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Check values that types cannot express: ranges and registry names."""
    from debiaslab.data.augment import AUGMENTS
    from debiaslab.data.sources import IMBALANCES, SOURCES
    from debiaslab.diffusion.losses import LOSSES
    from debiaslab.diffusion.parameterization import TARGETS
    from debiaslab.diffusion.samplers import SAMPLERS
    from debiaslab.diffusion.schedules import SCHEDULES
    from debiaslab.diffusion.weighting import WEIGHTINGS, build_weighting
    from debiaslab.metrics.features import register_builtin_extractors
    from debiaslab.nets import NETS

    checks = [
        ("data.source", cfg.data.source, SOURCES),
        ("model.net", cfg.model.net, NETS),
        ("diffusion.schedule", cfg.diffusion.schedule, SCHEDULES),
        ("diffusion.target", cfg.diffusion.target, TARGETS),
        ("diffusion.weighting", cfg.diffusion.weighting, WEIGHTINGS),
        ("diffusion.loss", cfg.diffusion.loss, LOSSES),
        ("metrics.extractor", cfg.metrics.extractor, register_builtin_extractors()),
        ("data.imbalance", cfg.data.imbalance, IMBALANCES),
        ("data.augment", cfg.data.augment, AUGMENTS),
    ] + [(f"sample.samplers[{i}]", s, SAMPLERS) for i, s in enumerate(cfg.sample.samplers)]
    for key, value, registry in checks:
        check_registered(key, value, registry)
    try:
        build_weighting(cfg.diffusion.weighting, **cfg.diffusion.weighting_params)
    except ConfigError as exc:
        raise ConfigError(f"diffusion.weighting_params: {exc}") from None

    positive = {
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr, "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "sample.steps": cfg.sample.steps, "sample.num_samples": cfg.sample.num_samples,
        "sample.batch_size": cfg.sample.batch_size,
        "model.model_channels": cfg.model.model_channels,
        "diffusion.num_timesteps": cfg.diffusion.num_timesteps,
        "data.imb_factor": cfg.data.imb_factor, "metrics.k": cfg.metrics.k,
        "metrics.lof_k": cfg.metrics.lof_k, "metrics.batch_size": cfg.metrics.batch_size,
        "metrics.kid_subset_size": cfg.metrics.kid_subset_size,
        "distributed.num_workers": cfg.distributed.num_workers,
        "distributed.cpus_per_worker": cfg.distributed.cpus_per_worker,
        "distributed.object_store_memory_gb": cfg.distributed.object_store_memory_gb,
        "distributed.map_concurrency": cfg.distributed.map_concurrency,
        "distributed.map_batch_size": cfg.distributed.map_batch_size,
        "distributed.map_num_cpus": cfg.distributed.map_num_cpus,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    unit = {
        "train.ema_decay": cfg.train.ema_decay, "train.label_dropout": cfg.train.label_dropout,
        "model.dropout": cfg.model.dropout, "data.imb_factor": cfg.data.imb_factor,
        "data.bias_ratio": cfg.data.bias_ratio,
        "data.reference_fraction": cfg.data.reference_fraction,
        "metrics.head_fraction": cfg.metrics.head_fraction,
    }
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {value}")
    if cfg.distributed.max_failures < 0 or cfg.distributed.map_num_gpus < 0:
        raise ConfigError("distributed.max_failures and distributed.map_num_gpus must be >= 0")
    if cfg.metrics.bootstrap < 0:
        raise ConfigError(f"metrics.bootstrap: must be >= 0, got {cfg.metrics.bootstrap}")
    if cfg.train.warmup_steps < 0 or cfg.train.grad_clip < 0:
        raise ConfigError("train.warmup_steps and train.grad_clip must be >= 0")
    if cfg.sample.steps > cfg.diffusion.num_timesteps:
        raise ConfigError(
            f"sample.steps: must be <= diffusion.num_timesteps ({cfg.diffusion.num_timesteps}), "
            f"got {cfg.sample.steps}"
        )
    if not cfg.model.channel_mult:
        raise ConfigError("model.channel_mult: must list at least one multiplier")
    _validate_names_seeds_devices(cfg)
    _validate_model(cfg)
    _validate_options(cfg)
    _validate_classifier(cfg)
    for name in SECTIONS:
        check = getattr(getattr(cfg, name), "check", None)
        if check is not None:
            check(cfg)
    for validator in VALIDATORS:
        validator(cfg)


# Checks that layers above the schema add (register_validator): the recipe engine checks the
# recipe name against its registry, for instance. Each takes the config and raises ConfigError.
VALIDATORS: list[Callable[[ExperimentConfig], None]] = []


def register_validator(fn: Callable[[ExperimentConfig], None]) -> Callable[[ExperimentConfig],
                                                                           None]:
    """Add a check that :func:`validate` runs after its own (once per function)."""
    if fn not in VALIDATORS:
        VALIDATORS.append(fn)
    return fn


# Resume (training.resume): keys whose change never alters what a run means are ignored; these
# may change when the user lists them in train.resume_allow; every other difference is refused.
RESUME_ADJUSTABLE = ("train.lr", "train.warmup_steps", "train.grad_clip", "train.weight_decay",
                     "train.precision", "distributed.num_workers")
RESUME_IGNORED = ("name", "output_dir", "data.", "sample.", "metrics.", "tracking.", "classifier.",
                  "distributed.", "train.steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.device", "train.resume_allow",
                  "train.init_from", "train.init_weights")
RESUME_COMPARED_DATA = ("data.augment",)  # the dataset itself is compared by content hash


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
MAX_NAME_CHARS = 128
MAX_SEED = 2**31 - 1  # numpy, torch and the per-step seed arithmetic all stay in range below it
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_name(key: str, value: str) -> None:
    """Run and experiment names become folder names: one plain path component, no traversal."""
    if not NAME_PATTERN.match(value) or len(value) > MAX_NAME_CHARS:
        raise ConfigError(
            f"{key}: {value!r} is not a plain name; use letters, digits and . _ - + = "
            f"(no '/', no leading '.', at most {MAX_NAME_CHARS} characters)")


def _validate_names_seeds_devices(cfg: ExperimentConfig) -> None:
    check_name("name", cfg.name)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir: must not be empty")
    seeds = {"train.seed": cfg.train.seed, "data.seed": cfg.data.seed,
             "metrics.seed": cfg.metrics.seed, "sample.seed_start": cfg.sample.seed_start}
    for key, value in seeds.items():
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{key}: must be in [0, {MAX_SEED}], got {value}")
    last = cfg.sample.seed_start + cfg.sample.num_samples - 1
    if last > MAX_SEED:
        raise ConfigError(f"sample.seed_start + sample.num_samples - 1 = {last} exceeds "
                          f"{MAX_SEED}; lower sample.seed_start")
    if not DEVICE_PATTERN.match(cfg.train.device):
        raise ConfigError(f"train.device: unknown device {cfg.train.device!r}; allowed: auto, "
                          f"cpu, cuda, cuda:N, mps")


def _validate_model(cfg: ExperimentConfig) -> None:
    m = cfg.model
    if m.num_res_blocks < 1:
        raise ConfigError(f"model.num_res_blocks: must be >= 1, got {m.num_res_blocks}")
    if m.head_channels < 1:
        raise ConfigError(f"model.head_channels: must be >= 1, got {m.head_channels}")
    for field_name in ("channel_mult", "attention_resolutions"):
        values = getattr(m, field_name)
        bad = [v for v in values if v < 1]
        if bad:
            raise ConfigError(f"model.{field_name}: every entry must be >= 1, got "
                              f"{list(values)}")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must be >= 0, got {cfg.train.weight_decay}")
    if cfg.train.resume_allow:
        unknown = sorted(set(cfg.train.resume_allow) - set(RESUME_ADJUSTABLE))
        if unknown:
            raise ConfigError(f"train.resume_allow: {', '.join(unknown)} cannot change on "
                              f"resume; allowed: {', '.join(RESUME_ADJUSTABLE)}")


def _validate_classifier(cfg: ExperimentConfig) -> None:
    """The auxiliary classifier section (used by recipes with a classifier stage) and the
    global batch of every training section."""
    from debiaslab.nets import check_model_options, is_classifier

    c = cfg.classifier
    check_model_options(cfg.model, "model")
    check_model_options(c.model, "classifier.model")
    if not is_classifier(c.model.net):
        raise ConfigError(f"classifier.model.net: {c.model.net!r} is not a classifier network")
    if not 0.0 <= c.val_fraction < 1.0:
        raise ConfigError(f"classifier.val_fraction: must be in [0, 1), got {c.val_fraction}")
    if c.val_buckets < 1:
        raise ConfigError(f"classifier.val_buckets: must be >= 1, got {c.val_buckets}")
    T = cfg.diffusion.num_timesteps
    rng = c.timestep_range
    if rng and (len(rng) != 2 or not 0 <= rng[0] <= rng[1] <= T - 1):
        raise ConfigError(f"classifier.timestep_range: must be [lo, hi] with 0 <= lo <= hi <= "
                          f"{T - 1} (diffusion.num_timesteps - 1), got {list(rng)}")
    for key in ("steps", "batch_size", "lr", "log_every", "checkpoint_every",
                "keep_checkpoints"):
        if getattr(c.train, key) <= 0:
            raise ConfigError(f"classifier.train.{key}: must be > 0, got "
                              f"{getattr(c.train, key)}")
    if not 0.0 <= c.train.ema_decay <= 1.0:
        raise ConfigError(f"classifier.train.ema_decay: must be in [0, 1], got "
                          f"{c.train.ema_decay}")
    workers = cfg.distributed.num_workers
    for key, batch in (("train.batch_size", cfg.train.batch_size),
                       ("classifier.train.batch_size", c.train.batch_size)):
        if cfg.distributed.backend != "local" and batch % workers:
            raise ConfigError(f"{key}={batch} is the global batch; it is not divisible by "
                              f"distributed.num_workers={workers}")


def _validate_options(cfg: ExperimentConfig) -> None:
    """Free-form option mappings are checked against the components that will receive them,
    so a typo fails at --dry-run, not after a training run."""
    from debiaslab.data.sources import check_source_options
    from debiaslab.diffusion.guidance import guidance_spec
    from debiaslab.diffusion.samplers import SAMPLERS, sampler_options

    check_source_options(cfg.data.source, cfg.data.source_options)
    for i, entry in enumerate(cfg.sample.guidance):
        guidance_spec(entry, f"sample.guidance[{i}]")
    for sampler, options in cfg.sample.options.items():
        if sampler not in SAMPLERS:
            raise ConfigError(f"sample.options.{sampler}: unknown sampler; allowed: "
                              f"{', '.join(SAMPLERS.names())}")
        if not isinstance(options, dict):
            raise ConfigError(f"sample.options.{sampler}: expected a mapping of option: value, "
                              f"got {options!r}")
        check_options(f"sample.options.{sampler}", options, sampler_options(sampler))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose local paths are absolute (resolved against this process's working folder),
    for configs shipped to Ray workers that run elsewhere."""
    def absolute(value: str) -> str:
        return str(Path(value).resolve()) if value and "://" not in value else value

    return dataclasses.replace(
        cfg, output_dir=absolute(cfg.output_dir),
        data=dataclasses.replace(cfg.data, dataset_dir=absolute(cfg.data.dataset_dir),
                                 path=absolute(cfg.data.path)),
        train=dataclasses.replace(cfg.train, init_from=absolute(cfg.train.init_from)),
        metrics=dataclasses.replace(cfg.metrics, reference=absolute(cfg.metrics.reference)),
    )


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
