"""training.max_length above the model's context (issue 16, item 4): `data check` and `train` say so
and cap it at the model's max_position_embeddings (a warning, not a refusal), and the run records
the cap in run.json, recipe.yaml and the run card."""

from __future__ import annotations

import json

import yaml

from conftest import SHARED, make_recipe, write_qa
from test_cli import run

LAW = SHARED / "data" / "disc-law-qa" / "qa_short_answer.json"


def test_data_check_caps_at_stories260k_context(stories_dir):
    if not LAW.is_file():
        import pytest

        pytest.skip("../shared/data/disc-law-qa is not present")
    r = run(["data", "check", str(LAW), "--base-model", str(stories_dir), "--max-length", "2048", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    tok = rep["tokens"]
    assert tok["max_length"] == 512 and tok["length"]["max"] == 512  # samples of 855-1006 tokens are cut at 512
    assert {k: tok["context"][k] for k in ("requested", "used", "model_context")} == \
        {"requested": 2048, "used": 512, "model_context": 512}
    warnings = "\n".join(rep["warnings"])
    assert "training.max_length=2048 is above the model's context of 512 tokens" in warnings
    assert "max_length is already the model's context (512 tokens): shorten" in warnings  # not "raise max_length"


def test_train_records_the_cap(stories_dir, tmp_path, capsys):
    from qlora_kit import train

    data = write_qa(tmp_path / "qa.jsonl", 12)
    out = train.run(make_recipe(str(stories_dir), data, max_steps=1, max_length=1024, per_device_train_batch_size=2),
                    str(tmp_path / "run"))
    assert "training.max_length=1024 is above the model's context of 512 tokens" in capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert info["max_length_capped"]["requested"] == 1024 and info["max_length_capped"]["used"] == 512
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["max_length"] == 512
    assert "| max_length capped | 1024 -> 512" in (out / "README.md").read_text()


def test_builtin_tiny_caps_only_above_its_context(qa_file, tiny_dir):
    r = run(["data", "check", str(qa_file), "--base-model", "builtin:tiny", "--max-length", "4096", "--json"])
    assert r.returncode == 0, r.stderr
    tok = json.loads(r.stdout)["tokens"]
    assert tok["max_length"] == 1024 and tok["context"]["requested"] == 4096
    from transformers import AutoTokenizer

    from qlora_kit.data.check import cap_to_context

    recipe = make_recipe(str(tiny_dir), qa_file, max_length=1024)
    assert cap_to_context(recipe, AutoTokenizer.from_pretrained(tiny_dir)) is None  # at the context: untouched
    assert recipe.training.max_length == 1024


def test_model_context_reads_scaled_and_nested_configs(tmp_path):
    from qlora_kit.data.check import model_context

    (tmp_path / "config.json").write_text(json.dumps(
        {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}))
    assert model_context(tmp_path) == 131072  # Qwen2.5 with YaRN
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 8192}}))
    assert model_context(tmp_path) == 8192
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    assert model_context(tmp_path) is None
