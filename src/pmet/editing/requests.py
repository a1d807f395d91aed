"""Edit requests: validation and normalisation, shared by every editor."""

from __future__ import annotations

from typing import Any

from ..data import InvalidRecordError, request_label, validate_request
from .tokens import target_ids, target_text


def normalize_requests(requests: Any, tok=None) -> list[dict]:
    """Validate and normalise requests: dicts (or records with ``as_request()``) with ``prompt`` (template
    with one ``{}``), ``subject``, ``target_new`` (string or ``{"str": ...}``), optional ``target_true``.

    As MEMIT, a leading space is prepended to ``target_new`` when it lacks one (so that ``" English"`` is
    tokenised as the word following the prompt). Raises :class:`pmet.data.InvalidRecordError`.
    """
    if isinstance(requests, dict) or hasattr(requests, "as_request"):
        requests = [requests]
    out = []
    for i, r in enumerate(requests):
        if hasattr(r, "as_request"):
            r = r.as_request()
        validate_request(r, i)
        r = dict(r)
        for k in ("target_new", "target_true"):
            if isinstance(r.get(k), dict):
                r[k] = r[k].get("str")
        r["target_new"] = target_text(r["target_new"])
        if tok is not None and not target_ids(tok, r["target_new"]):
            raise InvalidRecordError(f"{request_label(r, i)}: target_new {r['target_new']!r} has no tokens")
        r.setdefault("case_id", i)
        out.append(r)
    if not out:
        raise InvalidRecordError("no requests to edit")
    return out
