"""qlora_kit.synth: synthetic finance clause -> JSON pairs (fast; no model, no torch use)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from qlora_kit.data import synth
from qlora_kit.data.synth import SCHEMA_KEYS, generate, parse_chinese_amount, to_chinese_amount, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "recipes" / "data" / "finance.jsonl"
N = 2000


@pytest.fixture(scope="module")
def timed_meta():
    t0 = time.perf_counter()
    meta = synth.generate_with_meta("finance", N, 0)
    return meta, time.perf_counter() - t0


@pytest.fixture(scope="module")
def meta(timed_meta):
    return timed_meta[0]


@pytest.fixture(scope="module")
def rows(meta):
    return [row for row, _ in meta]


@pytest.fixture(scope="module")
def parsed(rows):
    return [(r["question"], json.loads(r["answer"])) for r in rows]


# ---- shape, determinism, speed -------------------------------------------------------------------

def test_n_rows_and_row_shape(rows):
    assert len(rows) == N
    for r in rows:
        assert list(r) == ["question", "answer"]
        assert isinstance(r["question"], str) and isinstance(r["answer"], str)
        instruction, clause = r["question"].split("\n", 1)
        assert "JSON" in instruction and clause and "\n" not in clause
        assert "None" not in clause and "{" not in clause and "}" not in clause


def test_small_n_and_bad_arguments():
    assert generate(n=0) == []
    assert len(generate(n=7, seed=3)) == 7
    assert generate(n=50, seed=5) == generate(n=200, seed=5)[:50]  # a prefix of a longer run
    with pytest.raises(ValueError):
        generate(n=-1)


def test_unknown_domain_names_the_supported_ones():
    with pytest.raises(ValueError) as e:
        generate("medical", n=5)
    assert "finance" in str(e.value) and "medical" in str(e.value)
    assert synth.DOMAINS == ("finance",)


def test_same_seed_same_output_other_seed_different(rows):
    # Full-size sameness is checked byte for byte in another process below.
    assert generate("finance", 300, 0) == rows[:300]
    other = generate("finance", 300, 1)
    assert other != rows[:300]
    assert sum(a == b for a, b in zip(other, rows)) < 3
    assert generate(n=100, seed=2) != generate(n=100, seed=3)


def _digest(rows) -> str:
    return hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()).hexdigest()


def test_byte_identical_across_processes(rows):
    # No dependence on str hashing (set order) or anything else process-specific.
    code = ("import hashlib, json; from qlora_kit.data.synth import generate; rows = generate('finance', 2000, 0); "
            "print(hashlib.sha256(''.join(json.dumps(r, ensure_ascii=False) + '\\n' for r in rows).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(rows)


def test_fast(timed_meta):
    assert timed_meta[1] < 2.0  # ~0.4 s for 2000 rows here; the bound only catches pathologies


def test_questions_unique(rows):
    assert len({r["question"] for r in rows}) >= 0.99 * len(rows)


# ---- the answer schema ---------------------------------------------------------------------------

def _check_answer(text: str) -> dict:
    obj = json.loads(text)
    assert isinstance(obj, dict)
    assert tuple(obj) == SCHEMA_KEYS
    assert json.dumps(obj, ensure_ascii=False) == text  # exactly the canonical one-line form
    return obj


def test_answers_have_exactly_the_schema_in_order(parsed, rows):
    for r in rows:
        _check_answer(r["answer"])


def test_value_types(parsed):
    types = set()
    for _, a in parsed:
        types.add(a["clause_type"])
        assert a["clause_type"] in synth.CLAUSE_TYPES
        p = a["principal"]
        assert p is None or (type(p) is int and p > 0 and p % 10000 == 0)
        assert a["currency"] in (None, "CNY", "USD", "EUR", "HKD")
        assert (p is None) == (a["currency"] is None)
        r = a["interest_rate"]
        assert r is None or (type(r) is float and 0 < r < 20 and round(r, 2) == r)
        for k in ("penalty_rate", "collateral", "guarantor"):
            v = a[k]
            assert v is None or (isinstance(v, str) and 0 < len(v) <= 40), (k, v)
        t = a["term_months"]
        assert t is None or (type(t) is int and 0 < t <= 360)
        assert sum(a[k] is not None for k in SCHEMA_KEYS[1:]) >= 2
    assert types == set(synth.CLAUSE_TYPES)


def test_about_a_third_of_fields_null(parsed):
    nulls = sum(a[k] is None for _, a in parsed for k in SCHEMA_KEYS[1:])
    frac = nulls / (len(parsed) * (len(SCHEMA_KEYS) - 1))
    assert 0.25 < frac < 0.45, frac
    for k in SCHEMA_KEYS[1:]:  # every field is sometimes present and sometimes absent
        present = sum(a[k] is not None for _, a in parsed)
        assert 0.1 * len(parsed) < present < len(parsed), k


def test_maturity_dates_valid(parsed):
    seen = 0
    for _, a in parsed:
        m = a["maturity_date"]
        if m is None:
            continue
        seen += 1
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m)
        d = dt.date.fromisoformat(m)  # raises on 2025-02-30
        assert 2024 <= d.year <= 2035
    assert seen > 300


# ---- every value is derivable from the clause --------------------------------------------------

_NUM = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*(万|亿)?")
_CN_RUN = re.compile(r"[零〇一二两三四五六七八九十百千万亿壹贰叁肆伍陆柒捌玖拾佰仟]+")


def _amounts_in(text: str) -> set[int]:
    """Every amount the text writes, in any notation, read independently of how it was rendered."""
    found = set()
    for m in _NUM.finditer(text):
        v = Decimal(m.group(1).replace(",", "") + (m.group(2) or "")) * {"万": 10 ** 4, "亿": 10 ** 8, None: 1}[m.group(3)]
        if v == v.to_integral_value():
            found.add(int(v))
    for m in _CN_RUN.finditer(text):
        try:
            found.add(parse_chinese_amount(m.group(0)))
        except ValueError:
            pass
    return found


_CURRENCY_WORDS = {"CNY": ("人民币", "¥", "RMB", "CNY"), "USD": ("美元", "USD"), "EUR": ("欧元", "EUR"),
                   "HKD": ("港币", "港元", "HKD")}


def test_principal_and_currency_recoverable_from_clause(parsed):
    for q, a in parsed:
        if a["principal"] is None:
            continue
        assert a["principal"] in _amounts_in(q), q
        assert any(w in q for w in _CURRENCY_WORDS[a["currency"]]), q


def test_render_amount_notations_parse_back():
    rng = random.Random(0)
    seen = set()
    for i in range(3000):
        cur = synth.CURRENCIES[i % 4]
        n = rng.randrange(1, 50_000) * 10 ** rng.choice((4, 5, 7))
        styles = ["wan", "cn", "cnf", "full", "both", None] + (["iso"] if cur != "CNY" else [])
        if n >= 10 ** 8 and n % 10 ** 7 == 0:
            styles.append("yi")
        text = synth.render_amount(rng, n, cur, style=rng.choice(styles))
        seen.add(text)
        assert n in _amounts_in(text), (n, text)
        assert any(w in text for w in _CURRENCY_WORDS[cur]), text
    assert len(seen) > 2500


def test_penalty_verbatim_in_clause(parsed):
    seen = 0
    for q, a in parsed:
        if a["penalty_rate"] is not None:
            seen += 1
            assert a["penalty_rate"] in q, (a["penalty_rate"], q)
    assert seen > 200


def test_interest_rate_stated(parsed):
    for q, a in parsed:
        r = a["interest_rate"]
        if r is None:
            continue
        pcts = [Decimal(x) for x in re.findall(r"(\d+(?:\.\d+)?)%", q)]
        candidates = {float(p) for p in pcts} | {float((p * 12).quantize(Decimal("0.01"))) for p in pcts}
        assert r in candidates, (r, q)


def test_monthly_rates_are_converted(parsed):
    monthly = [(q, a) for q, a in parsed if ("月息" in q or "月利率" in q) and a["interest_rate"] is not None]
    assert monthly
    for q, a in monthly:
        m = Decimal(re.search(r"月(?:息|利率)(?:为)?(\d+(?:\.\d+)?)%", q).group(1))
        assert a["interest_rate"] == float((m * 12).quantize(Decimal("0.01"))), q


def _years(s: str) -> int:
    return int(s) if s.isdigit() else parse_chinese_amount(s)


def test_term_stated(parsed):
    for q, a in parsed:
        t = a["term_months"]
        if t is None:
            continue
        months = {int(x) for x in re.findall(r"(\d+)个月", q)}
        years = {_years(x) * 12 for x in re.findall(r"(\d+|[一二两三四五六七八九十]+)年", q)}
        assert t in months | years, (t, q)


def test_maturity_stated(parsed):
    for q, a in parsed:
        m = a["maturity_date"]
        if m is None:
            continue
        d = dt.date.fromisoformat(m)
        forms = (m, f"{d.year}年{d.month}月{d.day}日", f"{d.day} {synth._ENG_MONTHS[d.month - 1]} {d.year}")
        assert any(f in q for f in forms), (m, q)


def test_term_and_date_range_agree(meta):
    for row, m in meta:
        rec = m["record"]
        if rec["start"] is not None and rec["maturity"] is not None:
            months = (rec["maturity"].year - rec["start"].year) * 12 + rec["maturity"].month - rec["start"].month
            assert months in (rec["term_months"], rec["term_months"] - 1)


def test_guarantor_and_collateral_stated(parsed):
    locations = [c + d for c, d in synth._LOCATIONS]
    for q, a in parsed:
        if a["guarantor"] is not None:
            for name in a["guarantor"].split("、"):
                assert name in q, (name, q)
        c = a["collateral"]
        if c is None:
            continue
        if c == "应收账款转让":
            assert "应收账款" in q and ("转让" in q or "受让" in q), q
        elif c in ("应收账款质押", "存单质押"):
            assert c[:-2] in q and "质押" in q, q
        elif c.endswith("股权质押"):
            assert c[:-2] in q and "质押" in q, q
        else:
            assert c in q or any(c.startswith(loc) and loc in q and c[len(loc):] in q for loc in locations), (c, q)


def test_clause_type_words(parsed):
    words = {"loan": ("借", "贷", "Borrower"), "guarantee": ("保证", "担保", "抵押", "质押"), "lease": ("租",),
             "deposit": ("存",), "bond": ("债券", "票据"), "factoring": ("保理",), "credit_line": ("授信",)}
    for q, a in parsed:
        clause = q.split("\n", 1)[1]
        assert any(w in clause for w in words[a["clause_type"]]), q


# ---- variety ---------------------------------------------------------------------------------------

def test_at_least_12_templates_per_clause_type_and_all_used(meta):
    for t in synth.CLAUSE_TYPES:
        assert len(synth.TEMPLATES[t]) >= 12, t
    used: dict[str, set] = {}
    for _, m in meta:
        used.setdefault(m["record"]["t"], set()).add(m["template"])
    for t in synth.CLAUSE_TYPES:
        assert len(used[t]) >= 12, (t, sorted(used[t]))


def test_notations_vary(parsed):
    qs = [q for q, _ in parsed]
    for marker in ("万元", "亿", "叁", "三", "EUR ", "USD ", "，", "：", "第", "甲方", "月息", "LPR", "-", "年", "个月"):
        assert any(marker in q for q in qs), marker
    assert len({q.split("\n", 1)[0] for q in qs}) >= 20  # instruction phrasings


# ---- Chinese numerals ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, plain, formal", [
    (0, "零", "零"),
    (10, "十", "拾"),
    (15, "十五", "拾伍"),
    (1010, "一千零一十", "壹仟零壹拾"),
    (5_000_000, "五百万", "伍佰万"),
    (30_000_000, "三千万", "叁仟万"),
    (120_000_000, "一亿二千万", "壹亿贰仟万"),
    (105_000_000, "一亿零五百万", "壹亿零伍佰万"),
    (100_150_000, "一亿零一十五万", "壹亿零壹拾伍万"),
    (100_000_001, "一亿零一", "壹亿零壹"),
    (1_000_000_000, "十亿", "拾亿"),
    (450_000_000, "四亿五千万", "肆亿伍仟万"),
    (1_200_000, "一百二十万", "壹佰贰拾万"),
    (850_000, "八十五万", "捌拾伍万"),
])
def test_to_chinese_amount_examples(n, plain, formal):
    assert to_chinese_amount(n) == plain
    assert to_chinese_amount(n, formal=True) == formal
    assert parse_chinese_amount(plain) == n == parse_chinese_amount(formal)


def test_round_trip_over_a_range():
    rng = random.Random(0)
    values = list(range(0, 3001)) + list(range(0, 10 ** 9, 9_999_991))
    values += [rng.randrange(10 ** 12) for _ in range(2000)] + [rng.randrange(1, 10 ** 5) * 10 ** 4 for _ in range(2000)]
    for n in values:
        for formal in (False, True):
            s = to_chinese_amount(n, formal=formal)
            assert parse_chinese_amount(s) == n, (n, s)


def test_parse_lenient_forms_and_errors():
    assert parse_chinese_amount("两百万") == 2_000_000
    assert parse_chinese_amount("壹拾万元整") == 100_000
    assert parse_chinese_amount("三千万元") == 30_000_000
    assert parse_chinese_amount("500万") == 5_000_000
    assert parse_chinese_amount("1.2亿") == 120_000_000
    assert parse_chinese_amount("1,500万") == 15_000_000
    assert parse_chinese_amount("2,500,000") == 2_500_000
    for bad in ("", "元", "abc", "三千万美金", "1.23456万"):
        with pytest.raises(ValueError):
            parse_chinese_amount(bad)
    with pytest.raises(ValueError):
        to_chinese_amount(-1)
    with pytest.raises(ValueError):
        to_chinese_amount(10 ** 12)


def test_bundled_chinese_amounts_parse():
    text = BUNDLED.read_text(encoding="utf-8")
    for phrase, value in (("叁仟万", 30_000_000), ("一亿二千万", 120_000_000), ("拾亿", 1_000_000_000),
                          ("肆亿伍仟万", 450_000_000), ("一亿零五百万", 105_000_000), ("捌拾伍万", 850_000),
                          ("壹佰贰拾万", 1_200_000), ("十五亿", 1_500_000_000)):
        assert phrase in text
        assert parse_chinese_amount(phrase) == value


# ---- writing -----------------------------------------------------------------------------------------

def test_write_jsonl_round_trip(tmp_path, rows):
    out = tmp_path / "contracts.jsonl"
    write_jsonl(out, rows[:100])
    raw = out.read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8
    assert "\\u" not in text and "借" in text  # ensure_ascii=False
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 101
    assert [json.loads(line) for line in lines[:-1]] == rows[:100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contracts.jsonl"]  # no temp file left


def test_write_jsonl_is_atomic(tmp_path, rows):
    out = tmp_path / "contracts.jsonl"
    write_jsonl(str(out), rows[:3])
    before = out.read_bytes()

    def broken():
        yield rows[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(out, broken())
    assert out.read_bytes() == before  # the old file is untouched, never half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contracts.jsonl"]
    write_jsonl(out, rows[3:5])  # replacing works
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == rows[3:5]


def test_write_jsonl_creates_folder_and_is_deterministic(tmp_path, rows):
    a, b = tmp_path / "x" / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, generate(n=300, seed=4))
    write_jsonl(b, generate(n=300, seed=4))
    assert a.read_bytes() == b.read_bytes()


# ---- the bundled examples match the same schema --------------------------------------------------

def test_bundled_examples_have_the_same_schema():
    lines = [line for line in BUNDLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 50
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"question", "answer"}
        obj = json.loads(row["answer"])
        assert tuple(obj) == SCHEMA_KEYS
        assert obj["clause_type"] in synth.CLAUSE_TYPES
        assert obj["currency"] in (None, "CNY", "USD", "EUR", "HKD")
        if obj["penalty_rate"] is not None:
            assert obj["penalty_rate"] in row["question"]
        if obj["maturity_date"] is not None:
            dt.date.fromisoformat(obj["maturity_date"])
