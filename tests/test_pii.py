"""Personal-data redaction: every valid identifier is replaced and counted; look-alikes and the
numbers training text is full of (amounts, dates, articles, lab values, order numbers) are not."""

from __future__ import annotations

import copy
import datetime
import random
from collections import Counter

import pytest

from qlora_kit.data.pii import KINDS, PLACEHOLDER, is_valid_id_card, luhn_ok, scrub_conversations, scrub_text

N = 200
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# Area codes that do not begin with a card prefix (62 UnionPay, 35 JCB), so an ID look-alike with a
# broken date can never pass as a card by accident.
AREAS = ("110105", "310104", "440305", "510107", "330106", "320102", "210102", "420106", "130102", "500103")


# --- generators (independent of the module under test) -----------------------------------------

def check_char(body17: str) -> str:
    return "10X98765432"[sum(int(c) * w for c, w in zip(body17, WEIGHTS)) % 11]


def gen_id(rng: random.Random, want_x: bool = False) -> str:
    while True:
        birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(31000))
        body = rng.choice(AREAS) + birth.strftime("%Y%m%d") + f"{rng.randrange(1000):03d}"
        c = check_char(body)
        if not want_x or c == "X":
            return body + c


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):  # positions counted as if the check digit followed
        n = int(ch)
        if i % 2 == 0:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return str((10 - total % 10) % 10)


def gen_card(rng: random.Random, length: int) -> str:
    partial = "62" + "".join(rng.choice("0123456789") for _ in range(length - 3))
    return partial + luhn_digit(partial)


def gen_mobile(rng: random.Random) -> str:
    return "1" + rng.choice("3456789") + "".join(rng.choice("0123456789") for _ in range(9))


def group4(d: str, sep: str) -> str:
    return sep.join(d[i : i + 4] for i in range(0, len(d), 4))


def assert_redacted(template: str, value: str, kind: str) -> None:
    out, counts = scrub_text(template.format(value))
    assert out == template.format(PLACEHOLDER[kind]), (template, value)
    assert counts == Counter({kind: 1}), (template, value, counts)


def assert_untouched(text: str) -> None:
    assert scrub_text(text) == (text, Counter()), text


# --- the check functions ------------------------------------------------------------------------

def test_api_constants():
    assert KINDS == ("id_card", "bank_card", "mobile", "landline", "email", "name")
    assert set(PLACEHOLDER) == set(KINDS)


def test_is_valid_id_card():
    assert is_valid_id_card("11010519491231002X")
    assert is_valid_id_card("11010519491231002x")
    assert not is_valid_id_card("110105194912310021")  # wrong check char
    assert not is_valid_id_card("01010519491231002X")  # first digit 0
    body = "11010519000229001"  # 1900 is not a leap year
    assert not is_valid_id_card(body + check_char(body))
    body = "11010520000229001"  # 2000 is
    assert is_valid_id_card(body + check_char(body))
    body = "110105" + str(datetime.date.today().year + 1) + "0101001"
    assert not is_valid_id_card(body + check_char(body))
    body = "11010518991231001"
    assert not is_valid_id_card(body + check_char(body))
    assert not is_valid_id_card("11010519491231002")
    assert not is_valid_id_card("11010519491231002X1")
    assert not is_valid_id_card("１１０１０５１９４９１２３１００２X")  # full-width digits are not the API's job


def test_luhn_ok():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("") and not luhn_ok("4111 1111 1111 1111") and not luhn_ok("abc")


# --- valid identifiers: all redacted and counted ------------------------------------------------

ID_TEMPLATES = (
    "患者身份证号{}，于2024年1月15日入院，血糖7.8 mmol/L。",
    "原告的公民身份号码为{}，住北京市朝阳区。",
    "身份证：{}",
    "{}是借款人的证件号码",
    "证件号码 {} 已核验。",
    "被告（身份证号{}）应于2024-01-15前偿还人民币5000000元。",
)


def test_valid_ids_redacted():
    rng = random.Random(1)
    ids = [gen_id(rng) for _ in range(N)] + [gen_id(rng, want_x=True) for _ in range(20)]
    for i, v in enumerate(ids):
        if i % 7 == 3:
            v = v[:17] + v[17].lower()
        assert is_valid_id_card(v)
        assert_redacted(ID_TEMPLATES[i % len(ID_TEMPLATES)], v, "id_card")
    v = ids[0]
    assert_redacted("身份证号：{}", f"{v[:6]} {v[6:14]} {v[14:]}", "id_card")


CARD_TEMPLATES = (
    "请将款项转入账户{}，金额1,234,567.89元。",
    "银行卡号：{}（工商银行）",
    "客户的卡号为{}，交易日期2024-01-15。",
    "还款账号 {} 尾号已核对",
)


