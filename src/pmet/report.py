"""Writing the paper's artifacts: tables as CSV + Markdown + LaTeX, figures as PNG + PDF (the notebooks'
setup and their guarded outputs are :mod:`pmet.notebook`).

Every table carries a caption that states the model, the number of edits and the number of evaluated
records, and every written file is listed in the ``manifest.json`` of its folder (what made it, when, with
which parameters), so a figure can be traced back to the run that produced it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd


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


# ---- the paper's tables and figures from run summaries (see pmet.experiments) --------------------------
DISPLAY = {"none": "Unedited", "ft": "FT-W", "mend": "MEND", "rome": "ROME", "memit": "MEMIT",
           "memit-ffn": "MEMIT (δ on m^L)", "pmet": "PMET",
           "pmet-no-attn-delta": "w/o δ^a", "pmet-with-attn-weights": "w/ W_O^MHSA",
           "pmet-even-spread": "Even spread"}
CF_COLUMNS = [("Score", "score"), ("Efficacy", "efficacy"), ("Generalization", "generalization"),
              ("Specificity", "specificity"), ("Fluency", "fluency"), ("Consistency", "consistency")]
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
    """Table 1 / Table 2 layout from ``run_grid`` output: one block of rows per model, "mean (CI half-width)"
    cells, and the number of records each metric rests on. Unavailable editors keep their row with the reason."""
    columns = CF_COLUMNS if dataset == "counterfact" else ZSRE_COLUMNS
    proxy = any("consistency_proxy" in s for runs in grid.values() for s in runs.values())
    rows = []
    for model, runs in grid.items():
        for method, s in runs.items():
            row = {"Model": model, "Editor": model if method == "none" else DISPLAY.get(method, method),
                   "Edits": s.get("n_edits")}
            for head, key in columns:
                if key == "consistency":
                    key = metric_key(s, key)
                    head = "Consistency (proxy)" if proxy else head
                if "unavailable" in s:
                    row[head] = "n/a"
                elif key == "score":
                    row[head] = fmt_ci(s.get("score"), _half_width(s, "score"))
                else:
                    row[head] = fmt_ci(s.get(key), _half_width(s, key), digits=1)
            row["n records"] = ("-" if "unavailable" in s else
                                "/".join(str(s.get(f"{metric_key(s, k)}_n", 0)) for _, k in columns if k != "score"))
            if "unavailable" in s:
                row["note"] = s["unavailable"]
            rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(summaries: dict, reference: str = "pmet") -> pd.DataFrame:
    """Table 3 layout: ``summaries[(n_edits, method)]``; each ablation's cells carry the signed difference
    to PMET at the same edit count (↑ / ↓ / →)."""
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
            cell = f"{v:.1f}"
            if ref is not None and method != reference and ref.get(key) is not None:
                d = v - ref[key]
                arrow = "→" if abs(d) < 0.05 else ("↑" if d > 0 else "↓")
                cell += f" ({arrow}{abs(d):.1f})" if arrow != "→" else " (→)"
            row[head] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def size_note(used: int, default: int, reason: str | None = None) -> str:
    """A caption sentence for an artifact rendered with fewer edits than its notebook's default (empty when
    ``used >= default``), so that a reduced rendering says so wherever its table or figure goes."""
    if used >= default:
        return ""
    return f" Fewer edits than the notebook's default of {default:,}" + (f": {reason}." if reason else ".")


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
            rows.append({"method": DISPLAY.get(method, method), "n_edits": n, "metric": head, "value": s[key],
                         "low": ci[0], "high": ci[1]})
    return pd.DataFrame(rows)


def plot_sweep(frame: pd.DataFrame, title: str = ""):
    """Fig. 3: one panel per metric, metric vs number of edits on a log x-axis, one line per editor."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [h for h, _ in CF_COLUMNS if h in set(frame.metric)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    palette = dict(zip(sorted(set(frame.method)), sns.color_palette("colorblind", len(set(frame.method)))))
    for ax, metric in zip(axes[0], metrics):
        sub = frame[frame.metric == metric]
        for method, g in sub.groupby("method"):
            g = g.sort_values("n_edits")
            ax.plot(g.n_edits, g.value, marker="o", ms=3, label=method, color=palette[method])
            if g.low.notna().all():
                ax.fill_between(g.n_edits, g.low, g.high, alpha=0.15, color=palette[method])
        ax.set_xscale("log")
        ax.set_title(metric)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def delta_norm_frame(summaries: dict) -> pd.DataFrame:
    """Fig. 4 data: ‖Δ‖_F per edited weight from run summaries ``{method: summary}`` (weights named
    ``...layers.<l>.<module>.weight``; ``attn``/``mlp`` told apart by the layout module names)."""
    import re

    rows = []
    for method, s in summaries.items():
        for name, norm in (s.get("delta_norms") or {}).items():
            layer = int(re.search(r"\.(\d+)\.", name).group(1))
            kind = "MHSA" if any(k in name for k in ("attn", "attention")) else "FFN"
            rows.append({"method": DISPLAY.get(method, method), "weight": kind, "layer": layer, "norm": norm,
                         "label": f"{DISPLAY.get(method, method)} ({kind})"})
    return pd.DataFrame(rows)


def plot_delta_norms(frame: pd.DataFrame, title: str = ""):
    """Fig. 4: ‖Δ‖ per critical layer, one line per (editor, weight)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=frame, x="layer", y="norm", hue="label", marker="o", ax=ax)
    ax.set_ylabel("‖Δ‖_F")
    ax.set_xlabel("edited layer")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
