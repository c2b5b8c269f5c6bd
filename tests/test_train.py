"""The real QLoRA path end to end on CPU: 4-bit NF4 base, LoRA, SFTTrainer, paged 8-bit AdamW, merge.

Nothing in the training stack is mocked; the models are tiny so it runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import data, merge, train
from qlora_kit.recipe import load_saved

from conftest import Snapshot, make_recipe

PROBE = "### Question:\n劳动合同期满，用人单位不续签，要给经济补偿吗？\n\n### Answer:\n"


def test_lora_changed_base_unchanged_and_loss_fell(tiny_run):
    _, snap = tiny_run
    lora = [n for n in snap.before if "lora_" in n]
    base = [n for n in snap.before if "lora_" not in n]
    assert lora and base
    for n in lora:
        assert not torch.equal(snap.before[n], snap.after[n]), f"{n} did not train"
    for n in base:
        assert torch.equal(snap.before[n], snap.after[n]), f"base weight {n} changed"
    # the attention projections under LoRA are bitsandbytes 4-bit layers
    assert len(snap.linear4bit_targets) == 8 and all(is4 for _, is4 in snap.linear4bit_targets)
    assert all(".self_attn." in n for n, _ in snap.linear4bit_targets)
    assert snap.loss[-1] < snap.loss[0] - 0.1, snap.loss  # a real drop (random 2-layer base, attention LoRA only)


def test_run_directory_is_self_describing(tiny_run, qa_file):
    run_dir, _ = tiny_run
    for rel in ("recipe.yaml", "run.json", "README.md", "metrics.json", "adapter/adapter_model.safetensors",
                "adapter/adapter_config.json", "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"):
        assert (run_dir / rel).exists(), rel
    # save_steps=3 over 10 steps, save_total_limit=2: the two newest checkpoints are kept
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-9"]
    assert list((run_dir / "logs").glob("events.out.tfevents.*")), "TensorBoard logs"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["data"]["sha256"] == data.file_sha256(qa_file)
    assert info["data"]["train_rows"] == 18 and info["data"]["eval_rows"] == 6
    assert info["versions"]["bitsandbytes"] != "not installed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 10 and metrics["train_loss"] > 0 and metrics["eval_loss"] > 0
    card = (run_dir / "README.md").read_text()
    for needle in (info["data"]["sha256"], "final eval loss", "transformers", "18 / 6", "Adapter check: ok"):
        assert needle in card
    rec = load_saved(run_dir / "recipe.yaml")
    assert rec.lora.r == 4 and rec.training.max_steps == 10


def _plain_peft(run_dir: Path):
    """The adapter as any PEFT user would load it: no qlora-kit code involved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(
        cfg["base_model_name_or_path"], dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    )
    for m in base.modules():  # same exact CPU kernel as training (see DESIGN.md section 4)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


def test_adapter_loads_with_plain_peft(tiny_run):
    run_dir, snap = tiny_run
    model = _plain_peft(run_dir)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values()), "fp32 LoRA weights, not bf16-rounded"
    live = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(live) == len(saved)
    trained = {n.replace(".default", ""): t for n, t in snap.after.items() if "lora_" in n}
    for n, t in saved.items():
        assert torch.equal(t, trained["base_model.model." + n.removeprefix("base_model.model.")]), n


