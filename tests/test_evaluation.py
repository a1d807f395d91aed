"""Tests of pmet.evaluation on tiny random models (fast) and synthetic records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from pmet.data import CounterFactRecord, ZsreRecord
from pmet.evaluation import (
    ResultsFile,
    bootstrap_ci,
    compute_n_gram_entropy,
    evaluate_counterfact,
    evaluate_zsre,
    harmonic_mean,
    mean_ci,
    normal_ci,
    paired_test,
    score_pairs,
    summarize_counterfact,
    summarize_zsre,
)
from pmet.evaluation.generation import ConsistencyScorer, generate_fast, n_gram_entropy
from pmet.evaluation.results import load_results
from pmet.evaluation.scoring import fast_path_ok, prompt_ids, target_ids
from pmet.evaluation.summarize import summarize_file


def _cf(case_id, new, true, schema="original", gen=()):
    return CounterFactRecord(
        case_id=case_id,
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new=new,
        target_true=true,
        relation_id="P103",
        paraphrase_prompts=("Danielle Darrieux spoke the language", "Danielle Darrieux, a native"),
        neighborhood_prompts=("The mother tongue of Paris is", "The native language of Rome is", "Apple makes the"),
        attribute_prompts=("Michael Jordan is a native speaker of",) if schema == "original" else (),
        generation_prompts=tuple(gen),
        neighborhood_target=true,
        schema=schema,
    )


def _naive_scores(model, tok, pairs):
    """Reference: one sequence at a time, full logits, log_softmax."""
    out = []
    with torch.no_grad():
        for p, t in pairs:
            p_ids, t_ids = prompt_ids(tok, p), target_ids(tok, t)
            x = torch.tensor([p_ids + t_ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            nll = [-logp[len(p_ids) + j - 1, tk].item() for j, tk in enumerate(t_ids)]
            cor = [logp[len(p_ids) + j - 1].argmax().item() == tk for j, tk in enumerate(t_ids)]
            out.append((np.array(nll), np.array(cor)))
    return out


PAIRS = [
    ("The capital of France is", "Paris"),
    ("The capital of France is", "London"),
    ("The capital of France is", "Rome is the capital of Italy"),  # long target shares a row prefix
    ("The capital of France is", "Rome"),
    ("Apple makes the", "iPhone"),
    ("Michael Jordan plays", "basketball"),
    ("Michael Jordan plays", "basketball"),  # duplicate pair
    ("Toko Yasuda plays the", "guitar"),
]


# ------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("fast", [True, False])
def test_batched_scoring_equals_naive_full_logits(tiny, fast):
    model, tok = tiny
    assert fast_path_ok(model)
    got = score_pairs(model, tok, PAIRS, fast=fast, max_batch_tokens=40)  # several batches
    ref = _naive_scores(model, tok, PAIRS)
    for g, (nll, cor) in zip(got, ref):
        np.testing.assert_allclose(g.token_nll, nll, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(g.token_correct, cor)


def test_leading_space_and_target_tokens(tiny_models):
    _, tok = tiny_models["tiny-gpt2"]
    assert target_ids(tok, "Paris") == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert target_ids(tok, "Paris", leading_space=False) == tok("Paris", add_special_tokens=False)["input_ids"]


def _force_token(model, tok_id: int):
    """Make ``tok_id`` the argmax everywhere: final norm weight 0 and a huge bias on that logit (or a
    dominant unembedding row through a constant hidden direction when the head has no bias)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        if head.bias is not None:
            head.bias.zero_()
            head.bias[tok_id] = 1e4
            head.weight.zero_()
        else:
            # final norm maps everything onto its bias/const; for bias-free norms scale the weight row
            head.weight.mul_(0.0)
            head.weight[tok_id] = 1.0
            norm = model.get_submodule(model.layout.final_norm)
            if getattr(norm, "bias", None) is not None:
                norm.weight.zero_()
                norm.bias.fill_(1.0)
            else:  # RMSNorm: hidden direction varies, so make the logit large in every direction
                head.weight[tok_id] = 0.0
                raise pytest.skip.Exception("bias-free final norm")


