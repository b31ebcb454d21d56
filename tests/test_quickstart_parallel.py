"""The quickstart's two experiments side by side (one spawned process each, one thread each)
give the same bits as running them one at a time with the same thread count."""

import pytest
import torch
from conftest import TINY

from debiaslab.checkpoints import load_checkpoint
from debiaslab.quickstart import quickstart_configs, run_experiments, side_by_side_plan

SMALL = TINY + ["train.steps=12", "train.log_every=4", "train.checkpoint_every=12",
                "sample.samplers=[ddim]", "sample.num_samples=10", "sample.steps=3",
                "sample.batch_size=10", "metrics.bootstrap=0"]


@pytest.mark.parametrize(("n", "cores", "plan"), [
    (2, 1, (1, 1)), (2, 2, (2, 1)), (2, 3, (2, 1)), (2, 16, (2, 8)), (3, 2, (2, 1)),
])
def test_plan_gives_each_experiment_a_process_while_cores_last(n, cores, plan):
    assert side_by_side_plan(n, cores) == plan


def test_plan_honours_a_chosen_process_count():
    assert side_by_side_plan(2, 2, processes=1) == (1, 2)  # one at a time, both cores each
    assert side_by_side_plan(2, 16, processes=5) == (2, 8)  # never more processes than runs


def tensors(state, prefix=""):
    """Every tensor of a nested checkpoint dict, by dotted key."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items()
                for k, v in tensors(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {}


def values(metrics):
    """The metrics that measure the models and samples (not the machine's speed)."""
    return {k: v for k, v in metrics.items() if not k.endswith("_per_sec")}


def test_side_by_side_equals_one_at_a_time_bit_for_bit(tmp_path, capfd):
    threads_before = torch.get_num_threads()
    alone = run_experiments(quickstart_configs(tmp_path / "alone", SMALL), processes=1,
                            threads=1, progress=False)
    assert torch.get_num_threads() == threads_before  # restored after the in-process runs
    beside = run_experiments(quickstart_configs(tmp_path / "beside", SMALL), processes=2,
                             threads=1, progress=False)
    out = capfd.readouterr().out  # the processes write to the file descriptor
    assert sorted(alone) == sorted(beside) == ["digits_lt_baseline", "digits_lt_debias"]
    for name in alone:
        assert f"[debiaslab] {name}: stage train: done in" in out  # labelled lines, per process
        a, b = (tensors(load_checkpoint(r[name].checkpoint)) for r in (alone, beside))
        assert sorted(a) == sorted(b) and any(k.startswith("ema") for k in a)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]}"
        assert values(alone[name].metrics) == values(beside[name].metrics)  # samples, eval
        assert {"data", "train", "sample", "evaluate"} <= set(beside[name].seconds)
    # the two models differ (they are not one model trained twice)
    base, debias = (tensors(load_checkpoint(beside[n].checkpoint)) for n in sorted(beside))
    assert any(not torch.equal(base[k], debias[k]) for k in base if k.startswith("model"))
