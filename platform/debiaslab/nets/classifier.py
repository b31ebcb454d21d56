"""Time-conditioned encoder classifier p(l | x_t, t): ADM's EncoderUNetModel (ALGORITHMS.md §1.4,
§2.2). Serves as the minority classifier, the TIW-DSM discriminator and noisy attribute classifiers.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.errors import ConfigError
from debiaslab.nets.layers import (
    AttentionPool2d,
    Conditioning,
    Encoder,
    as_timesteps,
    normalization,
)

POOLS = ("attention", "mean")


class EncoderClassifier(nn.Module):
    """UNet encoder trunk + middle block -> GN-SiLU -> pooling -> linear head (logits).

    pool="attention" is ADM's AttentionPool2d (mean token attends over positions); "mean" is global
    average pooling. With num_classes_cond the class embedding (null label = num_classes_cond, used
    when y is None) is added to the time embedding, giving p(l | x_t, t, c).
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        *,
        image_size: int,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        pool: str = "attention",
        num_heads: int = 1,
        head_channels: int | None = None,
        num_classes_cond: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
        self.num_outputs = num_outputs
        self.num_classes_cond = num_classes_cond
        self.pool_kind = pool
        self.cond = Conditioning(model_channels, num_classes_cond)
        self.encoder = Encoder(
            in_channels, model_channels, self.cond.emb_channels, image_size, channel_mult,
            num_res_blocks, attention_resolutions, dropout, num_heads, head_channels,
            use_scale_shift_norm, resblock_updown,
        )
        ch = self.encoder.out_channels
        self.out_norm = normalization(ch)
        self.pool = (
            AttentionPool2d(self.encoder.out_size, ch, num_heads, head_channels)
            if pool == "attention"
            else None
        )
        self.feature_dim = ch
        self.head = nn.Linear(ch, num_outputs)

    def features(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Pooled penultimate features [B, feature_dim] of noisy x_t at float timesteps t [B]."""
        t = as_timesteps(t, x_t.shape[0], x_t.device)
        emb = self.cond(t, x_t.shape[0], x_t.device, y)
        h, _ = self.encoder(x_t, emb)
        h = F.silu(self.out_norm(h))
        return self.pool(h) if self.pool is not None else h.mean(dim=(2, 3))

    def forward(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Logits [B, num_outputs]; differentiable w.r.t. x_t (classifier guidance)."""
        return self.head(self.features(x_t, t, y))
