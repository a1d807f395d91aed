"""Confidence intervals, harmonic mean and paired tests for evaluation summaries.

* :func:`mean_ci` ``method="normal"`` (default, as MEMIT/PMET report): ``mean ± z·s/√n`` with
  ``z = Φ⁻¹(0.975) ≈ 1.96`` and ``s`` the sample standard deviation (``ddof=1``).
  ``method="bootstrap"``: ``scipy.stats.bootstrap`` of the mean, BCa, 9,999 resamples, seeded
  (``rng=np.random.default_rng(seed)``); constant data give a zero-width interval.
* :func:`harmonic_mean`: equals ``scipy.stats.hmean`` for positive values and is 0 when any value is 0
  (the CounterFact "Score").
* :func:`paired_test`: two editors evaluated on the *same* records. Default ``"permutation"``: a paired
  sign-flip permutation test of the mean difference (``scipy.stats.permutation_test``,
  ``permutation_type="samples"``, two-sided, seeded; exact when ``2**n <= n_resamples``). It tests the
  quantity the tables report (the mean), and copes with the many ties of 0/1 per-record metrics.
  ``"wilcoxon"``: ``scipy.stats.wilcoxon`` signed-rank test (``zero_method="wilcox"``: zero differences are
  dropped). Both return the mean difference with its normal 95% CI.

Intervals the tables use (:func:`metric_ci`, one rule per kind of per-record value):

* ``"binary"`` (one 0/1 outcome per record, e.g. CounterFact efficacy: one rewrite prompt per record):
  :func:`proportion_ci`, the Wilson score interval (``method="exact"``: Clopper-Pearson), from
  ``scipy.stats.binomtest(...).proportion_ci``. Never of zero width for ``n >= 1``, always inside [0, 1].
* ``"fraction"`` (a value in [0, 1] per record that is a mean over several prompts or tokens:
  CounterFact generalization/specificity, zsRE token accuracies): a seeded percentile bootstrap over
  records (:func:`bootstrap_mean_ci`), which stays inside [0, 1]. Where every record has the same value the
  bootstrap has zero width; then the Wilson interval with the records as trials is used instead. It is a
  conservative interval for the mean of any [0, 1]-valued variable, since ``Var <= mu(1 - mu)`` with equality
  for a Bernoulli variable.
* ``"magnitude"`` (unbounded values: fluency, consistency, ``*_diff``): percentile bootstrap over records;
  no interval for ``n < 2``.
* the CounterFact Score (harmonic mean of three means): :func:`score_ci`, percentile bootstrap over records
  with the score recomputed on every resample; where that has zero width (all records agree), the harmonic
  mean of the three component intervals' ends (the score is increasing in each mean).

Paired comparisons of two editors on the *same* records (:func:`paired_comparison`): exact McNemar
(:func:`mcnemar_exact`) for 0/1 outcomes, the sign-flip permutation test (:func:`sign_flip_test`) for
anything else (any statistic of the paired data, the Score included: under the null hypothesis the two
editors' values of one record are exchangeable), with a seeded paired bootstrap CI of the difference
(:func:`paired_bootstrap_ci`). Both can be stratified (e.g. by the seed that chose the records: pairs are
never resampled or swapped across samples). Multiple claims: :func:`holm` (family-wise) and :func:`bh`
(false discovery rate) adjusted p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as st

__all__ = [
    "CI",
    "CI_METHOD_NOTE",
    "Z95",
    "bh",
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "compare_rows",
    "harmonic_mean",
    "holm",
    "mcnemar_exact",
    "mean_ci",
    "metric_ci",
    "normal_ci",
    "paired_bootstrap_ci",
    "paired_comparison",
    "paired_test",
    "proportion_ci",
    "score_ci",
    "score_of_means",
    "sign_flip_test",
    "value_kind",
]

Z95 = float(st.norm.ppf(0.975))


@dataclass(frozen=True)
class CI:
    mean: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def scaled(self, factor: float) -> CI:
        return CI(self.mean * factor, self.low * factor, self.high * factor, self.n, self.method, self.confidence)

    def as_dict(self) -> dict:
        return asdict(self)


def _clean(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[~np.isnan(a)]


def normal_ci(values, confidence: float = 0.95) -> CI:
    a = _clean(values)
    n = a.size
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, "normal", confidence)
    m = float(a.mean())
    if n == 1:
        return CI(m, math.nan, math.nan, 1, "normal", confidence)
    z = float(st.norm.ppf(0.5 + confidence / 2))
    h = z * float(a.std(ddof=1)) / math.sqrt(n)
    return CI(m, m - h, m + h, n, "normal", confidence)


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0, method: str = "BCa") -> CI:
    a = _clean(values)
    n = a.size
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, "bootstrap", confidence)
    m = float(a.mean())
    if n == 1 or np.all(a == a[0]):
        lo = hi = m if n > 1 else math.nan
        return CI(m, lo, hi, n, "bootstrap", confidence)
    res = st.bootstrap(
        (a,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # degenerate BCa: fall back to percentile
        res = st.bootstrap(
            (a,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
            vectorized=True,
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return CI(m, lo, hi, n, "bootstrap", confidence)


def mean_ci(values, method: str = "normal", confidence: float = 0.95, **kwargs) -> CI:
    """Mean of ``values`` (None/NaN dropped) with a ``confidence`` interval by ``method``."""
    if method == "normal":
        return normal_ci(values, confidence)
    if method == "bootstrap":
        return bootstrap_ci(values, confidence, **kwargs)
    raise ValueError(f"unknown CI method {method!r}; expected 'normal' or 'bootstrap'")


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (scipy.stats.hmean for positive inputs); 0 if any value is 0, NaN if any is NaN/negative."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or np.any(np.isnan(a)) or np.any(a < 0):
        return math.nan
    if np.any(a == 0):
        return 0.0
    return float(a.size / np.sum(1.0 / a))


def paired_test(a, b, method: str = "permutation", n_resamples: int = 9999, seed: int = 0) -> dict:
    """Paired test of ``mean(a - b) == 0`` for per-record values of two systems on the same records.

    ``a`` and ``b`` are aligned sequences (pairs where either is None/NaN are dropped).
    Returns ``{"method", "n", "mean_a", "mean_b", "mean_diff", "diff_ci", "statistic", "pvalue"}``.
    """
    x = np.asarray([np.nan if v is None else v for v in a], dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in b], dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length ({x.size} vs {y.size})")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = x - y
    out = {
        "method": method,
        "n": int(d.size),
        "mean_a": float(x.mean()) if d.size else math.nan,
        "mean_b": float(y.mean()) if d.size else math.nan,
        "mean_diff": float(d.mean()) if d.size else math.nan,
    }
    ci = normal_ci(d)
    out["diff_ci"] = (ci.low, ci.high)
    if d.size == 0 or np.all(d == 0):
        out.update(statistic=0.0, pvalue=1.0)
        return out
    if method == "permutation":
        res = st.permutation_test(
            (x, y),
            lambda u, v, axis=-1: np.mean(u - v, axis=axis),
            permutation_type="samples",
            alternative="two-sided",
            n_resamples=n_resamples,
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    elif method == "wilcoxon":
        res = st.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    else:
        raise ValueError(f"unknown paired test {method!r}; expected 'permutation' or 'wilcoxon'")
    out.update(statistic=float(res.statistic), pvalue=float(res.pvalue))
    return out


def compare_rows(rows_a, rows_b, metric: str, method: str = "permutation", **kwargs) -> dict:
    """:func:`paired_test` of one per-record metric of two result lists, matched by ``case_id``
    (records missing from either side, or lacking the metric, are dropped). Values stay fractions."""
    a = {r["case_id"]: r.get(metric) for r in rows_a if r is not None}
    b = {r["case_id"]: r.get(metric) for r in rows_b if r is not None}
    ids = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    out = paired_test([a[k] for k in ids], [b[k] for k in ids], method=method, **kwargs)
    out["metric"] = metric
    return out


# ---- intervals for the tables ---------------------------------------------------------------------------
CI_METHOD_NOTE = (
    "95% intervals: Wilson score interval for 0/1 per-record outcomes; seeded percentile bootstrap "
    "over records (9,999 resamples) for per-record fractions (Wilson bound where all records "
    "agree), fluency, consistency and the Score (recomputed on every resample)"
)


def proportion_ci(successes: int, n: int, confidence: float = 0.95, method: str = "wilson") -> CI:
    """Interval for a binomial proportion ``successes / n``: Wilson score (default) or ``"exact"``
    (Clopper-Pearson), by ``scipy.stats.binomtest``. Fractions in [0, 1]; NaN for ``n == 0``."""
    if method not in ("wilson", "exact"):
        raise ValueError(f"unknown proportion interval {method!r}; expected 'wilson' or 'exact'")
    n, k = int(n), int(round(successes))
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, method, confidence)
    if not 0 <= k <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    pci = st.binomtest(k, n).proportion_ci(confidence_level=confidence, method=method)
    return CI(k / n, float(pci.low), float(pci.high), n, method, confidence)


def _percentile_bootstrap(stat, arrays, n_resamples: int, confidence: float, seed: int, chunk: int = 500):
    """Percentile bootstrap of ``stat(*resampled arrays)``: the arrays (first axis = records) are resampled
    jointly (paired). ``arrays`` may be a list of strata, each a tuple of arrays: records are resampled
    within their stratum. ``stat`` gets arrays with a leading resample axis and returns one value per
    resample. Chunked, so 10,000 records x 9,999 resamples never sit in memory at once."""
    strata = arrays if isinstance(arrays, list) else [arrays]
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        parts = []
        for group in strata:
            n = group[0].shape[0]
            idx = rng.integers(0, n, size=(b, n))
            parts.append([a[idx] for a in group])
        joined = [np.concatenate([p[j] for p in parts], axis=1) for j in range(len(strata[0]))]
        draws.append(np.asarray(stat(*joined), dtype=np.float64))
    d = np.concatenate(draws)
    alpha = (1 - confidence) / 2
    return float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))


def bootstrap_mean_ci(
    values, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0, bounded: bool = False
) -> CI:
    """Mean with a seeded percentile-bootstrap interval over records. ``bounded``: values in [0, 1]; if the
    bootstrap has zero width (all values equal) the Wilson interval with the records as trials is returned
    instead (method ``"wilson-bound"``; conservative, see the module docstring)."""
    a = _clean(values)
    n = a.size
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, "bootstrap", confidence)
    m = float(a.mean())
    if bounded and (a.min() < 0 or a.max() > 1):
        raise ValueError("bounded=True needs per-record values in [0, 1]")
    if n > 1 and not np.all(a == a[0]):
        lo, hi = _percentile_bootstrap(lambda x: x.mean(axis=-1), (a,), n_resamples, confidence, seed)
        if hi > lo:
            return CI(m, lo, hi, n, "bootstrap", confidence)
    if bounded:
        lo, hi = _wilson_fractional(m, n, confidence)
        return CI(m, lo, hi, n, "wilson-bound", confidence)
    return CI(m, math.nan, math.nan, n, "bootstrap", confidence)


def _wilson_fractional(p: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval formula for a (possibly non-integer) success fraction ``p`` of ``n``."""
    z = float(st.norm.ppf(0.5 + confidence / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def value_kind(values) -> str:
    """``"binary"`` when every value is 0 or 1, ``"fraction"`` when all lie in [0, 1], else ``"magnitude"``."""
    a = _clean(values)
    if a.size and np.all((a == 0) | (a == 1)):
        return "binary"
    if a.size and a.min() >= 0 and a.max() <= 1:
        return "fraction"
    return "magnitude"


def metric_ci(values, kind: str | None = None, confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999) -> CI:
    """The table interval for one metric's per-record values (module docstring): ``kind`` is ``"binary"``,
    ``"fraction"`` or ``"magnitude"`` (default: :func:`value_kind` of the values)."""
    a = _clean(values)
    kind = kind or value_kind(a)
    if kind == "binary":
        if a.size and not np.all((a == 0) | (a == 1)):
            raise ValueError("kind='binary' needs 0/1 per-record values")
        return proportion_ci(int(a.sum()), a.size, confidence)
    if kind not in ("fraction", "magnitude"):
        raise ValueError(f"unknown metric kind {kind!r}; expected 'binary', 'fraction' or 'magnitude'")
    return bootstrap_mean_ci(a, confidence, n_resamples, seed, bounded=kind == "fraction")


def score_of_means(means, axis: int = -1):
    """CounterFact Score: harmonic mean of the (efficacy, generalization, specificity) means along ``axis``;
    0 where any of them is 0 (MEMIT's summarize.py)."""
    m = np.asarray(means, dtype=np.float64)
    with np.errstate(divide="ignore"):
        h = m.shape[axis] / (1.0 / m).sum(axis=axis)
    return np.where((m > 0).all(axis=axis), h, 0.0)


def score_ci(parts, confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999) -> CI:
    """Score with its interval from per-record ``parts`` (``[n_records, 3]``: efficacy, generalization,
    specificity per record, fractions): percentile bootstrap over records, the score recomputed on each
    resample; where that has zero width, the score of the component intervals' ends (module docstring)."""
    arr = np.asarray(parts, dtype=np.float64).reshape(-1, 3)
    n = arr.shape[0]
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, "bootstrap", confidence)
    s = float(score_of_means(arr.mean(axis=0)))
    if n > 1:
        lo, hi = _percentile_bootstrap(lambda x: score_of_means(x.mean(axis=-2)), (arr,), n_resamples, confidence, seed)
        if hi > lo:
            return CI(s, lo, hi, n, "bootstrap", confidence)
    ends = [metric_ci(arr[:, j], confidence=confidence, seed=seed, n_resamples=n_resamples) for j in range(3)]
    if any(not math.isfinite(c.low) for c in ends):
        return CI(s, math.nan, math.nan, n, "bootstrap", confidence)
    lo = float(score_of_means([c.low for c in ends]))
    hi = float(score_of_means([c.high for c in ends]))
    return CI(s, lo, hi, n, "component-bound", confidence)


# ---- paired comparisons ---------------------------------------------------------------------------------
def _strata(a, b, strata) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same shape ({x.shape} vs {y.shape})")
    if strata is None:
        return [(x, y)]
    g = np.asarray(strata)
    if g.shape[0] != x.shape[0]:
        raise ValueError("strata must give one label per record")
    return [(x[g == s], y[g == s]) for s in sorted(set(g.tolist()))]


def mcnemar_exact(a, b) -> dict:
    """Exact McNemar test for paired 0/1 outcomes: with ``n10`` records where only ``a`` succeeds and ``n01``
    where only ``b`` does, ``p = binomtest(n10, n10 + n01, 1/2)`` two-sided (1 when there is no discordant
    pair)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same shape ({x.shape} vs {y.shape})")
    if not np.all(np.isin(x, (0, 1)) & np.isin(y, (0, 1))):
        raise ValueError("McNemar's test needs 0/1 outcomes")
    n10, n01 = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    p = 1.0 if n10 + n01 == 0 else float(st.binomtest(n10, n10 + n01, 0.5).pvalue)
    return {"n10": n10, "n01": n01, "pvalue": p}


def sign_flip_test(a, b, statistic=None, strata=None, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Paired permutation test: each record's two values are swapped (a sign flip of its difference) at
    random; two-sided ``p = P(|T*| >= |T|)``. ``statistic(u, v)`` maps arrays with a leading resample axis to
    one value per resample (default: mean of ``u - v`` over records). Exact (all ``2**n`` flips) when that
    is at most ``n_resamples``, else Monte Carlo with ``p = (1 + #{|T*| >= |T|}) / (n_resamples + 1)``.
    ``strata``: a label per record; statistics see the records in stratum order."""
    groups = _strata(a, b, strata)
    x = np.concatenate([g[0] for g in groups])
    y = np.concatenate([g[1] for g in groups])
    stat = statistic or (lambda u, v: (u - v).mean(axis=1))
    t = float(np.asarray(stat(x[None], y[None])).reshape(-1)[0])
    n = x.shape[0]
    if n == 0:
        return {"statistic": math.nan, "pvalue": math.nan, "exact": True}
    tol = 1e-12 * max(1.0, abs(t))
    extra = (1,) * (x.ndim - 1)
    if 2**n <= n_resamples:
        codes = np.arange(2**n)[:, None] >> np.arange(n)[None, :] & 1
        flips = codes.astype(bool).reshape(2**n, n, *extra)
        u, v = np.where(flips, y[None], x[None]), np.where(flips, x[None], y[None])
        d = np.asarray(stat(u, v), dtype=np.float64)
        return {"statistic": t, "pvalue": float(np.mean(np.abs(d) >= abs(t) - tol)), "exact": True}
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 500):
        k = min(500, n_resamples - start)
        flips = (rng.random((k, n)) < 0.5).reshape(k, n, *extra)
        u, v = np.where(flips, y[None], x[None]), np.where(flips, x[None], y[None])
        hits += int((np.abs(np.asarray(stat(u, v), dtype=np.float64)) >= abs(t) - tol).sum())
    return {"statistic": t, "pvalue": (1 + hits) / (n_resamples + 1), "exact": False}


