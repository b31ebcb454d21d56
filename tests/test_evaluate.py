"""The evaluation protocol end to end on real digits: metrics, provenance, errors, CLI, MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from debiaslab.cli import main
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.schema import DatasetMeta, write_dataset
from debiaslab.data.sources import build_dataset
from debiaslab.errors import DataError
from debiaslab.metrics.evaluate import SampleSet, evaluate, load_samples
from debiaslab.metrics.features import build_extractor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ref = build_dataset("digits", root / "ref", imbalance="none")
    lt = build_dataset("digits", root / "lt", imbalance="long_tail", imb_factor=0.1)
    return root, Path(ref), ImageDataset.load(lt), build_extractor("digits")


def test_real_images_score_better_than_noise(setup):
    root, ref, lt, extractor = setup
    real = SampleSet(lt.images.numpy(), lt.labels.numpy(), "digits-lt")
    rng = np.random.default_rng(0)
    noise = SampleSet(rng.integers(0, 256, size=(300, 1, 16, 16), dtype=np.uint8), None, "noise")
    ev_real = evaluate(real, ref, extractor, class_counts=lt.class_counts(), bootstrap=20)
    ev_noise = evaluate(noise, ref, extractor, bootstrap=20)
    assert ev_real.metrics["fid"] < 0.2 * ev_noise.metrics["fid"]
    assert ev_real.metrics["precision"] > 0.9 and ev_noise.metrics["precision"] < 0.2
    assert ev_real.metrics["recall"] > ev_noise.metrics["recall"]
    # the LT subset over-represents class 0: its class distribution is far from uniform
    assert ev_real.metrics["fd_class"] > 0.15
    assert ev_real.meta["extractor"] == extractor.name
    assert ev_real.meta["reference_images"] == 1797
    assert {"head_fid", "tail_fid", "head_recall", "tail_recall"} <= set(ev_real.metrics)
    assert len(ev_real.per_class) == 10
    assert ev_real.per_class[0]["group"] == "head" and ev_real.per_class[9]["group"] == "tail"
    assert all(np.isfinite(v) for v in ev_real.metrics.values())
    assert {"class", "bold", "even"} <= set(ev_real.distributions)


def test_reference_features_are_cached(setup):
    root, ref, lt, extractor = setup
    real = SampleSet(lt.images.numpy()[:50], None, "x")
    evaluate(real, ref, extractor, bootstrap=0)
    cached = sorted(p.name for p in ref.iterdir() if p.suffix in (".npy", ".npz"))
    assert any(n.startswith("fid_stats_") for n in cached)
    assert any(n.startswith("features_") for n in cached)


@pytest.mark.parametrize("images,fragment", [
    (np.zeros((0, 1, 16, 16), np.uint8), "empty"),
    (np.zeros((5, 3, 32, 32), np.uint8), "3"),
])
def test_bad_samples_are_one_line_errors(setup, images, fragment):
    root, ref, _, extractor = setup
    with pytest.raises(DataError) as exc:
        evaluate(SampleSet(images, None, "bad-samples"), ref, extractor)
    assert "\n" not in str(exc.value) and fragment in str(exc.value)


def test_tiny_reference_is_an_error(setup):
    root, _, lt, extractor = setup
    tiny = root / "tiny"
    write_dataset(tiny, lt.images.numpy()[:4], lt.labels.numpy()[:4], None,
                  DatasetMeta("tiny", "test", list(lt.class_names), []))
    with pytest.raises(DataError) as exc:
        evaluate(SampleSet(lt.images.numpy()[:20], None, "s"), tiny, extractor, k=5)
    assert "k=5" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_samples_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "nothing")


def test_evaluate_cli_logs_to_mlflow(setup, tmp_path, capsys):
    from mlflow import MlflowClient

    root, ref, lt, _ = setup
    argv = ["evaluate", "--samples", str(root / "lt"), "--reference", str(ref), "--name", "lt",
            "--out", str(tmp_path / "eval"), "--set", f"output_dir={tmp_path}",
            "--set", "tracking.experiment=evalcli", "--set", "metrics.bootstrap=10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fid" in out and "precision" in out and "digits-classifier" in out
    data = json.loads((tmp_path / "eval" / "eval_lt.json").read_text())
    assert data["meta"]["reference_hash"] and data["metrics"]["fid"] >= 0
    assert (tmp_path / "eval" / "per_class_lt.png").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("evalcli").experiment_id])
    assert "eval/lt/fid" in run.data.metrics and run.info.status == "FINISHED"
    assert run.data.tags["eval.extractor"].startswith("digits-classifier")


def test_evaluate_cli_bad_reference_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "debiaslab.cli", "evaluate", "--samples",
                           str(tmp_path), "--reference", str(tmp_path / "none"),
                           "--set", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "none" in proc.stderr


def test_load_samples_from_image_folder_and_parquet(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root, ref, lt, extractor = setup
    images = lt.images.numpy()[:30]
    labels = lt.labels.numpy()[:30]
    for i, (img, lab) in enumerate(zip(images, labels)):
        folder = tmp_path / "folder" / f"{int(lab)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / f"{i:03d}.png")
    from_folder = load_samples(tmp_path / "folder", (1, 16, 16))
    assert from_folder.images.shape == (30, 1, 16, 16)
    assert sorted(from_folder.images.reshape(30, -1).sum(1)) == sorted(
        images.reshape(30, -1).sum(1))
    import io

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a[0]).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"image": [png(a) for a in images]}), tmp_path / "s.parquet")
    from_parquet = load_samples(tmp_path / "s.parquet")
    assert np.array_equal(from_parquet.images, images) and from_parquet.labels is None
    ev = evaluate(from_parquet, ref, extractor, bootstrap=0)
    assert ev.meta["num_samples"] == 30 and ev.meta["per_class_labels"] == "extractor predictions"


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_sample_classes_map_to_the_reference_by_name(setup, tmp_path):
    """An image folder's classes are its sorted subfolder names (eight, five, four, ...), not
    the reference's order (zero, one, ...): labels must be matched by name, not position."""
    from PIL import Image

    root, _, lt, extractor = setup
    digits = ImageDataset.load(root / "ref")
    named_ref = tmp_path / "named-ref"
    write_dataset(named_ref, digits.images.numpy(), digits.labels.numpy(), None,
                  DatasetMeta("named", "test", DIGIT_NAMES, []))
    images, labels = lt.images.numpy(), lt.labels.numpy()
    folder = tmp_path / "samples"
    for i, (img, lab) in enumerate(zip(images, labels)):
        (folder / DIGIT_NAMES[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / DIGIT_NAMES[lab] / f"{i:04d}.png")
    from_folder = load_samples(folder, (1, 16, 16))
    assert from_folder.class_names == sorted(DIGIT_NAMES) != DIGIT_NAMES

    in_order = evaluate(SampleSet(images, labels, "in-order"), named_ref, extractor,
                        class_counts=lt.class_counts(), bootstrap=0)
    by_folder = evaluate(from_folder, named_ref, extractor, class_counts=lt.class_counts(),
                         bootstrap=0)
    assert [r["n_fake"] for r in by_folder.per_class] == np.bincount(labels).tolist()
    for got, want in zip(by_folder.per_class, in_order.per_class, strict=True):
        assert got["class"] == want["class"] and got["n_fake"] == want["n_fake"], got
        assert got["group"] == want["group"] and got["reason"] == want["reason"], got
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-4), got
        assert got["recall"] == pytest.approx(want["recall"]), got
    for key in ("head_fid", "tail_fid", "head_recall", "tail_recall", "label_accuracy"):
        assert by_folder.metrics[key] == pytest.approx(in_order.metrics[key]), key
    assert in_order.metrics["label_accuracy"] > 0.9

    # a class the reference does not have is a one-line error naming both sides
    (folder / "eleven").mkdir()
    Image.fromarray(images[0, 0]).save(folder / "eleven" / "x.png")
    with pytest.raises(DataError) as exc:
        evaluate(load_samples(folder, (1, 16, 16)), named_ref, extractor, bootstrap=0)
    message = str(exc.value)
    assert "\n" not in message and str(folder) in message and "'eleven'" in message
    assert "'zero', 'one'" in message and "'seven'," not in message.split("reference")[0]


