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
    import torch

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
    assert est["lora_weights_fp32"] == 4 * lora
    # training.optim decides the optimizer's bytes: the real optimizers' state tensors, summed
    params = [p for p in peft.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    for optim in ("paged_adamw_8bit", "adamw_torch"):
        # an earlier run in this process (a trained embedding) leaves bitsandbytes' process-wide
        # overrides behind; train.run clears them before its optimizer, so does this optimizer
        bnb.optim.GlobalOptimManager.get_instance().initialize()
        opt = (bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else torch.optim.AdamW)(params, lr=1e-4)
        opt.step()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
        planned = plan.estimate(plan.Shape.from_config(cfg), r=8, target=target, max_length=256, micro_batch=1,
                                double_quant=double_quant, optim=optim)["optimizer_state"]
        assert planned == sum(storages.values()), optim
    assert plan.estimate(plan.Shape.from_config(cfg), r=8, target=target, max_length=256, micro_batch=1,
                         optim="adamw_torch")["optimizer_state"] > 3.5 * lora * 2  # fp32 states, not 8-bit


def test_recommendations_are_consistent():
    rec = Recipe.model_validate({"base_model": "meta-llama/Llama-3.1-8B-Instruct",
                                 "training": {"max_length": 2048, "per_device_train_batch_size": 1,
                                              "gradient_checkpointing": True}})
    p = plan.make(rec, gpu_memory=24 * plan.GiB)
    assert p.fits and p.source == "built-in config" and p.best_micro_batch >= 1
    assert 6 * plan.GiB < p.total < 12 * plan.GiB  # DESIGN anchors: ~7 GiB optimised, ~11 GiB blog recipe
    assert p.checkpointing == "all layers" and p.checkpointing_why == "training.gradient_checkpointing: true"
    assert p.longest_max_length > 2048
    over = plan.make(rec, gpu_memory=24 * plan.GiB, max_length=p.longest_max_length + 4096)
    assert not over.fits
    small = plan.make(rec, gpu_memory=6 * plan.GiB)
    assert not small.fits and small.best_micro_batch == 0
    lengths = [plan.make(rec, gpu_memory=g * plan.GiB).longest_max_length for g in (12, 24, 48)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_checkpointing_auto_follows_the_budget():
    """gradient_checkpointing: auto: none when the step fits, fewer checkpointed layers before all,
    all when nothing else fits; true and false are honoured whatever the budget."""
    rec = Recipe.model_validate({"base_model": "meta-llama/Llama-3.1-8B-Instruct",
                                 "training": {"max_length": 2048, "per_device_train_batch_size": 1}})
    assert rec.training.gradient_checkpointing == "auto"
    big = plan.make(rec, gpu_memory=80 * plan.GiB)
    assert big.every_n_layers == 0 and big.checkpointing == "none" and big.fits and "fits without" in big.checkpointing_why
    tight = plan.make(rec, gpu_memory=18 * plan.GiB)  # auto plans within 90 % of the budget
    assert tight.every_n_layers > 1 and tight.fits and tight.total <= 0.9 * 18 * plan.GiB < big.total
    assert tight.checkpointing.startswith("every ") and "over 16.2 GiB planned of the 18.0 GiB GPU" in tight.checkpointing_why
    small = plan.make(rec, gpu_memory=8 * plan.GiB)
    assert small.every_n_layers == 1 and small.fits and small.total < tight.total
    none_fits = plan.make(rec, gpu_memory=4 * plan.GiB)
    assert none_fits.every_n_layers == 1 and not none_fits.fits and "even with every layer" in none_fits.checkpointing_why
    for setting, n in ((True, 1), (False, 0)):
        fixed = rec.model_copy(deep=True)
        fixed.training.gradient_checkpointing = setting
        assert plan.make(fixed, gpu_memory=80 * plan.GiB if setting else 4 * plan.GiB).every_n_layers == n
    # the same model of memory on CPU: fp32 activations, no CUDA context
    cpu = plan.make(rec, gpu_memory=80 * plan.GiB, device="cpu")
    assert cpu.parts["cuda_context"] == 0 and cpu.parts["activations"] > big.parts["activations"]


@pytest.mark.parametrize("target,dtype", [("attention", "float32"), ("all-linear", "float32"), ("attention", "bfloat16")])
def test_activation_bytes_match_saved_tensors(tmp_path, target, dtype):
    """What the plan counts for activations, against every tensor autograd saves (measured with
    saved_tensors_hooks, parameters and quantization constants excluded) on a 2-layer slice in
    qlora-kit's training path: LoRA with dropout and fp32 weights, per-sequence SDPA, no
    checkpointing; fp32 compute, or bf16 under autocast as the Trainer runs it."""
    import contextlib

    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit import attention
    from qlora_kit.model import attach_lora, load_4bit

    cfg = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               vocab_size=1024, num_hidden_layers=2, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp_path)
    rec = Recipe.model_validate({"base_model": str(tmp_path), "lora": {"r": 8, "target_modules": target},
                                 "quantization": {"bnb_4bit_compute_dtype": dtype}})
    model = attach_lora(load_4bit(str(tmp_path), rec, attn_implementation=attention.register()), rec).train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # train keeps fp32 LoRA weights
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            fixed |= {t.untyped_storage().data_ptr() for t in (qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code)
                      if qs.nested else ())) if torch.is_tensor(t)}
    where, saved = ["head"], {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in fixed:
            saved.setdefault(where[0], {})[s.data_ptr()] = s.nbytes()
        return t

    for layer in model.get_base_model().model.layers:
        layer.register_forward_pre_hook(lambda *a: where.__setitem__(0, "layers"))
        layer.register_forward_hook(lambda *a: where.__setitem__(0, "head"))
    T = 256
    ids = torch.randint(0, 1024, (1, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    measured = sum(saved["layers"].values())
    planned = plan.estimate(plan.Shape.from_config(cfg), r=8, target=target, max_length=T, micro_batch=1,
                            checkpointing=False, act_bytes=4 if dtype == "float32" else 2, device="cpu",
                            loss_head="model")["activations"]
    assert abs(planned - measured) / measured < 0.05, (planned, measured)


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


def test_cli_plan_does_not_import_torch():
    """`plan` reads a config and does arithmetic: no torch (a second of start-up) unless liger-kernel
    is installed, when the loss head depends on whether a GPU is there."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel installed: plan asks torch whether there is a GPU")
    code = ("import sys\nfrom qlora_kit.cli import app\n"
            "try:\n    app(['plan', 'legal', '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr


def test_bench_train_runs_on_cpu(tmp_path):
    """The benchmark itself: the blog recipe and `qlora-kit train`, each in its own process, timed by
    part with one torch thread, and a result written (a tiny real-shaped slice, two steps)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QLORA_KIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--jobs", "tiny", "--reps", "1",
                        "--slice-steps", "2", "--slice-warmup", "1", "--slice-batch", "2", "--slice-max-length", "128",
                        "--no-memory", "--cache", str(tmp_path / "slices"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "bench_train-cpu.json").read_text())
    job = out["jobs"]["tiny"]
    for v in ("plain", "qlora-kit"):
        run = job["runs"][v][0]
        assert run["steps_timed"] == 1 and run["torch_threads"] == 1 and run["non_pad_tokens"] > 0
        assert run["tokens_per_cpu_s"] > 0 and run["peak_rss_mb_process"] > 100
        assert run["parts_s_per_step_wall"]["layers"] > 0 and run["parts_s_per_step_wall"]["loss_head"] > 0
        assert sum(run["parts_s_per_step_wall"].values()) == pytest.approx(run["s_per_step_wall"], rel=1e-6)
    assert job["runs"]["plain"][0]["gradient_checkpointing"] is True  # the blog recipe, not qlora-kit's switches
    assert job["ratio"]["per_cpu_s_median"] > 0 and (tmp_path / "bench_train-cpu.md").is_file()


def test_dequantized_weights_kept_only_when_they_fit():
    """The plan keeps the 4-bit weights dequantized for backward only without checkpointing and
    within the budget; the kept bytes are the frozen linears in the compute dtype."""
    rec = Recipe.model_validate({"base_model": "meta-llama/Llama-3.1-8B-Instruct",
                                 "training": {"max_length": 2048, "per_device_train_batch_size": 1}})
    big, mid, small = (plan.make(rec, gpu_memory=g * plan.GiB) for g in (80, 30, 12))
    assert big.keep_dequantized and big.every_n_layers == 0 and big.fits
    kept = big.parts["activations_dequantized_weights"]
    lin = plan.Shape.from_config(plan.KNOWN["meta-llama/Llama-3.1-8B-Instruct"]).linears()
    assert kept == (sum(i * o for i, o in lin.values()) * 32 - sum(lin[t][0] * lin[t][1] for t in ("q_proj", "k_proj", "v_proj"))) * 2
    assert not mid.keep_dequantized and mid.every_n_layers == 0 and "would not fit" in mid.keep_dequantized_why
    assert not small.keep_dequantized and small.every_n_layers > 0 and small.parts["activations_dequantized_weights"] == 0


def test_plan_takes_the_loss_head_train_takes():
    """`plan` (a GPU) uses train's choice of loss head (fastpath.choose_loss_head): liger_kernel: false
    is the tiled head for a large vocabulary even where liger-kernel is installed, true is liger."""
    rec = Recipe.model_validate({"base_model": "Qwen/Qwen2.5-7B-Instruct", "training": {"max_length": 2048}})
    shape = plan.Shape.from_config(plan.KNOWN["Qwen/Qwen2.5-7B-Instruct"])
    for setting, head in ((False, "chunked"), (True, "liger")):
        rec.training.liger_kernel = setting
        p = plan.make(rec, gpu_memory=80 * plan.GiB)
        expected = plan.estimate(shape, r=rec.lora.r, target=rec.lora.target_modules, max_length=2048,
                                 micro_batch=rec.training.per_device_train_batch_size, checkpointing=p.every_n_layers,
                                 optim=rec.training.optim, loss_head=head, keep_dequantized=p.keep_dequantized)
        assert p.parts == expected, setting
