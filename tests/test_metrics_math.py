"""Metric math on feature arrays (docs/algorithms.md §6) against independent references:
closed forms, scipy sqrtm, scikit-learn's LOF/kNN, the prdc package and hand-written O(n^2)
loops."""

import math

import numpy as np
import prdc as prdc_package
import pytest
import scipy.linalg
from conftest import one_line
from scipy.spatial.distance import cdist
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

from debiaslab.errors import ConfigError, DataError
from debiaslab.metrics import fid as fid_mod
from debiaslab.metrics.fairness import (
    attribute_distribution,
    fairness_discrepancy,
    joint_fairness_discrepancy,
    joint_labels,
)
from debiaslab.metrics.fid import (
    fid_from_features,
    frechet_distance,
    frechet_distance_batch,
    frechet_distance_sqrtm,
    gaussian_stats,
    inception_score,
    kid,
    load_stats,
    save_stats,
)
from debiaslab.metrics.minority import (
    avg_knn,
    local_outlier_factor,
    minority_summary,
    rarity_score,
)
from debiaslab.metrics.per_class import head_tail_split, per_class_metrics
from debiaslab.metrics.prdc import k_nearest_radii, prdc

REL = 1e-6  # fast FID vs sqrtm reference
LOF_REL = 1e-8
EXACT = 1e-12


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------ FID
def test_gaussian_stats_match_numpy_cov_and_chunking(rng, monkeypatch):
    x = rng.standard_normal((257, 9)).astype(np.float32) * 3 + 5
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), atol=1e-12)
    monkeypatch.setattr(fid_mod, "STATS_CHUNK_ROWS", 50)  # several row chunks
    mu2, sigma2 = gaussian_stats(x)
    np.testing.assert_allclose(mu2, mu, atol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, atol=1e-12)
    assert np.array_equal(sigma2, sigma2.T)


def test_fid_closed_form_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    d1, d2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 0.5, 0.5, 1.0])
    # commuting covariances: Tr((S1 S2)^1/2) = sum sqrt(d1 d2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    got = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert rel_err(got, expected) < 1e-12


def test_fid_closed_form_non_commuting_2x2():
    # a 2x2 matrix M with positive eigenvalues: Tr(M^1/2) = sqrt(Tr M + 2 sqrt(det M))
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert rel_err(frechet_distance(mu1, s1, mu2, s2), expected) < 1e-12


def test_fid_closed_form_full_population_covariances(rng):
    d = 12
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean))
    assert rel_err(frechet_distance(mu1, s1, mu2, s2), expected) < 1e-10
    # sampled features converge to the population value
    x = rng.standard_normal((40_000, d)) @ a.T + mu1
    y = rng.standard_normal((40_000, d)) @ b.T + mu2
    pop = frechet_distance(mu1, a @ a.T, mu2, b @ b.T)
    assert abs(fid_from_features(x, y) - pop) < 0.02 * pop


@pytest.mark.parametrize("n1,n2,d", [(500, 400, 64), (40, 300, 64), (300, 30, 64),
                                     (20, 25, 64), (20, 20, 16)])
def test_fast_fid_matches_sqrtm_reference(rng, n1, n2, d):
    """Full-rank and singular (N < D) covariances, either side or both."""
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    a = rng.standard_normal((n1, d))
    b = rng.standard_normal((n2, d)) @ mix + 0.3
    stats = (*gaussian_stats(a), *gaussian_stats(b))
    fast, ref = frechet_distance(*stats), frechet_distance_sqrtm(*stats)
    assert rel_err(fast, ref) < REL, (fast, ref)
    assert rel_err(fid_from_features(a, b), ref) < REL


def test_fid_identical_and_batch(rng):
    x = rng.standard_normal((200, 8))
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9
    mus = rng.standard_normal((5, 8))
    sigmas = np.stack([gaussian_stats(rng.standard_normal((n, 8)))[1] for n in (5, 9, 50, 3, 100)])
    batch = frechet_distance_batch(mu, sigma, mus, sigmas)
    loop = [frechet_distance(mu, sigma, m, s) for m, s in zip(mus, sigmas)]
    np.testing.assert_allclose(batch, loop, rtol=1e-9)


