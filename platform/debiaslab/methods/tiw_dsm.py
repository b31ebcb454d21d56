"""TIW-DSM: Kim et al., "Training Unbiased Diffusion Models From Biased Dataset", ICLR 2024
(docs/algorithms.md §2).

A large biased set D_bias ~ p_bias and a small unbiased reference D_ref ~ p_data. A discriminator
D(x_tau, tau) tells the two apart at every noise level of a VP diffusion, so that the ratio of the
*diffused* densities, w_t = p_data^t / p_bias^t, is D / (1 - D) (or 2D against a 50/50 mixture).
The score model's per-sample denoising loss is weighted by w_t and its target corrected by
sigma^2 grad log w_t; both use the same time-dependent ratio (Theorem 1).

This module holds the method's math (one function per equation), its ``tiw:`` config section and
its losses. The discriminator is a frozen module of the loss: the trainer runs it on its own
device and never trains, checkpoints or samples with it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from debiaslab.diffusion.losses import EDMLoss, mean_per_sample
from debiaslab.errors import ConfigError, DataError
from debiaslab.methods.api import (
    LOSSES,
    AuxModelKind,
    ClassifierConfig,
    ExperimentConfig,
    Recipe,
    aux_model_stage,
    diffusion_stages,
    make_artifact,
    register_recipe,
    register_section,
)
from debiaslab.tracking import metric_key

# The VP-SDE of the discriminator (Song et al. 2021; the official code's beta_min, beta_max) and
# the smallest diffusion time its tau sampler draws.
BETA_MIN = 0.1
BETA_MAX = 20.0
T_MIN = 1e-5
D_CLIP = 1e-5  # D is clipped to [D_CLIP, 1 - D_CLIP] before any ratio (official)
TIME_SCALE = 999.0  # tau in (0, 1] is multiplied by this before the network's time embedding

TIW_LOSSES = ("tiw_dsm", "iw_dsm")
Form = Literal["paper", "code"]


# ------------------------------------------------------------------------------ VP time

def vp_integral(t: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX) -> Tensor:
    """B(t) = int_0^t beta(s) ds = b0 t + (b1 - b0) t^2 / 2 for beta(t) = b0 + (b1 - b0) t."""
    return b0 * t + 0.5 * (b1 - b0) * t**2


def vp_mean(t: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX) -> Tensor:
    """m(t) = exp(-B(t) / 2): x_t = m(t) x_0 + s(t) z (the VP marginal's mean factor)."""
    return torch.exp(-0.5 * vp_integral(t, b0, b1))


def vp_std(t: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX) -> Tensor:
    """s(t) = sqrt(1 - m(t)^2), computed as sqrt(-expm1(-B)) to stay exact for small t."""
    return torch.sqrt(-torch.expm1(-vp_integral(t, b0, b1)))


def _inverse_integral(value: Tensor, b0: float, b1: float) -> Tensor:
    """The t >= 0 with B(t) = value (the positive root of the quadratic)."""
    return (-b0 + torch.sqrt(b0**2 + 2.0 * (b1 - b0) * value)) / (b1 - b0)


def tau_from_sigma(sigma: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX) -> Tensor:
    """The VP time whose marginal is the EDM (VE) level sigma after scaling: m(tau) =
    1 / sqrt(1 + sigma^2), i.e. B(tau) = log(1 + sigma^2) (§2.4)."""
    return _inverse_integral(torch.log1p(sigma**2), b0, b1)


def _log_expm1(b: Tensor) -> Tensor:
    """A = log(1 - e^{-B}) + B = log(e^B - 1), stable for small and large B."""
    return b + torch.log(-torch.expm1(-b))


def _a_range(b0: float, b1: float, t_min: float) -> tuple[Tensor, Tensor]:
    """(A(t_min), A(1)) in float64."""
    ends = torch.tensor([t_min, 1.0], dtype=torch.float64)
    a = _log_expm1(vp_integral(ends, b0, b1))
    return a[0], a[1]


def tau_density(t: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX,
                t_min: float = T_MIN) -> Tensor:
    """The density of :func:`sample_tau` on [t_min, 1]: p(t) = A'(t) / Z, where
    A'(t) = beta(t) / (1 - e^{-B(t)}) = g(t)^2 / s(t)^2 (likelihood weighting) and
    Z = A(1) - A(t_min)."""
    a_min, a_one = _a_range(b0, b1, t_min)
    t64 = t.to(torch.float64)
    return ((b0 + (b1 - b0) * t64) / -torch.expm1(-vp_integral(t64, b0, b1))
            / (a_one - a_min)).to(t.dtype)


def sample_tau(u: Tensor, b0: float = BETA_MIN, b1: float = BETA_MAX,
               t_min: float = T_MIN) -> Tensor:
    """Likelihood-weighting importance sampling of the diffusion time (Song et al. 2021; the
    discriminator's tau in Kim et al. 2024, §2.2) by inverting its CDF at u ~ U(0, 1):
    A(tau) = Z u + A(t_min), so B(tau) = log(1 + exp(Z u + A(t_min))) and tau is the positive
    root of B. Computed in float64 (A spans ~1e-5 to ~10)."""
    u64 = u.to(torch.float64)
    a_min, a_one = _a_range(b0, b1, t_min)
    b = torch.nn.functional.softplus((a_one - a_min) * u64 + a_min)  # log(1 + e^v)
    return _inverse_integral(b, b0, b1).to(u.dtype if u.is_floating_point() else torch.float32)


def perturb(x0: Tensor, tau: Tensor, noise: Tensor, b0: float = BETA_MIN,
            b1: float = BETA_MAX) -> Tensor:
    """x_tau = m(tau) x0 + s(tau) z: the VP marginal the discriminator is trained on."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    return vp_mean(tau, b0, b1).view(view) * x0 + vp_std(tau, b0, b1).view(view) * noise


# ------------------------------------------------------------------------------ the ratio

Discriminator = Callable[[Tensor, Tensor], Tensor]  # (x_vp [B, ...], tau [B]) -> P(ref) [B]


def log_ratio(d: Tensor, reference_share: float = 0.0) -> Tensor:
    """log w, w = p_data / p_train, from a clipped D ~ p_data / (p_data + p_bias) (§2.3, §2.4
    FLAG weight 2D). The score model's training set mixes reference and biased images with
    reference share pi: p_train = (1 - pi) p_bias + pi p_data. Since p_bias = p_data (1 - D) / D,
    w = D / ((1 - pi)(1 - D) + pi D):
    - training on D_bias (pi = 0): w = D / (1 - D);
    - on a 50/50 mixture (pi = 1/2, the released code's tiled reference): w = 2D;
    - on D_obs = D_bias U D_ref as it is: pi = |D_ref| / (|D_ref| + |D_bias|)."""
    return torch.log(d) - torch.log((1.0 - reference_share) * (1.0 - d) + reference_share * d)


@dataclass(frozen=True)
class TIWTerms:
    """Per sample: the loss weight [B] and the target correction (like x), both detached."""

    weight: Tensor
    correction: Tensor


def tiw_terms(disc: Discriminator, x: Tensor, sigma: Tensor, *, form: Form = "paper",
              reference_share: float = 0.0, alpha: float = 1.0, weight: bool = True,
              correction: bool = True, clip: float = D_CLIP, b0: float = BETA_MIN,
              b1: float = BETA_MAX) -> TIWTerms:
    """The time-dependent importance weight and score correction at EDM-space x = y + sigma n.

    The discriminator runs in VP space: tau = tau(sigma), x_vp = x / sqrt(1 + sigma^2). The
    gradient is taken w.r.t. x only, through D; its parameters receive nothing.

    - ``form: paper`` (Theorem 1 in EDM units): weight w^alpha, correction
      sigma^2 grad_x log w^alpha = alpha sigma^2 grad_x log w, so the target becomes
      y + sigma^2 grad log w: the bias denoiser's target moved onto the reference's.
    - ``form: code`` (the released TIW_EDMLoss formulas, §2.4): weight 2D, correction
      -sigma^2 grad_x D. Each sample gets its own weight here; the released code's broadcast,
      which gives every sample the batch's summed weight, is not reproduced.
    ``reference_share``: the reference images' share of the score model's training set
    (:func:`log_ratio`). ``weight`` / ``correction`` False drop one term (the C-only and W-only
    ablations)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32 at least (bf16 training)
    sigma = sigma.to(x.device, dtype)
    tau = tau_from_sigma(sigma, b0, b1)
    with torch.enable_grad():
        x_req = x.detach().to(dtype).requires_grad_(True)
        x_vp = x_req * vp_mean(tau, b0, b1).view(view)
        d = disc(x_vp, tau).to(dtype).reshape(-1).clamp(clip, 1.0 - clip)
        if form == "paper":
            log_w = alpha * log_ratio(d, reference_share)
            (grad,) = torch.autograd.grad(log_w.sum(), x_req)
            w = log_w.exp()
            shift = sigma.view(view) ** 2 * grad
        else:
            (grad,) = torch.autograd.grad(d.sum(), x_req)
            w = 2.0 * d
            shift = -(sigma.view(view) ** 2) * grad
    w = w.detach() if weight else torch.ones_like(d).detach()
    shift = shift.detach() if correction else torch.zeros_like(x_req).detach()
    return TIWTerms(weight=w, correction=shift.to(x.dtype))


def iw_weight(disc: Discriminator, x0: Tensor, *, reference_share: float = 0.0,
              alpha: float = 1.0, clip: float = D_CLIP) -> Tensor:
    """IW-DSM (paper Eq. 7): the time-INdependent weight w(x0)^alpha from a discriminator on
    clean images (tau = t_min), with no score correction. Detached, [B]."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    with torch.no_grad():
        tau = torch.full((x0.shape[0],), T_MIN, device=x0.device, dtype=dtype)
        d = disc(x0.to(dtype), tau).to(dtype).reshape(-1).clamp(clip, 1.0 - clip)
        return (alpha * log_ratio(d, reference_share)).exp()


def source_logits(net: nn.Module, x_tau: Tensor, tau: Tensor) -> Tensor:
    """The discriminator network's (biased, reference) logits at VP time tau, read by the
    network as tau * 999 (§2.2), in float32."""
    return net(x_tau, tau * TIME_SCALE).float()


class TimeDependentDiscriminator(nn.Module):
    """D(x_tau, tau) = P(reference | x_tau) (§2.2): a trained classifier over the data source
    (label 0 = biased, 1 = reference) that reads the continuous VP time as tau * 999. A network
    with one output is read as the reference logit, with two as (biased, reference) logits."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...] | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.net = net
        self.shape = tuple(shape) if shape is not None else None  # the images it was trained on
        self.source = source

    def forward(self, x_vp: Tensor, tau: Tensor) -> Tensor:
        if self.shape is not None and tuple(x_vp.shape[1:]) != self.shape:
            raise ConfigError(f"{self.source or 'the discriminator'}: trained on images of shape "
                              f"{list(self.shape)}, the score model's are "
                              f"{list(x_vp.shape[1:])}; train a discriminator on this dataset")
        logits = source_logits(self.net, x_vp, tau)
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0])
        if logits.shape[1] != 2:
            raise ConfigError(f"the discriminator has {logits.shape[1]} outputs; it needs 1 "
                              f"(reference logit) or 2 (biased, reference)")
        return torch.softmax(logits, dim=1)[:, REFERENCE_LABEL]


