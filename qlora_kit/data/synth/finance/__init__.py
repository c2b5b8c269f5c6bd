"""The finance domain's synthetic data: `qlora-kit data synth finance -n 2000 -o contracts.jsonl`.

Chinese contract clauses -> one-line JSON extraction pairs, in the style and with the exact answer
schema of the finance recipe's hand-written examples (recipes/data/finance.jsonl).

Each row is made in two steps. First a structured record is sampled: clause type, a principal
rounded like real contracts (multiples of 10,000), currency, annual rate, penalty wording,
maturity date, term, collateral and guarantor; fields a clause of that type would not state are
left null (about a third overall). Then the record is rendered as a clause by one of at least a
dozen sentence templates for its clause type (narrative, field list "贷款金额：…；", 第X条 articles,
（一）/1. enumerations, 甲方/乙方 wording, type-specific phrasings) and prefixed by an instruction.
Everything in the answer is stated in the clause: the amount in one of several notations (500万元,
1.2亿元, 1,500万元, 人民币叁仟万元整, EUR 1,200,000, ...), the rate as an annual rate, a monthly rate
("月息0.5%" -> 6.0) or LPR plus a spread with the resulting rate, the term in months or years
(years x 12), and the penalty wording verbatim (the value is the rate expression itself, e.g.
"日万分之五" or "借款利率上浮50%", without the surrounding "按…计收罚息", as in the bundled set).

Only the standard library is used; the same seed gives byte-identical output.

    vocabulary.py  names, places, collateral, per clause type its parties and phrasings
    records.py     sampling the structured record
    clauses.py     the record's fields as written (amounts, dates, terms)
    templates.py   sentence templates per clause type, instruction prefixes
    ../chinese.py  Chinese numerals
"""

from __future__ import annotations

import json
import random

from .records import _sample_record
from .templates import _prefix, _render
from .vocabulary import CLAUSE_TYPES, CURRENCIES

__all__ = ["CLAUSE_TYPES", "CURRENCIES", "SCHEMA_KEYS", "generate", "generate_with_meta"]

SCHEMA_KEYS = ("clause_type", "principal", "currency", "interest_rate", "penalty_rate",
               "maturity_date", "term_months", "collateral", "guarantor")


def _answer(rec: dict) -> dict:
    m = rec["maturity"]
    return {
        "clause_type": rec["t"],
        "principal": rec["principal"],
        "currency": rec["currency"],
        "interest_rate": rec["rate"],
        "penalty_rate": rec["penalty"]["value"] if rec["penalty"] else None,
        "maturity_date": m.isoformat() if m is not None else None,
        "term_months": rec["term_months"],
        "collateral": rec["collateral"]["value"] if rec["collateral"] else None,
        "guarantor": rec["guarantor"]["value"] if rec["guarantor"] else None,
    }



def generate_with_meta(n: int = 2000, seed: int = 0) -> list[tuple[dict, dict]]:
    """generate(), plus per row {"template": name, "record": sampled record} (for tests/inspection)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"qlora-kit-synth:finance:{seed}")
    out: list[tuple[dict, dict]] = []
    seen: set[str] = set()
    while len(out) < n:
        for _ in range(50):  # a repeated question is redrawn (rare)
            rec = _sample_record(rng)
            clause, name = _render(rng, rec)
            question = _prefix(rng, rec["t"]) + "\n" + clause
            if question not in seen:
                break
        seen.add(question)
        answer = json.dumps(_answer(rec), ensure_ascii=False)
        out.append(({"question": question, "answer": answer}, {"template": name, "record": rec}))
    return out


def generate(n: int = 2000, seed: int = 0) -> list[dict]:
    """n rows of {"question": instruction + "\\n" + clause, "answer": one-line JSON (SCHEMA_KEYS order)}.

    Deterministic: the same (n, seed) gives the same rows, and a smaller n is a prefix of a larger one.
    """
    return [row for row, _ in generate_with_meta(n, seed)]
