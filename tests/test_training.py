"""Training loop: checkpoint round trip, exact resume, NaN stop keeping the last good checkpoint,
the global batch split over ranks, and losses holding frozen modules."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY as TINY_CORE
from torch import nn

from debiaslab.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from debiaslab.config import load_config
from debiaslab.diffusion.losses import DenoisingLoss, mean_per_sample
from debiaslab.errors import CheckpointError, ConfigError, TrainingDiverged
from debiaslab.training.loop import EMA, ScoreTask, Trainer, warmup_lambda

TINY = TINY_CORE + ["model.dropout=0.1", "train.warmup_steps=5", "train.log_every=5",
                    "train.checkpoint_every=10", "train.keep_checkpoints=5"]


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(None, TINY + [f"output_dir={tmp_path}", "name=tiny", *extra])


def test_resume_reproduces_uninterrupted_losses(tmp_path, digits_lt):
    full = Trainer(tiny_cfg(tmp_path / "a", "train.steps=20"), digits_lt, tmp_path / "a",
                   progress=False).fit()
    assert sorted(full.losses) == list(range(1, 21))
    # interrupted at step 10 (the run stops there), then a fresh process-like Trainer resumes
    first = Trainer(tiny_cfg(tmp_path / "b", "train.steps=10"), digits_lt, tmp_path / "b",
                    progress=False).fit()
    resumed_trainer = Trainer(tiny_cfg(tmp_path / "b", "train.steps=20"), digits_lt,
                              tmp_path / "b", progress=False)
    resumed = resumed_trainer.fit()
    assert sorted(resumed.losses) == list(range(11, 21))
    for step in range(1, 11):
        assert first.losses[step] == full.losses[step]
    for step in range(11, 21):
        assert resumed.losses[step] == full.losses[step], step
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt_00000020.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt_00000020.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_checkpoint_round_trip_contents(tmp_path, digits_lt):
    cfg = tiny_cfg(tmp_path, "train.steps=10")
    Trainer(cfg, digits_lt, tmp_path, progress=False).fit()
    path = latest_checkpoint(tmp_path / "checkpoints")
    state = load_checkpoint(path)  # weights_only=True inside
    assert state["step"] == 10
    assert state["config"]["model"]["model_channels"] == 16
    assert state["data"]["content_hash"] == digits_lt.content_hash
    assert state["data"]["shape"] == [1, 16, 16] and state["data"]["num_classes"] == 10
    assert {"model", "ema", "optimizer", "scheduler", "rng"} <= set(state)
    assert state["optimizer"]["state"], "AdamW moments are saved"
    # resuming with a finished run does no more steps
    again = Trainer(cfg, digits_lt, tmp_path, progress=False).fit()
    assert again.losses == {} and again.step == 10


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    target = tmp_path / "ck" / "ckpt_00000001.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"model": {}, "step": 2, "bad": Boom()}, target)
    assert load_checkpoint(target)["step"] == 1  # the old file is intact
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["ckpt_00000001.pt"]  # no temp left


def test_corrupt_or_missing_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "ckpt_00000005.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    assert "ckpt_00000005.pt" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nope.pt")


def test_resume_with_other_model_config_is_refused(tmp_path, digits_lt):
    Trainer(tiny_cfg(tmp_path, "train.steps=10"), digits_lt, tmp_path, progress=False).fit()
    other = tiny_cfg(tmp_path, "train.steps=20", "model.model_channels=32",
                     "model.head_channels=32")
    with pytest.raises(CheckpointError, match="model.model_channels"):
        Trainer(other, digits_lt, tmp_path, progress=False).fit()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits_lt):
    cfg = tiny_cfg(tmp_path, "train.steps=30")
    trainer = Trainer(cfg, digits_lt, tmp_path, progress=False)
    trainer.cfg.train.steps = 10
    trainer.fit()
    good = latest_checkpoint(tmp_path / "checkpoints")
    good_bytes = good.read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    trainer.cfg.train.steps = 30
    with pytest.raises(TrainingDiverged) as exc:
        trainer._steps_done = trainer.step
        for s in range(trainer.step, 30):
            trainer.train_step(trainer.make_batch(s))
    msg = str(exc.value)
    assert "step 11" in msg and good.name in msg and "\n" not in msg
    assert [p for _, p in list_checkpoints(tmp_path / "checkpoints")] == [good]
    assert good.read_bytes() == good_bytes


def test_warmup_and_ema():
    lam = warmup_lambda(4)
    assert [lam(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    before = ema.shadow.weight.clone()
    ema.update(net)  # decay = min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow.weight, d * before + (1 - d) * torch.ones_like(before))


def test_losses_decrease_on_digits(tmp_path, digits_lt):
    cfg = tiny_cfg(tmp_path, "train.steps=60", "train.lr=2e-3", "model.dropout=0.0")
    res = Trainer(cfg, digits_lt, tmp_path, progress=False).fit()
    first = sum(res.losses[s] for s in range(1, 6)) / 5
    last = sum(res.losses[s] for s in range(56, 61)) / 5
    assert math.isfinite(last) and last < 0.6 * first


def test_mixed_precision_path_runs(tmp_path, digits_lt):
    """bf16 autocast (the GPU default) also runs on CPU; losses stay finite and close to fp32."""
    res16 = Trainer(tiny_cfg(tmp_path / "bf16", "train.steps=3", "train.precision=bf16"),
                    digits_lt, tmp_path / "bf16", progress=False).fit()
    res32 = Trainer(tiny_cfg(tmp_path / "fp32", "train.steps=3", "train.precision=fp32"),
                    digits_lt, tmp_path / "fp32", progress=False).fit()
    assert all(math.isfinite(v) for v in res16.losses.values())
    assert res16.losses[1] == pytest.approx(res32.losses[1], rel=0.05)


def test_ema_decay_zero_tracks_the_model_without_a_copy():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.0)
    assert ema.shadow is net and not ema.enabled
    ema.update(net)
    assert ema.num_updates == 1 and ema.state_dict()["shadow"].keys() == net.state_dict().keys()


# ---------------------------------------------------------------- global batch


def test_global_batch_is_split_over_ranks(tmp_path, digits_lt):
    """train.batch_size is the global batch: rank r of W gets the r-th contiguous 1/W of the
    rows, timesteps, noise and label dropout that one process draws at the same batch size."""
    cfg = tiny_cfg(tmp_path, "train.label_dropout=0.5", "diffusion.loss=cbdm")
    one = Trainer(cfg, digits_lt, tmp_path / "one", progress=False)
    ranks = [Trainer(cfg, digits_lt, tmp_path / f"r{r}", rank=r, world_size=2, progress=False)
             for r in (0, 1)]
    for step in (0, 7, 40):  # 40 * 16 rows crosses an epoch boundary of digits-LT
        full = one.make_batch(step)
        parts = [t.make_batch(step) for t in ranks]
        assert parts[0]["x0"].shape[0] == cfg.train.batch_size // 2
        assert set(full) == {"x0", "level", "noise", "y", "y_prime"}
        for key in full:
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key]), (step, key)
    assert one.state_dict()["batch"] == {"global": 16, "world_size": 1}
    assert ranks[1].state_dict()["batch"] == {"global": 16, "world_size": 2}
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, digits_lt, tmp_path / "x", rank=0, world_size=3, progress=False)
    assert str(info.value) == ("train.batch_size=16 is not divisible by "
                               "distributed.num_workers=3")


def test_checkpoint_of_the_per_worker_batch_era_is_refused(tmp_path, digits_lt):
    """Multi-worker Ray checkpoints without a "batch" entry trained at num_workers x batch_size;
    resuming them with the global-batch meaning would silently change the run."""
    from debiaslab.training.resume import check_resume

    Trainer(tiny_cfg(tmp_path, "train.steps=2", "train.checkpoint_every=2"), digits_lt,
            tmp_path, progress=False).fit()
    path = latest_checkpoint(tmp_path / "checkpoints")
    state = load_checkpoint(path)
    ray2 = tiny_cfg(tmp_path, "train.steps=4", "distributed.backend=ray",
                    "distributed.num_workers=2")
    state["config"]["distributed"].update(backend="ray", num_workers=2)
    assert check_resume(ray2, state, path) == {}  # written now: resumes
    old = {k: v for k, v in state.items() if k != "batch"}
    with pytest.raises(CheckpointError) as info:
        check_resume(ray2, old, path)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg and "2 workers x 16" in msg
    assert "now means the global batch" in msg
    old["config"]["distributed"].update(backend="local", num_workers=1)  # one process: same
    assert check_resume(tiny_cfg(tmp_path, "train.steps=4"), old, path) == {}


# ---------------------------------------------------------------- frozen modules in a loss


class FrozenProbeLoss(DenoisingLoss):
    """The eps loss plus the square of a frozen Linear probe of the prediction (a stand-in for
    TIW-DSM's pretrained discriminator): gradients flow through the probe, never into it."""

    def __init__(self, cfg) -> None:
        base = DenoisingLoss.from_config(cfg)
        super().__init__(base.schedule, base.target.name, base.weighting, base.apply)
        self.probe = nn.Linear(256, 1)
        with torch.no_grad():  # fixed weights, as if loaded from the discriminator's checkpoint
            g = torch.Generator().manual_seed(123)
            self.probe.weight.copy_(torch.randn(1, 256, generator=g))
            self.probe.bias.fill_(0.5)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"probe": self.probe}

    def __call__(self, model, x0, level, noise, **cond):
        x_t, _, _ = self.noisy(x0, level, noise)
        out = model(x_t, level.to(x0.device, torch.float32), **cond).float()
        return mean_per_sample((out - noise) ** 2) + self.probe(out.flatten(1)).squeeze(1) ** 2


