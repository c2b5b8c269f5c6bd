"""Personal-data redaction for Chinese Q/A training data (hospital, legal and bank records).

Run before training (and by `qlora-kit data scrub`). Six kinds are found and replaced by a
placeholder; everything else is left byte-for-byte as it was:

- id_card   18-character PRC resident ID (17 digits + check char), redacted only when the
            ISO 7064 MOD 11-2 checksum and the birth date are valid.
- bank_card 15-19 digit card numbers, plain or in groups ("6222 0212 3456 7890 128"), redacted
            only when Luhn-valid and the prefix/length is a real card scheme. Right after a card
            label (银行卡, 卡号, card no.) any Luhn-valid 12-19 digit number; right after an account
            label (账号, 账户, account no.) any 12-25 digit number (bank accounts are often not Luhn).
- mobile    mainland mobile 1[3-9]xxxxxxxxx, optionally +86/86/0086 and 3-4-4 separators.
- landline  area code (010, 02x, 0xxx) + separator or parentheses + 7-8 digit number, optional
            extension.
- email     local@domain.tld.
- name      only names that follow a label (患者, 原告, 姓名：, ...); unlabelled names are not
            searched for, because they cannot be found reliably.

Precision matters as much as recall: training text is full of amounts, dates, article numbers
and lab values, so every numeric kind is anchored so that it never matches inside a longer
digit run, a hyphen-joined chain of numbers, or a decimal, and every kind has a validity check.
Full-width digits and punctuation (１３８…, （０１０）, ＠) are recognised as their ASCII forms;
matching is done on a same-length normalised copy, so the output keeps the original characters.
Already-masked values ("138****8000", "张**", "张某") contain no complete identifier and are
left alone.

Standard library only.
"""

from __future__ import annotations

import collections
import datetime
import re

KINDS = ("id_card", "bank_card", "mobile", "landline", "email", "name")
PLACEHOLDER = {
    "id_card": "[身份证号]",
    "bank_card": "[银行卡号]",
    "mobile": "[手机号]",
    "landline": "[电话]",
    "email": "[邮箱]",
    "name": "[姓名]",
}

# --------------------------------------------------------------------------------------------
# Validity checks
# --------------------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID_SHAPE = re.compile(r"[1-9][0-9]{16}[0-9Xx]")
_DIGITS = re.compile(r"[0-9]+")


def _birth_date_ok(yyyymmdd: str) -> bool:
    y, m, d = int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8])
    if not 1900 <= y <= datetime.date.today().year:
        return False
    try:
        datetime.date(y, m, d)
    except ValueError:
        return False
    return True