@pytest.mark.parametrize("name", ["tiny-gptj", "tiny-gpt2", "tiny-neox"])
def test_forced_token_gives_efficacy_one_specificity_zero(name):
    from pmet import load_model

    model, tok = load_model(name)  # fresh copy: weights are modified
    new, true = "Paris", "London"
    forced = target_ids(tok, new)[0]
    assert len(target_ids(tok, new)) == 1 and target_ids(tok, true)[0] != forced
    _force_token(model, forced)
    recs = [_cf(0, new, true), _cf(1, new, true, schema="reduced")]
    rows = evaluate_counterfact(model, tok, recs, generation=False, progress=False)
    for r in rows:
        assert r["efficacy"] == 1.0 and r["generalization"] == 1.0 and r["specificity"] == 0.0
        assert r["efficacy_acc"] == 1.0 and r["specificity_acc"] == 0.0
        assert r["efficacy_diff"] > 0.99 and r["specificity_diff"] < -0.99
    s = summarize_counterfact(rows)
    assert s["efficacy"] == 100.0 and s["specificity"] == 0.0 and s["score"] == 0.0
    assert s["efficacy_n"] == 2

    zrec = ZsreRecord(
        case_id=0,
        subject="France",
        src="What is the capital of France?",
        rephrase="Which city is the capital of France?",
        answer="London",
        true_answers=(new,),
        loc="nq question: what does apple make",
        loc_ans="iPhone",
        pred="",
    )
    zrows = evaluate_zsre(model, tok, [zrec], progress=False)  # target="memit": answers[0] = Paris
    assert zrows[0]["efficacy"] == 1.0 and zrows[0]["generalization"] == 1.0
    assert zrows[0]["specificity"] == 0.0
    zalt = evaluate_zsre(model, tok, [zrec], progress=False, target="alt")
    assert zalt[0]["efficacy"] == 0.0


