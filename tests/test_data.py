"""Bring your own data: every format and encoding a domain expert has, read or refused clearly."""

from __future__ import annotations

import json

import pytest

from qlora_kit import data
from qlora_kit.data import dedup
from qlora_kit.errors import UserError

from conftest import SHARED

D = SHARED / "data"


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def _msgs(conv):
    return [(m["role"], m["content"]) for m in conv]


# --- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,expect",
    [
        ({"question": "Q", "answer": "A"}, [("user", "Q"), ("assistant", "A")]),
        ({"问题": "问", "回答": "答"}, [("user", "问"), ("assistant", "答")]),
        ({"问": "问", "答": "答"}, [("user", "问"), ("assistant", "答")]),
        ({"Ask": "q", "Answer": "a"}, [("user", "q"), ("assistant", "a")]),
        ({"instruction": "Do", "input": "this", "output": "done"}, [("user", "Do\n\nthis"), ("assistant", "done")]),
        ({"instruction": "Do", "response": "ok"}, [("user", "Do"), ("assistant", "ok")]),
        ({"prompt": "P", "completion": "C"}, [("user", "P"), ("assistant", "C")]),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
         [("system", "S"), ("user", "U"), ("assistant", "A")]),
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
         [("system", "S"), ("user", "U"), ("assistant", "A")]),
    ],
)
def test_layouts(tmp_path, row, expect):
    ds = data.load(_jsonl(tmp_path, [row]))
    assert _msgs(ds.conversations[0]) == expect


