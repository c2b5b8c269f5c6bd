"""`data check` and the checks `train` runs first: the report, the cache, privacy, bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from qlora_kit.data import check as datacheck
from qlora_kit.model import load_tokenizer, prepare_tokenizer
from qlora_kit.recipe import Recipe

from conftest import ROOT, make_recipe, write_qa

QK = [sys.executable, "-m", "qlora_kit.cli"]


def cli(args, cache, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "QLORA_KIT_CACHE": str(cache)}
    return subprocess.run(QK + args, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), env=env, timeout=300)


def _tok(model_dir):
    rec = Recipe(base_model=str(model_dir))
    tok = load_tokenizer(str(model_dir), rec)
    return tok, set(prepare_tokenizer(tok, rec, str(model_dir)).stop_token_ids)


def test_report_counts_and_cache(tiny_dir, tmp_path):
    p = write_qa(tmp_path / "qa.jsonl", n=30)
    first = p.read_text(encoding="utf-8").splitlines()[0]
    answer0 = json.loads(first)["answer"]
    with open(p, "a", encoding="utf-8") as f:
        f.write(first + "\n")  # an exact duplicate of row 1
        f.write(json.dumps({"question": "空答案", "answer": " "}, ensure_ascii=False) + "\n")
    rec = make_recipe(str(tiny_dir), p)
    tok, stop = _tok(tiny_dir)
    prep = datacheck.prepare(rec, tok, stop)
    r = prep.report
    assert r["rows_read"] == 32 and r["format"] == "jsonl" and r["encoding"] == "utf-8"
    assert r["dropped"] == [{"where": f"{p}:32", "reason": "empty answer"}]
    assert r["duplicates"]["exact"] == 1 and r["duplicates"]["exact_dropped"] == 1
    assert r["duplicates"]["exact_examples"][0] == {"row": f"{p}:31", "repeats": f"{p}:1"}
    assert r["split"]["train"] + r["split"]["eval"] == 30 and r["split"]["leakage"] == 0
    assert r["tokens"]["cached"] is False and r["tokens"]["truncated"] == 0
    loss_text = "".join(t for t, loss in r["sample"]["segments"] if loss)
    sample_where = r["sample"]["where"]
    line = int(sample_where.rsplit(":", 1)[1])
    row = json.loads(p.read_text(encoding="utf-8").splitlines()[line - 1])
    assert row["answer"] in loss_text.replace(" ", "") and row["question"] not in loss_text
    assert tok.eos_token in loss_text and answer0
    again = datacheck.prepare(rec, tok, stop)
    assert again.report["tokens"]["cached"] is True
    assert [(e.input_ids, e.labels) for e in again.encoded] == [(e.input_ids, e.labels) for e in prep.encoded]


def test_truncation_and_cut_answers_reported(tiny_dir, tmp_path):
    p = write_qa(tmp_path / "long.jsonl", n=6, answer="很长的回答" * 100)
    rec = make_recipe(str(tiny_dir), p, max_length=64)
    tok, stop = _tok(tiny_dir)
    r = datacheck.prepare(rec, tok, stop).report
    assert r["tokens"]["truncated"] == 6 and r["tokens"]["answer_cut"] == 6
    assert any("max_length=64" in w for w in r["warnings"])


def test_cli_check_json_and_table(tmp_path, cache, tiny_dir):
    p = tmp_path / "qa.csv"
    p.write_bytes("问题,回答\n试用期多久？,最长六个月。\n加班费？,不低于工资的百分之一百五十。\n".encode("gb18030"))
    r = cli(["data", "check", str(p), "--base-model", "builtin:tiny", "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["encoding"] == "gb18030" and rep["format"] == "csv" and rep["rows_read"] == 2
    assert rep["tokens"]["length"]["max"] > 5
    r = cli(["data", "check", str(p), "--recipe", "legal"], cache)  # Qwen's tokenizer is not here: said, not crashed
    assert r.returncode == 0 and "tokenizer of Qwen/Qwen2.5-7B-Instruct unavailable" in r.stderr
    assert "gb18030" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_data_exit_2_and_skip_bad(tmp_path, cache):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c" "answer": "d"}\n{"question": "e", "answer": "f"}\n')
    r = cli(["data", "check", str(p)], cache)
    assert r.returncode == 2 and f"{p}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    r = cli(["data", "check", str(p), "--skip-bad", "--json"], cache)
    assert r.returncode == 0 and json.loads(r.stdout)["bad_rows"][0]["where"] == f"{p}:2"
    r = cli(["train", "legal", "--data", str(p), "--base-model", "builtin:tiny", "--run-dir", str(tmp_path / "run")], cache)
    assert r.returncode == 2 and "invalid JSON" in r.stderr
    assert not (tmp_path / "run").exists(), "nothing trained and nothing half-written"


PII = {
    "id": "11010519491231002X",
    "mobile": "13800138000",
    "email": "zhang.san@example.com",
    "card": "6222021234567890128",
    "name": "张三丰",
}


def _pii_file(tmp_path):
    rows = [{"question": f"患者{PII['name']}，身份证{PII['id']}，手机{PII['mobile']}，第{i}次问：血压高怎么办？",
             "answer": f"请联系{PII['email']}预约复查，费用从卡号{PII['card']}扣除。第{i}次回答：低盐饮食，规律服药。"}
            for i in range(12)]
    p = tmp_path / "patients.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def test_scrub_command(tmp_path, cache):
    from qlora_kit.data import pii

    assert pii.luhn_ok(PII["card"]) and pii.is_valid_id_card(PII["id"])
    p = _pii_file(tmp_path)
    out = tmp_path / "clean.jsonl"
    r = cli(["data", "scrub", str(p), "-o", str(out)], cache)
    assert r.returncode == 0, r.stderr
    text = out.read_text(encoding="utf-8")
    for v in PII.values():
        assert v not in text
    assert "[身份证号]" in text and "[姓名]" in text and "低盐饮食" in text
    assert "id_card: 12" in r.stderr and "name: 12" in r.stderr


def test_train_with_scrub_leaks_nothing_into_the_run_dir(tiny_dir, tmp_path):
    from qlora_kit import train

    rec = make_recipe(str(tiny_dir), _pii_file(tmp_path), max_steps=2)
    rec.data.scrub_pii = True
    run_dir = train.run(rec, str(tmp_path / "run"))
    check = json.loads((run_dir / "data_check.json").read_text())
    assert check["pii_redacted"]["mobile"] == 12
    for f in run_dir.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            for v in PII.values():
                assert v.encode() not in blob, (f, v)


def test_synth_command_is_deterministic_and_trainable(tmp_path, cache):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        r = cli(["data", "synth", "finance", "-n", "200", "-o", str(out), "--seed", "3"], cache)
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200 and all(isinstance(json.loads(r["answer"]), dict) for r in rows)
    r = cli(["data", "check", str(a), "--recipe", "finance", "--base-model", "builtin:tiny", "--json"], cache)
    assert r.returncode == 0 and json.loads(r.stdout)["rows_read"] == 200
    r = cli(["data", "synth", "poetry", "-o", str(a)], cache)
    assert r.returncode == 2 and "available: finance" in r.stderr
