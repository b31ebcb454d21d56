"""Time-conditioned encoder classifier p(l | x_t, t): ADM's EncoderUNetModel (docs/algorithms.md
§1.4, §2.2): the minority classifier, the TIW-DSM discriminator, noisy attribute classifiers.
`MLPHead` is the small head for feature tables (frozen features, h-vectors), optionally time-aware.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.errors import ConfigError
from debiaslab.nets.layers import (
    AttentionPool2d,
    Conditioning,
    Encoder,
    as_timesteps,
    normalization,
    timestep_embedding,
)

POOLS = ("attention", "mean")


class EncoderClassifier(nn.Module):
    """UNet encoder trunk + middle block -> GN-SiLU -> pooling -> linear head (logits).

    pool="attention" is ADM's AttentionPool2d (mean token attends over positions); "mean" is global
    average pooling. With num_classes_cond the class embedding (null label = num_classes_cond, used
    when y is None) is added to the time embedding, giving p(l | x_t, t, c).
    """

    # constructor parameters from_config fills from ModelConfig fields (others: model.options)
    CONFIG_PARAMS = ("in_channels", "num_outputs", "image_size", "model_channels", "channel_mult",
                     "num_res_blocks", "attention_resolutions", "dropout", "head_channels",
                     "num_classes_cond")

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

    @classmethod
    def from_config(cls, model: Any, *, shape: Sequence[int], num_classes: int,
                    num_outputs: int | None = None, aug_dim: int = 0) -> "EncoderClassifier":
        """``num_outputs`` logits for inputs of ``shape`` (C, H, W), conditioned on the class
        (``num_classes`` of them) when ``model.class_conditional``; pool etc. from options."""
        if num_outputs is None:
            raise ConfigError("encoder_classifier: needs num_outputs (the number of labels)")
        if aug_dim:
            raise ConfigError("encoder_classifier: takes no augmentation vector; use "
                              "data.augment=none for it")
        channels, height = int(shape[0]), int(shape[1])
        return cls(
            in_channels=channels, num_outputs=num_outputs, image_size=height,
            model_channels=model.model_channels, channel_mult=tuple(model.channel_mult),
            num_res_blocks=model.num_res_blocks,
            attention_resolutions=tuple(model.attention_resolutions), dropout=model.dropout,
            head_channels=model.head_channels,
            num_classes_cond=num_classes if model.class_conditional and num_classes > 1 else None,
            **model.options,
        )

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


class MLPHead(nn.Module):
    """Classifier head on feature rows (vectors or N-D tensors, flattened):
    [Linear -> LayerNorm -> SiLU -> Dropout] x depth -> Linear -> logits.

    With ``time_conditional`` the sinusoidal embedding of t (through a small MLP) is added after
    the first Linear, giving p(l | f, t) for features computed at per-row timesteps. The raw
    features are not normalised (a LayerNorm over few features would keep only their ranks).
    """

    CONFIG_PARAMS = ("in_shape", "num_outputs", "hidden", "depth", "dropout")

    def __init__(self, in_shape: Sequence[int], num_outputs: int, *, hidden: int = 256,
                 depth: int = 2, dropout: float = 0.0, time_conditional: bool = False):
        super().__init__()
        if depth < 1 or hidden < 1 or num_outputs < 1:
            raise ConfigError(f"mlp_head: depth, hidden and num_outputs must be >= 1, got "
                              f"{depth}, {hidden}, {num_outputs}")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.num_outputs = num_outputs
        self.time_conditional = time_conditional
        width = math.prod(self.in_shape)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "linear": nn.Linear(width, hidden), "norm": nn.LayerNorm(hidden),
                "drop": nn.Dropout(dropout)}))
            width = hidden
        self.time_embed = (nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(),
                                         nn.Linear(hidden, hidden))
                           if time_conditional else None)
        self.head = nn.Linear(hidden, num_outputs)

    @classmethod
    def from_config(cls, model: Any, *, shape: Sequence[int], num_classes: int,
                    num_outputs: int | None = None, aug_dim: int = 0) -> "MLPHead":
        """Hidden width ``model.model_channels``, ``model.num_res_blocks`` hidden layers."""
        if num_outputs is None:
            raise ConfigError("mlp_head: needs num_outputs (the number of labels)")
        if aug_dim or (model.class_conditional and num_classes > 1):
            raise ConfigError("mlp_head: takes no class or augmentation conditioning; set "
                              "class_conditional: false")
        return cls(in_shape=tuple(shape), num_outputs=num_outputs, hidden=model.model_channels,
                   depth=model.num_res_blocks, dropout=model.dropout, **model.options)

    def forward(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Logits [B, num_outputs] of features x [B, *in_shape] (at timesteps t [B])."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"features of shape {tuple(x.shape[1:])}, expected {self.in_shape}")
        emb = None
        if self.time_embed is not None:
            if t is None:
                raise ValueError("this head is time-conditional: pass the timesteps t")
            t = as_timesteps(t, x.shape[0], x.device)
            emb = self.time_embed(timestep_embedding(t, self.head.in_features))
        h = x.flatten(1)
        for i, block in enumerate(self.blocks):
            h = block["linear"](h)
            if i == 0 and emb is not None:
                h = h + emb.to(h.dtype)
            h = block["drop"](F.silu(block["norm"](h)))
        return self.head(h)
