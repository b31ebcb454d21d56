"""`debiaslab compare`: runs read back from a real MLflow store, seeds pooled per group, t-interval
CIs, Markdown + PNG written and logged, one-line errors for bad selections."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from debiaslab.cli import main
from debiaslab.compare import GROUP_TAG, METHOD_TAG, SEED_TAG, Summary, compare
from debiaslab.errors import ConfigError, DebiaslabError
from debiaslab.tracking import Tracker, find_runs, resolve_tracking_uri

FID = {"base": [30.0, 34.0, 29.0], "cbdm": [25.0, 27.5, 26.0]}
RECALL = {"base": [0.40, 0.45, 0.42], "cbdm": [0.50, 0.48, 0.55]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = resolve_tracking_uri(root)
    for group, loss in (("base", "denoising"), ("cbdm", "cbdm")):
        for seed in range(3):
            tags = {GROUP_TAG: group, SEED_TAG: str(seed), METHOD_TAG: loss}
            with Tracker(root, "cmp", f"{group}-s{seed}", tags=tags, tracking_uri=uri) as t:
                t.log_params({"diffusion.loss": loss, "train.seed": seed,
                              "name": f"{group}-s{seed}", "cbdm.tau": 1.0})
                t.log_metrics({"eval/fid": FID[group][seed], "eval/recall": RECALL[group][seed]})
    with pytest.raises(RuntimeError):  # a failed run is never compared
        with Tracker(root, "cmp", "broken", tags={GROUP_TAG: "base"}, tracking_uri=uri) as t:
            t.log_metrics({"eval/fid": 1.0})
            raise RuntimeError("boom")
    return root, uri


def test_direction_of_metrics():
    from debiaslab.compare import lower_is_better

    assert all(lower_is_better(m) for m in ("eval/fid", "eval/tail_fid", "eval/fd_class",
                                            "eval/ddim/head_fid", "eval/kid"))
    assert not any(lower_is_better(m) for m in ("eval/recall", "eval/tail_recall",
                                                "eval/classifier_score", "eval/precision"))


def test_summary_is_a_t_interval():
    values = [30.0, 34.0, 29.0]
    s = Summary.of(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert s.mean == pytest.approx(31.0) and s.half_width == pytest.approx(half)
    assert s.format() == f"31 ± {half:.2g}"
    assert Summary.of([5.0]).format() == "5" and Summary.of([]).format() == "-"


def test_compare_groups_seeds_and_marks_the_best(store, tmp_path):
    root, uri = store
    result = compare(uri, experiments=["cmp"], metrics=["eval/fid", "eval/recall"],
                     out_dir=tmp_path, log_to="cmp")
    by_name = {g.name: g for g in result.groups}
    assert sorted(by_name) == ["base", "cbdm"]
    assert len(by_name["base"].runs) == 3  # the FAILED run is left out
    assert by_name["cbdm"].metrics["eval/fid"].mean == pytest.approx(np.mean(FID["cbdm"]))
    assert by_name["base"].metrics["eval/recall"].values == pytest.approx(RECALL["base"])
    assert by_name["cbdm"].setting == {"diffusion.loss": "cbdm"}  # seed and name are not settings
    rows = [line for line in result.markdown.splitlines() if line.startswith("| cbdm")]
    assert rows and rows[0].count("**") == 4  # best FID (lowest) and best recall (highest)
    assert result.files["plot"].stat().st_size > 0 and result.files["markdown"].is_file()
    logged = find_runs(uri, experiments=["cmp"], tags={"debiaslab.kind": "comparison"})
    assert [r.run_id for r in logged] == [result.mlflow_run_id]
    again = compare(uri, experiments=["cmp"], metrics=["eval/fid"], out_dir=tmp_path)
    assert sum(len(g.runs) for g in again.groups) == 6  # the comparison run is not an input


def test_compare_by_run_ids_and_params(store, tmp_path):
    _, uri = store
    runs = find_runs(uri, experiments=["cmp"], tags={METHOD_TAG: "cbdm"})
    result = compare(uri, run_ids=[r.run_id for r in runs[:2]], metrics=["eval/fid"],
                     by=["diffusion.loss"], out_dir=tmp_path)
    assert [g.name for g in result.groups] == ["diffusion.loss=cbdm"]
    assert result.groups[0].metrics["eval/fid"].n == 2


def test_bad_selections_are_one_line_errors(store, tmp_path, capsys):
    root, uri = store
    with pytest.raises(DebiaslabError, match="experiment .nope. not found.*known: .*cmp"):
        compare(uri, experiments=["nope"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="no run reports eval/is; reported: eval/fid"):
        compare(uri, experiments=["cmp"], metrics=["eval/is"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="no finished runs"):
        compare(uri, experiments=["cmp"], tags={GROUP_TAG: "other"}, out_dir=tmp_path)
    code = main(["compare", "--output-dir", str(root), "-e", "cmp", "--tag", "oops",
                 "--no-log"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "KEY=VALUE" in err[0]


def test_cli_prints_the_table(store, tmp_path, capsys):
    root, _ = store
    code = main(["compare", "--output-dir", str(root), "-e", "cmp", "--metrics", "eval/fid",
                 "--out", str(tmp_path), "--no-log"])
    out = capsys.readouterr().out
    assert code == 0 and "| base |" in out and "eval/fid ↓" in out
    assert (tmp_path / "compare.png").is_file()
