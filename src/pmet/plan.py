"""The paper's configuration of each artifact, and a dry run that says what a run would need and cost.

``python -m pmet plan --model gptj --artifact table1`` prints, without loading weights it does not have or
running anything: the runs (editors x sizes, dataset, record pool), the data files and their status (present,
or missing with the URL and checksum a download is checked against), where C0's text would come from, the
hyperparameter file of every editor, the model's size and availability, and an estimate of memory and time.

The estimate is arithmetic, not a measurement: the weights and C0 from their shapes (float32), time from the
CPU rates measured by ``benchmarks/run.py`` on the embedded smollm2 (``benchmarks/results/latest.json``, 2
threads), scaled by the ratio of parameter counts; ``benchmarks/results/scale.json`` supplies the Eq. 9
solve time where it has the model's shape. A GPU is much faster than those CPU rates; no GPU figures exist in
``benchmarks/results`` yet, so the GPU case is not estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .experiments import COMPLETE_FILES, PAPER_SIZES, resolve_n_edits
from .runspec import check_pool

EDITORS = ["none", "ft", "mend", "rome", "memit", "pmet"]
ABLATIONS = ["pmet", "pmet-no-attn-delta", "pmet-with-attn-weights", "pmet-even-spread"]
PAPER_TABLE3_SIZES = [1000, 5623, 10_000]  # the paper's Table 3 on GPT-J

# artifact -> dataset, editors, generation, default size(s) off the paper's models, notebook (defaults as there)
ARTIFACTS: dict[str, dict] = {
    "table1": dict(
        dataset="counterfact", methods=EDITORS, generation=True, default=1000, notebook="notebooks/table1.ipynb"
    ),
    "table2": dict(dataset="zsre", methods=EDITORS, generation=False, default=1000, notebook="notebooks/table2.ipynb"),
    "table3": dict(
        dataset="counterfact",
        methods=ABLATIONS,
        generation=True,
        default=[100, 316, 1000],
        notebook="notebooks/table3.ipynb",
    ),
    "fig3": dict(
        dataset="counterfact",
        methods=["ft", "mend", "rome", "memit", "pmet"],
        generation=False,
        default=1000,
        notebook="notebooks/fig3_sweep.ipynb",
    ),
}

# What a plan needs to know of models it cannot load offline (from their Hugging Face configs).
KNOWN_SHAPES = {
    "gptj": dict(params=6_053_381_344, n_layers=28, d_model=4096, d_ff=16384),
    "neox": dict(params=20_554_567_680, n_layers=44, d_model=6144, d_ff=24576),
    "gpt2-xl": dict(params=1_557_611_200, n_layers=48, d_model=1600, d_ff=6400),
    "smollm2": dict(params=134_515_008, n_layers=30, d_model=576, d_ff=1536),
}
BENCH_MODEL = "smollm2"
BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GIB = 1024**3


def artifact_sizes(artifact: str, model: str, n_edits=None) -> list[int]:
    """The edit counts an artifact runs for ``model``: Tables 1-2 one size (:func:`resolve_n_edits`: 10,000 on
    the paper's models), Table 3 the paper's 1,000/5,623/10,000 on gptj/neox, Fig. 3 the sweep up to N."""
    spec = _spec(artifact)
    if artifact == "table3":
        if n_edits is not None:
            return [int(n) for n in (n_edits if isinstance(n_edits, (list, tuple)) else [n_edits])]
        return list(PAPER_TABLE3_SIZES if model in PAPER_SIZES else spec["default"])
    n = resolve_n_edits(model, n_edits, spec["default"])
    if artifact == "fig3":
        from .report import sweep_sizes

        return sweep_sizes(n)
    return [n]


def _spec(artifact: str) -> dict:
    if artifact not in ARTIFACTS:
        raise ValueError(f"unknown artifact {artifact!r}; expected one of {', '.join(ARTIFACTS)}")
    return ARTIFACTS[artifact]


@dataclass
class Plan:
    model: str
    artifact: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)

    def add(self, key: str, text: str) -> None:
        self.lines.append((key, text))

    def __str__(self) -> str:
        head = f"pmet plan: {self.artifact} on {self.model} (dry run: nothing is loaded beyond configs, nothing runs)"
        return "\n".join([head] + [f"  {k:<11} {v}" for k, v in self.lines])


def _file_status(rel: str, verify: bool) -> str:
    from .data import KNOWN_FILES, checksum_ok, is_fixture_folder
    from .paths import data_dir

    known = KNOWN_FILES.get(rel)
    path = data_dir() / rel
    check = ""
    if known is not None:
        check = (
            f"sha256 {known.sha256[:12]}..."
            if known.sha256
            else (f"git blob {known.git_blob}" if known.git_blob else "no checksum recorded")
        )
    if path.is_file():
        size = f"{path.stat().st_size / 1e6:.1f} MB"
        ok = (
            ""
            if not verify
            else (
                " test fixture, not checksummed"
                if is_fixture_folder(data_dir())
                else " checksum OK"
                if checksum_ok(path, known)
                else " CHECKSUM MISMATCH"
            )
        )
        return f"{rel}: present ({path}, {size}){ok}"
    url = known.url if known is not None and known.url else "no public URL"
    return f"{rel}: MISSING, would be downloaded from {url} ({check}) into {path}"


def _shape(model: str) -> tuple[dict, str]:
    """Parameter count and widths: from the registry's known shapes (hub models), else by building the model
    (tiny models in code; the embedded GGUF from its weight cache)."""
    if model in KNOWN_SHAPES:
        return dict(KNOWN_SHAPES[model]), "from the model's published config"
    from .models import load_model

    m, _ = load_model(model)
    cfg = m.config
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
    shape = dict(params=sum(p.numel() for p in m.parameters()), n_layers=m.layout.n_layers, d_model=d_model, d_ff=d_ff)
    return shape, "counted on the loaded model"


def _bench() -> tuple[dict, dict]:
    def read(name):
        p = BENCH_DIR / name
        return json.loads(p.read_text()) if p.exists() else {}

    return read("latest.json"), read("scale.json")


def make_plan(
    model: str,
    artifact: str,
    n_edits=None,
    methods=None,
    devices: int | None = None,
    verify: bool = False,
    pool: str | None = None,
    value_autocast: str | None = None,
) -> Plan:
    """What ``artifact`` on ``model`` would run and need (see the module docstring); runs nothing. ``pool``:
    the record pool of :class:`pmet.runspec.RunSpec` (None: automatic); ``value_autocast``: the values'
    precision (``"bfloat16"``: the time estimate uses the benchmark's bf16 rate)."""
    import torch

    from .data import resolve_corpus
    from .editing import hparams_for
    from .editing.hparams import find_hparams_file
    from .models import ALIASES, MODEL_SPECS, is_available

    model = ALIASES.get(model, model)
    spec = _spec(artifact)
    dataset = spec["dataset"]
    methods = list(methods or spec["methods"])
    sizes = artifact_sizes(artifact, model, n_edits)
    plan = Plan(model, artifact)

    ok, where = is_available(model)
    desc = MODEL_SPECS[model].description if model in MODEL_SPECS else model
    plan.add("model", f"{model}: {desc}; weights {'available' if ok else 'NOT available'} ({where})")
    gpus = torch.cuda.device_count()
    k = devices or max(gpus, 1)
    plan.add(
        "device",
        (
            f"{gpus} CUDA GPU(s): `torchrun --nproc_per_node={k} -m pmet run ...` shards values and evaluation"
            if gpus
            else "CPU (no CUDA device here)"
        ),
    )
    paper = model in PAPER_SIZES
    plan.add(
        "runs",
        f"{len(methods)} editor(s) {methods} x edit count(s) {sizes} on {dataset}"
        f"{', with generation' if spec['generation'] else ''}; notebook {spec['notebook']}",
    )

    # data
    subset = {"counterfact": 1590, "zsre": 1037}[dataset]  # table pools without the complete files
    full_rel = COMPLETE_FILES[dataset]
    from .data import ensure_file

    try:
        ensure_file(full_rel, download=False)
        present = True
    except FileNotFoundError:
        present = False
    check_pool(pool, dataset)
    uses_full = pool == "full" or (pool is None and (paper or present or max(sizes) > subset))
    extended = pool == "extended" and max(sizes) > subset
    plan.add(
        "pool",
        (
            f"complete {full_rel} (minus counterfact-val ids)"
            if dataset == "counterfact" and uses_full
            else f"complete {full_rel}"
            if uses_full
            else f"extended: the {subset} full-field records, then {max(sizes) - subset:,} reduced counterfact-edit "
            f"records (no generation prompts: fluency/consistency from the {subset} only)"
            if extended
            else f"the local subset ({subset} records; the complete {full_rel} is used when present)"
        )
        + (
            f"; offline, --pool extended runs {max(sizes):,} CounterFact edits without it"
            if uses_full and not present and pool is None and dataset == "counterfact" and max(sizes) <= 10_292
            else ""
        ),
    )
    files = [full_rel] if uses_full else []
    if dataset == "counterfact":
        files += ["counterfact/easyedit_mend_format/counterfact-val.json"]
        files += [] if uses_full else ["counterfact/counterfact_subset_merged.json"]
        files += ["counterfact/easyedit_mend_format/counterfact-edit.json"] if extended else []
    elif not uses_full:
        files += ["zsre/zsre_mend_eval_portability_gpt4.json"]
    for rel in files:
        plan.add("data", _file_status(rel, verify))

    # hyperparameters and C0
    corpora = set()
    for m in methods:
        if m == "none":
            continue
        base = m if m in ("ft", "rome", "mend") else None
        path, _ = find_hparams_file(m, model, dataset, base=base)
        if path is None:
            plan.add("hparams", f"{m}: no hyperparameter file for {model}/{dataset} (the run reports it unavailable)")
            continue
        rel = path.relative_to(path.parents[4]) if len(path.parents) > 4 else path
        plan.add("hparams", f"{m}: {rel}")
        try:
            corpora.add(getattr(hparams_for(m, model, dataset), "mom2_corpus", None))
        except Exception:  # noqa: BLE001 - a plan reports, it does not fail on one editor
            pass
    groups = value_groups(methods, model, dataset)
    for c in sorted(x for x in corpora if x):
        used, note = resolve_corpus(c)
        plan.add("C0 corpus", note or f"{used} (local files)")
    if "mend" in methods:
        plan.add(
            "MEND",
            "needs its trained hypernetwork for this model (trained on first use where a "
            "mend_<model>.json exists, else the row says unavailable)",
        )

    # estimate
    shape, how = _shape(model)
    bench, scale = _bench()
    _estimate(
        plan,
        shape,
        how,
        bench,
        scale,
        methods,
        sizes,
        spec,
        model,
        k if gpus else 1,
        subset if extended else None,
        value_autocast,
        n_value_groups=len(groups),
    )
    shared = [g for g in groups if len(g) > 1]
    if shared:
        plan.add(
            "values",
            "; ".join(" and ".join(g) for g in shared)
            + " optimise the same values (same value fields and layer L): counted once",
        )
    return plan


def value_groups(methods, model: str, dataset: str) -> list[tuple[str, ...]]:
    """The editors of ``methods`` that optimise value vectors, grouped by the values they optimise: editors
    with the same :data:`~pmet.editing.value_cache.VALUE_FIELDS` and layer L share cache entries (e.g. PMET,
    "w/ W_O^MHSA" and "even spread" differ only after Eq. 10), so a plan counts each group once. ROME (its
    values are computed on the model its earlier edits left) and editors whose hyperparameters cannot be
    read form groups of their own."""
    from .editing import hparams_for
    from .editing.hparams import EditHparams
    from .editing.value_cache import LATER_VALUE_FIELDS, VALUE_FIELDS

    keyed: dict[object, list[str]] = {}
    for m in methods:
        if m in ("none", "ft", "mend"):
            continue
        try:
            hp = hparams_for(m, model, dataset)
        except Exception:  # noqa: BLE001 - a plan reports, it does not fail on one editor
            hp = None
        if isinstance(hp, EditHparams):
            key = tuple(getattr(hp, f) for f in VALUE_FIELDS + LATER_VALUE_FIELDS) + (
                hp.layers[-1] if hp.layers else None,
            )
        else:
            key = m
        keyed.setdefault(key, []).append(m)
    return [tuple(g) for g in keyed.values()]


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x * 1024:.1f} MiB"


def _estimate(
    plan: Plan,
    shape: dict,
    how: str,
    bench: dict,
    scale: dict,
    methods,
    sizes,
    spec,
    model,
    k,
    gen_cap=None,
    value_autocast: str | None = None,
    n_value_groups: int | None = None,
) -> None:
    """The memory and time lines of a plan. ``gen_cap``: at most that many records of a run have generation
    prompts (the extended pool's full-field records); the others are evaluated at the plain rate.

    Values are counted once per editor, for its largest run: a smaller run of the same seed edits a prefix of
    the larger one's records (:func:`pmet.experiments.table_selection`) and reads their values from the cache
    (ROME's sweep runs once to the largest size). ``value_autocast="bfloat16"`` uses the benchmark's bf16
    rate (its float16 rate is not measured: the float32 one is used). ``n_value_groups``: how many distinct
    value optimisations the editors need (:func:`value_groups`; default: one per editor with values)."""
    P = shape["params"]
    weights = P * 4 / GIB
    value_methods = [m for m in methods if m not in ("none", "ft", "mend")]
    n_c0 = 6 if model == "gptj" else 5
    c0 = n_c0 * shape["d_ff"] ** 2 * 4 / GIB if value_methods else 0.0
    plan.estimate.update(params=P, weights_gib=weights, c0_gib=c0)
    plan.add(
        "size",
        f"{P:,} parameters, {shape['n_layers']} layers, d_model {shape['d_model']}, d_ff {shape['d_ff']} ({how})",
    )
    plan.add(
        "memory",
        f"ESTIMATE: weights {_gib(weights)} (float32) + C0 {_gib(c0)} (E[kk^T] of ~{n_c0} critical "
        f"layers, float32, kept on the CPU) + activations; per process under torchrun (each rank "
        f"holds a copy); one process with device='auto' spreads the weights over all GPUs",
    )
    if not bench:
        plan.add("time", "no benchmark figures (benchmarks/results/latest.json missing)")
        return
    ratio = P / KNOWN_SHAPES[BENCH_MODEL]["params"]
    bf16 = value_autocast == "bfloat16" and bench.get("values_batched_bfloat16_req_per_h")
    v_rate = bench.get("values_batched_bfloat16_req_per_h" if bf16 else "values_batched_req_per_h")  # req/h, 2 threads
    plain = bench.get("eval_zsre_rec_per_s" if spec["dataset"] == "zsre" else "eval_counterfact_rec_per_s")
    e_rate = bench.get("eval_counterfact_generation_rec_per_s") if spec["generation"] else plain
    n_gen = sum(min(n, gen_cap if gen_cap is not None else n) for n in sizes)
    n_values = len(value_methods) if n_value_groups is None else n_value_groups
    values_h = max(sizes) * n_values / v_rate * ratio if v_rate else float("nan")
    eval_s = n_gen / e_rate + (sum(sizes) - n_gen) / plain if e_rate and plain else float("nan")
    eval_h = eval_s * len(methods) / 3600 * ratio
    solve = next((r for r in scale.get("rows", []) if r.get("model_shape") == model), None)
    solve_txt = (
        f"; Eq. 9 solve ~{solve['solve_s_6_layers_est'] / 3600:.1f} h per 10,000-edit run on 1 CPU thread "
        "(benchmarks/results/scale.json)"
        if solve
        else ""
    )
    plan.estimate.update(values_cpu_hours=values_h, eval_cpu_hours=eval_h, scale_ratio=ratio)
    plan.add(
        "time",
        f"ESTIMATE on a CPU like the benchmark's ({bench.get('threads', '?')} threads): value "
        f"optimisation ~{values_h:,.1f} h ({max(sizes):,} requests for each of {n_values} value optimisation(s), "
        f"{'bf16' if bf16 else 'float32'} rate; smaller runs reuse them; cached values are not counted), "
        f"evaluation ~{eval_h:,.1f} h in all (CPU rates measured on "
        f"{BENCH_MODEL} in benchmarks/results/latest.json x {ratio:,.3g}, the ratio of parameter "
        f"counts){solve_txt}; with K processes both parts divide by ~K. GPU rates are not benchmarked.",
    )
