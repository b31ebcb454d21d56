"""The classifier trainer (training.classifier) on the shared Trainer: it learns digits from noisy
images, resumes exactly, trains feature heads, and rebuilds from its checkpoint alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from debiaslab.checkpoints import latest_checkpoint, load_checkpoint
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.errors import CheckpointError, ConfigError
from debiaslab.training.classifier import (
    ClassifierTask,
    classifier_experiment,
    load_classifier,
    train_classifier,
)
from debiaslab.training.classifier_data import (
    dataset_labels,
    feature_data,
    image_data,
    load_classifier_data,
    split_data,
    stratified_split,
)
from debiaslab.training.classifier_eval import evaluate_classifier, plot_classifier_evaluation
from debiaslab.training.loop import Trainer

DIGITS_SIZE = 8  # sklearn's native 8x8 digits: 4x cheaper than the 16x16 default
LEARN_STEPS = 200
# measured lowest-bucket (t < 100) validation accuracy after LEARN_STEPS: 0.905 (train.seed 0;
# seeds 1, 2: 0.872, 0.927); the highest bucket stays at chance (0.08-0.09)
MIN_LOW_T_ACCURACY = 0.7
MAX_HIGH_T_ACCURACY = 0.3
# the encoder classifier's defaults spelled out: a partial `classifier.model` override starts
# from ModelConfig's defaults (net unet), not from the classifier section's
CLF = ["classifier.model.net=encoder_classifier", "classifier.model.model_channels=16",
       "classifier.model.channel_mult=[1,2]", "classifier.model.attention_resolutions=[]",
       "classifier.model.head_channels=16", "classifier.model.class_conditional=false",
       "classifier.train.batch_size=64", "classifier.train.lr=2e-3",
       "classifier.train.warmup_steps=0", "classifier.train.ema_decay=0",
       "classifier.train.label_dropout=0", "classifier.train.device=cpu",
       "classifier.train.log_every=50", f"classifier.train.checkpoint_every={LEARN_STEPS}"]
TINY_CLF = ["classifier.model.model_channels=8", "classifier.model.head_channels=8",
            "classifier.train.batch_size=16", "classifier.train.checkpoint_every=3",
            "classifier.train.keep_checkpoints=5", "classifier.train.log_every=3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small CPU models ran 10x slower with 2 threads on a shared
    2-core machine (measured: 40 classifier steps 20.7 s vs 1.7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> ImageDataset:
    """All 1,797 digits (balanced), 1x8x8."""
    from debiaslab.data.sources import build_dataset

    out = tmp_path_factory.mktemp("data") / "digits8"
    build_dataset("digits", out, imbalance="none", source_options={"size": DIGITS_SIZE})
    return ImageDataset.load(out)


def clf_cfg(tmp_path: Path, *extra: str):
    """The classifier run's config (``<name>.classifier``) of a small experiment."""
    cfg = load_config(None, CLF + [f"output_dir={tmp_path}", "name=digits", *extra])
    return classifier_experiment(cfg)


# ------------------------------------------------------------------------------- learning


