"""MEND (Mitchell et al. 2022a): a hypernetwork that turns a fine-tuning gradient into a weight edit.

For a linear layer ``y = W u``, the gradient of a loss over the tokens ``t`` of a prompt is the sum of
rank-one terms ``∇_W = Σ_t δ_t u_t^T`` (``u_t`` the layer's input, ``δ_t = ∂loss/∂y_t``). MEND edits a few
weights near the output (here ``mlp_in`` and ``mlp_out`` of the last 3 blocks, as MEND's ``c_fc``/``c_proj``
of the last 3 GPT-2 blocks): per weight, each token's pair ``(u_t, δ_t)`` is normalised (running mean and
standard deviation from the training data, frozen when editing), concatenated and passed through a small
residual MLP with a low-rank hidden layer whose output layer starts at zero (identity init, MEND's
``IDMLP``), giving pseudo-activations ``ũ_t`` and pseudo-deltas ``δ̃_t``; the edit is

    ΔW = − α_W · Σ_t δ̃_t ũ_t^T          (α_W a learned per-weight step size)

Before training (identity init, empty statistics) ``ΔW = −α_W ∇_W`` exactly, one step of gradient descent.

Training (MEND's outer loop; the edit and locality examples never appear in the tables: CounterFact split
``"train"`` minus every record a table can edit -- 1,298 of its case ids are full-field records that the
CounterFact tables draw from -- and zsRE ``"train"`` minus any question of the eval subset; see
:func:`training_examples`): for a batch of requests, ``ΔW`` is computed from the NLL of the targets,
the edited model is evaluated functionally (``W + ΔW``, differentiable in the hypernetwork) and

    loss = c_edit · NLL(target | prompt and rephrase; W + ΔW) + c_loc · KL(p_W || p_{W+ΔW})[locality prompt]

is minimised with Adam over the hypernetwork and the step sizes. Several edits at once (MEND's batched
editing) use the sum of the per-edit updates: the per-request losses are summed, so the factors of all
requests are simply stacked. Differences from the released code (``eric-mitchell/mend``): the update
descends (``W − α Σ δ̃ũ^T``; the released code adds ``α·Σ`` and lets ``α`` learn its sign), a separate
network per weight (no shape sharing), hidden rank 64 instead of 1920, CPU-sized training.

The trained editor is a cache file: ``$PMET_CACHE_DIR/mend/<model fingerprint>/<arch tag>/editor.safetensors``.
Train it with ``python -m pmet.editing.mend train --model smollm2`` (see ``--help``; checkpoints and resume).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import model_fingerprint
from ..paths import cache_dir as default_cache_dir
from .baseline import make_result, restore_weights, snapshot, target_batch, target_nll
from .requests import normalize_requests
from .result import EditResult, MethodUnavailable


@dataclass(frozen=True)
class MendHparams:
    layers: tuple[int, ...] | None = None  # None: the last 3 blocks
    components: tuple[str, ...] = ("mlp_in", "mlp_out")
    rank: int = 64  # hidden width of the low-rank MLP
    n_hidden: int = 1
    edit_lr_init: float = 1e-4  # initial α_W
    # outer training
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4  # Adam, hypernetwork
    lr_lr: float = 1e-4  # Adam, the step sizes α
    c_edit: float = 0.1
    c_loc: float = 1.0
    use_rephrase: bool = True  # edit loss also on the record's rephrase (MEND's equivalence examples)
    zsre_fraction: float = 0.5  # share of zsRE requests in the training batches
    grad_clip: float = 100.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    edit_chunk: int = 16  # requests per factor batch when editing

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        object.__setattr__(self, "components", tuple(self.components))

    def arch(self) -> dict:
        return {
            "layers": list(self.layers) if self.layers is not None else None,
            "components": list(self.components),
            "rank": self.rank,
            "n_hidden": self.n_hidden,
        }

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- hypernetwork
class LowRankResidualMLP(nn.Module):
    """``z + Σ`` residual blocks ``B σ(A z + a) + b`` with ``B = 0`` at init (identity, MEND's IDMLP)."""

    def __init__(self, dim: int, rank: int, n_hidden: int = 1):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(dim, rank) for _ in range(n_hidden))
        self.up = nn.ModuleList(nn.Linear(rank, dim) for _ in range(n_hidden))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for down, up in zip(self.down, self.up):
            z = z + up(F.relu(down(z)))
        return z


