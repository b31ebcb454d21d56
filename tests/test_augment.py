"""Tests of debiaslab.data.augment: the Karras/k-diffusion augmentation against a transcription of
k-diffusion's matrix composition and a naive bicubic warp, exact flips/turns/shifts, statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from debiaslab.data.augment import (
    AUG_DIM,
    AUGMENTS,
    HFlip,
    KarrasAugment,
    KarrasParams,
    NoAugment,
    build_augment,
    warp,
)
from debiaslab.errors import ConfigError

KEYS_A = -0.75  # PyTorch's bicubic (Keys cubic convolution) coefficient


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params(batch: int, **values: float) -> KarrasParams:
    """Parameters with the named ones set to a constant and every other one 0 (not applied)."""
    fields = {f"a{i}": torch.zeros(batch) for i in range(8)}
    for k, v in values.items():
        fields[k] = torch.full((batch,), float(v))
    return KarrasParams(**fields)


def apply(aug: KarrasAugment, x: Tensor, p: KarrasParams) -> Tensor:
    return warp(x, aug.matrix(p, x.shape[-2], x.shape[-1]))


# ---------------------------------------------------------------- independent references
def kdiff_matrix(aug: KarrasAugment, p: KarrasParams, i: int, height: int, width: int) -> Tensor:
    """Sample i's matrix, transcribed from k-diffusion's KarrasAugmentationPipeline.__call__
    (translation in x scaled by the width, y by the height)."""

    def t2(tx: float, ty: float) -> Tensor:
        return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64)

    def s2(sx: float, sy: float) -> Tensor:
        return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=torch.float64)

    def r2(t: float) -> Tensor:
        return torch.tensor([[math.cos(t), math.sin(-t), 0], [math.sin(t), math.cos(t), 0],
                             [0, 0, 1]], dtype=torch.float64)

    a = [float(getattr(p, f"a{k}")[i]) for k in range(8)]
    mats = [t2(width / 2 - 0.5, height / 2 - 0.5), s2(1 - 2 * a[0], 1), s2(1, 1 - 2 * a[1]),
            s2(aug.a_scale ** a[2], aug.a_scale ** a[2]), r2(-a[3]), r2(a[4]),
            s2(aug.a_aniso ** a[5], aug.a_aniso ** -a[5]), r2(-a[4]),
            t2(aug.a_trans * width * a[6], aug.a_trans * height * a[7]),
            t2(-width / 2 + 0.5, -height / 2 + 0.5)]
    out = torch.eye(3, dtype=torch.float64)
    for m in mats:
        out = out @ m
    return out


def keys_weight(d: Tensor) -> Tensor:
    d = d.abs()
    near = ((KEYS_A + 2) * d - (KEYS_A + 3)) * d * d + 1
    far = ((KEYS_A * d - 5 * KEYS_A) * d + 8 * KEYS_A) * d - 4 * KEYS_A
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def reflect_index(k: Tensor, n: int) -> Tensor:
    """Integer tap -> index, mirrored about the image border (edge pixel repeated)."""
    m = k % (2 * n)
    return torch.where(m < n, m, 2 * n - 1 - m)


def naive_warp(img: Tensor, mat: Tensor) -> Tensor:
    """out(q) = img(M^-1 q) by explicit 4x4 Keys cubic convolution in pixel units: [C, H, W]."""
    _, height, width = img.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    q = torch.stack([xs.flatten(), ys.flatten(), torch.ones(height * width, dtype=torch.float64)])
    src = torch.linalg.inv(mat) @ q
    sx, sy = src[0], src[1]
    x0, y0 = sx.floor(), sy.floor()
    out = torch.zeros(img.shape[0], height * width, dtype=torch.float64)
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            kx, ky = x0 + dx, y0 + dy
            w = keys_weight(sx - kx) * keys_weight(sy - ky)
            ix = reflect_index(kx.long(), width)
            iy = reflect_index(ky.long(), height)
            out += w * img[:, iy, ix]
    return out.view(img.shape)


# ---------------------------------------------------------------- registry
def test_registry_entries_and_build() -> None:
    assert AUGMENTS.names() == ["ada", "hflip", "none"]
    assert [build_augment(n).aug_dim for n in ("none", "hflip", "ada")] == [0, 0, AUG_DIM]
    assert isinstance(build_augment("ada"), KarrasAugment) and AUG_DIM == 9
    x = torch.randn(3, 1, 4, 4)
    out, cond = NoAugment()(x, gen())
    assert out is x and cond is None
    with pytest.raises(ConfigError, match="hflip"):
        build_augment("cutout")


def test_hflip_reproduces_training_loop_draw() -> None:
    x = torch.randn(64, 2, 5, 7)
    out, cond = HFlip()(x, gen(7))
    g = gen(7)
    flip = torch.rand(64, generator=g) < 0.5  # what make_batch draws
    assert cond is None and 10 < int(flip.sum()) < 54
    torch.testing.assert_close(out, torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x),
                               rtol=0, atol=0)
    g_used = gen(7)
    HFlip()(x, g_used)
    assert torch.equal(torch.rand(3, generator=g_used), torch.rand(3, generator=g))


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 1, 6, 10)])
def test_identity_is_exact_and_cond_zero(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape) * 2 - 1
    out, cond = KarrasAugment(a_prob=0.0, xflip=False)(x, gen(1))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert cond.shape == (shape[0], AUG_DIM) and cond.dtype == torch.float32
    assert torch.count_nonzero(cond) == 0


def test_flips_and_quarter_turns() -> None:
    aug = KarrasAugment()
    x = torch.rand(3, 2, 8, 8) * 2 - 1
    torch.testing.assert_close(apply(aug, x, params(3, a0=1)), x.flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(apply(aug, x, params(3, a1=1)), x.flip(-2), rtol=0, atol=1e-5)
    torch.testing.assert_close(apply(aug, x, params(3, a0=1, a1=1)), x.flip(-1, -2),
                               rtol=0, atol=1e-5)
    # k-diffusion warps with R(-a3) on (x right, y down): a3 = +pi/2 is a counter-clockwise turn
    turned = apply(aug, x, params(3, a3=math.pi / 2))
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-4)
    assert (turned - torch.rot90(x, -1, dims=(-2, -1))).abs().max() > 0.1
    torch.testing.assert_close(apply(aug, x, params(3, a3=-math.pi / 2)),
                               torch.rot90(x, -1, dims=(-2, -1)), rtol=0, atol=1e-4)


def test_integer_translation_moves_impulse() -> None:
    aug = KarrasAugment()  # a_trans = 1/8: on 16x16, a6 = 1 is 2 pixels, a7 = -0.5 is 1 pixel
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 5, 6] = 1.0

    def peak(out: Tensor) -> tuple[int, int]:
        assert out.max() > 0.999 and (out.abs() > 1e-4).sum() == 1
        r, c = divmod(int(out.flatten().argmax()), 16)
        return r, c

    assert peak(apply(aug, x, params(1, a6=1))) == (5, 8)  # right
    assert peak(apply(aug, x, params(1, a7=-0.5))) == (4, 6)  # up
    # the shift is applied before the flip in M (k-diffusion's order): flipped column 9, then -2
    assert peak(apply(aug, x, params(1, a0=1, a6=1))) == (5, 7)


def test_matrix_matches_kdiffusion_composition() -> None:
    aug = KarrasAugment(a_prob=1.0)
    p = aug.sample_params(16, gen(3))
    for height, width in [(8, 8), (6, 10)]:
        mat = aug.matrix(p, height, width)
        ref = torch.stack([kdiff_matrix(aug, p, i, height, width) for i in range(16)])
        torch.testing.assert_close(mat, ref, rtol=1e-12, atol=1e-12)


def test_warp_matches_naive_bicubic_on_general_matrices() -> None:
    """Checks the pixel matrix -> theta conversion and the padding on non-square images."""
    aug = KarrasAugment(a_prob=1.0)
    x = torch.rand(6, 2, 9, 12, dtype=torch.float64) * 2 - 1
    p = aug.sample_params(6, gen(4))
    mat = aug.matrix(p, 9, 12)
    out = warp(x, mat)
    ref = torch.stack([naive_warp(x[i], mat[i]) for i in range(6)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - x).abs().max() > 0.5  # the transforms did something


# ---------------------------------------------------------------- conditioning vector
def test_cond_layout_matches_drawn_parameters() -> None:
    x = torch.rand(200, 1, 6, 6) * 2 - 1
    out, cond = KarrasAugment(a_prob=0.0)(x, gen(5))  # x-flip only
    assert set(cond[:, 0].tolist()) == {0.0, 1.0}
    flipped = cond[:, 0] == 1
    torch.testing.assert_close(out, torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x),
                               rtol=0, atol=1e-5)
    assert torch.count_nonzero(cond[:, 1:]) == 0

    aug = KarrasAugment(a_prob=1.0)
    _, cond = aug(x, gen(6))
    p = aug.sample_params(200, gen(6))  # same seed, same draws
    expected = torch.stack([p.a0, p.a1, p.a2, torch.cos(p.a3) - 1, torch.sin(p.a3),
                            p.a5 * torch.cos(p.a4), p.a5 * torch.sin(p.a4), p.a6, p.a7], dim=1)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    torch.testing.assert_close((cond[:, 3] + 1) ** 2 + cond[:, 4] ** 2, torch.ones(200))
    assert set(cond[:, 1].tolist()) == {0.0, 1.0}
    assert (cond[:, 2] != 0).all() and (cond[:, 7] != 0).all() and (cond[:, 8] != 0).all()


def test_statistics_of_applied_transforms() -> None:
    n, prob = 4000, 0.12
    _, cond = KarrasAugment()(torch.zeros(n, 1, 8, 8), gen(8))

    def within_3_sigma(frac: Tensor, p: float) -> bool:
        return abs(float(frac) - p) < 3 * math.sqrt(p * (1 - p) / n)

    assert within_3_sigma((cond[:, 0] == 1).float().mean(), 0.5)
    # k-diffusion: a1 = randint(2) * do, so a y-flip happens with a_prob / 2
    assert within_3_sigma((cond[:, 1] == 1).float().mean(), prob / 2)
    for col in (2, 4, 5, 7):  # scale, rotation (sin a3), anisotropy, translation
        assert within_3_sigma((cond[:, col] != 0).float().mean(), prob), col
    assert torch.equal(cond[:, 4] != 0, cond[:, 3] != 0)
    assert torch.equal(cond[:, 7] != 0, cond[:, 8] != 0)
    assert torch.equal(cond[:, 5] != 0, cond[:, 6] != 0)
    applied = cond[:, 4] != 0
    angles = torch.atan2(cond[applied, 4], cond[applied, 3] + 1)  # a3 ~ U(-pi, pi)
    assert 0.35 < (angles < 0).float().mean() < 0.65
    assert 0.15 < (angles.abs() > math.pi / 2).float().mean() < 0.85
    scale = cond[cond[:, 2] != 0, 2]
    assert abs(float(scale.std()) - 1) < 0.2 and abs(float(scale.mean())) < 0.25


# ---------------------------------------------------------------- reproducibility, dtype, device
def test_determinism_shape_and_dtype() -> None:
    aug = KarrasAugment(a_prob=0.5)
    x = torch.rand(8, 3, 6, 10) * 2 - 1
    out1, cond1 = aug(x, gen(9))
    out2, cond2 = aug(x, gen(9))
    assert torch.equal(out1, out2) and torch.equal(cond1, cond2)
    out3, _ = aug(x, gen(10))
    assert not torch.equal(out1, out3)
    assert out1.shape == x.shape and out1.dtype == x.dtype
    for dtype in (torch.float64, torch.bfloat16):
        out, cond = aug(x.to(dtype), gen(9))
        assert out.dtype == dtype and out.shape == x.shape and cond.dtype == torch.float32
        torch.testing.assert_close(out.float(), out1, rtol=0, atol=2e-2)
        assert torch.equal(cond, cond1)
    with pytest.raises(ValueError):
        aug(torch.zeros(3, 4, 4), gen())


@pytest.mark.parametrize("augment", [HFlip(), KarrasAugment(a_prob=0.5)])
def test_rank_slices_reproduce_the_single_process_batch(augment) -> None:
    """DDP: each rank draws for the global batch and keeps its slice -> same as one process."""
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    whole, whole_cond = augment(x, gen(5))
    for rank in range(2):
        part, part_cond = augment(x[4 * rank:4 * (rank + 1)], gen(5), rank=rank, world_size=2)
        torch.testing.assert_close(part, whole[4 * rank:4 * (rank + 1)], rtol=0, atol=1e-6)
        if whole_cond is not None:
            assert torch.equal(part_cond, whole_cond[4 * rank:4 * (rank + 1)])
