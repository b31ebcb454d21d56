"""Minority Guidance (Um et al. 2024): the minority score against a closed form on Gaussian data,
quantile classes against numpy, per-image noise, the config section, one-line errors, and the
recipe end to end on digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY, one_line
from torch import nn

from debiaslab.config import load_config, to_dict
from debiaslab.diffusion.denoiser import VPDenoiser
from debiaslab.diffusion.schedules import build_schedule, linspace_spacing
from debiaslab.errors import ConfigError, DataError
from debiaslab.methods.minority_guidance import (
    L2Distance,
    check_config,
    image_noise,
    minority_classes,
    minority_reference_rows,
    minority_score,
    quantile_classes,
    respaced_timestep,
)

T = 1000


# ------------------------------------------------------------------------------ timesteps


def test_perturb_t_indexes_the_respaced_chain():
    assert respaced_timestep(60, 100, T) == 605  # docs/algorithms.md §1.2
    assert respaced_timestep(0, 100, T) == 0 and respaced_timestep(99, 100, T) == 999
    # guided-diffusion's accumulated stride agrees with numpy's linspace grid for these N
    for n in (10, 50, 100, 250):
        assert [respaced_timestep(i, n, T) for i in range(n)] == linspace_spacing(T, n)


# ------------------------------------------------------------------- the score, analytically


class GaussianEps(nn.Module):
    """The exact eps of x0 ~ N(mu, s^2 I) under the VP process: E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def __init__(self, schedule, mu: float, s: float) -> None:
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x_t, t, **_):
        abar = self.schedule.abar(t.long()).to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


def gaussian_case(t: int, mu: float = 0.1, s: float = 0.2):
    schedule = build_schedule("linear", T)
    denoiser = VPDenoiser(GaussianEps(schedule, mu, s), schedule)
    abar = float(schedule.abar(torch.tensor([t]))[0])
    k = math.sqrt(abar) * s**2 / (abar * s**2 + 1 - abar)  # x0_hat = mu + k (x_t - sqrt(a) mu)
    return denoiser, abar, k


@pytest.mark.parametrize("t", [50, 605])
def test_l2_score_equals_the_closed_form_on_gaussian_data(t):
    """x0_hat - x0 = (k sqrt(abar) - 1)(x0 - mu) + k sqrt(1 - abar) eps, so for the same draws
    the score is their mean squared norm per pixel (exactly, up to float32 rounding), and its
    expectation is (k sqrt(abar) - 1)^2 |x0 - mu|^2 / D + k^2 (1 - abar)."""
    torch.manual_seed(0)
    mu, s = 0.1, 0.2
    denoiser, abar, k = gaussian_case(t, mu, s)
    x0 = (mu + s * torch.randn(3, 1, 4, 4, dtype=torch.float64)).float()
    n = 4000
    noise = torch.randn(3, n, 1, 4, 4)
    got = minority_score(denoiser, x0, noise, t, L2Distance(), clip_x0=False).double()
    x0d, nd = x0.double().unsqueeze(1), noise.double()
    err = (k * math.sqrt(abar) - 1) * (x0d - mu) + k * math.sqrt(1 - abar) * nd
    per_draw = err.pow(2).flatten(2).mean(2)
    torch.testing.assert_close(got, per_draw.mean(1), rtol=1e-4, atol=0)  # float32 forward
    expected = ((k * math.sqrt(abar) - 1) ** 2 * (x0.double() - mu).pow(2).flatten(1).mean(1)
                + k**2 * (1 - abar))
    stderr = per_draw.std(1) / math.sqrt(n)
    assert ((got - expected).abs() <= 5 * stderr + 1e-7).all(), (got, expected, stderr)
    # rarer (farther from the mean) images score higher
    far = minority_score(denoiser, torch.full((1, 1, 4, 4), mu + 0.5), noise[:1], t,
                         L2Distance(), clip_x0=False)
    near = minority_score(denoiser, torch.full((1, 1, 4, 4), mu), noise[:1], t,
                          L2Distance(), clip_x0=False)
    assert far > near


class ZeroEps(nn.Module):
    def forward(self, x_t, t, **_):
        return torch.zeros_like(x_t)