def test_stats_roundtrip_and_errors(tmp_path, rng):
    mu, sigma = gaussian_stats(rng.standard_normal((30, 4)))
    meta = {"extractor": "digits", "reference": "digits-full", "sha256": "ab12", "n": 30}
    path = save_stats(tmp_path / "ref.npz", mu, sigma, {**meta, "n": np.int64(30)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp file left
    mu2, sigma2, meta2 = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta2 == meta
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # no meta: still readable
    assert load_stats(tmp_path / "pytorch_fid.npz")[2] == {}
    with pytest.raises(DataError) as exc:
        load_stats(tmp_path / "missing.npz")
    assert "missing.npz" in one_line(exc)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError) as exc:
        load_stats(tmp_path / "bad.npz")
    assert "bad.npz" in one_line(exc)
    np.savez(tmp_path / "wrong.npz", mu=mu, sigma=sigma[:2])
    with pytest.raises(DataError) as exc:
        load_stats(tmp_path / "wrong.npz")
    assert "wrong.npz" in one_line(exc)


# ------------------------------------------------------------------------------------ KID
def direct_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018 with k(a, b) = (a.b / D + 1)^3, written as explicit double loops."""
    def k(a, b):
        return (float(np.dot(a, b)) / len(a) + 1.0) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_unbiased_mmd(rng):
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 5)) + 0.4
    mean, std = kid(x, y, num_subsets=1, subset_size=9)
    assert abs(mean - direct_mmd2_unbiased(x, y)) < 1e-12 and std == 0.0
    # subset_size is capped at min(N_a, N_b)
    assert kid(x, y[:6], num_subsets=3, subset_size=1000) == kid(x, y[:6], num_subsets=3,
                                                                 subset_size=6)


def test_kid_same_vs_shifted_distribution(rng):
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same, same_std = kid(a, b, num_subsets=20, subset_size=300)
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)


# ------------------------------------------------------------------------------------- IS
def test_inception_score_extremes(rng):
    num_classes, splits = 7, 5
    mean, std = inception_score(np.zeros((70, num_classes)), splits=splits)  # uniform
    assert abs(mean - 1.0) < 1e-12 and std < 1e-12
    onehot = np.eye(num_classes)[np.arange(70) % num_classes]  # each split holds each class twice
    mean, std = inception_score(onehot, splits=splits, from_logits=False)
    assert abs(mean - num_classes) < 1e-9 and std < 1e-9
    mean, _ = inception_score(50.0 * onehot, splits=splits)  # near one-hot logits
    assert abs(mean - num_classes) < 1e-6


def test_inception_score_matches_entropy_reference(rng):
    from scipy.stats import entropy

    logits = rng.standard_normal((103, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    size = 103 // 4
    ref = [np.exp(np.mean([entropy(p, probs[i * size:(i + 1) * size].mean(0))
                           for p in probs[i * size:(i + 1) * size]])) for i in range(4)]
    mean, std = inception_score(logits, splits=4)
    assert abs(mean - np.mean(ref)) < 1e-12 and abs(std - np.std(ref)) < 1e-12
    assert abs(inception_score(probs, splits=4, from_logits=False)[0] - mean) < 1e-12


# ----------------------------------------------------------------------------------- PRDC
@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_prdc_matches_prdc_package(rng, k):
    real = rng.standard_normal((300, 16))
    fake = rng.standard_normal((250, 16)) * 1.2 + 0.3
    ours = prdc(real, fake, k=k)
    ref = prdc_package.compute_prdc(real, fake, nearest_k=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert abs(ours[name] - ref[name]) < EXACT, (name, ours[name], ref[name])


def test_prdc_float32_chunked_matches_package(rng, monkeypatch):
    from debiaslab.metrics import prdc as prdc_mod

    real = rng.standard_normal((200, 8)).astype(np.float32)
    fake = (rng.standard_normal((150, 8)) + 0.5).astype(np.float32)
    monkeypatch.setattr(prdc_mod, "DIST_CHUNK_BYTES", 8 * 150 * 7)  # 7-row blocks
    ours = prdc(real, fake, k=4)
    ref = prdc_package.compute_prdc(real.astype(np.float64), fake.astype(np.float64), 4)
    assert all(abs(ours[n] - ref[n]) < EXACT for n in ours)


def test_k_nearest_radii_match_sklearn(rng):
    x = rng.standard_normal((120, 6))
    dist, _ = NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x)  # itself first
    np.testing.assert_allclose(k_nearest_radii(x, 5), dist[:, 5], rtol=1e-10)


# ------------------------------------------------------------------------------- minority
@pytest.mark.parametrize("k", [5, 20])
def test_lof_matches_sklearn_novelty(rng, k):
    real = rng.standard_normal((400, 10))
    fake = np.concatenate([rng.standard_normal((150, 10)), 3 + rng.standard_normal((50, 10))])
    ref = -LocalOutlierFactor(n_neighbors=k, novelty=True).fit(real).score_samples(fake)
    ours = local_outlier_factor(real, fake, k=k)
    assert np.max(np.abs(ours - ref) / ref) < LOF_REL
    assert ours[150:].mean() > ours[:150].mean()  # the shifted points are outliers


def test_avg_knn_and_rarity_match_brute_force(rng):
    real, fake = rng.standard_normal((150, 5)), rng.standard_normal((80, 5)) * 1.5
    dist, _ = NearestNeighbors(n_neighbors=5).fit(real).kneighbors(fake)
    np.testing.assert_allclose(avg_knn(real, fake, k=5), dist.mean(1), rtol=1e-10)
    rr = cdist(real, real)
    radii = np.sort(rr, axis=1)[:, 3]  # k = 3 (column 0 is the point itself)
    df = cdist(fake, real)
    expected = np.array([radii[df[i] <= radii].min() if (df[i] <= radii).any() else np.nan
                         for i in range(len(fake))])
    ours = rarity_score(real, fake, k=3)
    assert np.array_equal(np.isnan(ours), np.isnan(expected))
    assert 0 < np.isnan(ours).sum() < len(fake)  # both defined and undefined points occur
    np.testing.assert_allclose(ours[~np.isnan(ours)], expected[~np.isnan(expected)], rtol=1e-10)


def test_minority_summary_shares_computations_consistently(rng):
    real, fake = rng.standard_normal((200, 6)), rng.standard_normal((90, 6)) * 1.3
    s = minority_summary(real, fake, k=5, lof_k=20)
    rarity = rarity_score(real, fake, k=5)
    assert abs(s["avg_knn"] - avg_knn(real, fake, 5).mean()) < 1e-12
    assert abs(s["lof"] - local_outlier_factor(real, fake, 20).mean()) < 1e-12
    assert abs(s["rarity"] - np.nanmean(rarity)) < 1e-12
    assert s["rarity_defined_fraction"] == np.mean(~np.isnan(rarity))


# ------------------------------------------------------------------------------- fairness
def test_fairness_discrepancy_hand_computed():
    pred = np.array([0] * 7 + [1] * 3)
    assert abs(fairness_discrepancy(pred, 2) - math.sqrt(0.2**2 + 0.2**2)) < 1e-15
    np.testing.assert_allclose(attribute_distribution(pred, 2), [0.7, 0.3])
    assert fairness_discrepancy(np.arange(12) % 4, 4) == 0.0
    assert abs(fairness_discrepancy(np.zeros(5, int), 4) - math.sqrt(1 - 1 / 4)) < 1e-15
    scores = np.eye(2)[pred] + 0.1  # argmax of class scores
    assert fairness_discrepancy(scores, 2) == fairness_discrepancy(pred, 2)


def test_joint_fairness_discrepancy():
    attrs = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 1], [1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(joint_labels(attrs), [0, 1, 2, 3, 3, 3, 0, 0])
    p = np.array([3, 1, 1, 3]) / 8
    assert abs(joint_fairness_discrepancy(attrs) - np.linalg.norm(p - 0.25)) < 1e-15


# ------------------------------------------------------------------------------ per-class
NUM_CLASSES, PER_CLASS, DIM = 10, 100, 64
MISMATCHED = 9


@pytest.fixture(scope="module")
def class_data():
    g = np.random.default_rng(7)
    means = 2 * g.standard_normal((NUM_CLASSES, DIM))
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    real = means[labels] + g.standard_normal((len(labels), DIM))
    fake = means[labels] + g.standard_normal((len(labels), DIM))
    fake[labels == MISMATCHED] += 1.0  # this class's fakes come from a shifted distribution
    return real, labels, fake, labels.copy()


@pytest.fixture(scope="module")
def class_result(class_data):
    real, rl, fake, fl = class_data
    return per_class_metrics(real, rl, fake, fl, [f"c{i}" for i in range(NUM_CLASSES)],
                             k=5, head_classes=[0, 1, 2, 3, 4], bootstrap=200, seed=3)


def test_per_class_matched_beats_mismatched(class_result):
    fids = [r.fid for r in class_result.rows]
    recalls = [r.recall for r in class_result.rows]
    assert max(fids[:MISMATCHED]) < fids[MISMATCHED]
    assert min(recalls[:MISMATCHED]) > recalls[MISMATCHED]
    # CIs separate the mismatched class from every matched one
    assert max(r.fid_ci[1] for r in class_result.rows[:MISMATCHED]) < \
        class_result.rows[MISMATCHED].fid_ci[0]


def test_per_class_point_values_match_direct_metrics(class_data, class_result):
    real, rl, fake, fl = class_data
    for c in (0, MISMATCHED):
        row = class_result.rows[c]
        assert rel_err(row.fid, fid_from_features(real[rl == c], fake[fl == c])) < 1e-9
        ref = prdc_package.compute_prdc(real[rl == c], fake[fl == c], nearest_k=5)["recall"]
        assert abs(row.recall - ref) < EXACT
        assert (row.n_real, row.n_fake, row.k_used) == (PER_CLASS, PER_CLASS, 5)


def test_per_class_cis_contain_point_and_groups(class_result):
    for row in class_result.rows:
        for metric in ("fid", "recall"):
            lo, hi = getattr(row, f"{metric}_ci")
            assert lo <= getattr(row, metric) <= hi, (row.index, metric)
        assert row.group == ("head" if row.index < 5 else "tail")
    groups = class_result.groups
    assert set(groups) == {"all", "head", "tail"}
    assert groups["head"]["fid"].classes == [0, 1, 2, 3, 4]
    tail = np.mean([r.fid for r in class_result.rows[5:]])
    assert abs(groups["tail"]["fid"].value - tail) < 1e-12
    for g in groups.values():
        for agg in g.values():
            assert agg.ci[0] <= agg.value <= agg.ci[1]
    summary = class_result.summary()
    assert summary["tail_fid"] > summary["head_fid"]  # the mismatched class is a tail class
    rows = class_result.as_rows()
    assert rows[0]["class"] == "c0" and rows[0]["group"] == "head"
    assert len(rows[0]["fid_ci"]) == 2


def test_per_class_plain_percentile_is_biased(class_data):
    """Documented behaviour: resampling with replacement biases the replicates (FID up, recall
    down), so the plain percentile interval of a matched class lies above its point FID."""
    real, rl, fake, fl = class_data
    res = per_class_metrics(real, rl, fake, fl, [str(i) for i in range(NUM_CLASSES)],
                            bootstrap=50, ci_method="percentile")
    row = res.rows[0]
    assert row.fid < row.fid_ci[0] and row.boot_bias["fid"] > 0 > row.boot_bias["recall"]


def test_per_class_deterministic(class_data, class_result):
    real, rl, fake, fl = class_data
    names = [f"c{i}" for i in range(NUM_CLASSES)]
    again = per_class_metrics(real, rl, fake, fl, names, head_classes=[0, 1, 2, 3, 4], seed=3)
    assert again.as_rows() == class_result.as_rows()
    assert again.summary() == class_result.summary()
    other = per_class_metrics(real, rl, fake, fl, names, head_classes=[0, 1, 2, 3, 4], seed=4)
    assert other.rows[0].fid == class_result.rows[0].fid
    assert other.rows[0].fid_ci != class_result.rows[0].fid_ci


def test_per_class_tiny_classes_are_none_with_reason(rng):
    real = rng.standard_normal((60, 8))
    rl = np.array([0] * 30 + [1] * 27 + [2] * 2 + [3])
    fake = rng.standard_normal((43, 8))
    fl = np.array([0] * 30 + [1] * 3 + [2] * 10)  # class 1: 3 fakes, class 3: none
    res = per_class_metrics(real, rl, fake, fl, ["a", "b", "c", "d"], k=5,
                            head_classes=[0, 1], bootstrap=20)
    a, b, c, d = res.rows
    assert a.k_used == 5 and not a.reasons
    assert b.k_used == 2 and "k reduced from 5 to 2" in b.reasons["recall"]
    assert b.fid is not None and b.recall is not None  # 3 fakes in 8-d: singular, still defined
    assert c.fid is not None and c.n_real == 2
    assert d.fid is None and d.recall is None and d.fid_ci is None
    assert "0 fake" in d.reasons["fid"] and "0 fake" in d.reasons["recall"]
    assert res.groups["tail"]["fid"].excluded == [3]

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, float):
            assert math.isfinite(value)

    walk(res.as_rows())
    walk(res.summary())


def test_head_tail_split():
    counts = [500, 20, 300, 300, 5, 100]
    assert head_tail_split(counts) == ([0, 2, 3], [1, 4, 5])
    # ties broken by class index: classes 2 and 3 tie, the lower index goes to the head
    assert head_tail_split(counts, head_fraction=0.34) == ([0, 2], [1, 3, 4, 5])
    assert head_tail_split([5, 5]) == ([0], [1])
    with pytest.raises(ConfigError):
        head_tail_split(counts, head_fraction=1.0)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("call", [
    lambda: gaussian_stats(np.zeros((0, 4))),
    lambda: gaussian_stats(np.zeros((1, 4))),
    lambda: gaussian_stats(np.zeros(4)),
    lambda: gaussian_stats(np.full((3, 2), np.nan)),
    lambda: fid_from_features(np.ones((5, 3)), np.ones((5, 4))),
    lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)),
    lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),
    lambda: kid(np.ones((1, 3)), np.ones((5, 3))),
    lambda: kid(np.ones((4, 3)), np.ones((5, 2))),
    lambda: inception_score(np.ones((5, 3)), splits=10),
    lambda: inception_score(np.ones((10, 3)), splits=2, from_logits=False),
    lambda: prdc(np.zeros((0, 3)), np.ones((10, 3))),
    lambda: prdc(np.ones((10, 3)), np.ones((10, 4))),
    lambda: k_nearest_radii(np.ones((3, 2)), k=5),
    lambda: local_outlier_factor(np.ones((10, 2)), np.ones((4, 2)), k=20),
    lambda: rarity_score(np.ones((10, 2)), np.ones((4, 3))),
    lambda: avg_knn(np.ones((3, 2)), np.ones((4, 2)), k=5),
    lambda: fairness_discrepancy([], 2),
    lambda: fairness_discrepancy([0, 2], 2),
    lambda: joint_fairness_discrepancy(np.zeros((0, 2))),
    lambda: joint_fairness_discrepancy(np.array([[0, 2]])),
    lambda: per_class_metrics(np.ones((4, 2)), [0, 1, 0, 5], np.ones((2, 2)), [0, 1], ["a", "b"]),
    lambda: per_class_metrics(np.ones((4, 2)), [0, 1], np.ones((2, 2)), [0, 1], ["a", "b"]),
    lambda: per_class_metrics(np.ones((4, 2)), [0] * 4, np.ones((2, 3)), [0, 1], ["a", "b"]),
])
def test_bad_inputs_raise_one_line_data_error(call):
    with pytest.raises(DataError) as exc:
        call()
    one_line(exc)


def test_too_few_points_message_states_counts_and_k(rng):
    with pytest.raises(DataError) as exc:
        prdc(rng.standard_normal((20, 3)), rng.standard_normal((4, 3)), k=5)
    msg = one_line(exc)
    assert "k=5" in msg and "real: 20" in msg and "fake: 4" in msg
