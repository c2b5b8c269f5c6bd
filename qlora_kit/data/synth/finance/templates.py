"""Sentence templates per clause type (f(clause) -> text, or None when it does not fit the record),
the instruction prefixes, and `_render`: a record -> (clause text, template name)."""

from __future__ import annotations

import random

from ..chinese import to_chinese_amount
from .clauses import _Clause, _ENG_MONTHS, render_amount
from .records import _company, _fmt_pct, _wchoice
from .vocabulary import _PREFIX_GENERIC, _PREFIX_TYPED, _V


def _join(parts: list[str], end: str = "。") -> str:
    return "，".join(parts) + end


def _t_narrative(c: _Clause):
    opener = c.rng.choice(("", "", "本合同项下，", "经双方协商一致，", "双方约定，", "根据本合同约定，"))
    segs = c.segments()
    if len(segs) > 2 and c.rng.random() < 0.4:
        i = c.rng.randrange(1, len(segs) - 1)
        segs[i], segs[i + 1] = segs[i + 1], segs[i]
    return opener + _join(segs)


def _t_shuffled(c: _Clause):
    segs = c.segments()
    c.rng.shuffle(segs)
    if len(segs) >= 4:
        k = c.rng.randrange(2, len(segs) - 1)
        return _join(segs[:k]) + c.rng.choice(("", "此外，", "同时，", "另，")) + _join(segs[k:])
    return _join(segs)


def _t_fields(c: _Clause):
    pairs = c.fields()
    if len(pairs) < 2:
        return None
    colon = c.rng.choice(("：", "："))
    return "；".join(f"{k}{colon}{v}" for k, v in pairs) + "。"


def _t_fields_bracket(c: _Clause):
    pairs = c.fields()
    if len(pairs) < 2:
        return None
    if c.rng.random() < 0.5:
        return "".join(f"【{k}】{v}" for k, v in pairs)
    return " ".join(f"{k}：{v}" for k, v in pairs)


def _t_articles(c: _Clause):
    segs = c.segments()
    if len(segs) < 2:
        return None
    k = c.rng.randint(1, 12)
    sep = c.rng.choice(("", " "))
    return sep.join(f"第{to_chinese_amount(k + i)}条 {s}。" for i, s in enumerate(segs))


def _t_enum(c: _Clause):
    segs = c.segments()
    if len(segs) < 2:
        return None
    intro = c.rng.choice(("", "主要条款如下：") + (("双方约定如下：",) if c.t != "bond" else ()))
    return intro + "；".join(f"（{to_chinese_amount(i + 1)}）{s}" for i, s in enumerate(segs)) + "。"


def _t_numbered(c: _Clause):
    segs = c.segments()
    if len(segs) < 2:
        return None
    style = c.rng.choice(("{i}. ", "{i}、", "({i})"))
    return "；".join(style.format(i=i + 1) + s for i, s in enumerate(segs)) + "。"


def _t_party(c: _Clause):
    if c.t == "guarantee":  # three parties: keep the role words
        return c.rng.choice(("经各方协商一致，约定如下：", "本合同各方约定：")) + _join(c.segments())
    a, b = c.a, c.b
    c.a, c.b = "甲方", "乙方"
    intro = c.rng.choice((f"甲方（{a}）与乙方（{b}）经协商一致，约定如下：", f"甲方（{a}）、乙方（{b}）约定：",
                          f"甲方为{a}，乙方为{b}。"))
    return intro + _join(c.segments())


def _t_heading(c: _Clause):
    heading = c.rng.choice(c.v["heading"])
    return f"{heading}：" + _join(c.segments())


def _t_two_sentences(c: _Clause):
    first = c.segments(order=("amt", "term", "mat", "rate"))
    second = c.segments(order=("pen", "col", "gua", "extra"))
    if not first or not second:
        return None
    return _join(first) + c.rng.choice(("", "此外，", "同时，")) + _join(second)


_GENERIC = (_t_narrative, _t_shuffled, _t_fields, _t_fields_bracket, _t_articles, _t_enum, _t_numbered,
            _t_party, _t_heading, _t_two_sentences)


