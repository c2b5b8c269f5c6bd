"""Structured output: JSON answers enforced while decoding (llguidance), on real tiny models.

The built-in tiny models are random: their free answers are noise and never parse, so every
answer below that parses and matches the schema does so because of the constraint. The budget is
modest on purpose (64-128 tokens for a nine-field schema the tiny tokenizer needs 60 tokens for).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, make_recipe, write_qa

from qlora_kit import recipe, serve, train
from qlora_kit.data import synth
from qlora_kit.serve import engine as generate
from qlora_kit.serve import structured
from qlora_kit.eval import evaluate

jsonschema = pytest.importorskip("jsonschema")

FINANCE_SCHEMA = ROOT / "recipes" / "finance.schema.json"
CLAUSES = [
    "借款人应于2025年3月31日前一次性归还本金人民币500万元，年利率4.35%。",
    "本合同项下借款金额为人民币叁仟万元整，借款期限为36个月。",
    "甲方同意向乙方提供最高额不超过人民币一亿二千万元的综合授信额度。",
    "保证人对主债务承担连带责任保证，保证期间为主债务履行期届满之日起三年。",
    "租赁物件总价款为港币800万元，租期24个月，按季支付租金。",
    "存款期限一年，年利率1.75%，到期自动转存。",
    "本期债券发行规模为美元5亿元，票面利率4.2%，期限5年。",
    "应收账款转让价款为人民币2000万元，融资比例80%。",
    "逾期按日万分之五计收罚息，以名下房产提供抵押担保。",
    "Extract the clause: a loan of EUR 2,000,000 at 3.1% per year for 18 months.",
]
# (temperature, top_p, max_tokens): greedy and sampled, all within a modest budget
SETTINGS = [(0.0, 1.0, 64), (1.0, 1.0, 80), (0.7, 0.9, 96)]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(FINANCE_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def finance() -> structured.Constraint:
    return structured.load(FINANCE_SCHEMA)


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    """The built-in tiny Qwen2 (random weights, ChatML template) as a merged model: full precision, fast."""
    return generate.Engine.from_merged(tiny_chat_dir)


def ask(engine, question, max_tokens, constraint=None, temperature=0.0, top_p=1.0, seed=None):
    return engine.generate(engine.messages(question), max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           constraint=constraint)


def outside_strings(text: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


# --- the finance recipe's schema ------------------------------------------------------------------------


def test_finance_schema_matches_the_recipe_data_and_is_the_recipes(schema):
    answers = [json.loads(json.loads(line)["answer"])
               for line in (ROOT / "recipes" / "data" / "finance.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    answers += [json.loads(r["answer"]) for r in synth.generate("finance", 300, 0)]
    for a in answers:
        jsonschema.validate(a, schema)
        assert list(a) == list(schema["properties"])  # the schema's order is the data's: the grammar writes keys in it
    rec, _ = recipe.resolve("finance")
    assert rec.evaluation.json_schema == str(FINANCE_SCHEMA)
    assert evaluate.eval_constraint(rec, None).name == "finance.schema"
    legal, _ = recipe.resolve("legal")  # no JSON in its answers: eval decodes nothing extra
    assert evaluate.eval_constraint(legal, None) is None


# --- the engine -------------------------------------------------------------------------------------------


def test_every_constrained_answer_parses_and_matches_the_schema(engine, finance, schema):
    for i, clause in enumerate(CLAUSES):
        temperature, top_p, max_tokens = SETTINGS[i % len(SETTINGS)]
        res = ask(engine, clause, max_tokens, finance, temperature, top_p, seed=i)
        obj = json.loads(res.text)
        jsonschema.validate(obj, schema)
        assert not re.search(r"\s", outside_strings(res.text)), "compact JSON: no whitespace outside strings"
        assert res.finish_reason == "stop" and res.new_tokens <= max_tokens, (res.finish_reason, res.new_tokens)


def test_without_the_constraint_the_tiny_model_writes_no_json(engine):
    for clause in CLAUSES[:5]:
        text = ask(engine, clause, 16).text
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_mode_gives_an_object(engine):
    any_object = structured.json_object()
    for seed, clause in enumerate(CLAUSES[:4]):
        res = ask(engine, clause, 16, any_object, temperature=1.0, seed=seed)
        assert isinstance(json.loads(res.text), dict) and res.finish_reason == "stop"


def test_the_answer_closes_exactly_at_the_budget_or_says_length(engine, finance, schema):
    a = engine.current
    need = finance.min_tokens(a.tokenizer, a.stop_ids)
    assert 20 < need < 64  # nine keys, values kept to null / 0 / the shortest enum
    for temperature in (0.0, 1.0):  # closed on the last token (no room for the end token): still "stop"
        res = ask(engine, CLAUSES[0], need, finance, temperature, seed=1)
        jsonschema.validate(json.loads(res.text), schema)
        assert res.finish_reason == "stop" and res.new_tokens == need
    cut = ask(engine, CLAUSES[0], need - 1, finance)  # below what the schema needs: cut, and said so
    assert cut.finish_reason == "length" and finance.problem(cut.text)


def test_bad_schemas_are_refused_with_what_is_wrong(tmp_path):
    for schema, needle in [({"type": "strin"}, "not a valid JSON Schema"),
                           ({"type": "object", "not": {"type": "null"}}, "cannot be used for constrained decoding"),
                           ([1, 2], "is an object")]:
        with pytest.raises(ValueError, match=needle):
            structured.compile_schema(schema)
    for rf, needle in [("json", "must be an object"), ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "strict")]:
        with pytest.raises(ValueError, match=needle):
            structured.from_response_format(rf)
    assert structured.from_response_format({"type": "text"}) is None


# --- serve: the real server, the openai client ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine):
    from test_serve import Server

    s = Server(serve.create_app(serve.Service(engine, default_max_tokens=16)))
    yield s
    s.stop()


def finance_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "finance_clause", "schema": schema, "strict": True}}


def test_serve_response_format_plain_and_streamed(server, engine, schema):
    c = server.client()
    msgs = [{"role": "user", "content": CLAUSES[1]}]
    r = c.chat.completions.create(model=engine.active, messages=msgs, max_tokens=80, response_format=finance_format(schema))
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 80
    chunks = list(c.chat.completions.create(model=engine.active, messages=msgs, max_tokens=80, stream=True,
                                            response_format=finance_format(schema)))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # the same answer, in pieces
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 5  # really streamed
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    r = c.chat.completions.create(model=engine.active, messages=msgs, max_tokens=24, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # below what the schema needs: the answer is cut and finish_reason says so, as OpenAI's API does
    r = c.chat.completions.create(model=engine.active, messages=msgs, max_tokens=8, response_format=finance_format(schema))
    assert r.choices[0].finish_reason == "length"


def test_serve_bad_response_format_is_400_naming_it(server, engine):
    from test_serve import raw

    openai = pytest.importorskip("openai")
    bad = [{"type": "xml"}, "json_object", {"type": "json_schema"},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"type": "null"}}}},
           {"type": "json_schema", "json_schema": {"name": "has space", "schema": {"type": "object"}}}]
    for rf in bad:
        body = {"model": engine.active, "messages": [{"role": "user", "content": "hi"}], "response_format": rf}
        status, out = raw(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                          {"Content-Type": "application/json"})
        assert status == 400, (rf, out)
        assert out["error"]["param"] == "response_format" and out["error"]["type"] == "invalid_request_error", out
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=engine.active, messages=[{"role": "user", "content": "hi"}],
                                                response_format={"type": "xml"})
    assert e.value.param == "response_format" and "json_schema" in e.value.message


# --- the commands -----------------------------------------------------------------------------------------


def qlora_kit(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_generate_json_schema_prints_valid_json(tiny_run, schema):
    run_dir, _ = tiny_run
    r = qlora_kit("generate", run_dir, "--json-schema", "recipes/finance.schema.json", "-p", CLAUSES[0],
                  "--max-new-tokens", 64)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)
    # too small a budget for the schema: not valid JSON, so exit 1 and say what to do (in-process: no second load)
    from typer.testing import CliRunner

    from qlora_kit.cli import app

    r = CliRunner().invoke(app, ["generate", str(run_dir), "--json-schema", str(FINANCE_SCHEMA), "-p", CLAUSES[0],
                                 "--max-new-tokens", "12"])
    assert r.exit_code == 1 and "before its JSON was complete" in r.stderr and "raise --max-new-tokens" in r.stderr
    assert "needs at least" in r.stderr
    r = CliRunner().invoke(app, ["chat", str(run_dir), "--json-schema", str(FINANCE_SCHEMA), "-p", CLAUSES[1],
                                 "--max-new-tokens", "64"])  # chat streams the same constrained answer
    assert r.exit_code == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)


def test_bad_schema_file_is_exit_2_naming_file_and_line(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "type": "object",\n  "properties": {"a": }\n}\n', encoding="utf-8")
    unusable = tmp_path / "unusable.json"
    unusable.write_text(json.dumps({"type": "object", "not": {"type": "null"}}), encoding="utf-8")
    for args, needle in [(["generate", run_dir, "-p", "x", "--json-schema", broken], f"{broken}:3:"),
                         (["chat", run_dir, "-p", "x", "--json-schema", unusable], "Unimplemented keys"),
                         (["eval", run_dir, "--json-schema", tmp_path / "missing.json"], "no such file")]:
        r = qlora_kit(*args, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_eval_reports_valid_json_with_and_without_the_constraint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)  # eval writes its report into the run: leave the shared one alone
    small = tmp_path / "answer.schema.json"
    small.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}},
                                 "required": ["answer"], "additionalProperties": False}), encoding="utf-8")
    result = evaluate.run(run, limit=1, max_new_tokens=24, json_schema=small)
    assert result["json_schema"] == "answer.schema"
    for side in ("base", "tuned"):
        s = result["summary"][side]
        assert s["json_schema_valid"] == 0.0 and s["json_schema_valid_constrained"] == 1.0, s
        assert s["tokens_per_s_constrained"] > 0
    for row in result["rows"]:
        assert set(json.loads(row["tuned"]["answer_constrained"])) == {"answer"}
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "valid JSON + schema, free" in report and "valid JSON + schema, constrained" in report


# --- a SentencePiece vocabulary with byte fallback ----------------------------------------------------------


def test_stories260k_byte_fallback_braces(stories_dir, tmp_path):
    """stories260K has no '{' or '}' token of its own, only the byte tokens <0x7B>/<0x7D> (DESIGN.md §4):
    the grammar works on bytes, so those are what it allows, and the answer parses."""
    data = write_qa(tmp_path / "qa.jsonl", n=12)
    run = train.run(make_recipe(str(stories_dir), data, max_steps=1, max_length=128), str(tmp_path / "run"))
    eng = generate.Engine.from_runs({"stories": run})
    tok = eng.current.tokenizer
    brace = tok.convert_tokens_to_ids("<0x7B>")
    assert tok.get_vocab().get("{") is None and brace != tok.unk_token_id
    name_age = structured.compile_schema({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                                          "required": ["name", "age"], "additionalProperties": False})
    first = name_age.processor(tok, eng.current.stop_ids, 48)
    assert first.v.allowed(first.matcher).nonzero()[0].tolist() == [brace]  # the only way to start: the byte token
    res = eng.generate(eng.messages("Once upon a time"), 24, temperature=1.0, seed=0, constraint=name_age)
    assert set(json.loads(res.text)) == {"name", "age"} and name_age.problem(res.text) is None, res.text
    assert res.finish_reason == "stop"