def test_valid_cards_redacted():
    rng = random.Random(2)
    for i in range(N):
        d = gen_card(rng, 16 if i % 2 else 19)
        assert luhn_ok(d)
        v = (d, group4(d, " "), group4(d, "-"))[i % 3]
        assert_redacted(CARD_TEMPLATES[i % len(CARD_TEMPLATES)], v, "bank_card")
    for v in ("4111111111111111", "5500 0000 0000 0004", "3782 822463 10005", "2221000000000009"):
        assert_redacted("卡号{}。", v, "bank_card")


MOBILE_TEMPLATES = (
    "联系电话：{}，请于工作日拨打。",
    "手机{}（本人）",
    "如有疑问请致电{}或发送邮件。",
    "患者家属电话 {} ，已告知病情。",
)


def test_valid_mobiles_redacted():
    rng = random.Random(3)
    for i in range(N):
        m = gen_mobile(rng)
        v = (m, f"{m[:3]} {m[3:7]} {m[7:]}", f"{m[:3]}-{m[3:7]}-{m[7:]}", "+86" + m, "+86 " + m,
             "0086" + m, "(+86)" + m, "86" + m)[i % 8]
        assert_redacted(MOBILE_TEMPLATES[i % len(MOBILE_TEMPLATES)], v, "mobile")


def test_full_width_digits():
    assert scrub_text("手机１３８００１３８０００。") == ("手机[手机号]。", Counter(mobile=1))
    assert scrub_text("电话（０１０）６２３４５６７８") == ("电话[电话]", Counter(landline=1))


@pytest.mark.parametrize("v", ["010-62345678", "(021)62345678", "（021）62345678", "0755-8888 6666", "0755 88886666",
                               "010-62345678转123", "0571-87654321-8001", "020 3456789"])
def test_landlines_redacted(v):
    assert_redacted("门诊电话：{}，工作日8:30-17:00。", v, "landline")


@pytest.mark.parametrize("v", ["zhang.san@example.com", "li_si+tag@mail.hospital.cn", "13800138000@163.com", "A1@b-c.org"])
def test_emails_redacted(v):
    assert_redacted("请发送材料至{}，谢谢。", v, "email")


def test_several_kinds_in_one_text():
    text = "患者张三，身份证11010519491231002X，手机13800138000，邮箱zs@example.com，电话010-62345678。"
    out, counts = scrub_text(text)
    assert out == "患者[姓名]，身份证[身份证号]，手机[手机号]，邮箱[邮箱]，电话[电话]。"
    assert counts == Counter(name=1, id_card=1, mobile=1, email=1, landline=1)
    assert scrub_text(out) == (out, Counter())  # idempotent


# --- look-alikes: left exactly as they are -------------------------------------------------------

def test_invalid_ids_untouched():
    rng = random.Random(4)
    for i in range(N):
        v = gen_id(rng)
        wrong = rng.choice([c for c in "0123456789X" if c != v[17]])
        assert not is_valid_id_card(v[:17] + wrong)
        assert_untouched(ID_TEMPLATES[i % len(ID_TEMPLATES)].format(v[:17] + wrong))
    for date in ("19991332", "20230230", "19990000", "21000101", "18991231"):
        for area in AREAS[:4]:
            body = area + date + "123"
            assert_untouched(f"身份证号{body + check_char(body)}，")


def test_invalid_cards_untouched():
    rng = random.Random(5)
    # After a card label or none; after an account label (账户, 账号) a number is redacted without a
    # checksum, because bank account numbers need not be Luhn-valid (test_data_edges.py).
    templates = [t for t in CARD_TEMPLATES if "账" not in t] + ["交易流水 {} 已核对"]
    for i in range(N):
        d = gen_card(rng, 16 if i % 2 else 19)
        bad = d[:-1] + str((int(d[-1]) + 1 + rng.randrange(9)) % 10)
        assert not luhn_ok(bad)
        assert_untouched(templates[i % len(templates)].format((bad, group4(bad, " "), group4(bad, "-"))[i % 3]))
    for i in range(50):  # Luhn-valid but no card prefix
        partial = "9" + "".join(rng.choice("0123456789") for _ in range(14))
        assert_untouched(f"流水号{partial + luhn_digit(partial)}。")


def test_invalid_mobiles_untouched():
    rng = random.Random(6)
    for i in range(N):
        m = gen_mobile(rng)
        v = (m + str(rng.randrange(10)),  # 12 digits
             m[:-1],  # 10 digits
             "12" + m[2:],  # no such second digit
             m[:3] + " " + m[3:7] + " " + m[7:] + " " + "1234")[i % 4]  # part of a longer grouping
        assert_untouched(MOBILE_TEMPLATES[i % len(MOBILE_TEMPLATES)].format(v))


def test_embedded_in_longer_runs_untouched():
    rng = random.Random(7)
    for _ in range(N):
        v, m, c = gen_id(rng), gen_mobile(rng), gen_card(rng, 16)
        for text in (f"编号9{v}", f"编号{v}00", f"订单号2024011{m}123", f"单号{m}5", f"编码00{c}00", f"ID{v}",
                     f"No.A{m}", f"交易号20240115-{m}", f"比例0.{m}"):
            assert_untouched(text)