REFERENCE_LABEL = 1  # the source label of reference images (biased images: 0)
DISCRIMINATOR_ARTIFACT = "discriminator"


def reference_share(cfg: Any) -> float:
    """The reference images' share of the score model's training set: 0 on the biased set,
    |D_ref| / (|D_ref| + |D_bias|) on the observed set, 1 on the reference alone (from the
    built datasets' manifests)."""
    from debiaslab.data.schema import read_manifest
    from debiaslab.data.sources import BIASED_NAME, REFERENCE_NAME

    if cfg.data.train_on == "biased":
        return 0.0
    if cfg.data.train_on == "reference":
        return 1.0
    n_ref = read_manifest(cfg.dataset_path / REFERENCE_NAME).num_rows
    n_bias = read_manifest(cfg.dataset_path / BIASED_NAME).num_rows
    return n_ref / (n_ref + n_bias)


def load_discriminator(cfg: Any) -> TimeDependentDiscriminator:
    """The discriminator checkpoint the recipe bound into ``cfg.inputs`` (its discriminator
    stage's output), rebuilt from the checkpoint alone; a missing input or a checkpoint for
    other images is a one-line error."""
    from debiaslab.training.classifier import load_classifier

    bound = (cfg.inputs or {}).get(DISCRIMINATOR_ARTIFACT)
    if not bound:
        raise ConfigError(f"diffusion.loss={cfg.diffusion.loss}: needs the trained "
                          f"discriminator; run recipe tiw_dsm, whose discriminator stage "
                          f"binds it into the train stage's config")
    net, info = load_classifier(bound["path"])
    if info["num_outputs"] not in (1, 2):
        raise ConfigError(f"{bound['path']}: a discriminator has 1 or 2 outputs, this "
                          f"classifier has {info['num_outputs']}")
    return TimeDependentDiscriminator(net, shape=tuple(info["shape"]), source=str(bound["path"]))


