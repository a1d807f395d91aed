"""Diagnostics of the value optimisation (Eq. 10), per request, kept with every run and summarised per model.

What is recorded for each request of a run whose editor optimises value vectors (PMET, MEMIT, their
ablations and variants, ROME), from the per-request ``info`` the optimiser returns
(:func:`pmet.editing.values.optimize_batch`; stored with each cached value, so a run whose values come from
the cache records the same numbers):

* per optimised site ``s`` (PMET: ``"attn"`` δ^a and ``"mlp"`` δ^m; "w/o δ^a", ``memit-ffn`` and ROME:
  ``"mlp"``; MEMIT: ``"block"``): ``ratio_<s>`` = |δ| / |init| with ``init`` the site's output at the subject's
  last token of the plain prompt (a^L, m^L or h^L; the vector the clamp is measured against) and
  ``at_clamp_<s>``: whether the ratio sits at the clamp (ratio >= clamp·(1 − 1e-3));
* ``clamp``: the clamp factor in force (``clamp_norm_factor``: every δ is projected into the ball of radius
  clamp·|init| after each Adam step);
* ``steps``: Adam steps applied; ``stopped_early``: the stop rule ended the optimisation before the step limit;
* the loss terms at the last evaluated step: ``nll`` (mean target NLL over the prefixed prompts), ``kl``
  (μ·KL), ``loss`` (the total, φ·nll + kl + weight decay), ``prob`` (mean target probability) and
  ``target_is_top`` (the target is the argmax at every target position of every prompt).

Floats are kept to 6 significant digits (``at_clamp`` is decided before rounding). Where they live:

* the run folder: ``value_diagnostics.json`` (:data:`RUN_FILE`, written when the edit is made, before the
  evaluation; :func:`save_run_diagnostics`);
* the committed per-record results (:mod:`pmet.runstore`): each record's row carries them as the field
  ``value_diagnostics`` (:data:`FIELD`; files written before it existed have no such field and read as before);
* ``tables/value_diagnostics_<model>.{csv,md,tex}``: one row per run (:func:`diagnostics_frame`), rebuilt by
  ``python -m pmet report`` from the committed results (:func:`write_tables`).

A run made before diagnostics were kept gets them from its caches without recomputing anything
(:func:`backfill`: the values' stored ``info`` in the value cache, ROME's trajectory file)::

    python -m pmet.diagnostics backfill --model smollm2 --method pmet --n-edits 1590 \\
        --value-autocast bfloat16 --set v_fast=true [--results .]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

FIELD = "value_diagnostics"  # the per-record field in the committed results
RUN_FILE = "value_diagnostics.json"  # in the run folder
TABLE_STEM = "value_diagnostics_"  # tables/value_diagnostics_<model>.*
AT_CLAMP_TOL = 1e-3  # a ratio within this relative distance below the clamp counts as at the clamp
SITES = ("attn", "mlp", "block")  # table order
SITE_VECTORS = {"attn": "|δ^a|/|a^L|", "mlp": "|δ^m|/|m^L|", "block": "|δ|/|h^L|"}
LOSS_FIELDS = ("nll", "kl", "loss", "prob", "target_is_top")


# ---- per request --------------------------------------------------------------------------------------
def value_hparams(hp):
    """The value optimiser's hyperparameters (an :class:`~pmet.editing.hparams.EditHparams`) of an editor's
    ``hp``: the shared editor's as they are, ROME's ``value_hparams()``; None for editors without value
    vectors (FT-W, MEND, the unedited model)."""
    from .editing.hparams import EditHparams

    if isinstance(hp, EditHparams):
        return hp
    make = getattr(hp, "value_hparams", None)
    return make() if callable(make) else None


def optimised_sites(vhp) -> list[str]:
    """The sites whose δ is optimised (as :func:`pmet.editing.values.optimize_batch` chooses them)."""
    if vhp.value_site == "block":
        return ["block"]
    return ["mlp", "attn"] if vhp.optimize_attn_delta else ["mlp"]


def _round(x: float | None, digits: int = 6):
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def request_diagnostics(info: dict, sites: list[str], clamp: float) -> dict:
    """One request's diagnostics (module docstring) from the optimiser's ``info``."""
    out = {
        "clamp": float(clamp),
        "steps": int(info["steps"]),
        "stopped_early": bool(info["stopped_early"]),
        "target_is_top": bool(info["target_is_top"]),
    }
    for k in ("nll", "kl", "loss", "prob"):
        out[k] = _round(float(info[k]))
    for s in sites:
        d, i = float(info[f"delta_norm_{s}"]), float(info[f"init_norm_{s}"])
        ratio = d / i if i > 0 else math.nan
        out[f"ratio_{s}"] = _round(ratio)
        out[f"at_clamp_{s}"] = bool(ratio >= clamp * (1 - AT_CLAMP_TOL)) if math.isfinite(ratio) else None
    return out


def value_diagnostics(requests: list[dict], value_info: list[dict], hp) -> list[dict] | None:
    """Per request (``case_id`` first) the diagnostics of the value optimisation; None when the editor behind
    ``hp`` optimises no value vectors. ``requests``/``value_info``: an edit's (same order)."""
    vhp = value_hparams(hp)
    if vhp is None:
        return None
    if len(requests) != len(value_info):
        raise ValueError(f"{len(requests)} requests but {len(value_info)} value infos")
    sites = optimised_sites(vhp)
    return [
        {"case_id": r.get("case_id", i), **request_diagnostics(info, sites, vhp.clamp_norm_factor)}
        for i, (r, info) in enumerate(zip(requests, value_info))
    ]


