"""Shared building blocks of the ADM-style UNet and encoder classifier (Dhariwal & Nichol 2021).

Float-timestep sinusoidal embedding, scale-shift ResBlocks, multi-head self-attention, resampling,
the conditioning MLP (time + class + augmentation) and the timestep-conditioned encoder trunk.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.errors import ConfigError

MAX_PERIOD = 10000.0  # longest wavelength of the sinusoidal timestep embedding
MAX_NORM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4
TIME_EMBED_MULT = 4  # embedding width = TIME_EMBED_MULT * model_channels (ADM, DDPM)


def timestep_embedding(t: Tensor, dim: int, max_period: float = MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B] (Vaswani et al.).

    emb = [cos(t * f_k), sin(t * f_k)], f_k = max_period^(-k / half), k = 0..half-1; odd dims get a
    trailing zero. Computed in float32 for any input dtype, so t = 499.5 is as valid as t = 500.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def norm_groups(channels: int) -> int:
    """GroupNorm group count: up to 32 groups of at least 4 channels, dividing `channels`."""
    groups = max(1, min(MAX_NORM_GROUPS, channels // MIN_CHANNELS_PER_GROUP))
    while channels % groups:
        groups -= 1
    return groups


def normalization(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` (ADM: residual branches and final convs start at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block whose forward takes the conditioning embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes `emb` to the children that are TimestepBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None
        if self.conv is None and out_channels != channels:
            raise ConfigError("Upsample without conv cannot change the channel count")

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ConfigError("Downsample without conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block: GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv(zero) + skip.

    With `use_scale_shift_norm` the embedding gives (scale, shift) applied as
    GN(h) * (1 + scale) + shift; otherwise it is added to h. `up`/`down` resample both branches.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels)
        self.in_conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_norm = normalization(self.out_channels)
        self.out_rest = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if self.out_channels == channels
            else nn.Conv2d(channels, self.out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self.h_upd(h))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_rest(h)


def resolve_heads(channels: int, num_heads: int, head_channels: int | None) -> int:
    """Number of attention heads: channels // head_channels if given, else num_heads."""
    if head_channels is not None and head_channels > 0:
        if channels % head_channels:
            raise ConfigError(f"attention: {channels} channels not divisible by "
                              f"head_channels={head_channels}")
        return channels // head_channels
    if num_heads < 1 or channels % num_heads:
        raise ConfigError(f"attention: {channels} channels not divisible by num_heads={num_heads}")
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, pre-norm, zero-init output projection."""

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int | None = None):
        super().__init__()
        self.num_heads = resolve_heads(channels, num_heads, head_channels)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat))  # [B, 3C, L]
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, -1).unbind(dim=1)
        # [B, heads, L, d] for scaled_dot_product_attention (softmax(q k^T / sqrt(d)) v).
        a = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        a = a.transpose(-1, -2).reshape(b, c, -1)
        return (x_flat + self.proj_out(a)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP/ADM attention pooling: the mean token attends over all positions (+ learned pos-emb).

    Returns the attended mean token [B, C] (the projection to logits is left to the caller).
    """

    def __init__(self, spatial_size: int, channels: int, num_heads: int = 1,
                 head_channels: int | None = None):
        super().__init__()
        self.num_heads = resolve_heads(channels, num_heads, head_channels)
        self.positional_embedding = nn.Parameter(
            torch.randn(channels, spatial_size**2 + 1) / channels**0.5
        )
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, -1).unbind(dim=1)
        a = F.scaled_dot_product_attention(
            q[..., :1].transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )  # [B, heads, 1, d]
        return a.reshape(b, c)


class Conditioning(nn.Module):
    """emb = MLP(sinusoid(t)) [+ class_emb(y)] [+ W_aug aug]  (ALGORITHMS.md §4.1, §4.4).

    The class table has num_classes + 1 rows; row num_classes is the learned NULL label used for
    classifier-free guidance, and y=None means the null label.
    """

    def __init__(self, model_channels: int, num_classes: int | None = None, aug_dim: int = 0):
        super().__init__()
        self.model_channels = model_channels
        self.emb_channels = TIME_EMBED_MULT * model_channels
        self.num_classes = num_classes
        self.aug_dim = aug_dim
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, self.emb_channels),
            nn.SiLU(),
            nn.Linear(self.emb_channels, self.emb_channels),
        )
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int or None, got {num_classes}")
        self.label_emb = (
            nn.Embedding(num_classes + 1, self.emb_channels) if num_classes is not None else None
        )
        if aug_dim < 0:
            raise ConfigError(f"aug_dim must be >= 0, got {aug_dim}")
        self.aug_emb = nn.Linear(aug_dim, self.emb_channels, bias=False) if aug_dim else None

    def forward(self, t: Tensor, batch: int, device: torch.device, y: Tensor | None = None,
                aug: Tensor | None = None) -> Tensor:
        t = as_timesteps(t, batch, device)
        w = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(w.dtype))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            emb = emb + self.label_emb(y.to(device=device, dtype=torch.long))
        elif y is not None:
            raise ValueError("labels y were given to a network built with num_classes=None")
        if aug is not None:
            if self.aug_emb is None:
                raise ValueError("an augmentation vector was given to a network with aug_dim=0")
            emb = emb + self.aug_emb(aug.to(w.dtype))
        return emb


def as_timesteps(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Float timesteps of shape [batch] from a scalar, a 0-d tensor or a [batch] tensor."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    return t


def check_architecture(image_size: int, channel_mult: Sequence[int],
                       attention_resolutions: Sequence[int]) -> list[int]:
    """Validate and return the feature-map sizes of each level (image_size / 2^level)."""
    levels = len(channel_mult)
    if levels < 1:
        raise ConfigError("channel_mult must have at least one level")
    factor = 2 ** (levels - 1)
    if image_size < factor or image_size % factor:
        raise ConfigError(f"image_size={image_size} must be divisible by 2^(levels-1)={factor}")
    sizes = [image_size // 2**level for level in range(levels)]
    unknown = sorted(set(attention_resolutions) - set(sizes))
    if unknown:
        raise ConfigError(f"attention_resolutions {unknown} are not feature-map sizes of this "
                          f"network; allowed: {sizes}")
    return sizes


class Encoder(nn.Module):
    """Timestep-conditioned ADM encoder trunk: input conv, levels of ResBlocks (+attention) with
    downsampling between levels, then the middle block ResBlock-Attention-ResBlock.

    forward(x, emb) -> (middle-block output h, list of skip activations for a decoder).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        emb_channels: int,
        image_size: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        num_heads: int,
        head_channels: int | None,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
    ):
        super().__init__()
        sizes = check_architecture(image_size, channel_mult, attention_resolutions)
        attn = set(attention_resolutions)

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_channels, dropout, ch_out, use_scale_shift_norm, **kw)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        self.skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if sizes[level] in attn:
                    layers.append(AttentionBlock(ch, num_heads, head_channels))
                self.input_blocks.append(TimestepSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepSequential(down))
                self.skip_channels.append(ch)
        self.middle_block = TimestepSequential(
            res(ch, ch), AttentionBlock(ch, num_heads, head_channels), res(ch, ch)
        )
        self.out_channels = ch
        self.out_size = sizes[-1]
        self.level_sizes = sizes

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips
