"""Command line: ``python -m pmet {models,edit,stats,report,plan,run,rerender}`` (also installed as ``pmet``)."""

from __future__ import annotations

import argparse
import sys

import torch

DATASETS = ("counterfact", "zsre")  # the hyperparameter files' datasets


class UsageError(ValueError):
    """A mistake on the command line: reported in one line, exit status 2."""


def _top_predictions(model, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    enc = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        probs = model(**enc).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [(tok.decode(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def _print_predictions(title: str, preds: list[tuple[str, float]]) -> None:
    print(title)
    for token, p in preds:
        print(f"  {token!r:>20}  {p:7.2%}")


def cmd_models(args) -> int:
    from .models import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  available  where / why")
    for r in rows:
        print(f"{r['name']:<{width}}  {'yes' if r['available'] else 'no ':<9}  {r['where']}")
    print("\nAny Hugging Face id ('owner/name') or local directory also works where its weights are reachable.")
    return 0


def cmd_edit(args) -> int:
    from .editing import edit, editor_names, hparams_for
    from .editing.tokens import target_text
    from .models import load_model

    if args.method not in editor_names():
        raise UsageError(f"unknown method {args.method!r}; registered: {', '.join(editor_names())}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    model, tok = load_model(args.model, device=args.device)
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    if args.target_true:
        request["target_true"] = args.target_true
    hparams = hparams_for(args.method, model, args.dataset)
    filled = args.prompt.format(args.subject) if "{}" in args.prompt else args.prompt
    before = _top_predictions(model, tok, filled, args.top_k)
    result = edit(model, tok, [request], method=args.method, hparams=hparams, cache_dir=args.cache_dir)
    after = _top_predictions(model, tok, filled, args.top_k)
    layers = getattr(result, "layers", None)
    print(f"model={args.model} method={args.method} edited layers={list(layers) if layers else '?'}")
    print(f"prompt: {filled!r}  target: {args.target!r}")
    _print_predictions("before the edit:", before)
    _print_predictions("after the edit:", after)
    target_first = tok(target_text(args.target), add_special_tokens=False)["input_ids"][0]
    ok = tok.decode(target_first) == after[0][0]
    print(f"edit {'succeeded' if ok else 'did NOT succeed'}: top prediction is {after[0][0]!r}")
    _save_outputs(args, model, tok, result)
    if args.restore:
        result.restore()
    return 0 if ok else 1


def _save_outputs(args, model, tok, result) -> None:
    """``--save DIR``: the edit (pmet.load_edit); ``--save-model DIR``: the edited model (save_pretrained)."""
    from .editing.saved import save_edited_model

    if args.save:
        print(f"saved the edit to {result.save(args.save)} (re-apply: pmet.load_edit(DIR).apply(model))")
    if args.save_model:
        print(f"saved the edited model to {save_edited_model(model, tok, args.save_model, edit=result)}")


def cmd_stats(args) -> int:
    from .models import load_model
    from .stats import key_second_moments

    model, tok = load_model(args.model, device=args.device)
    layers = args.layers or list(model.layout.critical_layers)
    stats = key_second_moments(
        model, tok, layers, component=args.component, n_tokens=args.n_tokens, dtype=args.dtype, cache_dir=args.cache_dir
    )
    for layer, mom2 in stats.items():
        print(f"layer {layer}: E[kk^T] {tuple(mom2.shape)} trace={float(mom2.trace()):.4g}")
    return 0


def cmd_rerender(args) -> int:
    from .rerender import rerender

    rerender(args.notebooks, dry_run=args.dry_run)
    return 0


def cmd_report(args) -> int:
    """Tables (from the committed per-record runs), claims and figures, in that order; offline, no model."""
    from pathlib import Path

    from .paths import REPO_ROOT

    out = Path(args.out_dir or REPO_ROOT)
    results = Path(args.results) if args.results else out / "results"
    if not args.no_tables:
        _report_tables(out, results)
    if args.tables_only:
        return 0
    from .claims import write_claims

    df = write_claims(out, results)
    print(f"wrote {out / 'tables' / 'claims.md'} and claims_detail.csv ({len(df)} claims)")
    from .diagnostics import write_tables  # tables/value_diagnostics_<model>.*: the value optimisation per run

    print("".join(f"wrote {path}\n" for path in write_tables(out, args.results)), end="")
    if not args.no_figures:
        from .report import redraw_figures

        for path in redraw_figures(out):
            print(f"wrote {path}")
    return 0


def _report_tables(out, results) -> None:
    """Regenerate the committed tables whose runs all have per-record files; one line for each that is not."""
    from .report import regenerate_tables

    for t in regenerate_tables(out, results, out):
        if t.reason:
            print(f"tables/{t.stem}: not regenerated -- {t.reason}")
        else:
            print(f"wrote tables/{t.stem}.{{csv,md,tex,json}} from {len(t.runs)} per-record run files")


def cmd_plan(args) -> int:
    from .plan import make_plan

    print(
        make_plan(
            args.model,
            args.artifact,
            n_edits=_n_edits(args.n_edits),
            methods=args.methods,
            devices=args.devices,
            verify=args.verify,
            pool=args.pool,
            value_autocast=args.value_autocast,
        )
    )
    return 0


def _n_edits(values):
    if not values:
        return None
    return values if len(values) > 1 else values[0]


def _overrides(pairs) -> dict:
    import json

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"pmet: error: --set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_run(args) -> int:
    """Fill the run cache for an artifact (sharded when started by torchrun); the notebook then renders it."""
    from . import distributed
    from .experiments import MethodUnavailable, run_edit_eval, run_sweep
    from .models import load_model
    from .plan import ARTIFACTS, artifact_sizes
    from .runspec import RunSpec

    distributed.init()
    spec = ARTIFACTS[args.artifact]
    sizes = artifact_sizes(args.artifact, args.model, _n_edits(args.n_edits))
    generation = spec["generation"] if args.generation is None else args.generation
    overrides = _overrides(args.set)
    value_autocast = args.value_autocast or overrides.pop("v_autocast", None)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, device=device)
    rank0 = distributed.rank() == 0
    opts = dict(cache=args.cache_dir, eval_batch_size=args.eval_batch_size, progress=rank0)
    for method in args.methods or spec["methods"]:
        run = RunSpec(
            args.model,
            method,
            spec["dataset"],
            seed=args.seed,
            generation=generation,
            value_autocast=value_autocast,
            overrides=overrides,
            pool=args.pool,
        )
        try:
            if args.artifact == "fig3":
                if method == "none":
                    continue
                result = run_sweep(model, tok, run, sizes, **opts)
            else:
                result = {n: run_edit_eval(model, tok, run.replace(n_edits=n), **opts) for n in sizes}
        except MethodUnavailable as exc:
            if rank0:
                print(f"{method}: unavailable ({exc})")
            continue
        if rank0:
            for n, s in result.items():
                print(
                    f"{method} n={n}: efficacy={s.get('efficacy', float('nan')):.1f} "
                    f"generalization={s.get('generalization', float('nan')):.1f} "
                    f"specificity={s.get('specificity', float('nan')):.1f} (world_size={s.get('world_size', 1)})"
                )
    if rank0:
        print(
            f"done; render with `papermill {spec['notebook']} out.ipynb -p model {args.model}` (same sizes and "
            "settings), which reads these runs from the cache"
        )
    return 0


def _pool_argument(parser: argparse.ArgumentParser) -> None:
    from .runspec import POOLS

    parser.add_argument(
        "--pool",
        default=None,
        choices=[p for p in POOLS if p],
        help="record pool (default: automatic); extended = the 1,590 full-field CounterFact records, then reduced "
        "ones (beyond 1,590 edits offline)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .editing import editor_names
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="pmet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list known models and whether each is available offline")
    m.set_defaults(func=cmd_models)

    e = sub.add_parser("edit", help="edit one fact and show the top predictions before and after")
    e.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a name of `pmet models`, a Hugging Face id or a local directory (default: {DEFAULT_MODEL})",
    )
    e.add_argument("--prompt", default="The mother tongue of {} is", help="template with {} for the subject")
    e.add_argument("--subject", default="Danielle Darrieux")
    e.add_argument("--target", default=" English", help="the new object (a leading space is added if missing)")
    e.add_argument("--target-true", default=None)
    e.add_argument(
        "--method",
        default="pmet",
        metavar="METHOD",
        help=f"the editor, one of: {', '.join(editor_names())} (default: pmet)",
    )
    e.add_argument(
        "--dataset",
        default="counterfact",
        metavar="DATASET",
        help=f"which hyperparameter file to use, one of: {', '.join(DATASETS)} (default: counterfact)",
    )
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--cache-dir", default=None)
    e.add_argument("--top-k", type=int, default=5)
    e.add_argument("--restore", action="store_true", help="restore the weights afterwards (demonstration)")
    e.add_argument(
        "--save",
        metavar="DIR",
        default=None,
        help="write the edit (post-edit weights + manifest.json) to DIR, for pmet.load_edit(DIR)",
    )
    e.add_argument(
        "--save-model",
        metavar="DIR",
        default=None,
        help="write the edited model and tokenizer to DIR with save_pretrained",
    )
    e.set_defaults(func=cmd_edit)

    s = sub.add_parser("stats", help="precompute key statistics E[kk^T] for a model's critical layers")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--layers", type=int, nargs="*", default=None)
    s.add_argument("--component", default="mlp_key", choices=["mlp_key", "attn_key"])
    s.add_argument("--n-tokens", type=int, default=100_000)
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--cache-dir", default=None)
    s.set_defaults(func=cmd_stats)

    c = sub.add_parser(
        "report",
        help="regenerate the tables whose runs have committed per-record files, tables/claims.md (paired "
        "tests) and the figures from the committed files (results/*.jsonl.gz, tables/); offline, no model",
    )
    c.add_argument(
        "--out-dir", default=None, help="repository root holding results/ and tables/ (default: this checkout)"
    )
    c.add_argument("--results", default=None, help="folder of committed run files (default <out-dir>/results)")
    c.add_argument("--no-figures", action="store_true", help="no figures")
    c.add_argument("--no-tables", action="store_true", help="do not regenerate the tables from results/")
    c.add_argument(
        "--tables-only", action="store_true", help="only regenerate the tables from results/ (no claims, no figures)"
    )
    c.set_defaults(func=cmd_report)

    from .plan import ARTIFACTS

    pl = sub.add_parser(
        "plan",
        help="dry run: what an artifact would run and need (data, hyperparameters, "
        "memory and time estimates); runs nothing",
    )
    pl.add_argument("--model", default=DEFAULT_MODEL)
    pl.add_argument("--artifact", default="table1", choices=list(ARTIFACTS))
    pl.add_argument("--n-edits", type=int, nargs="*", default=None, help="default: the paper's sizes on gptj/neox")
    pl.add_argument("--methods", nargs="*", default=None)
    pl.add_argument("--devices", type=int, default=None, help="processes / GPUs to plan for")
    pl.add_argument("--verify", action="store_true", help="also checksum the data files that are present")
    pl.add_argument("--value-autocast", default=None, choices=["bfloat16", "float16"], help="the values' precision")
    _pool_argument(pl)
    pl.set_defaults(func=cmd_plan)

    ru = sub.add_parser("run", help="run an artifact's edits and evaluations into the cache (shards under torchrun)")
    ru.add_argument("--model", default=DEFAULT_MODEL)
    ru.add_argument("--artifact", default="table1", choices=list(ARTIFACTS))
    ru.add_argument("--n-edits", type=int, nargs="*", default=None, help="default: as the artifact's notebook")
    ru.add_argument("--methods", nargs="*", default=None)
    ru.add_argument("--generation", action=argparse.BooleanOptionalAction, default=None)
    ru.add_argument("--value-autocast", default=None, choices=["bfloat16", "float16"])
    ru.add_argument(
        "--set",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="hyperparameter overrides for the editors that have them, e.g. v_batch_size=8",
    )
    ru.add_argument("--seed", type=int, default=0)
    ru.add_argument("--eval-batch-size", type=int, default=32)
    ru.add_argument("--device", default="auto", help="auto: cuda where present (cuda:LOCAL_RANK under torchrun)")
    ru.add_argument("--cache-dir", default=None)
    _pool_argument(ru)
    ru.set_defaults(func=cmd_run)

    r = sub.add_parser("rerender", help="re-execute rendered notebooks with the parameters recorded in them")
    r.add_argument("notebooks", nargs="*", help="rendered notebooks (default: every notebooks/rendered/*.ipynb)")
    r.add_argument("--dry-run", action="store_true", help="only print the papermill commands")
    r.set_defaults(func=cmd_rerender)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataNotFoundError, InvalidRecordError
    from .editing import MethodUnavailable
    from .editing.saved import SavedEditError
    from .models import ModelUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        UsageError,
        ModelUnavailableError,
        DataNotFoundError,
        InvalidRecordError,
        MethodUnavailable,
        SavedEditError,
    ) as exc:
        print(f"pmet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
