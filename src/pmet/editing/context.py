"""Context templates: the prefixes ``pref_j`` of Eqs. 10 and 12, generated once by the model itself.

As MEMIT/PMET ``get_context_templates``: five short texts are generated from the start words "The",
"Therefore", "Because", "I", "You" (``max_out_len=10`` tokens, start word included), braces are replaced by
spaces, and each becomes ``"<text>. {}"``; the templates are ``[["{}"], [five prefixed templates]]``
(two *groups*, which matters for the key average, see :func:`pmet.editing.core.compute_keys`).

Difference from the authors: their ``generate_fast`` samples top-k (k=5) with an unseeded RNG, so the
prefixes change from run to run. Here sampling is top-k=5 with a seeded generator on the CPU, and the
result is cached as JSON in ``cache_dir/context_templates/`` per model fingerprint and settings, so
every run (and the value cache keys) see the same prefixes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..models import model_fingerprint
from ..paths import cache_dir as default_cache_dir

STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_prefixes(
    model: nn.Module, tok, starts=STARTS, length: int = 10, n_per_start: int = 1, seed: int = 0, top_k: int = 5
) -> list[str]:
    """``n_per_start`` seeded top-k samples of ``length`` tokens (start included) per start word."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for start in starts:
        base = tok(start)["input_ids"]
        for _ in range(n_per_start):
            ids = list(base)
            n_special = len(base) - len(tok(start, add_special_tokens=False)["input_ids"])
            while len(ids) - n_special < length:
                logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
                top = logits.float().cpu().topk(top_k)
                probs = top.values.softmax(-1)
                ids.append(int(top.indices[torch.multinomial(probs, 1, generator=gen)]))
            texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


def get_context_templates(
    model: nn.Module, tok, length: int = 10, n_per_start: int = 1, seed: int = 0, cache_dir: str | Path | None = None
) -> list[list[str]]:
    """``[["{}"], ["<gen>. {}", ...]]`` for ``model``, cached on disk (JSON, atomic write)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    settings = {
        "starts": list(STARTS),
        "length": length,
        "n_per_start": n_per_start,
        "seed": seed,
        "top_k": 5,
        "format": "{gen}. {{}}",
    }
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = root / "context_templates" / f"{model_fingerprint(model)}_{tag}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("settings") == settings:
                return data["templates"]
        except (OSError, ValueError, KeyError):
            pass  # corrupt: regenerate
    was_training = model.training
    model.eval()
    gens = generate_prefixes(model, tok, length=length, n_per_start=n_per_start, seed=seed)
    model.train(was_training)
    templates = [["{}"], [g.replace("{", " ").replace("}", " ") + ". {}" for g in gens]]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"settings": settings, "templates": templates}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # read-only cache: still deterministic thanks to the seed
    return templates


def flatten(templates: list[list[str]]) -> tuple[list[str], list[int]]:
    """The templates as one list plus the group sizes (for :func:`pmet.editing.core.compute_keys`)."""
    return [t for group in templates for t in group], [len(g) for g in templates]
