"""TIW-DSM's recipe: a discriminator stage before training whose checkpoint the score model's
loss reads, with balanced batches, per-tau validation and one-line errors for bad settings."""

import math

import pytest
import torch
from conftest import TINY

from debiaslab.config import load_config
from debiaslab.errors import CheckpointError, ConfigError, DataError
from debiaslab.experiment import run_experiment
from debiaslab.methods.tiw_dsm import (
    TimeDependentDiscriminator,
    _discriminator_task_class,
    discriminator_data,
)
from debiaslab.recipes import get_recipe, read_record
from debiaslab.stages import build_data
from debiaslab.training.classifier import classifier_experiment
from debiaslab.training.loop import StepBatch

SMALL = TINY + [
    "recipe=tiw_dsm", "diffusion.loss=tiw_dsm", "model.class_conditional=false",
    "data.imbalance=long_tail_reference", "data.reference_count=50",
    "distributed.backend=local", "train.steps=6", "train.warmup_steps=1",
    "train.checkpoint_every=6", "discriminator.train.steps=6",
    "discriminator.train.batch_size=16", "discriminator.train.checkpoint_every=6",
    "discriminator.model.model_channels=16", "discriminator.model.channel_mult=[1,2]",
    "discriminator.val_buckets=4", "sample.samplers=[edm_heun]", "sample.steps=3",
    "sample.num_samples=10", "sample.batch_size=10", "sample.labels=none",
    "metrics.bootstrap=0", "tracking.enabled=false", "name=tiw"]


