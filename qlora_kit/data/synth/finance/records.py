"""Sampling one structured record: clause type, principal rounded like real contracts, currency,
rate, penalty wording, maturity, term, collateral and guarantor; a field a clause of that type would
not state is left None."""

from __future__ import annotations

import calendar
import datetime as _dt
import random
from decimal import Decimal

from ..chinese import to_chinese_amount
from .vocabulary import (
    CURRENCIES,
    _BUYERS,
    _CARS,
    _CITIES,
    _CORES,
    _CUR_CN,
    _EQUIPMENT,
    _GIVEN,
    _INDUSTRIES,
    _LOCATIONS,
    _PROPERTY_KINDS,
    _ROADS,
    _SUFFIXES,
    _SURNAMES,
    _V,
)


_TYPE_WEIGHTS = (("loan", 32), ("guarantee", 12), ("lease", 12), ("deposit", 10), ("bond", 10),
                 ("factoring", 11), ("credit_line", 13))
# Probability that each field is stated, per clause type (principal, rate, penalty, maturity, term,
# collateral, guarantor). Currency goes with the principal.
_PRESENCE = {
    "loan": (0.93, 0.88, 0.55, 0.6, 0.75, 0.55, 0.5),
    "guarantee": (0.95, 0.0, 0.0, 0.5, 0.0, None, None),
    "lease": (0.9, 0.8, 0.55, 0.45, 0.9, 0.0, 0.4),
    "deposit": (1.0, 0.92, 0.0, 0.7, 0.85, 0.0, 0.0),
    "bond": (1.0, 0.92, 0.0, 0.7, 0.85, 0.2, 0.45),
    "factoring": (0.95, 0.7, 0.45, 0.5, 0.6, 0.7, 0.4),
    "credit_line": (1.0, 0.45, 0.35, 0.6, 0.85, 0.5, 0.5),
}
_CURRENCY_WEIGHTS = {
    "loan": (80, 8, 6, 6), "deposit": (80, 15, 0, 5), "bond": (85, 15, 0, 0),
    "guarantee": (88, 6, 3, 3), "lease": (92, 4, 2, 2), "factoring": (82, 6, 4, 8), "credit_line": (85, 8, 3, 4),
}
# Principal ranges in 万 of the currency (log-uniform), per type.
_RANGES_WAN = {
    "loan": ((10, 500), (300, 100000)), "guarantee": ((50, 30000),), "lease": ((100, 30000),),
    "deposit": ((1, 5000),), "bond": ((10000, 500000),), "factoring": ((100, 20000),),
    "credit_line": ((1000, 500000),),
}
_TERMS = {
    "loan": (3, 6, 6, 9, 12, 12, 12, 18, 24, 24, 30, 36, 36, 48, 60, 84, 120, 240, 360),
    "guarantee": (12,), "lease": (12, 24, 36, 36, 48, 60, 60, 72, 96, 120),
    "deposit": (3, 6, 12, 12, 24, 36, 60), "bond": (12, 24, 36, 36, 60, 60, 84, 120, 180),
    "factoring": (3, 6, 6, 9, 12), "credit_line": (12, 12, 18, 24, 36),
}
_RATE_RANGES = {  # annual percent
    "loan": (2.8, 8.0), "lease": (4.5, 8.0), "deposit": (0.9, 3.0), "bond": (1.8, 4.5),
    "factoring": (4.0, 9.0), "credit_line": (3.0, 6.5), "guarantee": (3.0, 6.0),
}
_LPR = {"一年期": (Decimal("3.45"), Decimal("3.35"), Decimal("3.10"), Decimal("3.00")),
        "5年期以上": (Decimal("4.20"), Decimal("3.95"), Decimal("3.60"), Decimal("3.50"))}


def _wchoice(rng: random.Random, items):
    """Weighted choice from ((value, weight), ...)."""
    total = sum(w for _, w in items)
    x = rng.random() * total
    for value, w in items:
        x -= w
        if x < 0:
            return value
    return items[-1][0]


def _round_sig(x: float, sig: int) -> int:
    if x < 1:
        return 1
    digits = len(str(int(x)))
    q = 10 ** max(digits - sig, 0)
    return max(1, int(round(x / q)) * q)