def diagnostics_of(result) -> list[dict] | None:
    """:func:`value_diagnostics` of an :class:`~pmet.editing.result.EditResult`."""
    return value_diagnostics(result.requests, result.value_info, result.hparams)


# ---- the run folder -------------------------------------------------------------------------------------
def write_run_diagnostics(folder: str | Path, diagnostics: list[dict], method: str | None = None) -> Path:
    """Write ``<folder>/value_diagnostics.json`` atomically; return its path."""
    path = Path(folder) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"method": method, "records": diagnostics}, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)
    return path


def save_run_diagnostics(folder: str | Path, result) -> Path | None:
    """Keep the value diagnostics of the edit ``result`` in its run folder (nothing for editors without
    value vectors); the path or None."""
    diags = diagnostics_of(result)
    return write_run_diagnostics(folder, diags, result.method) if diags is not None else None


def read_run_diagnostics(folder: str | Path) -> list[dict] | None:
    """The records of ``<folder>/value_diagnostics.json``, None where the run has none."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text())["records"] if path.exists() else None


def attach(rows: list[dict], diagnostics: list[dict] | None) -> list[dict]:
    """``rows`` (per-record results with ``case_id``) with each record's diagnostics as its :data:`FIELD`
    (new dicts; rows without diagnostics unchanged; ``None`` diagnostics: the rows as they are)."""
    if not diagnostics:
        return rows
    by_id = {d["case_id"]: {k: v for k, v in d.items() if k != "case_id"} for d in diagnostics}
    return [{**r, FIELD: by_id[r["case_id"]]} if r.get("case_id") in by_id else r for r in rows]


def add_to_results_file(path: str | Path, diagnostics: list[dict]) -> Path:
    """Rewrite the committed per-record file ``path`` with ``diagnostics`` attached to its rows (spec,
    summary and every other field unchanged; :func:`pmet.runstore.write_run`, deterministic bytes)."""
    from .runstore import read_run, write_run

    run = read_run(path)
    ids = {r["case_id"] for r in run.rows}
    missing = [d["case_id"] for d in diagnostics if d["case_id"] not in ids]
    if missing or len(diagnostics) != len(run.rows):
        raise ValueError(
            f"{path}: its {len(run.rows)} records are not the {len(diagnostics)} requests of the diagnostics "
            f"(e.g. case_id {missing[:1]})"
        )
    return write_run(path, run.spec, run.summary, attach(run.rows, diagnostics))


def stored_diagnostics(run) -> list[dict]:
    """The diagnostics of a committed run (:class:`pmet.runstore.StoredRun`): one dict per record that has them."""
    return [r[FIELD] for r in run.rows if isinstance(r.get(FIELD), dict)]


# ---- the table ------------------------------------------------------------------------------------------
def _median(xs):
    import numpy as np

    return float(np.median(xs)) if len(xs) else math.nan


def _p90(xs):
    import numpy as np

    return float(np.percentile(xs, 90)) if len(xs) else math.nan  # linear interpolation between order statistics


def _mean(xs):
    return sum(xs) / len(xs) if len(xs) else math.nan


def run_row(spec: dict, diags: list[dict]) -> dict:
    """One table row: the run (method, dataset, n_edits, seed, precision, overrides) and its diagnostics'
    statistics (numbers unrounded; :func:`diagnostics_frame` rounds)."""
    over = spec.get("overrides") or {}
    row = {
        "method": spec.get("method"),
        "dataset": spec.get("dataset"),
        "n_edits": spec.get("n_edits"),
        "seed": spec.get("seed", 0),
        "precision": spec.get("value_autocast") or "float32",
        "overrides": ", ".join(f"{k}={v}" for k, v in sorted(dict(over).items())),
        "requests": len(diags),
        "clamp": _median([d["clamp"] for d in diags]),
    }
    for s in SITES:
        ratios = [d[f"ratio_{s}"] for d in diags if d.get(f"ratio_{s}") is not None]
        if not ratios:
            continue
        at = [d[f"at_clamp_{s}"] for d in diags if d.get(f"at_clamp_{s}") is not None]
        row[f"{s} ratio median"] = _median(ratios)
        row[f"{s} ratio p90"] = _p90(ratios)
        row[f"{s} at clamp %"] = 100 * _mean([float(a) for a in at])
    row["steps median"] = _median([d["steps"] for d in diags])
    row["stopped early %"] = 100 * _mean([float(d["stopped_early"]) for d in diags])
    row["target top %"] = 100 * _mean([float(d["target_is_top"]) for d in diags])
    row["nll mean"] = _mean([d["nll"] for d in diags if d.get("nll") is not None])
    row["prob mean"] = _mean([d["prob"] for d in diags if d.get("prob") is not None])
    return row


ROUNDING = {"ratio": 3, "%": 1, "steps": 1, "nll": 3, "prob": 3, "clamp": 3}


def diagnostics_frame(runs: Iterable) -> tuple:
    """``(table, skipped)`` from committed runs (:class:`pmet.runstore.StoredRun`): one row per run with
    diagnostics (sorted by dataset, n_edits, method, precision, seed, overrides; numbers rounded for display)
    and the labels of the runs of value-optimising editors that have none (made before they were kept).
    Pure: no model, no cache."""
    import pandas as pd

    rows, skipped = [], []
    for run in runs:
        diags = stored_diagnostics(run)
        if diags:
            rows.append(run_row(run.spec, diags))
        elif _optimises_values(run.spec):
            s = run.spec
            skipped.append(f"{s.get('method')} n={s.get('n_edits')} ({s.get('value_autocast') or 'float32'})")
    df = pd.DataFrame(rows)
    if len(df):
        order = ["dataset", "n_edits", "method", "precision", "seed", "overrides"]
        df = df.sort_values(order, kind="stable").reset_index(drop=True)
        for col in df.columns:
            for key, digits in ROUNDING.items():
                if key in col and df[col].dtype.kind == "f":
                    df[col] = df[col].round(digits)
                    break
        if not df["overrides"].astype(bool).any():
            df = df.drop(columns="overrides")
    return df, skipped


def _optimises_values(spec: dict) -> bool:
    hp = spec.get("hparams_values") or {}
    return "clamp_norm_factor" in hp


def caption(model: str, skipped: list[str]) -> str:
    sites = "; ".join(f"{s}: {v}" for s, v in SITE_VECTORS.items())
    text = (
        f"Value optimisation (Eq. 10) on {model}, per run: the ratio |δ|/|init| of each optimised site ({sites}; "
        "init = the site's output at the subject's last token of the plain prompt) as median and 90th percentile "
        "over the run's requests, the share of requests whose δ sits at the clamp (ratio >= clamp·(1-1e-3); the "
        "clamp projects δ into the ball of radius clamp·|init| after every Adam step), the median number of Adam "
        "steps, the share the stop rule ended before the step limit, the share whose target is the argmax at "
        "every target position, and the mean final target NLL and probability over the prefixed prompts. "
        "From the per-record field value_diagnostics of results/<model>/; regenerated by `python -m pmet report`."
    )
    if skipped:
        text += " Runs without recorded diagnostics (made before they were kept): " + ", ".join(skipped) + "."
    return text


def write_tables(out_dir: str | Path, results: str | Path | None = None) -> list[Path]:
    """``tables/value_diagnostics_<model>.{csv,md,tex}`` under ``out_dir`` for every model of the committed
    results (``results``, default ``<out_dir>/results``) that has runs with diagnostics; files whose content
    would not change are left alone (so the manifest keeps their date). Returns the paths written."""
    from .report import markdown_table
    from .runstore import iter_runs

    out = Path(out_dir)
    results = Path(results) if results is not None else out / "results"
    if not results.exists():
        return []
    by_model: dict = {}
    for run in iter_runs(results):
        by_model.setdefault(run.spec.get("model"), []).append(run)
    written = []
    for model, runs in sorted(by_model.items()):
        df, skipped = diagnostics_frame(runs)
        if not len(df):
            continue
        name = f"{TABLE_STEM}{model}"
        cap = caption(model, skipped)
        texts = {
            ".csv": df.to_csv(index=False),
            ".md": f"{cap}\n\n{markdown_table(df)}\n",
            ".tex": df.to_latex(index=False, escape=True, caption=cap, label=f"tab:{name}"),
        }
        tdir = out / "tables"
        if all((tdir / f"{name}{e}").exists() and (tdir / f"{name}{e}").read_text() == t for e, t in texts.items()):
            continue
        from .report import _record

        tdir.mkdir(parents=True, exist_ok=True)
        paths = []
        for ext, text in texts.items():
            (tdir / f"{name}{ext}").write_text(text)
            paths.append(tdir / f"{name}{ext}")
        _record(tdir, paths, {"caption": cap, "source": f"results/{model}", "writer": "pmet.diagnostics"})
        written += paths
    return written


# ---- backfill -------------------------------------------------------------------------------------------
class DiagnosticsUnavailable(FileNotFoundError):
    """A run's diagnostics cannot be rebuilt from the caches here (the message says what is missing)."""


