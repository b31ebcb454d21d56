"""TIW-DSM's long-tail setting: a class-balanced reference set drawn first, then the long tail of
what is left, written as two disjoint datasets that read back with a source column."""

import numpy as np
import pytest

from debiaslab.config import load_config
from debiaslab.data.builders import (
    balanced_counts,
    long_tail_counts,
    long_tail_reference_indices,
    reference_size,
)
from debiaslab.data.digits import load_digits_arrays
from debiaslab.data.locate import train_data_path
from debiaslab.data.schema import read_manifest
from debiaslab.data.side_tables import read_datasets
from debiaslab.errors import ConfigError, DataError
from debiaslab.stages import build_data


@pytest.fixture(scope="module")
def labels():
    return load_digits_arrays(16).labels


def test_reference_is_balanced_disjoint_and_the_rest_long_tailed(labels):
    biased, reference = long_tail_reference_indices(labels, 0.1, 50, seed=0)
    assert not set(biased.tolist()) & set(reference.tolist())
    assert np.bincount(labels[reference], minlength=10).tolist() == [5] * 10
    left = np.bincount(np.delete(labels, reference), minlength=10)
    assert np.bincount(labels[biased], minlength=10).tolist() == \
        long_tail_counts(int(left.min()), 10, 0.1)
    again = long_tail_reference_indices(labels, 0.1, 50, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (biased, reference)))
    other = long_tail_reference_indices(labels, 0.1, 50, seed=1)[1]
    assert not np.array_equal(other, reference)  # the seed picks the images


def test_sizes_count_or_fraction_and_their_errors(labels):
    assert reference_size(1797, 0.05) == 90 and reference_size(1797, 0.05, 57) == 57
    assert balanced_counts(57, 10) == [6] * 7 + [5] * 3
    with pytest.raises(DataError, match="at least one image per class"):
        long_tail_reference_indices(labels, 0.1, 9)
    with pytest.raises(DataError, match="leaves none for the biased set"):
        long_tail_reference_indices(labels, 0.1, 1800)
    with pytest.raises(DataError, match="reference_fraction must be in"):
        reference_size(100, 0.0)


def test_build_writes_both_sets_and_they_read_back_with_a_source_column(tmp_path):
    cfg = load_config(None, ["data.imbalance=long_tail_reference", "data.reference_count=50",
                             f"output_dir={tmp_path}"])
    assert cfg.dataset_path.name == "digits-lt0.1-ref50n-s0"
    build_data(cfg)
    assert train_data_path(cfg) == cfg.dataset_path / "biased"  # the score model's default
    biased = read_manifest(cfg.dataset_path / "biased")
    reference = read_manifest(cfg.dataset_path / "reference")
    assert reference.num_rows == 50 and biased.class_counts[0] > 10 * biased.class_counts[-1]
    both = read_datasets({"biased": cfg.dataset_path / "biased",
                          "reference": cfg.dataset_path / "reference"})
    assert sorted(set(both.source)) == ["biased", "reference"]
    assert (both.source == "reference").sum() == 50
    assert len(set(both.ids)) == len(both.ids)  # disjoint: no image in both
    observed = read_manifest(cfg.dataset_path / "observed")  # D_obs = D_bias U D_ref
    assert observed.num_rows == biased.num_rows + 50
    assert sorted(read_datasets({"o": cfg.dataset_path / "observed"}).ids) == sorted(both.ids)
    on_obs = load_config(None, ["data.imbalance=long_tail_reference", "data.reference_count=50",
                                f"output_dir={tmp_path}", "data.train_on=observed"])
    assert train_data_path(on_obs) == cfg.dataset_path / "observed"
    from debiaslab.methods.tiw_dsm import reference_share

    assert reference_share(on_obs) == 50 / (50 + biased.num_rows)
    assert reference_share(cfg) == 0.0
    build_data(cfg)  # reused: the manifest records the same recipe
    other = load_config(None, ["data.imbalance=long_tail_reference", "data.reference_count=60",
                               f"output_dir={tmp_path}",
                               f"data.dataset_dir={cfg.dataset_path}"])
    with pytest.raises(DataError, match="reference_count: 50 .built. vs 60 .config."):
        build_data(other)


def test_a_negative_count_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="data.reference_count: must be >= 0"):
        load_config(None, ["data.reference_count=-3"])


def test_a_joint_attribute_bias_skews_the_group_where_every_attribute_is_one(tmp_path):
    """bias_attribute bold+even: 90% of the biased set is bold AND even, the reference is
    balanced between that joint group and the rest; an unknown part is a one-line error."""
    from debiaslab.data.dataset import ImageDataset

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.imbalance=attribute_bias",
                             "data.bias_attribute=bold+even", "data.bias_ratio=0.9"])
    build_data(cfg)
    for name, share in (("biased", 0.9), ("reference", 0.5)):
        data = ImageDataset.load(cfg.dataset_path / name)
        joint = data.attributes.numpy().astype(bool).all(1)
        assert joint.mean() == pytest.approx(share, abs=0.01), name
    bad = load_config(None, [f"output_dir={tmp_path}", "data.imbalance=attribute_bias",
                             "data.bias_attribute=bold+nope", "name=bad"])
    with pytest.raises(DataError, match=r"unknown attribute 'nope'") as info:
        build_data(bad)
    assert "\n" not in str(info.value)