def _sample_principal(rng: random.Random, t: str, cur: str) -> int:
    lo, hi = rng.choice(_RANGES_WAN[t])
    scale = {"CNY": 1.0, "USD": 0.15, "EUR": 0.15, "HKD": 1.0}[cur]
    lo, hi = max(1, lo * scale), max(2, hi * scale)
    x = lo * (hi / lo) ** rng.random()
    sig = _wchoice(rng, ((1, 3), (2, 5), (3, 2)))
    return _round_sig(x, sig) * 10000


def _company(rng: random.Random) -> str:
    city = rng.choice(_CITIES)
    city += "市" if rng.random() < 0.4 else ""
    return city + rng.choice(_CORES) + rng.choice(_INDUSTRIES) + rng.choice(_SUFFIXES)


def _person(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + rng.choice(_GIVEN)


def _add_months(d: _dt.date, months: int) -> _dt.date:
    y, m = divmod(d.month - 1 + months, 12)
    y += d.year
    m += 1
    return _dt.date(y, m, min(d.day, calendar.monthrange(y, m)[1]))


def _random_maturity(rng: random.Random) -> _dt.date:
    year = _wchoice(rng, tuple((y, 6 if y <= 2027 else 3 if y <= 2030 else 1) for y in range(2024, 2036)))
    month = rng.randint(1, 12)
    last = calendar.monthrange(year, month)[1]
    day = last if rng.random() < 0.35 else rng.randint(1, last)
    return _dt.date(year, month, day)


def _fmt_pct(x: Decimal | float, keep2: bool) -> str:
    s = f"{Decimal(str(x)):.2f}"
    return s if keep2 else (s.rstrip("0").rstrip(".") or "0")


def _sample_record(rng: random.Random) -> dict:
    t = _wchoice(rng, _TYPE_WEIGHTS)
    p_amt, p_rate, p_pen, p_mat, p_term, p_col, p_gua = _PRESENCE[t]
    rec: dict = {"t": t}

    # principal / currency
    if rng.random() < p_amt:
        cur = _wchoice(rng, tuple(zip(CURRENCIES, _CURRENCY_WEIGHTS[t])))
        rec["principal"], rec["currency"] = _sample_principal(rng, t, cur), cur
    else:
        rec["principal"] = rec["currency"] = None

    # term and maturity (kept consistent when both are stated)
    term = rng.choice(_TERMS[t]) if rng.random() < p_term else None
    if term is not None and t == "loan" and rng.random() < 0.12:
        term = rng.randint(2, 40)  # odd terms: 11 个月, 27 个月
    rec["term_months"] = term
    rec["start"] = None
    maturity = None
    if rng.random() < p_mat:
        if term is not None:
            start = _dt.date(rng.randint(2024, 2026), rng.randint(1, 12), rng.randint(1, 28))
            maturity = _add_months(start, term)
            if rng.random() < 0.4:
                maturity -= _dt.timedelta(days=1)  # 2024年3月1日起至2027年2月28日止
            if maturity.year > 2035:
                maturity = None
            else:
                rec["start"] = start
        else:
            maturity = _random_maturity(rng)
    rec["maturity"] = maturity

    # rate
    rec["rate"], rec["rate_kind"], rec["rate_info"] = None, None, {}
    if t != "guarantee" and rng.random() < p_rate:
        _sample_rate(rng, rec)
    elif t == "credit_line" and rng.random() < 0.3:
        rec["rate_kind"] = "agreed"  # 单笔业务利率由双方另行约定 -> null
    elif t == "loan" and rec["currency"] not in (None, "CNY") and rng.random() < 0.4:
        rec["rate_kind"] = "floating"  # SOFR + 2.10% -> null

    # penalty
    rec["penalty"] = None
    if _V[t]["pen_base"] and rng.random() < p_pen:
        rec["penalty"] = _sample_penalty(rng, t)

    # collateral / guarantor
    rec["collateral"] = rec["guarantor"] = None
    if t == "guarantee":
        mode = _wchoice(rng, (("g", 6), ("c", 4)))
        if mode == "g":
            rec["guarantor"] = _sample_guarantor(rng, t)
        else:
            rec["collateral"] = _sample_collateral(rng, t, rec)
    else:
        if t == "factoring":
            if rng.random() < p_col:
                rec["collateral"] = {"value": "应收账款转让", "kind": "transfer", "buyer": rng.choice(_BUYERS)}
        elif rng.random() < p_col:
            rec["collateral"] = _sample_collateral(rng, t, rec)
        if rng.random() < p_gua:
            rec["guarantor"] = _sample_guarantor(rng, t)

    # something to extract besides the type
    stated = [rec["principal"], rec["rate"], rec["penalty"], rec["maturity"], rec["term_months"],
              rec["collateral"], rec["guarantor"]]
    if sum(v is not None for v in stated) < 2:
        return _sample_record(rng)
    return rec


def _sample_rate(rng: random.Random, rec: dict) -> None:
    t, cur = rec["t"], rec["currency"]
    lo, hi = _RATE_RANGES[t]
    if cur in ("USD", "HKD") and t in ("deposit", "bond"):
        lo, hi = lo + 2.0, hi + 2.5
    kinds = [("annual", 10)]
    if t == "loan" and cur in (None, "CNY") and (rec["principal"] or 0) <= 5_000_000:
        kinds.append(("monthly", 5))  # 月息: private and small-business lending
    if cur in (None, "CNY") and t in ("loan", "credit_line", "lease"):
        kinds.append(("lpr", 3))
    kind = _wchoice(rng, tuple(kinds))
    info: dict = {}
    if kind == "monthly":
        monthly = Decimal(rng.choice(("0.3", "0.35", "0.4", "0.45", "0.5", "0.5", "0.55", "0.6", "0.65", "0.7", "0.75",
                                      "0.8", "0.9", "1", "1.2", "0.375", "0.425", "0.525")))
        annual = (monthly * 12).quantize(Decimal("0.01"))
        info["monthly"] = monthly
    elif kind == "lpr":
        tenor = rng.choice(tuple(_LPR))
        lpr = rng.choice(_LPR[tenor])
        bp = rng.choice((-30, -20, -10, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 100, 120, 150))
        annual = lpr + Decimal(bp) / 100
        info.update(tenor=tenor, lpr=lpr, bp=bp)
    else:
        annual = Decimal(str(round(rng.uniform(lo, hi), 2)))
        if rng.random() < 0.45:
            annual = (annual * 20).to_integral_value() / 20  # 4.35, 4.80, 5.25 ...
        annual = annual.quantize(Decimal("0.01"))
    rec["rate"], rec["rate_kind"], rec["rate_info"] = float(annual), kind, info


def _sample_penalty(rng: random.Random, t: str) -> dict:
    """-> {"value": verbatim rate expression, "kind": "abs"|"rel"|"rel_base"|"rel_cn"}"""
    if rng.random() < 0.6:
        frac = _wchoice(rng, (("万分之五", 6), ("万分之三", 3), ("万分之四", 2), ("万分之六", 2), ("万分之二点五", 1),
                              ("万分之三点五", 1), ("万分之一点五", 1), ("千分之一", 2)))
        prefix = _wchoice(rng, (("日", 4), ("每日", 3), ("日利率", 1)))
        return {"value": prefix + frac, "kind": "abs"}
    base = rng.choice(_V[t]["pen_base"])
    form = _wchoice(rng, (("up", 4), ("add", 2), ("basis", 2), ("cn", 1), ("times", 1)))
    pct = rng.choice((20, 30, 40, 50, 50, 100))
    if form == "up":
        return {"value": f"{base}上浮{pct}%", "kind": "rel"}
    if form == "add":
        return {"value": f"{base}加收{pct}%", "kind": "rel"}
    if form == "cn":
        return {"value": f"{base}加收百分之{to_chinese_amount(pct)}", "kind": "rel"}
    if form == "times":
        return {"value": f"{base}的{rng.choice(('1.3', '1.5', '1.5', '2'))}倍", "kind": "rel"}
    base2 = rng.choice(("约定利率", "合同利率", base))
    return {"value": f"在{base2}基础上加收{pct}%", "kind": "rel_basis"}


def _sample_collateral(rng: random.Random, t: str, rec: dict) -> dict:
    kinds = [("property", 5), ("receivable", 2), ("equity", 3), ("equipment", 2), ("cd", 2), ("land", 2)]
    if t == "loan":
        small = rec["currency"] in (None, "CNY") and (rec["principal"] or 0) <= 2_000_000
        kinds.append(("car", 3 if small else 0))
    if t == "bond":
        kinds = [("property", 3), ("land", 2), ("equity", 2)]
    if t == "guarantee":
        kinds = [k for k in kinds if k[0] != "receivable"] + [("receivable", 1)]
    kind = _wchoice(rng, tuple(kinds))
    city, district = rng.choice(_LOCATIONS)
    loc = city + district
    if kind == "property":
        pk = rng.choice(_PROPERTY_KINDS) if t != "bond" else rng.choice(("投资性房地产", "写字楼", "商业物业"))
        if rng.random() < 0.5:
            addr = f"{rng.choice(_ROADS)}{rng.randint(1, 999)}号"
            obj = f"名下位于{loc}{addr}的{pk}" if rng.random() < 0.6 else f"所有的坐落于{loc}{addr}的{pk}"
        else:
            obj = f"名下位于{loc}的{pk}"
        value = f"{loc}{pk}" if pk != "投资性房地产" or rng.random() < 0.5 else pk
        if value == pk:
            obj = f"持有的部分{pk}"
        return {"value": value, "obj": obj, "verb": "抵押"}
    if kind == "receivable":
        return {"value": "应收账款质押", "obj": f"对{rng.choice(_BUYERS)}的应收账款", "verb": "质押"}
    if kind == "equity":
        pct = rng.choice((10, 20, 30, 35, 49, 51, 60, 70, 100))
        co = "目标公司" if t == "loan" and rng.random() < 0.15 else _company(rng)
        if rng.random() < 0.2 and co != "目标公司":
            shares = rng.choice((200, 300, 500, 800, 1000, 1500))
            return {"value": f"{co}{shares}万股股权质押", "obj": f"持有的{co}{shares}万股股权", "verb": "质押"}
        return {"value": f"{co}{pct}%股权质押", "obj": f"持有的{co}{pct}%股权", "verb": "质押"}
    if kind == "equipment":
        eq = rng.choice(_EQUIPMENT)
        obj = rng.choice((f"名下的{eq}一批", f"所有的{eq}（详见抵押物清单）", f"名下的{eq}"))
        return {"value": eq, "obj": obj, "verb": "抵押"}
    if kind == "cd":
        who = rng.choice(("本行签发的单位", "本行", "本行开立的个人", ""))
        base = rec["principal"]
        if base is None:  # no other amount in the clause: one here would read as the principal
            return {"value": "存单质押", "obj": f"持有的{who}定期存单", "verb": "质押"}
        amount = _round_sig(base / 10000 * rng.uniform(1.03, 1.3), 2) * 10000
        if amount == base:
            amount += 10000 * (1 + base // 100000)
        cur = _CUR_CN[rec["currency"]][0]
        return {"value": "存单质押", "obj": f"持有的{who}{cur}{amount // 10000}万元定期存单", "verb": "质押"}
    if kind == "land":
        if rng.random() < 0.3:
            return {"value": f"{loc}土地使用权及在建工程", "obj": f"位于{loc}的土地使用权及在建工程", "verb": "抵押"}
        if rng.random() < 0.3:
            return {"value": f"{loc}国有建设用地使用权", "obj": f"位于{loc}的国有建设用地使用权", "verb": "抵押"}
        obj = rng.choice((f"位于{loc}的土地使用权", f"名下位于{loc}的工业用地土地使用权"))
        return {"value": f"{loc}土地使用权", "obj": obj, "verb": "抵押"}
    car = rng.choice(_CARS)
    return {"value": car, "obj": f"所有的一辆{car}", "verb": "抵押"}


def _sample_guarantor(rng: random.Random, t: str) -> dict:
    """-> {"value": answer, "text": as written (with a role word), "bare": as written after 保证人}"""
    kinds = (("company", 1),) if t == "bond" else (("company", 5), ("person", 4), ("couple", 1))
    kind = _wchoice(rng, kinds)
    if kind == "company":
        name = _company(rng)
        role = _wchoice(rng, (("", 5), ("母公司", 1), ("控股股东", 1), ("关联方", 1)))
        return {"value": name, "text": role + name, "bare": name, "kind": kind}
    if kind == "person":
        name = _person(rng)
        role = _wchoice(rng, (("", 4), ("实际控制人", 2), ("法定代表人", 1), ("股东", 1), ("自然人", 1)))
        return {"value": name, "text": role + name, "bare": name, "kind": kind}
    a, b = _person(rng), _person(rng)
    while b == a:
        b = _person(rng)
    bare = rng.choice((f"{a}及其配偶{b}", f"{a}、{b}"))
    text = rng.choice((bare, f"实际控制人{a}及其配偶{b}"))
    return {"value": f"{a}、{b}", "text": text, "bare": bare, "kind": kind}