class GradientTransform(nn.Module):
    """One weight's transform ``(u_t, δ_t) -> (ũ_t, δ̃_t)`` with running normalisation statistics."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int = 1):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.mlp = LowRankResidualMLP(d_in + d_out, rank, n_hidden)
        # Welford statistics; before any update: mean 0, std 1 (the transform is then the identity)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(d_in + d_out, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(d_in + d_out, dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, z: torch.Tensor) -> None:
        """Chan et al.'s parallel Welford update with the rows of ``z``."""
        z = z.double()
        n_b = z.shape[0]
        if n_b == 0:
            return
        mean_b = z.mean(0)
        m2_b = ((z - mean_b) ** 2).sum(0)
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d**2 * self.count * n_b / n
        self.count.fill_(float(n))

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], -1).float()
        if self.training:
            self.update_stats(z)
        z = (z - self.mean.float()) / (self.std().float() + 1e-7)
        out = self.mlp(z)
        return out[:, : self.d_in], out[:, self.d_in :]


class MendEditor(nn.Module):
    """The transforms and step sizes of every edited weight (keys: weight names with '.' -> '#')."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hp: MendHparams):
        super().__init__()
        self.names = list(shapes)
        self.shapes = dict(shapes)  # name -> (d_out, d_in)
        self.transforms = nn.ModuleDict(
            {
                n.replace(".", "#"): GradientTransform(d_in, d_out, hp.rank, hp.n_hidden)
                for n, (d_out, d_in) in shapes.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(hp.edit_lr_init)))

    @classmethod
    def for_model(cls, model: nn.Module, hp: MendHparams) -> MendEditor:
        layout = model.layout
        shapes = {
            layout.weight_name(c, l): tuple(layout.get_weight(model, c, l).shape)
            for l in edit_layers(model, hp)
            for c in hp.components
        }
        return cls(shapes, hp)

    def transform(self, name: str) -> GradientTransform:
        return self.transforms[name.replace(".", "#")]

    def updates(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{name: ΔW [d_out, d_in]}`` from the raw factors ``{name: (u [T, d_in], δ [T, d_out])}``."""
        out = {}
        for i, name in enumerate(self.names):
            u, d = factors[name]
            pu, pd = self.transform(name)(u, d)
            out[name] = -self.edit_lrs[i] * (pd.T @ pu)
        return out


def edit_layers(model: nn.Module, hp: MendHparams) -> tuple[int, ...]:
    n = model.layout.n_layers
    return hp.layers if hp.layers is not None else tuple(range(max(0, n - 3), n))


