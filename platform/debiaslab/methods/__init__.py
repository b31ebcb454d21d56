"""One module per paper; importing this package registers every method's components and recipes.

The plain diffusion recipe (data -> train -> sample -> evaluate, stages.diffusion_stages) is
registered here: it is the baseline every method is compared with.
"""

from debiaslab.methods.api import Recipe, diffusion_stages, register_recipe

register_recipe(Recipe(
    "diffusion", diffusion_stages(),
    description="a score model with the configured loss and weighting, sampled with the "
                "configured guidance"))

from debiaslab.methods import (  # noqa: E402,F401
    balancing_act,
    cbdm,
    classifier_guidance,
    debias,
    minority_guidance,
    tiw_dsm,
)
