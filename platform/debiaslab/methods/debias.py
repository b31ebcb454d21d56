"""Debias loss weighting: Yu et al., "Unmasking Bias in Diffusion Model Training", ECCV 2024."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from debiaslab.diffusion.weighting import Weighting
from debiaslab.methods.api import WEIGHTINGS, Recipe, diffusion_stages, register_recipe, requires


@WEIGHTINGS.register("debias")
@dataclass
class DebiasWeighting(Weighting):
    """Yu et al. 2024, Eq. 14 (and the released code): lambda_t = 1/sqrt(SNR_t) on the eps error.

    Equivalent weights on other targets (docs/algorithms.md §5.2): x0 loss sqrt(SNR_t), v loss
    sqrt(SNR_t)/(1 + SNR_t); ``apply="as_is"`` reproduces the code's 1/sqrt(SNR) on any target.
    """

    def eps_weight(self, snr: Tensor) -> Tensor:
        return snr.rsqrt()


register_recipe(Recipe(
    "debias", diffusion_stages(), check=requires("debias", "diffusion.weighting", "debias"),
    description="Yu et al. 2024: 1/sqrt(SNR) loss weighting"))