def test_zsre_prompt_formatting(tiny_models, monkeypatch):
    import pmet.evaluation.zsre as z

    model, tok = tiny_models["tiny-llama"]
    seen = []
    real = z.score_id_pairs

    def spy(model, pairs, **kw):
        seen.extend(pairs)
        return real(model, pairs, **kw)

    monkeypatch.setattr(z, "score_id_pairs", spy)
    rec = ZsreRecord(
        case_id=3,
        subject="France",
        src="What is the capital of France?",
        rephrase="Which city is the capital of France?",
        answer="Rome",
        true_answers=("Paris",),
        loc="nq question: who plays the guitar",
        loc_ans="Toko Yasuda",
        pred="",
    )
    z.evaluate_zsre(model, tok, [rec], progress=False)
    assert seen[0] == (prompt_ids(tok, rec.src), target_ids(tok, "Paris"))
    assert seen[1] == (prompt_ids(tok, rec.rephrase), target_ids(tok, "Paris"))
    assert seen[2] == (prompt_ids(tok, rec.loc + "?"), tok(" Toko Yasuda", add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------ statistics
def test_harmonic_mean_matches_scipy():
    vals = [15.2, 17.7, 83.5]
    assert harmonic_mean(vals) == pytest.approx(st.hmean(vals))
    assert harmonic_mean([0.0, 50.0, 90.0]) == 0.0
    assert math.isnan(harmonic_mean([]))


def test_normal_and_bootstrap_ci_against_scipy():
    rng = np.random.default_rng(1)
    x = rng.random(200)
    c = normal_ci(x)
    h = st.norm.ppf(0.975) * x.std(ddof=1) / np.sqrt(x.size)
    assert c.mean == pytest.approx(x.mean()) and c.low == pytest.approx(x.mean() - h)
    assert c.high == pytest.approx(x.mean() + h) and c.n == 200 and c.method == "normal"
    lo, hi = st.t.interval(0.95, x.size - 1, loc=x.mean(), scale=st.sem(x))  # close to normal for n=200
    assert c.low == pytest.approx(lo, abs=2e-3) and c.high == pytest.approx(hi, abs=2e-3)
    b = bootstrap_ci(x, seed=3)
    ref = st.bootstrap((x,), np.mean, rng=np.random.default_rng(3), n_resamples=9999)
    assert b.low == pytest.approx(ref.confidence_interval.low) and b.high == pytest.approx(ref.confidence_interval.high)
    assert bootstrap_ci(x, seed=3) == b  # seeded, deterministic
    const = mean_ci([1.0] * 10, method="bootstrap")
    assert (const.low, const.high) == (1.0, 1.0)
    assert mean_ci([1.0, None, float("nan"), 0.0]).n == 2


def test_paired_tests():
    rng = np.random.default_rng(0)
    a = rng.random(60)
    b = a - 0.2 + 0.01 * rng.standard_normal(60)
    res = paired_test(a, b)
    assert res["method"] == "permutation" and res["pvalue"] < 0.01 and res["mean_diff"] == pytest.approx(0.2, abs=0.01)
    w = paired_test(a, b, method="wilcoxon")
    assert w["pvalue"] == pytest.approx(st.wilcoxon(a, b).pvalue)
    same = paired_test(a, a)
    assert same["pvalue"] == 1.0
    assert paired_test(a, a + 1e-3 * rng.standard_normal(60))["pvalue"] > 0.01
    from pmet.evaluation import compare_rows

    ra = [{"case_id": i, "efficacy": float(v)} for i, v in enumerate(a)]
    rb = [{"case_id": i, "efficacy": float(v)} for i, v in reversed(list(enumerate(b)))]
    rb += [{"case_id": 99, "efficacy": 1.0}]
    cmp = compare_rows(ra, rb, "efficacy")
    assert cmp["n"] == 60 and cmp["pvalue"] == res["pvalue"] and cmp["mean_diff"] == pytest.approx(res["mean_diff"])


# ------------------------------------------------------------------------------------------ generation
def test_fluency_repeated_lower_than_varied():
    rep = "the the the the the the the the the the the the the the the the"
    varied = "The mother tongue of Danielle Darrieux is French, and she was born in Bordeaux in 1917 ."
    assert compute_n_gram_entropy(rep) < compute_n_gram_entropy(varied)
    assert compute_n_gram_entropy(rep) == 0.0
    # ROME's weights: mean(2/3 * H2, 4/3 * H3); 4 distinct words -> 3 bigrams, 2 trigrams, all unique
    expected = np.mean([2 / 3 * np.log2(3), 4 / 3 * np.log2(2)])
    assert compute_n_gram_entropy("a b c d") == pytest.approx(expected)
    assert n_gram_entropy([rep, varied]) == pytest.approx(
        (compute_n_gram_entropy(rep) + compute_n_gram_entropy(varied)) / 2
    )


def test_generation_deterministic_and_batch_independent(tiny_models):
    model, tok = tiny_models["tiny-llama"]
    prompts = ["The capital of France is", "Apple makes the iPhone and", "Paris"]
    keys = [(0, 0), (0, 1), (1, 0)]
    a = generate_fast(model, tok, prompts, keys=keys, max_out_len=20, seed=0, batch_size=3)
    b = generate_fast(model, tok, prompts, keys=keys, max_out_len=20, seed=0, batch_size=1)
    c = generate_fast(model, tok, prompts, keys=keys, max_out_len=20, seed=1, batch_size=3)
    assert a == b and a != c
    for text, p in zip(a, prompts):
        assert text.startswith(p) and len(text) > len(p)


def test_generation_matches_unpadded_sampling(tiny):
    """Left-padded batched decoding gives the same continuation as decoding each prompt alone."""
    model, tok = tiny
    prompts = ["The capital of France is", "Paris"]
    batched = generate_fast(model, tok, prompts, max_out_len=16, batch_size=2)
    single = [generate_fast(model, tok, [p], keys=[i], max_out_len=16, batch_size=1)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_consistency_proxy(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for rel in (
        "wikitext/wikitext-103-train-head/wiki.train.tokens.head.txt",
        "wikitext/wikitext-2-raw/wiki.valid.raw.txt",
        "wikitext/wikitext-2-raw/wiki.test.raw.txt",
    ):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            " = Title = \n English is spoken in England and London . \n Paris is in France . \n"
            " The cat sat on the mat . \n"
        )
    scorer = ConsistencyScorer(data_dir=root)
    assert scorer.metric_name == "consistency_proxy"
    rec = _cf(0, "English", "French")
    refs, source = scorer.references(rec)
    assert source == "corpus" and all("English" in r for r in refs)
    good = scorer.score(rec, ["English is spoken in England."])["consistency_proxy"]
    bad = scorer.score(rec, ["The cat sat on the mat."])["consistency_proxy"]
    assert 0 <= bad < good <= 1
    rec2 = _cf(1, "Klingon", "French")
    refs2, source2 = scorer.references(rec2)
    assert source2 == "attribute_prompts" and refs2 == ["Michael Jordan is a native speaker of Klingon"]


def test_counterfact_generation_only_full_records(tiny_models, tmp_path, monkeypatch):
    model, tok = tiny_models["tiny-gpt2"]

    class DummyScorer:
        metric_name = "consistency_proxy"

        def score(self, record, texts):
            return {"consistency_proxy": 0.5, "consistency_source": "corpus", "n_references": 1}

    recs = [
        _cf(0, "Paris", "London", gen=("The capital of France is", "Paris is")),
        _cf(1, "Paris", "London", schema="reduced"),
    ]
    rows = evaluate_counterfact(
        model, tok, recs, generation=True, progress=False, consistency=DummyScorer(), max_out_len=12
    )
    assert "fluency" in rows[0] and len(rows[0]["generated"]) == 2
    assert "fluency" not in rows[1]
    s = summarize_counterfact(rows)
    assert s["efficacy_n"] == 2 and s["fluency_n"] == 1 and s["consistency_proxy_n"] == 1
    assert s["consistency_proxy"] == pytest.approx(50.0)
    assert s["fluency"] == pytest.approx(100 * rows[0]["fluency"])
    from pmet.evaluation import counterfact_table

    table = counterfact_table({"tiny": s})
    assert "Consistency (proxy)" in table.columns


# ---------------------------------------------------------------------------------------------- results
def test_resume_skips_done_records(tiny_models, tmp_path, monkeypatch):
    import pmet.evaluation.counterfact as cfmod

    model, tok = tiny_models["tiny-neox"]
    recs = [_cf(i, "Paris", "London") for i in range(5)]
    out = tmp_path / "cf.jsonl"
    first = evaluate_counterfact(model, tok, recs[:3], generation=False, progress=False, out_path=out, batch_size=2)
    # simulate a crash mid-write: a partial trailing line
    with open(out, "a") as f:
        f.write('{"case_id": 4, "effic')
    seen = []
    real = cfmod._score_records

    def spy(model, tok, chunk, *a):
        seen.extend(r.case_id for r in chunk)
        return real(model, tok, chunk, *a)

    monkeypatch.setattr(cfmod, "_score_records", spy)
    rows = evaluate_counterfact(model, tok, recs, generation=False, progress=False, out_path=out, batch_size=2)
    assert seen == [3, 4]
    assert [r["case_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["efficacy"] == first[0]["efficacy"]
    meta, stored = load_results(out)
    assert meta["dataset"] == "counterfact" and sorted(r["case_id"] for r in stored) == [0, 1, 2, 3, 4]
    assert summarize_file(out)["n_records"] == 5
    with pytest.raises(ValueError):  # settings clash: file was written without generation
        evaluate_counterfact(model, tok, recs, generation=True, progress=False, out_path=out)


def test_results_file_roundtrip(tmp_path):
    f = ResultsFile(tmp_path / "r.jsonl", {"dataset": "zsre"})
    f.append([{"case_id": 1, "efficacy": np.float32(0.5), "x": np.array([True, False])}])
    g = ResultsFile(tmp_path / "r.jsonl", {"dataset": "zsre"})
    assert g.done_ids() == {1} and g.get(1)["x"] == [True, False]
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"_meta": {"dataset": "zsre"}}


def test_zsre_summary(tiny_models):
    model, tok = tiny_models["tiny-gptj"]
    recs = [
        ZsreRecord(
            case_id=i,
            subject="France",
            src="What is the capital of France?",
            rephrase="Which city is the capital of France?",
            answer="Rome",
            true_answers=("Paris is big",),
            loc="nq question: who plays the guitar",
            loc_ans="Toko Yasuda",
            pred="",
        )
        for i in range(3)
    ]
    rows = evaluate_zsre(model, tok, recs, progress=False, batch_size=2)
    s = summarize_zsre(rows, ci="bootstrap")
    assert s["n_records"] == 3 and s["ci_method"] == "bootstrap"
    n_tok = len(target_ids(tok, "Paris is big"))
    assert rows[0]["efficacy"] in {k / n_tok for k in range(n_tok + 1)}


def test_consistency_exact_rome_files(tmp_path):
    """With ROME's three files present the exact metric is used: TF-IDF with the given idf and vocabulary."""
    vocab = {"english": 0, "spoken": 1, "england": 2, "cat": 3, "mat": 4}
    idf = np.array([1.5, 2.0, 2.5, 1.0, 3.0])
    np.save(tmp_path / "idf.npy", idf)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab))
    snips = [
        {
            "relation_id": "P103",
            "target_id": "Q1860",
            "samples": [{"name": "X", "text": "English is spoken in England."}, {"name": "Y", "text": "English mat"}],
        }
    ]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snips))
    scorer = ConsistencyScorer(data_dir=tmp_path)
    assert scorer.metric_name == "consistency" and scorer.exact
    rec = CounterFactRecord(
        case_id=0,
        subject="S",
        prompt="{} speaks",
        target_new="English",
        target_true="French",
        relation_id="P103",
        target_new_id="Q1860",
    )
    gen = ["English cat cat"]
    got = scorer.score(rec, gen)
    assert got["consistency_source"] == "attribute_snippets" and got["n_references"] == 2

    def vec(text):
        words = [w for w in text.lower().replace(".", " ").split() if w in vocab]
        v = np.zeros(5)
        for w in words:
            v[vocab[w]] += 1
        v *= idf
        return v / np.linalg.norm(v)

    a, b = vec(" ".join(gen)), vec("English is spoken in England. English mat")
    assert got["consistency"] == pytest.approx(float(a @ b))


