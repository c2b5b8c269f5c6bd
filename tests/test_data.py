"""Reading Q/A files: the layouts people bring, and errors that point at the line."""

from __future__ import annotations

import json

import pytest

from qlora_kit import data
from qlora_kit.errors import UserError

from conftest import SHARED


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "row,expect",
    [
        ({"question": "Q", "answer": "A"}, [("user", "Q"), ("assistant", "A")]),
        ({"问题": "问", "回答": "答"}, [("user", "问"), ("assistant", "答")]),
        ({"instruction": "Do", "input": "this", "output": "done"}, [("user", "Do\n\nthis"), ("assistant", "done")]),
        ({"prompt": "P", "completion": "C"}, [("user", "P"), ("assistant", "C")]),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
         [("system", "S"), ("user", "U"), ("assistant", "A")]),
        ({"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]}, [("user", "U"), ("assistant", "A")]),
    ],
)
def test_layouts(tmp_path, row, expect):
    ds = data.load(_jsonl(tmp_path, [row]))
    assert [(m["role"], m["content"]) for m in ds.conversations[0]] == expect


def test_system_prompt_added_only_when_missing(tmp_path):
    p = _jsonl(tmp_path, [{"question": "Q", "answer": "A"},
                          {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}])
    ds = data.load(p, system_prompt="SYS")
    assert ds.conversations[0][0] == {"role": "system", "content": "SYS"}
    assert ds.conversations[1][0]["content"] == "own"


def test_json_array_reports_element_lines(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c", "answer": ""},\n  {"foo": 1}\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.json:4: cannot tell question from answer \(keys: foo\)"):
        data.load(p)


def test_empty_answers_skipped_with_line(tmp_path):
    p = _jsonl(tmp_path, [{"question": "a", "answer": "b"}, {"question": "c", "answer": "  "}])
    ds = data.load(p)
    assert len(ds.conversations) == 1 and ds.skipped == [f"{p}:2: empty answer"]


def test_empty_file_and_not_utf8(tmp_path):
    e = tmp_path / "e.jsonl"
    e.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        data.load(e)
    g = tmp_path / "g.jsonl"
    g.write_bytes('{"question": "a", "answer": "b"}\n'.encode() + '{"question": "你好", "answer": "好"}\n'.encode("gb18030"))
    with pytest.raises(UserError, match=r"g\.jsonl:2: not UTF-8"):
        data.load(g)


def test_split_is_deterministic_and_disjoint():
    tr, ev = data.split(50, 0.2, 7)
    assert len(ev) == 10 and not set(tr) & set(ev) and sorted(tr + ev) == list(range(50))
    assert data.split(50, 0.2, 7) == (tr, ev)
    assert data.split(1, 0.2, 7) == ([0], [])


def test_real_alpaca_files_from_shared():
    p = SHARED / "data" / "torchtune-tiny" / "alpaca_tiny.json"
    if not p.is_file():
        pytest.skip("../shared/data is not present")
    ds = data.load(p)
    assert len(ds.conversations) >= 90 and ds.layout == "alpaca"
    law = SHARED / "data" / "disc-law-qa" / "qa_short_answer.json"
    ds = data.load(law)
    assert len(ds.conversations) + len(ds.skipped) == 300