def test_discriminator_batches_are_balanced_and_any_split_sees_one_batch(tmp_path):
    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}"])
    build_data(cfg)
    ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
    data = discriminator_data(ccfg)
    assert data.class_names == ["biased", "reference"] and int(data.labels.sum()) == 50
    task = _discriminator_task_class()(ccfg, data)

    def batch(rank, world):
        plan = StepBatch(step=3, seed=0, size=16, rank=rank, world_size=world,
                         indices=torch.arange(16 // world))
        return task.make_batch(plan)

    one = batch(0, 1)
    assert one["label"].tolist() == [0, 1] * 8  # half biased, half reference, alternating
    assert ((one["tau"] >= 1e-5) & (one["tau"] <= 1)).all()
    halves = [batch(r, 2) for r in (0, 1)]
    for key in one:  # two Ray Train ranks together see exactly the one-process batch
        assert torch.equal(torch.cat([h[key] for h in halves]), one[key]), key
    assert all(h["label"].sum() == 4 for h in halves)  # each rank's slice is balanced too


def test_recipe_runs_and_a_new_alpha_retrains_only_the_score_model(tmp_path):
    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}"])
    assert [s.name for s in get_recipe(cfg).stages] == \
        ["data", "discriminator", "train", "sample", "evaluate"]
    result = run_experiment(cfg, progress=False)
    assert {"discriminator", "train", "sample", "evaluate"} <= set(result.seconds)
    disc = read_record(cfg, get_recipe(cfg).stage("discriminator"))
    path = disc["outputs"]["discriminator"]["path"]
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    bound = state["config"]["inputs"]["discriminator"]  # the score model knows its critic
    assert bound["path"] == path and bound["hash"] == disc["outputs"]["discriminator"]["hash"]
    assert "discriminator/val/accuracy" in result.metrics
    assert {"eval/bias/tv_reference", "eval/bias/tv_biased", "eval/bias/share_9"} <= \
        set(result.metrics)  # the bias statistic of every evaluation
    assert (cfg.run_dir / "eval" / "subgroups_edm_heun.png").is_file()
    assert (tmp_path / "runs" / "tiw.discriminator" / "validation_per_timestep.png").is_file()

    # another alpha is another score model: the discriminator is up to date, and the finished
    # checkpoint of alpha = 1 is not resumed as if it were one of alpha = 0.5
    with pytest.raises(CheckpointError, match=r"tiw\.alpha"):
        run_experiment(load_config(None, SMALL + [f"output_dir={tmp_path}", "tiw.alpha=0.5"]),
                       progress=False)
    again = run_experiment(load_config(None, SMALL + [f"output_dir={tmp_path}", "tiw.alpha=1.0"]),
                           progress=False)
    assert not again.seconds  # the same settings: every stage up to date


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.imbalance=long_tail"], "recipe tiw_dsm: needs a reference set"),
    (["diffusion.loss=edm"], "recipe tiw_dsm: needs diffusion.loss: one of tiw_dsm, iw_dsm"),
    (["tiw.alpha=-1"], "tiw.alpha: must be a finite number >= 0, got -1"),
    (["discriminator.train.batch_size=15"], "discriminator.train.batch_size: must be even"),
    (["data.train_on=reference"], "recipe tiw_dsm: data.train_on: reference trains on the "
                                  "unbiased set alone (the DSM(ref) baseline)"),
])
def test_bad_tiw_recipes_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", *overrides])
        get_recipe(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_reference_without_rows_and_a_critic_for_other_images_are_refused(tmp_path):
    with pytest.raises(DataError, match="at least one image per class"):
        build_data(load_config(None, SMALL + [f"output_dir={tmp_path}", "data.reference_count=0",
                                              "data.reference_fraction=0.001"]))
    critic = TimeDependentDiscriminator(torch.nn.Identity(), shape=(1, 8, 8), source="d.pt")
    with pytest.raises(ConfigError, match=r"d.pt: trained on images of shape \[1, 8, 8\], the "
                                          r"score model's are \[1, 16, 16\]"):
        critic(torch.zeros(2, 1, 16, 16), torch.full((2,), 0.5))


def test_discriminator_ddp_on_ray_train_equals_one_process(shared_ray, tmp_path):
    """2 Ray Train workers x 8 rows == 1 process x 16: each rank's slice of the balanced,
    alternating global batch is what that rank trains on. Compared as functions (outputs on
    noisy inputs): the two runs differ by fp32 summation order only (8 + 8 vs 16 terms per
    step, 6 Adam steps), ~1e-7; the bound leaves two orders of magnitude."""
    from debiaslab.distributed.train import train_distributed
    from debiaslab.methods.tiw_dsm import DISCRIMINATOR, discriminator_trainer
    from debiaslab.training.classifier import load_classifier

    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", "distributed.num_workers=2"])
    build_data(cfg)
    ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
    ddp = train_distributed(ccfg, tracking_uri=None, mlflow_run_id=None,
                            trainer_factory=discriminator_trainer)
    single, evaluation = DISCRIMINATOR.train_local(ccfg, progress=False)
    assert len(evaluation["accuracy"]) == 4 and sum(evaluation["count"]) > 0
    rows = discriminator_data(ccfg)
    x, t = rows.float_inputs(torch.arange(0, 736, 23)), torch.linspace(1, 999, 32)
    with torch.no_grad():
        out = [load_classifier(path)[0](x, t) for path in (ddp.checkpoint, single)]
    diff = (out[0] - out[1]).abs().max().item()
    print(f"discriminator max |logits_ddp - logits_single| = {diff:.3g}")
    assert diff < 1e-5  # measured 8.9e-8
    assert torch.load(ddp.checkpoint, weights_only=True)["batch"] == {"global": 16,
                                                                       "world_size": 2}


def test_the_checkpoint_with_the_lowest_validation_bce_is_the_output(tmp_path):
    from debiaslab.methods.tiw_dsm import DISCRIMINATOR

    keep = ["discriminator.train.checkpoint_every=2", "discriminator.train.keep_checkpoints=3",
            "discriminator.train.lr=3e-3"]
    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", *keep])
    build_data(cfg)
    ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
    chosen, evaluation = DISCRIMINATOR.train_local(ccfg, progress=False)
    steps = [c["step"] for c in evaluation["candidates"]]
    bces = [c["val_bce"] for c in evaluation["candidates"]]
    assert steps == [2, 4, 6]
    assert evaluation["loss_mean"] == min(bces)
    weights = evaluation["weights"]  # of the chosen checkpoint, on the biased set; to MLflow
    assert len(weights["ess"]) == len(weights["sigma"]) == 5
    assert all(0.0 < e <= 1.0 for e in weights["ess"]) and weights["iw_mean"] > 0
    assert set(evaluation["extra_metrics"]) >= {"weights/ess_sigma0.2", "weights/iw_ess"}
    assert chosen.name == f"ckpt_{steps[bces.index(min(bces))]:08d}.pt"
    last = load_config(None, SMALL + [f"output_dir={tmp_path}", *keep, "name=last",
                                      "discriminator.select=last"])
    build_data(last)
    lcfg = classifier_experiment(last, "discriminator", run_suffix="discriminator")
    final, ev = DISCRIMINATOR.train_local(lcfg, progress=False)
    assert final.name == "ckpt_00000006.pt" and [c["step"] for c in ev["candidates"]] == [6]


@pytest.mark.parametrize("setting", [
    ["data.imbalance=long_tail_reference", "data.reference_count=50"],
    ["data.imbalance=attribute_bias", "data.bias_attribute=bold", "data.bias_ratio=0.9",
     "data.reference_count=100"],
])
def test_bias_statistic_places_real_sets_where_they_belong(tmp_path, setting):
    """Fed the reference images as samples, the statistic finds them near the reference's
    subgroup shares and far from the biased set's; fed the biased images, the other way round
    (the digits extractor's predictions are ~98% accurate, so not exactly 0)."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.methods.tiw_dsm import bias_evaluation, subgroup_of, total_variation
    from debiaslab.metrics.evaluate import SampleSet
    from debiaslab.metrics.features import build_extractor

    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", *setting])
    build_data(cfg)
    extractor = build_extractor("digits")
    out = {}
    for name in ("reference", "biased"):
        images = ImageDataset.load(cfg.dataset_path / name).images.numpy()
        samples = SampleSet(images=images, labels=None, source=str(tmp_path / name))
        out[name], meta = bias_evaluation(cfg, samples, extractor, {})
    gap = meta["bias_statistic"]["tv_reference_vs_biased"]
    assert gap > 0.25  # the two sets really differ in this subgroup (measured 0.297, 0.40)
    assert out["reference"]["bias/tv_reference"] < 0.25 * gap
    assert out["biased"]["bias/tv_biased"] < 0.25 * gap
    assert out["reference"]["bias/tv_biased"] > 0.75 * gap
    assert meta["bias_statistic"]["by"] == subgroup_of(cfg)
    bars = meta["figures"]["subgroups"].axes[0].patches  # biased, reference, samples per group
    shares = meta["bias_statistic"]
    assert [round(b.get_height(), 6) for b in bars] == [
        round(v, 6) for n in ("biased", "reference", "samples") for v in shares[n]]
    assert total_variation([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4)


def test_validation_is_class_balanced(tmp_path):
    """A critic that always answers "biased" scores 0.5, not the biased rows' share of the
    held-out set (0.93 on digits-LT with 50 references)."""
    from debiaslab.methods.tiw_dsm import TIWConfig, evaluate_discriminator
    from debiaslab.training.classifier_data import split_data

    class AlwaysBiased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([3.0, 0.0]))

        def forward(self, x, t):
            return self.bias.expand(len(x), 2)

    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}"])
    build_data(cfg)
    ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
    _, val_rows = split_data(ccfg, discriminator_data(ccfg))
    assert float(val_rows.labels.float().mean()) < 0.1  # mostly biased rows
    ev = evaluate_discriminator(AlwaysBiased(), val_rows, TIWConfig(), buckets=3, seed=0)
    assert ev["accuracy_mean"] == pytest.approx(0.5) and ev["accuracy"] == pytest.approx([0.5] * 3)
    loss_ref = -math.log(math.exp(0) / (math.exp(3) + math.exp(0)))
    loss_bias = -math.log(math.exp(3) / (math.exp(3) + math.exp(0)))
    assert ev["loss_mean"] == pytest.approx((loss_ref + loss_bias) / 2)


def test_baseline_recipe_logs_the_bias_statistic_and_its_plot_to_mlflow(tmp_path):
    """DSM(obs) through the tiw_baseline recipe: no discriminator stage, the score model on
    D_obs, and the evaluate stage's MLflow child run holds the bias statistic and its plot."""
    from debiaslab.tracking import find_runs, resolve_tracking_uri

    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", "recipe=tiw_baseline",
                                     "diffusion.loss=edm", "data.train_on=observed",
                                     "tracking.enabled=true", "tracking.experiment=tiwbase",
                                     "name=dsm_obs"])
    assert [s.name for s in get_recipe(cfg).stages] == ["data", "train", "sample", "evaluate"]
    result = run_experiment(cfg, progress=False)
    assert {"eval/bias/tv_reference", "eval/bias/tv_biased"} <= set(result.metrics)
    runs = find_runs(resolve_tracking_uri(cfg.output_dir), experiments=["tiwbase"],
                     statuses=())
    (evaluate,) = [r for r in runs if r.name.endswith("evaluate")]
    assert "eval/edm_heun/bias/tv_reference" in evaluate.metrics
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(cfg.output_dir))
    logged = {f.path for f in client.list_artifacts(evaluate.run_id, "eval")}
    assert "eval/subgroups_edm_heun.png" in logged
    with pytest.raises(ConfigError, match="recipe tiw_baseline: diffusion.loss: tiw_dsm needs "
                                          "the discriminator stage"):
        get_recipe(load_config(None, SMALL + [f"output_dir={tmp_path}",
                                              "recipe=tiw_baseline"]))


