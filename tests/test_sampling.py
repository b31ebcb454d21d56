"""debiaslab.sampling.generate and the sampling stage: ``sample.clip_x0`` (on by default) reaches
the VP samplers on the local and the Ray path, ``sample.options.<sampler>.clip_x0`` overrides it,
and samplers without clipping (edm_heun) ignore it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import debiaslab.sampling as sampling
from debiaslab.config import SampleConfig, from_dict, load_config
from debiaslab.diffusion.denoiser import VPDenoiser
from debiaslab.diffusion.samplers import sample
from debiaslab.diffusion.schedules import build_schedule

SHAPE = (1, 4, 4)
SEEDS = [0, 1, 2, 3]
STEPS = 4


class TanhX0(nn.Module):
    """An x0-predicting net whose x0_hat leaves [-1, 1] at large t (so clipping changes the
    in-range output of later steps, not only a final clamp)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return 1.6 * torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)


@pytest.fixture()
def trained(tmp_path: Path) -> sampling.TrainedModel:
    net = TanhX0()
    return sampling.TrainedModel(
        cfg=from_dict({}), model=net, denoiser=VPDenoiser(net, build_schedule("linear"), "x0"),
        shape=SHAPE, num_classes=1, class_names=["digit"], step=7,
        checkpoint=tmp_path / "ckpt.pt")


def test_clip_x0_is_on_by_default_in_the_config() -> None:
    assert SampleConfig().clip_x0 is True
    cfg = load_config(None, ["sample.clip_x0=false"])
    assert cfg.sample.clip_x0 is False


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_generate_passes_clip_x0_to_vp_samplers(trained: sampling.TrainedModel,
                                                name: str) -> None:
    den = trained.denoiser
    clipped = sample(name, den, SEEDS, SHAPE, steps=STEPS).clamp(-1, 1)
    unclipped = sample(name, den, SEEDS, SHAPE, steps=STEPS, clip_x0=False).clamp(-1, 1)
    assert not torch.allclose(clipped, unclipped)  # clipping acts on this model
    run = dict(steps=STEPS)  # one batch, like `sample` above: the same kernels, bit-identical
    assert torch.equal(sampling.generate(trained, name, SEEDS, **run), clipped)
    assert torch.equal(sampling.generate(trained, name, SEEDS, clip_x0=True, **run), clipped)
    assert torch.equal(sampling.generate(trained, name, SEEDS, clip_x0=False, **run), unclipped)
    # sample.options.<sampler>.clip_x0 wins over sample.clip_x0
    assert torch.equal(sampling.generate(trained, name, SEEDS, clip_x0=True,
                                         options={"clip_x0": False}, **run), unclipped)
    assert torch.equal(sampling.generate(trained, name, SEEDS, clip_x0=False,
                                         options={"clip_x0": True}, **run), clipped)


def test_edm_heun_ignores_clip_x0(trained: sampling.TrainedModel) -> None:
    ref = sampling.generate(trained, "edm_heun", SEEDS, steps=STEPS)
    for clip in (True, False):
        assert torch.equal(sampling.generate(trained, "edm_heun", SEEDS, steps=STEPS,
                                             clip_x0=clip), ref)


class GenerateSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, trained: Any, sampler: str, seeds: list[int], **kwargs: Any) -> Tensor:
        self.calls.append((sampler, kwargs))
        return torch.zeros(len(seeds), *SHAPE)


def test_sample_stage_passes_cfg_clip_x0(trained: sampling.TrainedModel, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from debiaslab import stages as pipeline

    spy = GenerateSpy()
    monkeypatch.setattr(sampling, "load_trained", lambda *a, **k: trained)
    monkeypatch.setattr(sampling, "generate", spy)
    cfg = load_config(None, [f"output_dir={tmp_path}", "sample.samplers=[ddim,edm_heun]",
                             "sample.num_samples=4", "sample.steps=3", "sample.clip_x0=false",
                             "sample.options={ddim: {eta: 0.5}}"])
    pipeline.sample(cfg, trained.checkpoint, out_dir=tmp_path / "samples", progress=False)
    assert [(name, kw["clip_x0"], kw["options"]) for name, kw in spy.calls] == [
        ("ddim", False, {"eta": 0.5}), ("edm_heun", False, {})]


def test_ray_sample_path_passes_cfg_clip_x0(trained: sampling.TrainedModel, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import debiaslab.data.dataset as dataset_mod
    import debiaslab.distributed.data as dd
    import debiaslab.distributed.runtime as runtime
    from debiaslab import stages as pipeline

    jobs: list[dict[str, Any]] = []

    class FakeDataset:
        ids = ["seed00000001", "seed00000000"]
        images = torch.zeros(2, *SHAPE, dtype=torch.uint8)

        @staticmethod
        def to_float(images: Tensor) -> Tensor:
            return images.float()

    monkeypatch.setattr(dd, "sample_job", lambda *a, **kw: jobs.append(kw))
    monkeypatch.setattr(runtime, "ray_session", lambda *a, **kw: contextlib.nullcontext())
    monkeypatch.setattr(dataset_mod.ImageDataset, "load", staticmethod(lambda path: FakeDataset))
    for clip in (True, False):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"sample.clip_x0={clip}"])
        pipeline.sample_on_ray(cfg, trained.checkpoint, "ddim", tmp_path / "out", [])
        assert jobs[-1]["clip_x0"] is clip

    # the actor: SampleMapper hands clip_x0 to generate
    spy = GenerateSpy()
    monkeypatch.setattr(sampling, "load_trained", lambda *a, **k: trained)
    monkeypatch.setattr(sampling, "generate", spy)
    mapper = dd.SampleMapper(checkpoint=str(trained.checkpoint), sampler="ddim", steps=3,
                             labels_mode="none", guidance=[], options={}, use_ema=True,
                             device="cpu", generate_batch_size=2, clip_x0=False)
    rows = mapper({"start": np.array([0]), "stop": np.array([2])})
    assert rows["id"] == ["seed00000000", "seed00000001"]
    assert spy.calls[-1][1]["clip_x0"] is False
