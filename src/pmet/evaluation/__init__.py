"""Evaluation of edited models: CounterFact (Table 1) and zsRE (Table 2) metrics of ROME/MEMIT/PMET.

* :mod:`.scoring`     batched teacher-forced target scoring (logits only at target positions)
* :mod:`.counterfact` efficacy / generalization / specificity (+ MEMIT's diff and acc variants), score
* :mod:`.zsre`        per-token top-1 accuracy on src / rephrase / loc
* :mod:`.generation`  sampled generation, fluency (n-gram entropy), consistency (TF-IDF; proxy offline)
* :mod:`.stats`       normal / bootstrap CIs, harmonic mean, paired tests
* :mod:`.results`     JSON Lines per-record results with resume; :mod:`.summarize` a file's summary
"""

from .counterfact import CF_METRICS, counterfact_table, evaluate_counterfact, summarize_counterfact
from .generation import ConsistencyScorer, compute_n_gram_entropy, generate_fast, n_gram_entropy
from .results import ResultsFile, load_results
from .scoring import PairScore, fast_path_ok, score_id_pairs, score_pairs
from .stats import CI, bootstrap_ci, compare_rows, harmonic_mean, mean_ci, normal_ci, paired_test
from .summarize import summarize_file
from .zsre import ZSRE_METRICS, evaluate_zsre, summarize_zsre, zsre_table

__all__ = [
    "evaluate_counterfact",
    "summarize_counterfact",
    "counterfact_table",
    "CF_METRICS",
    "evaluate_zsre",
    "summarize_zsre",
    "zsre_table",
    "ZSRE_METRICS",
    "ConsistencyScorer",
    "generate_fast",
    "n_gram_entropy",
    "compute_n_gram_entropy",
    "ResultsFile",
    "load_results",
    "summarize_file",
    "PairScore",
    "score_pairs",
    "score_id_pairs",
    "fast_path_ok",
    "CI",
    "compare_rows",
    "mean_ci",
    "normal_ci",
    "bootstrap_ci",
    "harmonic_mean",
    "paired_test",
]
