"""Training-time augmentations keyed by ``data.augment``: "none", "hflip" and "ada", the k-diffusion
"Karras" non-leaking augmentation with its 9-dim conditioning vector (docs/algorithms.md §4.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from debiaslab.registry import Registry

AUG_DIM = 9  # (a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7)
MATRIX_DTYPE = torch.float64  # pixel-space matrices and their inverses are formed in float64


class Augment(Protocol):
    """What every entry of ``AUGMENTS`` provides: ``aug_dim`` (0 = no conditioning vector) and
    ``(x [B,C,H,W], CPU generator) -> (augmented x, cond [B, aug_dim] float32 or None)``.

    With ``world_size`` > 1 the random draws are made for the global batch (B * world_size) and
    rank ``rank`` uses its slice, so a DDP run augments exactly like one process."""

    aug_dim: int

    def __call__(self, x: Tensor, generator: torch.Generator, *, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, Tensor | None]: ...


def rank_slice(values: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share of a global-batch tensor [B * world_size, ...]."""
    return values.view(world_size, -1, *values.shape[1:])[rank]


AUGMENTS: Registry[type] = Registry("augment")


def build_augment(name: str) -> Augment:
    """The augmentation registered under ``name`` (``data.augment``), instantiated with defaults."""
    return AUGMENTS.build(name)


@AUGMENTS.register("none")
class NoAugment:
    """Identity: images unchanged, no conditioning vector."""

    aug_dim: ClassVar[int] = 0

    def __call__(self, x: Tensor, generator: torch.Generator, *, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, None]:
        return x, None


@AUGMENTS.register("hflip")
class HFlip:
    """Random horizontal flip with probability 1/2 per sample (CBDM without --augm:
    RandomHorizontalFlip, docs/algorithms.md §4.4). Draws exactly
    ``torch.rand(B, generator) < 0.5``, as the training loop's ``make_batch`` does, and flips
    the width axis where true."""

    aug_dim: ClassVar[int] = 0
    p_flip: ClassVar[float] = 0.5

    def __call__(self, x: Tensor, generator: torch.Generator, *, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, None]:
        draws = torch.rand(x.shape[0] * world_size, generator=generator)
        flip = (rank_slice(draws, rank, world_size) < self.p_flip).to(x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), None


# ------------------------------------------------------------------ 3x3 homogeneous pixel matrices
# Batched versions of k-diffusion's translate2d / scale2d / rotate2d: [B] tensors -> [B, 3, 3],
# acting on column vectors (x, y, 1) with x = column index, y = row index (y points down).

def _eye(like: Tensor) -> Tensor:
    return torch.eye(3, dtype=MATRIX_DTYPE).expand(like.shape[0], 3, 3).clone()


def translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    mat = _eye(tx)
    mat[:, 0, 2], mat[:, 1, 2] = tx, ty
    return mat


def scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    mat = _eye(sx)
    mat[:, 0, 0], mat[:, 1, 1] = sx, sy
    return mat


def rotate2d(theta: Tensor) -> Tensor:
    """[[cos, -sin], [sin, cos]] (k-diffusion writes ``sin(-theta)`` for the -sin entry)."""
    mat = _eye(theta)
    cos, sin = theta.cos(), theta.sin()
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, -sin, sin, cos
    return mat


def pixel_to_normalized(height: int, width: int) -> Tensor:
    """N: pixel (x, y) -> grid_sample coordinate (u, v) for ``align_corners=False``:
    u = (2x + 1)/W - 1, so pixel centres x = 0..W-1 sit at u = -1 + 1/W .. 1 - 1/W."""
    return torch.tensor([[2 / width, 0, 1 / width - 1],
                         [0, 2 / height, 1 / height - 1],
                         [0, 0, 1]], dtype=MATRIX_DTYPE)


