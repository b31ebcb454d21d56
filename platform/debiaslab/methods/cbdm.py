"""Class-Balancing Diffusion Models: Qin et al., "Class-Balancing Diffusion Models", CVPR 2023
(docs/algorithms.md §4): a regularizer that pulls each class-conditional eps prediction toward the
prediction for a random other class y', with CFG sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from debiaslab.diffusion.losses import DenoisingLoss, mean_per_sample
from debiaslab.errors import ConfigError
from debiaslab.methods.api import (
    LOSSES,
    Recipe,
    Registry,
    diffusion_stages,
    register_recipe,
    register_section,
    requires,
)
from debiaslab.strict import check_registered

# Where y' comes from (docs/algorithms.md §4.2 FLAG): the official code uses the empirical training
# label frequencies when training from scratch and the uniform prior when fine-tuning.
TARGET_DISTRIBUTIONS: Registry = Registry("cbdm target distribution")


@dataclass
class CBDMConfig:
    """The ``cbdm:`` section: the class-balancing regularizer (docs/algorithms.md §4.2), used
    when diffusion.loss = cbdm. The one place its defaults are written."""

    tau: float = 1.0
    gamma: float = 0.25  # the official code's hard-coded 1/4
    target_distribution: str = "train"  # where y' is drawn from: TARGET_DISTRIBUTIONS

    affects_training = True  # part of the train stage's key and of the resume check

    def check(self, cfg: Any) -> None:
        check_registered("cbdm.target_distribution", self.target_distribution,
                         TARGET_DISTRIBUTIONS)
        if self.tau < 0 or self.gamma < 0:
            raise ConfigError(f"cbdm.tau and cbdm.gamma must be >= 0, got {self.tau}, "
                              f"{self.gamma}")
        if cfg.diffusion.loss == "cbdm" and not cfg.model.class_conditional:
            raise ConfigError("diffusion.loss=cbdm: needs model.class_conditional: true")


register_section("cbdm", CBDMConfig)


@TARGET_DISTRIBUTIONS.register("train")
def train_frequencies(class_counts: Tensor) -> Tensor:
    """pi_c = n_c / sum n: the (long-tailed) training set's label frequencies."""
    counts = class_counts.double()
    if counts.sum() <= 0:
        raise ConfigError("cbdm.target_distribution=train: the training set has no labels")
    return counts / counts.sum()


@TARGET_DISTRIBUTIONS.register("uniform")
def uniform(class_counts: Tensor) -> Tensor:
    """pi_c = 1 / C: the balanced label prior."""
    return torch.full((len(class_counts),), 1.0 / len(class_counts), dtype=torch.float64)


def cbdm_regularizer(e: Tensor, e_prime: Tensor, t: Tensor, num_timesteps: int, tau: float,
                     gamma: float) -> Tensor:
    """Qin et al. 2023, Eq. 9 as implemented (docs/algorithms.md §4.2), per sample [B]:

        L_reg = (t/T) tau ( ||e - sg(e')||^2 + gamma ||sg(e) - e'||^2 ),

    e = eps(x_t, t, y), e' = eps(x_t, t, y'); squared norms are means over elements (as in the
    official code); sg is stop-gradient. The first term pulls e toward e', the gamma term is the
    commitment-style pull of e' toward e.
    """
    e, e_prime = e.float(), e_prime.float()
    scale = tau * t.to(e.device, torch.float32) / num_timesteps
    reg = mean_per_sample((e - e_prime.detach()) ** 2)
    com = mean_per_sample((e.detach() - e_prime) ** 2)
    return scale * (reg + gamma * com)


@LOSSES.register("cbdm")
class CBDMLoss(DenoisingLoss):
    """Qin et al. 2023, Eq. 9: L = L_DM + tau * t/T * (L_reg + gamma L_com), per sample.

    y' ~ Categorical(pi) i.i.d. per sample (``draw_inputs``, from the trainer's per-step
    generator); the regularizer is skipped for samples whose label was dropped to the null label
    (with whole-batch dropout: on unconditional steps). e and e' come from one forward pass on the
    doubled batch, so DDP sees a single forward per step.
    """

    def __init__(self, *args: Any, tau: float = CBDMConfig.tau, gamma: float = CBDMConfig.gamma,
                 target_distribution: str = CBDMConfig.target_distribution,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.target.name != "eps":
            raise ConfigError(f"diffusion.target: cbdm's regularizer is defined on eps "
                              f"predictions; got {self.target.name!r}")
        self.tau, self.gamma = tau, gamma
        self.target_distribution = target_distribution
        self.pi: Tensor | None = None
        self.null_label: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "CBDMLoss":
        base = DenoisingLoss.from_config(cfg)
        c = cfg.cbdm
        TARGET_DISTRIBUTIONS.get(c.target_distribution)  # unknown names fail here
        return cls(base.schedule, base.target.name, base.weighting, base.apply, tau=c.tau,
                   gamma=c.gamma, target_distribution=c.target_distribution)

    def setup(self, class_counts: Tensor, null_label: int | None) -> None:
        if null_label is None:
            raise ConfigError("diffusion.loss=cbdm needs a class-conditional model "
                              "(model.class_conditional: true and a labelled dataset)")
        self.pi = TARGET_DISTRIBUTIONS.get(self.target_distribution)(class_counts)
        self.null_label = null_label

    def draw_inputs(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        if self.pi is None:
            raise RuntimeError("CBDMLoss.setup() was not called")
        y_prime = torch.multinomial(self.pi, batch, replacement=True, generator=generator)
        return {"y_prime": y_prime}

    def __call__(self, model: nn.Module, x0: Tensor, level: Tensor, noise: Tensor,
                 **cond: Any) -> Tensor:
        y, y_prime = cond.pop("y"), cond.pop("y_prime")
        active = y != self.null_label
        x_t, _, _ = self.noisy(x0, level, noise)
        t = level.to(x0.device, torch.float32)
        if not bool(active.any()):  # an unconditional step: plain denoising loss
            out = model(x_t, t, y=y, **cond)
            return self.weight(level, x0) * mean_per_sample((out.float() - noise) ** 2)
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, y_prime]),
                    **doubled)
        e, e_prime = out.chunk(2)
        mse = mean_per_sample((e.float() - noise) ** 2)
        reg = cbdm_regularizer(e, e_prime, level, self.schedule.num_timesteps, self.tau,
                               self.gamma)
        return self.weight(level, mse) * mse + torch.where(active, reg, torch.zeros_like(reg))


register_recipe(Recipe(
    "cbdm", diffusion_stages(), check=requires("cbdm", "diffusion.loss", "cbdm"),
    description="Qin et al. 2023: class-balancing regularizer in training, CFG at sampling"))
