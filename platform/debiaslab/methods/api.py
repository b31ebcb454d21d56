"""What a method module may use: the declared API for method authors.

A method is one module in this package plus configs. It registers its own components and builds
its recipe from these pieces only (never from the internals of stages, recipes or distributed):

- config: :func:`register_section` (its typed ``<name>:`` section; ``affects_training`` and
  ``check``), :func:`register_validator`, :class:`ExperimentConfig`, :class:`ClassifierConfig`
  (the type of an auxiliary model's section), :class:`ModelConfig` and :class:`TrainConfig`
  (its defaults), :func:`to_dict`;
- recipes: :class:`Recipe`, :class:`Stage`, :class:`StageOutput`, :func:`register_recipe`,
  :func:`requires`, :func:`make_artifact`, :func:`recorded_outputs`;
- the shared stages: :func:`diffusion_stages` (data -> [before_train] -> train -> [extra] ->
  sample -> evaluate), :func:`aux_model_stage` (any number of auxiliary models, each with its
  section, run, artifact and :class:`AuxModelKind`: how it trains and validates, a classifier
  by default), :func:`side_table_stage` (a Ray Data or local map of the dataset to
  side-table columns);
- registries of the foundation: LOSSES, WEIGHTINGS, GUIDANCE, NETS, SPACINGS (sampler
  grids), and :class:`Registry` for the method's own;
- :func:`log` for status lines, :func:`progress` for bars.

docs/architecture.md lists where each kind of component registers.
"""

from debiaslab.config import (
    ClassifierConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    register_section,
    register_validator,
    to_dict,
    with_section,
)
from debiaslab.diffusion.guidance import GUIDANCE
from debiaslab.diffusion.losses import LOSSES
from debiaslab.diffusion.schedules import SPACINGS
from debiaslab.diffusion.weighting import WEIGHTINGS
from debiaslab.nets import NETS
from debiaslab.progress import log, progress
from debiaslab.recipes import (
    Recipe,
    Stage,
    StageOutput,
    make_artifact,
    recorded_outputs,
    register_recipe,
    requires,
)
from debiaslab.registry import Registry
from debiaslab.stages import AuxModelKind, aux_model_stage, diffusion_stages, side_table_stage

__all__ = ["GUIDANCE", "LOSSES", "NETS", "SPACINGS", "WEIGHTINGS", "AuxModelKind",
           "ClassifierConfig", "ExperimentConfig", "ModelConfig", "TrainConfig",
           "Recipe", "Registry", "Stage", "StageOutput", "aux_model_stage", "diffusion_stages",
           "log", "make_artifact", "progress", "recorded_outputs", "register_recipe",
           "register_section", "register_validator", "requires", "side_table_stage",
           "to_dict", "with_section"]