# ------------------------------------------------------------------------------ config

@dataclass
class TIWConfig:
    """The ``tiw:`` section (docs/algorithms.md §2): how the score loss uses the discriminator,
    read when diffusion.loss is tiw_dsm or iw_dsm. The one place its defaults are written."""

    form: Form = "paper"
    # the score model's training set is data.train_on (biased, or observed = biased U reference);
    # the ratio's mixture share of reference images follows from it (log_ratio)
    alpha: float = 1.0  # exponent on the ratio: w^alpha (bias vs FID trade-off)
    weight: bool = True  # False: C-only ablation
    correction: bool = True  # False: W-only ablation (iw_dsm never corrects)
    clip: float = D_CLIP
    beta_min: float = BETA_MIN
    beta_max: float = BETA_MAX
    t_min: float = T_MIN

    @staticmethod
    def affects_training(cfg: Any) -> bool:
        """The score model reads this section when its loss is a TIW loss: then resume compares
        ``tiw.*`` (and the TIW recipe puts ``tiw.`` in its train stage's key; no other recipe's
        key holds it)."""
        return cfg.diffusion.loss in TIW_LOSSES

    def check(self, cfg: Any) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"tiw.alpha: must be a finite number >= 0, got {self.alpha}")
        if not 0.0 < self.clip < 0.5:
            raise ConfigError(f"tiw.clip: must be in (0, 0.5), got {self.clip}")
        if not 0.0 < self.beta_min < self.beta_max:
            raise ConfigError(f"tiw.beta_min, tiw.beta_max: need 0 < beta_min < beta_max, got "
                              f"{self.beta_min}, {self.beta_max}")
        if not 0.0 < self.t_min < 1.0:
            raise ConfigError(f"tiw.t_min: must be in (0, 1), got {self.t_min}")
        if self.form == "code" and cfg.data.train_on != "observed":
            raise ConfigError("tiw.form=code: its weight 2D is the ratio against a mixture of "
                              "reference and biased images, so it needs data.train_on: observed")
        if self.form == "code" and self.alpha != 1.0:
            raise ConfigError("tiw.alpha: the released code has no exponent; use tiw.form: "
                              "paper to vary it")
        if not (self.weight or self.correction):
            raise ConfigError("tiw.weight and tiw.correction are both false: that is plain "
                              "DSM; set diffusion.loss: edm instead")


register_section("tiw", TIWConfig)


# ------------------------------------------------------------------------------ losses

