"""The memory planner: exact bytes where bytes are exact, sane recommendations, offline configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlora_kit import plan
from qlora_kit.recipe import Recipe

from conftest import ROOT


@pytest.fixture(scope="module")
def qwen_slice(tmp_path_factory):
    """A real Qwen2.5-1.5B-shaped model cut to 2 layers (vocabulary cut too), saved once."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = dict(plan.KNOWN["Qwen/Qwen2.5-1.5B-Instruct"], num_hidden_layers=2, vocab_size=4096)
    d = tmp_path_factory.mktemp("qwen-slice")
    Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})).save_pretrained(d)
    return d, cfg


@pytest.mark.parametrize("target,double_quant", [("attention", True), ("all-linear", False)])
def test_exact_components_match_a_real_4bit_model(qwen_slice, target, double_quant):
    import bitsandbytes as bnb

    from qlora_kit.model import attach_lora, load_4bit

    d, cfg = qwen_slice
    rec = Recipe.model_validate({"base_model": str(d), "lora": {"r": 8, "target_modules": target},
                                 "quantization": {"bnb_4bit_use_double_quant": double_quant}})
    model = load_4bit(str(d), rec)
    weights = consts = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            weights += m.weight.data.numel() * m.weight.data.element_size()
            qs = m.weight.quant_state
            consts += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                consts += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    peft = attach_lora(model, rec)
    lora = sum(p.numel() for n, p in peft.named_parameters() if p.requires_grad)
    est = plan.estimate(plan.Shape.from_config(cfg), r=8, target=target, max_length=256, micro_batch=1,
                        double_quant=double_quant)
    assert est["weights_4bit"] == weights
    assert abs(est["quant_constants"] - consts) <= 64  # bitsandbytes' small code tables aside
    assert est["lora_weights_fp32"] == 4 * lora and est["optimizer_8bit_adam"] == 2 * lora


def test_recommendations_are_consistent():
    rec = Recipe.model_validate({"base_model": "meta-llama/Llama-3.1-8B-Instruct",
                                 "training": {"max_length": 2048, "per_device_train_batch_size": 1}})
    p = plan.make(rec, gpu_memory=24 * plan.GiB)
    assert p.fits and p.source == "built-in config" and p.best_micro_batch >= 1
    assert 6 * plan.GiB < p.total < 12 * plan.GiB  # DESIGN anchors: ~7 GiB optimised, ~11 GiB blog recipe
    assert p.longest_max_length > 2048
    over = plan.make(rec, gpu_memory=24 * plan.GiB, max_length=p.longest_max_length + 4096)
    assert not over.fits
    small = plan.make(rec, gpu_memory=6 * plan.GiB)
    assert not small.fits and small.best_micro_batch == 0
    lengths = [plan.make(rec, gpu_memory=g * plan.GiB).longest_max_length for g in (12, 24, 48)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_parse_size():
    assert plan.parse_size("24GiB") == 24 * plan.GiB and plan.parse_size("80GB") == 80 * 10**9
    from qlora_kit.errors import UserError

    with pytest.raises(UserError, match="expected a size"):
        plan.parse_size("lots")


def test_cli_plan_offline(tmp_path, qwen_slice):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "plan", "legal", "--json"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["model"] == "Qwen/Qwen2.5-7B-Instruct" and p["fits"] and set(p["parts"]) >= {"weights_4bit", "logits_and_loss"}
    d, _ = qwen_slice
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "plan", "finance", "--base-model", str(d / "config.json"),
                        "--gpu-memory", "8GiB"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0 and "fits in 8.0 GiB" in r.stderr
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "plan", "legal", "--base-model", "nobody/none"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "cannot get the config" in r.stderr


def test_bench_train_runs_on_cpu(tmp_path):
    """The benchmark itself: both variants train through the real 4-bit path and a result is written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QLORA_KIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--warmup", "1", "--steps", "3",
                        "--batch", "2", "--max-length", "64", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(tmp_path.glob("bench_train-*.json")).read_text())
    assert out["results"]["plain"]["non_pad_tokens_per_step"] == out["results"]["qlora-kit"]["non_pad_tokens_per_step"]
    assert out["speedup_tokens_per_s"] > 0 and out["measured_peak_gib"].startswith("not measured")
    assert out["saved_for_backward_measured_bytes"] > 0
