"""Conversations -> token ids and labels, with the loss on the answers only.

The answer spans are found in *characters* of the rendered chat template, then mapped to tokens
through the tokenizer's offsets. That is robust to the two ways peers get masking silently wrong:
tokenizing prompt and answer separately (BPE merges across the boundary change the ids), and
matching a response-template token sequence that tokenizes differently in context.

For each assistant turn i:
    prefix = render(messages[:i], add_generation_prompt=True)
    upto   = render(messages[:i+1])
    answer = upto[len(prefix):]        # includes the template's end-of-turn token (EOS)
and every token whose first character falls inside an answer carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# Used only for models that ship no chat template (base models such as stories260K). It is saved
# with the tokenizer in the run directory, so chat/eval/serve render prompts exactly as in training.
# Answers end with the EOS token, which is inside the loss, so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}\n\n{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}### Question:\n{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}### Answer:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}\n\n### Answer:\n{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # longer than max_length
    answer_cut: bool  # truncation removed answer tokens (possibly the EOS)


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise UserError(
                "the chat template renders earlier turns differently once later turns are added, "
                "so answer tokens cannot be located",
                "set `chat_template:` in the recipe to a template that renders conversations incrementally",
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode(tokenizer, messages, max_length: int, stop_ids: set[int]) -> Encoded:
    full, spans = answer_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if end > start and any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    # Each answer must end with a stop token inside the loss; otherwise generation never ends.
    for s, e in spans:
        in_span = [ids[t] for t, (a, b) in enumerate(offsets) if b > a and s <= a < e]
        if not any(i in stop_ids for i in in_span):
            raise UserError(
                "the chat template does not end answers with an end-of-turn/EOS token, so the model "
                "would never learn to stop",
                "set `chat_template:` in the recipe to one that emits {{ eos_token }} after each answer",
            )
    truncated = len(ids) > max_length
    answer_cut = truncated and any(lab != -100 for lab in labels[max_length:])
    return Encoded(ids[:max_length], labels[:max_length], truncated, answer_cut)
