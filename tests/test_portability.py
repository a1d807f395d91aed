"""Portability (EasyEdit's one-hop questions) joined to CounterFact by case_id and scored after editing."""

from types import SimpleNamespace

import pytest
import torch

from pmet.evaluation.portability import (
    load_portability,
    score_portability,
    summarize_portability,
)
from pmet.evaluation.scoring import prompt_ids, target_ids
from pmet.report import grid_table


def test_portability_fixture_questions_join_counterfact_by_case_id():
    """The test fixtures keep the one-hop questions of their full records (tests/fixtures/data/PROVENANCE.md)."""
    from pmet.data import load_counterfact

    q = load_portability()  # the fixtures (conftest)
    full = {r.case_id: r for r in load_counterfact("full")}
    assert sorted(q) == [34, 46, 76, 82, 87, 93, 99, 102] and set(q) <= set(full)
    assert all(len(pairs) == 1 and all(pairs[0]) for pairs in q.values())


def test_portability_questions_join_counterfact_by_case_id(full_data):
    from pmet.data import load_counterfact

    q = load_portability(full_data)
    assert len(q) == 1031  # SOURCES.md: every record of the one-hop file has a question
    full = {r.case_id: r for r in load_counterfact("full", data_dir=full_data)}
    assert set(q) <= set(full)
    spike = next(r for r in full.values() if r.subject == "Spike Hughes")
    ((question, answer),) = q[spike.case_id]
    assert "Spike Hughes" in question and answer == "Cheesesteaks" and spike.target_new == "Philadelphia"


def test_portability_is_teacher_forced_token_accuracy(tiny_models):
    model, tok = tiny_models["tiny-llama"]
    questions = {7: (("Where is the tower of Pisa?", "in Italy"),), 8: (("Who wrote it?", "Dante"), ("Q?", "A b"))}
    recs = [SimpleNamespace(case_id=7), SimpleNamespace(case_id=8), SimpleNamespace(case_id=9)]
    got = score_portability(model, tok, recs, questions)
    assert set(got) == {7, 8}  # record 9 has no question

    def by_hand(q, a):
        p, t = prompt_ids(tok, q), target_ids(tok, a)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
        pred = logits[len(p) - 1 : len(p) + len(t) - 1].argmax(-1).tolist()
        return sum(x == y for x, y in zip(pred, t)) / len(t)

    assert got[7] == pytest.approx(by_hand(*questions[7][0]))
    assert got[8] == pytest.approx((by_hand(*questions[8][0]) + by_hand(*questions[8][1])) / 2)
    s = summarize_portability({1: 1.0, 2: 0.5, 3: 0.0})
    assert s["portability"] == pytest.approx(50.0) and s["portability_n"] == 3
    assert s["portability_ci"][0] < 50.0 < s["portability_ci"][1]
    assert summarize_portability({}) == {}


def test_table_1_shows_portability_only_where_summaries_have_it():
    base = {"n_edits": 10, "score": 50.0, "efficacy": 90.0}
    plain = grid_table({"m": {"pmet": dict(base)}})
    assert "Portability" not in plain.columns
    with_p = grid_table(
        {
            "m": {
                "pmet": {**base, "portability": 12.5, "portability_ci": (5.0, 20.0), "portability_n": 7},
                "memit": dict(base),
            }
        }
    )
    assert list(with_p["Portability"]) == ["12.5 [5.0, 20.0]", "n/a"]
    assert list(with_p["n portability"]) == [7, 0]


def test_run_summaries_carry_portability(tiny_models, tmp_cache, tmp_path):
    from pmet.experiments import run_edit_eval, table_records
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    s = run_edit_eval(model, tok, RunSpec("tiny-llama", "none", n_edits=6), runs_dir=tmp_path, progress=False)
    have = sum(r.case_id in load_portability() for r in table_records("counterfact", 6))
    assert have > 0 and s["portability_n"] == have and 0 <= s["portability"] <= 100
    assert (next(tmp_path.rglob("summary.json")).parent / "portability.json").exists()
