"""Synthetic starter data: `qlora-kit data synth finance -n 2000 -o contracts.jsonl`.

Chinese contract clauses -> one-line JSON extraction pairs, in the style and with the exact answer
schema of the finance recipe's hand-written examples (recipes/data/finance.jsonl).

Each row is made in two steps. First a structured record is sampled: clause type, a principal
rounded like real contracts (multiples of 10,000), currency, annual rate, penalty wording,
maturity date, term, collateral and guarantor; fields a clause of that type would not state are
left null (about a third overall). Then the record is rendered as a clause by one of at least a
dozen sentence templates for its clause type (narrative, field list "贷款金额：…；", 第X条 articles,
（一）/1. enumerations, 甲方/乙方 wording, type-specific phrasings) and prefixed by an instruction.
Everything in the answer is stated in the clause: the amount in one of several notations (500万元,
1.2亿元, 1,500万元, 人民币叁仟万元整, EUR 1,200,000, ...), the rate as an annual rate, a monthly rate
("月息0.5%" -> 6.0) or LPR plus a spread with the resulting rate, the term in months or years
(years x 12), and the penalty wording verbatim (the value is the rate expression itself, e.g.
"日万分之五" or "借款利率上浮50%", without the surrounding "按…计收罚息", as in the bundled set).

Only the standard library is used; the same seed gives byte-identical output.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import json
import os
import random
import re
import uuid
from decimal import Decimal
from pathlib import Path

SCHEMA_KEYS = ("clause_type", "principal", "currency", "interest_rate", "penalty_rate",
               "maturity_date", "term_months", "collateral", "guarantor")
DOMAINS = ("finance",)
CLAUSE_TYPES = ("loan", "guarantee", "lease", "deposit", "bond", "factoring", "credit_line")
CURRENCIES = ("CNY", "USD", "EUR", "HKD")

# --------------------------------------------------------------------------------------------
# Chinese numerals
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

_CITIES = ("上海", "深圳", "杭州", "南京", "苏州", "成都", "武汉", "广州", "宁波", "天津", "重庆", "北京",
           "厦门", "青岛", "西安", "合肥", "长沙", "郑州", "济南", "无锡", "佛山", "东莞", "福州", "昆明")
_CORES = ("华信", "恒通", "瑞丰", "恒远", "鼎盛", "嘉禾", "永信", "中联", "汇金", "宏达", "鑫源", "金诚",
          "远洋", "天合", "盛世", "港盛", "融信", "拓海", "鲁泰", "浦江", "滨海", "恒泰", "康华", "光能",
          "两江", "渝信", "安泰", "华茂", "泰和", "广源", "德润", "新元", "博远", "锦程", "中盛", "华昌")
_INDUSTRIES = ("实业", "科技", "投资", "贸易", "物流", "建设", "电子科技", "融资担保", "控股", "新能源",
               "医疗投资", "供应链管理", "置业", "机械制造", "国际贸易", "化工", "食品", "纺织")
_SUFFIXES = ("有限公司", "有限公司", "有限公司", "股份有限公司", "集团有限公司")
_BUYERS = ("国网江苏省电力有限公司", "沃尔玛（中国）投资有限公司", "中国石化销售股份有限公司",
           "上汽大众汽车有限公司", "华为终端有限公司", "中铁建工集团有限公司", "京东五星电器集团有限公司",
           "比亚迪汽车工业有限公司", "中国移动通信集团广东有限公司", "宁德时代新能源科技股份有限公司")
_SURNAMES = "张王李赵陈刘杨黄周吴徐孙马朱胡郭何林高罗郑梁谢宋唐许韩冯邓曹彭曾萧田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢"
_GIVEN = ("建国", "丽华", "志明", "卫东", "海涛", "晓梅", "国栋", "明远", "家豪", "伟", "芳", "静", "强", "磊",
          "军", "洋", "勇", "艳", "杰", "涛", "秀英", "桂英", "婷", "浩然", "子轩", "雨涵", "思远", "文博",
          "嘉怡", "志强", "建华", "玉兰", "宏伟", "晓东", "立新", "春梅", "俊杰", "雪松", "国庆", "红霞")
_LOCATIONS = (("上海市", "浦东新区"), ("上海市", "徐汇区"), ("北京市", "朝阳区"), ("北京市", "海淀区"),
              ("广州市", "天河区"), ("深圳市", "南山区"), ("深圳市", "福田区"), ("杭州市", "西湖区"),
              ("杭州市", "滨江区"), ("成都市", "高新区"), ("武汉市", "东湖高新区"), ("南京市", "鼓楼区"),
              ("苏州市", "工业园区"), ("重庆市", "渝北区"), ("天津市", "滨海新区"), ("西安市", "雁塔区"),
              ("宁波市", "鄞州区"), ("厦门市", "思明区"), ("青岛市", "市南区"), ("长沙市", "岳麓区"),
              ("合肥市", "蜀山区"), ("郑州市", "金水区"), ("济南市", "历下区"), ("佛山市", "顺德区"))
_ROADS = ("建国路", "中山路", "人民路", "解放路", "世纪大道", "科技园路", "滨江大道", "长江路", "南京路",
          "淮海路", "东风路", "学院路", "高新大道", "金融街", "和平路")
_PROPERTY_KINDS = ("房产", "房产", "商品房", "写字楼", "厂房", "商铺", "住宅")
_EQUIPMENT = ("生产线机器设备", "数控机床", "注塑机、冲压机等机器设备", "工程机械设备", "纺织机械设备",
              "光伏组件生产设备", "印刷机械设备", "医疗检测设备")
_CARS = ("宝马X5轿车", "奔驰E300L轿车", "奥迪A6L轿车", "丰田凯美瑞轿车", "大众帕萨特轿车", "比亚迪汉EV轿车",
         "特斯拉Model Y汽车", "重型厢式货车")
_LEASE_ASSETS = ("数控机床二十台", "医疗设备（CT机两台）", "盾构机一台", "光伏发电设备一批", "船舶一艘",
                 "印刷生产线一条", "商用客车五十辆", "风力发电机组十二台", "注塑生产设备一批")

_CUR_CN = {"CNY": ("人民币",), "USD": ("美元",), "EUR": ("欧元",), "HKD": ("港币", "港元")}
_CUR_ISO = {"CNY": ("RMB", "CNY"), "USD": ("USD",), "EUR": ("EUR",), "HKD": ("HKD",)}
_BENCHMARK = {"USD": "SOFR", "EUR": "EURIBOR", "HKD": "HIBOR", "CNY": "LPR"}

# Per clause type: parties (a: bank side, b: customer side), the word used in instructions, and
# the phrasings of each field. {A} amount, {T} term, {S} start date, {M} maturity, {a}/{b} parties.
_V: dict[str, dict] = {
    "loan": {
        "kind": ("借款", "贷款"),
        "a": ("贷款人", "贷款人", "出借人", "本行"), "b": ("借款人",),
        "amt": ("借款金额为{A}", "贷款本金为{A}", "借款本金为{A}", "{b}向{a}借款{A}", "{a}同意向{b}发放贷款{A}",
                "贷款总额为{A}", "{b}向{a}申请流动资金贷款{A}", "本合同项下借款金额为{A}"),
        "amt_lbl": ("借款金额", "贷款金额", "借款本金", "贷款本金"),
        "term_lbl": ("借款期限", "贷款期限"),
        "mat": ("到期日为{M}", "借款到期日为{M}", "{b}应于{M}前归还全部借款本金", "贷款于{M}到期", "最后还款日为{M}"),
        "mat_lbl": ("到期日", "借款到期日", "还款日期"),
        "rate_lbl": ("借款利率", "贷款利率", "利率"),
        "pen_base": ("借款利率", "贷款利率", "本合同约定利率", "合同约定利率"),
        "col_subj": "b",
        "heading": ("借款条款", "本息偿还", "主要条款", "借款要素"),
        "flavor": ("借款用途为补充流动资金", "借款用途：补充日常经营周转", "按月付息，到期还本", "按季结息，到期一次还本",
                   "本合同项下借款用于厂房建设", "提款方式为一次性提款"),
    },
    "guarantee": {
        "kind": ("保证", "担保"),
        "a": ("债权人", "贷款人"), "b": ("债务人", "借款人"),
        "amt": ("所担保的主债权本金为{A}", "担保的主债权为{a}依据主合同向{b}发放的贷款本金{A}",
                "被担保主债权本金数额为{A}", "担保范围为主合同项下借款本金{A}及相应利息、罚息"),
        "amt_lbl": ("被担保主债权本金", "担保主债权数额", "担保本金"),
        "term_lbl": ("保证期间",),
        "mat": ("主债务到期日为{M}", "主债务履行期限届满日为{M}", "主合同项下借款到期日为{M}"),
        "mat_lbl": ("主债务到期日", "主债务履行期限届满日"),
        "rate_lbl": ("利率",),
        "pen_base": (),
        "col_subj": "g",
        "heading": ("担保条款", "保证条款", "担保方式"),
        "flavor": (),
    },
    "lease": {
        "kind": ("租赁", "融资租赁"),
        "a": ("出租人",), "b": ("承租人",),
        "amt": ("租赁本金为{A}", "融资金额为{A}", "租赁物购买价款即融资本金为{A}", "{a}向{b}提供融资租赁款{A}",
                "租赁成本为{A}"),
        "amt_lbl": ("租赁本金", "融资金额", "租赁成本"),
        "term_lbl": ("租赁期限", "租期"),
        "mat": ("租赁到期日为{M}", "租赁期限届满日为{M}", "最后一期租金支付日为{M}"),
        "mat_lbl": ("租赁到期日", "租赁期满日"),
        "rate_lbl": ("租赁利率", "利率"),
        "pen_base": ("租赁利率", "约定租赁利率"),
        "col_subj": "b",
        "heading": ("租赁条款", "租金及期限", "融资租赁要素"),
        "flavor": ("租金按季等额本息支付", "租金按月支付", "租赁期满后承租人以名义价款留购租赁物", "租赁物为{asset}"),
    },
    "deposit": {
        "kind": ("存款", "存单"),
        "a": ("本行", "银行"), "b": ("存款人", "客户"),
        "amt": ("{b}于{a}存入定期存款{A}", "存款金额为{A}", "认购金额{A}", "{b}在{a}办理大额存单业务，认购金额为{A}",
                "存款本金为{A}", "{b}存入{A}"),
        "amt_lbl": ("存款金额", "存入金额", "认购金额"),
        "term_lbl": ("存期", "存款期限", "期限"),
        "mat": ("到期日为{M}", "存款到期日为{M}", "存单到期日为{M}"),
        "mat_lbl": ("到期日", "存款到期日"),
        "rate_lbl": ("存款利率", "执行利率", "利率"),
        "pen_base": (),
        "col_subj": "b",
        "heading": ("存款条款", "存单要素", "存款信息"),
        "flavor": ("提前支取的按活期利率计息", "到期自动转存", "利息到期一次性支付", "不可提前支取"),
    },
    "bond": {
        "kind": ("债券",),
        "a": ("发行人",), "b": ("投资者", "债券持有人"),
        "amt": ("本期债券发行规模为{A}", "本期债券发行总额为{A}", "本期债券发行金额为{A}", "本期中期票据注册金额为{A}",
                "本次债券计划发行规模不超过{A}", "本期公司债券发行总额为{A}"),
        "amt_lbl": ("发行规模", "发行总额", "发行金额"),
        "term_lbl": ("债券期限", "期限", "存续期限"),
        "mat": ("到期日为{M}", "兑付日为{M}", "本期债券到期日为{M}"),
        "mat_lbl": ("到期日", "兑付日"),
        "rate_lbl": ("票面利率", "发行利率"),
        "pen_base": (),
        "col_subj": "a",
        "heading": ("发行条款", "本期债券基本条款", "发行要素"),
        "flavor": ("每年付息一次", "每半年付息一次", "到期一次还本", "附第{k}年末发行人调整票面利率选择权及投资者回售选择权",
                   "按面值平价发行"),
    },
    "factoring": {
        "kind": ("保理",),
        "a": ("保理商", "保理银行"), "b": ("卖方", "债权人"),
        "amt": ("保理融资款为{A}", "保理融资金额为{A}", "保理预付款金额为{A}", "{a}向{b}发放保理融资{A}",
                "核准保理融资额度{A}"),
        "amt_lbl": ("保理融资金额", "保理预付款金额", "融资金额"),
        "term_lbl": ("融资期限", "保理融资期限", "预付款期限"),
        "mat": ("融资到期日为{M}", "预付款到期日为{M}", "保理融资到期日为{M}"),
        "mat_lbl": ("融资到期日", "预付款到期日"),
        "rate_lbl": ("融资利率", "保理融资利率", "保理费率"),
        "pen_base": ("融资利率", "预付款利率", "保理融资利率"),
        "col_subj": "b",
        "heading": ("保理融资条款", "融资要素", "保理条款"),
        "flavor": (),
    },
    "credit_line": {
        "kind": ("授信", "信贷"),
        "a": ("授信人", "银行", "授信银行"), "b": ("受信人", "被授信人"),
        "amt": ("授信额度为{A}", "{a}同意向{b}提供最高不超过{A}的综合授信额度", "授信总额为{A}", "最高授信额度为{A}",
                "{a}给予{b}{A}的循环授信额度"),
        "amt_lbl": ("授信额度", "最高授信额度", "综合授信额度"),
        "term_lbl": ("授信期限", "授信期间", "额度有效期", "额度使用期限"),
        "mat": ("额度到期日为{M}", "授信到期日为{M}", "授信额度于{M}到期"),
        "mat_lbl": ("额度到期日", "授信到期日"),
        "rate_lbl": ("融资利率", "额度项下融资利率"),
        "pen_base": ("融资利率", "约定利率"),
        "col_subj": "b",
        "heading": ("授信条款", "授信要素", "额度条款"),
        "flavor": ("额度可循环使用", "本授信为集团综合授信", "额度项下可办理流动资金贷款、银行承兑汇票等业务"),
    },
}

_PREFIX_GENERIC = (
    ("从以下合同条款中提取关键要素，输出 JSON：", 10),
    ("提取条款要素（JSON）：", 1), ("阅读下面的条款，按字段输出 JSON：", 1), ("请提取以下条款的关键要素，输出 JSON：", 1),
    ("请从下列条款中抽取要素并生成 JSON：", 1), ("从下列条款中提取关键信息并以 JSON 输出：", 1),
    ("抽取下列条款的关键要素，以 JSON 形式返回：", 1), ("提取下面条款的要素，输出 JSON：", 1),
    ("请将下列条款中的要素抽取为 JSON：", 1), ("请抽取以下条款的要素，输出 JSON：", 1),
    ("抽取下列条款中的要素并输出一行 JSON：", 1), ("请抽取以下条款中的要素，并按 JSON 输出：", 1),
    ("提取以下条款中的本金、利率、到期日等字段，仅输出 JSON：", 1), ("按固定字段从下面的条款中抽取信息，输出 JSON：", 1),
)
_PREFIX_TYPED = (
    "请抽取下列{k}条款的要素，并以 JSON 返回：", "从以下{k}条款中提取关键要素，以 JSON 返回：",
    "请将以下{k}条款的关键要素抽取为 JSON：", "请从下面的{k}条款中提取要素，以 JSON 格式输出：",
    "从以下{k}合同条款中抽取关键字段，输出 JSON：", "阅读下列{k}条款并抽取要素（JSON 输出）：",
    "抽取以下{k}条款的关键字段（JSON）：", "请从下列{k}条款中抽取要素，输出一行 JSON：",
    "请对以下{k}条款进行要素抽取，输出 JSON：", "提取如下{k}条款的关键要素，结果为一行 JSON：",
    "从以下{k}条款中提取本金、利率、罚息、期限、担保等信息，输出 JSON：",
)

# --------------------------------------------------------------------------------------------
# Sampling the structured record
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

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


# ---- templates: f(clause) -> text, or None when the template does not fit the record ------------

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


def _answer(rec: dict) -> dict:
    m = rec["maturity"]
    return {
        "clause_type": rec["t"],
        "principal": rec["principal"],
        "currency": rec["currency"],
        "interest_rate": rec["rate"],
        "penalty_rate": rec["penalty"]["value"] if rec["penalty"] else None,
        "maturity_date": m.isoformat() if m is not None else None,
        "term_months": rec["term_months"],
        "collateral": rec["collateral"]["value"] if rec["collateral"] else None,
        "guarantor": rec["guarantor"]["value"] if rec["guarantor"] else None,
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


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synth domain {domain!r}; supported: {', '.join(DOMAINS)}")


def generate_with_meta(domain: str = "finance", n: int = 2000, seed: int = 0) -> list[tuple[dict, dict]]:
    """generate(), plus per row {"template": name, "record": sampled record} (for tests/inspection)."""
    _check_domain(domain)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"qlora-kit-synth:{domain}:{seed}")
    out: list[tuple[dict, dict]] = []
    seen: set[str] = set()
    while len(out) < n:
        for _ in range(50):  # a repeated question is redrawn (rare)
            rec = _sample_record(rng)
            clause, name = _render(rng, rec)
            question = _prefix(rng, rec["t"]) + "\n" + clause
            if question not in seen:
                break
        seen.add(question)
        answer = json.dumps(_answer(rec), ensure_ascii=False)
        out.append(({"question": question, "answer": answer}, {"template": name, "record": rec}))
    return out


def generate(domain: str = "finance", n: int = 2000, seed: int = 0) -> list[dict]:
    """n rows of {"question": instruction + "\\n" + clause, "answer": one-line JSON (SCHEMA_KEYS order)}.

    Deterministic: the same (domain, n, seed) gives the same rows, and a smaller n is a prefix of a
    larger one. Unknown domain -> ValueError naming the supported ones.
    """
    return [row for row, _ in generate_with_meta(domain, n, seed)]


def write_jsonl(path, rows) -> None:
    """Write rows as UTF-8 JSON Lines (ensure_ascii=False), atomically: a temp file in the same
    folder, fsynced, then os.replace'd over `path`, so readers never see a half-written file."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