def test_noisy_image_classifier_learns_digits_and_reloads(tmp_path, digits):
    cfg = clf_cfg(tmp_path, f"classifier.train.steps={LEARN_STEPS}")
    assert cfg.name == "digits.classifier" and cfg.run_dir.name == "digits.classifier"
    data = image_data(digits, "class")
    result = train_classifier(cfg, data, progress=False)
    assert result.num_train + result.num_val == len(digits) and result.num_val == 179
    ev = result.evaluation
    acc = ev["accuracy"]
    print("accuracy per bucket:", [round(a, 3) for a in acc])
    assert ev["t_lo"][0] == 0 and ev["t_hi"][-1] == 999 and len(acc) == 10
    assert acc[0] > MIN_LOW_T_ACCURACY
    assert acc[-1] < MAX_HIGH_T_ACCURACY
    assert sum(acc[:3]) / 3 > sum(acc[-3:]) / 3 + 0.4  # informative at low t, chance near T
    assert ev["loss"][0] < ev["loss"][-1] < 1.1 * math.log(10)
    # deterministic: the same model scores the same rows identically again
    _, val_rows = split_data(cfg, data)
    again = evaluate_classifier(result.model, val_rows, schedule=build_schedule("linear", 1000),
                                buckets=10, seed=cfg.train.seed)
    assert again == ev
    # the checkpoint alone rebuilds it: same logits
    model, info = load_classifier(cfg.run_dir, "cpu")
    assert info["step"] == LEARN_STEPS and info["num_outputs"] == 10
    assert info["class_names"] == digits.class_names and info["input"] == "noisy_images"
    assert info["schedule"] == "linear" and info["num_timesteps"] == 1000
    assert info["shape"] == [1, DIGITS_SIZE, DIGITS_SIZE] and info["ema"] is False
    assert info["net"] == "encoder_classifier" and info["timestep_range"] == [0, 999]
    x = digits.to_float(digits.images[:8])
    t = torch.tensor([0, 10, 100, 250, 400, 600, 800, 999]).float()
    with torch.no_grad():
        assert torch.equal(model(x, t), result.model(x, t))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    fig = plot_classifier_evaluation(ev, title="digits")
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_exact_resume_and_checkpoint_contents(tmp_path, digits):
    data = image_data(digits, "attr:even")
    full = train_classifier(clf_cfg(tmp_path / "a", *TINY_CLF, "classifier.train.steps=6"),
                            data, progress=False)
    first = train_classifier(clf_cfg(tmp_path / "b", *TINY_CLF, "classifier.train.steps=3"),
                             data, progress=False)
    resumed = train_classifier(clf_cfg(tmp_path / "b", *TINY_CLF, "classifier.train.steps=6"),
                               data, progress=False)
    assert sorted(full.train.losses) == list(range(1, 7))
    assert sorted(resumed.train.losses) == [4, 5, 6]
    for step in range(1, 7):
        got = first.train.losses.get(step, resumed.train.losses.get(step))
        assert got == full.train.losses[step], step
    a, b = load_checkpoint(full.train.checkpoint), load_checkpoint(resumed.train.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["task"] == "classifier" and a["batch"] == {"global": 16, "world_size": 1}
    assert a["data"]["content_hash"] == digits.content_hash
    assert a["classifier"]["class_names"] == ["not even", "even"]
    # train.ema_decay 0: no average; the "ema" entry is the model's own weights
    for k in a["model"]:
        assert torch.equal(a["ema"]["shadow"][k], a["model"][k]), k
    # a resume that changes the rows (split) or the timestep range is refused, in one line
    for change in ("classifier.val_fraction=0.2", "classifier.timestep_range=[0,499]"):
        with pytest.raises(CheckpointError) as info:
            train_classifier(clf_cfg(tmp_path / "b", *TINY_CLF, "classifier.train.steps=9",
                                     change), data, progress=False)
        assert "\n" not in str(info.value) and "use a new name" in str(info.value)
    # the score model's checkpoints live elsewhere: an experiment of the same name trains apart
    assert latest_checkpoint(tmp_path / "b" / "runs" / "digits" / "checkpoints") is None


def test_timesteps_noise_and_labels_of_a_batch(tmp_path, digits):
    cfg = clf_cfg(tmp_path, *TINY_CLF, "classifier.timestep_range=[100,149]",
                  "classifier.train.batch_size=64")
    task = ClassifierTask(cfg, image_data(digits, "attr:bold"))
    trainer = Trainer(cfg, task, tmp_path / "run", progress=False)
    ts = torch.cat([trainer.make_batch(s)["t"] for s in range(20)])
    assert ts.min() == 100 and ts.max() == 149  # inclusive range, uniform over it
    batch = trainer.make_batch(3)
    assert set(batch) == {"x", "label", "t", "noise"} and batch["x"].shape == (64, 1, 8, 8)
    assert torch.equal(batch["noise"], trainer.make_batch(3)["noise"])  # per-step seeded
    with pytest.raises(ConfigError, match="classifier.timestep_range"):
        ClassifierTask(clf_cfg(tmp_path, "classifier.timestep_range=[10,1000]"),
                       image_data(digits))
    with pytest.raises(ConfigError, match="unet is not a classifier"):
        ClassifierTask(load_config(None, [f"output_dir={tmp_path}"]), image_data(digits))


def test_labels_split_and_side_table_rows(tmp_path, digits):
    from debiaslab.data.side_tables import write_side_table

    labels, names = dataset_labels(digits, "attr:even")
    assert names == ["not even", "even"]
    assert np.array_equal(labels, (digits.labels.numpy() % 2 == 0).astype(np.int64))
    with pytest.raises(ConfigError, match="attributes: bold, even"):
        dataset_labels(digits, "attr:smiling")
    with pytest.raises(ConfigError, match="allowed: class"):
        dataset_labels(digits, "colour")
    # stratified: every class keeps its share in both parts, the same split for the same seed
    train_idx, val_idx = stratified_split(digits.labels, 0.25, seed=3)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values,
                       torch.arange(len(digits)))
    counts = np.bincount(digits.labels[val_idx].numpy(), minlength=10)
    totals = np.bincount(digits.labels.numpy(), minlength=10)
    assert np.all(np.abs(counts - 0.25 * totals) <= 0.5)
    assert torch.equal(stratified_split(digits.labels, 0.25, seed=3)[1], val_idx)
    assert not torch.equal(stratified_split(digits.labels, 0.25, seed=4)[1], val_idx)
    # what a Ray worker loads from the config: a side-table label column and feature column
    ids = list(digits.ids)
    minority = (np.arange(len(ids)) % 3).astype(np.int64)
    minority[:5] = -1  # unlabelled rows are left out
    feats = np.random.default_rng(0).normal(size=(len(ids), 4, 2)).astype(np.float32)
    root = Path(digits.manifest.path)
    write_side_table(root, "mg", ids, {"minority_class": minority, "h": feats},
                     producer={"test": True})
    base = [f"output_dir={tmp_path}", f"data.dataset_dir={root}", "data.imbalance=none",
            "classifier.label=side:mg.minority_class"]
    rows = load_classifier_data(load_config(None, base))
    assert rows.kind == "noisy_images" and len(rows) == len(ids) - 5
    assert rows.class_names == ["0", "1", "2"] and torch.equal(rows.rows[:2], torch.tensor([5, 6]))
    rows = load_classifier_data(load_config(None, base + ["classifier.input=features",
                                                          "classifier.features=mg.h"]))
    assert rows.kind == "features" and rows.shape == (4, 2)
    assert torch.equal(rows.inputs[0], torch.from_numpy(feats[5]))