def test_table_flags_estimators_unreliable_at_the_sample_count():
    """KID is shown with its spread (its unbiased estimate goes negative when nothing is
    detectable) and hidden at tiny counts; per-class FID from fewer samples per class than
    feature dimensions is marked and footnoted."""
    from debiaslab.metrics.evaluate import Evaluation
    from debiaslab.stages import KID_MIN_SAMPLES, eval_notes, eval_row

    def ev(n: int, per_class: int) -> Evaluation:
        return Evaluation(metrics={"fid": 50.0, "kid": -0.0123, "kid_std": 0.02,
                                   "head_fid": 300.0, "tail_fid": 400.0},
                          per_class=[{"class": c, "n_fake": per_class} for c in range(10)],
                          meta={"num_samples": n, "feature_dim": 64})

    small = eval_row("a", ev(100, 10))
    assert small["kid"] == "-0.0123 ± 0.02" and small["fid"] == 50.0
    assert small["head_fid"] == "300*" and small["tail_fid"] == "400*"
    notes = eval_notes([ev(100, 10)])
    assert any("no difference is detectable" in n for n in notes)
    assert any("as few as 10 samples per class" in n and "64 feature dimensions" in n
               for n in notes)
    assert eval_row("b", ev(KID_MIN_SAMPLES - 1, 10))["kid"].startswith("n/a")
    plenty = eval_row("c", ev(1000, 100))
    assert plenty["head_fid"] == 300.0 and not any("*" in n for n in eval_notes([ev(1000, 100)]))
