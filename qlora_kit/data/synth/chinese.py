"""Chinese numerals for amounts written in running text: 30000000 <-> "三千万" / "叁仟万", and the
Arabic forms with 万/亿 ("500万", "1.2亿", "1,500万"). Not finance-specific: any generator that writes
Chinese amounts uses these."""

from __future__ import annotations

import re
from decimal import Decimal


_DIGITS = "零一二三四五六七八九"
_DIGITS_FORMAL = "零壹贰叁肆伍陆柒捌玖"
_UNITS = ("", "十", "百", "千")
_UNITS_FORMAL = ("", "拾", "佰", "仟")
_CN_DIGIT = {c: i for i, c in enumerate(_DIGITS)} | {c: i for i, c in enumerate(_DIGITS_FORMAL)}
_CN_DIGIT.update({"两": 2, "〇": 0})
_CN_SMALL = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_AMOUNT_MAX = 10 ** 12  # up to 9999亿


def _section(n: int, digits: str, units: tuple[str, ...], leading: bool) -> str:
    """1..9999 -> numerals; `leading`: this is the number's first section (一十 -> 十)."""
    out: list[str] = []
    zero = False
    for pos in (3, 2, 1, 0):
        d = n // 10 ** pos % 10
        if d == 0:
            zero = zero or bool(out)
            continue
        if zero:
            out.append(digits[0])
            zero = False
        if d == 1 and pos == 1 and leading and not out:
            out.append(units[1])  # 十五万, 拾亿 (as in the bundled examples)
        else:
            out.append(digits[d] + units[pos])
    return "".join(out)


def to_chinese_amount(n: int, formal: bool = False) -> str:
    """30000000 -> "三千万" (formal: "叁仟万"); 120000000 -> "一亿二千万"; 105000000 -> "一亿零五百万".

    Integers 0 <= n < 10**12. No currency and no 元: callers add "人民币…元整" themselves.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"to_chinese_amount needs an int, got {type(n).__name__}")
    if not 0 <= n < _AMOUNT_MAX:
        raise ValueError(f"to_chinese_amount supports 0 <= n < {_AMOUNT_MAX}, got {n}")
    digits, units = (_DIGITS_FORMAL, _UNITS_FORMAL) if formal else (_DIGITS, _UNITS)
    if n == 0:
        return digits[0]
    out: list[str] = []
    started = gap = False
    for sec, big in ((n // 10 ** 8, "亿"), (n // 10 ** 4 % 10 ** 4, "万"), (n % 10 ** 4, "")):
        if sec == 0:
            gap = gap or started
            continue
        if started and (gap or sec < 1000):
            out.append(digits[0])
        out.append(_section(sec, digits, units, leading=not started) + big)
        started, gap = True, False
    return "".join(out)


_ARABIC_AMOUNT = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(万|亿)?")


def parse_chinese_amount(s: str) -> int:
    """Inverse of to_chinese_amount, lenient about notation.

    Accepts plain or formal numerals ("三千万", "叁仟万", "一亿零五百万", "两百万", "壹拾万"),
    Arabic figures with 万/亿 ("500万", "1.2亿", "1,500万", "2,500,000"), and an optional
    trailing "元"/"元整"/"整". Raises ValueError for anything else or a non-integral result.
    """
    if not isinstance(s, str):
        raise TypeError(f"parse_chinese_amount needs a str, got {type(s).__name__}")
    t = s.strip()
    for tail in ("元整", "元", "整"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[: -len(tail)]
            break
    if not t:
        raise ValueError(f"not an amount: {s!r}")
    m = _ARABIC_AMOUNT.fullmatch(t)
    if m:
        value = Decimal(m.group(1).replace(",", "") + (m.group(2) or ""))
        value *= {"万": 10 ** 4, "亿": 10 ** 8, None: 1}[m.group(3)]
        if value != value.to_integral_value():
            raise ValueError(f"not a whole amount: {s!r}")
        return int(value)
    total = section = num = 0
    seen_digit = False
    for ch in t:
        if ch in _CN_DIGIT:
            num = _CN_DIGIT[ch]
            seen_digit = True
        elif ch in _CN_SMALL:
            section += (num if num else 1) * _CN_SMALL[ch]
            num = 0
            seen_digit = True
        elif ch == "万":
            if not seen_digit and not total:
                raise ValueError(f"not an amount: {s!r}")
            total += (section + num) * 10 ** 4
            section = num = 0
        elif ch == "亿":
            if not seen_digit:
                raise ValueError(f"not an amount: {s!r}")
            total = (total + section + num) * 10 ** 8
            section = num = 0
        else:
            raise ValueError(f"not an amount: {s!r}")
    return total + section + num


def _cn_small_number(n: int) -> str:
    """Counts in running text: 2 -> 两, 3 -> 三, 10 -> 十, 30 -> 三十."""
    return "两" if n == 2 else to_chinese_amount(n)