def test_clipping_applies_to_the_tweedie_estimate():
    """eps_theta = 0: x0_hat = x_t / sqrt(abar) = x0 + sqrt((1 - abar) / abar) eps, which the
    noise pushes above 1; clipped, x0_hat = 1 and d = (1 - x0)^2."""
    schedule = build_schedule("linear", T)
    denoiser = VPDenoiser(ZeroEps(), schedule)
    abar = float(schedule.abar(torch.tensor([605]))[0])
    x0 = torch.full((1, 1, 2, 2), 0.5)
    noise = torch.full((1, 1, 1, 2, 2), 3.0)
    clipped = minority_score(denoiser, x0, noise, 605, L2Distance(), clip_x0=True)
    raw = minority_score(denoiser, x0, noise, 605, L2Distance(), clip_x0=False)
    torch.testing.assert_close(clipped, torch.tensor([0.25]))
    torch.testing.assert_close(raw, torch.tensor([9.0 * (1 - abar) / abar]))


def test_image_noise_depends_only_on_seed_and_id():
    a = image_noise(0, "img-7", 3, (1, 4, 4))
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a, image_noise(0, "img-7", 3, (1, 4, 4)))
    assert not torch.equal(a, image_noise(1, "img-7", 3, (1, 4, 4)))
    assert not torch.equal(a, image_noise(0, "img-8", 3, (1, 4, 4)))


# ---------------------------------------------------------------------------- the classes


def reference_classes(scores: np.ndarray, L: int) -> np.ndarray:
    """The smallest j with s <= q_j, q_j = np.quantile(s, (j + 1) / L), by a plain loop."""
    q = [np.quantile(scores, (j + 1) / L) for j in range(L)]
    return np.array([next(j for j in range(L) if s <= q[j]) for s in scores])


@pytest.mark.parametrize("scores", [
    np.random.default_rng(0).gamma(2.0, size=501),
    np.array([0.3, 0.1, 0.1, 0.1, 0.7, 0.7, 0.2, 0.9, 0.1, 0.7]),  # ties
    np.full(17, 2.5),  # constant: every image is class 0
    np.arange(8.0),
])
@pytest.mark.parametrize("L", [2, 4, 10])
def test_quantile_classes_equal_numpy(scores, L):
    got = quantile_classes(scores, L)
    np.testing.assert_array_equal(got, reference_classes(scores, L))
    q = torch.quantile(torch.as_tensor(scores),  # the official code uses torch.quantile
                       torch.arange(1, L + 1, dtype=torch.float64) / L)
    np.testing.assert_allclose(q.numpy(), np.quantile(scores, np.arange(1, L + 1) / L))
    assert got.min() >= 0 and got.max() <= L - 1


def test_classes_are_equal_frequency_and_per_group():
    s = np.random.default_rng(1).normal(size=1000)
    counts = np.bincount(quantile_classes(s, 10), minlength=10)
    assert counts.tolist() == [100] * 10
    groups = np.repeat([0, 1], 500)
    s2 = np.where(groups == 1, s + 100, s)  # group 1 scores all higher
    per_group = minority_classes(s2, 4, groups)
    for g in (0, 1):
        assert np.bincount(per_group[groups == g], minlength=4).tolist() == [125] * 4


def test_minority_reference_is_the_top_fraction():
    s = np.array([0.5, 0.9, 0.1, 0.9, 0.3])
    assert minority_reference_rows(s, 0.4).tolist() == [1, 3]
    assert minority_reference_rows(s, 0.01).tolist() == [1]  # at least one image, ties by row


def test_bad_scores_are_one_line_errors():
    with pytest.raises(DataError) as exc:
        quantile_classes(np.array([1.0, np.nan]), 4)
    assert "not finite" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        quantile_classes(np.array([1.0, 2.0]), 1)
    assert "L must be >= 2" in one_line(exc)


# --------------------------------------------------------------------------------- config


MG = ["recipe=minority_guidance", "minority.distance=l2", "minority.num_classes=4",
      "sample.guidance=[{type: classifier, scale: 2.0, target: 3}]"]


def test_minority_section_is_typed_strict_and_saved():
    cfg = load_config(None, MG + ["minority.n_iter=2"])
    assert cfg.minority.n_iter == 2 and cfg.minority.num_classes == 4
    saved = to_dict(cfg)
    assert saved["minority"]["n_iter"] == 2 and "sections" not in saved
    assert load_config(None, [f"minority.{k}={v}" for k, v in saved["minority"].items()
                              if not isinstance(v, dict)]).minority == cfg.minority
    check_config(cfg)