# ---------------------------------------------------------------------------------- gradient factors
def gradient_factors(
    model: nn.Module, tok, requests: list[dict], names: list[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``{name: (u, δ)}`` of the loss Σ_requests NLL(target | prompt): the inputs and output gradients of
    each named linear layer at every token with a non-zero gradient, and the per-request NLLs."""
    layout = model.layout
    device = next(model.parameters()).device
    by_name = {}
    for l in range(layout.n_layers):
        for comp in ("mlp_in", "mlp_out", "attn_out"):
            by_name[layout.weight_name(comp, l)] = (comp, l)
    first = min(by_name[n][1] for n in names)
    inputs, outputs, handles = {}, {}, []

    def record(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            outputs[name] = out

        return hook

    def needs_grad(module, args, kwargs):  # the graph starts at the first edited block
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach().requires_grad_())
        return args, kwargs

    handles.append(layout.block(model, first).register_forward_pre_hook(needs_grad, with_kwargs=True))
    for n in names:
        handles.append(layout.module(model, *by_name[n]).register_forward_hook(record(n)))
    batch, labels = target_batch(
        tok, [r["prompt"].format(r["subject"]) for r in requests], [r["target_new"] for r in requests], device
    )
    try:
        with torch.enable_grad():
            nll = target_nll(model(**batch, use_cache=False).logits, labels)
            grads = torch.autograd.grad(nll.sum(), [outputs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for n, g in zip(names, grads):
        u, d = inputs[n].reshape(-1, inputs[n].shape[-1]), g.reshape(-1, g.shape[-1])
        keep = (d != 0).any(-1) & (u != 0).any(-1)  # MEND's nz_mask: tokens that carry gradient
        factors[n] = (u[keep].float(), d[keep].float())
    return factors, nll.detach()


# ---------------------------------------------------------------------------------- storage
# Version of the training examples: 2 = table records excluded. An editor trained on other examples lives in
# another folder, so it is never loaded for the tables (retrain: python -m pmet.editing.mend train).
TRAINING_DATA_VERSION = 2


def editor_dir(model: nn.Module, hp: MendHparams, cache_dir=None) -> Path:
    """Where the editor of ``model`` with architecture ``hp.arch()`` is trained and kept. A shorter training
    than the default ``steps`` (e.g. the main job's) is another, weaker editor: it gets a folder of its own,
    so it is never loaded where the full training is asked for (and vice versa)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = {**hp.arch(), "training_data": TRAINING_DATA_VERSION}
    if hp.steps != MendHparams.steps:
        key["steps"] = hp.steps
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return root / "mend" / model_fingerprint(model) / tag


def save_editor(editor: MendEditor, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in editor.state_dict().items()}
    save_file(
        tensors,
        str(tmp),
        metadata={"meta": json.dumps(meta), "names": json.dumps(editor.names), "shapes": json.dumps(editor.shapes)},
    )
    os.replace(tmp, path)


def load_editor_file(path: Path, hp: MendHparams) -> tuple[MendEditor, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    shapes = {n: tuple(s) for n, s in json.loads(md["shapes"]).items()}
    editor = MendEditor(shapes, hp)
    editor.load_state_dict(load_file(str(path)))
    return editor, json.loads(md.get("meta", "{}"))


def train_command(model_name: str) -> str:
    return f"python -m pmet.editing.mend train --model {model_name}"


def load_editor(model: nn.Module, hp: MendHparams, cache_dir=None) -> MendEditor:
    """The trained editor of ``model`` from the cache; a clear error when it was never trained."""
    path = editor_dir(model, hp, cache_dir) / "editor.safetensors"
    if not path.exists():
        name = getattr(model, "pmet_name", "<model>")
        raise MethodUnavailable(
            f"no trained MEND editor for {name} at {path}; train it with: {train_command(name)} "
            "(set PMET_CACHE_DIR to the same cache directory)"
        )
    editor, _ = load_editor_file(path, hp)
    return editor.eval()


# ---------------------------------------------------------------------------------- editing
def mend_deltas(
    model: nn.Module, tok, requests: list[dict], editor: MendEditor, chunk: int = 16
) -> dict[str, torch.Tensor]:
    """``Σ_requests ΔW_i`` (frozen normalisation: the sum of per-edit updates), float32 ``[d_out, d_in]``."""
    total = {}
    editor.eval()
    for s in range(0, len(requests), chunk):
        factors, _ = gradient_factors(model, tok, requests[s : s + chunk], editor.names)
        with torch.no_grad():
            for n, d in editor.updates(factors).items():
                total[n] = total[n] + d if n in total else d
    return total


def artifact_id(model: nn.Module, hp: MendHparams, cache_dir=None) -> str:
    """Identity of the trained editor ``apply_mend`` would load (``"_ed"`` + a hash of its file, ``""`` when
    there is none), so a retrained editor never reuses the cached run of an earlier one."""
    path = editor_dir(model, hp, cache_dir) / "editor.safetensors"
    return "_ed" + hashlib.sha256(path.read_bytes()).hexdigest()[:8] if path.exists() else ""


def apply_mend(
    model: nn.Module,
    tok,
    requests,
    hparams: MendHparams,
    cache_dir=None,
    progress: bool = False,
    editor: MendEditor | None = None,
) -> EditResult:
    """MEND edit of ``model`` in place with the trained editor (or ``editor``); ``restore()`` undoes it.
    ``progress`` is accepted for the common editor interface."""
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = hparams
    editor = editor if editor is not None else load_editor(model, hp, cache_dir)
    layout = model.layout
    was_training = model.training
    model.eval()
    originals = snapshot(model, editor.names)
    try:
        deltas = mend_deltas(model, tok, reqs, editor, hp.edit_chunk)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, d in deltas.items():
                params[n].add_((d.T if layout.conv1d else d).to(params[n].dtype))
    except BaseException:
        restore_weights(model, originals)
        raise
    finally:
        model.train(was_training)
    return make_result(
        "mend",
        model,
        originals,
        {n: d.detach().float().cpu() for n, d in deltas.items()},
        hparams=hp,
        layers=edit_layers(model, hp),
        requests=reqs,
        timings={"total": time.perf_counter() - t0},
    )


# ---------------------------------------------------------------------------------- training
@dataclass
class TrainExample:
    request: dict  # normalised (target with its leading space)
    rephrase: str | None  # filled prompt
    loc_text: str  # locality prompt + its answer (KL on every token)
    source_id: object = None  # CounterFact case id / zsRE question: which record it came from


def training_examples(dataset: str, limit: int | None = None) -> list[TrainExample]:
    """Edit/locality examples from the training splits (CounterFact "train", zsRE "train"; the zsRE edit
    target is the counterfactual ``alt`` answer, as MEND trains) minus every record any table can edit
    (:func:`pmet.experiments.table_pool_ids`), so MEND never trains on a record it is evaluated on.
    ``limit``: the first ``limit`` of the remaining examples."""
    from ..data import load_counterfact, load_zsre
    from ..experiments import table_pool_ids

    out = []
    if dataset == "counterfact":
        held_out = table_pool_ids("counterfact")
        kept = [r for r in load_counterfact("train") if r.case_id not in held_out]
        for r in kept[:limit]:
            loc = r.neighborhood_prompts[0] + " " + (r.neighborhood_target or r.target_true)
            out.append(
                TrainExample(r.as_request(), r.paraphrase_prompts[0] if r.paraphrase_prompts else None, loc, r.case_id)
            )
    elif dataset == "zsre":
        held_out = table_pool_ids("zsre")
        for r in [r for r in load_zsre("train") if r.src not in held_out][:limit]:
            out.append(
                TrainExample(r.as_request(target="alt"), r.rephrase, r.neighborhood_prompt + " " + r.loc_ans, r.src)
            )
    else:
        raise ValueError(f"unknown MEND training dataset {dataset!r}")
    for ex in out:
        ex.request = normalize_requests([ex.request])[0]
    return out


def sample_batch(examples: dict[str, list[TrainExample]], hp: MendHparams, step: int) -> list[TrainExample]:
    """Deterministic in (seed, step), so a resumed run sees the same batches."""
    rng = random.Random(hp.seed * 1_000_003 + step)
    batch = []
    for _ in range(hp.batch_size):
        ds = (
            "zsre"
            if ("zsre" in examples and (rng.random() < hp.zsre_fraction or "counterfact" not in examples))
            else "counterfact"
        )
        batch.append(rng.choice(examples[ds]))
    return batch


def _loc_batch(tok, texts: list[str], device):
    enc = [tok(t)["input_ids"] for t in texts]
    n = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), n), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def training_step(
    model: nn.Module, tok, editor: MendEditor, batch: list[TrainExample], hp: MendHparams
) -> tuple[torch.Tensor, dict]:
    """MEND's outer loss for one batch of edits (differentiable in the editor)."""
    from torch.func import functional_call

    device = next(model.parameters()).device
    reqs = [ex.request for ex in batch]
    factors, nll_pre = gradient_factors(model, tok, reqs, editor.names)
    deltas = editor.updates(factors)
    conv = model.layout.conv1d
    params = dict(model.named_parameters())
    new = {n: params[n] + (d.T if conv else d) for n, d in deltas.items()}
    prompts = [r["prompt"].format(r["subject"]) for r in reqs]
    targets = [r["target_new"] for r in reqs]
    if hp.use_rephrase:
        for ex in batch:
            if ex.rephrase:
                prompts.append(ex.rephrase)
                targets.append(ex.request["target_new"])
    eb, lab = target_batch(tok, prompts, targets, device)
    edit_nll = target_nll(functional_call(model, new, args=(), kwargs=dict(**eb, use_cache=False)).logits, lab)
    loc = _loc_batch(tok, [ex.loc_text for ex in batch], device)
    with torch.no_grad():
        base = torch.log_softmax(model(**loc, use_cache=False).logits.float(), -1)
    post_logits = functional_call(model, new, args=(), kwargs=dict(**loc, use_cache=False)).logits
    post = torch.log_softmax(post_logits.float(), -1)
    mask = loc["attention_mask"].float()
    kl = ((base.exp() * (base - post)).sum(-1) * mask).sum() / mask.sum()
    loss = hp.c_edit * edit_nll.mean() + hp.c_loc * kl
    info = {
        "loss": float(loss.detach()),
        "edit_nll_pre": float(nll_pre.mean()),
        "edit_nll_post": float(edit_nll[: len(reqs)].mean()),
        "rephrase_nll_post": float(edit_nll[len(reqs) :].mean()) if len(edit_nll) > len(reqs) else float("nan"),
        "loc_kl": float(kl),
        "delta_norm": float(sum(d.detach().norm() ** 2 for d in deltas.values()) ** 0.5),
    }
    return loss, info


CURVE_FIELDS = [
    "step",
    "loss",
    "edit_nll_pre",
    "edit_nll_post",
    "rephrase_nll_post",
    "loc_kl",
    "delta_norm",
    "edit_lrs",
    "elapsed_s",
]


def train(
    model: nn.Module,
    tok,
    hp: MendHparams,
    cache_dir=None,
    datasets=("counterfact", "zsre"),
    out_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    examples=None,
    max_steps_this_run: int | None = None,
) -> Path:
    """Train (or resume training) MEND's editor for ``model``; returns the editor's path.

    ``out_dir`` (default :func:`editor_dir`) holds ``checkpoints/step_N.safetensors`` +
    ``checkpoints/optimizer_N.pt`` every ``checkpoint_every`` steps, ``checkpoints/latest.json`` (step,
    paths, elapsed time), ``curve.csv`` and, at the end, ``editor.safetensors``.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir) if out_dir is not None else editor_dir(model, hp, cache_dir)
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(hp.seed)
    editor = MendEditor.for_model(model, hp)
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in editor.named_parameters() if n != "edit_lrs"], "lr": hp.lr},
            {"params": [editor.edit_lrs], "lr": hp.lr_lr},
        ]
    )
    start, elapsed = 0, 0.0
    latest = ck / "latest.json"
    curve_path = out / "curve.csv"
    if resume and latest.exists():
        state = json.loads(latest.read_text())
        editor, _ = load_editor_file(Path(state["editor"]), hp)
        opt = torch.optim.Adam(
            [
                {"params": [p for n, p in editor.named_parameters() if n != "edit_lrs"], "lr": hp.lr},
                {"params": [editor.edit_lrs], "lr": hp.lr_lr},
            ]
        )
        opt.load_state_dict(torch.load(state["optimizer"], weights_only=True))
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
        _truncate_curve(curve_path, start)
    elif curve_path.exists():
        curve_path.unlink()
    if examples is None:
        examples = {ds: training_examples(ds) for ds in datasets}
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    editor.train()
    end = hp.steps if max_steps_this_run is None else min(hp.steps, start + max_steps_this_run)
    bar = tqdm(range(start, end), initial=start, total=hp.steps, desc="MEND training", disable=not progress)
    t_run = time.perf_counter()
    try:
        for step in bar:
            batch = sample_batch(examples, hp, step)
            loss, info = training_step(model, tok, editor, batch, hp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(editor.parameters(), hp.grad_clip)
            opt.step()
            done = step + 1
            now = elapsed + time.perf_counter() - t_run
            if done % hp.log_every == 0 or done == end:
                row = {
                    "step": done,
                    **{k: info[k] for k in CURVE_FIELDS if k in info},
                    "edit_lrs": " ".join(f"{x:.3g}" for x in editor.edit_lrs.tolist()),
                    "elapsed_s": round(now, 1),
                }
                _append_curve(curve_path, row)
                bar.set_postfix(
                    loss=f"{info['loss']:.3f}",
                    pre=f"{info['edit_nll_pre']:.2f}",
                    post=f"{info['edit_nll_post']:.2f}",
                    kl=f"{info['loc_kl']:.3f}",
                )
            if done % hp.checkpoint_every == 0 or done == end:
                _checkpoint(editor, opt, ck, done, now, hp)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    final = out / "editor.safetensors"
    if end >= hp.steps:
        state = json.loads(latest.read_text())
        save_editor(
            editor.eval(),
            final,
            {"step": hp.steps, "hparams": hp.to_dict(), "elapsed_s": state["elapsed_s"], "datasets": list(examples)},
        )
    return final


def _checkpoint(editor, opt, ck: Path, step: int, elapsed: float, hp: MendHparams) -> None:
    w = ck / f"step_{step}.safetensors"
    o = ck / f"optimizer_{step}.pt"
    save_editor(editor, w, {"step": step, "hparams": hp.to_dict()})
    tmp = o.with_suffix(f".tmp{os.getpid()}")
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, o)
    state = {"step": step, "editor": str(w), "optimizer": str(o), "elapsed_s": elapsed, "hparams": hp.to_dict()}
    tmp = ck / f"latest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, ck / "latest.json")
    for old in ck.glob("step_*.safetensors"):  # keep the last two checkpoints
        s = int(old.stem.split("_")[1])
        if s < step - hp.checkpoint_every:
            old.unlink(missing_ok=True)
            (ck / f"optimizer_{s}.pt").unlink(missing_ok=True)


def _append_curve(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in CURVE_FIELDS})


def _truncate_curve(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a resumed run starts from."""
    if not path.exists():
        return
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        w.writeheader()
        w.writerows(rows)


def curve_blocks(path: Path, every: int = 100):
    """The training curve averaged over blocks of ``every`` steps (single logged batches are noisy):
    one row per block with the mean of each logged quantity and the elapsed time at its end."""
    import pandas as pd

    df = pd.read_csv(path).drop(columns=["edit_lrs"], errors="ignore")
    block = ((df["step"] - 1) // every + 1) * every
    out = df.drop(columns=["step", "elapsed_s"]).groupby(block).mean()
    out["elapsed_s"] = df.groupby(block)["elapsed_s"].max()
    return out.rename_axis("steps up to").reset_index()


# ---------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pmet.editing.mend", description="Train MEND's editor.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) the editor; checkpoints under $PMET_CACHE_DIR/mend")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--dataset", default="counterfact", help="hyperparameter file (mend_<model>_<dataset>.json)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--cache-dir", default=None)
    c = sub.add_parser("curve", help="print the training curve (block means) as a Markdown table")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--dataset", default="counterfact")
    c.add_argument("--every", type=int, default=100)
    c.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads if args.cmd == "train" else 1)
    from ..models import load_model
    from .registry import load_hparams  # the registry imports this module

    if args.cmd == "curve":
        from ..report import markdown_table

        model, _ = load_model(args.model)
        hp = load_hparams("mend", model, args.dataset)
        blocks = curve_blocks(editor_dir(model, hp, args.cache_dir) / "curve.csv", args.every).round(3)
        print(markdown_table(blocks.astype({"steps up to": str})))
        return 0

    model, tok = load_model(args.model)
    over = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v is not None}
    hp = load_hparams("mend", model, args.dataset, over)
    t0 = time.perf_counter()
    path = train(model, tok, hp, cache_dir=args.cache_dir, resume=not args.no_resume)
    print(
        f"MEND editor: {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s "
        f"this run; curve: {path.parent / 'curve.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