# loan
def _t_loan_repay_first(c: _Clause):
    if not (c.A and c.M) or (c.use_range and c.T):
        return None
    head = c.rng.choice((f"{c.b}应于{c.M}前一次性归还本金{c.A}", f"{c.b}承诺于借款到期日（{c.M}）一次性偿还本金{c.A}",
                         f"本息偿还：{c.b}应于{c.M}归还全部借款本金{c.A}及相应利息"))
    return _join([head] + c.segments(exclude=("amt", "mat")))


def _t_loan_collateral_first(c: _Clause):
    col = c.rec["collateral"]
    if not (c.A and col):
        return None
    head = f"{c.b}以其{col['obj']}{c.rng.choice(('提供', '作'))}{col['verb']}"
    ask = c.rng.choice((f"向{c.a}申请贷款{c.A}", f"申请流动资金贷款{c.A}", f"担保本合同项下{c.A}的贷款本金及利息"))
    return _join([head, ask] + c.segments(exclude=("amt", "col")))


def _t_loan_penalty_first(c: _Clause):
    pen = c.rec["penalty"]
    if not pen:
        return None
    head = c.rng.choice((f"{c.b}未按本合同约定期限归还借款本金的", f"若{c.b}未能于到期日足额还款",
                         f"如{c.b}逾期还款"))
    p = pen["value"]
    tail = f"按{p}计收罚息" if pen["kind"] != "rel_basis" else f"逾期罚息{p}"
    if pen["kind"] == "abs" and c.rng.random() < 0.4:
        tail = f"自逾期之日起按{p}计收逾期利息，直至本息全部清偿之日止"
    rest = c.segments(exclude=("pen",))
    return f"{head}，{tail}。" + (_join(rest) if rest else "")


def _t_loan_english(c: _Clause):
    r = c.rec
    if r["principal"] is None or r["maturity"] is None or r["currency"] == "CNY" or r["start"] is not None:
        return None
    d = r["maturity"]
    amt = render_amount(c.rng, r["principal"], r["currency"], style="iso")
    head = f"The Borrower shall repay the loan principal of {amt} in full on {d.day} {_ENG_MONTHS[d.month - 1]} {d.year}."
    rest = c.segments(exclude=("amt", "mat", "term"))
    if r["term_months"] is not None:
        rest.insert(0, f"{c.term_lbl}为{c.T}")
    return head + ((" 本条款项下" + _join(rest)) if rest else "")


def _t_loan_private(c: _Clause):
    if not c.A or c.rec["principal"] > 5_000_000:  # 出借人: private lending, small amounts
        return None
    c.a, c.b = "乙方（出借人）", "甲方（借款人）"
    head = f"甲方（借款人）向乙方（出借人）借款{c.A}"
    c.a, c.b = "乙方", "甲方"
    return _join([head] + c.segments(exclude=("amt",)))


# guarantee
def _t_guar_first(c: _Clause):
    g = c.rec["guarantor"]
    if not g:
        return None
    head = c.rng.choice((f"保证人{g['bare']}自愿为{c.b}在主合同项下的全部债务提供连带责任保证",
                         f"{g['text']}（保证人）同意为{c.b}履行主合同项下的还款义务提供不可撤销的连带责任保证"))
    return _join([head] + c.segments(exclude=("gua",)))


def _t_guar_secure(c: _Clause):
    g = c.rec["guarantor"]
    if not (g and c.A):
        return None
    debtor = _company(c.rng) if c.rng.random() < 0.6 else ""
    while debtor and debtor == g["value"]:
        debtor = _company(c.rng)
    head = f"为担保{c.b}{debtor}按期偿还本金{c.A}及利息"
    mid = f"保证人{g['bare']}同意提供{c.rng.choice(('不可撤销的', '', '无条件的'))}连带责任保证"
    return _join([head, mid] + c.segments(exclude=("amt", "gua")))


def _t_guar_collateral(c: _Clause):
    col = c.rec["collateral"]
    if not col:
        return None
    who = "抵押人" if col["verb"] == "抵押" else "出质人"
    amt = f"主合同项下{c.A}的借款" if c.A else "主合同项下的全部债务"
    head = f"{who}以其{col['obj']}，为{c.b}在{amt}提供{col['verb']}担保"
    tail = c.rng.choice(("抵押物已办理抵押登记" if col["verb"] == "抵押" else "质押已办理出质登记",
                         f"{col['verb']}期限至主债务清偿完毕之日止", ""))
    return _join([head] + c.segments(exclude=("amt", "col")) + ([tail] if tail else []))


