"""Networks: the ADM UNet with class/augmentation conditioning and h-space tap, and the
time-conditioned encoder classifier; `NETS` maps config names to their classes.
"""

from torch import nn

from debiaslab.nets.classifier import EncoderClassifier
from debiaslab.nets.layers import timestep_embedding
from debiaslab.nets.unet import HEditFn, UNet
from debiaslab.registry import Registry

NETS: Registry = Registry("network")
NETS.register("unet")(UNet)
NETS.register("encoder_classifier")(EncoderClassifier)


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["NETS", "EncoderClassifier", "HEditFn", "UNet", "num_parameters", "timestep_embedding"]