def test_alpha_sweep_trains_on_ray_train_with_the_base_runs_discriminator(shared_ray,
                                                                           tmp_path):
    """A training sweep over tiw.alpha: each trial's score model is trained by Ray Train with
    the base run's discriminator bound into its config, and reports the bias statistic. A sweep
    over what makes the discriminator is refused before any trial."""
    import yaml

    from debiaslab.cli import main
    from debiaslab.experiment import run_sweep
    from debiaslab.tracking import find_runs, resolve_tracking_uri

    base = load_config(None, SMALL + [f"output_dir={tmp_path}", "tracking.enabled=true",
                                      "tracking.experiment=tiwsweep",
                                      "distributed.num_workers=1"])
    run_experiment(base, progress=False)
    experiment = base.run_dir / "config.yaml"  # the run's own full config
    disc = read_record(base, get_recipe(base).stage("discriminator"))["outputs"]["discriminator"]
    sweep = {"name": "alpha", "experiment": str(experiment), "kind": "training",
             "params": {"tiw.alpha": {"type": "float", "low": 0.0, "high": 2.0}},
             "objective": {"metric": "eval/fid", "mode": "min"},
             "second_objective": {"metric": "eval/bias/tv_reference", "mode": "min"},
             "num_trials": 1, "cpus_per_trial": 0.5}
    path = tmp_path / "alpha.yaml"
    path.write_text(yaml.safe_dump(sweep))
    run_sweep(path, progress=False)
    (trial,) = find_runs(resolve_tracking_uri(base.output_dir), experiments=["tiwsweep"],
                         tags={"debiaslab.sweep": "alpha", "debiaslab.kind": "trial"},
                         statuses=())
    assert trial.status == "FINISHED"
    assert {"train/loss", "eval/fid", "eval/bias/tv_reference"} <= set(trial.metrics)
    ckpts = sorted((tmp_path / "ray_results" / trial.name).rglob("*.pt"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert state["config"]["inputs"]["discriminator"] == {"path": disc["path"],
                                                          "hash": disc["hash"]}
    assert state["config"]["tiw"]["alpha"] == pytest.approx(float(trial.params["sweep.tiw.alpha"]))

    sweep["params"] = {"tiw.beta_max": {"type": "float", "low": 10.0, "high": 20.0}}
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match=r"params.tiw.beta_max: it defines the discriminator "
                                          r"stage \(tiw.beta_max\), which training trials reuse"):
        main(["--debug", "sweep", "-c", str(path), "--dry-run"])


def test_a_subgroup_classifier_replaces_the_extractors_predictions(tmp_path):
    """metrics.subgroup_classifier: a classifier of the subgroup_classifier recipe (clean
    images, label class) decides the samples' subgroups; one for another label is refused, and
    an extractor that predicts no subgroup without one is refused before anything runs."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.methods.tiw_dsm import bias_evaluation, classify_subgroups, shares
    from debiaslab.metrics.evaluate import SampleSet
    from debiaslab.metrics.features import build_extractor

    common = SMALL + [f"output_dir={tmp_path}", "classifier.timestep_range=[0,0]",
                      "classifier.train.steps=4", "classifier.train.batch_size=16",
                      "classifier.train.checkpoint_every=4", "classifier.val_buckets=1",
                      "classifier.model.model_channels=16", "classifier.model.channel_mult=[1,2]"]
    trainer = load_config(None, common + ["recipe=subgroup_classifier", "name=groups"])
    assert [s.name for s in get_recipe(trainer).stages] == ["data", "classifier"]
    run_experiment(trainer, progress=False)
    folder = str(tmp_path / "runs" / "groups.classifier")
    cfg = load_config(None, common + [f"metrics.subgroup_classifier={folder}"])
    images = ImageDataset.load(cfg.dataset_path / "reference").images.numpy()
    predicted, provenance = classify_subgroups(folder, images, "class", 10)
    assert predicted.shape == (50,) and len(provenance["hash"]) == 64
    samples = SampleSet(images=images, labels=None, source=str(tmp_path / "ref"))
    metrics, meta = bias_evaluation(cfg, samples, build_extractor("digits"), {})
    assert meta["bias_statistic"]["predictor"] == "metrics.subgroup_classifier"
    assert [metrics[f"bias/share_{i}"] for i in range(10)] == shares(predicted, 10).tolist()
    with pytest.raises(ConfigError, match=r"predicts class \(10 classes\); the bias statistic "
                                          r"counts attr:bold \(2 groups\)"):
        classify_subgroups(folder, images, "attr:bold", 2)
    with pytest.raises(ConfigError, match="metrics.extractor=inception: does not predict the "
                                          "bias statistic's subgroup"):
        get_recipe(load_config(None, SMALL + [f"output_dir={tmp_path}",
                                              "metrics.extractor=inception"]))


@pytest.mark.parametrize(("name", "reference", "mimg"), [("cifar10_lt_tiw_5", 500, 11),
                                                          ("cifar10_lt_tiw_10", 1000, 21)])
def test_the_cifar_gpu_recipes_hold_the_released_settings(name, reference, mimg):
    """The CIFAR-10-LT GPU configs (each also passes `debiaslab run --dry-run` in
    test_config): batch 256, lr 1e-3, EDM augmentation, 11 or 21 Mimg, a 20k-step discriminator
    whose checkpoint is chosen by validation BCE, EDM Heun with 18 steps."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "experiments"
                      / f"{name}.yaml")
    assert cfg.recipe == "tiw_dsm" and cfg.diffusion.loss == "tiw_dsm"
    assert (cfg.data.imbalance, cfg.data.imb_factor, cfg.data.reference_count) == \
        ("long_tail_reference", 0.01, reference)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.data.augment) == (256, 1e-3, "ada")
    assert cfg.train.steps * cfg.train.batch_size == pytest.approx(mimg * 1e6, rel=1e-4)
    d = cfg.sections["discriminator"]
    assert (d.train.steps, d.select, d.train.checkpoint_every) == (20000, "val_bce", 500)
    assert d.train.keep_checkpoints * d.train.checkpoint_every >= d.train.steps
    assert (cfg.sample.samplers, cfg.sample.steps) == (("edm_heun",), 18)
    assert cfg.metrics.subgroup_classifier  # the bias statistic's CIFAR-10 classifier


