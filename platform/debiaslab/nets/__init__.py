"""Networks: the ADM UNet with class/augmentation conditioning and h-space tap, the
time-conditioned encoder classifier and an MLP head; `NETS` maps config names to their classes,
`build_net` builds any of them from a ModelConfig.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

from torch import nn

from debiaslab.errors import ConfigError
from debiaslab.nets.cascaded import CascadedClassifier
from debiaslab.nets.classifier import EncoderClassifier, MLPHead
from debiaslab.nets.layers import timestep_embedding
from debiaslab.nets.unet import HEditFn, UNet
from debiaslab.registry import Registry
from debiaslab.strict import check_options

NETS: Registry = Registry("network")
NETS.register("unet")(UNet)
NETS.register("encoder_classifier")(EncoderClassifier)
NETS.register("mlp_head")(MLPHead)
NETS.register("cascaded_classifier")(CascadedClassifier)

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def net_options(name: str) -> list[str]:
    """The ``model.options`` keys network ``name`` accepts: its constructor's keyword parameters
    that ``from_config`` does not fill from ModelConfig fields (``CONFIG_PARAMS``)."""
    cls = NETS.get(name)
    params = inspect.signature(cls.__init__).parameters
    return sorted(p for p, spec in params.items()
                  if p != "self" and spec.kind in _KEYWORD_KINDS and p not in cls.CONFIG_PARAMS)


def check_model_options(model: Any, where: str = "model") -> None:
    """One-line ConfigError for a ``<where>.options`` key the network does not take."""
    check_options(f"{where}.options", model.options, net_options(model.net),
                  owner=f"net {model.net}", key_in_path=True)


def is_classifier(name: str) -> bool:
    """Whether network ``name`` outputs logits (its constructor takes ``num_outputs``)."""
    return "num_outputs" in inspect.signature(NETS.get(name).__init__).parameters


def build_net(model: Any, *, shape: Sequence[int], num_classes: int,
              num_outputs: int | None = None, aug_dim: int = 0, where: str = "model",
              resolve: Callable[[str, str], Any] | None = None) -> nn.Module:
    """Any registered network from ``model`` (a ModelConfig) for inputs of ``shape`` ((C, H, W)
    images, or a feature row's shape): ``num_classes`` conditioning classes (used when
    ``model.class_conditional``), ``num_outputs`` logits for classifiers, ``aug_dim`` for an
    augmentation vector. ``model.options`` go to the constructor (unknown keys: ConfigError)."""
    cls = NETS.get(model.net)
    check_model_options(model, where)
    loaded = {k: v for k, v in model.options.items()
              if k in getattr(cls, "LOADED_OPTIONS", ()) and isinstance(v, str)}
    if loaded:  # options naming checkpoints (a trunk): the caller's resolver loads them
        if resolve is None:
            raise ConfigError(f"{where}.options.{next(iter(loaded))}: names a checkpoint, "
                              f"which this caller cannot load")
        options = {**model.options, **{k: resolve(k, v) for k, v in loaded.items()}}
        model = dataclasses.replace(model, options=options)
    try:
        return cls.from_config(model, shape=tuple(shape), num_classes=num_classes,
                               num_outputs=num_outputs, aug_dim=aug_dim)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["NETS", "CascadedClassifier", "EncoderClassifier", "HEditFn", "MLPHead", "UNet",
           "build_net",
           "check_model_options", "is_classifier", "net_options", "num_parameters",
           "timestep_embedding"]