# ------------------------------------------------------------------------------- features


def blobs(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian blobs: class c centred at 3 e_c (unit noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[np.arange(n), labels] += 3.0
    return x, labels


HEAD = ["classifier.input=features", "classifier.model.net=mlp_head",
        "classifier.model.model_channels=32", "classifier.model.num_res_blocks=2",
        "classifier.train.batch_size=32", "classifier.train.steps=150",
        "classifier.train.checkpoint_every=150"]


def test_feature_head_trains_on_a_separable_table(tmp_path):
    x, y = blobs(600, 8, 3, seed=0)
    data = feature_data(x, y, ["a", "b", "c"])
    result = train_classifier(clf_cfg(tmp_path, *HEAD), data, progress=False)
    ev = result.evaluation
    print("feature head accuracy:", ev["accuracy_mean"])
    assert len(ev["accuracy"]) == 1 and ev["count"] == [result.num_val] == [60]
    assert ev["accuracy_mean"] > 0.9  # Bayes accuracy ~0.98 for these blobs
    model, info = load_classifier(tmp_path / "runs" / "digits.classifier", "cpu")
    assert info["input"] == "features" and info["time_input"] is False
    xs = torch.from_numpy(x[:5])
    with torch.no_grad():
        assert torch.equal(model(xs), result.model(xs))
    with pytest.raises(ConfigError, match="classifier.input=noisy_images"):
        ClassifierTask(clf_cfg(tmp_path), data)


def test_time_dependent_feature_head_uses_the_timesteps(tmp_path):
    """The label flips with t (y = [x_0 > 0] xor [t >= 500]): only a time-aware head can learn
    it; evaluation buckets rows by their own timesteps."""
    rng = np.random.default_rng(1)
    n = 2000
    x = rng.normal(size=(n, 2)).astype(np.float32)
    t = rng.integers(0, 1000, size=n)
    y = ((x[:, 0] > 0) ^ (t >= 500)).astype(np.int64)
    data = feature_data(x, y, ["no", "yes"], timesteps=t)
    with pytest.raises(ConfigError, match="time_conditional: true"):
        train_classifier(clf_cfg(tmp_path / "plain", *HEAD), data, progress=False)
    cfg = clf_cfg(tmp_path, *HEAD, "classifier.model.options={time_conditional: true}",
                  "classifier.train.steps=300", "classifier.val_buckets=2",
                  "classifier.train.lr=3e-3")
    ev = train_classifier(cfg, data, progress=False).evaluation
    print("time-aware head accuracy per bucket:", ev["accuracy"])
    assert ev["t_lo"] == [0, 500] and sum(ev["count"]) == 200
    assert min(ev["accuracy"]) > 0.85  # measured 0.949, 0.941
