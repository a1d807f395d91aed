"""Issue 17: a table's caption comes from one function per notebook (``pmet.report.table1_caption`` ...), which
the notebook calls with its parameters and ``pmet report`` with the configuration the notebook recorded, so a
regenerated table is what the notebook would write. For every table kind the notebook's own cells run on
synthetic runs (no model: the runs, plots and claims are replaced by stand-ins) and the regeneration from the
per-record files they wrote give the same caption and the same files byte for byte; Fig. 4 records its runs'
summaries now and is regenerated too. Pure and offline."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from pmet import report
from pmet.editing import MethodUnavailable
from pmet.evaluation import summarize_counterfact, summarize_zsre
from pmet.notebook import Artifact, Notebook, _summaries_in, configure
from pmet.paths import REPO_ROOT
from pmet.runspec import RunSpec, results_path
from pmet.runstore import finite as _finite
from pmet.runstore import write_run

NOTEBOOKS = REPO_ROOT / "notebooks"
TABLES = REPO_ROOT / "tables"
LAYERS = (8, 9, 10, 11)  # two-digit layers: a name-sorted delta_norms dict puts 10 before 8


def _code_cells(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _defaults(name: str) -> dict:
    """The notebook's parameters as its ``parameters`` cell sets them."""
    ns: dict = {}
    exec(_code_cells(name)[0], ns)
    return {k: v for k, v in ns.items() if not k.startswith("_")}


def _rows(spec: RunSpec) -> list[dict]:
    """Synthetic per-record results of a run, fixed by its specification."""
    rng = random.Random(repr(spec))
    if spec.dataset == "zsre":
        return [
            {
                "case_id": i,
                **{m: rng.choice([0.0, 0.25, 0.5, 1.0]) for m in ("efficacy", "generalization", "specificity")},
            }
            for i in range(spec.n_edits)
        ]
    return [
        {
            "case_id": i,
            "efficacy": float(rng.random() < 0.8),
            "generalization": rng.choice([0.0, 0.5, 1.0]),
            "specificity": rng.choice([0.6, 0.8, 0.9, 1.0]),
        }
        for i in range(spec.n_edits)
    ]


def _summary(spec: RunSpec) -> dict:
    """A run summary as run_edit_eval returns it: the summariser's metrics of :func:`_rows`, the spec, the
    hyperparameter id and ‖Δ‖ per edited weight (name-sorted, as a cached summary keeps it)."""
    if spec.method == "mend":
        raise MethodUnavailable("no trained MEND editor (synthetic)")
    rng = random.Random(repr(spec) + "norms")
    summarize = summarize_zsre if spec.dataset == "zsre" else summarize_counterfact
    norms = {f"model.layers.{layer}.mlp.down_proj.weight": rng.uniform(1, 50) for layer in LAYERS}
    if spec.method == "pmet-with-attn-weights":
        norms.update({f"model.layers.{layer}.self_attn.o_proj.weight": rng.uniform(1, 50) for layer in LAYERS})
    return {
        **summarize(_rows(spec)),
        "model": spec.model,
        "method": spec.method,
        "n_edits": spec.n_edits,
        "seed": spec.seed,
        "generation": spec.generation,
        "spec": spec.to_dict(),
        "hparams": "none" if spec.method == "none" else "h" + spec.method.replace("-", ""),
        "delta_norms": dict(sorted(norms.items())) if spec.method != "none" else {},
    }


def _save_runs(self, summaries):
    """Stand-in for Notebook.save_runs (which reads the run cache): the same files from the synthetic rows."""
    for s in _summaries_in(summaries):
        spec = RunSpec.from_dict(s["spec"])
        head = {**spec.to_dict(), "hparams_id": s["hparams"]}
        write_run(results_path(self.out_dir, spec, s["hparams"]), head, _finite(s), _rows(spec))


