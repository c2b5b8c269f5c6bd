"""A record's fields as written: amounts in several notations, dates, terms; `_Clause` holds the
surface forms of one record, chosen once, and the narrative and field-list segments built from them."""

from __future__ import annotations

import datetime as _dt
import random
from decimal import Decimal

from ..chinese import _cn_small_number, to_chinese_amount
from .records import _fmt_pct, _wchoice
from .vocabulary import _BENCHMARK, _CUR_CN, _CUR_ISO, _LEASE_ASSETS, _V


def _yi_text(n: int) -> str:
    q, r = divmod(n, 10 ** 8)
    frac = f"{r:08d}".rstrip("0")
    return f"{q}.{frac}" if frac else str(q)


def _wan_text(rng: random.Random, n: int) -> str:
    w = n // 10000
    return f"{w:,}" if w >= 1000 and rng.random() < 0.5 else str(w)


def render_amount(rng: random.Random, n: int, cur: str, style: str | None = None) -> str:
    """One written form of an amount: "人民币500万元", "1.2亿元人民币", "人民币叁仟万元整",
    "美元2,500,000元", "4亿美元", "EUR 1,200,000", "欧元壹佰贰拾万元（EUR 1,200,000）"."""
    styles = [("wan", 5), ("cn", 3), ("cnf", 3), ("full", 2), ("iso", 1 if cur != "CNY" else 0),
              ("both", 1)]
    if n >= 10 ** 8 and n % 10 ** 7 == 0:
        styles.append(("yi", 4))
    if style is None:
        style = _wchoice(rng, tuple(styles))
    cn = rng.choice(_CUR_CN[cur])
    iso = rng.choice(_CUR_ISO[cur])
    if style == "iso":
        return f"{iso} {n:,}"
    if style == "both":
        core = to_chinese_amount(n, formal=True)
        small = f"¥{n:,}.00" if cur == "CNY" else f"{iso} {n:,}"
        return rng.choice((f"{cn}{core}元（{small}）", f"{cn}{core}元整（小写：{small}）"))
    if style in ("cn", "cnf"):
        core = to_chinese_amount(n, formal=style == "cnf")
        if cur != "CNY" and rng.random() < 0.3:
            return f"{core}{'港元' if cur == 'HKD' else cn}"
        return f"{cn}{core}元" + ("整" if rng.random() < 0.4 else "")
    core = {"wan": lambda: _wan_text(rng, n) + "万", "yi": lambda: _yi_text(n) + "亿",
            "full": lambda: f"{n:,}"}[style]()
    suffix = rng.random() < (0.3 if cur == "CNY" else 0.5)
    if suffix:
        return core + ("元人民币" if cur == "CNY" else "港元" if cur == "HKD" else cn)
    return f"{cn}{core}元"


def _fmt_date(rng: random.Random, d: _dt.date, iso: bool | None = None) -> str:
    if iso is None:
        iso = rng.random() < 0.3
    return d.isoformat() if iso else f"{d.year}年{d.month}月{d.day}日"


def _fmt_term(rng: random.Random, months: int, t: str) -> str:
    if months % 12 == 0 and rng.random() < (0.9 if t == "bond" else 0.45):
        y = months // 12
        return f"{y}年" if rng.random() < 0.4 else f"{_cn_small_number(y)}年"
    return f"{months}个月"


_ENG_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December")


