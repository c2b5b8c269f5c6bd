"""The medical and industrial metric family: key terms of the reference found in the answer, and a
mechanical contradiction check.

    term_recall    share of the reference's key terms (glossary entries, quantities, codes) in the answer
    contradiction  1.0 when the answer says the opposite of the reference (contradiction.py)

The glossary is the recipe's evaluation.glossary.
"""

from __future__ import annotations

import math
import re

from .contradiction import contradicts
from .generic import nfkc
from .quantities import quantities

LABELS = {"term_recall": ("key-term recall", True), "contradiction": ("contradiction rate", False)}
PRIMARY = "term_recall"

_CODE_RE = re.compile(
    r"(?<![A-Za-z])(?:"
    r"(?:GB/T|GB/Z|GB|JB/T|JB|DL/T|NB/T|YY/T|YY|HG/T|SH/T|WS/T|QB/T|JGJ|CJJ|TSG|ISO/IEC|ISO|IEC|IEEE|"
    r"ASTM|ANSI|DIN|EN|JIS|NFPA|UL|API)\s*[A-Z]?\s*\d{2,}(?:\s*[.\-–—:/]\s*\d+)*"
    r"|国药准字\s*[HZSJBTF]\s*\d{8}"
    r"|[A-Z]\d{2}[A-Z]{2}\d{2}"  # ATC drug code, e.g. J01CA04
    r")(?![0-9])"
)


def _norm_term(s: str) -> str:
    """Comparison form of a term or a text: NFKC, casefold, no whitespace, ASCII range dashes."""
    t = re.sub(r"\s+", "", nfkc(s)).casefold()
    return re.sub(r"(?<=\d)[~～–—至到](?=\d)", "-", t)


def _ref_terms(ref: str, glossary) -> list[tuple[str, str, object]]:
    """[(display, kind, key)] in order of appearance in ref, deduplicated by key."""
    t = nfkc(ref)
    nt = _norm_term(t)
    found: list[tuple[int, str, str, object]] = []
    for g in glossary or ():
        if not isinstance(g, str) or not g.strip():
            continue
        key = _norm_term(g)
        pos = nt.find(key)
        if pos >= 0:
            found.append((pos, g.strip(), "text", key))
    # glossary positions are in the normalised text; map the others roughly the same way
    for q in quantities(t):
        found.append((len(_norm_term(t[:q["start"]])), q["text"], "qty", (q["unit"], q["values"])))
    for m in _CODE_RE.finditer(t):
        found.append((len(_norm_term(t[:m.start()])), m.group(0).strip(), "code", _norm_term(m.group(0))))
    found.sort(key=lambda x: x[0])
    seen, out = set(), []
    for _, disp, kind, key in found:
        k2 = _norm_term(disp)
        if (kind, key) in seen or ("text", k2) in seen:
            continue
        seen.add((kind, key))
        seen.add(("text", k2))
        out.append((disp, kind, key))
    return out


def key_terms(ref: str, glossary: list[str] = ()) -> list[str]:
    """Terms in the reference a domain reader would check, in order of appearance, deduplicated:

    - glossary entries that occur in ref (NFKC, case- and whitespace-insensitive);
    - numbers with units or percentages: "0.5 MΩ", "19.5%", "380 V", "7.8 mmol/L", "3.9-6.1 mmol/L",
      "六个月", "百分之二十", "5万元" (Arabic or Chinese numerals; ordinals like 第三天 excluded);
    - standard and drug codes: "ISO 10816", "GB/T 1234", "IEC 60204-1", "国药准字H20051234", ATC "J01CA04".
    """
    return [d for d, _, _ in _ref_terms(ref, glossary)]


def _same_qty(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a[1], b[1]))


def term_recall(pred: str, ref: str, glossary: list[str] = ()) -> float | None:
    """Share of key_terms(ref, glossary) found in pred; None when ref has no key terms.

    Glossary entries: substring of the normalised pred. Quantities: the same unit and value(s)
    anywhere in pred, whatever the writing ("六个月" == "6个月", "0.5MΩ" == "0.5 MΩ", "5万元" ==
    "50000元"). Codes: normalised substring not followed by another digit ("ISO 1081" is not in
    "ISO 10816").
    """
    terms = _ref_terms(ref, glossary)
    if not terms:
        return None
    pt = nfkc(pred)
    npred = _norm_term(pt)
    pq = [(q["unit"], q["values"]) for q in quantities(pt)]
    hit = 0
    for disp, kind, key in terms:
        if kind == "text":
            ok = key in npred
        elif kind == "qty":
            ok = any(_same_qty(key, q) for q in pq)
        else:
            ok = _bounded(npred, key)
        hit += ok
    return hit / len(terms)


def _bounded(hay: str, needle: str) -> bool:
    """needle in hay, not glued to a longer number or word on either side."""
    pat = re.escape(needle)
    if needle[:1].isalnum():
        pat = r"(?<![a-z0-9.])" + pat
    if needle[-1:].isdigit():
        pat += r"(?![0-9])"
    return re.search(pat, hay) is not None



def scores(pred: str, ref: str, glossary=()) -> dict:
    return {"term_recall": term_recall(pred, ref, glossary), "contradiction": 1.0 if contradicts(pred, ref) else 0.0}
