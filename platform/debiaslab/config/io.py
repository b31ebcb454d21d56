"""Configs from YAML files, overrides and saved dicts (strict), and back to YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from debiaslab.config.schema import SECTIONS, ExperimentConfig
from debiaslab.config.validate import validate
from debiaslab.strict import apply_overrides, convert, from_mapping, load_yaml


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
