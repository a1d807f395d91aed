"""Writing the paper's artifacts: tables as CSV + Markdown + LaTeX, figures as PNG + PDF (the notebooks'
setup and their guarded outputs are :mod:`pmet.notebook`).

Every table carries a caption that states the model, the number of edits and the number of evaluated
records, and every written file is listed in the ``manifest.json`` of its folder (what made it, when, with
which parameters), so a figure can be traced back to the run that produced it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .editing.registry import display_labels


def _record(folder: Path, files: list[Path], meta: dict) -> None:
    """Note in ``<folder>/manifest.json`` what wrote each file, when, with which parameters."""
    import pmet

    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for f in files:
        data[f.name] = {"written": stamp, "pmet": pmet.__version__, **meta}
    manifest.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def save_table(df: pd.DataFrame, name: str, out_dir: str | Path, caption: str, meta: dict | None = None) -> list[Path]:
    """Write ``tables/<name>.{csv,md,tex}``; the caption goes into the Markdown and LaTeX versions."""
    out = Path(out_dir)
    tdir = out / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    note = df.attrs.get("interval_note")
    if note and note not in caption:  # every table names how its intervals were made
        caption = f"{caption.rstrip()} {note}"
    paths = [tdir / f"{name}.csv", tdir / f"{name}.md", tdir / f"{name}.tex"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(f"{caption}\n\n{markdown_table(df)}\n")
    latex = df.to_latex(index=False, escape=True, caption=caption, label=f"tab:{name}")
    paths[2].write_text(latex)
    _record(tdir, paths, {"caption": caption, **(meta or {})})
    return paths


def save_figure(fig, name: str, out_dir: str | Path, meta: dict | None = None) -> list[Path]:
    """Write ``figures/<name>.png`` (150 dpi) and ``.pdf``."""
    out = Path(out_dir)
    fdir = out / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    paths = [fdir / f"{name}.png", fdir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _record(fdir, paths, meta or {})
    return paths


def fmt_ci(mean: float, half_width: float | None, digits: int = 1) -> str:
    """``"99.5 (0.1)"`` as in the paper's tables (mean and 95% CI half-width)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if half_width is None or pd.isna(half_width):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({half_width:.{digits}f})"


def fmt_interval(mean, ci, digits: int = 1) -> str:
    """``"99.5 [98.9, 99.8]"``: the mean and its 95% interval (intervals may be asymmetric: Wilson, bootstrap);
    ``"99.5 [no CI]"`` where the summary has none (one record of an unbounded metric, or an older summary)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if not ci or ci[0] is None or pd.isna(ci[0]) or pd.isna(ci[1]):
        return f"{mean:.{digits}f} [no CI]"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def interval_note(summaries) -> str:
    """The caption sentence naming how the intervals of these run summaries were made."""
    methods = {s.get("ci_method") for s in summaries if isinstance(s, dict) and "unavailable" not in s}
    methods.discard(None)
    if methods <= {"auto"}:
        from .evaluation.stats import CI_METHOD_NOTE

        return CI_METHOD_NOTE + "."
    names = {
        "normal": "normal approximation (mean ± 1.96·s/√n; older summary)",
        "bootstrap": "BCa bootstrap",
        "auto": "per metric (Wilson / percentile bootstrap)",
    }
    return "95% intervals: " + "; ".join(names.get(m, m) for m in sorted(methods)) + "."


# ---- the paper's tables and figures from run summaries (see pmet.experiments) --------------------------
DISPLAY = display_labels()  # {method: table label}, in the paper's row order (pmet.editing.registry)
CF_COLUMNS = [
    ("Score", "score"),
    ("Efficacy", "efficacy"),
    ("Generalization", "generalization"),
    ("Specificity", "specificity"),
    ("Fluency", "fluency"),
    ("Consistency", "consistency"),
]
ZSRE_COLUMNS = [("Efficacy", "efficacy"), ("Generalization", "generalization"), ("Specificity", "specificity")]


def metric_key(summary: dict, metric: str) -> str:
    """Where a summary keeps ``metric``: its own name, except consistency, which is ROME's metric or the offline
    proxy (``consistency_proxy``) when ROME's reference texts are missing."""
    if metric == "consistency" and "consistency" not in summary:
        return "consistency_proxy"
    return metric


def _half_width(summary: dict, key: str) -> float | None:
    ci = summary.get(f"{key}_ci")
    if not ci or ci[0] is None:
        return None
    return (ci[1] - ci[0]) / 2