def test_alpaca_with_system_and_history(tmp_path):
    row = {"system": "S", "history": [["q1", "a1"]], "instruction": "q2", "input": "", "output": "a2"}
    ds = data.load(_jsonl(tmp_path, [row]))
    assert _msgs(ds.conversations[0]) == [("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


def test_system_prompt_added_only_when_missing(tmp_path):
    p = _jsonl(tmp_path, [{"question": "Q", "answer": "A"},
                          {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}])
    ds = data.load(p, system_prompt="SYS")
    assert ds.conversations[0][0] == {"role": "system", "content": "SYS"}
    assert ds.conversations[1][0]["content"] == "own"


def test_explicit_mapping_wins_and_missing_column_is_named(tmp_path):
    p = _jsonl(tmp_path, [{"question": "wrong", "answer": "wrong", "ask": "right q", "reply": "right a"}])
    ds = data.load(p, columns=data.parse_columns("question=ask,answer=reply"))
    assert _msgs(ds.conversations[0]) == [("user", "right q"), ("assistant", "right a")]
    with pytest.raises(UserError, match=r"--columns answer=antwort: no column 'antwort'") as e:
        data.load(p, columns={"answer": "antwort"})
    assert "ask" in e.value.hint
    with pytest.raises(UserError, match="unknown field 'frage'"):
        data.parse_columns("frage=ask")


# --- formats and encodings ------------------------------------------------------------------------


def test_csv_quoted_multiline_cells_keep_line_numbers(tmp_path):
    p = tmp_path / "qa.csv"
    p.write_text('问题,回答\n"第一行\n第二行",答一\n问二,"答二, 含逗号\n""引号"""\n问三,\n', encoding="utf-8")
    ds = data.load(p)
    assert ds.format == "csv" and ds.encoding == "utf-8"
    assert _msgs(ds.conversations[0]) == [("user", "第一行\n第二行"), ("assistant", "答一")]
    assert ds.conversations[1][1]["content"] == '答二, 含逗号\n"引号"'
    assert ds.wheres == [f"{p}:2", f"{p}:4"] and ds.dropped == [(f"{p}:6", "empty answer")]


def test_tsv_and_utf8_bom(tmp_path):
    p = tmp_path / "qa.tsv"
    p.write_bytes("\ufeffquestion\tanswer\nq1\ta1\n".encode("utf-8"))
    ds = data.load(p)
    assert ds.format == "tsv" and ds.encoding == "utf-8-sig" and _msgs(ds.conversations[0]) == [("user", "q1"), ("assistant", "a1")]


@pytest.mark.parametrize("enc,name", [("gbk", "gb18030"), ("gb18030", "gb18030"), ("utf-16", "utf-16")])
def test_chinese_windows_encodings(tmp_path, enc, name):
    p = tmp_path / "qa.jsonl"
    p.write_bytes('{"问题": "劳动合同到期不续签有补偿吗？", "回答": "有，依据《劳动合同法》第四十六条。"}\n'.encode(enc))
    ds = data.load(p)
    assert ds.encoding == name and "第四十六条" in ds.conversations[0][1]["content"]


def test_unknown_encoding_is_refused_with_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes(b"question,answer\nq,a\ncaf\xe9 au lait,\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"latin\.csv:3: unknown text encoding") as e:
        data.load(p)
    assert "UTF-8" in e.value.hint


def test_xlsx(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["律师咨询记录"])  # a title row above the header, as people do
    ws.append(["问题", "回答", "备注"])
    ws.append(["试用期最长多久？", "依据《劳动合同法》第十九条，最长六个月。", ""])
    ws.append([None, None, None])
    ws.append(["加班费怎么算？", 150, "数字单元格"])
    p = tmp_path / "cases.xlsx"
    wb.save(p)
    ds = data.load(p)
    assert ds.format == "xlsx" and len(ds.conversations) == 2
    assert ds.wheres == [f"{p}:3", f"{p}:5"] and ds.conversations[1][1]["content"] == "150"


def test_dialogue_text(tmp_path):
    p = tmp_path / "dialogues.txt"
    p.write_text("用户：公司拖欠工资三个月怎么办？\n律师：依据《劳动合同法》第三十八条，你可以解除合同。\n"
                 "同时可以主张经济补偿。\n用户：要去哪里申请仲裁？\n律师：向用人单位所在地的劳动争议仲裁委员会申请。\n\n"
                 "客户: 定金能退吗？\n律师: 依据《民法典》第五百八十七条，收受定金一方违约的应双倍返还。\n", encoding="gb18030")
    ds = data.load(p)
    assert ds.format == "dialogue" and ds.encoding == "gb18030" and len(ds.conversations) == 2
    c = ds.conversations[0]
    assert [m["role"] for m in c] == ["user", "assistant", "user", "assistant"]
    assert c[1]["content"].endswith("同时可以主张经济补偿。")
    assert ds.wheres == [f"{p}:1", f"{p}:7"]


def test_json_lines_inside_a_dot_json_and_pretty_printed_objects(tmp_path):
    p = tmp_path / "looks_like.json"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n', encoding="utf-8")
    assert data.load(p).format == "jsonl"
    q = tmp_path / "pretty.jsonl"
    q.write_text('{\n  "question": "a",\n  "answer": "b"\n}\n{\n  "question": "c",\n  "answer": "d"\n}\n')
    ds = data.load(q)
    assert len(ds.conversations) == 2 and ds.wheres == [f"{q}:1", f"{q}:5"]
    w = tmp_path / "wrapped.json"
    w.write_text(json.dumps({"version": 2, "data": [{"question": "a", "answer": "b"}]}))
    assert len(data.load(w).conversations) == 1


# --- bad input ------------------------------------------------------------------------------------


def test_malformed_line_stops_unless_skip_bad(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n{"question": "e", "answer": "f"}\n[1, 2]\n')
    with pytest.raises(UserError) as e:
        data.load(p)
    assert f"{p}:2: invalid JSON" in e.value.message and "--skip-bad" in e.value.hint
    ds = data.load(p, skip_bad=True)
    assert len(ds.conversations) == 2 and [w for w, _ in ds.bad] == [f"{p}:2", f"{p}:4"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.jsonl", b"\n \n", "the file is empty"),
        ("noanswer.csv", "问题,备注\n问一,无\n".encode(), "no answer column among: 问题, 备注"),
        ("prose.txt", "这是一段普通的文字，没有问题也没有回答。\n第二行。\n".encode(), "not tabular or conversational"),
        ("scan.pdf", b"%PDF-1.7\n%\xe2\xe3\n1 0 obj", "a PDF"),
        ("old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64, "old Excel .xls"),
        ("blob.bin", b"\x00\x01\x02binary\x00", "binary file"),
        ("keys.jsonl", b'{"foo": "x", "bar": "y"}\n', "cannot tell question from answer (keys: foo, bar)"),
        ("array.json", b'[{"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}]', "array.json:2: invalid JSON"),
        ("scalar.json", b'"just a string"', "not tabular or conversational"),
    ],
)
def test_bad_files_get_one_clear_message(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError) as e:
        data.load(p)
    assert needle in str(e.value), str(e.value)
    assert str(p) in str(e.value)


# --- duplicates and the split ---------------------------------------------------------------------


def test_duplicates_exact_near_and_cluster_split():
    import random

    rng = random.Random(0)
    words = "合同纠纷租赁押金工资加班年假工伤借款利息定金违约继承遗嘱离婚抚养交通事故保险理赔"
    qs = [f"{''.join(rng.sample(words, 12))}怎么处理？" for i in range(40)]
    ans = [f"{''.join(rng.sample(words, 16))}，注意诉讼时效。" for i in range(40)]
    qs[10], ans[10] = qs[3], ans[3]  # exact copy
    qs[11], ans[11] = qs[4] + "  ", "完全不同的回答"  # same question, different answer
    qs[12], ans[12] = qs[5][:-1] + "呢？", ans[5]  # a near copy
    d = dedup.find(qs, ans)
    assert d.exact == [(10, 3)]
    near = dict(d.near)
    assert near.get(11) == 4 and near.get(12) == 5
    assert d.cluster[10] == d.cluster[3] and d.cluster[12] == d.cluster[5]
    for seed in range(20):
        tr, ev = data.split(40, 0.25, seed, d.cluster)
        assert not {d.cluster[i] for i in tr} & {d.cluster[i] for i in ev}
        assert len(ev) == 10 and sorted(tr + ev) == list(range(40))


def test_normalize_handles_full_width_and_punctuation():
    assert dedup.normalize("Ｈｅｌｌｏ， 世界！") == dedup.normalize("hello世界")


def test_split_is_deterministic():
    tr, ev = data.split(50, 0.2, 7)
    assert len(ev) == 10 and not set(tr) & set(ev) and data.split(50, 0.2, 7) == (tr, ev)
    assert data.split(1, 0.2, 7) == ([0], [])


# --- every real file in ../shared/data ------------------------------------------------------------

SHARED_EXPECT = {
    # file: (format, encoding, layout, rows read, usable conversations)
    "chinese-medical-dialogue/internal_medicine_sample.gb18030.csv": ("csv", "gb18030", "columns question=ask, answer=answer", 7644, 7644),
    "huatuo-med-alpaca/llama_data.json": ("jsonl", "utf-8", "alpaca", 8658, 8658),
    "disc-law-qa/qa_short_answer.json": ("json", "utf-8", "question-answer", 300, 300),
    "llama-factory-demo/alpaca_en_demo.json": ("json", "utf-8", "alpaca", 999, 999),
    "llama-factory-demo/alpaca_zh_demo.json": ("json", "utf-8", "alpaca", 1000, 1000),
    "llama-factory-demo/identity.json": ("json", "utf-8", "alpaca", 91, 91),
    "torchtune-tiny/alpaca_tiny.json": ("json", "utf-8", "alpaca", 100, 100),
    "torchtune-tiny/chat_tiny.json": ("json", "utf-8", "sharegpt", 1, 1),
    "torchtune-tiny/instruct_tiny.json": ("json", "utf-8", "alpaca", 2, 2),
}


@pytest.mark.parametrize("rel", sorted(SHARED_EXPECT))
def test_every_shared_file_reads(rel):
    p = D / rel
    if not p.is_file():
        pytest.skip("../shared/data is not present")
    fmt, enc, layout, rows, usable = SHARED_EXPECT[rel]
    ds = data.load(p)
    assert (ds.format, ds.encoding, ds.layout, ds.rows_read, len(ds.conversations)) == (fmt, enc, layout, rows, usable)
    assert not ds.bad
    for c in ds.conversations[:50]:
        assert c[-1]["role"] == "assistant" and c[-1]["content"].strip()


def test_shared_sharegpt_keeps_system_and_every_turn():
    p = D / "torchtune-tiny" / "chat_tiny.json"
    if not p.is_file():
        pytest.skip("../shared/data is not present")
    c = data.load(p).conversations[0]
    assert c[0]["role"] == "system" and sum(m["role"] == "assistant" for m in c) >= 2


def test_shared_registry_is_refused_with_the_fix():
    p = D / "llama-factory-demo" / "dataset_info.json"
    if not p.is_file():
        pytest.skip("../shared/data is not present")
    with pytest.raises(UserError, match="dataset registry") as e:
        data.load(p)
    assert "identity.json" in e.value.hint


def test_shared_gb18030_csv_maps_ask_not_title():
    p = D / "chinese-medical-dialogue" / "internal_medicine_sample.gb18030.csv"
    if not p.is_file():
        pytest.skip("../shared/data is not present")
    ds = data.load(p)
    assert ds.mapping["question"] == "ask" and ds.columns == ["department", "title", "ask", "answer"]
    assert "党参" in ds.conversations[0][0]["content"]


def test_more_real_world_shapes(tmp_path):
    import openpyxl

    cases = {
        "semi.csv": ("question;answer\nq1;a1\nq2;\"a;2\"\n".encode(), 2),
        "excel_unicode.txt": ("question\tanswer\nq\ta\n".encode("utf-16"), 1),  # Excel "Unicode text"
        "crlf.jsonl": (b'{"question":"a","answer":"b"}\r\n{"question":"c","answer":"d"}\r\n', 2),
        "ids.json": (json.dumps({"1": {"question": "a", "answer": "b"}, "2": {"question": "c", "answer": "d"}}).encode(), 2),
        "long_cell.csv": (("question,answer\nq,\"" + "长" * 200000 + "\"\n").encode(), 1),
        "qa.txt": (b"Q: What is LOTO?\nA: Lockout tagout.\n\nQ: Why?\nA: Safety.\n", 2),
        "parts.jsonl": (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                 {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}).encode(), 1),
    }
    for name, (content, n) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        assert len(data.load(p).conversations) == n, name
    wb = openpyxl.Workbook()
    wb.active.append(["this workbook lists cases"])  # a notes sheet first
    ws = wb.create_sheet("data")
    ws.append(["问题", "回答"])
    ws.append(["q", "a"])
    wb.save(tmp_path / "multi.xlsx")
    ds = data.load(tmp_path / "multi.xlsx")
    assert len(ds.conversations) == 1 and ds.wheres == [f"{tmp_path / 'multi.xlsx'}:data!2"]
    (tmp_path / "fake.xlsx").write_text("not a zip")
    with pytest.raises(UserError, match="cannot open as an Excel workbook"):
        data.load(tmp_path / "fake.xlsx")
