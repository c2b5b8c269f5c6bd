"""A merged model that stands alone (issue 16, item 9): a merged folder copied away and its run
deleted still answers as the adapter did, with plain transformers and with `qlora-kit generate`;
its GGUF carries the template with the run's system prompt and the stop tokens; serve's `base`
model renders no adapter's system prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from qlora_kit import export, serve
from qlora_kit.serve import engine as generate
from qlora_kit.template import with_default_system

QK = [sys.executable, "-m", "qlora_kit.cli"]
PROMPT = "试用期最长多久？"
SYSTEM = "你是律师。"  # conftest.make_recipe's data.system_prompt
N = 16


def cli(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(QK + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def next_token_logits(model, tok, text: str):
    import torch

    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


@pytest.fixture(scope="module")
def adapter_logits(tiny_run):
    """The adapter on the 4-bit base (as trained), on the prompt qlora-kit renders: with the run's system prompt."""
    engine = generate.load(tiny_run[0])
    tok = engine.current.tokenizer
    text = tok.apply_chat_template(engine.messages(PROMPT), tokenize=False, add_generation_prompt=True)
    assert SYSTEM in text
    return next_token_logits(engine.model, tok, text)


@pytest.fixture(scope="module")
def moved(tiny_run, tmp_path_factory):
    """(the adapter's greedy answer, the merged folder moved elsewhere with its run deleted, run.json)."""
    d = tmp_path_factory.mktemp("standalone")
    run = d / "run"
    shutil.copytree(tiny_run[0], run)  # a copy, so deleting it leaves the shared run alone
    r = cli(["generate", str(run), "-p", PROMPT, "--max-new-tokens", str(N)])
    assert r.returncode == 0, r.stderr
    r2 = cli(["merge", str(run), "--dtype", "fp32"])
    assert r2.returncode == 0, r2.stderr
    away = d / "elsewhere" / "legal-model"
    shutil.copytree(run / "merged", away)
    shutil.rmtree(run)
    return r.stdout.rstrip("\n"), away, json.loads((tiny_run[0] / "run.json").read_text())


def test_plain_transformers_answers_like_the_adapter(moved, adapter_logits):
    from qlora_kit.merge import TOLERANCE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want, folder, _ = moved
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    msgs = [{"role": "user", "content": PROMPT}]  # no system message: the template supplies the run's
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert SYSTEM in text
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=N, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == want
    # the same distribution as the adapter's, which a prompt without the run's system prompt does not give
    # (the tiny model barely reads the prompt: the gap is small, but well outside merge's tolerance)
    same = float((next_token_logits(model, tok, text) - adapter_logits).abs().max())
    bare = tok.apply_chat_template([{"role": "system", "content": ""}] + msgs, tokenize=False, add_generation_prompt=True)
    gap = float((next_token_logits(model, tok, bare) - adapter_logits).abs().max())
    assert same <= TOLERANCE["float32"] < gap and same * 100 < gap, (same, gap)
    # a system message of the caller's own replaces the default
    mine = tok.apply_chat_template([{"role": "system", "content": "You are a pirate."}] + msgs, tokenize=False)
    assert "You are a pirate." in mine and SYSTEM not in mine


def test_generation_config_stops_at_the_runs_stop_tokens(moved):
    _, folder, info = moved
    stops = info["tokenizer"]["stop_token_ids"]
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == stops
    meta = json.loads((folder / "qlora_kit_merge.json").read_text())
    assert meta["system_prompt"] == SYSTEM and meta["system_prompt_in_template"] and meta["stop_token_ids"] == stops


def test_generate_on_the_moved_folder_answers_like_the_adapter(moved):
    want, folder, _ = moved
    r = cli(["generate", str(folder), "-p", PROMPT, "--max-new-tokens", str(N)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want


def test_gguf_of_the_moved_folder_carries_template_and_stops(moved, tmp_path):
    import gguf
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    _, folder, info = moved
    rep = export.run(folder, "gguf", tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(rep["out"])
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tok = AutoTokenizer.from_pretrained(folder)
    template = meta["tokenizer.chat_template"]
    assert template == tok.chat_template and SYSTEM in template
    assert meta["tokenizer.ggml.eos_token_id"] in info["tokenizer"]["stop_token_ids"]
    # rendered as a Jinja engine does from the file alone: the run's prompt when none is given
    msgs = [{"role": "user", "content": PROMPT}]
    kw = dict(add_generation_prompt=True, bos_token=tok.bos_token or "", eos_token=tok.eos_token)
    got = _compile_jinja_template(template).render(messages=msgs, **kw)
    assert got == tok.apply_chat_template([{"role": "system", "content": SYSTEM}] + msgs, tokenize=False,
                                          add_generation_prompt=True)


def test_default_system_prompt_survives_quotes_braces_and_newlines():
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from qlora_kit.template import DEFAULT_CHAT_TEMPLATE

    tricky = '你是律师。 "quoted" {{ not_a_var }} {% raw %} \\ back\nline two 😀'
    baked = with_default_system(DEFAULT_CHAT_TEMPLATE, tricky)
    assert with_default_system(baked, "another") == baked  # baked once
    msgs = [{"role": "user", "content": "q"}]
    render = lambda t, m: _compile_jinja_template(t).render(messages=m, bos_token="<s>", eos_token="</s>",  # noqa: E731
                                                            add_generation_prompt=True)
    assert render(baked, msgs) == render(DEFAULT_CHAT_TEMPLATE, [{"role": "system", "content": tricky}] + msgs)


def test_serve_base_model_renders_no_adapters_system_prompt(tiny_run):
    engine = generate.Engine.from_runs({"legal": tiny_run[0]})
    service = serve.Service(engine, default_max_tokens=4)
    body = lambda m: {"model": m, "messages": [{"role": "user", "content": PROMPT}]}  # noqa: E731
    base, legal = service.parse(body("base")), service.parse(body("legal"))
    assert [m["role"] for m in base.messages] == ["user"]
    assert legal.messages[0] == {"role": "system", "content": SYSTEM}
    rendered = engine.template_for(None).tokenizer.apply_chat_template(base.messages, tokenize=False,
                                                                       add_generation_prompt=True)
    assert SYSTEM not in rendered and PROMPT in rendered
    assert service.model("base")["system_prompt"] is None and service.model("legal")["system_prompt"] == SYSTEM
    assert SYSTEM not in json.dumps(engine.messages(PROMPT, adapter=None), ensure_ascii=False)  # chat's /base too
