"""Numbers with units in Chinese and English text ("0.5 MΩ", "六个月", "百分之二十", "5万元"),
read by the key-term and the contradiction checks."""

from __future__ import annotations

import re

from .numerals import CN_CHARS, CN_DIGIT, cn_to_int

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
_CN_DEC = rf"[{CN_CHARS}]+(?:点[{''.join(CN_DIGIT)}]+)?"
_NUMV = rf"(?:{_ARABIC}|{_CN_DEC})"
_QTY_RE = re.compile(
    rf"(?<![A-Za-z0-9.第{CN_CHARS}])(?P<a>{_NUMV})(?:\s*(?:-|~|～|–|—|至|到)\s*(?P<b>{_NUMV}))?\s*(?P<u>{_UNITS_ALT})(?![A-Za-z])"
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
        digits = "".join(str(CN_DIGIT.get(c, "")) for c in frac)
        if len(digits) != len(frac) or not digits:
            return None
        return float(f"{w}.{digits}")
    return float(w)


def quantities(text: str) -> list[dict]:
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
