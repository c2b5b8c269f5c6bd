"""qlora_kit.metrics: hand-checked examples (expected values worked out in the comments)."""

from __future__ import annotations

import math
import random

import pytest

from qlora_kit.eval import generic as M
from qlora_kit.eval.metrics import (aggregate, bleu, citation_scores, citations, cn_to_int, contradicts, exact_match,
                               json_scores, key_terms, normalize, rouge_l, score, term_recall)

# --- exact match ----------------------------------------------------------------------------------


def test_normalize_and_exact_match():
    assert normalize("  依据  第四十六条。 ") == "依据 第四十六条"
    assert normalize("ＡＢＣ！") == "ABC"  # NFKC: full-width letters and ！ -> ASCII, then dropped
    assert normalize("好的…") == "好的"  # … -> ... under NFKC, all dropped
    assert normalize("第一条（二）") == "第一条(二)"  # NFKC folds （）; the closing bracket is content, kept
    assert exact_match("经济补偿。", "经济补偿") == 1.0
    assert exact_match("经济 \n 补偿！", "经济 补偿") == 1.0
    assert exact_match("经济补偿金", "经济补偿") == 0.0
    assert exact_match("", "") == 1.0


# --- ROUGE-L --------------------------------------------------------------------------------------


def _lcs_dp(a, b):
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 20)))
        b = "".join(rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 20)))
        assert M._lcs_len(a, b) == _lcs_dp(a, b), (a, b)


def test_rouge_l_hand_checked():
    # LCS("依据第四十六条", "依据第四十七条") = 依据第四十条 = 6; P = R = 6/7 -> F1 = 6/7
    assert rouge_l("依据第四十六条", "依据第四十七条") == pytest.approx(6 / 7)
    # LCS = 2 (依据); P = 2/2 = 1, R = 2/7 -> F1 = 2 * (2/7) / (1 + 2/7) = 4/9
    assert rouge_l("依据", "依据第四十六条") == pytest.approx(4 / 9)
    # whitespace removed first: identical characters
    assert rouge_l("依 据 第 四 十 六 条", "依据第四十六条") == 1.0
    assert rouge_l("甲乙", "丙丁") == 0.0
    assert rouge_l("", "依据") == 0.0
    assert rouge_l("依据", "   ") == 0.0


def test_rouge_l_long_text_is_fast():
    a = "用人单位应当支付经济补偿" * 300  # 3600 characters each side
    b = "劳动者可以要求支付经济补偿" * 300
    assert 0.0 < rouge_l(a, b) < 1.0


# --- BLEU -----------------------------------------------------------------------------------------


def test_bleu_identical_and_disjoint():
    assert bleu("依据第四十六条支付经济补偿", "依据第四十六条支付经济补偿") == pytest.approx(1.0)
    assert bleu("甲乙丙丁", "戊己庚辛") < 0.05  # no shared character: unigram precision 0 -> 0.0
    assert bleu("甲乙丙丁", "戊己庚辛") == 0.0
    assert bleu("", "甲") == 0.0
    assert bleu("甲", "") == 0.0


def test_bleu_hand_checked_smoothing():
    # pred 甲乙丙丁, ref 甲乙丙戊: c = r = 4, BP = 1
    # p1 = 3/4; p2 = (2+1)/(3+1) = 3/4 (甲乙, 乙丙 match); p3 = (1+1)/(2+1) = 2/3; p4 = (0+1)/(1+1) = 1/2
    # BLEU = (3/4 * 3/4 * 2/3 * 1/2) ** (1/4) = (3/16) ** 0.25
    assert bleu("甲乙丙丁", "甲乙丙戊") == pytest.approx((3 / 16) ** 0.25)
    # clipping: pred 的的的的 vs ref 的: p1 = 1/4 (clipped to 1), p2 = 1/4, p3 = 1/3, p4 = 1/2, BP = 1 (c > r)
    assert bleu("的的的的", "的") == pytest.approx((1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25)


def test_bleu_brevity_penalty():
    # pred is ref minus its last char: every n-gram matches (p_n = 1), c = 6, r = 7 -> BP = exp(1 - 7/6)
    assert bleu("依据第四十六", "依据第四十六条") == pytest.approx(math.exp(1 - 7 / 6))
    # longer than ref: no penalty, only precision loss
    assert bleu("依据第四十六条", "依据第四十六") < 1.0
    # max_n = 1: plain clipped unigram precision * BP
    assert bleu("甲乙", "甲丙", max_n=1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bleu("甲", "甲", max_n=0)


# --- Chinese numerals -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("零", 0), ("〇", 0), ("一", 1), ("二", 2), ("两", 2), ("十", 10), ("十一", 11), ("十九", 19),
    ("二十", 20), ("二十一", 21), ("四十六", 46), ("一百", 100), ("一百零八", 108), ("一百一十", 110),
    ("两百", 200), ("一千零一", 1001), ("一千零八十", 1080), ("一千一百六十五", 1165), ("一万", 10000),
    ("十万", 100000), ("一万零八", 10008), ("两万三", 23000), ("一百五", 150), ("三千二", 3200),
    ("一亿", 10 ** 8), ("一亿零五百万", 105_000_000), ("二〇二三", 2023), ("壹仟壹佰陆拾伍", 1165),
    ("46", 46), ("１１６５", 1165), (" 四十六 ", 46),
])
def test_cn_to_int(text, value):
    assert cn_to_int(text) == value