def _t_guar_contract(c: _Clause):
    if not c.A:
        return None
    head = f"本{c.rng.choice(('保证', '担保', '最高额保证'))}合同所担保的主债权为{c.a}依据主合同向{c.b}发放的贷款本金{c.A}"
    return _join([head] + c.segments(exclude=("amt",)))


# lease
def _t_lease_buy(c: _Clause):
    head = c.rng.choice((f"{c.b}以融资租赁方式租入{c.a}购买的{c.asset}", f"{c.a}根据{c.b}的选择购买{c.asset}并出租给{c.b}"))
    c.drop_asset_flavor()
    return _join([head] + c.segments())


def _t_lease_leaseback(c: _Clause):
    asset = c.asset.split("（")[0]
    c.drop_asset_flavor()
    head = f"本合同采用售后回租方式，{c.b}将其自有的{asset}转让给{c.a}后租回使用"
    return _join([head] + c.segments())


def _t_lease_rent(c: _Clause):
    if not c.T:
        return None
    c.drop_asset_flavor()
    head = f"{c.a}将{c.asset}出租给{c.b}使用，{c.term_lbl}为{c.T}"
    return _join([head] + c.segments(exclude=("term",)))


# deposit
def _t_dep_time(c: _Clause):
    if not c.A:
        return None
    head = c.rng.choice((f"{c.b}于本行存入定期存款{c.A}", f"经{c.b}申请，本行为其开立{c.A}的单位定期存款",
                         f"{c.b}在本行开立定期存款账户，存入本金{c.A}"))
    return _join([head] + c.segments(exclude=("amt",)))


def _t_dep_cd(c: _Clause):
    if not c.A:
        return None
    # A purchase date only with both term and maturity stated: otherwise it would imply a value the
    # answer leaves null (or contradict the maturity).
    d = c.rec["start"]
    when = f"于{c.S}" if d is not None else ""
    head = f"{c.b}{when}在本行办理大额存单业务，认购金额{c.A}"
    return _join([head] + c.segments(exclude=("amt",)))


def _t_dep_agreed(c: _Clause):
    if not c.A or c.rec["rate_kind"] != "annual":
        return None
    head = f"协定存款账户的基本存款额度为{c.A}，超过基本额度部分按协定存款利率年{_fmt_pct(c.rec['rate'], False)}%计息"
    return _join([head] + c.segments(exclude=("amt", "rate")))


# bond
def _t_bond_convertible(c: _Clause):
    if not c.A:
        return None
    head = f"本次可转换公司债券发行总额为{c.A}"
    parts = [head]
    if c.T:
        parts.append(f"存续期限为自发行之日起{c.T}")
    if c.rec["rate_kind"] == "annual":
        parts.append(f"第一年票面利率{_fmt_pct(c.rec['rate'], True)}%")
    return _join(parts + c.segments(exclude=("amt", "term", "rate")))


def _t_bond_dates(c: _Clause):
    if not (c.rec["start"] is not None and c.M and c.T):
        return None
    parts = c.segments(order=("amt",)) + [f"期限{c.T}"] + c.segments(order=("rate",))
    parts += [f"起息日为{c.S}", f"兑付日为{c.M}"] + c.segments(order=("col", "gua", "extra"))
    return _join(parts)


def _t_bond_usd(c: _Clause):
    r = c.rec
    if r["currency"] not in ("USD", "EUR", "HKD"):
        return None
    head = f"本期{'美元' if r['currency'] == 'USD' else '外币'}债券发行金额为{c.A}"
    return _join([head] + c.segments(exclude=("amt",)))


# factoring
def _t_fact_transfer(c: _Clause):
    col = c.rec["collateral"]
    if not col:
        return None
    head = c.col_narrative()
    return _join([head] + c.segments(exclude=("col",)))


def _t_fact_recourse(c: _Clause):
    col = c.rec["collateral"]
    if not col:
        return None
    kind = c.rng.choice(("有追索权", "无追索权"))
    head = f"本合同项下为{kind}保理，{c.a}受让{c.b}对{col['buyer']}的应收账款"
    return _join([head] + c.segments(exclude=("col",)))


