"""Guidance wraps a denoiser in another denoiser, so samplers need no guidance flags.

Three kinds cover the methods: a gradient term from a classifier on x_t (classifier / minority
guidance), a combination of conditional and unconditional predictions (CFG, CBDM), and an edit of
the UNet's h-space bottleneck during the forward pass (distribution guidance, Balancing Act).

Configured guidance (``sample.guidance``) is a list of components, each ``{type: <name>, ...}``
with the fields of the component's ``Spec`` dataclass; :func:`build_guidance` wraps them around
the model's denoiser in list order (the first entry is innermost). The local and Ray sampling
paths both go through it. A component may also

- shift the ancestral mean (``mean_shift``; the DDPM sampler adds it to mu), and
- contribute per-sample conditioning (``sample_cond(seeds)``, e.g. per-sample targets), which it
  removes from ``cond`` again before calling the inner denoiser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from debiaslab.diffusion.denoiser import Denoiser
from debiaslab.errors import ConfigError
from debiaslab.registry import Registry

GUIDANCE: Registry = Registry("guidance")

LogProbFn = Callable[..., Tensor]  # (x_t, t, **cond) -> log p(target | x_t) [B]
HEditFn = Callable[[Tensor, Tensor], Tensor]  # (h, t) -> h'
ANCESTRAL_SAMPLERS = ("ddpm",)  # samplers that add Denoiser.mean_shift to their posterior mean
BALANCED_TARGET = -1  # classifier target -1: class seed mod num_classes, per sample


class Guided(Denoiser):
    """Base for wrappers: delegates ``schedule``, ``net`` and ``mean_shift`` to the inner
    denoiser. ``cond_keys`` are the conditioning keys the wrapper consumes itself."""

    cond_keys: tuple[str, ...] = ()

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.schedule = inner.schedule
        self.net = inner.net

    def own(self, cond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``cond`` into (this wrapper's keys, the rest for the inner denoiser)."""
        mine = {k: cond[k] for k in self.cond_keys if k in cond}
        return mine, {k: v for k, v in cond.items() if k not in self.cond_keys}

    def mean_shift(self, x_t: Tensor, t: Tensor, variance: Tensor, **cond: Any) -> Tensor | None:
        _, rest = self.own(cond)
        inner = getattr(self.inner, "mean_shift", None)
        return inner(x_t, t, variance, **rest) if inner is not None else None

    def sample_cond(self, seeds: Sequence[int]) -> dict[str, Tensor]:
        """Per-sample conditioning this wrapper (and the ones inside it) need for ``seeds``."""
        inner = getattr(self.inner, "sample_cond", None)
        return inner(seeds) if inner is not None else {}


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass
class GuidanceContext:
    """What components may need when they are built from a config entry."""

    sampler: str
    null_label: int | None = None
    num_classes: int = 0
    device: torch.device | str = "cpu"
    # loads an auxiliary classifier: (checkpoint spec, device) -> (module, info dict)
    load_classifier: Callable[[str, Any], tuple[Any, dict[str, Any]]] | None = None


# ------------------------------------------------------------------------------- classifier


@dataclass
class ClassifierSpec:
    """``{type: classifier, checkpoint, artifact, scale, target, form}``."""

    checkpoint: str = ""  # classifier checkpoint (file or run folder); "" = the recipe's own
    # which of the recipe's auxiliary models checkpoint "" means: the artifact of that name
    # (a recipe may train several: a minority classifier, a discriminator, ...)
    artifact: str = "classifier"
    scale: float = 1.0
    target: int = BALANCED_TARGET  # class index; -1 = seed mod classes (balanced)
    # eps: eps' = eps - w sigma_t grad (DDIM, DPM-Solver, any sampler);
    # mean_shift: mu' = mu + w Sigma grad (ancestral DDPM only); auto: mean_shift for ddpm
    form: Literal["auto", "eps", "mean_shift"] = "auto"