def paired_bootstrap_ci(
    a, b, statistic=None, strata=None, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(a, b)`` (default: mean difference) resampling records as
    pairs (within their stratum). Zero width only when every resample gives the same value."""
    groups = _strata(a, b, strata)
    if sum(g[0].shape[0] for g in groups) == 0:
        return (math.nan, math.nan)
    stat = statistic or (lambda u, v: (u - v).mean(axis=1))
    return _percentile_bootstrap(stat, [g for g in groups], n_resamples, confidence, seed)


def paired_comparison(
    a, b, kind: str | None = None, strata=None, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> dict:
    """Compare two editors' per-record values of one metric on the same records (aligned; pairs with a
    missing value dropped). ``kind`` ``"binary"`` -> exact McNemar, otherwise the sign-flip permutation
    test; both with the paired bootstrap CI of the mean difference. ``kind="score"``: ``a``, ``b`` are
    ``[n, 3]`` (efficacy, generalization, specificity per record) and the compared quantity is the Score
    (difference of the harmonic means; a stratified Score averages the strata's scores weighted by size).
    Returns ``{"test", "n", "mean_a", "mean_b", "diff", "diff_ci", "pvalue"}`` (fractions, not percent)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same shape ({x.shape} vs {y.shape})")
    keep = ~(np.isnan(x).reshape(x.shape[0], -1).any(1) | np.isnan(y).reshape(y.shape[0], -1).any(1))
    x, y = x[keep], y[keep]
    g = None if strata is None else np.asarray(strata)[keep]
    n = int(x.shape[0])
    if kind == "score":
        labels = g if g is not None else np.zeros(n, dtype=int)
        sizes = [int((labels == s).sum()) for s in sorted(set(labels.tolist()))]

        def one(u):  # u: [B, n, 3] in stratum order -> size-weighted mean of the strata's scores
            out, start = 0.0, 0
            for size in sizes:
                out = out + size * score_of_means(u[:, start : start + size].mean(axis=1))
                start += size
            return out / max(n, 1)

        def stat(u, v):
            return one(u) - one(v)

        order = np.argsort(labels, kind="stable")
        xs, ys = x[order], y[order]
        if n == 0:
            return {
                "test": "none",
                "n": 0,
                "mean_a": math.nan,
                "mean_b": math.nan,
                "diff": math.nan,
                "diff_ci": (math.nan, math.nan),
                "pvalue": math.nan,
            }
        mean_a, mean_b = float(one(xs[None])[0]), float(one(ys[None])[0])
        test = sign_flip_test(xs, ys, stat, None, n_resamples, seed)
        ci = (
            (0.0, 0.0)
            if np.all(x == y)
            else paired_bootstrap_ci(xs, ys, stat, labels[order], confidence, n_resamples, seed)
        )
        return {
            "test": "sign-flip permutation (Score)",
            "n": n,
            "mean_a": mean_a,
            "mean_b": mean_b,
            "diff": mean_a - mean_b,
            "diff_ci": ci,
            "pvalue": test["pvalue"],
        }
    kind = kind or (value_kind(np.concatenate([x, y])) if n else "magnitude")
    out = {"n": n, "mean_a": float(x.mean()) if n else math.nan, "mean_b": float(y.mean()) if n else math.nan}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if n == 0:
        return {"test": "none", **out, "diff_ci": (math.nan, math.nan), "pvalue": math.nan}
    if kind == "binary":
        r = mcnemar_exact(x, y)
        test, p = f"exact McNemar ({r['n10']}:{r['n01']} discordant)", r["pvalue"]
    else:
        test, p = "sign-flip permutation", sign_flip_test(x, y, None, g, n_resamples, seed)["pvalue"]
    if np.all(x == y):
        ci = (0.0, 0.0)
    else:
        ci = paired_bootstrap_ci(x, y, None, g, confidence, n_resamples, seed)
    return {"test": test, **out, "diff_ci": ci, "pvalue": p}


def _adjust(pvalues, step) -> np.ndarray:
    """Apply ``step(sorted p-values, m)`` to the non-NaN p-values in ascending order; NaN entries stay NaN
    (they are left out of the family), results are capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        out[order] = np.minimum(step(p[order], ok.size), 1.0)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error): sort ascending, ``p_(i) * (m - i + 1)``, running
    maximum, capped at 1. NaN p-values are left out of the family and stay NaN."""
    return _adjust(pvalues, lambda p, m: np.maximum.accumulate(p * (m - np.arange(m))))


def bh(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate); NaN entries stay NaN."""
    return _adjust(pvalues, lambda p, m: np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1])


def format_ci(summary: dict, m: str, digits: int = 1) -> str:
    """Metric ``m`` of a summary as ``"v (±half CI width)"`` (``"v"`` without a finite CI, ``""`` if absent)."""
    if m not in summary:
        return ""
    v = summary[m]
    c = summary.get(f"{m}_ci")
    if c is None or c[0] is None or not np.isfinite(c[0]):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} (±{(c[1] - c[0]) / 2:.{digits}f})"


def ci_by_rule(vals, ci: str, confidence: float, seed: int, n_resamples: int) -> CI:
    """One metric's interval (fractions) by a summary's ``ci`` rule: ``"auto"`` (:func:`metric_ci`: Wilson
    for 0/1 outcomes, bootstrap otherwise), ``"bootstrap"`` or another :func:`mean_ci` method."""
    if ci == "auto":
        return metric_ci(vals, confidence=confidence, seed=seed, n_resamples=n_resamples)
    kw = {"seed": seed, "n_resamples": n_resamples} if ci == "bootstrap" else {}
    return mean_ci(vals, method=ci, confidence=confidence, **kw)