@pytest.fixture
def offline_notebook(monkeypatch):
    """Runs, model loading, plots and claims replaced by stand-ins; the notebooks' other code is their own."""
    import pmet.experiments
    import pmet.models

    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    monkeypatch.setattr(pmet.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(pmet.experiments, "run_edit_eval", lambda model, tok, spec, **k: _summary(spec))
    monkeypatch.setattr(
        pmet.experiments,
        "run_sweep",
        lambda model, tok, spec, sizes, **k: {n: _summary(spec.replace(n_edits=n)) for n in sizes},
    )
    for plot in ("plot_grid", "plot_sweep", "plot_delta_norms"):
        monkeypatch.setattr(report, plot, lambda *a, **k: None)
    monkeypatch.setattr(Artifact, "save_figure", lambda self, fig, part="", meta=None: [])
    monkeypatch.setattr(Notebook, "save_runs", _save_runs)
    monkeypatch.setattr(Notebook, "write_claims", lambda self: None)

    def run(name: str, out_dir, **params) -> dict:
        """The notebook's cells after its setup, with ``cfg`` as setup makes it (without its side effects)."""
        cfg = Notebook(name, vars(configure({**_defaults(name), **params, "out_dir": str(out_dir)})))
        cells = _code_cells(name)
        first = next(i for i, c in enumerate(cells) if "setup(globals()" in c) + 1
        ns = {"cfg": cfg}
        for source in cells[first:]:
            exec(source, ns)
        return ns

    return run


CASES = {
    "table1": dict(
        models=["tiny-llama", "tiny-gptj"],
        n_edits={"tiny-llama": 3, "tiny-gptj": 2},
        methods=["none", "ft", "mend", "memit", "pmet"],
        generation=False,
        value_autocast="bfloat16",
        overrides={"v_lr": 0.4, "clamp_norm_factor": 3.0},  # not in sorted order: the manifest sorts keys
        mend_steps=5,
        size_reason="a test",
        tag="t1",
    ),
    "table2": dict(model="tiny-llama", n_edits=3, methods=["none", "memit", "pmet"]),
    "table3": dict(model="tiny-llama", edit_counts=[2, 3], generation=False, value_autocast="bfloat16"),
    "fig3_sweep": dict(model="tiny-llama", n_max=3, methods=["memit", "pmet"], value_autocast="bfloat16"),
    "fig4_delta_norms": dict(model="tiny-gptj", n_edits=3, generation=False),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_the_notebook_and_the_regeneration_write_the_same_table(kind, tmp_path, offline_notebook):
    """The notebook's cells (its caption call included) write a table; the caption function called with the
    configuration recorded in the manifest gives the notebook's caption, and `pmet report`'s regeneration from
    the per-record files the notebook wrote gives the same CSV, Markdown (caption), LaTeX and summaries -- also
    when the caption recorded in the manifest is another one."""
    out = tmp_path / "nb"
    ns = offline_notebook(kind, out, **CASES[kind])
    stem = ns["out"].name
    written = {ext: (out / "tables" / f"{stem}{ext}").read_bytes() for ext in (".csv", ".md", ".tex", ".json")}
    entry = json.loads((out / "tables" / "manifest.json").read_text())[f"{stem}.csv"]
    recorded = json.loads(written[".json"])
    assert report.table_caption(kind, entry["config"], recorded) == ns["caption"]
    assert entry["caption"].startswith(ns["caption"])

    # the regeneration calls the caption function, it does not copy the recorded caption
    manifest = json.loads((out / "tables" / "manifest.json").read_text())
    manifest[f"{stem}.csv"]["caption"] = "a stale caption"
    (out / "tables" / "manifest.json").write_text(json.dumps(manifest))
    done = {t.stem: t for t in report.regenerate_tables(out, out / "results", tmp_path / "regen")}
    assert not done[stem].reason, done[stem].reason
    assert done[stem].caption == ns["caption"]
    for ext, content in written.items():
        assert (tmp_path / "regen" / "tables" / f"{stem}{ext}").read_bytes() == content, ext


def test_the_caption_branches(tmp_path, offline_notebook):
    """What the notebooks put into a caption: sizes, precision, overrides (sorted), the reduced size and MEND's
    shortened training; a notebook without overrides/MEND steps/size reason says none of it."""
    ns = offline_notebook("table1", tmp_path / "a", **CASES["table1"])
    assert ns["caption"] == (
        "Table 1: 2/3 CounterFact edits on tiny-llama, tiny-gptj; value vectors optimised under bfloat16 autocast;"
        " overrides {'clamp_norm_factor': 3.0, 'v_lr': 0.4}; mean [95% interval]; 'n records' = records behind"
        " efficacy/generalization/specificity/fluency/consistency. The paper: 10,000 CounterFact edits on GPT-J"
        " and on GPT-NeoX. Fewer edits than the notebook's default of 1,000: a test. MEND's editor trained for 5"
        " steps only (shorter than its hyperparameter file's)."
    )
    plain = report.table1_caption(["m"], {"m": 1000}, None, None, None, 1000, None)
    assert plain == (
        "Table 1: 1000 CounterFact edits on m; mean [95% interval]; "
        "'n records' = records behind efficacy/generalization/specificity/fluency/consistency."
        " The paper: 10,000 CounterFact edits on GPT-J and on GPT-NeoX."
    )
    assert report.fig3_caption("m", 200, None, None, 1000).endswith(
        "exp(ln(200) i/16) edits. The paper: 17 sizes up to N = 10,000 CounterFact edits on GPT-J."
        " Fewer edits than the notebook's default of 1,000."
    )
    extended = report.table1_caption(["m"], [10_000], None, None, None, 1000, None, "extended")
    assert "the extended pool" in extended and "the extended pool" not in plain
    config = dict(model="m", value_autocast=None, overrides=None, size_reason=None, default_n=1000, mend_steps=None)
    assert report.table_caption("table1", {**config, "pool": "extended"}, {"m": {"pmet": {"n_edits": 10_000}}}) == (
        extended
    )
    v_fast = {"v_fast": True}  # tables 2-3 and Fig. 3 name their overrides too, also when regenerated
    assert "on m; overrides {'v_fast': True}; mean" in report.table2_caption(["m"], [200], None, None, 1000, v_fast)
    assert "bfloat16 autocast; overrides {'v_fast': True}; differences" in report.table3_caption(
        "m", [100, 1000], "bfloat16", v_fast
    )
    assert "edits, overrides {'v_fast': True}. The paper:" in report.fig3_caption("m", 200, None, None, 1000, v_fast)
    config = dict(model="m", edit_counts=[100], value_autocast=None, overrides=v_fast)
    assert report.table_caption("table3", config, {}) == report.table3_caption("m", [100], None, v_fast)
    # Table 3 and Fig. 3 beyond the full-field records say so, also when regenerated from their configuration
    ext3 = report.table3_caption("m", [1000, 5623, 10_000], None, None, "extended")
    assert "the extended pool" in ext3 and "the extended pool" not in report.table3_caption("m", [1000], None)
    assert (
        report.table_caption(
            "table3", {**config, "edit_counts": [1000, 5623, 10_000], "overrides": None, "pool": "extended"}, {}
        )
        == ext3
    )
    fig3 = dict(model="m", N=10_000, value_autocast=None, size_reason=None, default_n_max=1000, overrides=None)
    assert "the extended pool" in report.table_caption("fig3_sweep", {**fig3, "pool": "extended"}, {})
    assert "the extended pool" not in report.table_caption("fig3_sweep", fig3, {})


def test_a_table_recorded_without_configuration_keeps_its_recorded_caption():
    """A manifest entry without a configuration (written before notebooks recorded one), or one lacking a
    parameter the caption needs, keeps its recorded caption (older interval wording updated)."""
    old = {"caption": "Figure 4 data: x. 95% intervals: y."}
    assert report.regenerated_caption("fig4_delta_norms", old, {}) == "Figure 4 data: x."
    assert report.regenerated_caption("fig4_delta_norms", {**old, "config": {"model": "m"}}, {}) == "Figure 4 data: x."
    new = {**old, "config": {"model": "m", "n_edits": 7}}
    assert report.regenerated_caption("fig4_delta_norms", new, {}) == report.fig4_caption("m", 7)


@pytest.mark.parametrize(
    ("stem", "caption"),
    [
        (
            "table3_smollm2_bfloat16",
            lambda reason: report.table3_caption("smollm2", [100, 316, 1000], "bfloat16", {"v_fast": True}),
        ),
        ("fig4_delta_norms_smollm2_bfloat16", lambda reason: report.fig4_caption("smollm2", 100, "bfloat16")),
        (
            "table1_smollm2_bfloat16",
            lambda reason: report.table1_caption(["smollm2"], [100], "bfloat16", None, reason, 1000, None),
        ),
        (
            "table1_gemma3-270m_bfloat16",
            lambda reason: report.table1_caption(
                ["gemma3-270m"], [50], "bfloat16", {"v_fast": True}, reason, 1000, None
            ),
        ),
        (
            "table2_smollm2_bfloat16",
            lambda reason: report.table2_caption(["smollm2"], [200], "bfloat16", reason, 1000, {"v_fast": True}),
        ),
        (
            "fig3_sweep_smollm2_bfloat16",
            lambda reason: report.fig3_caption("smollm2", 200, "bfloat16", reason, 1000, {"v_fast": True}),
        ),
    ],
)
def test_the_caption_functions_keep_the_committed_wording(stem, caption):
    """The committed captions (today's interval wording) are the caption functions' output for the committed
    configurations (the reason for a reduced size read from the caption itself)."""
    recorded = report.current_caption(json.loads((TABLES / "manifest.json").read_text())[f"{stem}.csv"]["caption"])
    reason = recorded.split("default of 1,000: ", 1)[1].removesuffix(".") if "default of 1,000: " in recorded else None
    expected = caption(reason)
    assert expected == recorded


def test_delta_norm_frame_orders_rows_by_editor_layer_and_block():
    """Rows follow the editors' order, then the layer (numerically), a layer's MHSA before its FFN, whatever the
    order of a summary's delta_norms; the committed Fig. 4 data follows the same order."""
    norms = {
        "model.layers.10.mlp.down_proj.weight": 1.0,
        "model.layers.10.self_attn.o_proj.weight": 2.0,
        "model.layers.9.mlp.down_proj.weight": 3.0,
        "model.layers.9.self_attn.o_proj.weight": 4.0,
    }
    a = report.delta_norm_frame({"pmet-with-attn-weights": {"delta_norms": norms}, "pmet": {"delta_norms": {}}})
    b = report.delta_norm_frame({"pmet-with-attn-weights": {"delta_norms": dict(reversed(norms.items()))}})
    pd.testing.assert_frame_equal(a, b)
    assert list(zip(a.layer, a.weight)) == [(9, "MHSA"), (9, "FFN"), (10, "MHSA"), (10, "FFN")]
    committed = pd.read_csv(TABLES / "fig4_delta_norms_smollm2_bfloat16.csv")
    order = {m: i for i, m in enumerate(dict.fromkeys(committed.method))}
    key = committed.apply(lambda r: (order[r.method], r.layer, r.weight == "FFN"), axis=1)
    assert list(key) == sorted(key)