@GUIDANCE.register("classifier")
class ClassifierGuidance(Guided):
    """Dhariwal & Nichol 2021 classifier guidance in both forms (docs/algorithms.md §8.2).

    - eps form (Eq. 14, Algorithm 2): eps' = eps - w sigma_t grad_{x_t} log p(y | x_t, t);
    - mean-shift form (Algorithm 1, guided-diffusion ``condition_mean``): the ancestral step's
      mean mu(x_t) becomes mu + w Sigma_t grad_{x_t} log p(y | x_t, t), Sigma_t the variance
      of that step (the sampler supplies it through :meth:`mean_shift`).

    The classifier sees the sampler's timesteps, which are ORIGINAL indices under respacing.
    Per-sample targets travel in ``cond["guidance_target"]`` (:meth:`sample_cond`).
    """

    Spec = ClassifierSpec
    cond_keys = ("guidance_target",)

    def __init__(self, inner: Denoiser, log_prob: LogProbFn, scale: float,
                 form: str = "eps", target: int | None = None) -> None:
        super().__init__(inner)
        if form not in ("eps", "mean_shift"):
            raise ConfigError(f"classifier guidance form must be eps or mean_shift, got {form!r}")
        self.log_prob = log_prob
        self.scale = scale
        self.form = form
        self.target = target

    @classmethod
    def build(cls, inner: Denoiser, spec: ClassifierSpec, ctx: GuidanceContext
              ) -> "ClassifierGuidance":
        form = spec.form
        if form == "auto":
            form = "mean_shift" if ctx.sampler in ANCESTRAL_SAMPLERS else "eps"
        if form == "mean_shift" and ctx.sampler not in ANCESTRAL_SAMPLERS:
            raise ConfigError(f"sample.guidance classifier: form mean_shift needs an ancestral "
                              f"sampler ({', '.join(ANCESTRAL_SAMPLERS)}), not {ctx.sampler!r}; "
                              f"use form: eps or auto")
        if ctx.load_classifier is None:
            raise ConfigError("sample.guidance classifier: no classifier loader in this context")
        model, info = ctx.load_classifier(spec.checkpoint, ctx.device)
        num = int(info["num_outputs"])
        if spec.target != BALANCED_TARGET and not 0 <= spec.target < num:
            raise ConfigError(f"sample.guidance classifier: target={spec.target} is not a class "
                              f"of the classifier (0..{num - 1}, or -1 for balanced targets)")
        log_prob = ClassifierLogProb(model, num,
                                     conditional=int(info.get("num_cond_classes", 0)) > 0)
        return cls(inner, log_prob, spec.scale, form,
                   None if spec.target == BALANCED_TARGET else spec.target)

    def sample_cond(self, seeds: Sequence[int]) -> dict[str, Tensor]:
        out = super().sample_cond(seeds)
        num = getattr(self.log_prob, "num_classes", None)
        if self.target is not None:
            out["guidance_target"] = torch.full((len(seeds),), self.target, dtype=torch.long)
        elif num is not None:
            out["guidance_target"] = torch.tensor([s % num for s in seeds], dtype=torch.long)
        return out

    def gradient(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """grad_{x_t} log p(y | x_t, t), computed with autograd even inside torch.no_grad()."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x, t, **cond).sum(), x)
        return grad

    def _log_prob_cond(self, mine: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
        """The log-prob's inputs: the per-sample target, and the class label y of a
        class-conditional classifier p(target | x_t, t, y) (the sample's own label)."""
        target = mine.get("guidance_target")
        out = {} if target is None else {"target": target}
        if getattr(self.log_prob, "conditional", False):
            out["y"] = rest.get("y")
        return out

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        mine, rest = self.own(cond)
        eps = self.inner(x_t, t, **rest)
        if self.scale == 0 or self.form != "eps":
            return eps
        _, s = self.schedule.alpha_sigma(torch.as_tensor(t).reshape(-1).expand(len(x_t)), x_t)
        return eps - self.scale * s * self.gradient(x_t, t, **self._log_prob_cond(mine, rest))

    def mean_shift(self, x_t: Tensor, t: Tensor, variance: Tensor, **cond: Any) -> Tensor | None:
        inner = super().mean_shift(x_t, t, variance, **cond)
        if self.scale == 0 or self.form != "mean_shift":
            return inner
        mine, rest = self.own(cond)
        grad = self.gradient(x_t, t, **self._log_prob_cond(mine, rest))
        return _add(inner, self.scale * variance.to(grad.dtype) * grad)


class ClassifierLogProb:
    """log p(target | x_t, t) = log_softmax(classifier(x_t, t))[target], per sample [B]; a
    ``conditional`` classifier also takes the sample's class label y (p(target | x_t, t, y))."""

    def __init__(self, model: Any, num_classes: int, conditional: bool = False) -> None:
        self.model = model
        self.num_classes = num_classes
        self.conditional = conditional

    def __call__(self, x_t: Tensor, t: Tensor, target: Tensor | None = None,
                 y: Tensor | None = None) -> Tensor:
        if target is None:
            raise ConfigError("classifier guidance needs per-sample targets (guidance_target)")
        if self.conditional and y is None:
            raise ConfigError("a class-conditional guidance classifier needs the samples' class "
                              "labels: use a class-conditional score model and sample.labels "
                              "balanced or uniform")
        param = next(self.model.parameters(), None)
        dtype = param.dtype if param is not None else x_t.dtype  # the classifier's precision
        t = torch.as_tensor(t).reshape(-1).expand(len(x_t)).to(x_t.device, torch.float32)
        extra = {"y": y.to(x_t.device).long()} if self.conditional else {}
        logits = self.model(x_t.to(dtype), t, **extra)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                  dim=-1)  # at least float32 (bf16 logits under autocast)
        return log_p.gather(1, target.to(x_t.device).long().view(-1, 1)).squeeze(1)


# ------------------------------------------------------------------------------------- CFG


@dataclass
class CFGSpec:
    """``{type: cfg, omega}``."""

    omega: float = 0.0


@GUIDANCE.register("cfg")
class ClassifierFreeGuidance(Guided):
    """Ho & Salimans 2022, Eq. 6 (CBDM's form, docs/algorithms.md §4.3):
    eps~ = (1 + omega) eps(x_t, y) - omega eps(x_t, null). One batched forward for both halves."""

    Spec = CFGSpec

    def __init__(self, inner: Denoiser, omega: float, null_label: int) -> None:
        super().__init__(inner)
        self.omega = omega
        self.null_label = null_label

    @classmethod
    def build(cls, inner: Denoiser, spec: CFGSpec, ctx: GuidanceContext
              ) -> "ClassifierFreeGuidance":
        if ctx.null_label is None:
            raise ConfigError("sample.guidance cfg: needs a class-conditional model "
                              "(model.class_conditional: true)")
        return cls(inner, spec.omega, ctx.null_label)

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        y = cond.pop("y", None)
        if y is None or self.omega == 0:
            return self.inner(x_t, t, y=y, **cond) if y is not None else self.inner(x_t, t, **cond)
        t = torch.as_tensor(t).reshape(-1).expand(len(x_t))
        null = torch.full_like(y, self.null_label)
        both = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim and len(v) == len(x_t)
                else v for k, v in cond.items()}
        eps = self.inner(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **both)
        eps_cond, eps_uncond = eps.chunk(2)
        return (1 + self.omega) * eps_cond - self.omega * eps_uncond


