"""`qlora-kit merge --adapter RUN=W --adapter RUN=W --method M` (issue 16, item 8): two real tiny
runs on one base, trained on different data with different seeds, combined through PEFT's
add_weighted_adapter, merged and checked against the combined adapter on the 4-bit base; the
combination is a run directory that `generate`, `chat` and `serve` load under one name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_recipe, write_qa
from safetensors.torch import load_file

from qlora_kit import merge, train
from qlora_kit.serve import engine as generate
from qlora_kit.errors import UserError

QK = [sys.executable, "-m", "qlora_kit.cli"]
PROMPT = "合同解除后押金怎么退？"
TOL_FP32 = merge.TOLERANCE["float32"]  # the tolerance today's merge test holds a single run to


def cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(QK + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def runs(tiny_dir, tiny_chat_dir, qa_file, tmp_path_factory):
    """legal (the shared qa file, seed 1), contracts (other questions and answers, seed 2), both r=4
    on builtin:tiny; wide (r=8, same base) and chat (another base)."""
    d = tmp_path_factory.mktemp("combine")
    contracts = write_qa(d / "contracts.jsonl", n=24, template="合同第{i}条的违约金过高怎么办？",
                         answer="可以请求人民法院或者仲裁机构予以调整，第{i}项。")
    rec = lambda data, **t: make_recipe(str(tiny_dir), data, max_steps=3, eval_steps=3, save_steps=3, **t)  # noqa: E731
    out = {
        "legal": train.run(rec(qa_file, seed=1, learning_rate=2e-2), str(d / "legal")),
        "contracts": train.run(rec(contracts, seed=2, learning_rate=3e-2), str(d / "contracts")),
        "chat": train.run(make_recipe(str(tiny_chat_dir), qa_file, max_steps=2, eval_steps=2, save_steps=2), str(d / "chat")),
    }
    wide = rec(contracts, seed=3)
    out["wide"] = train.run(wide.model_copy(update={"lora": wide.lora.model_copy(update={"r": 8})}), str(d / "wide"))
    return out


def logits(model, tok, text: str):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def adapter_logits(adapter_dir: Path, base: Path, tok, text: str):
    """The combined adapter on the 4-bit base, loaded with plain PEFT (no merge code involved)."""
    from peft import PeftModel

    from qlora_kit.model import load_4bit
    from qlora_kit.recipe import load_saved

    model = PeftModel.from_pretrained(load_4bit(str(base), load_saved(adapter_dir.parent / "recipe.yaml")), adapter_dir).eval()
    return logits(model, tok, text)


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{module: scaling * B @ A} from an adapter's files."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = load_file(adapter_dir / "adapter_model.safetensors")
    s = cfg["lora_alpha"] / cfg["r"]
    return {k.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight"):
            s * w[k.replace("lora_A", "lora_B")].float() @ w[k].float() for k in w if "lora_A" in k}


def test_linear_combination_merged_equals_combined_adapter_on_4bit(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "legal-mix"
    r = cli(["merge", "--adapter", f"{runs['legal']}=0.7", "--adapter", f"{runs['contracts']}=0.3",
             "--method", "linear", "--out", str(out), "--dtype", "fp32"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "merged")
    # the combination is a run directory of its own, and says what it combines
    for rel in ("run.json", "recipe.yaml", "README.md", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json",
                "merged/config.json", "merged/qlora_kit_merge.json"):
        assert (out / rel).is_file(), rel
    info = json.loads((out / "run.json").read_text())
    c = info["combination"]
    assert c["method"] == "linear" and c["r"] == 4 and c["density"] is None
    assert [(a["run"], a["weight"]) for a in c["adapters"]] == [(str(runs["legal"].resolve()), 0.7),
                                                                (str(runs["contracts"].resolve()), 0.3)]
    report = json.loads((out / "merged" / "qlora_kit_merge.json").read_text())
    assert report["max_abs_logit_diff"] <= TOL_FP32 and report["probes"] >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left"

    # checked here again, independently: plain PEFT with the combined adapter on the 4-bit base
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ref = adapter_logits(out / "adapter", Path(info["base_model_path"]), tok, text)
    got = logits(AutoModelForCausalLM.from_pretrained(out / "merged").eval(), tok, text)
    assert float((ref - got).abs().max()) <= TOL_FP32
    # ... and it is a combination: neither run alone gives these logits
    for name in ("legal", "contracts"):
        alone = adapter_logits(runs[name] / "adapter", Path(info["base_model_path"]), tok, text)
        assert float((alone - ref).abs().max()) > 1e-3, name


def test_cat_combination_is_the_weighted_sum_of_the_deltas(runs, tmp_path):
    """cat is exact: the merged weights are the dequantized base plus 0.7 dA + 0.3 dB."""
    from qlora_kit.model import load_4bit
    from qlora_kit.recipe import load_saved

    rep = merge.combine([f"{runs['legal']}=0.7", f"{runs['contracts']}=0.3"], tmp_path / "cat", "cat", dtype="fp32")
    assert rep["max_abs_logit_diff"] <= TOL_FP32 and rep["combination"]["r"] == 8  # ranks add up
    merged = {}
    for f in Path(rep["out"]).glob("*.safetensors"):
        merged.update(load_file(f))
    base = load_4bit(str(json.loads((runs["legal"] / "run.json").read_text())["base_model_path"]),
                     load_saved(runs["legal"] / "recipe.yaml")).dequantize(dtype=torch.float32)
    base_sd = base.state_dict()
    da, db = lora_deltas(runs["legal"] / "adapter"), lora_deltas(runs["contracts"] / "adapter")
    assert da and set(da) == set(db)
    for k in da:
        want = base_sd[k].float() + 0.7 * da[k] + 0.3 * db[k]
        torch.testing.assert_close(merged[k].float(), want, atol=1e-5, rtol=0, msg=k)


def test_ties_uses_a_density_and_dare_ties_is_reproducible(runs, tmp_path):
    specs = [f"{runs['legal']}=0.5", f"{runs['contracts']}=0.5"]
    a = merge.combine(specs, tmp_path / "d1", "dare_ties", adapter_only=True)
    merge.combine(specs, tmp_path / "d2", "dare_ties", adapter_only=True)
    assert a["combination"]["density"] == merge.DEFAULT_DENSITY and a["out"] == str(tmp_path / "d1")
    assert not (tmp_path / "d1" / "merged").exists()  # --adapter-only
    wa, wb = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("d1", "d2"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded: the same draw
    t = merge.combine(specs, tmp_path / "t", "ties", density=0.3, adapter_only=True)
    assert t["combination"]["density"] == 0.3
    with pytest.raises(UserError, match="--density applies to"):
        merge.combine(specs, tmp_path / "x", "linear", density=0.3)
    with pytest.raises(UserError, match=r"in \(0, 1\]"):
        merge.combine(specs, tmp_path / "x", "ties", density=1.5)
    assert not (tmp_path / "x").exists()


def test_refusals_exit_2_before_anything_is_written(runs, tmp_path):
    out = tmp_path / "mix"
    r = cli(["merge", "--adapter", f"{runs['legal']}=0.5", "--adapter", f"{runs['chat']}=0.5", "--out", str(out)])
    legal_base = json.loads((runs["legal"] / "run.json").read_text())["base_model"]
    chat_base = json.loads((runs["chat"] / "run.json").read_text())["base_model"]
    assert legal_base != chat_base
    assert_user_error(r, legal_base, chat_base, "share")
    r = cli(["merge", "--adapter", f"{runs['legal']}=0.5", "--adapter", f"{runs['wide']}=0.5", "--method", "ties", "--out", str(out)])
    assert_user_error(r, "r=4", "r=8", "--method cat")
    r = cli(["merge", "--adapter", f"{runs['legal']}", "--adapter", f"{runs['wide']}=0.5", "--out", str(out)])
    assert_user_error(r, "RUN_DIR=WEIGHT")
    r = cli(["merge", str(runs["legal"]), "--method", "cat"])
    assert_user_error(r, "--adapter")
    assert not out.exists() and not (runs["legal"] / "merged").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_chat_and_serve_load_the_combination_under_one_name(runs, tmp_path):
    # a cat combination of different ranks: only the combined adapter is written, for serving
    mix = tmp_path / "legal-mix"
    merge.combine([f"{runs['legal']}=0.7", f"{runs['wide']}=0.3"], mix, "cat", adapter_only=True)
    engine = generate.load(mix)
    want = generate.answer(engine, PROMPT, 12)

    r = cli(["chat", "--adapter", f"legal-mix={mix}", "-p", PROMPT, "--max-new-tokens", "12"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(QK + ["serve", f"legal-mix={mix}", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                models = {m["id"]: m for m in _get(url + "/v1/models")["data"]}
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() - t0 < 120, "server did not start"
                time.sleep(0.5)
        assert set(models) == {"legal-mix", "base"}
        assert models["legal-mix"]["run_dir"] == str(mix) and models["legal-mix"]["system_prompt"] == "你是律师。"
        assert models["base"]["system_prompt"] is None  # the base model has no adapter's prompt
        got = _get(url + "/v1/chat/completions", {"model": "legal-mix", "max_tokens": 12,
                                                  "messages": [{"role": "user", "content": PROMPT}]})
        assert got["choices"][0]["message"]["content"] == want
    finally:
        proc.terminate()
        proc.wait(30)