def id_check_char(body17: str) -> str:
    """The ISO 7064 MOD 11-2 check character for the first 17 digits of an ID."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(body17, _ID_WEIGHTS)) % 11]


def is_valid_id_card(s: str) -> bool:
    """18-char PRC resident ID: first digit 1-9, 16 more digits, check char 0-9/X/x matching the
    MOD 11-2 checksum, and a real calendar birth date (YYYYMMDD at positions 7-14, 1900..this year)."""
    if not isinstance(s, str) or not _ID_SHAPE.fullmatch(s):
        return False
    if not _birth_date_ok(s[6:14]):
        return False
    return id_check_char(s[:17]) == s[17].upper()


def luhn_ok(digits: str) -> bool:
    """True when `digits` (ASCII digits only, non-empty) passes the Luhn check."""
    if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


def _card_scheme_ok(d: str) -> bool:
    """Prefix and length of a real card scheme (UnionPay, Visa, Mastercard, Amex, JCB)."""
    n = len(d)
    if d[:2] in ("34", "37"):  # American Express: always 15 digits
        return n == 15
    if not 16 <= n <= 19:
        return False
    if d.startswith("62") or d.startswith("35"):  # UnionPay, JCB
        return True
    if d.startswith("4"):  # Visa: 16 or 19
        return n in (16, 19)
    p2, p4 = int(d[:2]), int(d[:4])
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard: 16
        return n == 16
    return False


def _id_like(d: str) -> bool:
    """An 18-char run shaped like a resident ID (birth year 19xx/20xx at positions 7-10). Such a
    run is judged only as an ID: one that fails the ID checks is a look-alike, not a card."""
    return len(d) == 18 and d[6:8] in ("19", "20")


def is_valid_bank_card(digits: str) -> bool:
    """Luhn-valid, typical card prefix and length, and not shaped like a resident ID."""
    return bool(_DIGITS.fullmatch(digits)) and not _id_like(digits) and _card_scheme_ok(digits) and luhn_ok(digits)


# --------------------------------------------------------------------------------------------
# Normalisation: a same-length ASCII view of the text, so that spans map back 1:1
# --------------------------------------------------------------------------------------------

_NORMALIZE = {0xFF01 + i: 0x21 + i for i in range(94)}  # full-width ASCII block -> ASCII
_NORMALIZE.update({0x3000: 0x20, 0x00A0: 0x20, 0x2010: 0x2D, 0x2011: 0x2D, 0x2012: 0x2D, 0x2013: 0x2D, 0x2212: 0x2D})
_MASK = "\x00"  # fills spans already found; neither a digit, a letter nor a CJK character

# Numeric kinds never start or end inside a longer alphanumeric run, a decimal ("0.138...") or
# a hyphen-joined chain of numbers ("20240115-13800138000").
_B = r"(?<![0-9A-Za-z])(?<![0-9][.\-])"
_A = r"(?![0-9A-Za-z])(?![.\-][0-9])"

_ID_RE = re.compile(_B + r"(?:[0-9]{17}[0-9Xx]|[0-9]{6}(?P<sep>[ -])[0-9]{8}(?P=sep)[0-9]{3}[0-9Xx])" + _A)
_CARD_RE = re.compile(
    _B + r"(?:[0-9]{15,19}|[0-9]{4,6}(?P<sep>[ -])[0-9]{1,6}(?:(?P=sep)[0-9]{1,6}){1,4})" + _A
)
_MOBILE_RE = re.compile(
    _B
    + r"(?:\+86[ -]?|0086[ -]?|86-?|\((?:\+|00)?86\)[ -]?)?"
    + r"1[3-9][0-9](?:[0-9]{8}|(?P<sep>[ -])[0-9]{4}(?P=sep)[0-9]{4})"
    + _A
)
_AREA = r"0(?:10|2[0-9]|[3-9][0-9]{2})"
_LANDLINE_RE = re.compile(
    _B
    + r"(?:\(" + _AREA + r"\)[ -]?|" + _AREA + r"[ -])"
    + r"(?:[2-9][0-9]{6,7}|[2-9][0-9]{2,3}[ -][0-9]{4})"
    + r"(?:(?:转|分机|-|ext\.?\s?)[0-9]{1,6})?"
    + _A
)
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+\-])"
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+\-]*[A-Za-z0-9_%+\-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9\-])"
)


def _run_len(s: str, i: int, step: int) -> int:
    n = 0
    while 0 <= i < len(s) and "0" <= s[i] <= "9":
        n += 1
        i += step
    return n


def _in_space_chain(s: str, start: int, end: int) -> bool:
    """A space-grouped candidate that continues into a neighbouring short digit group
    ("1234 6222 0212 ...") is part of some longer number, not a whole identifier."""
    if start >= 2 and s[start - 1] == " " and _run_len(s, start - 2, -1) in range(1, 7):
        return True
    if end + 1 < len(s) and s[end] == " " and _run_len(s, end + 1, 1) in range(1, 7):
        return True
    return False


def _find_id(s: str):
    for m in _ID_RE.finditer(s):
        d = re.sub(r"[ -]", "", m.group())
        if is_valid_id_card(d) and not (m.group("sep") == " " and _in_space_chain(s, m.start(), m.end())):
            yield m.start(), m.end(), "id_card"


def _find_card(s: str):
    for m in _CARD_RE.finditer(s):
        text, sep = m.group(), m.group("sep")
        if sep:
            groups = text.split(sep)
            if any(not 4 <= len(g) <= 6 for g in groups[:-1]):
                continue
            if sep == " " and _in_space_chain(s, m.start(), m.end()):
                continue
            d = "".join(groups)
        else:
            d = text
        if len(d) == 18 and is_valid_id_card(d):  # a grouped ID written like a card
            yield m.start(), m.end(), "id_card"
        elif is_valid_bank_card(d):
            yield m.start(), m.end(), "bank_card"


# A number right after a card or account label is a card or account number whatever its prefix:
# issuers outside the scheme table above (and 12-14 digit cards) exist. After a card label it must
# still pass Luhn (every payment card does, so a failing number there is something else). After an
# account label (账号, 账户, account no.) no checksum is asked for: Chinese bank account numbers,
# passbook and corporate (对公) ones especially, follow each bank's own scheme and are often not
# Luhn-valid, and the label already says what the number is.
_LABELLED_NUMBER_RE = re.compile(
    r"(?:(?P<card>银行卡号?|信用卡号?|借记卡号?|卡号|(?<![A-Za-z])card[ \t]*(?:no\b\.?|number\b|num\b\.?|#))"
    r"|(?P<account>[账帐][号户]|(?<![A-Za-z])(?:account|acct\b\.?)[ \t]*(?:no\b\.?|number\b|#)))"
    r"[ \t]*(?::[ \t]*|[为是][ \t]*)?"
    r"(?P<num>[0-9]+(?:[ -][0-9]+)*)",
    re.IGNORECASE,
)
_LABELLED_DIGITS = {"card": (12, 19), "account": (12, 25)}
_AFTER = re.compile(_A)


def _find_labelled_number(s: str):
    for m in _LABELLED_NUMBER_RE.finditer(s):
        kind = "card" if m.group("card") else "account"
        lo, hi = _LABELLED_DIGITS[kind]
        start, text = m.start("num"), m.group("num")
        # The number may run into a following one ("卡号 6222… 1000元"): take the longest run of its
        # groups, cut only at a space, that is a whole number and has a valid length (and checksum).
        ends = [i for i, c in enumerate(text) if c == " "] + [len(text)]
        for end in reversed(ends):
            d = re.sub(r"[ -]", "", text[:end])
            if not lo <= len(d) <= hi or not _AFTER.match(s, start + end):
                continue
            if kind == "account" or luhn_ok(d):
                yield start, start + end, "bank_card"
            break


def _find_mobile(s: str):
    for m in _MOBILE_RE.finditer(s):
        if m.group("sep") == " " and _in_space_chain(s, m.start(), m.end()):
            continue
        yield m.start(), m.end(), "mobile"


def _find_landline(s: str):
    for m in _LANDLINE_RE.finditer(s):
        if " " in m.group() and _in_space_chain(s, m.start(), m.end()):
            continue
        yield m.start(), m.end(), "landline"


def _find_email(s: str):
    for m in _EMAIL_RE.finditer(s):
        yield m.start(), m.end(), "email"


# --------------------------------------------------------------------------------------------
# Labelled names
# --------------------------------------------------------------------------------------------

_NAME_LABELS = (
    "姓名", "患者", "病人", "联系人", "当事人", "委托人", "申请人", "被申请人", "原告", "被告", "被告人",
    "借款人", "出借人", "法定代表人", "客户", "上诉人", "被上诉人", "被害人", "犯罪嫌疑人", "担保人", "保证人",
)
_LABEL_RE = re.compile(
    "(?:" + "|".join(re.escape(x) for x in sorted(_NAME_LABELS, key=len, reverse=True)) + ")"
    r"(?P<sep>[ \t]*[:：][ \t]*|[ \t]+)?"
)

# The ~120 most common single-character surnames, and common compound surnames.
_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩邓冯曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁"
    "任卢姚沈钟姜崔谭陆范汪廖石金韦贾夏付方邹熊白孟秦邱侯江尹薛闫段雷龙黎史陶贺毛郝顾龚邵万覃武钱戴严"
    "欧莫孔向常汤康易乔赖文施洪辛柴牛葛庞樊兰殷齐傅阎萧凌耿"
)
_COMPOUND_SURNAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐")
# Surnames that, directly after a label with no "：", are far more often a word (患者于…, 被告向原告…,
# 原告方…, 患者曾…, 患者常…, 患者易…). With an explicit "：" they are taken as names.
_AMBIGUOUS_SURNAMES = frozenset("于曾方向常易")

# Single characters that do not occur in a given name here and mark the end of one: "张三因…",
# "李四于…", "王五称…", "张某" (already pseudonymised).
_FUNC_CHARS = frozenset(
    "的了在是有和与及因于被向对将把为称诉说等男女岁某后前时已未不无也都均即就并但又还自从系所其经曾"
    "到去给让由或而且则该此这那您你我他她它们年月日号元次个名位处内外院科病症借贷款欠要需能请求予"
    "先犯用"
)
# Words that start right after a label (or inside what would be a name) and are not names:
# "原告主张", "患者出现", "原告陈述", "患者高热", "借款人付款". They also end a name: "张三出现发热".
_STOP_WORDS = frozenset(
    """
    主张 认为 表示 诉称 辩称 陈述 陈诉 陈旧 提出 提交 提供 请求 要求 同意 申请 起诉 上诉 答辩 承认 否认 应当 应该
    可以 需要 必须 未能 已经 按照 依照 根据 因为 由于 方面 公司 单位 代理 律师 委托 法院 任何 任意 任职 范围 程序
    许可 于是 马上 万元 万一 严重 施工 支付 付款 付清 付给 还款 借款 贷款 存款 余额 金额 钱款 账户 账号 办理 持有
    违约 返还 赔偿 承担 签订 签署 收到 确认 声称 指出 坚持 辩解 放弃 撤回 不服 对此 经营 自愿 多次 共同 双方
    一方 本人 家属 先生 女士 小姐 同志 朋友 妻子 丈夫 父亲 母亲 儿子 女儿 出现 高热 高烧 高血 高龄 高度 高危 黄疸
    黄染 黄金 白细 白带 康复 张口 张力 周身 周围 常规 体温 血压 入院 出院 就诊 主诉 自诉 既往 年龄 性别 病史
    病情 症状 发热 咳嗽 头痛 腹痛 术后 术前 服用 口服 接受 经过 目前 现在 今日 昨日 近日 近期 凌晨 石膏 毛发
    曾经 意识 精神 神志 一般 情况 体检 检查 诊断 治疗 手术 住院 门诊 复诊 反复 持续 突发 突然 伴有 合并 身高
    体重 血糖 心率 呼吸 双侧 左侧 右侧 全身 齐全 电话 手机 住址 地址 联系 身份 证件 号码 信息 资料 名称 满意
    经理 服务 反映 投诉 咨询 来电 来访 开户 民族 汉族 出生 户籍 职业 文化 文书
    认罪 认可 认定 到庭 出庭 缺席 涉嫌 伙同 持刀 驾驶 盗窃 诈骗 犯罪 犯有 供述 悔罪 辩护 逾期 拖欠 偿还 归还
    清偿 借给 转账 汇款 签名 签字 书写 出具 出借 借用 发生 发现 死亡 受伤 入住 转入 转院 就医 诉至 诉请 交纳 缴纳
    离婚 结婚 婚后 生育 抚养 继承 购买 购房 出售 租赁 居住 工作 退休 入职 离职 辞职 来院 来诊 既往史
    何时 何种 何处 何地 何故 周一 周二 周三 周四 周五 周六 周日 周末 周岁 孙子 孙女 胡说 高温 高压 高位 高风 高额
    谢谢 许多 董事 余款 余下 杜绝 程度 苏醒 陆续 夏季 付出 白天 黎明 钱财 严格 莫名 赖账 施行 辛苦 庞大
    周边 叶酸 归案 车辆 饮酒 明知 拘役 体内 应于 应在 应向 应按 应予 应支 应返 应偿 应赔 应承 应负 应将 应付 应自
    应对 应归 应给
    """.split()
)
_STOP_BY_FIRST: dict[str, tuple[str, ...]] = {}
for _w in sorted(_STOP_WORDS):
    _STOP_BY_FIRST[_w[0]] = _STOP_BY_FIRST.get(_w[0], ()) + (_w,)
del _w


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"


def _stop_word_at(s: str, i: int) -> bool:
    return any(s.startswith(w, i) for w in _STOP_BY_FIRST.get(s[i], ())) if i < len(s) else False


def _name_ends(s: str, e: int) -> bool:
    if e >= len(s) or not _is_cjk(s[e]):
        return True
    return s[e] in _FUNC_CHARS or _stop_word_at(s, e)


def _name_at(s: str, i: int, explicit: bool) -> int | None:
    """End of a surname + 1-2 character given name starting at i, or None."""
    if i >= len(s):
        return None
    surname_lens = [2] if s[i : i + 2] in _COMPOUND_SURNAMES else []
    if s[i] in _SURNAMES and (explicit or s[i] not in _AMBIGUOUS_SURNAMES):
        surname_lens.append(1)
    for sl in surname_lens:
        for gl in (2, 1):
            e = i + sl + gl
            given = s[i + sl : e]
            if len(given) != gl or not all(_is_cjk(c) for c in given):
                continue
            if any(c in _FUNC_CHARS for c in given):
                continue
            if any(_stop_word_at(s, p) for p in range(i, e)):
                continue
            if _name_ends(s, e):
                return e
    return None


def _find_name(s: str):
    last = 0
    for m in _LABEL_RE.finditer(s):
        if m.start() < last:
            continue
        sep = m.group("sep") or ""
        i = m.end()
        e = _name_at(s, i, explicit=":" in sep or "：" in sep)
        while e is not None:
            yield i, e, "name"
            last = e
            if e < len(s) and s[e] == "、":  # "原告张三、李四"
                i = e + 1
                e = _name_at(s, i, explicit=False)
            else:
                break


# Order matters: emails may hold digits; a valid ID is an id_card before it can be a card; cards
# and IDs are longer than mobiles, and a labelled 12+ digit number is an account, not a phone
# number inside it; names last.
_FINDERS = (_find_email, _find_id, _find_card, _find_labelled_number, _find_mobile, _find_landline, _find_name)


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Sorted, non-overlapping (start, end, kind) spans of personal data in `text`."""
    s = text.translate(_NORMALIZE)
    spans: list[tuple[int, int, str]] = []
    for finder in _FINDERS:
        found = list(finder(s))
        if found:
            spans.extend(found)
            parts, pos = [], 0
            for a, b, _ in sorted(found):
                parts += [s[pos:a], _MASK * (b - a)]
                pos = b
            parts.append(s[pos:])
            s = "".join(parts)
    return sorted(spans)


def scrub_text(text: str) -> tuple[str, collections.Counter]:
    """Return the text with personal data replaced by PLACEHOLDER[kind], and counts by kind."""
    counts: collections.Counter = collections.Counter()
    if not text:
        return text, counts
    spans = find_pii(text)
    if not spans:
        return text, counts
    parts, pos = [], 0
    for a, b, kind in spans:
        parts += [text[pos:a], PLACEHOLDER[kind]]
        counts[kind] += 1
        pos = b
    parts.append(text[pos:])
    return "".join(parts), counts


def scrub_conversations(convs: list[list[dict]]) -> tuple[list[list[dict]], collections.Counter]:
    """convs: list of conversations; a conversation is a list of {"role": ..., "content": str}. Returns new
    lists (inputs not mutated) with every content scrubbed, and the total counts by kind."""
    total: collections.Counter = collections.Counter()
    out: list[list[dict]] = []
    for conv in convs:
        new_conv = []
        for msg in conv:
            new_msg = dict(msg)
            content = msg.get("content")
            if isinstance(content, str):
                new_msg["content"], c = scrub_text(content)
                total.update(c)
            new_conv.append(new_msg)
        out.append(new_conv)
    return out, total
