"""Sequential runs reach tables/claims.md: saved as committed run files, read back without a model, and decided by
paired tests on the same edits and prompts (the "Sequential" block, beyond the paper)."""

import pandas as pd
import pytest

from pmet.claims import SEQ_BLOCK, SEQUENTIAL, detail_frame, write_claims
from pmet.runstore import iter_runs, read_run, write_run

SMALL = {"n_retention": 3, "n_known": 4, "ppl_tokens": 512, "eval_batch_size": 16, "progress": False}
VERDICTS = {"holds", "does not hold", "inconclusive", "not measured in these runs"}


def _seq(detail: pd.DataFrame) -> pd.DataFrame:
    return detail[detail.artifact == SEQUENTIAL].set_index("claim")


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_sequential_run_is_saved_and_read_back_by_the_ledger(tiny_models, tmp_cache, tmp_path):
    """2 rounds x 2 edits with PMET and MEMIT on tiny-llama, saved; the claims come from the saved files only."""
    from pmet.sequential import run_sequential, save_sequential_runs

    model, tok = tiny_models["tiny-llama"]
    runs = {
        m: run_sequential(model, tok, m, rounds=2, batch=2, runs_dir=tmp_path / "runs", **SMALL)
        for m in ("pmet", "memit")
    }
    paths = save_sequential_runs(runs, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").parts[:3] for p in paths] == [("results", "tiny-llama", "sequential")] * 2
    assert paths[0].name.startswith("pmet_r2x2_seed0_hp") and paths[0].name.endswith("_ret3_known4_ppl512.jsonl.gz")
    assert save_sequential_runs(runs, tmp_path / "out") == paths  # same run, same file

    stored = read_run(paths[0])
    last = runs["pmet"][-1]
    assert stored.spec["kind"] == "sequential" and stored.spec["method"] == "pmet"
    assert (stored.spec["rounds"], stored.spec["batch"], stored.spec["n_edits"]) == (2, 2, 4)
    assert stored.spec["n_retention"] == 3 and stored.spec["n_known"] == 4 and stored.spec["pool"] == "subset"
    # one row per edited record, in edit order, with the round that edited it and its values after the last round
    assert [r["round"] for r in stored.rows] == [1, 1, 2, 2]
    assert [r["case_id"] for r in stored.rows] == runs["pmet"][1]["new_ids"] + runs["pmet"][2]["new_ids"]
    for r in stored.rows:
        assert [r["efficacy"], r["generalization"], r["specificity"]] == last["records"][str(r["case_id"])]
    assert stored.summary["retained"] == last["retained"] and len(stored.summary["retained"]["known"]) == 4
    assert sum(stored.summary["retained"]["known"]) * 100 / 4 == pytest.approx(last["retention_known"])
    assert [r["round"] for r in stored.summary["rounds"]] == [0, 1, 2]
    assert stored.summary["rounds"][2]["delta_fro"] == pytest.approx(last["delta_fro"])
    assert stored.summary["efficacy"] == last["efficacy"] and "records" not in stored.summary

    # the one-batch readers never see it; the sequential reader does
    results = tmp_path / "out" / "results"
    assert list(iter_runs(results)) == [] and len(list(iter_runs(results, kind="sequential"))) == 2
    assert len(list(iter_runs(results, kind=None))) == 2

    ledger = write_claims(tmp_path / "out", n_resamples=99)
    seq = ledger[ledger.artifact == SEQUENTIAL]
    pm = seq[seq.claim.str.startswith("PMET > MEMIT")].set_index("claim")
    assert len(pm) == 4 and set(pm.verdict) <= VERDICTS and (pm.paper == "—").all()
    assert (pm.block == SEQ_BLOCK).all() and (pm.model == "tiny-llama").all()
    eff = pm.loc["PMET > MEMIT on efficacy of all past edits after the last round"]
    assert "after 2 rounds x 2 edits, 4 paired edits" in eff.ours
    assert "paired prompts" in pm.loc["PMET > MEMIT on retention of known facts after the last round"].ours
    # the null-space pairs were not run: one line each; descriptive lines for both methods
    missing = seq[seq.verdict == "not yet run with per-record results"]
    assert sorted(missing.claim) == [
        "MEMIT-ns (AlphaEdit) vs MEMIT after the last round (no run of both)",
        "PMET-ns vs PMET after the last round (no run of both)",
    ]
    desc = seq[seq.verdict == "descriptive (no test)"]
    assert len(desc) == 4 and desc.claim.str.contains("growth of total ‖ΔW‖_F").sum() == 2
    md = (tmp_path / "out" / "tables" / "claims.md").read_text()
    assert "beyond the paper (issue 19)" in md and "results/<model>/sequential/" in md


@pytest.mark.usefixtures("one_thread")
def test_a_committed_run_reads_back_as_run_and_is_reused_only_when_identical(
    tiny_models, tmp_cache, tmp_path, monkeypatch
):
    """load_sequential_run inverts save_sequential_run (same bytes when saved again), and run_sequential(committed=)
    returns the committed file of exactly its run without editing; any other specification runs."""
    import pmet.editing
    from pmet.sequential import (
        load_sequential_run,
        run_sequential,
        save_sequential_run,
        sequential_claims,
        sequential_frame,
    )

    model, tok = tiny_models["tiny-llama"]
    runs_dir = tmp_path / "runs"
    rows = run_sequential(model, tok, "memit", rounds=2, batch=2, runs_dir=runs_dir, **SMALL)
    path = save_sequential_run(rows, tmp_path / "repo")
    loaded = load_sequential_run(path)
    assert [r["round"] for r in loaded] == [0, 1, 2] and [r["new_ids"] for r in loaded] == [r["new_ids"] for r in rows]
    assert loaded[-1]["records"] == rows[-1]["records"] and loaded[-1]["retained"] == rows[-1]["retained"]
    assert loaded[-1]["spec"] == rows[-1]["spec"] and loaded[1]["weights"] == rows[1]["weights"]
    assert "records" not in loaded[1]  # the file keeps the last round's per-record values only
    columns = sorted(sequential_frame(rows).columns)  # the file stores keys sorted
    assert sequential_frame(loaded)[columns].equals(sequential_frame(rows)[columns])
    assert sequential_claims({"memit": loaded}) == sequential_claims({"memit": rows})
    again = save_sequential_run(loaded, tmp_path / "again")
    assert again.read_bytes() == path.read_bytes()

    calls = []
    real = pmet.editing.edit
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: calls.append(1) or real(*a, **k))
    fresh = tmp_path / "other-runs"  # an empty run cache: only the committed file can answer without editing
    reused = run_sequential(
        model, tok, "memit", rounds=2, batch=2, runs_dir=fresh, committed=tmp_path / "repo", **SMALL
    )
    assert calls == [] and reused == loaded
    run_sequential(model, tok, "memit", rounds=1, batch=2, runs_dir=fresh, committed=tmp_path / "repo", **SMALL)
    assert calls == [1]  # another length: no committed file of that run
    other = {**SMALL, "n_known": 3}
    run_sequential(model, tok, "memit", rounds=2, batch=2, runs_dir=fresh, committed=tmp_path / "repo", **other)
    assert calls == [1, 1, 1]  # another specification is not reused


