"""The experiment's typed sections, and the method-owned sections registered beside them.

Every section is a dataclass with defaults; the strict converter (debiaslab.strict) fills them
from YAML and overrides, refusing unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from debiaslab.registry import plugin_hint


@dataclass
class DataConfig:
    """Which images to train on and how to skew them (data build)."""

    source: str = "digits"
    path: str = ""
    source_options: dict[str, Any] = field(default_factory=dict)
    imbalance: str = "long_tail"  # data.sources.IMBALANCES
    imb_factor: float = 0.1
    bias_attribute: str = ""  # attribute_bias: a name, or names joined by + (a joint bias)
    bias_ratio: float = 0.9
    reference_fraction: float = 0.05  # of the source's images (attribute_bias, long_tail_reference)
    reference_count: int = 0  # > 0: the reference set's size, instead of reference_fraction
    # builds with a reference set: what the score model trains on (observed = biased U reference)
    train_on: Literal["biased", "reference", "observed"] = "biased"
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
    # a classifier checkpoint (file or run folder of `debiaslab classifier`) whose label is the
    # subgroup a method's bias statistic counts ("class" or "attr:<name>"), applied to clean
    # samples at t = 0; "" = the extractor's own predictions (the digits extractor's)
    subgroup_classifier: str = ""
    # the subgroups a method's bias statistic counts: "" = what the build is biased in (class
    # or the bias attribute); else "class", "attr:<name>", or parts joined by "+" (joint)
    subgroups: str = ""
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


def dataset_key(data: DataConfig) -> str:
    """A readable folder name for a built dataset (e.g. ``digits-lt0.1-s0``), plus a short hash of
    ``data.path`` (absolute) and ``data.source_options`` when they are set, so two image folders
    never share a dataset folder."""
    reference = (f"-ref{data.reference_count}n" if data.reference_count
                 else f"-ref{data.reference_fraction:g}")
    key = {"none": data.source, "long_tail": f"{data.source}-lt{data.imb_factor:g}",
           "attribute_bias": f"{data.source}-bias-{data.bias_attribute}{data.bias_ratio:g}"
                             f"{reference}",
           "long_tail_reference": f"{data.source}-lt{data.imb_factor:g}{reference}",
           }[data.imbalance]
    key = f"{key}-s{data.seed}"
    if data.path or data.source_options:  # where the images come from is part of the key
        import hashlib
        import json

        path = data.path if "://" in data.path or not data.path else str(Path(data.path).resolve())
        blob = json.dumps({"path": path, "options": data.source_options}, sort_keys=True,
                          default=str)
        key += "-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
    return key


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