@pytest.mark.parametrize("text", [
    "判赔人民币5000000元，另付1,234,567.89元。",
    "于2024-01-15及2024年1月15日两次开庭，2024/01/15 08:30:00立案。",
    "依据《民法典》第一千一百六十五条、第1165条。",
    "血糖7.8 mmol/L，白细胞计数10.5×10^9/L，血压135/85 mmHg，体重70kg。",
    "订单号 20240115123456，流水号202401151234567890，邮编100085。",
    "手机138****8000，卡号6222 **** **** 0128，身份证110105********002X，患者张**。",
    "服务热线95588、400-820-8820，急救120。",
    "ISBN 978-7-111-12345-6，版本1.13800138000。",
    "电话010-1234567（号码不以1开头），0000-62345678。",
    "时间段 0830-1730，区间 2024 0115 1234 5678。",
])
def test_ordinary_numbers_untouched(text):
    assert_untouched(text)


# --- labelled names ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("患者张三，男，45岁", "患者[姓名]，男，45岁"),
    ("姓名：李四", "姓名：[姓名]"),
    ("姓名: 王小明", "姓名: [姓名]"),
    ("姓名：张三 性别：男", "姓名：[姓名] 性别：男"),
    ("姓名：张三性别：男", "姓名：[姓名]性别：男"),
    ("原告张三主张被告李四返还借款。", "原告[姓名]主张被告[姓名]返还借款。"),
    ("患者李雷出现发热", "患者[姓名]出现发热"),
    ("患者王小明因发热就诊", "患者[姓名]因发热就诊"),
    ("借款人李四向出借人王五借款", "借款人[姓名]向出借人[姓名]借款"),
    ("原告张三、李四诉被告欧阳娜娜", "原告[姓名]、[姓名]诉被告[姓名]"),
    ("联系人：诸葛亮，电话另行告知", "联系人：[姓名]，电话另行告知"),
    ("法定代表人 刘德华", "法定代表人 [姓名]"),
    ("被申请人赵六未到庭", "被申请人[姓名]未到庭"),
    ("患者：于洋，男", "患者：[姓名]，男"),
    ("被告人孙七认罪", "被告人[姓名]认罪"),
    ("被告人丁应军犯危险驾驶罪", "被告人[姓名]犯危险驾驶罪"),
    ("被告李四应于本判决生效之日起十日内偿还", "被告[姓名]应于本判决生效之日起十日内偿还"),
])
def test_labelled_names(text, expect):
    out, counts = scrub_text(text)
    assert out == expect
    assert counts == Counter(name=expect.count("[姓名]"))


@pytest.mark.parametrize("text", [
    "患者出现发热", "原告主张", "被告认为", "患者于2024年1月15日入院", "患者高热3天", "患者高血压病史10年",
    "原告陈述称", "被告方认为", "原告方提交证据", "被告向原告借款", "患者曾于2020年手术", "客户王女士", "客户李先生",
    "患者张某", "患者张**", "被告：北京某某科技有限公司", "患者男，45岁", "客户满意度调查", "患者康复出院",
    "患者黄疸加重", "借款人付款后", "客户何时可以取款", "患者苏醒后", "患者周一入院", "患者孙子陪同", "患者周边", "患者叶酸缺乏", "申请人民法院强制执行", "张三是医生",  # unlabelled names are out of scope
])
def test_not_names(text):
    assert_untouched(text)


# --- conversations -------------------------------------------------------------------------------

def test_scrub_conversations_round_trip():
    convs = [
        [{"role": "system", "content": "你是医生助手。"},
         {"role": "user", "content": "患者张三，手机13800138000，血糖7.8 mmol/L怎么办？"},
         {"role": "assistant", "content": "请张三本人携身份证11010519491231002X复诊。"}],
        [{"role": "user", "content": "原告李四的卡号6222 0212 3456 7890 128是否需要写进起诉状？"},
         {"role": "assistant", "content": "不需要，联系010-62345678或邮件 law@example.com。", "weight": 1}],
        [],
    ]
    before = copy.deepcopy(convs)
    out, counts = scrub_conversations(convs)
    assert convs == before  # input not mutated
    assert out is not convs and all(a is not b for a, b in zip(out, convs))
    assert out[0][1]["content"] == "患者[姓名]，手机[手机号]，血糖7.8 mmol/L怎么办？"
    assert out[0][2]["content"] == "请张三本人携身份证[身份证号]复诊。"
    assert out[1][0]["content"] == "原告[姓名]的卡号[银行卡号]是否需要写进起诉状？"
    assert out[1][1] == {"role": "assistant", "content": "不需要，联系[电话]或邮件 [邮箱]。", "weight": 1}
    assert out[0][0] == convs[0][0] and out[2] == []
    assert counts == Counter(name=2, mobile=1, id_card=1, bank_card=1, landline=1, email=1)
    per_message = sum((scrub_text(m["content"])[1] for c in convs for m in c), Counter())
    assert counts == per_message
    again, counts2 = scrub_conversations(out)
    assert again == out and counts2 == Counter()
