"""Statistical functions of pmet.evaluation.stats against scipy and hand-computed values."""

import math

import numpy as np
import pytest
from scipy import stats as st

from pmet.evaluation.stats import (
    bh,
    bootstrap_mean_ci,
    holm,
    mcnemar_exact,
    metric_ci,
    paired_bootstrap_ci,
    paired_comparison,
    proportion_ci,
    score_ci,
    score_of_means,
    sign_flip_test,
    value_kind,
)


def test_wilson_by_hand_and_never_zero_width():
    # Wilson, 20/20, z = 1.959964: centre = (1 + z²/40) / (1 + z²/20), half = z/(1+z²/20) * sqrt(z²/1600)
    z = st.norm.ppf(0.975)
    c = proportion_ci(20, 20)
    lo = (1 + z * z / 40) / (1 + z * z / 20) - z / (1 + z * z / 20) * math.sqrt(z * z / 1600)
    assert c.mean == 1.0 and c.high == pytest.approx(1.0) and c.low == pytest.approx(lo, abs=1e-9)
    assert 0.83 < c.low < 0.84  # 83.9%: 20/20 is not "100 (0.0)"
    c = proportion_ci(0, 1)
    assert c.low == 0.0 and 0.79 < c.high < 0.80
    k, n = 7, 30
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    c = proportion_ci(k, n)
    assert (c.low, c.high) == pytest.approx((centre - half, centre + half))
    # Clopper-Pearson 0/10: upper = 1 - (alpha/2)^(1/n)
    assert proportion_ci(0, 10, method="exact").high == pytest.approx(1 - 0.025**0.1)
    assert math.isnan(proportion_ci(0, 0).low)
    with pytest.raises(ValueError, match="successes"):
        proportion_ci(5, 3)


def test_bootstrap_mean_matches_scipy_and_stays_in_range():
    rng = np.random.default_rng(1)
    x = rng.beta(2, 5, size=300)
    ours = bootstrap_mean_ci(x, seed=3, bounded=True)
    ref = st.bootstrap((x,), np.mean, method="percentile", rng=np.random.default_rng(3), n_resamples=9999)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.method == "bootstrap"
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)  # seeded
    # all records perfect: the bootstrap is degenerate, the Wilson bound is not
    c = bootstrap_mean_ci(np.ones(20), bounded=True)
    assert (
        c.method == "wilson-bound"
        and c.high == pytest.approx(1.0)
        and c.low == pytest.approx(proportion_ci(20, 20).low)
    )
    # small n never leaves [0, 1] (a normal interval at n = 2 did: [0.26, 1.24])
    c = metric_ci([0.5, 1.0])
    assert 0 <= c.low < c.high <= 1
    assert math.isnan(metric_ci([600.0]).low)  # a magnitude from one record has no interval


def test_metric_ci_dispatches_on_value_kind():
    assert value_kind([0, 1, 1]) == "binary" and value_kind([0.5, 1]) == "fraction"
    assert value_kind([610.2, 600]) == "magnitude"
    c = metric_ci([1, 1, 0, 1])
    assert c.method == "wilson" and (c.low, c.high) == (proportion_ci(3, 4).low, proportion_ci(3, 4).high)
    with pytest.raises(ValueError, match="binary"):
        metric_ci([0.5], kind="binary")


def test_score_ci_recomputes_the_harmonic_mean():
    assert float(score_of_means([1.0, 0.5, 0.5])) == pytest.approx(st.hmean([1.0, 0.5, 0.5]))
    assert float(score_of_means([1.0, 0.0, 0.5])) == 0.0
    rng = np.random.default_rng(0)
    parts = np.stack([rng.integers(0, 2, 200), rng.random(200), rng.random(200)], axis=1).astype(float)
    c = score_ci(parts, seed=1)
    assert c.mean == pytest.approx(st.hmean(parts.mean(0)))
    assert c.low < c.mean < c.high and c.method == "bootstrap"
    flat = score_ci(np.ones((5, 3)))  # every record perfect
    assert flat.method == "component-bound" and flat.high == pytest.approx(1.0) and flat.low < 1.0


