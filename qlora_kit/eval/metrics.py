"""Metrics for `qlora-kit eval`: base model vs fine-tuned model on held-out Q/A pairs.

score(task, pred, ref, glossary) is the generic metrics of every task (generic.py: exact_match,
rouge_l, bleu) plus the metric family of the task's domain (domains.py says which; e.g. citations.py
for legal, json_fields.py for finance, key_terms.py for medical and industrial). aggregate()
averages a list of score() rows per key, ignoring None.

The metric functions of every family are importable from here too. Standard library only.
"""

from __future__ import annotations

import math
from importlib import import_module

from .. import domains
from . import generic
from .citations import citation_scores, citations
from .contradiction import contradicts
from .generic import bleu, exact_match, normalize, rouge_l
from .json_fields import json_scores
from .key_terms import key_terms, term_recall
from .numerals import cn_to_int

__all__ = [
    "normalize", "exact_match", "rouge_l", "bleu", "cn_to_int", "citations", "citation_scores",
    "json_scores", "key_terms", "term_recall", "contradicts", "score", "aggregate", "family", "families",
    "labels", "primary", "reads_json",
]


def family(task: str):
    """The metric family (module) of a task's domain; None for generic. ValueError for an unknown task."""
    t = (task or "").strip().lower()
    if t not in domains.tasks():
        raise ValueError(f"unknown eval task {task!r}; expected one of {', '.join(domains.tasks())}")
    d = domains.get(t)
    return import_module(d.metrics) if d else None


def families() -> list:
    """Every registered domain's family once, by module name (the order of the report's table)."""
    return [import_module(m) for m in sorted({d.metrics for d in domains.REGISTRY.values()})]


def labels() -> dict[str, tuple[str, bool]]:
    """metric key -> (label in the report, higher is better), generic first, then each family's."""
    out = dict(generic.LABELS)
    for fam in families():
        out.update(fam.LABELS)
    return out


def primary(task: str) -> str:
    """The metric the report ranks examples by: the family's, else rouge_l (also for a task no longer known)."""
    try:
        fam = family(task)
    except ValueError:
        fam = None
    return fam.PRIMARY if fam is not None else generic.PRIMARY


def reads_json(task: str) -> bool:
    """Whether the task's answers are JSON (eval then also answers under a JSON constraint)."""
    return bool(getattr(family(task), "READS_JSON", False))


def score(task: str, pred: str, ref: str, glossary: list[str] = ()) -> dict:
    """Flat dict of floats (or None) for one answer: always exact_match, rouge_l, bleu, then the
    task's family (e.g. legal + citation_f1, citation_exact, None when ref cites nothing; finance +
    json_valid, field_accuracy; medical/industrial + term_recall, contradiction 1.0/0.0).
    ValueError for an unknown task."""
    fam = family(task)
    pred, ref = pred or "", ref or ""
    out = generic.scores(pred, ref)
    if fam is not None:
        out.update(fam.scores(pred, ref, glossary))
    return out


def aggregate(rows: list[dict]) -> dict:
    """Mean of each key over rows, ignoring None (and non-numeric values); a key that is None in
    every row is None. "n" is the number of rows."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            sums.setdefault(k, 0.0)
            counts.setdefault(k, 0)
            if v is None or isinstance(v, str) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            sums[k] += float(v)
            counts[k] += 1
    out = {k: (sums[k] / counts[k] if counts[k] else None) for k in sums}
    out["n"] = len(rows)
    return out
