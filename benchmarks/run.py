"""pmet's performance benchmark: prints a table and writes a JSON file.

    python -m benchmarks.run --model smollm2 --n 16 --out benchmarks/results/latest.json

Stages (each measured in this one run, on the same machine, with fresh caches in a temporary folder):

* value optimisation: requests/hour of the batched path (``v_batch_size = n``) and of one request at a
  time (``v_batch_size = 1``), their ratio, and forward+backward tokens per request;
* key statistics: tokens/s of the streamed E[kk^T] for the critical layers, and of a bare forward pass
  over the same tokens up to the same layer, and their ratio;
* the Eq. 9 update: solve time per layer;
* evaluation: CounterFact records/s without and with generation (``--gen-records``) and zsRE records/s;
* ROME: seconds per sequential edit (``--rome-edits`` edits, key statistics excluded), in float32 and with
  its value optimisation under autocast, and the relative difference of the two Δ's;
* end to end: a PMET CounterFact run of ``n`` edits (values + update + evaluation without generation),
  under bf16 autocast unless ``--autocast none``, extrapolated to 1,000 and 10,000 edits as the run's
  once-only cost (key statistics, context prefixes) plus ``n`` times its per-edit cost.

Peak resident memory (ru_maxrss) is read after each stage. Numbers depend on the machine; the README
quotes the latest run together with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=16, help="CounterFact requests for values / end to end")
    p.add_argument("--n-single", type=int, default=4, help="requests timed one at a time (extrapolated per hour)")
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--eval-records", type=int, default=50)
    p.add_argument("--gen-records", type=int, default=4, help="CounterFact records evaluated with generation")
    p.add_argument("--rome-edits", type=int, default=4, help="sequential ROME edits timed (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--autocast",
        default="bfloat16",
        choices=["bfloat16", "none"],
        help="also time the batched values under this autocast dtype (and use it end to end)",
    )
    p.add_argument("--out", default=None)
    p.add_argument(
        "--values-speed",
        action="store_true",
        help="also run benchmarks.values_speed (issue 20's value benchmark, ~5-10 min quiet) at the end",
    )
    a = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="pmet-bench-")
    os.environ["PMET_CACHE_DIR"] = work  # nothing reused from earlier runs (model weights re-cached once)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from pmet.data import load_text_corpus, load_zsre
    from pmet.editing import core, load_hparams
    from pmet.editing.context import flatten, get_context_templates
    from pmet.editing.values import compute_values
    from pmet.evaluation import evaluate_counterfact, evaluate_zsre
    from pmet.experiments import table_records
    from pmet.hooks import Trace
    from pmet.models import load_model
    from pmet.stats import corpus_token_windows, key_second_moments

    res: dict = {
        "model": a.model,
        "n": a.n,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    model, tok = load_model(a.model)
    hp = load_hparams("pmet", model, "counterfact")
    layers = list(hp.layers or model.layout.critical_layers)
    L = max(layers)
    res["load_peak_mib"] = peak_mib()

    # ---- key statistics vs a bare forward pass to the same layer ---------------------------------------
    windows = corpus_token_windows(tok, load_text_corpus("wikitext"), 256, a.stats_tokens)
    t = time.perf_counter()
    key_second_moments(model, tok, layers, n_tokens=a.stats_tokens, progress=False)
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            with Trace(model, record=[], stop_after=("block", L)):
                model(input_ids=windows[i : i + 8], use_cache=False)
    t_bare = time.perf_counter() - t
    res["stats_tok_per_s"] = a.stats_tokens / t_stats
    res["bare_forward_tok_per_s"] = windows.numel() / t_bare
    res["stats_vs_forward"] = res["stats_tok_per_s"] / res["bare_forward_tok_per_s"]
    res["stats_peak_mib"] = peak_mib()

    # ---- value optimisation: batched vs one at a time ---------------------------------------------------
    requests = [r.as_request() for r in table_records("counterfact", a.n, seed=123)]
    from pmet.editing import normalize_requests

    reqs = normalize_requests(requests, tok)
    templates, _ = flatten(
        get_context_templates(model, tok, hp.context_length, hp.context_n_per_start, hp.context_seed)
    )
    batched = replace(hp, v_batch_size=a.n)
    t = time.perf_counter()
    v32, _ = compute_values(model, tok, reqs, batched, templates, L, use_cache=False, progress=False)
    t_batched = time.perf_counter() - t
    if a.autocast != "none":  # the same batch with Eq. 10's forward/backward under autocast
        t = time.perf_counter()
        vlow, _ = compute_values(
            model, tok, reqs, replace(batched, v_autocast=a.autocast), templates, L, use_cache=False, progress=False
        )
        t_low = time.perf_counter() - t
        res[f"values_batched_{a.autocast}_req_per_h"] = 3600 * a.n / t_low
        res[f"values_{a.autocast}_vs_float32"] = t_batched / t_low
        res[f"values_{a.autocast}_max_rel_diff"] = max(
            float(((vlow[k] - v32[k]).norm(dim=1) / v32[k].norm(dim=1)).max()) for k in v32
        )
    single = replace(hp, v_batch_size=1)
    t = time.perf_counter()
    compute_values(model, tok, reqs[: a.n_single], single, templates, L, use_cache=False, progress=False)
    t_single = time.perf_counter() - t
    res["values_batched_req_per_h"] = 3600 * a.n / t_batched
    res["values_single_req_per_h"] = 3600 * a.n_single / t_single
    res["values_speedup"] = res["values_batched_req_per_h"] / res["values_single_req_per_h"]
    n_tok = sum(
        len(tok(tpl.format(r["prompt"].format(r["subject"])) + r["target_new"])["input_ids"])
        for r in reqs
        for tpl in templates
    ) / len(reqs)
    res["values_tokens_per_request_per_step"] = n_tok
    res["values_peak_mib"] = peak_mib()

    # ---- the update solve -------------------------------------------------------------------------------
    d = model.layout.get_weight(model, "mlp_out", L).shape
    K = torch.randn(d[1], a.n)
    R = torch.randn(d[0], a.n)
    C0 = key_second_moments(model, tok, [L], n_tokens=a.stats_tokens, progress=False)[L]
    t = time.perf_counter()
    core.solve_update(R, K, C0, hp.mom2_update_weight)
    res["solve_seconds_per_layer"] = time.perf_counter() - t

    # ---- evaluation --------------------------------------------------------------------------------------
    cf = table_records("counterfact", a.eval_records, seed=7)
    t = time.perf_counter()
    evaluate_counterfact(model, tok, cf, generation=False, progress=False)
    res["eval_counterfact_rec_per_s"] = len(cf) / (time.perf_counter() - t)
    if a.gen_records:
        t = time.perf_counter()
        evaluate_counterfact(model, tok, cf[: a.gen_records], generation=True, progress=False)
        res["eval_counterfact_generation_rec_per_s"] = a.gen_records / (time.perf_counter() - t)
    zs = load_zsre("eval")[: a.eval_records * 4]
    t = time.perf_counter()
    evaluate_zsre(model, tok, zs, progress=False)
    res["eval_zsre_rec_per_s"] = len(zs) / (time.perf_counter() - t)
    res["eval_peak_mib"] = peak_mib()

    # ---- ROME: sequential edits, float32 vs autocast ---------------------------------------------------
    if a.rome_edits:
        from pmet.editing import edit, hparams_for

        rome_hp = replace(hparams_for("rome", model, "counterfact"), mom2_n_tokens=a.stats_tokens)
        rome_reqs = requests[: a.rome_edits]
        edit(model, tok, rome_reqs[:1], "rome", hparams=rome_hp, progress=False).restore()  # statistics, warm-up
        variants = [None] + ([a.autocast] if a.autocast != "none" else [])
        deltas = {}
        for dtype in variants:
            t = time.perf_counter()
            r = edit(model, tok, rome_reqs, "rome", hparams=replace(rome_hp, v_autocast=dtype), progress=False)
            res[f"rome_{dtype or 'float32'}_seconds_per_edit"] = (time.perf_counter() - t) / len(rome_reqs)
            deltas[dtype] = next(iter(r.deltas.values()))
            r.restore()
        if len(deltas) == 2:
            res[f"rome_{a.autocast}_delta_rel_diff"] = float(
                (deltas[a.autocast] - deltas[None]).norm() / deltas[None].norm()
            )
        res["rome_peak_mib"] = peak_mib()

    # ---- end to end ------------------------------------------------------------------------------------
    from pmet.experiments import run_edit_eval
    from pmet.runspec import RunSpec

    t = time.perf_counter()
    e2e_hp = replace(hp, v_autocast=None if a.autocast == "none" else a.autocast)
    res["end_to_end_autocast"] = e2e_hp.v_autocast
    summary = run_edit_eval(
        model,
        tok,
        RunSpec(a.model, "pmet", n_edits=a.n, seed=11, value_autocast=e2e_hp.v_autocast),
        hparams=e2e_hp,
        runs_dir=Path(work) / "runs",
        progress=False,
    )
    res["end_to_end_seconds"] = time.perf_counter() - t
    res["end_to_end_efficacy"] = summary.get("efficacy")
    res["end_to_end_peak_mib"] = peak_mib()
    # once per run (statistics, context prefixes, model load) vs per edit (values, update, evaluation)
    timings = summary.get("timings") or {}
    fixed = sum(timings.get(k, 0.0) for k in ("key_statistics", "context_templates"))
    per_edit = (res["end_to_end_seconds"] - fixed) / a.n
    res["end_to_end_fixed_seconds"] = fixed
    res["end_to_end_seconds_per_edit"] = per_edit
    for n in (1000, 10_000):
        res[f"extrapolated_{n}_edit_hours"] = (fixed + per_edit * n) / 3600

    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.values_speed:  # its own table, merged into benchmarks/results/summary.json
        from benchmarks import values_speed

        values_speed.main(["--model", a.model, "--threads", str(a.threads or 2)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
