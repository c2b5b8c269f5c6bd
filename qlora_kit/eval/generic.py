"""Generic metrics, computed for every task. Chinese text is first-class: every text metric works
on characters, never on whitespace words.

    exact_match  1.0/0.0 after normalize(): NFKC, strip, collapse whitespace, drop trailing
                 sentence punctuation (. 。 ! ? , ; : 、 … ~).
    rouge_l      character-level ROUGE-L F1 (LCS, beta = 1) after NFKC and removing whitespace.
    bleu         character-level sentence BLEU (default 4-gram, uniform weights) with the usual
                 brevity penalty. Unigram precision is unsmoothed (no shared character -> 0.0);
                 for n > 1 the precision is (matches + 1) / (candidate n-grams + 1), i.e. the
                 add-one smoothing of Lin & Och (2004), "ORANGE", as used for BLEU-S+1.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

LABELS = {"exact_match": ("exact match", True), "rouge_l": ("ROUGE-L (char)", True), "bleu": ("BLEU-4 (char)", True)}
PRIMARY = "rouge_l"


def nfkc(s: str) -> str:
    """NFKC of s ('' for None): the first step of every metric, full-width and half-width alike."""
    return unicodedata.normalize("NFKC", s or "")


_TRAILING_PUNCT = ".。!?,;:、…~～·"


def normalize(s: str) -> str:
    """NFKC, strip, collapse runs of whitespace to one space, drop trailing sentence punctuation.

    Full-width ！？，；： become ASCII under NFKC; 。 and 、 are dropped as they are. Closing
    brackets and quotes are kept (they can be part of the answer, e.g. "第一条（二）").
    """
    s = re.sub(r"\s+", " ", nfkc(s)).strip()
    while s and (s[-1] in _TRAILING_PUNCT or s[-1].isspace()):
        s = s[:-1]
    return s


def exact_match(pred: str, ref: str) -> float:
    """1.0 when normalize(pred) == normalize(ref), else 0.0 (two empty strings match)."""
    return 1.0 if normalize(pred) == normalize(ref) else 0.0


def _chars(s: str) -> str:
    """NFKC, all whitespace removed: the unit of the character-level metrics."""
    return "".join(c for c in nfkc(s) if not c.isspace())


def _lcs_len(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö), O(len(b))
    big-integer operations instead of an O(len(a) * len(b)) Python loop."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # bits over the longer string, loop over the shorter one
    masks: dict[str, int] = {}
    for i, c in enumerate(a):
        masks[c] = masks.get(c, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for c in b:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(pred: str, ref: str) -> float:
    """Character-level ROUGE-L F1 (beta = 1): P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R).

    NFKC and whitespace removal first; 0.0 when either side is empty.
    """
    p, r = _chars(pred), _chars(ref)
    if not p or not r:
        return 0.0
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def _ngrams(s: str, n: int) -> Counter:
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def bleu(pred: str, ref: str, max_n: int = 4) -> float:
    """Character-level sentence BLEU with brevity penalty.

    p_1 = clipped unigram matches / candidate unigrams (unsmoothed: 0 matches -> BLEU 0.0);
    p_n (n > 1) = (clipped matches + 1) / (candidate n-grams + 1)  (Lin & Och 2004 add-one);
    BLEU = BP * exp(mean(log p_n)), BP = 1 if c > r else exp(1 - r/c), with c, r the candidate
    and reference lengths in characters. NFKC and whitespace removal first; 0.0 when either side
    is empty.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    p, r = _chars(pred), _chars(ref)
    if not p or not r:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        cand, refc = _ngrams(p, n), _ngrams(r, n)
        total = sum(cand.values())
        match = sum(min(cnt, refc[g]) for g, cnt in cand.items())
        if n == 1:
            if match == 0:
                return 0.0
            prec = match / total
        else:
            prec = (match + 1) / (total + 1)
        log_sum += math.log(prec)
    bp = 1.0 if len(p) > len(r) else math.exp(1 - len(r) / len(p))
    return bp * math.exp(log_sum / max_n)



def scores(pred: str, ref: str) -> dict:
    """exact_match, rouge_l and bleu of one answer."""
    return {"exact_match": exact_match(pred, ref), "rouge_l": rouge_l(pred, ref), "bleu": bleu(pred, ref)}