def _write_seq(tmp_path, method, eff, gen=None, known=None, seed=0, rounds=2, batch=10, model="m", tag="", **spec):
    """A synthetic sequential run file: ``eff``/``gen`` per edited record, ``known`` per known-fact prompt."""
    n = len(eff)
    gen = gen if gen is not None else eff
    rows = [
        {"case_id": i, "round": 1 + i // batch, "efficacy": e, "generalization": g, "specificity": 1.0}
        for i, (e, g) in enumerate(zip(eff, gen))
    ]
    known = known if known is not None else [1] * 8
    per_round = [
        {"round": t, "n_edits": t * batch, "efficacy": 100.0 - 30 * t, "delta_fro": 2.0**t if t else 0.0}
        for t in range(rounds + 1)
    ]
    head = {
        "kind": "sequential",
        "model": model,
        "dataset": "counterfact",
        "method": method,
        "n_edits": n,
        "rounds": rounds,
        "batch": batch,
        "seed": seed,
        "n_retention": 2,
        "n_known": len(known),
        "hparams_id": method,
        **spec,
    }
    summary = {"rounds": per_round, "retained": {"neighborhood": [1] * 6, "known": known}}
    path = tmp_path / "results" / model / "sequential" / f"{method}_r{rounds}x{batch}_seed{seed}{tag}.jsonl.gz"
    return write_run(path, head, summary, rows)


def test_verdicts_on_synthetic_sequential_runs_with_known_answers(tmp_path):
    """20 edits: PMET all 1s and MEMIT all 0s -> holds (McNemar 20:0, p = 2^-19); PMET-ns identical to PMET ->
    inconclusive; MEMIT-ns all 1s vs MEMIT all 0s -> holds; the opposite sign -> does not hold."""
    ones, zeros = [1.0] * 20, [0.0] * 20
    _write_seq(tmp_path, "pmet", ones, known=[1] * 8)
    _write_seq(tmp_path, "memit", zeros, known=[0] * 8)
    _write_seq(tmp_path, "pmet-ns", ones, known=[1] * 8, overrides={"null_space_threshold": 1e-4})
    _write_seq(tmp_path, "memit-ns", ones, gen=[0.5] * 20, known=[0] * 8)
    seq = _seq(detail_frame(tmp_path / "results", n_resamples=999))
    assert len(seq) == 12 and (seq.model == "m").all() and seq.ledger.all()  # null-space overrides: same block
    eff = seq.loc["PMET > MEMIT on efficacy of all past edits after the last round"]
    assert eff.test.startswith("exact McNemar (20:0") and eff.p == pytest.approx(2 * 0.5**20)
    assert eff["diff"] == pytest.approx(100.0) and eff.n_pairs == 20 and eff.verdict == "holds"
    assert eff.p_holm >= eff.p
    assert seq.loc["PMET > MEMIT on retention of known facts after the last round"].test.startswith(
        "exact McNemar (8:0"
    )
    for metric in ("efficacy", "generalization", "retention of neighbourhood prompts", "retention of known facts"):
        suffix = metric if metric.startswith("retention") else f"{metric} of all past edits"
        row = seq.loc[f"PMET-ns > PMET on {suffix} after the last round"]
        assert row.verdict == "inconclusive" and row["diff"] == 0, metric
    assert seq.loc["MEMIT-ns (AlphaEdit) > MEMIT on efficacy of all past edits after the last round"].verdict == "holds"
    gen = seq.loc["MEMIT-ns (AlphaEdit) > MEMIT on generalization of all past edits after the last round"]
    assert gen.test == "sign-flip permutation" and gen["diff"] == pytest.approx(50.0) and gen.verdict == "holds"
    # the 8 retention prompts alone (8:0 discordant, p = 2^-7 before Holm over the block's 12 claims): not enough
    assert seq.loc["PMET > MEMIT on retention of known facts after the last round"].verdict == "inconclusive"

    # swapped roles: MEMIT better than PMET -> "does not hold" (PMET collapses earlier)
    _write_seq(tmp_path, "pmet", zeros)
    _write_seq(tmp_path, "memit", ones)
    seq = _seq(detail_frame(tmp_path / "results", n_resamples=999))
    assert seq.loc["PMET > MEMIT on efficacy of all past edits after the last round"].verdict == "does not hold"


def test_sequential_runs_pair_only_the_same_edits_and_prompts(tmp_path):
    """Another run shape, record pool or precision is another key, never paired; seeds are pooled within seed."""
    ones, zeros = [1.0] * 20, [0.0] * 20
    _write_seq(tmp_path, "pmet", ones)
    _write_seq(tmp_path, "memit", zeros, rounds=4, batch=5)  # the same 20 edits count, other rounds
    _write_seq(tmp_path, "memit", zeros, tag="_full", pool="full")
    _write_seq(tmp_path, "memit", zeros, tag="_bf16", value_autocast="bfloat16")
    assert detail_frame(tmp_path / "results", n_resamples=99).empty
    _write_seq(tmp_path, "memit", zeros)
    _write_seq(tmp_path, "pmet", ones[:10] + zeros[:10], seed=1)
    _write_seq(tmp_path, "memit", zeros, seed=1)
    seq = _seq(detail_frame(tmp_path / "results", n_resamples=999))
    eff = seq.loc["PMET > MEMIT on efficacy of all past edits after the last round"]
    assert eff.seeds == [0, 1] and eff.n_pairs == 40 and eff.test.startswith("exact McNemar (30:0")
    assert [round(d, 1) for d in eff.per_seed_diff] == [100.0, 50.0]


def test_the_ledger_says_when_no_sequential_run_is_committed(tmp_path):
    """No sequential run file: one line, not yet run; the header states the block's rules; the descriptive lines
    read the per-round summaries."""
    ledger = write_claims(tmp_path, n_resamples=99)
    seq = ledger[ledger.artifact == SEQUENTIAL]
    assert len(seq) == 1 and seq.iloc[0].verdict == "not yet run with per-record results"
    assert seq.iloc[0].model == "—" and seq.iloc[0].paper == "—" and seq.iloc[0].block == SEQ_BLOCK
    assert "beyond the paper (issue 19)" in (tmp_path / "tables" / "claims.md").read_text()

    _write_seq(tmp_path, "pmet", [1.0] * 20)  # efficacy 70% after round 1, 40% after round 2; ‖ΔW‖ 2 -> 4
    ledger = write_claims(tmp_path, n_resamples=99)
    seq = ledger[ledger.artifact == SEQUENTIAL].set_index("claim")
    assert seq.loc["PMET: first round where efficacy of all past edits < 50%"].ours.startswith("round 2 (20 edits)")
    assert seq.loc["PMET: growth of total ‖ΔW‖_F from round 1 to the last round"].ours.startswith(
        "2 after round 1, 4 after round 2: x2.00"
    )
    assert len(seq[seq.verdict == "not yet run with per-record results"]) == 3  # no pair of editors ran

    # a block holding only editors of no pair (ROME, whose spec has no v_fast: a block of its own) misses nothing
    _write_seq(tmp_path, "rome", [1.0] * 20, tag="_rome", overrides={"v_fast": False})
    ledger = write_claims(tmp_path, n_resamples=99)
    seq = ledger[ledger.artifact == SEQUENTIAL]
    rome = seq[seq.model != "m"]
    assert len(rome) == 2 and rome.claim.str.startswith("ROME: ").all()
    assert len(seq[seq.verdict == "not yet run with per-record results"]) == 3  # still PMET's three pairs