@pytest.mark.parametrize("text", ["", "第十条", "第四十六条", "abc", "十十", "百", "一二十", "一百零", "3万", "十点五", "四十六条"])
def test_cn_to_int_rejects(text):
    assert cn_to_int(text) is None


# --- legal citations ------------------------------------------------------------------------------


def test_citations_chinese_and_arabic_numerals():
    assert citations("依据《劳动合同法》第四十六条") == {("劳动合同法", 46)}
    assert citations("《民法典》第1165条规定了过错责任") == {("民法典", 1165)}
    assert citations("《民法典》第一千一百六十五条") == {("民法典", 1165)}
    assert citations("《民法典》第１１６５条") == {("民法典", 1165)}  # full-width digits


def test_citations_normalise_law_name():
    assert citations("《中华人民共和国劳动合同法》第四十六条") == citations("《劳动合同法》第四十六条")
    assert citations("《中华人民共和国公司法（2018修正）》第二十条") == {("公司法", 20)}
    assert citations("《劳动合同法》的第四十七条") == {("劳动合同法", 47)}


def test_citations_kuan_suffix_and_lists():
    assert citations("《劳动合同法》第四十六条第一款") == {("劳动合同法", 46)}
    assert citations("《劳动合同法》第四十六条、第四十七条") == {("劳动合同法", 46), ("劳动合同法", 47)}
    assert citations("《劳动合同法》第三十八、三十九条") == {("劳动合同法", 38), ("劳动合同法", 39)}
    assert citations("《民法典》第一千一百六十五条第一款、第二款以及第一千一百六十六条") == {("民法典", 1165), ("民法典", 1166)}
    assert citations("《公司法》第二十条至第二十二条") == {("公司法", 20), ("公司法", 21), ("公司法", 22)}
    # two laws: each article stays with its own law
    assert citations("《劳动合同法》第四十六条和《劳动法》第四十四条") == {("劳动合同法", 46), ("劳动法", 44)}
    # a comma followed by prose is not a list
    assert citations("《劳动合同法》第四十七条，一年支付一个月工资") == {("劳动合同法", 47)}


def test_citations_without_brackets_and_non_citations():
    assert citations("根据劳动合同法第三十九条和第四十条") == {("劳动合同法", 39), ("劳动合同法", 40)}
    assert citations("中华人民共和国刑法第二百三十四条") == {("刑法", 234)}
    assert citations("按消费者权益保护法第五十五条，可以要求三倍赔偿") == {("消费者权益保护法", 55)}
    assert citations("《劳动合同法实施条例》第十条") == {("劳动合同法实施条例", 10)}  # a different law
    assert citations("依照本法第十条") == set()  # no law named
    assert citations("第十条规定") == set()
    assert citations("劳动合同法规定了经济补偿") == set()


def test_citation_scores():
    ref = "依据《劳动合同法》第四十六条、第四十七条，应支付经济补偿。"
    # pred: 46 right, 48 wrong -> tp 1; P = 1/2, R = 1/2, F1 = 1/2
    s = citation_scores("《中华人民共和国劳动合同法》第四十六条、第四十八条", ref)
    assert s == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "exact": 0.0}
    # same citations written differently -> exact
    s = citation_scores("劳动合同法第46条和第47条", ref)
    assert s == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "exact": 1.0}
    # one of two, nothing wrong: P = 1, R = 1/2, F1 = 2/3
    s = citation_scores("《劳动合同法》第四十七条第二款", ref)
    assert s["precision"] == 1.0 and s["recall"] == 0.5 and s["f1"] == pytest.approx(2 / 3) and s["exact"] == 0.0
    assert citation_scores("没有引用", ref) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact": 0.0}
    assert citation_scores("《劳动合同法》第四十六条", "应当协商解决") == {
        "precision": None, "recall": None, "f1": None, "exact": None}


# --- finance JSON ---------------------------------------------------------------------------------

REF_JSON = '{"company": "华为", "amount": 5000000, "currency": "CNY", "approved": null}'