def test_the_cascaded_discriminator_trains_a_head_on_a_frozen_trunk(tmp_path):
    """The second variant of §2.2: a frozen noise-conditional encoder (here a class classifier
    of the biased set, trained by the subgroup_classifier recipe) and a trained head; the
    chosen checkpoint reloads with the trunk's weights unchanged."""
    from debiaslab.methods.tiw_dsm import DISCRIMINATOR
    from debiaslab.training.classifier import load_classifier

    trunk_cfg = load_config(None, SMALL + [
        f"output_dir={tmp_path}", "recipe=subgroup_classifier", "name=trunk",
        "classifier.train.steps=4", "classifier.train.batch_size=16",
        "classifier.train.checkpoint_every=4", "classifier.val_buckets=1",
        "classifier.model.model_channels=16", "classifier.model.channel_mult=[1,2]"])
    run_experiment(trunk_cfg, progress=False)
    trunk_path = read_record(trunk_cfg, get_recipe(trunk_cfg).stage("classifier"))[
        "outputs"]["classifier"]["path"]
    cfg = load_config(None, SMALL + [
        f"output_dir={tmp_path}", "discriminator.model.net=cascaded_classifier",
        "discriminator.model.attention_resolutions=[]", "discriminator.model.head_channels=16",
        f"discriminator.model.options={{trunk: {trunk_path}}}"])
    build_data(cfg)
    ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
    chosen, evaluation = DISCRIMINATOR.train_local(ccfg, progress=False)
    net, info = load_classifier(chosen)
    trunk, _ = load_classifier(trunk_path)
    assert type(net).__name__ == "CascadedClassifier" and info["num_outputs"] == 2
    for (name, a), b in zip(trunk.state_dict().items(), net.trunk.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(evaluation["weights"]["ess"]) == 5


def test_joint_subgroups_count_every_combination(tmp_path):
    """metrics.subgroups: class+attr:bold counts the 20 (digit, bold) combinations; fed the
    reference images, the shares are their stored joint shares up to the extractor's errors.
    Bad specs are one-line errors before anything runs."""
    import numpy as np

    from debiaslab.data.dataset import ImageDataset
    from debiaslab.methods.tiw_dsm import bias_evaluation, total_variation
    from debiaslab.metrics.evaluate import SampleSet
    from debiaslab.metrics.features import build_extractor

    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}", "metrics.subgroups=class+attr:bold"])
    build_data(cfg)
    ref = ImageDataset.load(cfg.dataset_path / "reference")
    samples = SampleSet(images=ref.images.numpy(), labels=None, source=str(tmp_path / "ref"))
    metrics, meta = bias_evaluation(cfg, samples, build_extractor("digits"), {})
    stat = meta["bias_statistic"]
    assert len(stat["names"]) == 20 and stat["names"][:3] == ["0,bold=0", "0,bold=1", "1,bold=0"]
    # the metric names are the ones MLflow stores (it refuses "," and "=")
    assert [k for k in metrics if k.startswith("bias/share_")][:3] == [
        "bias/share_0_bold_0", "bias/share_0_bold_1", "bias/share_1_bold_0"]
    bold = ref.attributes.numpy()[:, list(ref.attr_names).index("bold")]
    joint = np.bincount(ref.labels.numpy() * 2 + bold, minlength=20) / len(bold)
    assert stat["reference"] == pytest.approx(joint.tolist())
    assert sum(stat["samples"]) == pytest.approx(1.0)
    assert metrics["bias/tv_reference"] < 0.25 * stat["tv_reference_vs_biased"]
    assert total_variation(stat["samples"], joint) == pytest.approx(metrics["bias/tv_reference"])
    for spec, message in [("class+shape", "each part is class or attr:<name>"),
                          ("class+class", "names a part twice")]:
        with pytest.raises(ConfigError, match=message):
            get_recipe(load_config(None, SMALL + [f"output_dir={tmp_path}",
                                                  f"metrics.subgroups={spec}"]))
    with pytest.raises(ConfigError, match="joint subgroup; metrics.subgroup_classifier"):
        get_recipe(load_config(None, SMALL + [f"output_dir={tmp_path}",
                                              "metrics.subgroups=class+attr:bold",
                                              "metrics.subgroup_classifier=/x"]))