def _t_fact_advance(c: _Clause):
    col, n = c.rec["collateral"], c.rec["principal"]
    if not (col and n):
        return None
    pct = c.rng.choice((70, 75, 80, 90))
    total = n * 100 // pct
    if total * pct != n * 100 or total % 10000:
        return None
    total_txt = render_amount(c.rng, total, c.rec["currency"], style="wan")
    head = (f"{c.a}向{c.b}提供有追索权保理服务，受让{c.b}对{col['buyer']}的应收账款总额{total_txt}，"
            f"按应收账款的{pct}%发放保理预付款{c.A}")
    return _join([head] + c.segments(exclude=("amt", "col")))


# credit line
def _t_credit_revolving(c: _Clause):
    if not c.A:
        return None
    head = c.rng.choice((f"{c.a}同意在授信期限内向{c.b}提供最高不超过{c.A}的循环授信额度",
                         f"{c.a}给予{c.b}{c.A}的贸易融资授信额度",
                         f"{c.a}同意给予{c.b}总额为{c.A}的集团综合授信"))
    return _join([head] + c.segments(exclude=("amt",)))


def _t_credit_max(c: _Clause):
    if not c.A:
        return None
    c.a, c.b = "甲方", "乙方"
    head = f"甲方同意向乙方提供最高额不超过{c.A}的综合授信额度"
    return _join([head] + c.segments(exclude=("amt",)))


def _t_credit_usage(c: _Clause):
    if not c.A or not c.T:
        return None
    c.use_range = False
    parts = [f"授信额度：{c.A}", f"额度使用期限：自合同生效之日起{c.T}"]
    if c.rec["rate_kind"] in (None, "agreed"):
        parts.append("额度项下单笔业务利率由双方另行约定")
    else:
        parts.append(f"额度项下融资利率：{c.rate_value().removeprefix('按').removesuffix('计')}")
    parts += [f"{k}：{v}" for k, v in c.fields(exclude=("amt", "term", "rate"))]
    return "；".join(parts) + "。"


# A clause must say what kind of contract it is (the field-list templates can lose it otherwise).
_TYPE_WORDS = {"loan": ("借", "贷", "Borrower"), "guarantee": ("保证", "担保", "抵押", "质押"), "lease": ("租",),
               "deposit": ("存",), "bond": ("债券", "票据"), "factoring": ("保理",), "credit_line": ("授信",)}

TEMPLATES: dict[str, tuple] = {
    "loan": _GENERIC + (_t_loan_repay_first, _t_loan_collateral_first, _t_loan_penalty_first, _t_loan_english,
                        _t_loan_private),
    "guarantee": _GENERIC + (_t_guar_first, _t_guar_secure, _t_guar_collateral, _t_guar_contract),
    "lease": _GENERIC + (_t_lease_buy, _t_lease_leaseback, _t_lease_rent),
    "deposit": _GENERIC + (_t_dep_time, _t_dep_cd, _t_dep_agreed),
    "bond": _GENERIC + (_t_bond_convertible, _t_bond_dates, _t_bond_usd),
    "factoring": _GENERIC + (_t_fact_transfer, _t_fact_recourse, _t_fact_advance),
    "credit_line": _GENERIC + (_t_credit_revolving, _t_credit_max, _t_credit_usage),
}


def _prefix(rng: random.Random, t: str) -> str:
    if rng.random() < 0.55:
        return _wchoice(rng, _PREFIX_GENERIC)
    return rng.choice(_PREFIX_TYPED).format(k=rng.choice(_V[t]["kind"]))


def _render(rng: random.Random, rec: dict) -> tuple[str, str]:
    """-> (clause text, template name)."""
    templates = TEMPLATES[rec["t"]]
    # Type-specific templates are tried a bit more often than their share, so each gets used.
    specific = templates[len(_GENERIC):]
    for _ in range(20):
        f = rng.choice(specific) if rng.random() < 0.35 else rng.choice(templates)
        text = f(_Clause(rng, rec))
        if text and any(w in text for w in _TYPE_WORDS[rec["t"]]):
            return text, f.__name__
    # Nothing named the contract type (a clause of only a penalty and a guarantor): give it a heading.
    heading = next(h for h in _V[rec["t"]]["heading"] if any(w in h for w in _TYPE_WORDS[rec["t"]]))
    return f"{heading}：" + _join(_Clause(rng, rec).segments()), _t_heading.__name__