def test_json_reordered_keys_and_numeric_strings():
    pred = '{"currency": "CNY", "approved": null, "amount": "5000000", "company": " 华为 "}'
    assert json_scores(pred, REF_JSON) == {
        "valid": 1, "field_accuracy": 1.0, "fields": {"company": 1, "amount": 1, "currency": 1, "approved": 1}}
    pred = '{"company": "华为", "amount": 5000000.0, "currency": "ＣＮＹ", "approved": null}'  # NFKC
    assert json_scores(pred, REF_JSON)["field_accuracy"] == 1.0


def test_json_in_prose_and_fence():
    pred = '结果如下：\n```json\n{"company": "华为", "amount": 5000000, "currency": "USD"}\n```\n请核对。'
    s = json_scores(pred, REF_JSON)
    # company, amount right; currency wrong; approved missing -> 2/4
    assert s["valid"] == 1 and s["field_accuracy"] == 0.5
    assert s["fields"] == {"company": 1, "amount": 1, "currency": 0, "approved": 0}
    pred = '抽取结果为 {"company": "华为", "amount": 5000000, "currency": "CNY", "approved": null}，以上。'
    assert json_scores(pred, REF_JSON)["field_accuracy"] == 1.0
    # braces inside strings do not confuse the extraction
    assert json_scores('答：{"note": "a}b", "x": 1}', '{"note": "a}b", "x": 1}')["field_accuracy"] == 1.0


def test_json_invalid_missing_and_null():
    s = json_scores('{"company": "华为", "amount": 5000000,', REF_JSON)  # truncated
    assert s["valid"] == 0 and s["field_accuracy"] == 0.0
    assert json_scores("无法回答", REF_JSON)["valid"] == 0
    # "null" the string is not null; missing key is wrong: 3/4
    s = json_scores('{"company": "华为", "amount": 5000000, "currency": "CNY", "approved": "null"}', REF_JSON)
    assert s["field_accuracy"] == 0.75 and s["fields"]["approved"] == 0
    s = json_scores('{"company": "华为", "currency": "CNY", "approved": null}', REF_JSON)
    assert s["field_accuracy"] == 0.75 and s["fields"]["amount"] == 0
    # a number does not match a different number, nor a bool
    assert json_scores('{"a": 5000001}', '{"a": 5000000}')["field_accuracy"] == 0.0
    assert json_scores('{"a": true}', '{"a": 1}')["field_accuracy"] == 0.0
    # ref that is not JSON: validity of pred only
    assert json_scores('{"a": 1}', "不是 JSON") == {"valid": 1, "field_accuracy": None, "fields": {}}
    # a list is not an object
    assert json_scores("[1, 2]", REF_JSON)["valid"] == 0


# --- key terms ------------------------------------------------------------------------------------

IND_REF = "用兆欧表测量电机绕组的绝缘电阻，应不低于0.5 MΩ；额定电压380 V。振动按ISO 10816评价，接地按GB/T 1234执行。"


def test_key_terms():
    terms = key_terms(IND_REF, ["绝缘电阻", "兆欧表", "变频器"])
    assert terms == ["兆欧表", "绝缘电阻", "0.5 MΩ", "380 V", "ISO 10816", "GB/T 1234"]  # 变频器 not in ref
    med = "空腹血糖7.8 mmol/L，糖化血红蛋白占19.5%，随访六个月，服药第三天复查。"
    assert key_terms(med) == ["7.8 mmol/L", "19.5%", "六个月"]  # 第三天 is an ordinal, not a quantity
    assert key_terms("参考范围3.9-6.1 mmol/L") == ["3.9-6.1 mmol/L"]
    assert key_terms("0.5 MΩ，复测仍为0.5MΩ") == ["0.5 MΩ"]  # deduplicated
    assert key_terms("请咨询医生。") == []


def test_term_recall():
    g = ["绝缘电阻", "兆欧表"]
    # 6 terms; pred has 绝缘电阻, 0.5MΩ (no space), 380V, iso 10816 (case) -> 4/6
    pred = "绝缘电阻不低于0.5MΩ，电压380V，参考iso 10816。"
    assert term_recall(pred, IND_REF, g) == pytest.approx(4 / 6)
    # numbers in another writing: 六个月 == 6个月, 百分之二十 == 20%, 5万元 == 50000元
    assert term_recall("6个月，20%，50000元", "六个月，百分之二十，5万元") == 1.0
    # no partial numbers: 16个月 is not 六个月, 10.5 MΩ is not 0.5 MΩ, ISO 108160 is not ISO 10816
    assert term_recall("十六个月，10.5 MΩ，ISO 108160", "六个月，0.5 MΩ，ISO 10816") == 0.0
    assert term_recall("随便", "请咨询医生。") is None


# --- contradictions -------------------------------------------------------------------------------