def grid_table(grid: dict, dataset: str = "counterfact") -> pd.DataFrame:
    """Table 1 / Table 2 layout from ``run_grid`` output: one block of rows per model, "mean [95% interval]"
    cells (:func:`fmt_interval`; the method in ``df.attrs["interval_note"]``, added to the caption by
    :func:`save_table`), and the number of records each metric rests on. Unavailable editors keep their row with
    the reason."""
    columns = CF_COLUMNS if dataset == "counterfact" else ZSRE_COLUMNS
    proxy = any("consistency_proxy" in s for runs in grid.values() for s in runs.values())
    portability = any("portability" in s for runs in grid.values() for s in runs.values())
    rows = []
    for model, runs in grid.items():
        for method, s in runs.items():
            row = {
                "Model": model,
                "Editor": model if method == "none" else DISPLAY.get(method, method),
                "Edits": s.get("n_edits"),
            }
            for head, key in columns:
                if key == "consistency":
                    key = metric_key(s, key)
                    head = "Consistency (proxy)" if proxy else head
                row[head] = "n/a" if "unavailable" in s else fmt_interval(s.get(key), s.get(f"{key}_ci"))
            row["n records"] = (
                "-"
                if "unavailable" in s
                else "/".join(str(s.get(f"{metric_key(s, k)}_n", 0)) for _, k in columns if k != "score")
            )
            if portability:  # EasyEdit's one-hop questions, where records have one (pmet.evaluation.portability)
                row["Portability"] = (
                    "n/a" if "unavailable" in s else fmt_interval(s.get("portability"), s.get("portability_ci"))
                )
                row["n portability"] = s.get("portability_n", 0)
            if "unavailable" in s:
                row["note"] = s["unavailable"]
            rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["interval_note"] = interval_note([s for runs in grid.values() for s in runs.values()])
    return df


