"""A mechanical, high-precision check that an answer says the opposite of the reference
(polarity of 需要/不需要 and the like, or a different number for the same thing)."""

from __future__ import annotations

import math
import re

from .generic import nfkc
from .quantities import quantities

_POLARITY = (  # (negated, positive)
    ("不需要", "需要"), ("无需", "需要"), ("不必", "需要"),
    ("不可以", "可以"), ("不能", "可以"), ("不得", "可以"), ("严禁", "可以"),
    ("禁止", "允许"), ("不允许", "允许"),
    ("不建议", "建议"), ("不应", "应"), ("没有", "有"),
)
_NEGATORS = "不无没未非否勿别莫"
_HEDGES = ("如果", "假如", "若", "如需", "一旦", "是否", "能否", "可否", "何时", "必要时", "只有", "除非",
           "才", "可能", "或许", "也许", "有时", "偶尔", "是不是")
_DEPENDENT = ("根据", "按照", "视", "依")  # 根据需要, 视需要: not an assertion
_WORD_BEFORE = {"应": "相反对适响供答效感呼照理顺", "有": "所只唯"}  # 相应, 反应, 所有, 只有: other words
_CLAUSE_END = "。！？!?；;，,\n：:"
_FILLERS = "该当够"
_CONTRA_UNITS = {"%", "MΩ", "V", "mmol/L", "个月", "天", "年", "年(日期)"}
_FUNCTION_CHARS = set("不低于高大小超过为是约应需在至少多最长短得的了可以能要等达到和与及或且并但而则其该此这那"
                      "也都就还再每按上下内外时后前中之把被对从向个次经已将会请一")


def _continuation(s: str, i: int) -> str:
    """Up to 6 characters after position i (fillers 该/当/够 skipped), cut at punctuation."""
    while i < len(s) and s[i] in _FILLERS:
        i += 1
    out = []
    for c in s[i:i + 6]:
        if not (c.isalnum() or "\u4e00" <= c <= "\u9fff"):
            break
        out.append(c)
    return "".join(out)


def _claims(s: str, word: str) -> list[str]:
    """Continuations X of the assertions `word` + X in s: not directly after a negator, not in a
    clause with a condition, hedge or question (如果/是否/才/可能/…/吗)."""
    out = []
    start = 0
    while True:
        i = s.find(word, start)
        if i < 0:
            return out
        start = i + 1
        if i and s[i - 1] in _NEGATORS or s[max(0, i - 2):i].endswith(_DEPENDENT) \
                or i and s[i - 1] in _WORD_BEFORE.get(word, ""):
            continue
        lo = max(s.rfind(c, 0, i) for c in _CLAUSE_END) + 1
        his = [s.find(c, i) for c in _CLAUSE_END]
        hi = min([h for h in his if h >= 0] or [len(s)])
        if any(h in s[lo:i] for h in _HEDGES) or re.search(r"[吗呢]$", s[i:hi]) or s[hi:hi + 1] in ("?", "？"):
            continue
        x = _continuation(s, i + len(word))
        if len(x) >= 2:
            out.append(x)


def _agrees(x: str, ys: list[str]) -> bool:
    k = min(len(x), 4)
    return any(len(y) >= k and y[:k] == x[:k] for y in ys)


def _polarity_conflict(ref: str, pred: str) -> bool:
    for neg, pos in _POLARITY:
        for a, b in ((ref, pred), (pred, ref)):
            a_neg = _claims(a, neg)
            if not a_neg:
                continue
            b_pos = _claims(b, pos)
            if not b_pos:
                continue
            b_neg, a_pos = _claims(b, neg), _claims(a, pos)
            for x in a_neg:
                if _agrees(x, b_pos) and not _agrees(x, b_neg) and not _agrees(x, a_pos):
                    return True
    return False


def _sentences(s: str) -> list[str]:
    return [p for p in re.split(r"[。！？!?；;\n]|\.(?=\s|$)", s) if p.strip()]


def _content_bigrams(sentence: str, qtys: list[dict]) -> set[str]:
    """Bigrams of adjacent CJK/Latin characters, quantities removed, none with a function char."""
    t = sentence
    for q in sorted(qtys, key=lambda q: -q["start"]):
        t = t[:q["start"]] + " " + t[q["end"]:]
    out = set()
    for a, b in zip(t, t[1:]):
        if a in _FUNCTION_CHARS or b in _FUNCTION_CHARS:
            continue
        if all(c.isalpha() or "\u4e00" <= c <= "\u9fff" for c in (a, b)):
            out.add(a + b)
    return out


def _number_conflict(ref: str, pred: str) -> bool:
    def units(text):
        per = []  # (unit, values, bigrams of its sentence)
        for sent in _sentences(text):
            qs = quantities(sent)
            if not qs:
                continue
            bg = _content_bigrams(sent, qs)
            per.extend((q["unit"], q["values"], bg) for q in qs if q["unit"] in _CONTRA_UNITS)
        return per

    r, p = units(ref), units(pred)
    for unit in {u for u, _, _ in r} & {u for u, _, _ in p}:
        rv = {v for u, vals, _ in r if u == unit for v in vals}
        pv = {v for u, vals, _ in p if u == unit for v in vals}
        if any(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a in rv for b in pv):
            continue  # pred states one of ref's numbers for this unit somewhere
        for _, _, rb in (x for x in r if x[0] == unit):
            for _, _, pb in (x for x in p if x[0] == unit):
                shared = len(rb & pb)
                if shared >= 1 and shared >= min(2, len(rb), len(pb)):
                    return True
    return False


def contradicts(pred: str, ref: str) -> bool:
    """A mechanical, high-precision check that pred says the opposite of ref. True when:

    1. Polarity: ref asserts NEG + X and pred asserts POS + X (or pred NEG + X and ref POS + X),
       for the pairs 不需要/需要, 无需/需要, 不必/需要, 不可以/可以, 不能/可以, 不得/可以, 严禁/可以,
       禁止/允许, 不允许/允许, 不建议/建议, 不应/应, 没有/有. X is the next 2-6 characters (up to
       punctuation; 该/当/够 skipped, so 不应当及时 ~ 应及时); the two X must share their first
       min(len(X), 4) characters. An occurrence does not count when a negator (不无没未非否勿别莫)
       directly precedes it, when it is part of another word (相应/反应/所有/只有) or follows 根据/按照/视
       (根据需要), when its clause holds a condition or hedge (如果, 若, 如需, 一旦, 是否,
       只有, 除非, 才, 可能, 或许, 必要时, ...), or when the clause is a question (吗/呢/?).
       No conflict either when the side asserting POS + X also asserts NEG + X, or vice versa.
    2. Numbers: for one of the units %, MΩ, V, mmol/L, 个月, 天, 年 (4-digit years separately),
       both texts state numbers, no number of pred for that unit equals any of ref's, and a ref
       sentence and a pred sentence with that unit are about the same thing: they share at least
       min(2, their size) content bigrams (adjacent CJK/Latin characters, quantities removed,
       no function characters such as 不/低/于/为/应/的).

    Anything else (paraphrase, different wording, numbers in different contexts) is False.
    """
    p = re.sub(r"\s+", "", nfkc(pred))
    r = re.sub(r"\s+", "", nfkc(ref))
    if not p or not r:
        return False
    if _polarity_conflict(r, p):
        return True
    return _number_conflict(nfkc(ref), nfkc(pred))
