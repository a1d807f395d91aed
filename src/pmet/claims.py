"""``tables/claims.md``: the paper's qualitative claims beside our measured numbers, judged by code.

Every table/figure notebook saves its raw run summaries as ``tables/<artifact>.json`` (means, CIs, n's);
:func:`write_claims` reads whatever of those exist (and ``tables/fig2_similarity_<model>.csv``) and writes
one Markdown table: claim, the paper's numbers, ours, and a verdict:

* **holds** -- the difference has the paper's sign and the 95% CIs do not overlap;
* **does not hold** -- the opposite sign with non-overlapping CIs;
* **inconclusive (CIs overlap)** -- otherwise; **inconclusive (no CI)** for a number without a CI (the score
  under the normal approximation), whatever the difference;
* Fig. 3 (many edit counts): **holds** / **does not hold** when the CIs separate in one direction only at
  one point or more, **mixed** when they separate in both directions at different points.

Nothing here is typed by hand except the paper's numbers (Tables 1-3 of the paper, GPT-J rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .report import metric_key
from .runspec import model_label, precision_of_runs

# Paper, Table 1 (GPT-J, 10,000 CounterFact edits): MEMIT vs PMET
PAPER_T1 = {"memit": {"score": 85.8, "efficacy": 98.9, "generalization": 88.6, "specificity": 73.7,
                      "fluency": 619.9, "consistency": 40.1},
            "pmet": {"score": 86.2, "efficacy": 99.5, "generalization": 92.8, "specificity": 71.4,
                     "fluency": 620.0, "consistency": 40.6}}
# Paper, Table 2 (GPT-J, 10,000 zsRE edits)
PAPER_T2 = {"memit": {"efficacy": 96.7, "generalization": 89.7, "specificity": 26.6},
            "pmet": {"efficacy": 96.9, "generalization": 90.6, "specificity": 26.7}}
# Paper, Table 3 at 1K edits: sign of (ablation - PMET) per metric
PAPER_T3_1K = {
    "pmet-no-attn-delta": {"score": -0.3, "efficacy": -0.2, "generalization": +0.5, "specificity": -1.0,
                           "fluency": +0.2, "consistency": +0.5},
    "pmet-with-attn-weights": {"score": -0.3, "efficacy": 0.0, "generalization": +0.7, "specificity": -1.2,
                               "fluency": -0.2, "consistency": +0.4},
    "pmet-even-spread": {"score": -2.2, "efficacy": -0.2, "generalization": -9.9, "specificity": +3.1,
                         "fluency": -0.1, "consistency": -3.1},
}
METRICS = ["score", "efficacy", "generalization", "specificity", "fluency", "consistency"]


def _label(summary: dict, metric: str) -> str:
    """The metric's name in a claim: ``consistency (proxy)`` where our number is the offline proxy."""
    proxy = metric_key(summary, metric) == "consistency_proxy" and summary.get("consistency_proxy") is not None
    return "consistency (proxy)" if proxy else metric


def verdict(a: dict, b: dict, metric: str, expect_sign: int) -> tuple[str, float | None]:
    """Judge ``sign(a[metric] - b[metric]) == expect_sign`` with the CIs (see module docstring)."""
    ka, kb = metric_key(a, metric), metric_key(b, metric)
    if a.get(ka) is None or b.get(kb) is None:
        return "not measured", None
    diff = a[ka] - b[kb]
    ca, cb = a.get(f"{ka}_ci"), b.get(f"{kb}_ci")
    if not (ca and cb and ca[0] is not None and cb[0] is not None):
        return "inconclusive (no CI)", diff
    separated = ca[0] > cb[1] or cb[0] > ca[1]
    if not separated or expect_sign == 0:
        return "inconclusive (CIs overlap)", diff
    return ("holds" if (diff > 0) == (expect_sign > 0) else "does not hold"), diff


