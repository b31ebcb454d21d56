"""Which config keys define a trained score model (the train stage's key) and which a resume
may ignore or adjust."""

from __future__ import annotations

from typing import Any

from debiaslab.config.schema import SECTIONS

# The train stage's own keys; every section with ``affects_training`` is added (training_keys).
TRAIN_KEYS = ("model.", "diffusion.", "train.", "data.augment", "distributed.num_workers")


def training_keys() -> tuple[str, ...]:
    """The config keys that define a trained score model: TRAIN_KEYS plus every registered
    section whose ``affects_training`` is True (``cbdm.``, for instance). A section whose
    ``affects_training`` is a function of the config joins only the keys of the recipes that
    name it (``diffusion_stages(train_keys=...)``)."""
    return TRAIN_KEYS + tuple(f"{name}." for name, cls in SECTIONS.items()
                              if getattr(cls, "affects_training", False) is True)


def _affects(cls: type, cfg: Any) -> bool:
    flag = getattr(cls, "affects_training", False)
    if callable(flag):
        return cfg is not None and bool(flag(cfg))
    return bool(flag)


def resume_ignored(cfg: Any = None) -> tuple[str, ...]:
    """RESUME_IGNORED plus every method section the score model's training does not read: a
    section with ``affects_training = True`` is always compared, one whose ``affects_training``
    is a function is compared when it says the config ``cfg`` reads it (e.g. ``tiw.`` when
    diffusion.loss is a TIW loss)."""
    return RESUME_IGNORED + tuple(f"{name}." for name, cls in SECTIONS.items()
                                  if not _affects(cls, cfg))


# Resume (training.resume): keys whose change never alters what a run means are ignored; these
# may change when the user lists them in train.resume_allow; every other difference is refused.
RESUME_ADJUSTABLE = ("train.lr", "train.warmup_steps", "train.grad_clip", "train.weight_decay",
                     "train.precision", "distributed.num_workers")
RESUME_IGNORED = ("name", "output_dir", "data.", "sample.", "metrics.", "tracking.", "classifier.",
                  "distributed.", "train.steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.device", "train.resume_allow",
                  "train.init_from", "train.init_weights")
RESUME_COMPARED_DATA = ("data.augment",)  # the dataset itself is compared by content hash