@LOSSES.register("tiw_dsm")
class TIWDSMLoss(EDMLoss):
    """Kim et al. 2024, Theorem 1 in EDM units (§2.4): per sample
    L = w^alpha lambda(sigma) ||D_theta(y + sigma n; sigma) - (y + sigma^2 grad log w^alpha)||^2,
    with w = w_t(x) from the frozen time-dependent discriminator (see :func:`tiw_terms`)."""

    def __init__(self, *args: Any, discriminator: nn.Module | Discriminator,
                 tiw: TIWConfig | None = None, reference_share: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.discriminator = discriminator
        self.tiw = tiw or TIWConfig()
        self.reference_share = reference_share

    @classmethod
    def from_config(cls, cfg: Any) -> "TIWDSMLoss":
        d = cfg.diffusion
        from debiaslab.diffusion.schedules import build_schedule

        return cls(build_schedule(d.schedule, d.num_timesteps), d.edm_p_mean, d.edm_p_std,
                   d.sigma_data, discriminator=load_discriminator(cfg), tiw=cfg.tiw,
                   reference_share=reference_share(cfg))

    def frozen_modules(self) -> dict[str, nn.Module]:
        disc = self.discriminator
        return {"discriminator": disc} if isinstance(disc, nn.Module) else {}

    def terms(self, x: Tensor, sigma: Tensor, y: Tensor) -> TIWTerms:
        c = self.tiw
        return tiw_terms(self.discriminator, x, sigma, form=c.form,
                         reference_share=self.reference_share,
                         alpha=c.alpha, weight=c.weight, correction=c.correction, clip=c.clip,
                         b0=c.beta_min, b1=c.beta_max)

    def __call__(self, model: nn.Module, x0: Tensor, level: Tensor, noise: Tensor,
                 **cond: Any) -> Tensor:
        sigma = level.to(x0.device, x0.dtype)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x = x0 + sigma.view(view) * noise
        t = self.terms(x, sigma, x0)
        D_x = model(x, sigma, **cond)
        lam = self.loss_weight(sigma)
        target = x0 + t.correction
        return t.weight.to(lam.dtype) * lam * mean_per_sample((D_x.float() - target) ** 2)


@LOSSES.register("iw_dsm")
class IWDSMLoss(TIWDSMLoss):
    """IW-DSM (Kim et al. 2024, Eq. 7): the EDM loss weighted per image by the time-independent
    ratio w(x0)^alpha of a clean-image discriminator; the target is not corrected."""

    def terms(self, x: Tensor, sigma: Tensor, y: Tensor) -> TIWTerms:
        c = self.tiw
        w = iw_weight(self.discriminator, y, reference_share=self.reference_share,
                      alpha=c.alpha, clip=c.clip)
        return TIWTerms(weight=w, correction=torch.zeros_like(x))


# ------------------------------------------------------------------------------ discriminator

SOURCE_NAMES = ("biased", "reference")  # label 0, label 1 (REFERENCE_LABEL)
STREAM_ROWS, STREAM_TIME = 11, 12  # the discriminator's per-step random streams (see StepBatch)
EVAL_SEED_STRIDE = 1_000_003


@dataclass
class DiscriminatorConfig(ClassifierConfig):
    """The ``discriminator:`` section: the time-dependent discriminator's network, training and
    validation (§2.2). Its rows are the biased set (label 0) and the reference set (label 1) of
    a reference build; its diffusion times come from the ``tiw:`` section's VP-SDE."""

    label: str = "source"
    val_buckets: int = 10  # tau buckets of the validation plot
    # which checkpoint of the run the score model uses: the kept one with the lowest validation
    # BCE (the released CIFAR run's is an early one), or the last
    select: Literal["val_bce", "last"] = "val_bce"
    # model and train: the classifier defaults (encoder classifier; Adam lr 3e-4, batch 128,
    # 1,000 steps, a checkpoint every 500; the released code trains 20k steps on CIFAR and uses
    # its ~500-step checkpoint)

    def check(self, cfg: Any) -> None:
        if self.label != "source" or self.input != "noisy_images":
            raise ConfigError("discriminator.label and discriminator.input are fixed: the "
                              "discriminator tells the data source apart on noisy images")
        if self.train.batch_size % 2:
            raise ConfigError(f"discriminator.train.batch_size: must be even (half biased, half "
                              f"reference), got {self.train.batch_size}")


register_section("discriminator", DiscriminatorConfig)


def discriminator_data(cfg: ExperimentConfig) -> Any:
    """The biased and reference sets of the experiment's reference build as classifier rows:
    uint8 images, label 0 (biased) or 1 (reference), rows in that order."""
    from debiaslab.data.side_tables import read_datasets
    from debiaslab.data.sources import BIASED_NAME, REFERENCE_NAME, SPLIT_IMBALANCES
    from debiaslab.training.classifier_data import INPUT_IMAGES, ClassifierData

    if cfg.data.imbalance not in SPLIT_IMBALANCES:
        raise ConfigError(f"data.imbalance: the discriminator needs a reference set; use one of "
                          f"{', '.join(SPLIT_IMBALANCES)}, got {cfg.data.imbalance}")
    root = cfg.dataset_path
    both = read_datasets({"0": root / BIASED_NAME, "1": root / REFERENCE_NAME})
    labels = (both.source == "1").astype(np.int64)
    for label, name in enumerate(SOURCE_NAMES):
        if not (labels == label).any():
            raise DataError(f"{root}: the {name} set has no rows; rebuild the dataset with a "
                            f"larger data.reference_count or data.reference_fraction")
    digest = hashlib.sha256(json.dumps(both.content_hashes, sort_keys=True).encode())
    return ClassifierData(INPUT_IMAGES, torch.from_numpy(both.images), labels,
                          list(SOURCE_NAMES), source_hash=digest.hexdigest(),
                          rows=torch.arange(len(labels)))


def _balanced_indices(members: tuple[Tensor, Tensor], size: int,
                      generator: torch.Generator) -> Tensor:
    """``size`` row indices, biased and reference rows (``members[label]``) alternating, each
    half drawn uniformly with replacement, so every contiguous even slice of the batch is
    balanced too."""
    out = torch.empty(size, dtype=torch.long)
    for label, rows in enumerate(members):
        pick = torch.randint(0, len(rows), (size // 2,), generator=generator)
        out[label::2] = rows[pick]
    return out


def _discriminator_task_class() -> Any:
    """The task class, built on first use (training imports torch-heavy modules)."""
    from debiaslab.training.classifier import ClassifierTask
    from debiaslab.training.loop import STREAM_NOISE, StepBatch

    class DiscriminatorTask(ClassifierTask):
        """D(x_tau, tau) with cross-entropy over (biased, reference): softmax of two logits is
        a sigmoid of their difference, so this is the released BCE. Each global batch is half
        biased, half reference rows (drawn per step, not by the epoch shuffle); tau from the
        likelihood-weighting sampler; x_tau = m(tau) x0 + s(tau) z (§2.2)."""

        kind = "discriminator"

        def __init__(self, cfg: ExperimentConfig, data: Any) -> None:
            super().__init__(cfg, data)
            self.tiw = cfg.tiw
            self.members = tuple(torch.nonzero(data.labels == label).reshape(-1)
                                 for label in range(len(SOURCE_NAMES)))

        def make_batch(self, plan: StepBatch) -> dict[str, Tensor]:
            c = self.tiw
            idx = plan.mine(_balanced_indices(self.members, plan.size,
                                              plan.generator(STREAM_ROWS)))
            u = torch.rand(plan.size, generator=plan.generator(STREAM_TIME), dtype=torch.float64)
            tau = sample_tau(u, c.beta_min, c.beta_max, c.t_min).float()
            noise = torch.randn((plan.size,) + self.data.shape,
                                generator=plan.generator(STREAM_NOISE))
            return {"x": self.data.float_inputs(idx), "label": self.data.labels[idx],
                    "tau": plan.mine(tau), "noise": plan.mine(noise)}

        def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
            c = self.tiw
            x = perturb(batch["x"], batch["tau"], batch["noise"], c.beta_min, c.beta_max)
            logits = source_logits(model, x, batch["tau"])
            return torch.nn.functional.cross_entropy(logits, batch["label"],
                                                     reduction="none")

        def extra_state(self) -> dict[str, Any]:
            state = super().extra_state()
            c = self.tiw
            state["discriminator"] = {"beta_min": c.beta_min, "beta_max": c.beta_max,
                                      "t_min": c.t_min, "time_scale": TIME_SCALE}
            return state

    return DiscriminatorTask


@torch.no_grad()
def evaluate_discriminator(model: nn.Module, data: Any, tiw: TIWConfig, *, buckets: int,
                           seed: int) -> dict[str, Any]:
    """Accuracy and BCE per tau bucket (equal-width over [t_min, 1]) on held-out rows: every
    row once per bucket, at a tau uniform in the bucket and with noise from the row's own
    generator (seed, row, bucket), so the numbers do not depend on batching. Bucket bounds are
    reported as the network's time input, round(tau * 999).

    Class-balanced: each source weighs half, whatever the held-out rows' sizes (on digits 69
    biased vs 5 reference rows, where always answering "biased" would score 0.93). So pure
    noise, which no discriminator can tell apart, scores about 0.5 and ln 2."""
    edges = torch.linspace(tiw.t_min, 1.0, buckets + 1, dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shape = (buckets, len(SOURCE_NAMES))
    correct, loss_sum, count = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=np.int64)
    n = len(data)
    for b in range(buckets):
        for start in range(0, n, 256):
            idx = torch.arange(start, min(start + 256, n))
            tau = torch.empty(len(idx))
            noise = torch.empty((len(idx),) + data.shape)
            for i, row in enumerate(data.rows[idx].tolist()):
                g = torch.Generator().manual_seed((seed * EVAL_SEED_STRIDE + row) * buckets + b)
                u = float(torch.rand(1, generator=g, dtype=torch.float64))
                tau[i] = float(edges[b] + u * (edges[b + 1] - edges[b]))
                noise[i] = torch.randn(data.shape, generator=g)
            x = perturb(data.float_inputs(idx), tau, noise, tiw.beta_min, tiw.beta_max)
            logits = source_logits(model, x.to(device), tau.to(device)).cpu()
            labels = data.labels[idx]
            hits = (logits.argmax(1) == labels).double().numpy()
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
            for label in range(len(SOURCE_NAMES)):
                mine = (labels == label).numpy()
                correct[b, label] += hits[mine].sum()
                loss_sum[b, label] += losses[mine].sum()
                count[b, label] += int(mine.sum())
    model.train(was_training)
    bounds = [round(float(e) * TIME_SCALE) for e in edges]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"t_lo": bounds[:-1], "t_hi": bounds[1:],
                "accuracy": (correct / count).mean(1).tolist(),
                "loss": (loss_sum / count).mean(1).tolist(), "count": count.sum(1).tolist(),
                "accuracy_mean": float((correct.sum(0) / count.sum(0)).mean()),
                "loss_mean": float((loss_sum.sum(0) / count.sum(0)).mean())}


def _split(cfg: ExperimentConfig) -> tuple[Any, Any]:
    from debiaslab.training.classifier_data import split_data

    return split_data(cfg, discriminator_data(cfg))


def _validate(cfg: ExperimentConfig, model: nn.Module, val_rows: Any) -> dict[str, Any]:
    return evaluate_discriminator(model, val_rows, cfg.tiw, buckets=cfg.classifier.val_buckets,
                                  seed=cfg.train.seed)


def discriminator_trainer(cfg: ExperimentConfig, **kwargs: Any) -> Any:
    """One Ray Train worker's discriminator Trainer, from the run config alone."""
    from debiaslab.training.loop import Trainer

    train_rows, _ = _split(cfg)
    return Trainer(cfg, _discriminator_task_class()(cfg, train_rows), kwargs.pop("run_dir"),
                   **kwargs)


def _train_here(cfg: ExperimentConfig, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    from debiaslab.training.loop import Trainer

    train_rows, val_rows = _split(cfg)
    trainer = Trainer(cfg, _discriminator_task_class()(cfg, train_rows), cfg.run_dir, **kwargs)
    result = trainer.fit()
    return _select_checkpoint(cfg, result.checkpoint, cfg.train.device, val_rows)


def run_checkpoints(checkpoint: Any) -> list[Any]:
    """Every intact-looking checkpoint of the run that wrote ``checkpoint``, oldest first: its
    own folder, or each ``checkpoint_*`` folder of its Ray Train storage."""
    from pathlib import Path

    from debiaslab.checkpoints import list_checkpoints

    folder = Path(checkpoint).parent
    folders = (sorted(folder.parent.glob("checkpoint_*")) if folder.name.startswith("checkpoint_")
               else [folder])
    return [path for _, path in sorted(c for f in folders for c in list_checkpoints(f))]


DIAGNOSTIC_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0)  # EDM's training levels: ln sigma ~ N(-1.2, 1.2)
DEGENERATE_ESS = 0.05  # ESS / n below this: a handful of images carry the weighted loss


def weight_diagnostics(disc: Discriminator, x0: Tensor, sigmas: Any = DIAGNOSTIC_SIGMAS, *,
                       reference_share: float = 0.0, seed: int = 0) -> dict[str, list[float]]:
    """How usable the discriminator's ratio is as importance weights on the images x0 the
    score model trains on: at each EDM level sigma, the mean of w_t(x0 + sigma n) (about 1 for
    a calibrated ratio, since E_train[p_data / p_train] = 1) and the effective sample size as a
    fraction of the images, ESS / n = (sum w)^2 / (n sum w^2) (1: equal weights); also the
    clean-image weight of IW-DSM (``iw_mean``, ``iw_ess``)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    out: dict[str, Any] = {"sigma": [float(v) for v in sigmas], "mean": [], "ess": []}

    def add(w: Tensor, prefix: str = "") -> None:
        w = w.double()
        mean, ess = float(w.mean()), float(w.sum() ** 2 / (len(w) * (w ** 2).sum()))
        if prefix:
            out[f"{prefix}_mean"], out[f"{prefix}_ess"] = mean, ess
        else:
            out["mean"].append(mean)
            out["ess"].append(ess)

    for sigma in out["sigma"]:
        level = torch.full((len(x0),), sigma, device=x0.device)
        weights = [tiw_terms(disc, x0[i:i + 256] + sigma * noise[i:i + 256], level[i:i + 256],
                             reference_share=reference_share).weight
                   for i in range(0, len(x0), 256)]
        add(torch.cat(weights))
    add(torch.cat([iw_weight(disc, x0[i:i + 256], reference_share=reference_share)
                   for i in range(0, len(x0), 256)]), "iw")
    return out


def _weights_of(cfg: ExperimentConfig, model: nn.Module, info: dict[str, Any], path: Any
                ) -> dict[str, Any]:
    """weight_diagnostics of the chosen checkpoint on the biased set, logged in one line (with
    a warning when the ratio is degenerate)."""
    from debiaslab.progress import log

    rows = discriminator_data(cfg)
    biased = torch.nonzero(rows.labels == 0).reshape(-1)
    disc = TimeDependentDiscriminator(model, shape=tuple(info["shape"]), source=str(path))
    device = next(model.parameters()).device
    diag = weight_diagnostics(disc, rows.float_inputs(biased).to(device),
                              seed=cfg.train.seed)
    log("discriminator: importance weights on the biased set, mean / ESS per image: "
        + ", ".join(f"sigma {s:g}: {m:.3g} / {e:.2f}"
                    for s, m, e in zip(diag["sigma"], diag["mean"], diag["ess"]))
        + f"; clean (IW-DSM): {diag['iw_mean']:.3g} / {diag['iw_ess']:.2f}")
    if min(diag["ess"]) < DEGENERATE_ESS:
        log(f"warning: discriminator: below {DEGENERATE_ESS} of the biased images carry the "
            f"weight at some sigma: it has memorised the reference set; train it fewer steps "
            f"or regularise it (discriminator.train.steps, .weight_decay, .model.dropout)")
    return diag


def _validate_checkpoint(cfg: ExperimentConfig, checkpoint: Any, device: Any
                         ) -> tuple[Any, dict[str, Any]]:
    """AuxModelKind.validate_checkpoint (after Ray Train): :func:`_select_checkpoint` on the
    held-out rows of ``cfg``'s split."""
    return _select_checkpoint(cfg, checkpoint, device, _split(cfg)[1])


def _select_checkpoint(cfg: ExperimentConfig, checkpoint: Any, device: Any, val_rows: Any
                       ) -> tuple[Any, dict[str, Any]]:
    """Validate the run's kept checkpoints on the held-out rows and return the one the score
    model will use (``discriminator.select``) with its evaluation; the evaluation lists every
    candidate's step and validation BCE under ``candidates``."""
    from debiaslab.progress import log
    from debiaslab.training.classifier import load_classifier

    candidates = [checkpoint] if cfg.discriminator.select == "last" else run_checkpoints(
        checkpoint) or [checkpoint]
    scored = []
    for path in candidates:
        model, info = load_classifier(path, device)
        scored.append((_validate(cfg, model, val_rows), int(info["step"]), path))
    best = min(scored, key=lambda item: (item[0]["loss_mean"], -item[1]))
    evaluation = dict(best[0])
    evaluation["candidates"] = [{"step": step, "val_bce": ev["loss_mean"]}
                                for ev, step, _ in scored]
    if len(scored) > 1:
        shown = ", ".join(f"step {step}: {ev['loss_mean']:.4f}" for ev, step, _ in scored)
        log(f"discriminator: the checkpoint of step {best[1]} has the lowest validation BCE "
            f"({shown})")
    if evaluation["loss_mean"] >= math.log(2):
        log(f"warning: discriminator: its validation BCE {evaluation['loss_mean']:.3f} is no "
            f"better than answering 1/2 everywhere (ln 2 = 0.693)")
    model, info = load_classifier(best[2], device)
    diag = _weights_of(cfg, model, info, best[2])
    evaluation["weights"] = diag
    evaluation["extra_metrics"] = {
        **{f"weights/mean_sigma{s:g}": m for s, m in zip(diag["sigma"], diag["mean"])},
        **{f"weights/ess_sigma{s:g}": e for s, e in zip(diag["sigma"], diag["ess"])},
        "weights/iw_mean": diag["iw_mean"], "weights/iw_ess": diag["iw_ess"]}
    return best[2], evaluation


DISCRIMINATOR = AuxModelKind(_train_here, discriminator_trainer, _validate_checkpoint)


# ------------------------------------------------------------------------------ evaluation

def subgroup_of(cfg: ExperimentConfig) -> str:
    """The subgroups the bias statistic counts: ``metrics.subgroups`` when set, else what the
    build is biased in (the class for long-tail builds, the bias attribute for attribute-bias
    builds). Parts joined by "+" are counted jointly (e.g. ``class+attr:bold``)."""
    if cfg.metrics.subgroups:
        return cfg.metrics.subgroups
    if cfg.data.imbalance == "attribute_bias":  # a joint bias (bold+even) counts each part
        return "+".join(f"attr:{a}" for a in cfg.data.bias_attribute.split("+"))
    return "class"


def subgroup_parts(by: str) -> list[str]:
    """The parts of a subgroup spec, each "class" or "attr:<name>" (one-line error otherwise)."""
    parts = by.split("+")
    for part in parts:
        if part != "class" and not (part.startswith("attr:") and len(part) > 5):
            raise ConfigError(f"metrics.subgroups: {by!r}: each part is class or attr:<name>, "
                              f"joined by + (e.g. class+attr:bold), got {part!r}")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"metrics.subgroups: {by!r} names a part twice")
    return parts


def _joint(columns: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Mixed-radix index of the joint subgroup: the last part varies fastest."""
    out = np.zeros(len(columns[0]), dtype=np.int64)
    for column, size in zip(columns, sizes):
        out = out * size + np.asarray(column, dtype=np.int64)
    return out


def _truth(part: str, data: Any, where: str) -> tuple[list[str], np.ndarray]:
    """(names, per-image values) of one part from a dataset's stored labels."""
    if part == "class":
        return list(data.class_names), data.labels.numpy()
    attribute = part.split(":", 1)[1]
    if attribute not in data.attr_names:
        raise ConfigError(f"metrics.subgroups: {where} has no attribute {attribute!r} (it has "
                          f"{', '.join(data.attr_names) or 'none'})")
    column = list(data.attr_names).index(attribute)
    return [f"{attribute}=0", f"{attribute}=1"], data.attributes.numpy()[:, column]


def shares(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Proportion of each subgroup 0..num_groups-1."""
    counts = np.bincount(np.asarray(groups, dtype=np.int64), minlength=num_groups)
    return counts / max(len(groups), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """TV(p, q) = sum |p - q| / 2: the largest difference in probability any event can have."""
    return float(np.abs(np.asarray(p) - np.asarray(q)).sum() / 2)


def classify_subgroups(path: str, images: np.ndarray, by: str, num_groups: int
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """The subgroup of each sample by ``metrics.subgroup_classifier``: a classifier trained by
    the classifier stage with label ``by``, on clean images (t = 0). Returns the predictions and
    the classifier's provenance (path, step, file hash)."""
    from debiaslab.data.pixels import from_uint8
    from debiaslab.training.classifier import load_classifier
    from debiaslab.training.classifier_data import INPUT_IMAGES

    net, info = load_classifier(path)
    where = f"metrics.subgroup_classifier={path}"
    if info["input"] != INPUT_IMAGES:
        raise ConfigError(f"{where}: a head on feature-table rows; the bias statistic needs a "
                          f"classifier of images")
    if info["label"] != by or int(info["num_outputs"]) != num_groups:
        raise ConfigError(f"{where}: predicts {info['label']} ({info['num_outputs']} classes); "
                          f"the bias statistic counts {by} ({num_groups} groups)")
    if list(info["shape"]) != list(images.shape[1:]):
        raise ConfigError(f"{where}: trained on images of shape {list(info['shape'])}, the "
                          f"samples are {list(images.shape[1:])}")
    device = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = from_uint8(torch.from_numpy(np.ascontiguousarray(images[start:start + 256])))
            t = torch.zeros(len(x), dtype=torch.long, device=device)
            logits = net(x.to(device), t) if info["time_input"] else net(x.to(device))
            out.append(logits.argmax(1).cpu().numpy())
    checkpoint = info["checkpoint"]
    return np.concatenate(out), {"path": checkpoint, "step": info["step"],
                                 "hash": make_artifact("checkpoint", checkpoint).hash}


def bias_evaluation(cfg: ExperimentConfig, samples: Any, extractor: Any,
                    inputs: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Recipe.evaluation, the bias statistic: the samples' subgroup proportions (the class, an
    attribute or a joint subgroup of them, :func:`subgroup_of`; as the evaluation extractor or
    metrics.subgroup_classifier predicts them) against the reference set's and the
    biased set's (their stored labels). Metrics: ``bias/tv_reference`` and ``bias/tv_biased``
    (total variation; the debiased model should be nearer the reference), ``bias/fd_reference``
    (L2, the fairness discrepancy against the reference) and each subgroup's sample share.
    Returns the side-by-side plot as the figure ``subgroups`` (saved beside the evaluation as
    ``subgroups_<sample set>.png`` and logged with it)."""
    from pathlib import Path

    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.sources import BIASED_NAME, REFERENCE_NAME
    from debiaslab.report import shares_figure

    by = subgroup_of(cfg)
    parts = subgroup_parts(by)
    sets = {name: ImageDataset.load(cfg.dataset_path / name)
            for name in (BIASED_NAME, REFERENCE_NAME)}
    per_part = {k: [_truth(part, d, str(cfg.dataset_path / k)) for part in parts]
                for k, d in sets.items()}
    sizes = [len(part_names) for part_names, _ in per_part[BIASED_NAME]]
    names = [",".join(combo) for combo in itertools.product(
        *(part_names for part_names, _ in per_part[BIASED_NAME]))]
    truth = {k: _joint([values for _, values in v], sizes) for k, v in per_part.items()}
    k = len(names)
    provenance: dict[str, Any] = {"predictor": f"extractor {cfg.metrics.extractor}"}
    check_subgroup_predictor(cfg)
    if cfg.metrics.subgroup_classifier:
        predicted, provenance["classifier"] = classify_subgroups(
            cfg.metrics.subgroup_classifier, samples.images, by, k)
        provenance["predictor"] = "metrics.subgroup_classifier"
    else:
        ext = extractor.extract(samples.images, batch_size=cfg.metrics.batch_size)
        columns = [ext.classes if part == "class" else
                   ext.attributes[:, list(extractor.attr_names).index(part.split(":", 1)[1])]
                   for part in parts]
        predicted = _joint(columns, sizes)
    p = {"samples": shares(predicted, k), "reference": shares(truth[REFERENCE_NAME], k),
         "biased": shares(truth[BIASED_NAME], k)}
    metrics = {"bias/tv_reference": total_variation(p["samples"], p["reference"]),
               "bias/tv_biased": total_variation(p["samples"], p["biased"]),
               "bias/fd_reference": float(np.linalg.norm(p["samples"] - p["reference"]))}
    # named as MLflow stores them (bold=1 -> bold_1, 3,bold=1 -> 3_bold_1)
    metrics.update({metric_key(f"bias/share_{name}"): float(v)
                    for name, v in zip(names, p["samples"])})
    label = Path(samples.source).name
    figure = shares_figure({n: p[n] for n in ("biased", "reference", "samples")}, names,
                           title=f"{cfg.name} / {label}: subgroup shares", xlabel=by)
    meta = {"bias_statistic": {"by": by, "names": names, **provenance,
                               **{n: v.tolist() for n, v in p.items()},
                               "tv_reference_vs_biased": total_variation(p["reference"],
                                                                         p["biased"])},
            "figures": {"subgroups": figure}}
    return metrics, meta


# ------------------------------------------------------------------------------ recipe

def check_subgroup_predictor(cfg: ExperimentConfig) -> None:
    """Something must tell the samples' subgroups apart: metrics.subgroup_classifier, or an
    extractor that predicts the class (or the bias attribute). Checked before any training."""
    from debiaslab.metrics.features import PREDICTIONS, register_builtin_extractors

    by = subgroup_of(cfg)
    parts = subgroup_parts(by)
    if cfg.metrics.subgroup_classifier:
        if len(parts) > 1:
            raise ConfigError(f"metrics.subgroups: {by!r} is a joint subgroup; "
                              f"metrics.subgroup_classifier predicts one label: count one part, "
                              f"or use an extractor that predicts each")
        return
    register_builtin_extractors()  # the extractors' modules say what they predict when imported
    missing = [p for p in parts if p not in PREDICTIONS.get(cfg.metrics.extractor, ())]
    if missing:
        raise ConfigError(f"metrics.extractor={cfg.metrics.extractor}: does not predict the "
                          f"bias statistic's subgroup ({', '.join(missing)}); set "
                          f"metrics.subgroup_classifier to a classifier trained on it (recipe "
                          f"subgroup_classifier, label {missing[0]})")


def _check_reference_build(cfg: ExperimentConfig, recipe: str) -> None:
    """Both recipes' data rules: a build with a reference set, and something that tells the
    samples' subgroups apart for the bias statistic."""
    from debiaslab.data.sources import SPLIT_IMBALANCES

    if cfg.data.imbalance not in SPLIT_IMBALANCES:
        raise ConfigError(f"recipe {recipe}: needs a reference set, data.imbalance: one of "
                          f"{', '.join(SPLIT_IMBALANCES)}, got {cfg.data.imbalance!r}")
    check_subgroup_predictor(cfg)


def check_recipe(cfg: ExperimentConfig) -> None:
    """The TIW recipe's own rules: a TIW loss, a reference build, and the biased or observed set
    as the score model's training set."""

    if cfg.diffusion.loss not in TIW_LOSSES:
        raise ConfigError(f"recipe tiw_dsm: needs diffusion.loss: one of "
                          f"{', '.join(TIW_LOSSES)}, got {cfg.diffusion.loss!r}")
    _check_reference_build(cfg, "tiw_dsm")
    if cfg.data.train_on == "reference":
        raise ConfigError("recipe tiw_dsm: data.train_on: reference trains on the unbiased set "
                          "alone (the DSM(ref) baseline); use recipe tiw_baseline with "
                          "diffusion.loss: edm for it, or data.train_on: biased or observed")


def check_baseline(cfg: ExperimentConfig) -> None:
    """The baselines' rules: a reference build, and a loss without a discriminator."""

    if cfg.diffusion.loss in TIW_LOSSES:
        raise ConfigError(f"recipe tiw_baseline: diffusion.loss: {cfg.diffusion.loss} needs the "
                          f"discriminator stage; use recipe tiw_dsm for it")
    _check_reference_build(cfg, "tiw_baseline")


register_recipe(Recipe(
    "tiw_dsm",
    diffusion_stages(
        before_train=(aux_model_stage(
            "discriminator", kind=DISCRIMINATOR,
            keys=("tiw.beta_min", "tiw.beta_max", "tiw.t_min", "data."),
            description="train the time-dependent discriminator, biased (0) vs reference (1)"),),
        train_inputs={"discriminator": "checkpoint"}, train_keys=("tiw.",)),
    description="TIW-DSM (Kim et al. 2024): a time-dependent discriminator, then the score "
                "model with its importance-reweighted, score-corrected loss",
    check=check_recipe, evaluation=bias_evaluation))


register_recipe(Recipe(
    "tiw_baseline", diffusion_stages(),
    description="TIW-DSM's baselines, DSM(obs) and DSM(ref): the score model without a "
                "discriminator on a reference build (data.train_on), with the bias statistic",
    check=check_baseline, evaluation=bias_evaluation))


register_recipe(Recipe(
    "subgroup_classifier",
    (diffusion_stages()[0],  # the data stage
     aux_model_stage("classifier", description="train the classifier of cfg.classifier")),
    description="the bias statistic's evaluation classifier (metrics.subgroup_classifier): "
                "cfg.classifier on the configured data, e.g. clean images (timestep_range "
                "[0, 0]) labelled by class"))