def _load(tables: Path, pattern: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(tables.glob(pattern))}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def claims_frame(out_dir: str | Path) -> pd.DataFrame:
    tables = Path(out_dir) / "tables"
    rows = []
    # Fig. 2: after the middle layers the FFN's before/after similarity is higher and steadier than MHSA's
    for path in sorted(tables.glob("fig2_similarity_*.csv")):
        df = pd.read_csv(path)
        model = path.stem.replace("fig2_similarity_", "")
        n = df.layer.max() + 1
        late = df[df.layer >= n // 2]
        for metric in ("cosine", "jaccard"):
            ffn = late[late.component == "FFN"][metric]
            att = late[late.component == "MHSA"][metric]
            higher = ffn.mean() > att.mean()
            steadier = ffn.std() < att.std()
            rows.append({"artifact": "Fig. 2", "model": model,
                         "claim": f"second half of the layers: FFN {metric} higher and steadier than MHSA's",
                         "paper": "GPT-J: FFN stabilises after layer 15, MHSA keeps changing",
                         "ours": f"FFN mean {ffn.mean():.3f} sd {ffn.std():.3f}; MHSA mean {att.mean():.3f} "
                                 f"sd {att.std():.3f}",
                         "verdict": "holds" if higher and steadier else
                         ("does not hold" if not higher and not steadier else "partly (one of two)")})
    # Tables 1 and 2: PMET vs MEMIT
    for stem, grid in {**_load(tables, "table1_*.json"), **_load(tables, "table2_*.json")}.items():
        paper = PAPER_T1 if stem.startswith("table1") else PAPER_T2
        for model, runs in grid.items():
            label_model = model_label(model, precision_of_runs(runs.values()))
            # against MEMIT as published, and against memit-ffn (its value on m^L) where that row exists
            p = runs.get("pmet")
            for other, label in (("memit", "MEMIT"), ("memit-ffn", "MEMIT (δ on m^L)")):
                m = runs.get(other)
                if not p or not m or "unavailable" in p or "unavailable" in m:
                    continue
                for metric in paper["pmet"]:
                    sign = 1 if paper["pmet"][metric] > paper["memit"][metric] else -1
                    v, diff = verdict(p, m, metric, sign)
                    rows.append({"artifact": "Table 1" if stem.startswith("table1") else "Table 2",
                                 "model": label_model,
                                 "claim": f"PMET {'>' if sign > 0 else '<'} {label} on {_label(p, metric)}",
                                 "paper": f"{paper['pmet'][metric]} vs {paper['memit'][metric]}",
                                 "ours": f"{_fmt(p.get(metric_key(p, metric)))} vs "
                                         f"{_fmt(m.get(metric_key(m, metric)))} "
                                         f"(n={p.get('n_edits')})",
                                 "verdict": v})
    # Table 3: direction of each ablation (paper's 1K-edit row)
    for stem, runs in _load(tables, "table3_*.json").items():
        by = _by_size(runs)
        for n in sorted({n for n, _ in by}):
            ref = by.get((n, "pmet"))
            if ref is None:
                continue
            for method, signs in PAPER_T3_1K.items():
                s = by.get((n, method))
                if s is None:
                    continue
                for metric, d in signs.items():
                    if d == 0:
                        continue
                    v, diff = verdict(s, ref, metric, 1 if d > 0 else -1)
                    rows.append({"artifact": "Table 3", "model": _model_label(runs.values(), stem, "table3_"),
                                 "claim": f"{method} vs PMET on {_label(ref, metric)}: {'↑' if d > 0 else '↓'}",
                                 "paper": f"{d:+.1f} (1K edits)", "ours": f"{_fmt(diff) if diff is None else f'{diff:+.1f}'} "
                                 f"({n} edits)", "verdict": v})
    # Fig. 3: "except for being slightly inferior to MEMIT in specificity, PMET outperforms all baselines in
    # all other metrics" over the sweep's edit counts
    rows += _sweep_claims(tables)
    return pd.DataFrame(rows, columns=["artifact", "model", "claim", "paper", "ours", "verdict"])


def _model_label(summaries, stem: str, prefix: str) -> str:
    """The model and precision of an artifact's runs, read from the runs' metadata (the precision never from
    the file name; the model from it only for summaries that name none)."""
    summaries = list(summaries)
    models = sorted({s.get("model") for s in summaries if isinstance(s, dict) and s.get("model")})
    return model_label("/".join(models) or stem.removeprefix(prefix), precision_of_runs(summaries))


def _by_size(runs: dict) -> dict:
    """``{(n_edits, method): summary}`` from the ``"n|method"`` keys :func:`save_summaries` writes."""
    out = {}
    for key, summary in runs.items():
        if "|" in key:
            n, method = key.split("|", 1)
            out[int(n), method] = summary
    return out


def _sweep_claims(tables: Path) -> list[dict]:
    """One row per (baseline, metric): at how many of the sweep's points PMET is above / below the baseline
    with separated CIs. *holds* = separated in the paper's direction at one point at least and never
    against it; *does not hold* = separated against it at one point at least and never for it; else
    inconclusive."""
    names = {"ft": "FT-W", "mend": "MEND", "rome": "ROME", "memit": "MEMIT"}
    rows = []
    for stem, runs in _load(tables, "fig3_sweep_*.json").items():
        by = _by_size(runs)
        sizes = sorted({n for n, m in by if m == "pmet"})
        for base, label in names.items():
            for metric in ("efficacy", "generalization", "specificity"):
                sign = -1 if (base == "memit" and metric == "specificity") else 1
                pts = [(by[(n, "pmet")], by[(n, base)]) for n in sizes if (n, base) in by]
                if not pts:
                    continue
                verdicts = [verdict(p, b, metric, sign)[0] for p, b in pts]
                n_for, n_against = verdicts.count("holds"), verdicts.count("does not hold")
                v = ("holds" if n_for and not n_against else "does not hold" if n_against and not n_for
                     else "inconclusive (CIs overlap)" if not n_for else "mixed")
                rows.append({"artifact": "Fig. 3", "model": _model_label(runs.values(), stem, "fig3_sweep_"),
                             "claim": f"PMET {'>' if sign > 0 else '<'} {label} on {metric} across edit counts",
                             "paper": "GPT-J, 1 to 10,000 edits",
                             "ours": f"{n_for} of {len(pts)} points in the paper's direction with separated CIs, "
                                     f"{n_against} against ({sizes[0]} to {sizes[-1]} edits)",
                             "verdict": v})
    return rows


def save_summaries(obj: dict, name: str, out_dir: str | Path) -> Path:
    """Raw run summaries of an artifact, for :func:`write_claims` (tuple keys become ``"a|b"``)."""
    def norm(d):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else k): (norm(v) if isinstance(v, dict) and
                not any(m in v for m in ("efficacy", "unavailable")) else v) for k, v in d.items()}

    path = Path(out_dir) / "tables" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(norm(obj), indent=1, sort_keys=True, default=str))
    return path


def write_claims(out_dir: str | Path) -> pd.DataFrame:
    """Recompute ``tables/claims.md`` from every result file present in ``out_dir``."""
    from .report import markdown_table

    df = claims_frame(out_dir)
    path = Path(out_dir) / "tables" / "claims.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# The paper's claims against our measurements\n\nGenerated by `pmet.claims.write_claims` from the "
              "result files in `tables/` (never edited by hand). Verdicts: *holds* = the paper's sign with "
              "non-overlapping 95% CIs; *does not hold* = the opposite sign with non-overlapping CIs; "
              "*inconclusive* = CIs overlap. Paper numbers are GPT-J's; ours are the models named.\n\n")
    path.write_text(header + (markdown_table(df) if len(df) else "(no results yet)") + "\n")
    return df
