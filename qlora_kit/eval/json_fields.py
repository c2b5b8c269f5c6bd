"""The finance metric family: answers that are JSON objects, scored field by field.

    json_valid      1.0 when a JSON object could be read from the answer
    field_accuracy  share of the reference's top-level fields the answer gets right

The answers of a family that READS_JSON are also decoded under a JSON constraint by eval (any JSON
object, or the recipe's evaluation.json_schema); the valid-JSON rates with and without it are
labelled here too.
"""

from __future__ import annotations

import json
import math
import re

from .generic import nfkc

LABELS = {
    "json_valid": ("valid JSON", True), "field_accuracy": ("JSON field accuracy", True),
    # structured output (eval with a JSON schema, any task): the whole answer one JSON value matching it, free and constrained
    "json_schema_valid": ("valid JSON + schema, free", True),
    "json_schema_valid_constrained": ("valid JSON + schema, constrained", True),
    "field_accuracy_constrained": ("JSON field accuracy, constrained", True),
}
PRIMARY = "field_accuracy"
READS_JSON = True  # eval answers under a JSON constraint too, and scores those answers' fields

def _balanced_end(s: str, start: int) -> int | None:
    """Index after the } that closes the { at `start` (JSON strings respected), or None."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(s)):
        c = s[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _extract_json(text: str):
    """The whole text if it is a JSON object, else the first balanced {...} that parses.

    Prose and ```json fences around the object are fine. A balanced {...} that does not parse is
    skipped as a whole (its inner objects are not tried: a broken answer is invalid, not its
    sub-object); an unclosed { ends the search.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    try:
        obj = json.loads(s)
        if isinstance(obj, dict):
            return obj
    except (ValueError, RecursionError):
        pass
    i = s.find("{")
    while i != -1:
        end = _balanced_end(s, i)
        if end is None:
            return None
        try:
            obj = json.loads(s[i:end])
            if isinstance(obj, dict):
                return obj
        except (ValueError, RecursionError):
            pass
        i = s.find("{", end)
    return None


_NUMERIC_STR = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|[+-]?\.\d+")


def _as_number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        t = nfkc(v).strip()
        if _NUMERIC_STR.fullmatch(t):
            return float(t.replace(",", ""))
    return None


def _values_equal(ref, pred) -> bool:
    """null only matches null; booleans only booleans; a number matches a number or a numeric
    string of the same value (5000000 == 5000000.0 == "5000000" == "5,000,000"); two strings match
    after NFKC + strip; lists element-wise in order; objects key by key."""
    if ref is None or pred is None:
        return ref is None and pred is None
    if isinstance(ref, bool) or isinstance(pred, bool):
        return isinstance(ref, bool) and isinstance(pred, bool) and ref == pred
    if isinstance(ref, str) and isinstance(pred, str):
        return nfkc(ref).strip() == nfkc(pred).strip()
    if isinstance(ref, (int, float)) or isinstance(pred, (int, float)):
        a, b = _as_number(ref), _as_number(pred)
        if a is None or b is None:
            return False
        if math.isnan(a) or math.isnan(b):
            return False
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(ref, list) and isinstance(pred, list):
        return len(ref) == len(pred) and all(_values_equal(a, b) for a, b in zip(ref, pred))
    if isinstance(ref, dict) and isinstance(pred, dict):
        return ref.keys() == pred.keys() and all(_values_equal(ref[k], pred[k]) for k in ref)
    return False


def json_scores(pred: str, ref: str) -> dict:
    """{"valid": 0/1, "field_accuracy": float|None, "fields": {key: 0/1}}.

    valid = 1 when a JSON object could be extracted from pred (see _extract_json).
    field_accuracy = share of ref's top-level keys whose value in pred matches (_values_equal;
    a missing key is wrong; key order is irrelevant); None when ref holds no JSON object or an
    empty one. fields gives the 0/1 per ref key.
    """
    p = _extract_json(pred)
    r = _extract_json(ref)
    valid = 1 if isinstance(p, dict) else 0
    if not isinstance(r, dict) or not r:
        return {"valid": valid, "field_accuracy": None, "fields": {}}
    p = p if isinstance(p, dict) else {}
    fields = {k: 1 if k in p and _values_equal(v, p[k]) else 0 for k, v in r.items()}
    return {"valid": valid, "field_accuracy": sum(fields.values()) / len(fields), "fields": fields}



def scores(pred: str, ref: str, glossary=()) -> dict:
    j = json_scores(pred, ref)
    return {"json_valid": float(j["valid"]), "field_accuracy": j["field_accuracy"]}