@GUIDANCE.register("h_edit")
class HSpaceGuidance(Guided):
    """Edits the UNet bottleneck h_t during the forward pass (Parihar et al. 2024, §3.5 form):
    the decoder runs on ``edit(h, t)`` with the original skip connections. Built in code by the
    methods that compute the edit (no config spec)."""

    def __init__(self, inner: Denoiser, edit: HEditFn) -> None:
        super().__init__(inner)
        self.edit = edit

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with self.net.h_edit(self.edit):
            return self.inner(x_t, t, **cond)


# ------------------------------------------------------------------------------- from config


def guidance_spec(entry: dict[str, Any], key: str) -> tuple[type, Any]:
    """Validate one ``sample.guidance`` entry: (component class, typed Spec instance)."""
    from debiaslab.strict import from_mapping

    if not isinstance(entry, dict) or "type" not in entry:
        raise ConfigError(f"{key}: expected a mapping with a type, e.g. {{type: cfg, omega: 1.0}}; "
                          f"got {entry!r}")
    cls = GUIDANCE.get(str(entry["type"]))
    spec_cls = getattr(cls, "Spec", None)
    if spec_cls is None:
        configurable = [n for n in GUIDANCE.names() if getattr(GUIDANCE.get(n), "Spec", None)]
        raise ConfigError(f"{key}: guidance {entry['type']!r} is built by its method, not "
                          f"configured; configurable: {', '.join(configurable)}")
    fields = {k: v for k, v in entry.items() if k != "type"}
    return cls, from_mapping(spec_cls, fields, key)


def spec_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry with every field of its Spec filled in (defaults included)."""
    cls, spec = guidance_spec(entry, "guidance")
    return {"type": entry["type"], **dataclasses.asdict(spec)}


def build_guidance(denoiser: Denoiser, entries: Sequence[dict[str, Any]],
                   ctx: GuidanceContext) -> Denoiser:
    """Wrap ``denoiser`` in the configured components, first entry innermost."""
    for i, entry in enumerate(entries):
        cls, spec = guidance_spec(entry, f"sample.guidance[{i}]")
        denoiser = cls.build(denoiser, spec, ctx)
    return denoiser
