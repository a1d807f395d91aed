"""Summaries of results files, whichever dataset wrote them."""

from __future__ import annotations

import os

from .counterfact import summarize_counterfact
from .results import load_results
from .zsre import summarize_zsre


def summarize_file(path: str | os.PathLike, ci: str = "normal", **kwargs) -> dict:
    """Summary of a results file (CounterFact or zsRE, from its meta ``dataset``)."""
    meta, rows = load_results(path)
    dataset = meta.get("dataset")
    if dataset == "zsre":
        return summarize_zsre(rows, ci=ci, **kwargs)
    if dataset == "counterfact":
        return summarize_counterfact(rows, ci=ci, **kwargs)
    raise ValueError(f"{path}: unknown dataset {dataset!r} in its meta line")