@pytest.mark.parametrize("pred,ref", [
    ("需要使用抗生素治疗。", "一般不需要使用抗生素。"),
    ("可以直接启动电机。", "绝缘电阻不合格时不能直接启动电机。"),
    ("可以带电作业。", "严禁带电作业。"),
    ("允许在车间内吸烟。", "禁止在车间内吸烟。"),
    ("建议空腹服用。", "不建议空腹服用。"),
    ("应当立即停药。", "不应立即停药。"),
    ("该药有明显副作用。", "该药没有明显副作用。"),
    ("无需复查血常规。", "需要复查血常规。"),  # the other direction: pred negative, ref positive
    ("绝缘电阻不低于1 MΩ即可。", "电机绝缘电阻应不低于0.5 MΩ，否则不得启动。"),
    ("试用期不超过3个月。", "试用期最长不得超过六个月。"),
    ("空腹血糖超过6.1 mmol/L即可诊断糖尿病。", "空腹血糖≥7.0 mmol/L可诊断糖尿病。"),
])
def test_contradicts_positive(pred, ref):
    assert contradicts(pred, ref) is True


@pytest.mark.parametrize("pred,ref", [
    ("无需使用抗生素。", "一般不需要使用抗生素。"),  # agreeing paraphrase
    ("一般不需要抗生素治疗，多喝水。", "不需要使用抗生素。"),
    ("只有合并细菌感染时才需要使用抗生素。", "一般不需要使用抗生素。"),  # condition
    ("如果需要使用抗生素，请遵医嘱。", "不需要使用抗生素。"),
    ("是否需要使用抗生素要看化验结果。", "不需要使用抗生素。"),
    ("可能需要使用抗生素。", "不需要使用抗生素。"),  # hedge: unsure -> False
    ("需要多休息，不需要使用抗生素。", "不需要使用抗生素。"),
    ("相应使用降压药。", "不应使用降压药。"),  # 相应 is not 应
    ("绝缘电阻不低于0.5MΩ才能启动。", "电机绝缘电阻应不低于0.5 MΩ，否则不得启动。"),
    ("空腹血糖≥7.0 mmol/L，餐后血糖≥11.1 mmol/L。", "空腹血糖≥7.0 mmol/L可诊断糖尿病。"),
    ("试用期最长6个月。", "试用期不得超过六个月。"),
    ("电压为380 V。", "病程约7天。"),  # different units
    ("患者需要休息3天。", "术后7天拆线。"),  # same unit, unrelated sentences
    ("建议多喝水。", "不建议剧烈运动。"),  # different claims
    ("", "不需要使用抗生素。"),
])
def test_contradicts_negative(pred, ref):
    assert contradicts(pred, ref) is False


# --- score / aggregate ----------------------------------------------------------------------------


def test_score_generic_and_tasks():
    s = score("generic", "依据第四十六条", "依据第四十七条")
    assert set(s) == {"exact_match", "rouge_l", "bleu"}
    assert s["rouge_l"] == pytest.approx(6 / 7) and s["exact_match"] == 0.0

    s = score("legal", "依据《劳动合同法》第四十六条", "依据《劳动合同法》第四十六条、第四十七条")
    assert s["citation_f1"] == pytest.approx(2 / 3) and s["citation_exact"] == 0.0  # P 1, R 1/2
    s = score("legal", "协商", "应当协商解决")
    assert s["citation_f1"] is None and s["citation_exact"] is None

    s = score("finance", '```json\n{"amount": "5000000"}\n```', '{"amount": 5000000, "currency": "CNY"}')
    assert s["json_valid"] == 1.0 and s["field_accuracy"] == 0.5

    for task in ("medical", "industrial"):
        s = score(task, "需要使用抗生素", "不需要使用抗生素，疗程六个月", ["抗生素"])
        assert s["term_recall"] == 0.5 and s["contradiction"] == 1.0  # 抗生素 found, 六个月 not
        assert set(s) == {"exact_match", "rouge_l", "bleu", "term_recall", "contradiction"}
    s = score("medical", "多喝水", "请多喝水")
    assert s["term_recall"] is None and s["contradiction"] == 0.0

    with pytest.raises(ValueError):
        score("chemistry", "a", "b")


def test_aggregate_ignores_none():
    rows = [{"rouge_l": 1.0, "citation_f1": None, "exact_match": 1.0},
            {"rouge_l": 0.5, "citation_f1": 0.5, "exact_match": 0.0},
            {"rouge_l": 0.0, "citation_f1": None, "exact_match": 0.0, "new_tokens": 12}]
    agg = aggregate(rows)
    assert agg["n"] == 3
    assert agg["rouge_l"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert agg["citation_f1"] == 0.5  # only the one non-None value
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["new_tokens"] == 12
    assert aggregate([{"x": None}, {"x": None}]) == {"x": None, "n": 2}
    assert aggregate([]) == {"n": 0}
