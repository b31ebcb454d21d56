"""Typed, strict experiment config: YAML files plus dotted ``--set a.b=c`` overrides.

Unknown keys and bad values are one-line :class:`ConfigError` s naming the key and what is allowed.

- ``schema``: the typed sections and the method-owned ones (register_section);
- ``keys``: the keys that define a trained model, and what a resume may ignore or adjust;
- ``validate``: value checks, plus those methods and higher layers add (register_validator);
- ``io``: loading (files, overrides, saved dicts) and dumping.
"""

from debiaslab.config.io import (
    REMOVED_KEYS,
    absolute_paths,
    drop_removed_keys,
    dump_yaml,
    from_dict,
    from_saved_dict,
    load_config,
)
from debiaslab.config.keys import (
    RESUME_ADJUSTABLE,
    RESUME_COMPARED_DATA,
    RESUME_IGNORED,
    TRAIN_KEYS,
    resume_ignored,
    training_keys,
)
from debiaslab.config.schema import (
    SECTIONS,
    ClassifierConfig,
    DataConfig,
    DiffusionConfig,
    DistributedConfig,
    ExperimentConfig,
    MetricsConfig,
    ModelConfig,
    SampleConfig,
    TrackingConfig,
    TrainConfig,
    dataset_key,
    register_section,
    to_dict,
    with_section,
)
from debiaslab.config.validate import VALIDATORS, check_name, register_validator, validate
from debiaslab.strict import apply_overrides, load_yaml

__all__ = ["REMOVED_KEYS", "RESUME_ADJUSTABLE", "RESUME_COMPARED_DATA", "RESUME_IGNORED",
           "SECTIONS", "TRAIN_KEYS", "VALIDATORS", "ClassifierConfig", "DataConfig",
           "DiffusionConfig", "DistributedConfig", "ExperimentConfig", "MetricsConfig",
           "ModelConfig", "SampleConfig", "TrackingConfig", "TrainConfig", "absolute_paths",
           "apply_overrides", "check_name", "dataset_key", "drop_removed_keys", "dump_yaml",
           "from_dict", "from_saved_dict", "load_config", "load_yaml", "register_section",
           "register_validator", "resume_ignored", "to_dict", "training_keys", "validate",
           "with_section"]
