"""A method plugin for tests: a guidance component whose eps depends on the whole batch (as
Balancing Act's distribution guidance does), eps' = eps + scale * mean_batch(x_t). Loaded in
Ray workers through DEBIASLAB_PLUGINS, as a user's own method module would be."""

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from debiaslab.diffusion.guidance import GUIDANCE, Guided


@dataclass
class BatchMeanSpec:
    scale: float = 0.5


if "batch_mean" not in GUIDANCE:
    @GUIDANCE.register("batch_mean")
    class BatchMeanGuidance(Guided):
        Spec = BatchMeanSpec

        def __init__(self, inner: Any, scale: float) -> None:
            super().__init__(inner)
            self.scale = scale

        @classmethod
        def build(cls, inner: Any, spec: BatchMeanSpec, ctx: Any) -> "BatchMeanGuidance":
            return cls(inner, spec.scale)

        def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
            return self.inner(x_t, t, **cond) + self.scale * x_t.mean(0, keepdim=True)