@pytest.mark.parametrize("override, needle", [
    (["minority.num_classes=1"], "minority.num_classes: L must be >= 2"),
    (["minority.n_itr=3"], "unknown config key 'minority.n_itr'"),
    (["minority.perturb_t=100"], "minority.perturb_t: must be in [0, 99]"),
    (["minority.distance=lpipz"], "minority.distance: unknown distance 'lpipz'"),
    (["minority.distance_options={net: alex}"], "unknown option(s) net"),
    (["minority.reference_top=0"], "minority.reference_top: must be in (0, 1]"),
])
def test_bad_minority_config_is_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, MG + override)
    assert needle in one_line(exc)


@pytest.mark.parametrize("override, needle", [
    (["sample.guidance=[{type: classifier, scale: 2.0, target: 4}]"],
     "sample.guidance[0].target: 4 is not a minority class; use 0..3"),
    (["sample.guidance=[]"], "sample.guidance needs a classifier entry"),
    (["minority.distance=lpips"], "lpips needs the local torchvision VGG16 weights"),
    (["minority.class_conditional=true", "classifier.model.class_conditional=false"],
     "set classifier.model.class_conditional: true"),
])
def test_recipe_rules_are_one_line(override, needle):
    cfg = load_config(None, MG + override)
    with pytest.raises(ConfigError) as exc:
        check_config(cfg)
    assert needle in one_line(exc)


def test_lpips_weights_file_errors_name_the_path(tmp_path):
    from debiaslab.errors import CheckpointError
    from debiaslab.methods.minority_guidance import load_lpips_vgg

    missing = tmp_path / "vgg16.pth"
    with pytest.raises(CheckpointError) as exc:
        load_lpips_vgg(missing)
    assert str(missing) in one_line(exc) and "never downloads" in one_line(exc)
    torch.save({"features.0.weight": torch.zeros(2)}, missing)
    with pytest.raises(CheckpointError) as exc:
        load_lpips_vgg(missing)
    assert "not torchvision VGG16 weights" in one_line(exc)


def test_lpips_with_local_vgg_weights(tmp_path):
    """A torchvision VGG16 state dict (random weights here: the real file cannot be fetched)
    loads into lpips' slices; LPIPS(x, x) = 0 and LPIPS(x, y) > 0, on 1-channel images too."""
    import torchvision

    from debiaslab.methods.minority_guidance import LPIPSDistance

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    vgg = torchvision.models.vgg
    features = vgg.make_layers(vgg.cfgs["D"])  # vgg16().features, without the 120M-param head
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    dist = LPIPSDistance(vgg_weights=str(path))
    vgg = torch.load(path, weights_only=True)
    torch.testing.assert_close(dist.model.net.slice3.state_dict()["12.weight"],
                               vgg["features.12.weight"])
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    d = dist(x, x.flip(-1))
    assert torch.equal(dist(x, x), torch.zeros(2)) and (d > 0).all()


def test_tiny_defaults_are_valid_for_the_recipe():
    cfg = load_config(None, TINY + MG)
    check_config(cfg)


# ------------------------------------------------------------------------- the recipe, digits