class _Clause:
    """Surface forms of one record, chosen once, and the narrative/field segments built from them."""

    def __init__(self, rng: random.Random, rec: dict):
        self.rng, self.rec, self.t = rng, rec, rec["t"]
        self.v = _V[self.t]
        self.a = rng.choice(self.v["a"])
        if self.a == "出借人" and (rec["principal"] or 0) > 5_000_000:
            self.a = "贷款人"  # 出借人 is private lending
        self.b = rng.choice(self.v["b"])
        self.A = render_amount(rng, rec["principal"], rec["currency"]) if rec["principal"] is not None else None
        self.M = _fmt_date(rng, rec["maturity"]) if rec["maturity"] is not None else None
        iso = self.M is not None and "-" in self.M
        self.S = _fmt_date(rng, rec["start"], iso) if rec["start"] is not None else None
        self.T = _fmt_term(rng, rec["term_months"], self.t) if rec["term_months"] is not None else None
        self.use_range = self.S is not None and rng.random() < 0.6
        self.asset = rng.choice(_LEASE_ASSETS)
        self.term_lbl = rng.choice(self.v["term_lbl"])
        self.rate_lbl = rng.choice(self.v["rate_lbl"])
        self.flavor = None
        if self.v["flavor"] and rng.random() < 0.35:
            fl = rng.choice(self.v["flavor"])
            self.flavor = fl.format(asset=self.asset, k=max(1, (rec["term_months"] or 60) // 12 - 2))

    def drop_asset_flavor(self) -> None:
        """For templates that already name the leased asset."""
        if self.flavor and self.asset.split("（")[0] in self.flavor:
            self.flavor = None

    def fmt(self, s: str) -> str:
        return s.format(A=self.A, T=self.T, S=self.S, M=self.M, a=self.a, b=self.b)

    # ---- narrative segments (None when the field is absent) --------------------------------
    def seg_amt(self) -> str | None:
        return self.fmt(self.rng.choice(self.v["amt"])) if self.A else None

    def seg_term(self) -> str | None:
        if self.T is None:
            return None
        lbl, rng = self.term_lbl, self.rng
        if self.use_range:
            return self.fmt(rng.choice((f"{lbl}自{{S}}起至{{M}}止，共{{T}}", f"{lbl}为{{T}}，自{{S}}起至{{M}}止",
                                        f"{lbl}自{{S}}至{{M}}，共计{{T}}", f"{lbl}：{{S}}至{{M}}，共{{T}}")))
        if self.t == "credit_line" and rng.random() < 0.3:
            return f"{lbl}为自合同生效之日起{self.T}"
        tail = "，自首次提款日起算" if self.t == "loan" and rng.random() < 0.15 else ""
        return rng.choice((f"{lbl}为{self.T}", f"{lbl}{self.T}")) + tail

    def seg_mat(self) -> str | None:
        if self.M is None or (self.use_range and self.T is not None):
            return None
        return self.fmt(self.rng.choice(self.v["mat"]))

    def rate_value(self) -> str | None:
        """The rate as it would follow a label: "年利率4.35%", "月息0.5%", "LPR加45个基点，即3.90%"."""
        rec, rng = self.rec, self.rng
        kind = rec["rate_kind"]
        if kind is None or kind == "agreed":
            return None
        if kind == "floating":
            bm = _BENCHMARK[rec["currency"]]
            spread = rng.choice((80, 100, 120, 150, 180, 210, 250))
            return rng.choice((f"{bm}加{spread}个基点", f"{bm}+{_fmt_pct(Decimal(spread) / 100, True)}%",
                               f"{bm}加{_fmt_pct(Decimal(spread) / 100, False)}%"))
        info = rec["rate_info"]
        r = _fmt_pct(rec["rate"], rng.random() < 0.5)
        if kind == "monthly":
            m = str(info["monthly"])  # "0.5", "1", "0.375"
            return rng.choice((f"月息{m}%", f"月利率{m}%", f"按月息{m}%计"))
        if kind == "lpr":
            tenor, lpr, bp = info["tenor"], info["lpr"], info["bp"]
            op, abp = ("加", bp) if bp > 0 else ("减", -bp)
            r2 = _fmt_pct(rec["rate"], True)
            return rng.choice((f"LPR{op}{abp}个基点，即{r2}%", f"{tenor}LPR{op}{abp}BP（即年利率{r2}%）",
                               f"在{tenor}LPR基础上{op}{abp}个基点，即{r2}%",
                               f"{tenor}LPR（{lpr}%）{op}{abp}个基点，即{r2}%",
                               f"{tenor}贷款市场报价利率{op}{abp}个基点，即年利率{r2}%"))
        if self.t == "bond":
            return rng.choice((f"{r}%", f"年息{r}%", f"{r}%（年）", f"固定利率{r}%"))
        if self.t == "deposit":
            return rng.choice((f"年利率{r}%", f"{r}%（年）", f"年化{r}%"))
        return rng.choice((f"年利率{r}%", f"年化{r}%", f"固定年利率{r}%", f"{r}%/年", f"年息{r}%"))

    def seg_rate(self) -> str | None:
        rec, rng = self.rec, self.rng
        if rec["rate_kind"] == "agreed":
            return rng.choice(("额度项下单笔业务利率由双方另行约定", "利率按单笔业务合同约定执行",
                               "具体利率以单笔融资合同为准"))
        val = self.rate_value()
        if val is None:
            return None
        if rec["rate_kind"] == "floating":
            return rng.choice((f"{self.rate_lbl}按{val}确定", f"年利率为{val}", f"{self.rate_lbl}为{val}，按季浮动"))
        if rec["rate_kind"] == "monthly" and rng.random() < 0.5:
            return val if not val.startswith("按") else val + "息"
        if val.startswith("按"):
            return val + "息"
        if rec["rate_kind"] == "annual" and rng.random() < 0.3 and val.startswith("年利率"):
            return rng.choice(("执行" + val, "按" + val + "计息", val))
        if self.t == "bond" and rng.random() < 0.3:
            return f"票面年利率为{_fmt_pct(rec['rate'], True)}%"
        return f"{self.rate_lbl}为{val}"

    def pen_narrative(self) -> str | None:
        pen = self.rec["penalty"]
        if pen is None:
            return None
        p, rng, a, b = pen["value"], self.rng, self.a, self.b
        if pen["kind"] == "abs":
            opts = ["逾期按{p}计收罚息", "逾期利息按{p}计算", "{b}逾期还款的，按逾期金额{p}支付违约金",
                    "如{b}未按期还款，自逾期之日起按{p}计收逾期利息", "逾期部分按{p}计收罚息"]
            if self.t == "lease":
                opts = ["{b}逾期支付租金的，按逾期金额{p}支付违约金", "{b}逾期支付租金的，应按应付未付租金{p}向{a}支付滞纳金",
                        "逾期按{p}计收罚息", "租金逾期的，按欠付金额{p}计收违约金"]
            if self.t == "factoring":
                opts += ["若{b}未能按期回购应收账款，应按{p}向{a}支付违约金"]
        elif pen["kind"] == "rel_basis":
            opts = ["逾期罚息{p}", "逾期部分罚息利率{p}", "对逾期款项{p}计收罚息"]
        else:
            opts = ["逾期按{p}计收罚息", "逾期部分按{p}计收罚息", "{b}未按期还款的，逾期部分按{p}计收罚息",
                    "罚息利率为{p}", "{a}对逾期款项按{p}计收罚息"]
        return rng.choice(opts).format(p=p, a=a, b=b)

    def seg_pen(self) -> str | None:
        return self.pen_narrative()

    def col_narrative(self, subject: bool = True) -> str | None:
        c = self.rec["collateral"]
        if c is None:
            return None
        rng = self.rng
        if c.get("kind") == "transfer":
            buyer = c["buyer"]
            return rng.choice((f"{self.b}将其对{buyer}享有的应收账款转让予{self.a}",
                               f"{self.a}受让{self.b}对{buyer}的应收账款",
                               f"{self.b}以其对{buyer}的应收账款向{self.a}办理转让"))
        obj, verb = c["obj"], c["verb"]
        subj_key = self.v["col_subj"]
        subj = {"a": self.a, "b": self.b, "g": "抵押人" if verb == "抵押" else "出质人"}[subj_key]
        if self.t == "guarantee":
            return rng.choice((f"{subj}以其{obj}为{self.b}在主合同项下的债务提供{verb}担保",
                               f"{subj}同意以其{obj}提供{verb}担保",
                               f"{subj}以其{obj}设定{verb}，担保{self.b}在主合同项下的全部债务"))
        s = subj if subject else ""
        opts = [f"{s}以其{obj}提供{verb}担保", f"{s}以其{obj}作{verb}", f"{s}以其{obj}作为{verb}物"]
        if subj_key != "a":
            opts.append(f"{s}以其{obj}向{self.a}设定{verb}")
        return rng.choice(opts)

    def seg_col(self) -> str | None:
        return self.col_narrative()

    def gua_narrative(self) -> str | None:
        g = self.rec["guarantor"]
        if g is None:
            return None
        text, rng = g["text"], self.rng
        if self.t == "guarantee":
            return rng.choice((f"保证人{g['bare']}自愿为{self.b}在主合同项下的全部债务提供连带责任保证",
                               f"保证方式为连带责任保证，保证人为{g['bare']}",
                               f"{text}作为保证人，同意提供不可撤销的连带责任保证",
                               f"由{text}提供连带责任保证担保"))
        if g["kind"] == "company":
            opts = [f"由{text}提供连带责任保证", f"{text}为本合同项下债务提供连带责任保证担保",
                    f"由{text}提供不可撤销的连带责任保证", f"{text}作为保证人提供最高额保证担保"]
            if self.t == "bond":
                opts = [f"由{text}提供全额无条件不可撤销的连带责任保证担保", f"本期债券由{text}提供连带责任保证担保"]
        else:
            opts = [f"由{text}提供个人连带责任保证", f"{text}自愿提供连带责任保证",
                    f"由{text}提供个人无限连带责任保证", f"{text}为本合同项下债务承担连带保证责任"]
            if self.t == "loan" and g["kind"] == "person":
                opts.append(f"丙方{text}自愿作为保证人")
        return rng.choice(opts)

    def seg_gua(self) -> str | None:
        return self.gua_narrative()

    def seg_extra(self) -> str | None:
        if self.t == "guarantee" and self.rec["guarantor"] is not None and self.rng.random() < 0.3:
            return f"保证期间为主债务履行期届满之日起{self.rng.choice(('三年', '两年', '六个月'))}"
        return self.flavor

    ORDER = ("amt", "term", "mat", "rate", "pen", "col", "gua", "extra")

    def segments(self, exclude=(), order=None) -> list[str]:
        if "term" in exclude:
            self.use_range = False  # the template states the term itself; the maturity then stands alone
        out = []
        for name in order or self.ORDER:
            if name in exclude:
                continue
            s = getattr(self, "seg_" + name)()
            if s:
                out.append(s)
        return out

    # ---- field-list pairs (label, value) ---------------------------------------------------
    def fields(self, exclude=()) -> list[tuple[str, str]]:
        return [(k, v) for key, k, v in self.keyed_fields() if key not in exclude]

    def keyed_fields(self) -> list[tuple[str, str, str]]:
        """[(field, label, value)], e.g. ("amt", "贷款金额", "人民币500万元")."""
        rng, v, rec = self.rng, self.v, self.rec
        out = []
        if self.A:
            out.append(("amt", rng.choice(v["amt_lbl"]), self.A))
        if self.T is not None:
            if self.use_range:
                out.append(("term", self.term_lbl,
                            rng.choice((f"{self.S}至{self.M}，共{self.T}", f"{self.T}，自{self.S}起至{self.M}止"))))
            else:
                out.append(("term", self.term_lbl, self.T))
        if self.M is not None and not (self.use_range and self.T is not None):
            out.append(("mat", rng.choice(v["mat_lbl"]), self.M))
        if rec["rate_kind"] == "agreed":
            out.append(("rate", self.rate_lbl, "由双方另行约定"))
        else:
            rv = self.rate_value()
            if rv:
                out.append(("rate", self.rate_lbl, rv.removeprefix("按").removesuffix("计")))
        pen = rec["penalty"]
        if pen:
            p = pen["value"]
            if pen["kind"] == "rel_basis":
                pair = (rng.choice(("逾期罚息", "罚息")), p)
            elif pen["kind"] == "abs":
                pair = rng.choice((("逾期罚息", f"按{p}计收"), ("违约金", f"按逾期金额{p}计付"), ("逾期利息", f"按{p}计算")))
            else:
                pair = rng.choice((("逾期罚息", f"按{p}计收"), ("罚息利率", p), ("逾期罚息", f"按{p}")))
            out.append(("pen",) + pair)
        c, g = rec["collateral"], rec["guarantor"]
        if c is not None:
            if c.get("kind") == "transfer":
                out.append(("col", "应收账款", f"{self.b}对{c['buyer']}的应收账款转让予{self.a}"))
            elif self.t == "guarantee" or rng.random() < 0.5:
                owner = {"a": self.a, "b": self.b, "g": "抵押人" if c["verb"] == "抵押" else "出质人"}[v["col_subj"]]
                out.append(("col", f"{c['verb']}物", owner + c["obj"]))
            else:
                out.append(("col", "担保方式", self.col_narrative(subject=False)))
        if g is not None:
            if rng.random() < 0.5 or (out and out[-1][1] == "担保方式"):
                out.append(("gua", "保证人", g["bare"] + rng.choice(("", "（连带责任保证）"))))
            else:
                out.append(("gua", "担保方式", f"{g['text']}提供连带责任保证"))
        if c is None and g is None and self.t in ("loan", "credit_line") and rng.random() < 0.3:
            out.append(("none", "担保方式", "信用"))
        return out
