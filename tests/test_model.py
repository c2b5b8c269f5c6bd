"""Attention projections found from the model's own modules, for several architectures."""

from __future__ import annotations

import re

import pytest
import torch

from qlora_kit.model import attention_module_names, target_modules_spec


def _build(kind):
    import transformers as T

    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=128)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **small))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **small))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **small))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128))
    if kind == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=4, pad_token_id=0, **small))
    raise ValueError(kind)


EXPECTED = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gpt2": {"c_attn", "c_proj"},
    "phi3": {"qkv_proj", "o_proj"},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_attention_projections_found_from_modules(kind):
    torch.manual_seed(0)
    model = _build(kind)
    names = attention_module_names(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == EXPECTED[kind]
    spec = target_modules_spec(model, "attention")
    matched = [n for n, _ in model.named_modules() if re.fullmatch(spec, n)]
    assert sorted(matched) == sorted(names)
    assert not any(".mlp." in n for n in matched), "MLP layers (GPT-2 mlp.c_proj too) are not attention"
    assert len(matched) == 2 * len(EXPECTED[kind])  # every layer


def test_lora_attaches_by_regex_and_all_linear(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    spec = target_modules_spec(model, "attention")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=spec))
    wrapped = {n for n, m in peft.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert len(wrapped) == 8 and all(".self_attn." in n for n in wrapped)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert target_modules_spec(model, "all-linear") == "all-linear"


def test_explicit_unknown_target_is_an_error(tiny_dir):
    from transformers import AutoModelForCausalLM

    from qlora_kit.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert target_modules_spec(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="qq_proj not found"):
        target_modules_spec(model, ["qq_proj"])
