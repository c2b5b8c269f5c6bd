"""Data edge cases a user meets through `qlora-kit data check`: spreadsheet formulas, card and
account numbers behind a label, and multi-turn conversations with an empty answer."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import zipfile
from collections import Counter

import pytest

from qlora_kit import data
from qlora_kit.errors import UserError
from qlora_kit.data.pii import PLACEHOLDER, is_valid_bank_card, luhn_ok, scrub_text

from conftest import ROOT
from test_pii import luhn_digit

FIX = "open the file in Excel/LibreOffice and save it, or paste values"


def cli(args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "QLORA_KIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    flat = " ".join(r.stderr.split())  # rich wraps long lines
    for n in needles:
        assert " ".join(n.split()) in flat, (n, r.stderr)


# --- XLSX formulas --------------------------------------------------------------------------------


def _workbook(path, rows):
    """A real workbook written by openpyxl: formulas ("=...") are stored without a cached value."""
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.title = "Sheet1"  # Excel's name for it
    for row in rows:
        wb.active.append(row)
    wb.save(path)
    return path


def _set_cells(path, cells: dict[str, str]):
    """Rewrite cells in the sheet XML, as Excel or LibreOffice would have saved them."""
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    xml = parts["xl/worksheets/sheet1.xml"].decode()
    for ref, cell in cells.items():
        xml, n = re.subn(rf'<c r="{ref}"[ >].*?</c>', cell, xml, count=1)
        assert n == 1, ref
    parts["xl/worksheets/sheet1.xml"] = xml.encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in parts.items():
            z.writestr(n, b)


def test_xlsx_formula_without_cached_value_is_named_not_dropped(tmp_path, cache):
    p = _workbook(tmp_path / "answers.xlsx", [
        ["question", "answer"],
        ["试用期最长多久？", "最长六个月。"],
        ["加班费怎么算？", '=A2&"（见第四十四条）"'],  # B3: a formula, never calculated
        ["=A2", "=B2"],  # a row of formulas only: not a blank row
    ])
    r = cli(["data", "check", str(p)], cache)
    _user_error(r, f"{p}:3: Sheet1!B3 is a formula with no cached value; {FIX}", f"{p}:4: Sheet1!A4 is a formula")
    r = cli(["data", "check", str(p), "--skip-bad", "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [b["where"] for b in rep["bad_rows"]] == [f"{p}:3", f"{p}:4"] and rep["split"]["train"] == 1
    assert rep["split"]["eval"] == 0
    assert rep["dropped"] == []  # never counted as an empty answer


def test_xlsx_cached_formula_values_are_used(tmp_path, cache):
    p = _workbook(tmp_path / "cached.xlsx", [
        ["question", "answer", "备注"],
        ["试用期最长多久？", "=A2", "=C1"],
        ["赔偿金几倍？", "=1+1", "x"],
        ["空结果？", '=""', "x"],
        ["查表失败？", "=VLOOKUP(A5,Sheet2!A:B,2,0)", "x"],
        ["备注列的公式不影响训练？", "不影响。", "=NOW()"],  # no cached value, but a column no one maps
    ])
    _set_cells(p, {
        "B2": '<c r="B2" t="str"><f>A2&amp;"x"</f><v>最长六个月（缓存值）。</v></c>',
        "B3": '<c r="B3"><f>1+1</f><v>2</v></c>',
        "B4": '<c r="B4" t="str"><f>""</f><v></v></c>',  # Excel's cached empty string: a real empty answer
        "B5": '<c r="B5" t="e"><f>VLOOKUP(A5,Sheet2!A:B,2,0)</f><v>#N/A</v></c>',
    })
    ds = data.load(p, skip_bad=True)
    assert [c[1]["content"] for c in ds.conversations] == ["最长六个月（缓存值）。", "2", "不影响。"]
    assert ds.dropped == [(f"{p}:4", "empty answer")]
    assert ds.bad == [(f"{p}:5", "Sheet1!B5 holds the Excel error #N/A (its formula failed); "
                                 "fix the formula or type the value")]
    r = cli(["data", "check", str(p)], cache)
    _user_error(r, f"{p}:5: Sheet1!B5 holds the Excel error #N/A")
    _set_cells(p, {"B5": '<c r="B5" t="str"><f>VLOOKUP(A5,Sheet2!A:B,2,0)</f><v>查到了。</v></c>'})
    r = cli(["data", "check", str(p), "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["rows_read"] == 5 and rep["split"]["train"] + rep["split"]["eval"] == 4 and rep["bad_rows"] == []
    assert rep["dropped"] == [{"where": f"{p}:4", "reason": "empty answer"}]


def test_xlsx_placeholder_zero_of_an_uncalculated_workbook(tmp_path, cache):
    # XlsxWriter stores 0 as every formula's result and asks Excel to recalculate on opening
    # (fullCalcOnLoad, which openpyxl sets too): that 0 is not an answer.
    p = _workbook(tmp_path / "xlsxwriter.xlsx", [["question", "answer"], ["问", "答"], ["问二", "=A3"]])
    _set_cells(p, {"B3": '<c r="B3"><f>A3</f><v>0</v></c>'})
    with zipfile.ZipFile(p) as z:
        assert 'fullCalcOnLoad="1"' in z.read("xl/workbook.xml").decode()
    r = cli(["data", "check", str(p)], cache)
    _user_error(r, f"{p}:3: Sheet1!B3 is a formula whose result was never calculated")


def test_xlsx_damaged_sheet_is_a_clear_error(tmp_path):
    p = _workbook(tmp_path / "broken.xlsx", [["question", "answer"], ["问", "答"]])
    _set_cells(p, {"B2": '<c r="B2"><v>答</c>'})  # malformed XML inside a valid archive
    with pytest.raises(UserError, match=r"sheet 'Sheet1' is damaged \(ParseError\)"):
        data.load(p)


# --- labelled card and account numbers ------------------------------------------------------------

LABELS = ("银行卡：{}", "卡号 {}", "银行卡号：{}。", "账号：{}", "账户{}，", "开户账号 {} 已核对",
          "Card No. {}", "card number: {}", "ACCOUNT NO.{}", "Account No.： {}")
ACCOUNT_LABELS = ("账号：{}", "账户{}，", "开户账号 {} 已核对", "ACCOUNT NO.{}", "Account No.： {}")


def _luhn_19(rng: random.Random) -> str:
    """A Luhn-valid 19-digit number with an arbitrary prefix (not only card schemes)."""
    partial = str(rng.randrange(1, 10)) + "".join(rng.choice("0123456789") for _ in range(17))
    return partial + luhn_digit(partial)


def _groups(d: str, i: int) -> str:
    sep = ("", " ", "-")[i % 3]
    return sep.join(d[k : k + 4] for k in range(0, len(d), 4)) if sep else d


def test_labelled_numbers_redacted_whatever_their_prefix():
    rng = random.Random(14)
    numbers = [_luhn_19(rng) for _ in range(40)]
    assert all(luhn_ok(d) for d in numbers)
    unknown_prefix = sum(not is_valid_bank_card(d) for d in numbers)
    assert unknown_prefix >= 20  # most of them: what the scheme table alone left in clear
    for i, d in enumerate(numbers):
        template = LABELS[i % len(LABELS)]
        out, counts = scrub_text(template.format(_groups(d, i)))
        assert out == template.format(PLACEHOLDER["bank_card"]) and counts == Counter(bank_card=1), (template, d)


def test_labelled_number_with_a_wrong_check_digit():
    """After a card label a number must pass Luhn, as every payment card does; after an account
    label (账号, 账户, account no.) it need not: Chinese bank account numbers are often not Luhn."""
    rng = random.Random(15)
    for i in range(40):
        d = _luhn_19(rng)
        bad = d[:-1] + str((int(d[-1]) + 1 + rng.randrange(9)) % 10)
        assert not luhn_ok(bad)
        template = LABELS[i % len(LABELS)]
        out, counts = scrub_text(template.format(_groups(bad, i)))
        if template in ACCOUNT_LABELS:
            assert out == template.format(PLACEHOLDER["bank_card"]), template
        else:
            assert (out, counts) == (template.format(_groups(bad, i)), Counter()), template


@pytest.mark.parametrize("text", [
    "订单号 {}，请核对。", "流水号{}。", "编号 {} 已登记", "快递单号：{}",
])
def test_unlabelled_unknown_prefix_numbers_keep_todays_behaviour(text):
    rng = random.Random(16)
    for _ in range(40):
        d = _luhn_19(rng)
        out, _ = scrub_text(text.format(d))
        assert (out == text.format(d)) == (not is_valid_bank_card(d)), d


@pytest.mark.parametrize("text", [
    "账户余额 1000 元", "账号 138 0013 8000 已冻结",  # too short for an account: the phone is found as one
    "卡号6222 **** **** 0128", "discard no. 12345 678901 2345", "卡号 2024 年 1 月办理",
])
def test_labels_without_an_account_number(text):
    out, counts = scrub_text(text)
    assert set(counts) <= {"mobile"} and PLACEHOLDER["bank_card"] not in out


def test_labelled_number_stops_at_the_next_number():
    d = "9" + "1" * 17
    d += luhn_digit(d)
    assert scrub_text(f"卡号 {d} 1000元") == ("卡号 [银行卡号] 1000元", Counter(bank_card=1))


def test_cli_scrub_redacts_labelled_numbers(tmp_path, cache):
    rng = random.Random(14)
    numbers = [_luhn_19(rng) for _ in range(40)]
    rows = [{"question": f"我的{LABELS[i % len(LABELS)].format(_groups(d, i))}，为什么转账失败？",
             "answer": f"第{i}条：请核对户名与开户行。"} for i, d in enumerate(numbers)]
    p = tmp_path / "bank.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    r = cli(["data", "check", str(p), "--scrub-pii", "--json"], cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pii_redacted"] == {"bank_card": 40}
    out = tmp_path / "clean.jsonl"
    r = cli(["data", "scrub", str(p), "-o", str(out)], cache)
    assert r.returncode == 0, r.stderr
    text = re.sub(r"[ -]", "", out.read_text(encoding="utf-8"))
    assert not any(d in text for d in numbers) and text.count("[银行卡号]") == 40


# --- empty assistant turns ------------------------------------------------------------------------


def _conv(key: str, answers: list[str]) -> dict:
    role, user, bot, text = ("role", "user", "assistant", "content") if key == "messages" else ("from", "human", "gpt", "value")
    turns = [{role: "system", text: "你是律师。"}]
    for i, a in enumerate(answers):
        turns += [{role: user, text: f"问题{i}"}, {role: bot, text: a}]
    return {key: turns}


def _write(path, rows, as_array: bool):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n" if as_array else "\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("key", ["messages", "conversations"])
@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json"])
def test_empty_assistant_turn_is_reported(tmp_path, cache, key, as_array):
    rows = [_conv(key, ["答一", "答二"]), _conv(key, ["答一", "  ", "答三"]), _conv(key, ["答甲", "答乙"]),
            _conv(key, [""])]  # no answer at all: dropped as "empty answer", as a Q/A row is
    p = _write(tmp_path / ("d.json" if as_array else "d.jsonl"), rows, as_array)
    line = 3 if as_array else 2  # the '[' takes line 1
    r = cli(["data", "check", str(p)], cache)
    _user_error(r, f"{p}:{line}: turn 5 ({key}[4]) is an empty assistant turn; fill in the answer")
    r = cli(["data", "check", str(p), "--skip-bad", "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [b["where"] for b in rep["bad_rows"]] == [f"{p}:{line}"]
    assert rep["dropped"] == [{"where": f"{p}:{line + 2}", "reason": "empty answer"}]
    assert rep["split"]["train"] + rep["split"]["eval"] == 2


def test_empty_answer_in_dialogue_text_and_alpaca_history(tmp_path):
    p = tmp_path / "dialogues.txt"
    p.write_text("用户：试用期多久？\n律师：最长六个月。\n\n用户：加班费？\n律师：\n用户：还有呢？\n律师：看合同。\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(p))}:4: turn 2 is an empty assistant turn"):
        data.load(p)
    rows = [{"instruction": "q3", "output": "a3", "history": [["q1", "a1"], ["q2", " "]]},
            {"instruction": "q2", "output": "", "history": [["q1", "a1"]]},
            {"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}]
    p = _write(tmp_path / "alpaca.jsonl", rows, as_array=False)
    ds = data.load(p, skip_bad=True)
    assert [w for w, _ in ds.bad] == [f"{p}:1", f"{p}:2"]
    assert ds.bad[0][1].startswith("history[1]'s answer is an empty assistant turn")
    assert ds.bad[1][1].startswith("output is an empty assistant turn")