def _infos_from_value_cache(model, tok, reqs: list[dict], hp, cache) -> list[dict]:
    """Each request's stored ``info`` from the value cache, located exactly as
    :func:`pmet.editing.values.compute_values` locates it (same key); nothing is optimised."""
    from .editing.context import flatten, get_context_templates
    from .editing.value_cache import value_cache_key, weights_checksum
    from .editing.values import value_sites
    from .models import model_fingerprint
    from .paths import cache_dir as default_cache_dir
    from .tensor_cache import load_entry

    layers = tuple(sorted(hp.layers if hp.layers is not None else model.layout.critical_layers))
    L = layers[-1]
    templates = get_context_templates(
        model, tok, hp.context_length, hp.context_n_per_start, hp.context_seed, cache_dir=cache
    )
    flat, _ = flatten(templates)
    root = Path(cache) if cache is not None else default_cache_dir()
    model_id = {"fingerprint": model_fingerprint(model), "weights": weights_checksum(model)}
    names = list(value_sites(hp, L))
    folder = root / "values" / model_id["fingerprint"]
    infos, missing = [], []
    for r in reqs:
        key = value_cache_key(model_id, hp, L, flat, r)
        hit = load_entry(folder / f"{key}.safetensors", key, names)
        if hit is None:
            missing.append(r["case_id"])
            continue
        infos.append({k: v for k, v in hit[1].items() if k != "batch_keys"})
    if missing:
        raise DiagnosticsUnavailable(
            f"{len(missing)} of the run's {len(reqs)} value vectors are not in the value cache {folder} "
            f"(first: case_id {missing[0]}); their diagnostics cannot be rebuilt without optimising them again"
        )
    return infos