RUN = TINY + MG + ["train.steps=6", "train.warmup_steps=2", "train.log_every=3",
                   "train.checkpoint_every=6", "minority.n_iter=2", "minority.val_ratio=0.1",
                   "minority.images_per_forward=32",  # faster; batching-independence: Ray test
                   "classifier.train.steps=4", "classifier.train.batch_size=16",
                   "classifier.train.log_every=2", "classifier.train.checkpoint_every=4",
                   "classifier.model.model_channels=16", "classifier.model.channel_mult=[1,2]",
                   "classifier.model.attention_resolutions=[]",
                   "classifier.model.head_channels=16", "sample.samplers=[ddim]",
                   "sample.steps=4", "sample.num_samples=20", "sample.batch_size=20",
                   "metrics.bootstrap=0", "distributed.backend=local",
                   "distributed.map_batch_size=64", "tracking.experiment=mg"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from debiaslab.experiment import run_experiment

    out = tmp_path_factory.mktemp("mg")
    cfg = load_config(None, RUN + [f"output_dir={out}", "name=mg"])
    result = run_experiment(cfg, progress=False)
    return cfg, result


def test_recipe_runs_every_stage_and_records_both_references(recipe_run, capsys):
    import json

    from conftest import recipe_runs
    from mlflow import MlflowClient

    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.side_tables import join, read_side_table
    from debiaslab.experiment import run_experiment
    from debiaslab.methods.minority_guidance import classifier_config
    from debiaslab.metrics.evaluate import load_samples
    from debiaslab.training.classifier import classifier_experiment
    from debiaslab.training.classifier_data import load_classifier_data, split_data

    cfg, result = recipe_run
    ds = ImageDataset.load(cfg.dataset_path)
    scores = join(ds.ids, read_side_table(cfg.dataset_path, "mg.mscore"), "score")
    classes = read_side_table(cfg.dataset_path, "mg.mclass")
    labels, val = join(ds.ids, classes, "class"), join(ds.ids, classes, "val")
    assert np.isfinite(scores).all() and (scores > 0).all()
    np.testing.assert_array_equal(labels, quantile_classes(scores, 4))
    # the rows the classes stage marked are exactly the classifier's validation rows
    ccfg = classifier_experiment(classifier_config(cfg))
    _, val_rows = split_data(ccfg, load_classifier_data(ccfg))
    assert np.flatnonzero(val).tolist() == val_rows.rows.tolist()
    assert (cfg.run_dir / "minority" / "scores.png").stat().st_size > 0
    # guided toward the rarest class: every sample's label is the target 3
    samples = load_samples(cfg.run_dir / "samples" / "ddim")
    assert len(samples.images) == 20
    meta = json.loads((cfg.run_dir / "eval" / "eval_ddim.json").read_text())["meta"]
    assert meta["minority_reference"]["num_images"] == math.ceil(0.1 * len(ds.ids))
    assert meta["minority_reference"]["dataset_hash"] == ds.content_hash
    assert meta["reference_hash"]  # the all-data reference, as for every evaluation
    assert {"eval/fid", "eval/cfid_minority", "eval/lof", "eval/avg_knn"} <= set(result.metrics)
    client = MlflowClient(f"sqlite:///{cfg.output_dir}/mlflow.db")
    parent, children = recipe_runs(client, "mg")
    assert set(children) == {"data", "train", "score", "classes", "classifier", "sample",
                             "evaluate"}
    assert parent.data.tags["debiaslab.method"] == "minority_guidance"
    assert "eval/cfid_minority" in parent.data.metrics
    # a second run finds every stage up to date
    capsys.readouterr()
    run_experiment(cfg, progress=False)
    assert capsys.readouterr().out.count("up to date") == 7


def test_class_conditional_variant_end_to_end(recipe_run):
    """§1.3-1.5, the class-conditional variant: classes are quantiles of the scores within each
    digit class, the minority classifier p(l | x_t, c) is class-conditional, and guided sampling
    with per-sample labels runs (the classifier getting each sample's label is the exact-gradient
    test in test_guidance)."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.side_tables import join, read_side_table
    from debiaslab.experiment import run_experiment
    from debiaslab.metrics.evaluate import load_samples
    from debiaslab.sampling import classifier_checkpoint
    from debiaslab.training.classifier import load_classifier

    cfg0, _ = recipe_run
    cfg = load_config(None, RUN + [f"output_dir={cfg0.output_dir}", "name=mgcc",
                                   "minority.class_conditional=true",
                                   "classifier.model.class_conditional=true",
                                   "sample.labels=uniform"])
    run_experiment(cfg, progress=False, stages=("data", "train", "score", "classes",
                                                "classifier", "sample"))
    ds = ImageDataset.load(cfg.dataset_path)
    scores = join(ds.ids, read_side_table(cfg.dataset_path, "mgcc.mscore"), "score")
    labels = join(ds.ids, read_side_table(cfg.dataset_path, "mgcc.mclass"), "class")
    digits = ds.labels.numpy()
    for c in np.unique(digits):
        rows = digits == c
        np.testing.assert_array_equal(labels[rows], quantile_classes(scores[rows], 4))
    assert not np.array_equal(labels, quantile_classes(scores, 4))  # not the global quantiles
    _, info = load_classifier(classifier_checkpoint(cfg, ""))
    assert info["num_cond_classes"] == 10 and info["num_outputs"] == 4
    samples = load_samples(cfg.run_dir / "samples" / "ddim")
    assert len(samples.images) == 20 and len(set(samples.labels.tolist())) > 1


def test_score_table_that_misses_images_is_one_line(recipe_run, tmp_path):
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.side_tables import join, read_side_table, write_side_table

    cfg, _ = recipe_run
    ds = ImageDataset.load(cfg.dataset_path)
    write_side_table(cfg.dataset_path, "partial", ds.ids[:-1],
                     {"score": np.zeros(len(ds.ids) - 1, np.float32)}, producer={"test": 1})
    with pytest.raises(DataError) as exc:
        join(ds.ids, read_side_table(cfg.dataset_path, "partial"), "score")
    assert "lacks 1 of" in one_line(exc) and "recompute it" in one_line(exc)


def test_missing_classifier_checkpoint_is_one_line(recipe_run):
    from debiaslab.stages import sample

    cfg, _ = recipe_run
    bad = load_config(None, RUN + [f"output_dir={cfg.output_dir}", "name=mg",
                                   "sample.guidance=[{type: classifier, scale: 1.0, target: 3, "
                                   "checkpoint: /nonexistent/classifier}]"])
    with pytest.raises(Exception) as exc:
        sample(bad, cfg.run_dir, progress=False)
    assert "/nonexistent/classifier" in one_line(exc)


CLF = ["classifier.model.model_channels=16", "classifier.model.channel_mult=[1,2]",
       "classifier.model.attention_resolutions=[]", "classifier.model.head_channels=16",
       "classifier.train.steps=3", "classifier.train.batch_size=16",
       "classifier.train.warmup_steps=0", "classifier.train.ema_decay=0",
       "classifier.train.log_every=3", "classifier.train.checkpoint_every=3"]


def test_cascaded_classifier_trains_its_head_on_a_frozen_trunk(tmp_path, digits_lt):
    """§1.4: a trained encoder classifier is the frozen trunk; only the head trains; the
    gradient reaches x_t through the trunk; the trained net reloads from its checkpoint."""
    from debiaslab.stages import build_data
    from debiaslab.training.classifier import (
        classifier_experiment,
        load_classifier,
        train_classifier,
    )
    from debiaslab.training.classifier_data import load_classifier_data

    base = TINY + CLF + [f"output_dir={tmp_path}", "train.device=cpu"]
    trunk_cfg = classifier_experiment(load_config(None, base + ["name=trunk"]))
    build_data(trunk_cfg)
    trunk_run = train_classifier(trunk_cfg, load_classifier_data(trunk_cfg), progress=False)
    trunk, _ = load_classifier(trunk_run.train.checkpoint)
    head_cfg = classifier_experiment(load_config(None, base + [
        "name=cascade", "classifier.model.net=cascaded_classifier",
        "classifier.model.attention_resolutions=[8]",  # the trunk's 8x8 features
        f"classifier.model.options={{trunk: {trunk_run.train.checkpoint}}}"]))
    result = train_classifier(head_cfg, load_classifier_data(head_cfg), progress=False)
    net, info = load_classifier(result.train.checkpoint)
    assert type(net).__name__ == "CascadedClassifier" and info["num_outputs"] == 10
    for (name, a), b in zip(trunk.state_dict().items(), net.trunk.state_dict().values()):
        assert torch.equal(a, b), name  # the trunk did not move
    net.train()
    assert net.head.training and not net.trunk.training  # the trunk stays in eval mode
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    net(x, torch.full((4,), 300.0)).log_softmax(-1)[:, 9].sum().backward()
    assert x.grad.abs().sum() > 0  # guidance gradients flow through the frozen trunk
    assert all(p.grad is None for p in net.trunk.parameters())


def test_cascaded_classifier_needs_a_trunk():
    with pytest.raises(ConfigError) as exc:
        from debiaslab.methods.minority_guidance import CascadedClassifier

        CascadedClassifier(10)
    assert "options.trunk" in one_line(exc)


def test_score_mapper_takes_read_only_batches_without_warnings(recipe_run):
    """Ray Data hands map actors read-only arrays: no per-batch UserWarning, same scores."""
    import warnings

    import numpy as np

    from debiaslab.data.dataset import ImageDataset
    from debiaslab.methods.minority_guidance import MinorityScoreMapper, score_settings

    cfg, result = recipe_run
    ds = ImageDataset.load(cfg.dataset_path)
    pixels, labels = ds.images[:6].numpy(), ds.labels[:6].numpy()
    batch = {"id": np.asarray(ds.ids[:6], dtype=object), "pixels": pixels.copy(),
             "label": labels.copy()}
    frozen = {"id": batch["id"], "pixels": pixels.copy(), "label": labels.copy()}
    frozen["pixels"].flags.writeable = False
    frozen["label"].flags.writeable = False
    mapper = MinorityScoreMapper(str(result.checkpoint), score_settings(cfg), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = mapper(frozen)["score"]
    assert np.array_equal(scores, mapper(batch)["score"])
