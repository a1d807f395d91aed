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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Sequence

import numpy as np
from scipy import stats as st

__all__ = ["CI", "Z95", "mean_ci", "normal_ci", "bootstrap_ci", "harmonic_mean", "paired_test", "compare_rows"]

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


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0,
                 method: str = "BCa") -> CI:
    a = _clean(values)
    n = a.size
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0, "bootstrap", confidence)
    m = float(a.mean())
    if n == 1 or np.all(a == a[0]):
        lo = hi = m if n > 1 else math.nan
        return CI(m, lo, hi, n, "bootstrap", confidence)
    res = st.bootstrap((a,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method=method,
                       rng=np.random.default_rng(seed), vectorized=True)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # degenerate BCa: fall back to percentile
        res = st.bootstrap((a,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                           method="percentile", rng=np.random.default_rng(seed), vectorized=True)
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
    out = {"method": method, "n": int(d.size), "mean_a": float(x.mean()) if d.size else math.nan,
           "mean_b": float(y.mean()) if d.size else math.nan, "mean_diff": float(d.mean()) if d.size else math.nan}
    ci = normal_ci(d)
    out["diff_ci"] = (ci.low, ci.high)
    if d.size == 0 or np.all(d == 0):
        out.update(statistic=0.0, pvalue=1.0)
        return out
    if method == "permutation":
        res = st.permutation_test((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis),
                                  permutation_type="samples", alternative="two-sided", n_resamples=n_resamples,
                                  vectorized=True, rng=np.random.default_rng(seed))
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


def format_ci(summary: dict, m: str, digits: int = 1) -> str:
    """Metric ``m`` of a summary as ``"v (±half CI width)"`` (``"v"`` without a finite CI, ``""`` if absent)."""
    if m not in summary:
        return ""
    v = summary[m]
    c = summary.get(f"{m}_ci")
    if c is None or c[0] is None or not np.isfinite(c[0]):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} (±{(c[1] - c[0]) / 2:.{digits}f})"
