"""The legal metric family: statute citations, (law, article), of the answer against the reference.

    citation_f1     F1 of the answer's citations against the reference's (None: the reference cites nothing)
    citation_exact  1.0 when the two sets are equal
"""

from __future__ import annotations

import re

from .generic import nfkc
from .numerals import CN_CHARS, cn_to_int

LABELS = {"citation_f1": ("citation F1", True), "citation_exact": ("citation exact", True)}
PRIMARY = "citation_f1"

_COMMON_LAWS = ("劳动争议调解仲裁法", "消费者权益保护法", "道路交通安全法", "民事诉讼法", "劳动合同法",
                "食品安全法", "劳动法", "民法典", "公司法", "刑法")
_NUM = rf"(?:[0-9]+|[{CN_CHARS}]+)"
_LAW_RE = re.compile(
    r"《\s*([^《》\n]{1,60}?)\s*》"
    r"|((?:中华人民共和国)?(?:" + "|".join(_COMMON_LAWS) + r"))(?=\s*(?:的)?\s*第)"
)
_GAP_RE = re.compile(r"\s*(?:[(（][^()（）\n]{0,20}[)）])?\s*(?:的|之)?\s*")
_FIRST_RE = re.compile(rf"第\s*({_NUM}(?:\s*[、,，]\s*{_NUM})*)\s*条")
_NEXT_RE = re.compile(rf"\s*(?:[、,，和及与或]|以及|或者)\s*第?\s*({_NUM}(?:\s*[、,，]\s*{_NUM})*)\s*条")
_RANGE_RE = re.compile(rf"\s*(?:至|到|-|~|～|—|－)\s*第?\s*({_NUM})\s*条")
_SUB_RE = re.compile(rf"(?:\s*(?:[、,，和及与或]|以及|或者)?\s*第\s*{_NUM}\s*[款项目]|\s*[(（][{CN_CHARS}0-9]+[)）]\s*项?)+")
_MAX_RANGE = 50


def _law_name(name: str) -> str:
    """《中华人民共和国公司法（2018修正）》 -> 公司法."""
    n = re.sub(r"\s+", "", nfkc(name)).strip("《》<>")
    n = re.sub(r"[(（][^()（）]*[)）]$", "", n)  # edition note inside the brackets
    if n.startswith("中华人民共和国"):
        n = n[len("中华人民共和国"):]
    return n


def _articles(numlist: str) -> list[int]:
    out = []
    for part in re.split(r"\s*[、,，]\s*", numlist):
        v = cn_to_int(part)
        if v is not None and v > 0:
            out.append(v)
    return out


def citations(text: str) -> set[tuple[str, int]]:
    """Statute citations in Chinese legal text as {(law, article)}.

    Recognised: 《...》 followed (optionally after an edition note in parentheses and 的) by
    第X条, X in Chinese or Arabic numerals (full-width digits too); lists of articles of the same
    law ("第四十六条、第四十七条", "第三十八、三十九条", "第四十六条和第四十七条"); ranges
    ("第三十九条至第四十一条" -> 39, 40, 41; more than 50 apart -> only the two ends); 款/项/目
    suffixes are ignored ("第四十六条第一款" -> 46). Without 《》 only the most common laws are
    recognised, and only when 第X条 follows directly (劳动合同法第三十九条). Law names are NFKC,
    without 《》, without the prefix 中华人民共和国 and without a trailing edition note
    ("（2018修正）"). Bare 第X条 and 本法/该法第X条 have no law and are not counted.
    """
    t = nfkc(text)
    out: set[tuple[str, int]] = set()
    for m in _LAW_RE.finditer(t):
        law = _law_name(m.group(1) or m.group(2))
        if not law:
            continue
        pos = _GAP_RE.match(t, m.end()).end()
        first = _FIRST_RE.match(t, pos)
        if not first:
            continue
        arts = _articles(first.group(1))
        pos = first.end()
        while True:
            sub = _SUB_RE.match(t, pos)
            if sub:
                pos = sub.end()
            rng = _RANGE_RE.match(t, pos)
            if rng and arts:
                end = cn_to_int(rng.group(1))
                start = arts[-1]
                if end is not None and end > start:
                    arts.extend(range(start + 1, end + 1) if end - start <= _MAX_RANGE else [end])
                pos = rng.end()
                continue
            nxt = _NEXT_RE.match(t, pos)
            if not nxt:
                break
            arts.extend(_articles(nxt.group(1)))
            pos = nxt.end()
        out.update((law, a) for a in arts)
    return out


def citation_scores(pred: str, ref: str) -> dict:
    """Precision/recall/F1 of pred's citations against ref's; exact = 1.0 when the sets are equal.

    All four are None when ref cites nothing (nothing to check). A pred without citations
    scores 0.0 everywhere.
    """
    r = citations(ref)
    if not r:
        return {"precision": None, "recall": None, "f1": None, "exact": None}
    p = citations(pred)
    tp = len(p & r)
    prec = tp / len(p) if p else 0.0
    rec = tp / len(r)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "exact": 1.0 if p == r else 0.0}



def scores(pred: str, ref: str, glossary=()) -> dict:
    c = citation_scores(pred, ref)
    return {"citation_f1": c["f1"], "citation_exact": c["exact"]}