def ablation_table(summaries: dict, reference: str = "pmet") -> pd.DataFrame:
    """Table 3 layout: ``summaries[(n_edits, method)]``; cells "mean [95% interval]", each ablation's cells
    also the signed difference of means to PMET at the same edit count (↑ / ↓ / →; the paired test of that
    difference is in ``tables/claims.md``)."""
    rows = []
    order = {m: i for i, m in enumerate([reference, *DISPLAY])}  # the paper's row order
    for (n, method), s in sorted(summaries.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        ref = summaries.get((n, reference))
        row = {"Edits": n, "Editor": DISPLAY.get(method, method)}
        for head, key in CF_COLUMNS:
            key = metric_key(s, key)
            v = s.get(key)
            if v is None:
                row[head] = "n/a"
                continue
            cell = fmt_interval(v, s.get(f"{key}_ci"))
            if ref is not None and method != reference and ref.get(key) is not None:
                d = v - ref[key]
                arrow = "→" if abs(d) < 0.05 else ("↑" if d > 0 else "↓")
                cell += f" ({arrow}{abs(d):.1f})" if arrow != "→" else " (→)"
            row[head] = cell
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["interval_note"] = interval_note(summaries.values())
    return df


def size_note(used: int, default: int, reason: str | None = None) -> str:
    """A caption sentence for an artifact rendered with fewer edits than its notebook's default (empty when
    ``used >= default``), so that a reduced rendering says so wherever its table or figure goes."""
    if used >= default:
        return ""
    return f" Fewer edits than the notebook's default of {default:,}" + (f": {reason}." if reason else ".")


# ---- the tables' captions: one pure function per notebook, called by the notebook and by `pmet report` --------
# (the regeneration passes the configuration the notebook recorded in the manifest, :func:`table_caption`, so a
# regenerated table has the caption its notebook would write; save_table adds the interval sentence)
def grid_sizes(grid: dict) -> list[int]:
    """The distinct edit counts of a ``{model: {method: summary}}`` grid (Tables 1-2), ascending."""
    return sorted({s.get("n_edits") for runs in grid.values() for s in runs.values()})


def _counts(sizes) -> list[int]:
    """Edit counts (a list, or a ``{model: n}`` dict), distinct and ascending."""
    return sorted(set(sizes.values() if isinstance(sizes, dict) else sizes))


PAPER_SIZES_TEXT = {  # what the paper ran, for every caption (Tables 1-3, Fig. 3 of the paper; Fig. 4 = Table 3's runs)
    "table1": "10,000 CounterFact edits on GPT-J and on GPT-NeoX",
    "table2": "10,000 zsRE edits on GPT-J",
    "table3": "1,000 / 5,623 / 10,000 CounterFact edits on GPT-J",
    "fig3": "17 sizes up to N = 10,000 CounterFact edits on GPT-J",
    "fig4": "Table 3's ablation runs on GPT-J (1,000 to 10,000 edits)",
}


EXTENDED_POOL_NOTE = (
    " Records: every full-field CounterFact record outside counterfact-val first, then reduced ones (one"
    " paraphrase, one neighbourhood prompt, no generation prompts; the extended pool), so fluency and consistency"
    " come from the full-field records only."
)


def paper_size(kind: str) -> str:
    """The caption sentence that says what size the paper used for the artifact ``kind``."""
    return f" The paper: {PAPER_SIZES_TEXT[kind]}."


def _precision_clause(value_autocast: str | None) -> str:
    return f" value vectors optimised under {value_autocast} autocast;" if value_autocast else ""


def _values_clause(value_autocast: str | None) -> str:
    """``", values bfloat16"`` (the figures' captions); empty for float32 values."""
    return f", values {value_autocast}" if value_autocast else ""


def _overrides_clause(overrides: dict | None) -> str:
    """``" overrides {'a': 1, 'v_fast': True};"``: keys sorted and values as JSON data, so the notebook's
    parameter and the manifest's copy of it (:func:`pmet.runspec.config_of`) read the same."""
    if not overrides:
        return ""
    plain = json.loads(json.dumps(overrides, default=str))
    return f" overrides {dict(sorted(plain.items()))};"


def table1_caption(
    models,
    sizes,
    value_autocast: str | None,
    overrides: dict | None,
    size_reason: str | None,
    default_n: int,
    mend_steps: int | None,
    pool: str | None = None,
) -> str:
    """Table 1's caption: the edit counts ``sizes`` (:func:`grid_sizes`) on ``models``, the values' precision,
    hyperparameter overrides, the record pool where it is the extended one, the reduced size against
    ``default_n`` (:func:`size_note`) and a shortened MEND."""
    n = _counts(sizes)
    return (
        f"Table 1: {'/'.join(map(str, n))} CounterFact edits on {', '.join(models)};"
        f"{_precision_clause(value_autocast)}{_overrides_clause(overrides)} mean [95% interval]; "
        "'n records' = records behind efficacy/generalization/specificity/fluency/consistency."
        + (EXTENDED_POOL_NOTE if pool == "extended" else "")
        + paper_size("table1")
        + size_note(max(n), default_n, size_reason)
        + (
            f" MEND's editor trained for {mend_steps} steps only (shorter than its hyperparameter file's)."
            if mend_steps
            else ""
        )
    )


def table2_caption(
    models, sizes, value_autocast: str | None, size_reason: str | None, default_n: int, overrides: dict | None = None
) -> str:
    """Table 2's caption (zsRE): as :func:`table1_caption`, without MEND's training."""
    n = _counts(sizes)
    return (
        f"Table 2: {'/'.join(map(str, n))} zsRE edits on {', '.join(models)};{_precision_clause(value_autocast)}"
        f"{_overrides_clause(overrides)} mean [95% interval]; "
        "'n records' = records behind efficacy/generalization/specificity."
        + paper_size("table2")
        + size_note(max(n), default_n, size_reason)
    )


def table3_caption(
    model: str, edit_counts, value_autocast: str | None, overrides: dict | None = None, pool: str | None = None
) -> str:
    """Table 3's caption: the ablations of ``model`` at ``edit_counts``, the values' precision, overrides, the
    record pool where it is the extended one."""
    return (
        f"Table 3: PMET ablations on {model}, CounterFact, {'/'.join(map(str, edit_counts))} edits;"
        f"{_precision_clause(value_autocast)}{_overrides_clause(overrides)} differences to PMET in parentheses."
        + (EXTENDED_POOL_NOTE if pool == "extended" else "")
        + paper_size("table3")
    )


def fig3_caption(
    model: str,
    N: int,
    value_autocast: str | None,
    size_reason: str | None,
    default_n_max: int,
    overrides: dict | None = None,
    pool: str | None = None,
) -> str:
    """The caption of Fig. 3's data table: the sweep up to ``N`` edits, the values' precision, hyperparameter
    overrides, the record pool where it is the extended one, the reduced size against ``default_n_max``."""
    precision = _values_clause(value_autocast)
    over = "," + _overrides_clause(overrides).rstrip(";") if overrides else ""
    return (
        f"Figure 3 data: {model}, CounterFact, n_i = exp(ln({N}) i/16) edits{precision}{over}."
        + (EXTENDED_POOL_NOTE if pool == "extended" else "")
        + paper_size("fig3")
        + size_note(N, default_n_max, size_reason)
    )


def fig4_caption(model: str, n_edits: int, value_autocast: str | None = None) -> str:
    """The caption of Fig. 4's data table."""
    precision = _values_clause(value_autocast)
    return (
        f"Figure 4 data: Frobenius norm of Δ per edited weight, {model}, {n_edits} CounterFact edits{precision}."
        + paper_size("fig4")
    )


def table_caption(kind: str, config: dict, summaries: dict) -> str:
    """The caption the notebook ``kind`` writes for a table made with ``config`` (the configuration it recorded
    in the manifest: its parameters and resolved sizes) from the runs ``summaries`` (the layout of its summaries
    file, ``tables/<name>.json``): the notebook's own call of its caption function. KeyError where ``config``
    lacks a parameter the caption needs (an entry written before the notebook had it)."""
    c = config
    if kind == "table1":
        return table1_caption(
            c.get("models") or [c["model"]],
            grid_sizes(summaries),
            c["value_autocast"],
            c["overrides"],
            c["size_reason"],
            c["default_n"],
            c["mend_steps"],
            c.get("pool"),
        )
    if kind == "table2":
        return table2_caption(
            c.get("models") or [c["model"]],
            grid_sizes(summaries),
            c["value_autocast"],
            c["size_reason"],
            c["default_n"],
            c.get("overrides"),
        )
    if kind == "table3":
        return table3_caption(c["model"], c["edit_counts"], c["value_autocast"], c.get("overrides"), c.get("pool"))
    if kind == "fig3_sweep":
        return fig3_caption(
            c["model"],
            c["N"],
            c["value_autocast"],
            c["size_reason"],
            c["default_n_max"],
            c.get("overrides"),
            c.get("pool"),
        )
    if kind == "fig4_delta_norms":
        return fig4_caption(c["model"], c["n_edits"], c.get("value_autocast"))
    raise KeyError(f"no caption function for {kind!r}")


def sweep_sizes(N: int, steps: int = 16) -> list[int]:
    """The paper's edit counts n_i = exp(ln(N) * i / steps), i = 0..steps (rounded, duplicates dropped)."""
    import math

    return sorted({max(1, round(math.exp(math.log(N) * i / steps))) for i in range(steps + 1)})


def sweep_frame(summaries: dict) -> pd.DataFrame:
    """Long frame (method, n_edits, metric, value, low, high) from ``summaries[(n_edits, method)]``."""
    rows = []
    for (n, method), s in summaries.items():
        if "unavailable" in s:
            continue
        for head, key in CF_COLUMNS:
            key = metric_key(s, key)
            if s.get(key) is None:
                continue
            ci = s.get(f"{key}_ci") or (None, None)
            rows.append(
                {
                    "method": DISPLAY.get(method, method),
                    "n_edits": n,
                    "metric": head,
                    "value": s[key],
                    "low": ci[0],
                    "high": ci[1],
                }
            )
    df = pd.DataFrame(rows, columns=["method", "n_edits", "metric", "value", "low", "high"])
    df.attrs["interval_note"] = interval_note(summaries.values())
    return df


# one fixed, clearly distinct colour per editor in every figure (PMET red, MEMIT blue)
METHOD_COLORS = {
    "PMET": "#d62728",
    "MEMIT": "#1f77b4",
    "ROME": "#2ca02c",
    "MEND": "#9467bd",
    "FT-W": "#7f7f7f",
    "MEMIT (δ on m^L)": "#17becf",
    "w/o δ^a": "#ff7f0e",
    "w/ W_O^MHSA": "#8c564b",
    "Even spread": "#bcbd22",
    "Unedited": "#000000",
}


def method_colors(methods) -> dict:
    """:data:`METHOD_COLORS`, with a colour from a qualitative palette for any other editor."""
    import seaborn as sns

    methods = sorted(set(methods))
    extra = iter(sns.color_palette("tab10", 10)[::-1])
    return {m: METHOD_COLORS.get(m) or next(extra) for m in methods}


def plot_sweep(frame: pd.DataFrame, title: str = ""):
    """Fig. 3: one panel per metric, metric vs number of edits on a log x-axis, one line per editor, its 95%
    interval as a band over the points that have one (a point without an interval, e.g. fluency of one
    record, interrupts the band there instead of removing it)."""
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [h for h, _ in CF_COLUMNS if h in set(frame.metric)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    palette = method_colors(frame.method)
    styles = {"PMET": "-", "MEMIT": "--"}
    for ax, metric in zip(axes[0], metrics):
        sub = frame[frame.metric == metric]
        for method, g in sub.groupby("method"):
            g = g.sort_values("n_edits")
            ax.plot(
                g.n_edits,
                g.value,
                marker="o",
                ms=3,
                label=method,
                color=palette[method],
                ls=styles.get(method, "-"),
                lw=1.8 if method in styles else 1.2,
            )
            low, high = g.low.astype(float).to_numpy(), g.high.astype(float).to_numpy()
            ok = ~(np.isnan(low) | np.isnan(high))
            if ok.any():
                ax.fill_between(
                    g.n_edits.to_numpy(dtype=float),
                    np.where(ok, low, np.nan),
                    np.where(ok, high, np.nan),
                    alpha=0.15,
                    color=palette[method],
                    lw=0,
                )
        ax.set_xscale("log")
        ax.set_title(metric)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="editor", title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def delta_norm_frame(summaries: dict) -> pd.DataFrame:
    """Fig. 4 data: ‖Δ‖_F per edited weight from run summaries ``{method: summary}`` (weights named
    ``...layers.<l>.<module>.weight``; ``attn``/``mlp`` told apart by the layout module names). Rows: editors in
    the order given, each by layer, a layer's MHSA update before its FFN update (the order in the block) --
    not the order of a summary's ``delta_norms``, which a cached or stored summary keeps sorted by name."""
    import re

    def place(name: str) -> tuple:
        kind = "MHSA" if any(k in name for k in ("attn", "attention")) else "FFN"
        return int(re.search(r"\.(\d+)\.", name).group(1)), kind == "FFN", kind

    rows = []
    for method, s in summaries.items():
        norms = (s.get("delta_norms") or {}).items()
        for (layer, _, kind), norm in sorted(((place(name), norm) for name, norm in norms), key=lambda t: t[0]):
            rows.append(
                {
                    "method": DISPLAY.get(method, method),
                    "weight": kind,
                    "layer": layer,
                    "norm": norm,
                    "label": f"{DISPLAY.get(method, method)} ({kind})",
                }
            )
    return pd.DataFrame(rows)


def plot_delta_norms(frame: pd.DataFrame, title: str = ""):
    """Fig. 4: ‖Δ‖_F per critical layer, one line per (editor, weight): colour = editor, marker/line = weight
    (FFN solid, MHSA dashed); integer layer ticks."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    palette = method_colors(frame.method)
    for (method, weight), g in frame.groupby(["method", "weight"]):
        g = g.sort_values("layer")
        ax.plot(
            g.layer,
            g.norm,
            marker="o" if weight == "FFN" else "s",
            ms=4,
            ls="-" if weight == "FFN" else "--",
            color=palette[method],
            label=f"{method} ({weight})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("‖Δ‖_F")
    ax.set_xlabel("edited layer")
    ax.grid(alpha=0.3)
    ax.legend(title="editor (edited weight)", fontsize=8, title_fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# ---- re-drawing the committed figures from the committed tables (no model) ------------------------------
def redraw_fig3(out_dir: str | Path, stem: str) -> list[Path]:
    """Fig. 3 from ``tables/<stem>.csv`` (``sweep_frame``'s long frame). Where that file holds the older
    normal-approximation intervals (which leave [0, 100] at small n) and ``tables/<stem>.json`` has the
    summaries' means and record counts, the efficacy/generalization/specificity bands are recomputed as
    Wilson intervals (exact rule for efficacy's 0/1 outcomes; the conservative Wilson bound for per-record
    means over prompts) and the Score gets none; runs with ``ci_method="auto"`` keep their own intervals."""
    frame = pd.read_csv(Path(out_dir) / "tables" / f"{stem}.csv")
    summaries = Path(out_dir) / "tables" / f"{stem}.json"
    if summaries.exists():
        frame = _wilson_bands(frame, json.loads(summaries.read_text()))
    model = stem.removeprefix("fig3_sweep_")
    for precision in ("bfloat16", "float16"):
        if model.endswith("_" + precision):
            model = f"{model.removesuffix('_' + precision)} (values {precision})"
    fig = plot_sweep(frame, title=f"{model}: CounterFact, 1 to {frame.n_edits.max():,} edits")
    return _save_redrawn(fig, stem, out_dir)


def _wilson_bands(frame: pd.DataFrame, summaries: dict) -> pd.DataFrame:
    from .evaluation.stats import _wilson_fractional

    frame = frame.copy()
    for i, r in frame.iterrows():
        s = summaries.get(f"{r.n_edits}|{next((k for k, v in DISPLAY.items() if v == r.method), r.method)}")
        if not s or s.get("ci_method") == "auto":
            continue
        key = dict(CF_COLUMNS).get(r.metric)
        if key in ("efficacy", "generalization", "specificity") and s.get(f"{key}_n"):
            lo, hi = _wilson_fractional(s[key] / 100, int(s[f"{key}_n"]), 0.95)
            frame.loc[i, ["low", "high"]] = 100 * lo, 100 * hi
        elif key == "score":
            frame.loc[i, ["low", "high"]] = float("nan"), float("nan")
    return frame


def redraw_fig4(out_dir: str | Path, stem: str) -> list[Path]:
    """Fig. 4 from ``tables/<stem>.csv`` (``delta_norm_frame``'s frame)."""
    frame = pd.read_csv(Path(out_dir) / "tables" / f"{stem}.csv")
    fig = plot_delta_norms(frame, title=f"{stem.removeprefix('fig4_delta_norms_')}: ‖Δ‖ per edited layer")
    return _save_redrawn(fig, stem, out_dir)


def redraw_causal_trace(out_dir: str | Path, model: str) -> list[Path]:
    """The causal-trace curve from ``tables/causal_trace_<model>_curve.csv``, shading the critical layers R the
    editors use for ``model`` (its registry entry), not the tracing's own first candidate."""
    from .analysis.causal_trace import plot_effect_curves
    from .models import MODEL_SPECS

    wide = pd.read_csv(Path(out_dir) / "tables" / f"causal_trace_{model}_curve.csv")
    kinds = [c for c in ("block", "mlp", "attn") if c in wide.columns]
    avg = pd.concat(
        [pd.DataFrame({"layer": wide.layer, "kind": k, "effect": wide[k], "sem": wide[f"{k}_sem"]}) for k in kinds],
        ignore_index=True,
    )
    spec = MODEL_SPECS.get(model)
    critical = list(spec.critical_layers) if spec is not None and spec.critical_layers else None
    manifest = Path(out_dir) / "tables" / "manifest.json"
    meta = json.loads(manifest.read_text()).get(f"causal_trace_{model}_curve.csv", {}) if manifest.exists() else {}
    n = f" (n={meta['n_facts']})" if "n_facts" in meta else ""
    fig = plot_effect_curves(
        avg,
        critical=critical,
        window=meta.get("window"),
        title=f"{model}: causal tracing at the subject's last token{n}",
        critical_label="critical layers R used by the editors",
    )
    return _save_redrawn(fig, f"causal_trace_{model}", out_dir, {"shaded_layers": critical})


def _save_redrawn(fig, name: str, out_dir, extra: dict | None = None) -> list[Path]:
    """Save a re-drawn figure, keeping what the manifest said about the run that made its data."""
    import matplotlib.pyplot as plt

    manifest = Path(out_dir) / "figures" / "manifest.json"
    old = json.loads(manifest.read_text()).get(f"{name}.png", {}) if manifest.exists() else {}
    old = {k: v for k, v in old.items() if k not in ("written", "pmet")}
    paths = save_figure(
        fig, name, out_dir, {**old, "redrawn_by": "pmet.report.redraw_figures (python -m pmet report)", **(extra or {})}
    )
    plt.close(fig)
    return paths


def redraw_figures(out_dir: str | Path) -> list[Path]:
    """Re-draw every figure whose data is committed under ``tables/`` (Fig. 3, Fig. 4, causal-trace curves)."""
    tables = Path(out_dir) / "tables"
    paths: list[Path] = []
    for p in sorted(tables.glob("fig3_sweep_*.csv")):
        paths += redraw_fig3(out_dir, p.stem)
    for p in sorted(tables.glob("fig4_delta_norms_*.csv")):
        paths += redraw_fig4(out_dir, p.stem)
    for p in sorted(tables.glob("causal_trace_*_curve.csv")):
        model = p.stem.removeprefix("causal_trace_").removesuffix("_curve")
        if "_window" not in model and "_mlp" not in model:
            paths += redraw_causal_trace(out_dir, model)
    return paths


def plot_grid(grid: dict, metrics=("efficacy", "generalization", "specificity"), title: str = ""):
    """Table 1 / Table 2 at a glance: one panel per metric, one bar per (model, editor) with its 95% interval
    (unavailable editors are left out)."""
    import matplotlib.pyplot as plt

    bars = [
        (f"{DISPLAY.get(m, m)}" + (f"\n{model}" if len(grid) > 1 else ""), s)
        for model, runs in grid.items()
        for m, s in runs.items()
        if "unavailable" not in s
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        means = [s.get(metric) if s.get(metric) is not None else float("nan") for _, s in bars]
        cis = [s.get(f"{metric}_ci") or (None, None) for _, s in bars]
        err = [
            [0 if lo is None else m - lo for m, (lo, _) in zip(means, cis)],
            [0 if hi is None else hi - m for m, (_, hi) in zip(means, cis)],
        ]
        ax.bar(range(len(bars)), means, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(bars)), [b for b, _ in bars], rotation=45, ha="right", fontsize=8)
        ax.set_title(metric.capitalize())
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("% (95% interval)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- regenerating the committed tables from the committed per-record runs (no model) -------------------
# Which notebook's layout makes a table: ``{kind: (summaries -> table frame)}``, the kind read from the table's
# manifest entry (``notebook``) or, for entries written before it was recorded, from its name
# (:func:`pmet.runspec.artifact_name` puts the kind first). Each layout is the call its notebook makes.
def _grid_layout(dataset: str):
    return lambda summaries, config, stem: grid_table(_ordered_grid(summaries, config, stem), dataset)


TABLE_LAYOUTS = {
    "table1": _grid_layout("counterfact"),
    "table2": _grid_layout("zsre"),
    "table3": lambda summaries, config, stem: ablation_table(_by_size(summaries, config)),
    "fig3_sweep": lambda summaries, config, stem: sweep_frame(_by_size(summaries, config)).round(3),
    "fig4_delta_norms": lambda summaries, config, stem: delta_norm_frame(_by_method(summaries, config)).round(4),
}
# the notebooks' earlier wording of the interval rule in a caption -> the wording they use now
OLD_CAPTION_PHRASES = {"mean (95% CI half-width, normal approximation)": "mean [95% interval]"}


@dataclass
class RegeneratedTable:
    """One committed table rebuilt from per-record runs (``frame``, ``caption``, the recomputed ``summaries`` in
    the committed summaries' layout, the run files used) -- or, with ``reason``, why it cannot be."""

    stem: str
    frame: pd.DataFrame | None = None
    caption: str = ""
    summaries: dict | None = None
    runs: list = field(default_factory=list)
    reason: str = ""


def _is_summary(obj) -> bool:
    """A run summary (or an unavailable editor's placeholder) inside an artifact's summaries file, by the rule of
    :func:`pmet.claims.save_summaries`."""
    return isinstance(obj, dict) and any(k in obj for k in ("efficacy", "unavailable"))


def _leaves(obj, path=()):
    """``(path, summary)`` for every run summary in an artifact's summaries file (any nesting)."""
    if _is_summary(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))


def _replace_leaves(obj, new: dict, path=()):
    """``obj`` with the summary at each path in ``new`` replaced (same nesting)."""
    if _is_summary(obj):
        return new.get(path, obj)
    return {k: _replace_leaves(v, new, (*path, k)) for k, v in obj.items()}


def recorded_identity(summary: dict) -> tuple:
    """The identity (:func:`pmet.runstore.run_identity`) of the run behind a summary an artifact recorded: its
    spec (:func:`pmet.runspec.spec_of`) and hyperparameter id; a summary written before specs said whether
    generation ran is read as having run it exactly when it has fluency."""
    from .runspec import spec_of
    from .runstore import run_identity

    spec = spec_of(summary)
    if spec.get("generation") is None:
        spec["generation"] = "fluency" in summary
    return run_identity({**spec, "hparams_id": summary.get("hparams")})


def _method_order(config: dict, model=None) -> list:
    methods = config.get("methods") or []
    if isinstance(methods, dict):
        methods = methods.get(model) or []
    return [*methods, *DISPLAY]


def _ordered_grid(grid: dict, config: dict, stem: str) -> dict:
    """``{model: {method: summary}}`` in the notebook's order (summaries files are written with sorted keys):
    models as configured, else as named in the artifact's name; methods as configured, else the paper's."""
    models = config.get("models") or ([config["model"]] if config.get("model") else [])

    def model_pos(m):
        named = stem.find(f"_{m}")
        return (models.index(m), 0) if m in models else (len(models), named if named >= 0 else len(stem))

    out = {}
    for model in sorted(grid, key=model_pos):
        order = _method_order(config, model)
        out[model] = {
            m: grid[model][m] for m in sorted(grid[model], key=lambda m: order.index(m) if m in order else 99)
        }
    return out


def _by_size(summaries: dict, config: dict) -> dict:
    """``{(n_edits, method): summary}`` from a summaries file's ``"n|method"`` keys, in the notebook's order
    (method, then size)."""
    order = _method_order(config)
    pairs = [(int(k.split("|", 1)[0]), k.split("|", 1)[1], s) for k, s in summaries.items()]
    pairs.sort(key=lambda t: (order.index(t[1]) if t[1] in order else 99, t[0]))
    return {(n, m): s for n, m, s in pairs}


def _by_method(summaries: dict, config: dict) -> dict:
    """``{method: summary}`` in the notebook's order (its ``methods``, then the paper's)."""
    order = _method_order(config)
    return {m: summaries[m] for m in sorted(summaries, key=lambda m: order.index(m) if m in order else 99)}


def table_kind(stem: str, entry: dict) -> str | None:
    """Which notebook layout (:data:`TABLE_LAYOUTS`) made the committed table ``stem``; None for a table not
    made from edit runs (causal tracing, Fig. 2 similarities)."""
    kind = str(entry.get("notebook") or "").removesuffix(".ipynb")
    if kind in TABLE_LAYOUTS:
        return kind
    return next((k for k in sorted(TABLE_LAYOUTS, key=len, reverse=True) if stem.startswith(k + "_")), None)


def current_caption(recorded: str) -> str:
    """The caption a regenerated table gets where its manifest entry has no configuration to pass to its
    notebook's caption function (:func:`regenerated_caption`): the one its notebook recorded, its older wording
    of the interval rule replaced by today's and any interval sentence dropped (:func:`save_table` adds the
    regenerated table's own)."""
    caption = recorded.split(" 95% intervals:")[0]
    for old, new in OLD_CAPTION_PHRASES.items():
        caption = caption.replace(old, new)
    return caption


def regenerated_caption(kind: str, entry: dict, summaries: dict) -> str:
    """The caption of a regenerated table: its notebook's caption function called with the configuration the
    notebook recorded (:func:`table_caption`), so the table reads as the notebook would write it; for an entry
    written before notebooks recorded their configuration (or without a parameter the caption needs), the
    recorded caption brought up to date (:func:`current_caption`)."""
    config = entry.get("config")
    if isinstance(config, dict):
        try:
            return table_caption(kind, config, summaries)
        except KeyError:
            pass
    return current_caption(entry.get("caption", ""))


def _run_of(path: tuple, summary: dict) -> tuple:
    """``(model, editor label, n_edits)`` of a recorded run, for messages."""
    method = summary.get("method") or str(path[-1]).split("|")[-1]
    return summary.get("model") or str(path[0]), DISPLAY.get(method, method), summary.get("n_edits")


def _describe(runs: list[tuple]) -> str:
    """``"smollm2 ROME n=100, smollm2 FT-W 16 sizes n=1-200"``: recorded runs, grouped by model and editor."""
    sizes: dict = {}
    for model, editor, n in runs:
        sizes.setdefault((model, editor), []).append(n)
    parts = []
    for (model, editor), ns in sizes.items():
        ns = sorted(n for n in ns if n is not None)
        if len(ns) > 3:
            parts.append(f"{model} {editor} {len(ns)} sizes n={ns[0]}-{ns[-1]}")
        else:
            parts.append(f"{model} {editor}" + (" n=" + ", ".join(map(str, ns)) if ns else ""))
    return ", ".join(parts)


# the headline means a recorded summary and a stored run's summary must share to be the same run (a rerun of
# the same specification by other code has the same identity but other results)
SAME_RUN_METRICS = ("efficacy", "generalization", "specificity", "fluency", "consistency", "consistency_proxy")


def _same_results(recorded: dict, stored: dict) -> bool:
    both = [m for m in SAME_RUN_METRICS if recorded.get(m) is not None and stored.get(m) is not None]
    return all(abs(float(recorded[m]) - float(stored[m])) < 1e-6 for m in both)


def _why_missing(want: tuple, runs) -> str:
    """Why no stored run matches the recorded run ``want``: which identity fields the nearest file of the same
    model, dataset, method, size and seed differs in, or that there is none."""
    from .runstore import IDENTITY, run_identity

    same = [run_identity(r.spec) for r in runs]
    same = [k for k in same if k[:5] == want[:5]]
    if not same:
        return "no per-record file"
    diff = min(([f for f, a, b in zip(IDENTITY, k, want) if a != b] for k in same), key=len)
    return "per-record file differs in " + ", ".join(diff)


def regenerate_table(stem: str, entry: dict, recorded: dict | None, runs) -> RegeneratedTable:
    """Rebuild the committed table ``stem`` (manifest ``entry``; ``recorded``: its summaries file, the runs it was
    made of) from the stored runs ``runs`` (:class:`pmet.runstore.StoredRun`): every recorded run must have a
    per-record file with the same identity; its summary is recomputed from the rows
    (:func:`pmet.runstore.recomputed_summary`) and the table laid out by its notebook's function, with its
    notebook's caption (:func:`regenerated_caption`). Pure: nothing is read or written."""
    from .diagnostics import TABLE_STEM
    from .runstore import recomputed_summary, run_identity

    kind = table_kind(stem, entry)
    if kind is None and stem.startswith(TABLE_STEM):
        return RegeneratedTable(stem, reason="written from the same results by pmet.diagnostics.write_tables instead")
    if kind is None and stem.startswith("sequential_"):
        return RegeneratedTable(
            stem,
            reason="made from the sequential runs in results/<model>/sequential/, which pmet report reads for "
            "tables/claims.md; the table itself only by notebooks/sequential.ipynb (reuse_committed=True reads "
            "them, but loads the model)",
        )
    if kind is None:
        return RegeneratedTable(stem, reason="not made from edit runs (no per-record run files; needs a model)")
    if not recorded:
        return RegeneratedTable(stem, reason=f"its run summaries (tables/{stem}.json) were not recorded")
    by_id = {}
    for r in runs:
        by_id.setdefault(run_identity(r.spec), r)
    found, missing = {}, {}
    for path, s in _leaves(recorded):
        if "unavailable" in s:
            continue
        want = recorded_identity(s)
        run = by_id.get(want)
        if run is None:
            why = _why_missing(want, runs)
        elif not _same_results(s, run.summary):
            why = "per-record file of the same specification with other results (another code version)"
        else:
            found[path] = run
            continue
        missing.setdefault(why, []).append(_run_of(path, s))
    if missing:
        return RegeneratedTable(stem, reason="; ".join(f"{why}: {_describe(r)}" for why, r in missing.items()))
    if not found:
        return RegeneratedTable(stem, reason="its summaries file records no run")
    summaries = _replace_leaves(recorded, {p: recomputed_summary(r) for p, r in found.items()})
    frame = TABLE_LAYOUTS[kind](summaries, entry.get("config") or {}, stem)
    runs_used = sorted({str(r.path) for r in found.values() if r.path is not None})
    caption = regenerated_caption(kind, entry, summaries)
    return RegeneratedTable(stem, frame, caption, summaries, runs_used)


def committed_tables(tables_dir: str | Path) -> list[tuple[str, dict]]:
    """``(stem, manifest entry)`` of every CSV table listed in ``<tables_dir>/manifest.json``, by name."""
    manifest = Path(tables_dir) / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    return [(name.removesuffix(".csv"), entry) for name, entry in sorted(data.items()) if name.endswith(".csv")]


def regenerate_tables(source_dir: str | Path, results: str | Path, out_dir: str | Path) -> list[RegeneratedTable]:
    """Regenerate every table listed in ``<source_dir>/tables/manifest.json`` whose recorded runs
    (``tables/<stem>.json``) all have per-record files under ``results``, writing it to ``<out_dir>/tables/``
    as its notebook does (CSV, Markdown, LaTeX, the recomputed summaries, manifest entries); offline, no model.
    Returns one :class:`RegeneratedTable` per committed table -- with ``reason`` for those not regenerated."""
    from .claims import save_summaries
    from .runstore import iter_runs

    tables = Path(source_dir) / "tables"
    runs = list(iter_runs(results)) if Path(results).exists() else []
    done = []
    for stem, entry in committed_tables(tables):
        summaries_file = tables / f"{stem}.json"
        recorded = json.loads(summaries_file.read_text()) if summaries_file.exists() else None
        t = regenerate_table(stem, entry, recorded, runs)
        if not t.reason:
            meta = {k: v for k, v in entry.items() if k not in ("caption", "written", "pmet")}
            meta.update(
                regenerated_by="python -m pmet report (pmet.report.regenerate_tables)", runs=_shown(t.runs, out_dir)
            )
            save_table(t.frame, stem, out_dir, t.caption, meta)
            _record(Path(out_dir) / "tables", [save_summaries(t.summaries, stem, out_dir)], meta)
        done.append(t)
    return done


def _shown(paths, root) -> list[str]:
    """Run file paths relative to ``root`` where they lie under it."""
    out = []
    for p in paths:
        try:
            out.append(str(Path(p).resolve().relative_to(Path(root).resolve())))
        except ValueError:
            out.append(str(p))
    return out
