"""The typed recipe: every shipped recipe validates and maps into the libraries; bad keys fail loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qlora_kit import recipe as R
from qlora_kit.errors import UserError

from conftest import ROOT


@pytest.mark.parametrize("name", R.BUILTIN_RECIPES)
def test_shipped_recipe_validates_and_has_header_and_data(name):
    path = R.find_recipe(name)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# qlora-kit train {name}"), "header comment must give the command"
    assert "Changes from the schema defaults" in text
    rec, _ = R.resolve(name)
    assert rec.name == name
    assert "/" in rec.base_model and not rec.base_model.startswith("builtin:")  # a realistic hub id
    assert 0.15 <= rec.data.eval_fraction <= 0.25
    data = Path(rec.data.path)
    assert data.is_file() and data.is_relative_to(ROOT / "recipes")
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 40
    assert len({r["question"] for r in rows}) == len(rows), "no duplicate questions"


def test_domain_answer_styles():
    def rows(name):
        p = Path(R.resolve(name)[0].data.path)
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    import re

    assert all(re.search(r"《[^》]+》第[一二三四五六七八九十百千零]+条", r["answer"]) for r in rows("legal"))
    keys = None
    for r in rows("finance"):
        obj = json.loads(r["answer"])  # finance answers are JSON and nothing else
        keys = keys or set(obj)
        assert set(obj) == keys
    assert {"principal", "interest_rate"} <= keys


@pytest.mark.parametrize("name", R.BUILTIN_RECIPES)
def test_recipe_maps_into_bnb_lora_and_sft_configs(name, tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.model import bnb_config, lora_config
    from qlora_kit.train import sft_config

    rec, _ = R.resolve(name)
    b = bnb_config(rec)
    assert b.load_in_4bit and b.bnb_4bit_quant_type == "nf4" and b.bnb_4bit_use_double_quant
    assert b.bnb_4bit_compute_dtype == torch.float32  # CPU here; bf16 on a GPU
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lc = lora_config(rec, model)
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (rec.lora.r, rec.lora.lora_alpha, rec.lora.lora_dropout)
    if rec.lora.target_modules == "attention":
        assert "q_proj" in lc.target_modules and "mlp" not in lc.target_modules
    from qlora_kit.train import fastpath

    fast = fastpath.decide(rec, rec.base_model)  # layout, loss head, checkpointing for this machine
    s = sft_config(rec, tmp_path, has_eval=True, fast=fast)
    t = rec.training
    assert s.optim == "paged_adamw_8bit"
    assert s.learning_rate == t.learning_rate and s.num_train_epochs == t.num_train_epochs
    # padding-free: qlora-kit truncates to max_length itself (and reports it), TRL need not
    assert s.padding_free and not s.packing and s.max_length is None
    assert s.save_steps == t.save_steps and s.eval_steps == t.eval_steps
    assert s.per_device_train_batch_size == t.per_device_train_batch_size
    assert s.gradient_accumulation_steps == t.gradient_accumulation_steps
    # gradient_checkpointing: auto, decided by the memory plan within this machine's RAM
    assert s.activation_checkpointing is (fast.every_n_layers > 0) and s.eval_strategy == "steps"
    assert not s.use_liger_kernel  # qlora-kit applies liger itself (TRL would switch its fused loss off)
    assert s.use_cpu is True and s.bf16 is False


def _write(tmp_path, text, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    p = _write(tmp_path, "base_model: x/y\nlora:\n  rnak: 8\ntraining:\n  learning_rte: 1e-4\n")
    with pytest.raises(UserError) as e:
        R.resolve(str(p))
    msg = str(e.value)
    assert f"{p}:3: lora.rnak: unknown key; did you mean lora.r?" in msg
    assert f"{p}:5: training.learning_rte: unknown key; did you mean training.learning_rate?" in msg


def test_key_in_wrong_section_is_pointed_to_the_right_one(tmp_path):
    p = _write(tmp_path, "base_model: x/y\nlora:\n  learning_rate: 1e-4\n")
    with pytest.raises(UserError, match=r"lora.learning_rate: unknown key; did you mean training.learning_rate\?"):
        R.resolve(str(p))


def test_wrong_type_names_field_and_value(tmp_path):
    p = _write(tmp_path, "base_model: x/y\nlora:\n  r: lots\n")
    with pytest.raises(UserError, match=r"r.yaml:3: lora.r: .*valid integer.*'lots'"):
        R.resolve(str(p))


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    # PyYAML reads 2e-4 (no dot) as a string; the typed schema makes it a number
    p = _write(tmp_path, "base_model: x/y\ntraining:\n  learning_rate: 2e-4\n")
    assert yaml.safe_load(p.read_text())["training"]["learning_rate"] == "2e-4"
    assert R.resolve(str(p))[0].training.learning_rate == pytest.approx(2e-4)


def test_precedence_defaults_file_set_flags(tmp_path):
    p = _write(tmp_path, "base_model: file/model\nlora:\n  r: 8\ntraining:\n  learning_rate: 1e-4\n")
    rec, _ = R.resolve(str(p))
    assert rec.lora.lora_alpha == R.LoraSettings().lora_alpha  # default kept
    assert rec.lora.r == 8 and rec.base_model == "file/model"  # file beats default
    rec, _ = R.resolve(str(p), ["lora.r=32", "base_model=set/model"])
    assert rec.lora.r == 32 and rec.base_model == "set/model"  # --set beats file
    rec, _ = R.resolve(str(p), ["base_model=set/model"], {"base_model": "flag/model"})
    assert rec.base_model == "flag/model"  # explicit flag beats --set


def test_set_error_names_the_override(tmp_path):
    p = _write(tmp_path, "base_model: x/y\n")
    with pytest.raises(UserError, match=r"--set lora\.rr=3: lora\.rr: unknown key; did you mean lora\.r\?"):
        R.resolve(str(p), ["lora.rr=3"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        R.resolve(str(p), ["lora.r"])


def test_paths_resolve_relative_to_recipe_file(tmp_path, monkeypatch):
    sub = tmp_path / "proj"
    sub.mkdir()
    p = _write(sub, "base_model: ./models/m\ndata:\n  path: qa.jsonl\n")
    monkeypatch.chdir(tmp_path)
    rec, _ = R.resolve(str(p))
    assert rec.data.path == str(sub / "qa.jsonl")
    assert rec.base_model == str(sub / "models" / "m")


def test_saved_recipe_round_trips(tmp_path):
    rec, _ = R.resolve("legal", ["lora.r=12"])
    out = tmp_path / "recipe.yaml"
    out.write_text(rec.to_yaml(), encoding="utf-8")
    assert R.load_saved(out) == rec


def test_yaml_must_be_safe(tmp_path):
    p = _write(tmp_path, "base_model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        R.resolve(str(p))
