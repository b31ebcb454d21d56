"""Per-sample seeded Gaussian noise: each image's noise comes from its own seed (STYLE.md item 9),
so a sample does not depend on the batch size or on which other samples share its batch.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

NOISE_DOMAIN = "debiaslab-minority-noise-v1"  # image_seed's domain (fixed: it defines noise)
NOISE_DRAW_DTYPE = torch.float32  # what torch.randn draws by default, and what diffusers draws


class SampleNoise:
    """One CPU ``torch.Generator`` per sample, seeded with that sample's seed.

    ``draw()`` returns a [B, C, H, W] tensor on ``device`` whose row i is
    ``torch.randn((1, C, H, W), generator=g_i)`` (float32, then cast to ``dtype``): exactly what
    diffusers' ``randn_tensor`` draws when given a list of per-sample generators. A sampler's first
    draw is x_T; each stochastic step draws once more, so row i's stream depends only on seed i.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...],
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(d) for d in shape)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype = dtype
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def draw(self) -> Tensor:
        """The next standard normal draw of every sample, stacked: [B, *shape] on ``device``."""
        rows = [torch.randn((1,) + self.shape, generator=g, dtype=NOISE_DRAW_DTYPE)
                for g in self.generators]
        return torch.cat(rows).to(self.device, self.dtype)


# per-image noise: a dataset image's draws, from a seed and its id (e.g. minority scores)


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit generator seed for one image: sha256 of (domain, seed, id)."""
    digest = hashlib.sha256(f"{NOISE_DOMAIN}|{seed}|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_noise(seed: int, image_id: str, n_iter: int, shape: tuple[int, ...]) -> Tensor:
    """The n_iter standard-normal draws [n_iter, *shape] of one image (CPU, float32): the same
    for an image wherever and with whatever neighbours it is scored."""
    gen = torch.Generator().manual_seed(image_seed(seed, image_id))
    return torch.randn((n_iter, *shape), generator=gen)
