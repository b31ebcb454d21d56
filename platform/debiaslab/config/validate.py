"""Checks of values that types cannot express: ranges, registry names, options, names and
seeds; plus the checks method sections and higher layers add (``check``, register_validator)."""

from __future__ import annotations

import re
from typing import Callable

from debiaslab.config.keys import RESUME_ADJUSTABLE
from debiaslab.config.schema import SECTIONS, ExperimentConfig
from debiaslab.errors import ConfigError
from debiaslab.strict import check_options, check_registered


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
    from debiaslab.data.sources import SPLIT_IMBALANCES

    if cfg.data.train_on != "biased" and cfg.data.imbalance not in SPLIT_IMBALANCES:
        raise ConfigError(f"data.train_on: {cfg.data.train_on} needs a build with a reference "
                          f"set (data.imbalance: {' or '.join(SPLIT_IMBALANCES)}), got "
                          f"{cfg.data.imbalance}")
    if cfg.data.reference_count < 0:
        raise ConfigError(f"data.reference_count: must be >= 0 (0: use data.reference_fraction), "
                          f"got {cfg.data.reference_count}")
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
