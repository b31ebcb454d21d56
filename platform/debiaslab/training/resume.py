"""What resume may and may not change: a resumed run must mean the same as the run it continues.

A checkpoint carries its config and the content hash of the data it trained on. Resuming compares
them with the current config: keys that only steer bookkeeping (``RESUME_IGNORED``: how long,
how often to log or checkpoint, where files go, sampling and evaluation, and method sections the
score model does not read) may differ freely; keys
listed in ``train.resume_allow`` (a subset of ``RESUME_ADJUSTABLE``) may differ and are reported;
any other difference, a different dataset, or ``train.steps`` below the checkpoint's step is a
one-line :class:`CheckpointError` that lists the keys. Checkpoints of multi-worker Ray runs from
before ``train.batch_size`` meant the global batch (no ``batch`` entry) are refused too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.config import (
    RESUME_ADJUSTABLE,
    RESUME_COMPARED_DATA,
    ExperimentConfig,
    drop_removed_keys,
    resume_ignored,
    to_dict,
)
from debiaslab.errors import CheckpointError
from debiaslab.strict import flatten

WORLD_SIZE_KEY = "distributed.num_workers"
# inputs.<artifact>.hash of a stage's bound inputs is compared (a new discriminator is another
# run) when the current config has its inputs bound (a running stage), their paths never; the
# dataset is compared by its content hash already
INPUTS_PREFIX = "inputs."
MAX_KEYS_SHOWN = 8


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys by the one flattening rule (strict.flatten), tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(d).items()}


def _compared(key: str, cfg: ExperimentConfig | None = None) -> bool:
    if key.startswith(INPUTS_PREFIX):  # the stage's input artifacts: their content, not where
        return key.endswith(".hash") and not key.startswith(f"{INPUTS_PREFIX}dataset.")
    if key in RESUME_COMPARED_DATA or key == WORLD_SIZE_KEY:
        return True
    return not any(key == p or (p.endswith(".") and key.startswith(p))
                   for p in resume_ignored(cfg))


def _world_size(flat: dict[str, Any]) -> int:
    """Workers that split the global batch: Ray Train's workers, or one local process."""
    if flat.get("distributed.backend", "local") != "ray":
        return 1
    return int(flat.get(WORLD_SIZE_KEY, 1))


def config_differences(saved: dict[str, Any], current: ExperimentConfig) -> dict[str, tuple]:
    """{key: (checkpoint value, current value)} for every compared key that differs."""
    old, new = _flat(drop_removed_keys(saved)), _flat(to_dict(current))
    old[WORLD_SIZE_KEY], new[WORLD_SIZE_KEY] = _world_size(old), _world_size(new)
    defaults = _flat(to_dict(ExperimentConfig()))
    diffs = {}
    bound = bool(current.inputs)  # unbound (a preflight, `debiaslab train`): not known yet
    for key in sorted(set(old) | set(new)):
        if not _compared(key, current) or (key.startswith(INPUTS_PREFIX) and not bound):
            continue
        # a key the checkpoint predates had its default value then
        before = old.get(key, defaults.get(key))
        after = new.get(key, defaults.get(key))
        if before != after:
            diffs[key] = (before, after)
    return diffs


def check_batch_semantics(state: dict[str, Any], source: Path) -> None:
    """Refuse a checkpoint written when ``train.batch_size`` was per worker by a run of several
    Ray Train workers: it trained at a global batch of num_workers x batch_size."""
    if "batch" in state:  # written since train.batch_size means the global batch
        return
    flat = _flat(drop_removed_keys(state.get("config", {})))
    workers = _world_size(flat)
    if workers > 1:
        per_worker = flat.get("train.batch_size")
        raise CheckpointError(
            f"{source}: written when train.batch_size was per worker ({workers} workers x "
            f"{per_worker}); train.batch_size now means the global batch, so resuming would "
            f"change the run; use a new name or output_dir")


def check_resume(cfg: ExperimentConfig, state: dict[str, Any], source: Path,
                 dataset_hash: str | None = None) -> dict[str, tuple]:
    """Refuse a resume that would change what the run means; return the allowed changes."""
    step = int(state.get("step", 0))
    if cfg.train.steps < step:
        raise CheckpointError(
            f"{source}: the run is already at step {step}, above train.steps={cfg.train.steps}; "
            f"raise train.steps to continue, or use a new name to start over")
    check_batch_semantics(state, source)
    saved_hash = state.get("data", {}).get("content_hash")
    if dataset_hash is not None and saved_hash and saved_hash != dataset_hash:
        raise CheckpointError(
            f"{source}: trained on dataset {saved_hash[:12]}, the configured data is "
            f"{dataset_hash[:12]}; use a new name or output_dir to train on other data")
    diffs = config_differences(state.get("config", {}), cfg)
    refused = {k: v for k, v in diffs.items() if k not in cfg.train.resume_allow}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in
                          list(refused.items())[:MAX_KEYS_SHOWN])
        more = f" (+{len(refused) - MAX_KEYS_SHOWN} more)" if len(refused) > MAX_KEYS_SHOWN else ""
        adjustable = [k for k in refused if k in RESUME_ADJUSTABLE]
        hint = (f"list {', '.join(adjustable)} in train.resume_allow to accept" if adjustable
                and len(adjustable) == len(refused) else "use a new name or output_dir")
        raise CheckpointError(f"{source}: config differs from the checkpoint's in {shown}{more}; "
                              f"{hint}")
    return diffs


def describe_changes(diffs: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