def test_mcnemar_exact_by_hand():
    a = [1, 1, 1, 1, 0, 1]
    b = [0, 0, 0, 0, 0, 1]
    r = mcnemar_exact(a, b)
    assert (r["n10"], r["n01"]) == (4, 0) and r["pvalue"] == pytest.approx(2 * 0.5**4)
    # 20/20 vs 16/20 with 4 discordant pairs: p = 0.125, not significant
    assert mcnemar_exact([1] * 20, [1] * 16 + [0] * 4)["pvalue"] == pytest.approx(0.125)
    assert mcnemar_exact([1, 0], [1, 0])["pvalue"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5], [1])


def test_sign_flip_exact_equals_scipy_permutation_test():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.3, 1, 10), rng.normal(0, 1, 10)
    ref = st.permutation_test(
        (x, y),
        lambda u, v, axis=-1: np.mean(u - v, axis=axis),
        permutation_type="samples",
        n_resamples=10_000,
        vectorized=True,
    )
    ours = sign_flip_test(x, y)
    assert ours["exact"] and ours["pvalue"] == pytest.approx(ref.pvalue)
    # Monte Carlo for larger n: close to scipy's
    x, y = rng.normal(0.2, 1, 60), rng.normal(0, 1, 60)
    ref = st.permutation_test(
        (x, y),
        lambda u, v, axis=-1: np.mean(u - v, axis=axis),
        permutation_type="samples",
        n_resamples=9999,
        vectorized=True,
        rng=np.random.default_rng(0),
    )
    assert sign_flip_test(x, y, seed=5)["pvalue"] == pytest.approx(ref.pvalue, abs=0.02)


def test_paired_bootstrap_and_comparison():
    rng = np.random.default_rng(4)
    base = rng.random(150)
    a, b = base + 0.1 + rng.normal(0, 0.05, 150), base
    lo, hi = paired_bootstrap_ci(a, b, seed=0)
    ref = st.bootstrap(
        (a, b),
        lambda u, v, axis=-1: np.mean(u - v, axis=axis),
        paired=True,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    w = ref.confidence_interval.high - ref.confidence_interval.low
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.1 * w)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.1 * w)
    r = paired_comparison(a, b)
    assert r["test"] == "sign-flip permutation" and r["pvalue"] < 0.001 and lo <= r["diff"] <= hi
    r = paired_comparison([1] * 20, [1] * 16 + [0] * 4)
    assert r["test"].startswith("exact McNemar") and r["pvalue"] == pytest.approx(0.125)
    assert r["diff"] == pytest.approx(0.2) and r["diff_ci"][1] > r["diff_ci"][0]
    # stratified: pairs are resampled within their sample (seed)
    r2 = paired_comparison(a, b, strata=[0] * 75 + [1] * 75)
    r = paired_comparison(a, b)
    assert r2["diff"] == pytest.approx(r["diff"]) and r2["diff_ci"][0] < r2["diff"] < r2["diff_ci"][1]
    # the Score of two editors on the same records
    pa = np.stack([np.ones(40), np.full(40, 0.9), np.full(40, 0.5)], 1)
    pb = np.stack([np.ones(40), np.full(40, 0.5), np.full(40, 0.5)], 1)
    pa[:5, 1] = 0.5
    s = paired_comparison(pa, pb, kind="score")
    assert s["diff"] == pytest.approx(st.hmean(pa.mean(0)) - st.hmean(pb.mean(0)))
    assert s["pvalue"] < 0.001 and s["diff_ci"][0] > 0


def test_holm_and_bh():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # Holm by hand: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06
    assert np.allclose(holm(p)[:4], [0.03, 0.06, 0.06, 0.02]) and math.isnan(holm(p)[4])
    assert np.allclose(bh(p)[:4], st.false_discovery_control(p[:4], method="bh"))
    assert holm([0.9, 0.8]).max() == 1.0
