"""Training loop: checkpoint round trip, exact resume, NaN stop keeping the last good checkpoint."""

import math
from pathlib import Path

import pytest
import torch

from debiaslab.config import load_config
from debiaslab.errors import CheckpointError, TrainingDiverged
from debiaslab.training.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)
from debiaslab.training.loop import EMA, Trainer, warmup_lambda

TINY = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
        "model.head_channels=16", "model.dropout=0.1", "train.batch_size=16",
        "train.warmup_steps=5", "train.log_every=5", "train.checkpoint_every=10",
        "train.keep_checkpoints=5", "train.device=cpu"]


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

    with pytest.raises(Exception):
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
