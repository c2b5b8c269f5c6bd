"""Tool-calling conversations (issue 16, item 3): LLaMA-Factory's glaive ShareGPT layout
(`function_call` / `observation` turns, `tools` as JSON text) and OpenAI `messages` with
`tool_calls` and `tool` turns are read, rendered through the model's own chat template with its
`tools` support, and trained with loss on the calls and answers, never on the tool results.

The built-in models have no tool-capable template, so the tests build one: tiny-chat's weights and
tokenizer with a Qwen2.5-style template (below) that renders tools, tool calls and tool results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_recipe
from test_cli import assert_user_error, run

# Qwen2.5-Instruct's template (tools in the system turn, <tool_call> in the assistant turn, tool
# results as <tool_response> in a user turn), with a shorter default system prompt.
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

SECRET = "OBSERVATION-TEXT"  # in every tool result: must never carry loss
CITIES = ["Paris", "Berlin", "Tokyo", "Rome", "Madrid", "Oslo", "Cairo", "Lima", "Quito", "Seoul"]


@pytest.fixture(scope="module")
def tool_model(tiny_chat_dir, tmp_path_factory) -> Path:
    """tiny-chat with a chat template that supports tools, as a local model folder."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tool-model") / "model"
    shutil.copytree(tiny_chat_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    tok.save_pretrained(d)
    return d


def glaive_rows() -> list[dict]:
    """LLaMA-Factory's glaive_toolcall layout: tools and each call as JSON text; "[]" without tools."""
    tools = json.dumps([{"name": "get_weather", "description": "Current weather of a city",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
    rows = []
    for i, c in enumerate(CITIES[:6]):
        rows.append({"conversations": [
            {"from": "human", "value": f"What is the weather in {c} today?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": c}})},
            {"from": "observation", "value": json.dumps({"temperature": 10 + i, "sky": SECRET})},
            {"from": "gpt", "value": f"It is {10 + i} degrees in {c}."}], "tools": tools})
    rows.append({"conversations": [{"from": "human", "value": "Define photoshop."},
                                   {"from": "gpt", "value": "An image editor made by Adobe."}], "tools": "[]"})
    return rows


def openai_rows() -> list[dict]:
    """OpenAI chat format: arguments as JSON text, content null beside tool_calls, two calls in one turn."""
    tools = [{"type": "function", "function": {"name": "convert", "description": "Convert a currency amount",
                                               "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}}}}}]
    rows = []
    for i, c in enumerate(CITIES[6:]):
        rows.append({"messages": [
            {"role": "system", "content": "You convert money."},
            {"role": "user", "content": f"Convert {100 + i} euros to dollars and yen for my trip to {c}."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"a{i}", "type": "function", "function": {"name": "convert", "arguments": json.dumps({"amount": 100 + i, "to": "USD"})}},
                {"id": f"b{i}", "type": "function", "function": {"name": "convert", "arguments": json.dumps({"amount": 100 + i, "to": "JPY"})}}]},
            {"role": "tool", "tool_call_id": f"a{i}", "content": f"{108 + i} USD {SECRET}"},
            {"role": "tool", "tool_call_id": f"b{i}", "content": f"{16000 + i} JPY {SECRET}"},
            {"role": "assistant", "content": f"{100 + i} euros are {108 + i} dollars or {16000 + i} yen."}], "tools": tools})
    return rows


@pytest.fixture(scope="module")
def tool_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tool-data")
    glaive = d / "glaive_toolcall_demo.json"
    glaive.write_text(json.dumps(glaive_rows(), ensure_ascii=False, indent=1), encoding="utf-8")
    oa = d / "openai_tools.jsonl"
    oa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in openai_rows()), encoding="utf-8")
    return glaive, oa