def _logits(model, tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_reproduces_adapter_logits(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = tiny_run
    report = merge.run(run_dir, tmp_path / "merged", dtype="fp32")
    assert report["max_abs_logit_diff"] < 1e-3 and report["work_dtype"] == "float32"
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list((tmp_path / "merged").glob("*.bin"))
    # independent check on an input merge never saw, plain libraries on both sides
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    diff = (_logits(merged, tok, PROBE) - _logits(_plain_peft(run_dir), tok, PROBE)).abs().max().item()
    print(f"merged vs adapter-on-4-bit max |logit diff| = {diff:.2e}")
    assert diff < 1e-3
    # merging into the *original* weights instead is measurably worse: the adapter learnt NF4 weights
    from peft import PeftModel

    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(json.loads(
        (run_dir / "run.json").read_text())["base_model_path"]), run_dir / "adapter").merge_and_unload().eval()
    naive_diff = (_logits(naive, tok, PROBE) - _logits(_plain_peft(run_dir), tok, PROBE)).abs().max().item()
    assert naive_diff > 10 * max(diff, 1e-6)


def test_merge_default_bf16_and_refuses_nonempty_out(tiny_run, tmp_path):
    from qlora_kit.errors import UserError

    run_dir, _ = tiny_run
    report = merge.run(run_dir, tmp_path / "m16")
    cfg = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and report["max_abs_logit_diff_after_cast"] < 0.25
    assert all(t.dtype == torch.bfloat16 for t in load_file(next((tmp_path / "m16").glob("*.safetensors"))).values())
    with pytest.raises(UserError, match="not empty"):
        merge.run(run_dir, tmp_path / "m16")


def test_generate_from_adapter_and_merged_agree(tiny_run, tmp_path):
    from qlora_kit.serve import engine as generate

    run_dir, _ = tiny_run
    merge.run(run_dir, tmp_path / "m", dtype="fp32")
    a = generate.answer(generate.load(run_dir), "试用期最长多久？", max_new_tokens=12)
    b = generate.answer(generate.load(tmp_path / "m"), "试用期最长多久？", max_new_tokens=12)
    assert isinstance(a, str) and a == b


def test_stories260k_real_model_end_to_end(stories_dir, qa_file, tmp_path):
    """A real pretrained Llama with no chat template and no pad token; MLP width 172 (not a multiple
    of 32) crashes bitsandbytes' AVX512-BF16 eval kernel unless the exact path is pinned."""
    from qlora_kit.serve import engine as generate

    snap = Snapshot()
    run_dir = train.run(make_recipe(str(stories_dir), qa_file, max_steps=6), str(tmp_path / "run"), [snap])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["tokenizer"]["template_source"] == "default" and info["tokenizer"]["pad_token"] == "<unk>"
    assert snap.loss[-1] < snap.loss[0]
    report = merge.run(run_dir, tmp_path / "merged", dtype="fp32")
    assert report["max_abs_logit_diff"] < 1e-3
    out = generate.answer(generate.load(run_dir), "试用期最长多久？", max_new_tokens=8)
    assert isinstance(out, str)


def test_model_with_own_template_and_all_linear(tiny_chat_dir, qa_file, tmp_path):
    recipe = make_recipe(str(tiny_chat_dir), qa_file, max_steps=4)
    recipe.lora.target_modules = "all-linear"
    run_dir = train.run(recipe, str(tmp_path / "run"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["tokenizer"]["template_source"] == "model"
    assert info["lora"]["modules"] == 2 * 7  # q k v o gate up down in each of 2 layers
    tmpl = (run_dir / "tokenizer" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in tmpl
    report = merge.run(run_dir, tmp_path / "merged", dtype="fp32")  # tied embeddings survive the merge
    assert report["max_abs_logit_diff"] < 1e-3


def test_merge_shards_big_models(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = tiny_run
    merge.run(run_dir, tmp_path / "sharded", dtype="fp32", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "sharded")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    diff = (_logits(sharded, tok, PROBE) - _logits(_plain_peft(run_dir), tok, PROBE)).abs().max().item()
    assert diff < 1e-3


def test_optimizer_state_not_inherited_from_an_earlier_run_in_this_process(tiny_dir, qa_file, tmp_path):
    """An earlier run in the same process that trained an embedding leaves bitsandbytes' process-wide
    overrides behind (32-bit state for parameter (0, 0)); this run's LoRA tensors still get the
    8-bit state that `qlora-kit plan` counts."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    mng = bnb.optim.GlobalOptimManager.get_instance()
    mng.index2config[(0, 0)] = {"optim_bits": 32}  # as the Trainer leaves it after training an embedding

    class States(TrainerCallback):
        dtypes: dict = {}

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            for g, group in enumerate(optimizer.param_groups):
                for i, p in enumerate(group["params"]):
                    st = optimizer.state.get(p, {})
                    if "state1" in st and p.numel() >= 4096:
                        States.dtypes[g, i] = st["state1"].dtype

    rec = make_recipe(str(tiny_dir), qa_file, max_steps=1, eval_steps=1000, save_steps=1000)
    rec = rec.model_copy(update={"lora": rec.lora.model_copy(update={"r": 64, "lora_alpha": 128})})  # 64 x 64: 8-bit size
    train.run(rec, str(tmp_path / "run"), [States()])
    assert States.dtypes and set(States.dtypes.values()) == {torch.uint8}, States.dtypes
