"""The cascaded classifier: a trained head on the features of a frozen, trained encoder
classifier (Minority Guidance's official LSUN minority classifier, docs/algorithms.md §1.4; the
"cascaded" discriminator of TIW-DSM has the same shape)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from debiaslab.errors import ConfigError
from debiaslab.nets.classifier import EncoderClassifier
from debiaslab.nets.layers import as_timesteps


class CascadedClassifier(nn.Module):
    """§1.4, the official LSUN minority classifier: p(l | x_t, t) = softmax(Head(Enc(x_t, t), t)).

    Enc is a frozen, time-conditioned encoder classifier (``trunk``: the trained network; a
    config names its checkpoint in ``model.options.trunk``, which the caller of build_net loads,
    LOADED_OPTIONS), cut after its middle block (features h of
    ``trunk.encoder.out_channels`` x ``out_size`` x ``out_size``); Head is a trained encoder
    classifier on h without downsampling (its own timestep embedding, attention pooling, L
    logits). Gradients reach x_t through the frozen trunk (guidance) but never its weights; the
    trunk stays in eval mode. The trunk's weights are also saved in this net's checkpoints, so a
    trained head needs its trunk file only to be rebuilt (the architecture), not for weights.
    """

    LOADED_OPTIONS = ("trunk",)  # options that name a checkpoint the builder's caller loads
    CONFIG_PARAMS = ("num_outputs", "model_channels", "num_res_blocks", "attention_resolutions",
                     "dropout", "head_channels", "num_classes_cond")

    def __init__(self, num_outputs: int, *, trunk: nn.Module | None = None,
                 model_channels: int = 32,
                 num_res_blocks: int = 1, attention_resolutions: tuple[int, ...] = (),
                 dropout: float = 0.0, head_channels: int | None = None,
                 num_classes_cond: int | None = None, pool: str = "attention",
                 num_heads: int = 1, use_scale_shift_norm: bool = True) -> None:
        super().__init__()
        if trunk is None:
            raise ConfigError("model.options.trunk: the cascaded classifier needs the "
                              "checkpoint of a trained encoder classifier (its frozen trunk)")
        if not isinstance(trunk, EncoderClassifier):
            raise ConfigError(f"model.options.trunk: holds a {type(trunk).__name__}, not an "
                              f"encoder_classifier")
        net = trunk
        self.trunk = net.requires_grad_(False).eval()
        self.head = EncoderClassifier(
            net.encoder.out_channels, num_outputs, image_size=net.encoder.out_size,
            model_channels=model_channels, channel_mult=(1,), num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, pool=pool,
            num_heads=num_heads, head_channels=head_channels, num_classes_cond=num_classes_cond,
            use_scale_shift_norm=use_scale_shift_norm)
        self.num_outputs = num_outputs

    @classmethod
    def from_config(cls, model: Any, *, shape: Any, num_classes: int,
                    num_outputs: int | None = None, aug_dim: int = 0) -> "CascadedClassifier":
        if num_outputs is None or aug_dim:
            raise ConfigError("cascaded_classifier: needs num_outputs and takes no augmentation")
        return cls(num_outputs, model_channels=model.model_channels,
                   num_res_blocks=model.num_res_blocks,
                   attention_resolutions=tuple(model.attention_resolutions),
                   dropout=model.dropout, head_channels=model.head_channels,
                   num_classes_cond=num_classes if model.class_conditional and num_classes > 1
                   else None, **model.options)

    def train(self, mode: bool = True) -> "CascadedClassifier":
        super().train(mode)
        self.trunk.eval()  # frozen: no dropout, fixed normalisation
        return self

    def forward(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        tt = as_timesteps(t, x_t.shape[0], x_t.device)
        trunk_y = y if self.trunk.num_classes_cond else None
        h, _ = self.trunk.encoder(x_t, self.trunk.cond(tt, x_t.shape[0], x_t.device, trunk_y))
        return self.head(h, tt, y)
