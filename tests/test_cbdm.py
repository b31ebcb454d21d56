"""CBDM (Qin et al. 2023): the regularizer against hand-computed values and gradients, y'
sampling, label dropout modes, fine-tuning and CFG at omega=0 (CBDM's DDP on Ray Train is in
test_distributed_train, which holds a Ray cluster)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY as TINY_CORE
from torch import nn

from debiaslab.checkpoints import load_checkpoint
from debiaslab.config import load_config
from debiaslab.diffusion.guidance import ClassifierFreeGuidance
from debiaslab.diffusion.losses import DenoisingLoss, build_loss
from debiaslab.errors import CheckpointError, ConfigError
from debiaslab.methods.cbdm import CBDMLoss, cbdm_regularizer
from debiaslab.sampling import load_trained
from debiaslab.training.loop import Trainer

T = 1000
TINY = TINY_CORE + ["train.warmup_steps=2", "train.log_every=5", "train.checkpoint_every=5",
                    "diffusion.loss=cbdm", "train.label_dropout=0.1"]


class Affine(nn.Module):
    """eps(x, t, y) = a x + b[y]: small enough to differentiate by hand (row C is the null)."""

    def __init__(self, a: float, b: list[float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, t, y=None):
        return self.a * x + self.b[y].view(-1, *([1] * (x.ndim - 1)))


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(None, TINY + [f"output_dir={tmp_path}", "name=tiny", *extra])


def test_regularizer_value_and_gradients_match_hand_computation():
    tau, gamma, t = 1.5, 0.25, torch.tensor([400])
    net = Affine(0.7, [0.1, -0.3, 0.5, 0.0])
    x = torch.tensor([[[[2.0]]]])
    y, y_prime = torch.tensor([0]), torch.tensor([2])
    e, e_prime = net(x, t, y), net(x, t, y_prime)
    reg = cbdm_regularizer(e, e_prime, t, T, tau, gamma)
    reg.sum().backward()
    c = tau * 400 / T
    d = (0.7 * 2 + 0.1) - (0.7 * 2 + 0.5)  # e - e' = b_y - b_y'
    assert reg.item() == pytest.approx(c * (1 + gamma) * d**2, rel=1e-6)
    # the first term moves only e (b_y), the commitment term only e' (b_y'):
    grad_b = net.b.grad
    assert grad_b[0].item() == pytest.approx(2 * c * d, rel=1e-6)
    assert grad_b[2].item() == pytest.approx(-2 * c * gamma * d, rel=1e-6)
    assert grad_b[1].item() == 0.0 and grad_b[3].item() == 0.0
    # both terms reach the shared weight a, with opposite signs: 2c(1 - gamma) d x
    assert net.a.grad.item() == pytest.approx(2 * c * (1 - gamma) * d * 2.0, rel=1e-6)


def test_regularizer_without_stop_gradients_would_differ():
    """Guards the sg placement: no-sg gradients on b_y are (1 + gamma) times ours."""
    net = Affine(0.7, [0.1, -0.3, 0.5, 0.0])
    x, t = torch.ones(1, 1, 1, 1), torch.tensor([999])
    e, e_prime = net(x, t, torch.tensor([0])), net(x, t, torch.tensor([2]))
    ((e - e_prime) ** 2 * (1 + 0.25)).sum().backward()
    no_sg = net.b.grad[0].item()
    net.zero_grad()
    e, e_prime = net(x, t, torch.tensor([0])), net(x, t, torch.tensor([2]))
    cbdm_regularizer(e, e_prime, t, T, 1.0, 0.25).sum().backward()
    assert no_sg == pytest.approx(net.b.grad[0].item() * 1.25 * T / 999, rel=1e-6)


def test_cbdm_loss_is_ddpm_plus_masked_regularizer(tmp_path):
    loss = build_loss(tiny_cfg(tmp_path, "cbdm.tau=2.0", "cbdm.gamma=0.5"))
    assert isinstance(loss, CBDMLoss)
    loss.setup(torch.tensor([5, 3, 1]), null_label=3)
    net = Affine(0.3, [0.2, -0.4, 0.6, 0.05])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    level = torch.tensor([10, 500, 999, 250])
    y, y_prime = torch.tensor([0, 1, 3, 2]), torch.tensor([2, 0, 1, 1])  # sample 2: dropped
    got = loss(net, x0, level, noise, y=y, y_prime=y_prime)
    assert got.shape == (4,)
    a, s = loss.schedule.alpha_sigma(level, x0)
    x_t = a * x0 + s * noise
    e, e_prime = net(x_t, level, y), net(x_t, level, y_prime)
    ddpm = ((e - noise) ** 2).flatten(1).mean(1)
    reg = 2.0 * level / T * (1 + 0.5) * ((e - e_prime) ** 2).flatten(1).mean(1)
    expected = ddpm + reg * torch.tensor([1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    # an all-null batch (whole-batch dropout) is the plain DDPM loss
    plain = DenoisingLoss.from_config(tiny_cfg(tmp_path))
    null = torch.full((4,), 3)
    torch.testing.assert_close(loss(net, x0, level, noise, y=null, y_prime=y_prime),
                               plain(net, x0, level, noise, y=null))


@pytest.mark.parametrize("mode", ["train", "uniform"])
def test_y_prime_follows_the_configured_distribution(tmp_path, mode):
    loss = build_loss(tiny_cfg(tmp_path, f"cbdm.target_distribution={mode}"))
    counts = torch.tensor([600, 300, 100])
    loss.setup(counts, null_label=3)
    n = 30_000
    y_prime = loss.draw_inputs(n, torch.Generator().manual_seed(1))["y_prime"]
    pi = counts / counts.sum() if mode == "train" else torch.full((3,), 1 / 3)
    freq = torch.bincount(y_prime, minlength=3).double() / n
    sigma = (pi * (1 - pi) / n).sqrt()
    assert ((freq - pi).abs() < 4 * sigma).all(), (freq, pi)
    again = loss.draw_inputs(n, torch.Generator().manual_seed(1))["y_prime"]
    assert torch.equal(y_prime, again)


def test_bad_cbdm_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="cbdm.target_distribution"):
        tiny_cfg(tmp_path, "cbdm.target_distribution=balanced")
    with pytest.raises(ConfigError, match="cbdm.tau"):
        tiny_cfg(tmp_path, "cbdm.tau=-1")
    with pytest.raises(ConfigError, match="class_conditional"):
        tiny_cfg(tmp_path, "model.class_conditional=false")
    with pytest.raises(ConfigError, match="eps"):
        build_loss(tiny_cfg(tmp_path, "diffusion.target=v"))


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_label_dropout_modes(tmp_path, digits_lt, mode):
    trainer = Trainer(tiny_cfg(tmp_path, f"train.label_dropout_mode={mode}",
                               "train.label_dropout=0.3", "train.batch_size=64"),
                      digits_lt, tmp_path, progress=False)
    null = trainer.num_classes
    dropped = torch.stack([trainer.make_batch(s)["y"] == null for s in range(200)])
    per_step = dropped.float().mean(1)
    if mode == "batch":
        assert set(per_step.tolist()) <= {0.0, 1.0}  # all or nothing per step
    else:
        assert 0.0 < per_step.min() and per_step.max() < 1.0
    rate = dropped.float().mean().item()
    n = 200 if mode == "batch" else dropped.numel()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), rate
    assert "y_prime" in trainer.make_batch(0)


def test_cbdm_trains_and_finetunes_from_a_checkpoint(tmp_path, digits_lt):
    base = Trainer(tiny_cfg(tmp_path / "base", "diffusion.loss=denoising", "train.steps=5"),
                   digits_lt, tmp_path / "base", progress=False).fit()
    src = load_checkpoint(base.checkpoint)
    cfg = tiny_cfg(tmp_path / "ft", "train.steps=5", f"train.init_from={tmp_path / 'base'}",
                   "cbdm.target_distribution=uniform")
    ft = Trainer(cfg, digits_lt, tmp_path / "ft", progress=False)
    ft.initialize_from(cfg.init_checkpoint)
    for k, v in src["ema"]["shadow"].items():  # starts from the EMA weights
        assert torch.equal(ft.model.state_dict()[k], v), k
    assert ft.step == 0
    result = Trainer(cfg, digits_lt, tmp_path / "ft", progress=False).fit()
    assert result.step == 5 and sorted(result.losses) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in result.losses.values())
    tuned = load_checkpoint(result.checkpoint)
    assert any(not torch.equal(tuned["model"][k], src["ema"]["shadow"][k]) for k in src["model"])
    # a checkpoint of another architecture is a one-line error naming it
    bad = tiny_cfg(tmp_path / "bad", "model.model_channels=32", "model.head_channels=32",
                   f"train.init_from={base.checkpoint}")
    with pytest.raises(CheckpointError, match=str(base.checkpoint.name)):
        Trainer(bad, digits_lt, tmp_path / "bad", progress=False).fit()


def test_cfg_at_omega_zero_is_the_conditional_prediction(tmp_path, digits_lt):
    cfg = tiny_cfg(tmp_path, "train.steps=5")
    Trainer(cfg, digits_lt, tmp_path, progress=False).fit()
    trained = load_trained(tmp_path, device="cpu")
    den = trained.denoiser
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *trained.shape, generator=g)
    t = torch.full((6,), 500)
    y = torch.arange(6) % trained.num_classes
    null = torch.full((6,), trained.null_label)
    cond, uncond = den(x, t, y=y), den(x, t, y=null)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(ClassifierFreeGuidance(den, 0.0, trained.null_label)(x, t, y=y),
                               cond)
    torch.testing.assert_close(ClassifierFreeGuidance(den, 1.6, trained.null_label)(x, t, y=y),
                               2.6 * cond - 1.6 * uncond, rtol=1e-5, atol=1e-5)


def test_ada_augmentation_vector_reaches_the_network(tmp_path, digits_lt):
    cfg = tiny_cfg(tmp_path, "data.augment=ada", "train.steps=2")
    trainer = Trainer(cfg, digits_lt, tmp_path, progress=False)
    batch = trainer.make_batch(0)
    assert batch["aug"].shape == (16, 9) and batch["x0"].shape == (16, 1, 16, 16)
    assert (batch["aug"][:, 0] == 1).any() and (batch["aug"][:, 0] == 0).any()  # x-flips
    assert trainer.net.cond.aug_emb is not None
    trainer.fit()
    assert trainer.net.cond.aug_emb.weight.grad is not None
    trained = load_trained(tmp_path, device="cpu")  # sampling: aug vector zero (None)
    x = torch.randn(2, *trained.shape)
    assert torch.isfinite(
        trained.denoiser(x, torch.tensor([10, 900]), y=torch.tensor([0, 1]))).all()