def test_frozen_modules_of_a_loss_stay_out_of_training_and_checkpoints(tmp_path, digits_lt):
    def trainer(steps: int, run: str) -> Trainer:
        cfg = tiny_cfg(tmp_path / run, f"train.steps={steps}", "train.checkpoint_every=3")
        return Trainer(cfg, ScoreTask(cfg, digits_lt, loss=FrozenProbeLoss(cfg)),
                       tmp_path / run, progress=False)

    t = trainer(6, "full")
    probe = t.loss_fn.probe
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    assert t.frozen == {"probe": probe} and not probe.training
    assert not any(p.requires_grad for p in probe.parameters())
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in probe.parameters()}
    full = t.fit()
    for k, v in probe.state_dict().items():
        assert torch.equal(v, before[k]), k  # unchanged
    assert probe.weight.grad is None and not probe.training
    state = load_checkpoint(full.checkpoint)
    assert not any("probe" in k for k in state["model"]) and state["model"].keys() == \
        state["ema"]["shadow"].keys() == t.net.state_dict().keys()
    # it contributes to the loss: the same run without the probe term differs
    plain = Trainer(tiny_cfg(tmp_path / "plain", "train.steps=1"), digits_lt,
                    tmp_path / "plain", progress=False).fit()
    assert plain.losses[1] < full.losses[1]
    # exact resume with a freshly built (same) frozen module
    first = trainer(3, "split").fit()
    rest = trainer(6, "split").fit()
    assert {**first.losses, **rest.losses} == full.losses


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor's stored bytes (the zip's data record)."""
    state = load_checkpoint(path)
    biggest = max(state["model"].values(), key=lambda t: t.numel())
    raw = biggest.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_checkpoint_bytes_are_caught_and_resume_falls_back(tmp_path, digits_lt, capsys):
    from debiaslab.checkpoints import CheckpointCorrupt, list_checkpoints

    full = Trainer(tiny_cfg(tmp_path / "a", "train.steps=6"), digits_lt, tmp_path / "a",
                   progress=False).fit()
    cfg = tiny_cfg(tmp_path / "b", "train.steps=4", "train.checkpoint_every=2",
                   "train.keep_checkpoints=2")
    Trainer(cfg, digits_lt, tmp_path / "b", progress=False).fit()
    (_, older), (_, newest) = list_checkpoints(tmp_path / "b" / "checkpoints")
    _flip_a_weight_byte(newest)
    with pytest.raises(CheckpointCorrupt) as exc:
        load_checkpoint(newest)
    message = str(exc.value)
    assert str(newest) in message and "changed on disk" in message and "\n" not in message
    capsys.readouterr()
    resumed = Trainer(tiny_cfg(tmp_path / "b", "train.steps=6", "train.checkpoint_every=2",
                               "train.keep_checkpoints=2"), digits_lt, tmp_path / "b",
                      progress=False).fit()
    out = capsys.readouterr().out
    assert newest.name in out and "falling back" in out
    assert sorted(resumed.losses) == [3, 4, 5, 6]  # from the intact step-2 checkpoint
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
