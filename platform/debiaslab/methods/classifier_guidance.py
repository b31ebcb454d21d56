"""Classifier guidance: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis",
NeurIPS 2021, §4, Algorithms 1 and 2 (docs/algorithms.md §8): the recipe that proves the stages.

Stages: data -> train (score model) -> classifier (a noise-conditional classifier p(y | x_t, t),
Ray Train) -> sample (``sample.guidance: [{type: classifier, ...}]``, whose checkpoint "" is this
recipe's classifier) -> evaluate. The guidance itself is the registered ``classifier`` component
(diffusion.guidance.ClassifierGuidance): eps' = eps - w sigma_t grad log p(y | x_t, t) (Eq. 14)
for DDIM / DPM-Solver, mu' = mu + w Sigma grad log p(y | x_t, t) for ancestral DDPM.
"""

from __future__ import annotations

from typing import Any

from debiaslab.errors import ConfigError
from debiaslab.methods.api import Recipe, aux_model_stage, diffusion_stages, register_recipe


def check_config(cfg: Any) -> None:
    """The sample stage must be guided by a classifier (else the classifier stage is wasted)."""
    if not any(e.get("type") == "classifier" for e in cfg.sample.guidance):
        raise ConfigError("recipe classifier_guidance: sample.guidance needs a classifier entry, "
                          "e.g. [{type: classifier, scale: 4.0, target: -1}]")
    if cfg.classifier.input != "noisy_images":
        raise ConfigError("recipe classifier_guidance: classifier.input must be noisy_images "
                          "(the guidance differentiates the classifier with respect to x_t)")


register_recipe(Recipe(
    "classifier_guidance",
    diffusion_stages(sample_inputs={"classifier": "checkpoint"},
                     extra=(aux_model_stage(
                         "classifier",
                         description="train the auxiliary classifier of cfg.classifier"),)),
    check=check_config,
    description="Dhariwal & Nichol 2021: a noise-conditional classifier guides an "
                "unconditional score model toward a target class"))
