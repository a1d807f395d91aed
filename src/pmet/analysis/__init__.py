"""Analyses behind the paper's figures.

* :mod:`pmet.analysis.similarity` -- Fig. 2: cosine and top-k Jaccard similarity of the hidden state
  before and after MHSA / FFN, per layer (``component_similarity``, ``plot_similarity``).
* :mod:`pmet.analysis.causal_trace` -- causal tracing (Meng et al. 2022a), used to choose a model's
  critical layers (``trace_fact``, ``trace_facts``, ``average_effects``, ``choose_critical_layers``).
"""

from .causal_trace import (
    average_effects,
    choose_critical_layers,
    embedding_noise_std,
    select_facts,
    subject_token_range,
    subsample,
    trace_fact,
    trace_facts,
)
from .similarity import claim_summary, claim_verdict, component_similarity, jaccard, plot_similarity, topk_jaccard

__all__ = [
    "component_similarity",
    "plot_similarity",
    "claim_summary",
    "claim_verdict",
    "jaccard",
    "topk_jaccard",
    "trace_fact",
    "trace_facts",
    "select_facts",
    "embedding_noise_std",
    "subject_token_range",
    "subsample",
    "average_effects",
    "choose_critical_layers",
]