def test_both_layouts_read_as_chat_template_tool_turns(tool_files):
    from qlora_kit import data

    glaive, oa = tool_files
    g = data.load(glaive)
    conv = g.conversations[0]
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["content"] == "" and conv[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert data.tools_of(conv)[0]["function"]["name"] == "get_weather"
    assert data.tools_of(g.conversations[-1]) is None  # "tools": "[]"
    o = data.load(oa)
    conv = o.conversations[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    calls = conv[2]["tool_calls"]  # null content accepted; arguments parsed from JSON text
    assert conv[2]["content"] == "" and [c["function"]["arguments"]["to"] for c in calls] == ["USD", "JPY"]
    assert conv[3]["tool_call_id"] == "a0"


def test_bad_tool_rows_name_file_and_line(tmp_path):
    from qlora_kit import data
    from qlora_kit.errors import UserError

    p = tmp_path / "bad.jsonl"
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{not json"},
                               {"from": "observation", "value": "x"}, {"from": "gpt", "value": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(UserError) as e:
        data.load(p)
    assert f"{p}:1: conversations[1] is not valid JSON" in e.value.message
    assert f"{p}:2: turn 2 (messages[1]) is an empty assistant turn" in e.value.message  # null without a call


def test_data_check_masks_tool_results_and_train_runs_through_the_models_template(tool_model, tool_files, tmp_path):
    glaive, oa = tool_files
    both = tmp_path / "both.jsonl"
    rows = glaive_rows()[:-1] + openai_rows()  # every row calls tools, so the shown sample does too
    both.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    r = run(["data", "check", str(both), "--base-model", str(tool_model), "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tool_calls"]["rows"] == 10 and rep["tool_calls"]["calls"] == 6 + 8 and rep["tool_calls"]["results"] == 6 + 8
    segs = rep["sample"]["segments"]
    loss = "".join(t for t, on in segs if on)
    no_loss = "".join(t for t, on in segs if not on)
    assert "<tool_call>" in loss and ('"name": "get_weather"' in loss or '"name": "convert"' in loss), segs
    assert SECRET not in loss and SECRET in no_loss
    assert "<tools>" in no_loss  # the schemas, rendered by the template from `tools`

    # the exact encoding `train` uses, over every row: calls and answers carry loss, tool results never
    from transformers import AutoTokenizer

    from qlora_kit.data import check as datacheck
    from qlora_kit.recipe import Recipe

    recipe = Recipe.model_validate({"name": "t", "base_model": str(tool_model), "data": {"path": str(both)}})
    tok = AutoTokenizer.from_pretrained(tool_model)
    prep = datacheck.prepare(recipe, tok, {tok.eos_token_id})
    for conv, enc in zip(datacheck.conversations(prep, recipe), prep.encoded):
        trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
        assert SECRET not in trained and "tool_response" not in trained
        for m in conv:
            for call in m.get("tool_calls") or []:
                assert f'"name": "{call["function"]["name"]}", "arguments": {json.dumps(call["function"]["arguments"])}' in trained
            if m["role"] == "assistant" and m["content"]:
                assert m["content"] in trained

    from qlora_kit import train

    out = train.run(make_recipe(str(tool_model), both, max_steps=1, max_length=1024), str(tmp_path / "run"))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["tokenizer"]["template_source"] == "model"
    assert "tool_call" in (out / "tokenizer" / "chat_template.jinja").read_text()  # stored for chat/serve


def test_model_without_tool_template_is_refused_naming_the_row(tool_files, tmp_path, tiny_chat_dir):
    glaive, _ = tool_files
    r = run(["data", "check", str(glaive), "--base-model", "builtin:tiny"])
    assert_user_error(r, f"{glaive}:2: this conversation calls tools (6 such row(s))", "no tool support",
                      "no chat template of its own", "chat_template:")
    from qlora_kit import train
    from qlora_kit.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.run(make_recipe(str(tiny_chat_dir), glaive, max_steps=1), str(out))
    assert f"{glaive}:2:" in e.value.message and "has no tool support: it drops the tool schemas and the tool calls" in e.value.message
    assert not out.exists(), "a refused run leaves nothing behind"


def test_scrubbed_copy_keeps_tool_calls_and_reads_back(tool_files, tmp_path):
    from qlora_kit import data

    _, oa = tool_files
    out = tmp_path / "scrubbed.jsonl"
    r = run(["data", "scrub", str(oa), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert rec["tools"][0]["function"]["name"] == "convert" and "tools" not in rec["messages"][0]
    assert data.load(out).conversations == data.load(oa).conversations