# ------------------------------------------------------------------------- speed paths (issue 20)
def test_bucketed_batches_cover_rows_and_pad_less():
    from pmet.evaluation.scoring import _batches

    lengths = [5, 9, 9, 7, 12, 5, 5, 8, 30, 7, 6, 6, 11]
    for min_tokens in (None, 1, 20):
        batches = _batches(lengths, max_tokens=64, max_rows=4, min_tokens=min_tokens)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(lengths)))
        assert all(len(b) <= 4 and len(b) * max(lengths[i] for i in b) <= max(64, max(lengths)) for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    assert padded(_batches(lengths, 64, 4, 1)) == sum(lengths)  # a new batch at every length change
    assert (
        padded(_batches(lengths, 64, 4, 1))
        <= padded(_batches(lengths, 64, 4, 20))
        <= padded(_batches(lengths, 64, 4, None))
    )


@pytest.mark.parametrize("fast", [True, False])
def test_bucketed_scoring_equals_legacy_packing(tiny, fast):
    model, tok = tiny
    got = score_pairs(model, tok, PAIRS, fast=fast, max_batch_tokens=64, min_batch_tokens=1)
    old = score_pairs(model, tok, PAIRS, fast=fast, max_batch_tokens=64, min_batch_tokens=None)
    for g, o in zip(got, old):
        np.testing.assert_allclose(g.token_nll, o.token_nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g.token_correct, o.token_correct)


def _varied_records(n=6):
    subjects = ["Danielle Darrieux", "Paris", "Toko Yasuda", "Apple A5", "Michael Jordan", "Rome"]
    news = ["English", "the French language", "guitar", "Google", "basketball player", "Italy and Spain"]
    recs = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        recs.append(
            CounterFactRecord(
                case_id=i,
                subject=s,
                prompt="The mother tongue of {} is",
                target_new=news[i % len(news)],
                target_true=news[(i + 1) % len(news)],
                relation_id="P103",
                paraphrase_prompts=(f"{s} spoke the language", f"It rains. {s}, a native" + " really" * i),
                neighborhood_prompts=tuple(f"The native language of {x} is" for x in subjects[: 2 + i % 4]),
                attribute_prompts=(),
                generation_prompts=(f"{s} is", f"The language of {s} is"),
                neighborhood_target=news[(i + 1) % len(news)],
                schema="original",
            )
        )
    return recs


def test_counterfact_and_zsre_fast_equal_legacy(tiny_models):
    model, tok = tiny_models["tiny-llama"]
    recs = _varied_records()
    fast = evaluate_counterfact(model, tok, recs, generation=False, progress=False, impl="fast")
    old = evaluate_counterfact(model, tok, recs, generation=False, progress=False, impl="legacy")
    for a, b in zip(fast, old):
        for m in ("efficacy", "generalization", "specificity", "efficacy_acc", "specificity_diff"):
            assert a[m] == pytest.approx(b[m], abs=1e-6)
        for g in ("rewrite", "paraphrase", "neighborhood"):
            for x, y in zip(a[g], b[g]):
                assert x["target_new"] == pytest.approx(y["target_new"], abs=1e-5)
                assert x["target_true"] == pytest.approx(y["target_true"], abs=1e-5)
    zrecs = [
        ZsreRecord(
            case_id=i,
            src=f"What is the capital of {c}?",
            rephrase=f"Capital city of {c}?",
            true_answers=(a,),
            answer=a,
            loc=f"nq question: who wrote {c}",
            loc_ans="the author of it",
            subject=c,
            pred="",
        )
        for i, (c, a) in enumerate([("France", "Paris"), ("Italy", "Rome city"), ("Spain", "Madrid is it")])
    ]
    zf = evaluate_zsre(model, tok, zrecs, progress=False, impl="fast")
    zl = evaluate_zsre(model, tok, zrecs, progress=False, impl="legacy")
    for a, b in zip(zf, zl):
        assert a["rewrite_correct"] == b["rewrite_correct"] and a["neighborhood_correct"] == b["neighborhood_correct"]
        assert a["rewrite_nll"] == pytest.approx(b["rewrite_nll"], abs=1e-5)
    with pytest.raises(ValueError, match="impl"):
        evaluate_zsre(model, tok, zrecs, progress=False, impl="nope")


def test_static_generation_equals_legacy_shapes_and_seeds(tiny):
    from pmet.evaluation.generation import _decode_legacy, _decode_static
    from pmet.evaluation.scoring import body_and_head

    model, tok = tiny
    prompts = ["The capital of France is", "Apple makes the iPhone and", "Paris", "a b c d e f g h"]
    keys = [(0, j) for j in range(4)]
    static = generate_fast(model, tok, prompts, keys=keys, max_out_len=18, impl="static", batch_size=4)
    legacy = generate_fast(model, tok, prompts, keys=keys, max_out_len=18, impl="legacy", batch_size=4)
    one_by_one = [
        generate_fast(model, tok, [p], keys=[k], max_out_len=18, batch_size=1)[0] for p, k in zip(prompts, keys)
    ]
    assert static == legacy == one_by_one
    assert static != generate_fast(model, tok, prompts, keys=keys, max_out_len=18, seed=1)
    # the decoders themselves: one token per step per row, the same ids
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    u = torch.rand(2, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = _decode_static(model, body_and_head(model), ids, mask, u, 9, 5)
        b = _decode_legacy(model, body_and_head(model), ids, mask, u, 9, 5)
    assert a.shape == (2, 9) and torch.equal(a, b)
    with pytest.raises(ValueError, match="impl"):
        generate_fast(model, tok, prompts, impl="nope")


def test_generation_bf16_option(tiny_models, tmp_path):
    model, tok = tiny_models["tiny-llama"]
    prompts = ["The capital of France is", "Paris"]
    a = generate_fast(model, tok, prompts, max_out_len=14, dtype="bfloat16")
    b = generate_fast(model, tok, prompts, max_out_len=14, dtype=torch.bfloat16)
    assert a == b and len(a) == 2 and all(t.startswith(p) for t, p in zip(a, prompts))
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched

    class DummyScorer:
        metric_name = "consistency_proxy"

        def score(self, record, texts):
            return {"consistency_proxy": 0.5, "consistency_source": "corpus", "n_references": 1}

    recs = _varied_records(2)
    out = tmp_path / "cf.jsonl"
    evaluate_counterfact(
        model,
        tok,
        recs,
        generation=True,
        progress=False,
        consistency=DummyScorer(),
        max_out_len=12,
        out_path=out,
        gen_dtype="bfloat16",
    )
    assert load_results(out)[0]["gen_dtype"] == "bfloat16"
    with pytest.raises(ValueError):  # a float32 run cannot resume a bf16 file
        evaluate_counterfact(
            model,
            tok,
            recs,
            generation=True,
            progress=False,
            consistency=DummyScorer(),
            max_out_len=12,
            out_path=out,
            gen_dtype="float32",
        )


def test_batched_generation_eval_resumes_from_partial_file(tiny_models, tmp_path):
    model, tok = tiny_models["tiny-gpt2"]

    class DummyScorer:
        metric_name = "consistency_proxy"

        def score(self, record, texts):
            return {"consistency_proxy": 0.5, "consistency_source": "corpus", "n_references": 1}

    recs = _varied_records(5)
    kw = dict(generation=True, progress=False, consistency=DummyScorer(), max_out_len=12, batch_size=2)
    full = evaluate_counterfact(model, tok, recs, **kw)
    out = tmp_path / "cf.jsonl"
    evaluate_counterfact(model, tok, recs[:3], out_path=out, **kw)
    with open(out, "a") as f:
        f.write('{"case_id": 3, "generated": ["tru')  # interrupted write
    resumed = evaluate_counterfact(model, tok, recs, out_path=out, **kw)
    assert [r["case_id"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["generated"] == b["generated"] and a["efficacy"] == b["efficacy"]
    assert len(load_results(out)[1]) == 5
