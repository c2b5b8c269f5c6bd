"""Answer-only labels, EOS inside the loss, pad distinct from EOS, template fallback."""

from __future__ import annotations

import pytest

from qlora_kit.model import load_tokenizer, prepare_tokenizer
from qlora_kit.recipe import Recipe
from qlora_kit.template import DEFAULT_CHAT_TEMPLATE, encode

CONV = [
    {"role": "system", "content": "你是律师。"},
    {"role": "user", "content": "试用期最长多久？"},
    {"role": "assistant", "content": "依据《劳动合同法》第十九条，最长六个月。"},
]
MULTI = CONV + [{"role": "user", "content": "那工资呢？"}, {"role": "assistant", "content": "不得低于合同约定工资的百分之八十。"}]


def _prep(model_dir):
    rec = Recipe(base_model=str(model_dir))
    tok = load_tokenizer(str(model_dir), rec)
    return tok, prepare_tokenizer(tok, rec, str(model_dir))


def _label_text(tok, e):
    return tok.decode([t for t in e.labels if t != -100])


@pytest.mark.parametrize("which", ["tiny", "tiny_chat", "stories"])
def test_labels_cover_exactly_the_answers_and_their_eos(which, request):
    model_dir = request.getfixturevalue({"tiny": "tiny_dir", "tiny_chat": "tiny_chat_dir", "stories": "stories_dir"}[which])
    tok, info = _prep(model_dir)
    e = encode(tok, MULTI, 512, set(info.stop_token_ids))
    assert len(e.input_ids) == len(e.labels) and not e.truncated
    text = _label_text(tok, e).replace(" ", "")
    assert "依据《劳动合同法》第十九条" in text and "百分之八十" in text  # both assistant turns train
    assert "试用期" not in text and "那工资呢" not in text and "你是律师" not in text  # prompts masked
    eos = tok.eos_token_id
    assert eos in info.stop_token_ids
    assert sum(1 for t in e.labels if t == eos) == 2, "each answer ends with EOS, and EOS carries loss"
    first = next(i for i, t in enumerate(e.labels) if t != -100)
    assert all(t == -100 for t in e.labels[:first]) and first > 5
    # the labelled tokens are the answer's own tokens, unshifted
    assert all(lab in (-100, i) for lab, i in zip(e.labels, e.input_ids))


def test_pad_token_is_never_eos(tiny_dir, tiny_chat_dir):
    for d in (tiny_dir, tiny_chat_dir):
        tok, info = _prep(d)
        assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id


def test_stories260k_pad_is_unk(stories_dir):
    tok, _ = _prep(stories_dir)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<unk>"  # stories260K has no pad token; <unk> is in its vocabulary


def test_pad_equal_to_eos_is_replaced(tiny_dir):
    rec = Recipe(base_model=str(tiny_dir))
    tok = load_tokenizer(str(tiny_dir), rec)
    tok.pad_token = tok.eos_token
    prepare_tokenizer(tok, rec, str(tiny_dir))
    assert tok.pad_token_id != tok.eos_token_id


def test_template_sources(tiny_dir, tiny_chat_dir, stories_dir):
    tok, info = _prep(stories_dir)
    assert info.template_source == "default" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    tok, info = _prep(tiny_chat_dir)
    assert info.template_source == "model" and "<|im_start|>" in tok.chat_template
    rec = Recipe(base_model=str(tiny_dir), chat_template=DEFAULT_CHAT_TEMPLATE.replace("### Question:", "Q:"))
    tok = load_tokenizer(str(tiny_dir), rec)
    assert prepare_tokenizer(tok, rec, str(tiny_dir)).template_source == "recipe"


def test_truncation_is_reported(stories_dir):
    tok, info = _prep(stories_dir)
    long = [{"role": "user", "content": "短问题"}, {"role": "assistant", "content": "很长的回答。" * 200}]
    e = encode(tok, long, 64, set(info.stop_token_ids))
    assert e.truncated and e.answer_cut and len(e.input_ids) == 64
    assert tok.eos_token_id not in e.labels  # the cut answer lost its EOS: this is why it is reported


def test_template_without_eos_is_refused(tiny_dir):
    from qlora_kit.errors import UserError

    bad = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    rec = Recipe(base_model=str(tiny_dir), chat_template=bad)
    tok = load_tokenizer(str(tiny_dir), rec)
    info = prepare_tokenizer(tok, rec, str(tiny_dir))
    with pytest.raises(UserError, match="never learn to stop"):
        encode(tok, CONV, 256, set(info.stop_token_ids))
