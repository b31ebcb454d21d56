"""ADM-style UNet eps/x0/v network with class + augmentation conditioning and an h-space tap.

h-space (Kwon et al. 2023 "Asyrp"; docs/algorithms.md §3.1), the middle-block output, can be read
(`return_h=True`) and replaced (`with unet.h_edit(fn):`) while the decoder keeps the encoder skips.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from debiaslab.nets.layers import (
    AttentionBlock,
    Conditioning,
    Encoder,
    ResBlock,
    TimestepSequential,
    Upsample,
    as_timesteps,
    normalization,
    zero_module,
)

HEditFn = Callable[[Tensor, Tensor], Tensor]
"""fn(h, t) -> h': h [B, C, H, W] is the middle-block output, t [B] the float timesteps."""


class UNet(nn.Module):
    """ADM UNet (Dhariwal & Nichol 2021) as used by CBDM, MG, TIW-DSM, Debias and Balancing Act.

    Conditioning: emb = MLP(sinusoid(t)) + E[y] + W_aug aug, where E has num_classes + 1 rows and
    y == num_classes (= `null_label`, also used when y is None) is the CFG null label. The final
    conv is zero-initialised, so an untrained network outputs zeros.
    """

    # constructor parameters that from_config fills from ModelConfig fields (the others may be
    # given as model.options)
    CONFIG_PARAMS = ("in_channels", "out_channels", "image_size", "model_channels", "channel_mult",
                     "num_res_blocks", "attention_resolutions", "dropout", "head_channels",
                     "num_classes", "aug_dim")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        image_size: int,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8,),
        dropout: float = 0.0,
        num_heads: int = 4,
        head_channels: int | None = None,
        num_classes: int | None = None,
        aug_dim: int = 0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.aug_dim = aug_dim
        self.cond = Conditioning(model_channels, num_classes, aug_dim)
        emb_ch = self.cond.emb_channels
        self.encoder = Encoder(
            in_channels, model_channels, emb_ch, image_size, channel_mult, num_res_blocks,
            attention_resolutions, dropout, num_heads, head_channels, use_scale_shift_norm,
            resblock_updown,
        )
        sizes = self.encoder.level_sizes
        attn = set(attention_resolutions)
        skip_chans = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                ch_out = model_channels * mult
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_chans.pop(), emb_ch, dropout, ch_out, use_scale_shift_norm)
                ]
                ch = ch_out
                if sizes[level] in attn:
                    layers.append(AttentionBlock(ch, num_heads, head_channels))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_ch, dropout, ch, use_scale_shift_norm, up=True)
                        if resblock_updown
                        else Upsample(ch)
                    )
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )
        # Plain attribute outside nn.Module bookkeeping: an edit fn that is itself a Module must not
        # become a submodule (it would enter state_dict and .to()).
        object.__setattr__(self, "_h_edit_fn", None)

    @classmethod
    def from_config(cls, model: Any, *, shape: Sequence[int], num_classes: int,
                    num_outputs: int | None = None, aug_dim: int = 0) -> "UNet":
        """The score network of ``model`` (a ModelConfig) for images of ``shape`` (C, H, W):
        C output channels (``num_outputs`` if given), class conditioning when
        ``model.class_conditional`` and there is more than one class."""
        channels, height = int(shape[0]), int(shape[1])
        return cls(
            in_channels=channels, out_channels=channels if num_outputs is None else num_outputs,
            model_channels=model.model_channels, channel_mult=tuple(model.channel_mult),
            num_res_blocks=model.num_res_blocks,
            attention_resolutions=tuple(model.attention_resolutions), image_size=height,
            dropout=model.dropout, head_channels=model.head_channels,
            num_classes=num_classes if model.class_conditional and num_classes > 1 else None,
            aug_dim=aug_dim, **model.options,
        )

    @property
    def null_label(self) -> int | None:
        """Class index meaning "no label" (classifier-free guidance), or None if unconditional."""
        return self.num_classes

    def h_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """Shape (C, H, W) of the h-space tensor for square inputs of `image_size` (default: the
        configured one)."""
        size = self.image_size if image_size is None else image_size
        factor = self.image_size // self.encoder.out_size
        return (self.encoder.out_channels, size // factor, size // factor)

    @contextlib.contextmanager
    def h_edit(self, fn: HEditFn | None) -> Iterator[None]:
        """Within the block, every forward replaces the middle-block output h by fn(h, t).

        The decoder then runs on fn's result with the ORIGINAL encoder skips. fn may detach h and
        enable grad on it to take gradients w.r.t. h (x never needs grad). The innermost active
        edit wins; leaving the block restores the previous one. `fn=None` disables editing.
        """
        previous = self._h_edit_fn
        object.__setattr__(self, "_h_edit_fn", fn)
        try:
            yield
        finally:
            object.__setattr__(self, "_h_edit_fn", previous)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        aug: Tensor | None = None,
        return_h: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, in, H, W], t [B] float (or scalar), y [B] long, aug [B, aug_dim] -> [B, out, H, W].

        With return_h=True returns (out, h) where h is the h-space tensor the decoder consumed
        (after any active h_edit).
        """
        t = as_timesteps(t, x.shape[0], x.device)
        emb = self.cond(t, x.shape[0], x.device, y, aug)
        h, skips = self.encoder(x, emb)
        edit = self._h_edit_fn
        if edit is not None:
            h_new = edit(h, t)
            if h_new.shape != h.shape:
                raise ValueError(f"h_edit fn changed the h shape {tuple(h.shape)} -> "
                                 f"{tuple(h_new.shape)}")
            h = h_new
        out = h
        for block in self.output_blocks:
            out = block(torch.cat([out, skips.pop()], dim=1), emb)
        out = self.out(out)
        return (out, h) if return_h else out

