"""What every shared stage uses: the result a stage hands back, and where a stage runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig


def on_ray(cfg: ExperimentConfig, stage: str, backend: str | None = None) -> bool:
    """Whether ``stage`` runs on Ray: ``backend`` when the caller knows it (a running stage's
    StageContext.backend), else the recipe's rule (recipes.backend_of)."""
    if backend is not None:
        return backend == "ray"
    from debiaslab.recipes import backend_of

    return backend_of(cfg, stage) == "ray"


@dataclass
class StageResult:
    """Paths and numbers a stage produced (printed by the CLI, asserted by tests)."""

    run_dir: Path
    checkpoint: Path | None = None
    mlflow_run_id: str | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    evaluations: dict[str, Any] = field(default_factory=dict)  # sampler -> Evaluation
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time, stages run
