"""Prove the adapter helps: eval base vs tuned, the report, chat with several adapters."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import sys

import pytest

from qlora_kit import train
from qlora_kit.serve import chat
from qlora_kit.serve import engine as generate
from qlora_kit.eval import evaluate
from qlora_kit.train import memorising_warning

from conftest import ROOT, make_recipe, write_qa

sys.path.insert(0, str(ROOT / "scripts"))


def test_stories260k_learns_held_out_extraction(stories_dir, tmp_path):
    """The proof, small: a real pretrained model, held-out combinations, a large real margin."""
    import proof_stories

    res = proof_stories.run(tmp_path, n_rows=200, steps=100, limit=12)
    b, t = res["summary"]["base"], res["summary"]["tuned"]
    print(json.dumps({"base": b, "tuned": t}, indent=1))
    assert t["json_valid"] >= 0.8 and b["json_valid"] <= 0.2
    assert t["field_accuracy"] >= b["field_accuracy"] + 0.5
    assert t["eval_loss"] < 0.5 * b["eval_loss"]
    run_dir = tmp_path / "run"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert png and base64.b64decode(png.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]https?:", page) and "<script" not in page.lower()  # opens offline
    hist = json.loads((run_dir / "metrics.json").read_text())["log_history"]
    assert sum("eval_loss" in h for h in hist) >= 2 and sum("loss" in h for h in hist) >= 4  # real curves
    rows = list(csv.reader(io.StringIO((run_dir / "review.csv").read_text(encoding="utf-8-sig"))))
    assert rows[0][:6] == ["id", "where", "question", "reference", "answer_A", "answer_B"] and len(rows) == 13
    assert all(r[6:] == ["", "", "", ""] for r in rows[1:])  # grade columns left for the expert (blind: tests/test_grading.py)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "| JSON field accuracy |" in md and "plots/loss.png" in md


def test_eval_with_given_file_on_tiny(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    q = write_qa(tmp_path / "new.jsonl", n=3)
    res = evaluate.run(run_dir, str(q), max_new_tokens=6)
    s = res["summary"]
    assert res["samples"] == 3 and res["data"] == str(q)
    for side in ("base", "tuned"):
        for k in ("eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "tokens_per_s", "latency_p50_s", "latency_p99_s"):
            assert s[side][k] is not None, (side, k)
    assert s["tuned"]["eval_loss"] < s["base"]["eval_loss"]  # the adapter lowered the loss on unseen rows
    assert json.loads((run_dir / "eval.json").read_text())["samples"] == 3


def test_memorising_warning():
    assert memorising_warning(0.1, 1.2) and "memorising" in memorising_warning(0.1, 1.2)
    assert memorising_warning(1.0, 1.1) is None and memorising_warning(None, 1.0) is None


def test_best_checkpoint_and_early_stopping_settings(tmp_path, tiny_dir, qa_file):
    from qlora_kit.recipe import Recipe
    from qlora_kit.train import early_stopping, sft_config

    rec = make_recipe(str(tiny_dir), qa_file)
    s = sft_config(rec, tmp_path, has_eval=True)
    assert s.load_best_model_at_end and s.metric_for_best_model == "eval_loss" and s.greater_is_better is False
    assert early_stopping(rec, True)[0].early_stopping_patience == 3 and early_stopping(rec, False) == []
    assert sft_config(rec, tmp_path, has_eval=False).load_best_model_at_end is False
    with pytest.raises(Exception, match="multiple of eval_steps"):
        Recipe.model_validate({"base_model": "x", "training": {"eval_steps": 20, "save_steps": 50}})


@pytest.fixture(scope="module")
def second_run(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("second")
    q = write_qa(d / "other.jsonl", n=24, template="第{i}题：工伤怎么认定？", answer="工伤认定需要向社会保险行政部门申请，第{i}题。")
    rec = make_recipe(str(tiny_dir), q, max_steps=8, learning_rate=2e-2)
    rec.data.eval_fraction = 0.0
    return train.run(rec, str(d / "run"))


def test_several_adapters_on_one_base_switch_without_reload(tiny_run, second_run):
    first, _ = tiny_run
    engine = generate.Engine.from_runs({"legal": first, "injury": second_run})
    base_model = engine.model
    prompts = ["试用期最长多久？", "工伤怎么认定？", "加班费怎么算？"]
    outs = {}
    for name in ("legal", "injury", None):
        engine.use(name)
        outs[name] = [engine.generate(engine.messages(p), 8).text for p in prompts]
    assert engine.model is base_model
    assert outs["legal"] != outs["injury"] and outs["legal"] != outs[None]
    pieces = []
    engine.use("legal")
    res = engine.generate(engine.messages(prompts[0]), 8, on_text=pieces.append)
    assert "".join(pieces).strip() == res.text.strip() and len(pieces) >= 1  # streamed


def test_repl_commands(tiny_run, second_run):
    from rich.console import Console

    first, _ = tiny_run
    engine = generate.Engine.from_runs({"legal": first, "injury": second_run})
    lines = iter(["试用期最长多久？", "/use injury", "工伤怎么认定？", "/use nosuch", "/base", "你好", "/adapters", "/reset", "/exit"])
    out, log = io.StringIO(), io.StringIO()
    chat.repl(engine, 4, Console(file=log, width=200), read=lambda _p: next(lines), out=out)
    text = log.getvalue()
    assert "now: injury" in text and "no adapter named 'nosuch'" in text and "now: base model" in text
    assert "history cleared" in text and engine.active is None
    assert len([line for line in out.getvalue().splitlines()]) >= 3  # three answers were written


def test_chat_cli_one_prompt(tiny_run):
    import os
    import subprocess

    run_dir, _ = tiny_run
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "chat", str(run_dir), "-p", "试用期最长多久？",
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "chat", "--adapter", "bad"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "NAME=RUN_DIR" in r.stderr