def _infos_from_trajectory(model, tok, reqs: list[dict], hp, path: Path) -> list[dict]:
    """ROME: each edit's ``info`` from the run's trajectory file (:mod:`pmet.editing.rome`)."""
    from .editing.rome import _checkpoint_key, load_checkpoint

    layer = hp.layer if hp.layer is not None else model.layout.critical_layers[0]
    name = model.layout.weight_name("mlp_out", layer)
    stored = load_checkpoint(path, _checkpoint_key(hp, name, model.get_parameter(name).detach()), reqs)
    held = stored[0] if stored is not None else 0
    if held < len(reqs):
        raise DiagnosticsUnavailable(
            f"ROME's trajectory {path} holds {held} of the run's {len(reqs)} edits; the rest cannot be rebuilt "
            "without editing again"
        )
    return list(stored[2]["value_info"][: len(reqs)])


def backfill(
    spec,
    *,
    model=None,
    tok=None,
    device: str = "cpu",
    cache=None,
    runs_dir=None,
    results_root=None,
    hparams=None,
) -> dict:
    """Rebuild the value diagnostics of the run ``spec`` (a :class:`pmet.runspec.RunSpec`) from its caches,
    without optimising or editing anything: the values' stored ``info`` (value cache) or ROME's trajectory
    file. Writes ``value_diagnostics.json`` into the run's folder (which must exist) and, with
    ``results_root`` (a folder holding ``results/``), attaches them to the run's committed per-record file if
    it exists there. ``model``/``tok``: the loaded model (else loaded on ``device``; only its fingerprint and
    weights' checksum are needed, to find the cache entries); ``cache``/``runs_dir``/``hparams`` as for
    :func:`pmet.experiments.run_edit_eval`. Returns ``{"run_folder", "diagnostics", "n", "results"}``.
    Raises :class:`DiagnosticsUnavailable` naming what is missing."""
    from .editing.requests import normalize_requests
    from .experiments import SEQUENTIAL, _hparams_id, locate, run_hparams, spec_records
    from .runcache import trajectory_path
    from .runspec import results_path

    if model is None:
        from .models import load_model

        model, tok = load_model(spec.model, device=device)
    records, pool = spec_records(spec, model)
    hp = run_hparams(model, spec, hparams)
    if value_hparams(hp) is None:
        raise ValueError(f"{spec.method} optimises no value vectors: it has no value diagnostics")
    run = locate(model, spec, hp, runs_dir, cache, pool)
    if not run.folder.exists():
        raise DiagnosticsUnavailable(f"no run folder {run.folder}: this run was not made with this cache")
    reqs = normalize_requests([r.as_request() for r in records], tok)
    if spec.method in SEQUENTIAL:
        infos = _infos_from_trajectory(model, tok, reqs, hp, trajectory_path(run.spec, _hparams_id(hp), runs_dir))
    else:
        infos = _infos_from_value_cache(model, tok, reqs, hp, cache)
    diags = value_diagnostics(reqs, infos, hp)
    out = {"run_folder": run.folder, "diagnostics": write_run_diagnostics(run.folder, diags, spec.method)}
    out["n"], out["results"] = len(diags), None
    if results_root is not None:
        path = results_path(results_root, run.spec, run.hp_id)
        if path.exists():
            out["results"] = add_to_results_file(path, diags)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pmet.diagnostics {backfill,table}`` (module docstring)."""
    import argparse

    from .runspec import RunSpec

    p = argparse.ArgumentParser(prog="python -m pmet.diagnostics", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backfill", help="rebuild a run's value diagnostics from its caches (no recomputation)")
    b.add_argument("--model", required=True)
    b.add_argument("--method", required=True)
    b.add_argument("--dataset", default="counterfact")
    b.add_argument("--n-edits", type=int, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--generation", action="store_true", help="the run was made with generation metrics")
    b.add_argument("--value-autocast", default=None, choices=["bfloat16", "float16"])
    b.add_argument("--pool", default=None, choices=["subset", "full"])
    b.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="the run's hyperparameter overrides")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--device", default="cpu")
    b.add_argument("--results", default=None, metavar="ROOT", help="also update ROOT/results/... if the run is there")
    t = sub.add_parser("table", help="write tables/value_diagnostics_<model>.* from the committed results")
    t.add_argument("--out-dir", default=None, help="repository root holding results/ and tables/ (default: this one)")
    args = p.parse_args(argv)
    if args.command == "table":
        from .paths import REPO_ROOT

        for path in write_tables(args.out_dir or REPO_ROOT):
            print(f"wrote {path}")
        return 0
    overrides = {}
    for pair in args.set or []:  # KEY=VALUE, the value as JSON where it parses (as `python -m pmet run --set`)
        key, sep, value = pair.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    spec = RunSpec(
        args.model,
        args.method,
        args.dataset,
        n_edits=args.n_edits,
        seed=args.seed,
        generation=args.generation,
        value_autocast=args.value_autocast or overrides.pop("v_autocast", None),
        overrides=tuple(overrides.items()),
        pool=args.pool,
    )
    try:
        out = backfill(spec, cache=args.cache_dir, device=args.device, results_root=args.results)
    except DiagnosticsUnavailable as exc:
        import sys

        print(f"pmet.diagnostics: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out['diagnostics']} ({out['n']} requests)" + (f" and {out['results']}" if out["results"] else ""))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
