"""The shared stages every diffusion recipe is built from, and the stage builders methods use.

- ``data``: build (or reuse) the dataset;
- ``train``: the score model (local Trainer or Ray Train), with the resume checks;
- ``sample``: every configured sampler and guidance (local or Ray Data, same batches);
- ``evaluate``: metrics against the reference set, and the evaluation table;
- ``aux_model``: :func:`aux_model_stage`, any number of auxiliary models per recipe;
- ``side_table``: :func:`side_table_stage`, a map of the dataset to side-table columns;
- ``compose``: :func:`diffusion_stages`, data -> [before_train] -> train -> [extra] -> sample ->
  evaluate.

The experiment runner (``debiaslab.experiment``) runs a recipe built from them.
"""

from debiaslab.stages.aux_model import (
    AuxModelKind,
    aux_model_keys,
    aux_model_stage,
    train_aux_model,
)
from debiaslab.stages.common import StageResult, on_ray
from debiaslab.stages.compose import diffusion_stages
from debiaslab.stages.data import build_data, check_recipe, data_recipe, data_stage
from debiaslab.stages.evaluate import (
    EVAL_TABLE_COLUMNS,
    KID_MIN_SAMPLES,
    build_metric_extractor,
    eval_notes,
    eval_row,
    evaluate_run,
    evaluate_samples,
    evaluate_stage,
    extract_features,
    reference_path,
)
from debiaslab.stages.sample import sample, sample_on_ray, sample_stage
from debiaslab.stages.side_table import side_table_stage
from debiaslab.stages.train import check_resumable, resume_point, train, train_stage

__all__ = ["EVAL_TABLE_COLUMNS", "KID_MIN_SAMPLES", "AuxModelKind", "StageResult",
           "aux_model_keys", "aux_model_stage", "build_data", "build_metric_extractor",
           "check_recipe",
           "check_resumable", "data_recipe", "data_stage", "diffusion_stages", "eval_notes",
           "eval_row", "evaluate_run", "evaluate_samples", "evaluate_stage", "extract_features",
           "on_ray", "reference_path", "resume_point", "sample", "sample_on_ray", "sample_stage",
           "side_table_stage", "train", "train_aux_model", "train_stage"]