def matrix_to_theta(mat: Tensor, height: int, width: int) -> Tensor:
    """Pixel-space forward maps [B,3,3] -> ``affine_grid`` thetas [B,2,3] (align_corners=False).

    k-diffusion warps with ``skimage.transform.warp(image, AffineTransform(M).inverse)``, i.e.
    out(q) = in(M^-1 q) with q, M^-1 q in pixel coordinates. ``affine_grid`` hands output pixel q
    to ``theta`` as N q and ``grid_sample`` reads the input at pixel N^-1 (theta N q), so
    theta = N M^-1 N^-1. N maps the image centre ((W-1)/2, (H-1)/2) to (0, 0), so a centred M
    keeps its centre and there is no half-pixel shift.
    """
    n = pixel_to_normalized(height, width)
    theta = n @ torch.linalg.inv(mat.to(MATRIX_DTYPE)) @ torch.linalg.inv(n)
    return theta[:, :2, :]


def warp(x: Tensor, mat: Tensor) -> Tensor:
    """out(q) = x(M^-1 q) for pixel-space forward maps ``mat`` [B,3,3]: bicubic, reflect padding.

    Computed in float32 (float64 for float64 input) on x.device and cast back to x.dtype; no clip
    (k-diffusion warps with ``clip=False``, so bicubic overshoot beyond [-1, 1] is kept).
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    height, width = x.shape[-2:]
    theta = matrix_to_theta(mat, height, width).to(device=x.device, dtype=work)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(work), grid, mode="bicubic", padding_mode="reflection",
                        align_corners=False)
    return out.to(x.dtype)


@dataclass(frozen=True)
class KarrasParams:
    """Drawn parameters, [B] float32 each; 0 where a transform was not applied (as in k-diffusion,
    whose ``do`` flags multiply the draws)."""

    a0: Tensor  # x-flip in {0, 1}
    a1: Tensor  # y-flip in {0, 1}
    a2: Tensor  # log_{a_scale} isotropic scale, N(0, 1)
    a3: Tensor  # rotation angle, U(-pi, pi)
    a4: Tensor  # anisotropy axis angle, U(-pi, pi)
    a5: Tensor  # log_{a_aniso} anisotropic stretch, N(0, 1)
    a6: Tensor  # x translation in units of a_trans * W, N(0, 1)
    a7: Tensor  # y translation in units of a_trans * H, N(0, 1)


@AUGMENTS.register("ada")
@dataclass
class KarrasAugment:
    """Karras et al. 2022 (EDM, App. non-leaking augmentation) as implemented by k-diffusion's
    ``KarrasAugmentationPipeline`` (crowsonkb/k-diffusion, k_diffusion/augmentation.py) and used by
    CBDM (Qin et al., CVPR 2023; utils/augmentation.py): docs/algorithms.md §4.4.

    Per sample, in k-diffusion's draw order: x-flip a0 ~ Bernoulli(1/2) always; then, each with
    probability ``a_prob``: y-flip a1 ~ Bernoulli(1/2) (so a y-flip happens with a_prob/2),
    isotropic scale a_scale^a2, rotation a3, anisotropic scale a_aniso^{+-a5} along angle a4,
    translation (a6 a_trans W, a7 a_trans H) pixels. The pixel-space forward map is

        M = T(c) Sx(1-2a0) Sy(1-2a1) S(a_scale^a2) R(-a3) R(a4) S(a_aniso^a5, a_aniso^-a5) R(-a4)
            T(a_trans W a6, a_trans H a7) T(-c),    c = (W/2 - 1/2, H/2 - 1/2),

    with R(t) = [[cos t, -sin t], [sin t, cos t]] on (x right, y down); out(q) = in(M^-1 q).
    Hence a3 = pi/2 turns the picture a quarter turn counter-clockwise on screen
    (= ``torch.rot90(x, 1, dims=(-2, -1))``), and a6 > 0 / a7 > 0 alone move content right / down.
    The conditioning vector is (a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7);
    the sampler feeds zeros.

    Deviations from k-diffusion (which warps one PIL image with skimage):
    - Batched torch ``grid_sample(mode="bicubic")`` is Keys cubic convolution (a = -0.75); skimage
      ``order=3`` is cubic B-spline interpolation. Identical on identity, flips, quarter turns and
      integer shifts; slightly different smoothing for general warps.
    - ``padding_mode="reflection"`` with ``align_corners=False`` reflects about the image border
      (edge pixel repeated, numpy "symmetric"); skimage ``mode="reflect"`` reflects about the edge
      pixel centres. Only pixels sampled from outside the image differ.
    - k-diffusion reads ``h, w = image.size`` from PIL, which is (width, height): its centring
      T(h/2 - 1/2, w/2 - 1/2) is correct, but its translation is (a_trans H a6, a_trans W a7). We
      use (a_trans W a6, a_trans H a7); identical on square images (CIFAR, CelebA-64).
    - Draws come from the given CPU generator, one [B] vector per draw in k-diffusion's per-image
      order, instead of the global RNG per image; matrices are formed in float64.
    - ``xflip=False`` (not in k-diffusion) disables the x-flip, for tests and ablations.
    - k-diffusion warps in [0, 1] and maps back to [-1, 1]; interpolation weights sum to 1, so
      warping in [-1, 1] directly is the same map.
    """

    a_prob: float = 0.12
    a_scale: float = 2 ** 0.2
    a_aniso: float = 2 ** 0.2
    a_trans: float = 1 / 8
    xflip: bool = True

    aug_dim: ClassVar[int] = AUG_DIM

    def sample_params(self, batch_size: int, generator: torch.Generator) -> KarrasParams:
        """Draw every sample's parameters on CPU from ``generator`` (13 [B] draws, fixed count)."""
        b, g = batch_size, generator

        def applied() -> Tensor:
            return (torch.rand(b, generator=g) < self.a_prob).float()

        def angle() -> Tensor:
            return torch.rand(b, generator=g) * 2 * math.pi - math.pi

        a0 = torch.randint(2, (b,), generator=g).float() * float(self.xflip)
        do = applied()
        a1 = torch.randint(2, (b,), generator=g).float() * do
        do = applied()
        a2 = torch.randn(b, generator=g) * do
        do = applied()
        a3 = angle() * do
        do = applied()
        a4 = angle() * do
        a5 = torch.randn(b, generator=g) * do
        do = applied()
        a6 = torch.randn(b, generator=g) * do
        a7 = torch.randn(b, generator=g) * do
        return KarrasParams(a0, a1, a2, a3, a4, a5, a6, a7)

    def matrix(self, p: KarrasParams, height: int, width: int) -> Tensor:
        """Pixel-space forward maps M [B, 3, 3] (float64, CPU), composed as in k-diffusion."""
        a = {k: getattr(p, k).to(MATRIX_DTYPE) for k in ("a0", "a1", "a2", "a3", "a4", "a5",
                                                         "a6", "a7")}
        one = torch.ones_like(a["a0"])
        cx, cy = one * (width / 2 - 0.5), one * (height / 2 - 0.5)
        scale = self.a_scale ** a["a2"]
        mats = [
            translate2d(cx, cy),
            scale2d(1 - 2 * a["a0"], one),
            scale2d(one, 1 - 2 * a["a1"]),
            scale2d(scale, scale),
            rotate2d(-a["a3"]),
            rotate2d(a["a4"]),
            scale2d(self.a_aniso ** a["a5"], self.a_aniso ** -a["a5"]),
            rotate2d(-a["a4"]),
            translate2d(self.a_trans * width * a["a6"], self.a_trans * height * a["a7"]),
            translate2d(-cx, -cy),
        ]
        out = mats[0]
        for m in mats[1:]:
            out = out @ m
        return out

    @staticmethod
    def cond(p: KarrasParams) -> Tensor:
        """(a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7): [B, 9] float32."""
        return torch.stack([p.a0, p.a1, p.a2, p.a3.cos() - 1, p.a3.sin(), p.a5 * p.a4.cos(),
                            p.a5 * p.a4.sin(), p.a6, p.a7], dim=1).float()

    def __call__(self, x: Tensor, generator: torch.Generator, *, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, Tensor]:
        """x [B,C,H,W] in [-1, 1] -> (augmented x, same shape/dtype/device; cond [B, 9] float32)."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"expected a float [B, C, H, W] batch, got {tuple(x.shape)} {x.dtype}")
        drawn = self.sample_params(x.shape[0] * world_size, generator)
        params = KarrasParams(**{name: rank_slice(getattr(drawn, name), rank, world_size)
                                 for name in KarrasParams.__dataclass_fields__})
        out = warp(x, self.matrix(params, x.shape[-2], x.shape[-1]))
        return out, self.cond(params).to(x.device)
