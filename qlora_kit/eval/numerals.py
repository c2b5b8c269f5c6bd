"""Chinese numerals to integers: 四十六, 一百零八, 两万三, 壹仟壹佰陆拾伍 (statute articles, quantities)."""

from __future__ import annotations

import re

from .generic import nfkc

CN_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
             "八": 8, "九": 9, "壹": 1, "贰": 2, "貳": 2, "叁": 3, "參": 3, "肆": 4, "伍": 5, "陆": 6,
             "陸": 6, "柒": 7, "捌": 8, "玖": 9}
_CN_UNIT = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
CN_CHARS = "".join(CN_DIGIT) + "".join(_CN_UNIT) + "万萬亿億"


def _cn_section(s: str) -> int | None:
    """A numeral below 10000 (no 万/亿); '' -> 0. None when malformed."""
    total, digit, last, zero = 0, None, 10 ** 4, False
    for ch in s:
        if ch in CN_DIGIT:
            if digit is not None:
                return None  # two digits in a row ("一二十")
            d = CN_DIGIT[ch]
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
    if len(s) == 1 and s in CN_DIGIT and CN_DIGIT[s]:
        return CN_DIGIT[s] * scale
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
    t = re.sub(r"\s+", "", nfkc(s)).replace("萬", "万").replace("億", "亿")
    if not t:
        return None
    if re.fullmatch(r"[0-9]+", t):
        return int(t)
    if any(c not in CN_CHARS for c in t):
        return None
    if len(t) > 1 and all(c in CN_DIGIT and c != "两" for c in t):
        return int("".join(str(CN_DIGIT[c]) for c in t))  # 二〇二三, 一一六五
    if "亿" in t:
        head, _, tail = t.rpartition("亿")
        h = _cn_wan(head) if "亿" not in head else None
        if not h:
            return None
        rest = _cn_tail(tail, 10 ** 7, _cn_wan)
        return None if rest is None else h * 10 ** 8 + rest
    return _cn_wan(t)
