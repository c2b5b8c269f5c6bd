"""Metrics for `qlora-kit eval`: base model vs fine-tuned model on held-out Q/A pairs.

Chinese text is first-class: every text metric works on characters, never on whitespace words.

Generic (every task)
    exact_match  1.0/0.0 after normalize(): NFKC, strip, collapse whitespace, drop trailing
                 sentence punctuation (. 。 ! ? , ; : 、 … ~).
    rouge_l      character-level ROUGE-L F1 (LCS, beta = 1) after NFKC and removing whitespace.
    bleu         character-level sentence BLEU (default 4-gram, uniform weights) with the usual
                 brevity penalty. Unigram precision is unsmoothed (no shared character -> 0.0);
                 for n > 1 the precision is (matches + 1) / (candidate n-grams + 1), i.e. the
                 add-one smoothing of Lin & Och (2004), "ORANGE", as used for BLEU-S+1.

Domain (score(task, ...))
    legal        citation_f1, citation_exact       statute citations (citations())
    finance      json_valid, field_accuracy        JSON answers (json_scores())
    medical      term_recall, contradiction        key terms and a mechanical contradiction check
    industrial   term_recall, contradiction

aggregate() averages a list of score() rows per key, ignoring None.

Standard library only.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter

__all__ = [
    "normalize", "exact_match", "rouge_l", "bleu", "cn_to_int", "citations", "citation_scores",
    "json_scores", "key_terms", "term_recall", "contradicts", "score", "aggregate", "TASKS",
]

TASKS = ("generic", "legal", "finance", "medical", "industrial")


def _nfkc(s: str) -> str:
    return unicodedata.normalize("NFKC", s or "")


# --- generic text metrics -------------------------------------------------------------------------

_TRAILING_PUNCT = ".。!?,;:、…~～·"


def normalize(s: str) -> str:
    """NFKC, strip, collapse runs of whitespace to one space, drop trailing sentence punctuation.

    Full-width ！？，；： become ASCII under NFKC; 。 and 、 are dropped as they are. Closing
    brackets and quotes are kept (they can be part of the answer, e.g. "第一条（二）").
    """
    s = re.sub(r"\s+", " ", _nfkc(s)).strip()
    while s and (s[-1] in _TRAILING_PUNCT or s[-1].isspace()):
        s = s[:-1]
    return s


def exact_match(pred: str, ref: str) -> float:
    """1.0 when normalize(pred) == normalize(ref), else 0.0 (two empty strings match)."""
    return 1.0 if normalize(pred) == normalize(ref) else 0.0


def _chars(s: str) -> str:
    """NFKC, all whitespace removed: the unit of the character-level metrics."""
    return "".join(c for c in _nfkc(s) if not c.isspace())


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


# --- Chinese numerals -----------------------------------------------------------------------------

_CN_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
             "八": 8, "九": 9, "壹": 1, "贰": 2, "貳": 2, "叁": 3, "參": 3, "肆": 4, "伍": 5, "陆": 6,
             "陸": 6, "柒": 7, "捌": 8, "玖": 9}
_CN_UNIT = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_CN_CHARS = "".join(_CN_DIGIT) + "".join(_CN_UNIT) + "万萬亿億"
_CN_NUM = f"[{_CN_CHARS}]+"


def _cn_section(s: str) -> int | None:
    """A numeral below 10000 (no 万/亿); '' -> 0. None when malformed."""
    total, digit, last, zero = 0, None, 10 ** 4, False
    for ch in s:
        if ch in _CN_DIGIT:
            if digit is not None:
                return None  # two digits in a row ("一二十")
            d = _CN_DIGIT[ch]
            if d == 0:
                zero = True
                continue
            digit = d
        elif ch in _CN_UNIT:
            u = _CN_UNIT[ch]
            if u >= last:
                return None  # units must decrease ("十十", "十百")
            if digit is None:
                if u != 10:
                    return None  # only 十 may stand for 一十 ("百" alone is not a number)
                digit = 1
            total += digit * u
            last, digit, zero = u, None, False
        else:
            return None
    if digit is not None:
        if zero or last in (10 ** 4, 10):
            total += digit  # 八, 二十三, 一百零八
        else:
            total += digit * last // 10  # colloquial 一百五 = 150, 三千二 = 3200
    elif zero and total:
        return None  # trailing 零 ("一百零")
    return total


def _cn_tail(s: str, scale: int, parse) -> int | None:
    """The part after 万/亿: a lone digit is the colloquial next unit (两万三 = 23000)."""
    if len(s) == 1 and s in _CN_DIGIT and _CN_DIGIT[s]:
        return _CN_DIGIT[s] * scale
    return parse(s)


def _cn_wan(s: str) -> int | None:
    if "万" not in s:
        return _cn_section(s)
    head, _, tail = s.partition("万")
    h = _cn_section(head)
    if not h or "万" in tail:
        return None
    t = _cn_tail(tail, 1000, _cn_section)
    return None if t is None else h * 10 ** 4 + t


def cn_to_int(s: str) -> int | None:
    """Chinese numerals (or Arabic digits) to int; None when `s` is not a bare numeral.

    四十六 -> 46, 十九 -> 19, 一百零八 -> 108, 两百 -> 200, 一千一百六十五 -> 1165, 一万 -> 10000,
    二〇二三 -> 2023 (digit-by-digit form), 壹仟壹佰陆拾伍 -> 1165 (financial form),
    一百五 -> 150 (colloquial), "46" / "４６" -> 46. 第十条, 十点五, 3万, "" -> None.
    """
    if not isinstance(s, str):
        return None
    t = re.sub(r"\s+", "", _nfkc(s)).replace("萬", "万").replace("億", "亿")
    if not t:
        return None
    if re.fullmatch(r"[0-9]+", t):
        return int(t)
    if any(c not in _CN_CHARS for c in t):
        return None
    if len(t) > 1 and all(c in _CN_DIGIT and c != "两" for c in t):
        return int("".join(str(_CN_DIGIT[c]) for c in t))  # 二〇二三, 一一六五
    if "亿" in t:
        head, _, tail = t.rpartition("亿")
        h = _cn_wan(head) if "亿" not in head else None
        if not h:
            return None
        rest = _cn_tail(tail, 10 ** 7, _cn_wan)
        return None if rest is None else h * 10 ** 8 + rest
    return _cn_wan(t)


# --- legal: statute citations ---------------------------------------------------------------------

_COMMON_LAWS = ("劳动争议调解仲裁法", "消费者权益保护法", "道路交通安全法", "民事诉讼法", "劳动合同法",
                "食品安全法", "劳动法", "民法典", "公司法", "刑法")
_NUM = rf"(?:[0-9]+|[{_CN_CHARS}]+)"
_LAW_RE = re.compile(
    r"《\s*([^《》\n]{1,60}?)\s*》"
    r"|((?:中华人民共和国)?(?:" + "|".join(_COMMON_LAWS) + r"))(?=\s*(?:的)?\s*第)"
)
_GAP_RE = re.compile(r"\s*(?:[(（][^()（）\n]{0,20}[)）])?\s*(?:的|之)?\s*")
_FIRST_RE = re.compile(rf"第\s*({_NUM}(?:\s*[、,，]\s*{_NUM})*)\s*条")
_NEXT_RE = re.compile(rf"\s*(?:[、,，和及与或]|以及|或者)\s*第?\s*({_NUM}(?:\s*[、,，]\s*{_NUM})*)\s*条")
_RANGE_RE = re.compile(rf"\s*(?:至|到|-|~|～|—|－)\s*第?\s*({_NUM})\s*条")
_SUB_RE = re.compile(rf"(?:\s*(?:[、,，和及与或]|以及|或者)?\s*第\s*{_NUM}\s*[款项目]|\s*[(（][{_CN_CHARS}0-9]+[)）]\s*项?)+")
_MAX_RANGE = 50


def _law_name(name: str) -> str:
    """《中华人民共和国公司法（2018修正）》 -> 公司法."""
    n = re.sub(r"\s+", "", _nfkc(name)).strip("《》<>")
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
    t = _nfkc(text)
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


# --- finance: JSON answers ------------------------------------------------------------------------


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
        t = _nfkc(v).strip()
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
        return _nfkc(ref).strip() == _nfkc(pred).strip()
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


# --- medical / industrial: key terms --------------------------------------------------------------

# unit as written -> canonical unit (and a factor for the value)
_UNIT_ALIASES: dict[str, tuple[str, float]] = {
    "mL": ("mL", 1), "ml": ("mL", 1), "毫升": ("mL", 1), "L": ("L", 1), "升": ("L", 1),
    "mg": ("mg", 1), "毫克": ("mg", 1), "g": ("g", 1), "克": ("g", 1), "kg": ("kg", 1), "千克": ("kg", 1),
    "公斤": ("kg", 1), "μg": ("μg", 1), "微克": ("μg", 1),
    "mm": ("mm", 1), "毫米": ("mm", 1), "cm": ("cm", 1), "厘米": ("cm", 1), "m": ("m", 1), "米": ("m", 1),
    "km": ("km", 1), "公里": ("km", 1), "μm": ("μm", 1),
    "°C": ("°C", 1), "摄氏度": ("°C", 1),
    "MΩ": ("MΩ", 1), "兆欧": ("MΩ", 1), "kΩ": ("kΩ", 1), "Ω": ("Ω", 1), "欧": ("Ω", 1), "GΩ": ("GΩ", 1),
    "V": ("V", 1), "伏": ("V", 1), "kV": ("kV", 1), "千伏": ("kV", 1), "mV": ("mV", 1),
    "A": ("A", 1), "安": ("A", 1), "mA": ("mA", 1), "kA": ("kA", 1),
    "W": ("W", 1), "瓦": ("W", 1), "kW": ("kW", 1), "千瓦": ("kW", 1), "MW": ("MW", 1), "kWh": ("kWh", 1),
    "kVA": ("kVA", 1), "Hz": ("Hz", 1), "kHz": ("kHz", 1), "MHz": ("MHz", 1),
    "MPa": ("MPa", 1), "kPa": ("kPa", 1), "Pa": ("Pa", 1), "bar": ("bar", 1), "mmHg": ("mmHg", 1),
    "rpm": ("r/min", 1), "r/min": ("r/min", 1), "mm/s": ("mm/s", 1), "m/s": ("m/s", 1), "km/h": ("km/h", 1),
    "dB": ("dB", 1), "N·m": ("N·m", 1), "Nm": ("N·m", 1), "N": ("N", 1),
    "mmol/L": ("mmol/L", 1), "μmol/L": ("μmol/L", 1), "mg/dL": ("mg/dL", 1), "mg/L": ("mg/L", 1),
    "g/L": ("g/L", 1), "U/L": ("U/L", 1), "IU/L": ("IU/L", 1), "mg/kg": ("mg/kg", 1), "IU": ("IU", 1),
    "%": ("%", 1), "‰": ("‰", 1), "ppm": ("ppm", 1),
    "h": ("小时", 1), "小时": ("小时", 1), "min": ("分钟", 1), "分钟": ("分钟", 1), "s": ("秒", 1),
    "秒": ("秒", 1), "个月": ("个月", 1), "天": ("天", 1), "日": ("日", 1), "周": ("周", 1),
    "年": ("年", 1), "岁": ("岁", 1), "周岁": ("岁", 1), "个工作日": ("工作日", 1), "工作日": ("工作日", 1),
    "次": ("次", 1), "片": ("片", 1), "粒": ("粒", 1), "倍": ("倍", 1),
    "元": ("元", 1), "万元": ("元", 1e4), "亿元": ("元", 1e8),
}
_UNITS_ALT = "|".join(re.escape(u) for u in sorted(_UNIT_ALIASES, key=len, reverse=True))
_ARABIC = r"\d+(?:,\d{3})*(?:\.\d+)?"
_CN_DEC = rf"[{_CN_CHARS}]+(?:点[{''.join(_CN_DIGIT)}]+)?"
_NUMV = rf"(?:{_ARABIC}|{_CN_DEC})"
_QTY_RE = re.compile(
    rf"(?<![A-Za-z0-9.第{_CN_CHARS}])(?P<a>{_NUMV})(?:\s*(?:-|~|～|–|—|至|到)\s*(?P<b>{_NUMV}))?\s*(?P<u>{_UNITS_ALT})(?![A-Za-z])"
    rf"|百分之(?P<pa>{_NUMV})(?:\s*(?:-|~|～|–|—|至|到)\s*(?:百分之)?(?P<pb>{_NUMV}))?"
)
# a CJK unit that is really the start of a word: 一年级, 天然, 日期, 周期, 元素, 次要 ...
_UNIT_WORD_AFTER = {"年": "度级龄纪代轻", "天": "然气空", "日": "期常本", "周": "期围边末到",
                    "元": "素件旦", "次": "要序", "片": "面刻", "倍": "感", "米": "饭粉", "安": "全排装"}
_DATE_YEAR = (1000, 2999)


def _num_value(s: str) -> float | None:
    s = s.replace(",", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return float(s)
    whole, dot, frac = s.partition("点")
    w = cn_to_int(whole)
    if w is None:
        return None
    if dot:
        digits = "".join(str(_CN_DIGIT.get(c, "")) for c in frac)
        if len(digits) != len(frac) or not digits:
            return None
        return float(f"{w}.{digits}")
    return float(w)


def _quantities(text: str) -> list[dict]:
    """Numbers with units in (NFKC) text: [{"text", "unit", "values", "start", "end"}].

    A range ("3.9-6.1 mmol/L") is one quantity with two values. 万元/亿元 become 元. A 4-digit
    number of 年 is a date (unit "年(日期)"), kept apart from durations. Ordinals (第三天) are not
    quantities.
    """
    out = []
    for m in _QTY_RE.finditer(text):
        if m.group("pa") is not None:
            raw, unit, factor = [m.group("pa"), m.group("pb")], "%", 1.0
        else:
            u = m.group("u")
            nxt = text[m.end():m.end() + 1]
            if nxt and nxt in _UNIT_WORD_AFTER.get(u, ""):
                continue
            unit, factor = _UNIT_ALIASES[u]
            raw = [m.group("a"), m.group("b")]
        vals = []
        for r in raw:
            if r is None:
                continue
            v = _num_value(r)
            if v is None:
                break
            vals.append(v * factor)
        else:
            if unit == "年" and all(v.is_integer() and _DATE_YEAR[0] <= v <= _DATE_YEAR[1] for v in vals) \
                    and re.fullmatch(r"\d{4}", (m.group("a") or "")):
                unit = "年(日期)"
            out.append({"text": m.group(0).strip(), "unit": unit, "values": tuple(vals),
                        "start": m.start(), "end": m.end()})
    return out


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
    t = re.sub(r"\s+", "", _nfkc(s)).casefold()
    return re.sub(r"(?<=\d)[~～–—至到](?=\d)", "-", t)


def _ref_terms(ref: str, glossary) -> list[tuple[str, str, object]]:
    """[(display, kind, key)] in order of appearance in ref, deduplicated by key."""
    t = _nfkc(ref)
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
    for q in _quantities(t):
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
    pt = _nfkc(pred)
    npred = _norm_term(pt)
    pq = [(q["unit"], q["values"]) for q in _quantities(pt)]
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


# --- contradiction check --------------------------------------------------------------------------

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
            qs = _quantities(sent)
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
    p = re.sub(r"\s+", "", _nfkc(pred))
    r = re.sub(r"\s+", "", _nfkc(ref))
    if not p or not r:
        return False
    if _polarity_conflict(r, p):
        return True
    return _number_conflict(_nfkc(ref), _nfkc(pred))


# --- per-task scoring and aggregation -------------------------------------------------------------


def score(task: str, pred: str, ref: str, glossary: list[str] = ()) -> dict:
    """Flat dict of floats (or None) for one answer.

    Always exact_match, rouge_l, bleu; legal + citation_f1, citation_exact (None when ref cites
    nothing); finance + json_valid, field_accuracy; medical/industrial + term_recall,
    contradiction (1.0/0.0). ValueError for an unknown task.
    """
    t = (task or "").strip().lower()
    if t not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; expected one of {', '.join(TASKS)}")
    pred, ref = pred or "", ref or ""
    out = {"exact_match": exact_match(pred, ref), "rouge_l": rouge_l(pred, ref), "bleu": bleu(pred, ref)}
    if t == "legal":
        c = citation_scores(pred, ref)
        out["citation_f1"] = c["f1"]
        out["citation_exact"] = c["exact"]
    elif t == "finance":
        j = json_scores(pred, ref)
        out["json_valid"] = float(j["valid"])
        out["field_accuracy"] = j["field_accuracy"]
    elif t in ("medical", "industrial"):
        out["term_recall"] = term_recall(pred, ref, glossary)
        out["contradiction"] = 1.0 if contradicts(pred, ref) else 0.0
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
