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

Tool calls: an assistant turn that calls a tool is an answer like any other (its call carries
loss); a tool result (`tool` turn) is part of the next prefix, so it never does. The row's tool
schemas are passed as `tools=` to the model's own template, which decides how to show them; a
template that cannot render tools, calls and results is refused (`check_tool_support`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

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


def render(tokenizer, messages, add_generation_prompt: bool = False, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def split_tools(messages) -> tuple[list[dict] | None, list[dict]]:
    """(the row's tool schemas, the messages without them): data/layouts.py keeps them on a message."""
    tools = next((m["tools"] for m in messages if m.get("tools")), None)
    if tools is None:
        return None, messages
    return tools, [{k: v for k, v in m.items() if k != "tools"} for m in messages]


# A probe conversation: a template supports tools when the schema, the call and the result all
# appear in what it renders (templates without tool support drop one of them silently).
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "qk_probe_lookup", "description": "qk-probe-description",
    "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}]
_PROBE = [{"role": "user", "content": "hello"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "id": "call_qk_probe", "function": {"name": "qk_probe_lookup", "arguments": {"key": "qk-probe-argument"}}}]},
          {"role": "tool", "content": "qk-probe-result", "name": "qk_probe_lookup", "tool_call_id": "call_qk_probe"},
          {"role": "assistant", "content": "done"}]


def tool_support(tokenizer) -> str | None:
    """None when the chat template renders tool schemas, tool calls and tool results; else what is missing."""
    try:
        text = render(tokenizer, _PROBE, tools=_PROBE_TOOLS)
    except Exception as e:  # a template that raises on tool turns (jinja2 TemplateError and friends)
        return f"it fails on a tool call ({type(e).__name__}: {str(e)[:120]})"
    missing = [what for what, needle in (("the tool schemas", "qk-probe-description"), ("the tool calls", "qk-probe-argument"),
                                         ("the tool results", "qk-probe-result")) if needle not in text]
    return f"it drops {' and '.join(missing)}" if missing else None


def check_tool_support(tokenizer, where: str, n_rows: int) -> None:
    why = tool_support(tokenizer)
    if why is None:
        return
    whose = ("qlora-kit's plain fallback template (this model has no chat template of its own)"
             if tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE else
             f"the chat template of {getattr(tokenizer, 'name_or_path', 'this model') or 'this model'}")
    raise UserError(
        f"{where}: this conversation calls tools ({n_rows} such row(s)), but {whose} has no tool support: {why}",
        "train tool calls on a model whose chat template supports tools (Qwen2.5/Qwen3, Llama 3.1+, Mistral "
        "instruct models, ...), or set `chat_template:` in the recipe to one that renders `tools`, `tool_calls` "
        "and `tool` turns; or remove the tool-calling rows")


class Renderer:
    """apply_chat_template, about 2.5x faster for bulk encoding: the compiled Jinja template is
    called directly with the same variables transformers passes. It is checked against
    apply_chat_template on the first conversation and falls back to it on any difference."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(tokenizer.chat_template)
            self.kwargs = dict(tokenizer.special_tokens_map)
        except Exception:  # a private helper: if it moves, the public path still works
            self.compiled = None
        self.checked: set[bool] = set()  # kinds checked against apply_chat_template: with tools or not

    def _fast(self, messages, add_generation_prompt, tools=None):
        return self.compiled.render(messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.kwargs)

    def __call__(self, messages, add_generation_prompt: bool = False, tools=None) -> str:
        if self.compiled is None:
            return render(self.tokenizer, messages, add_generation_prompt, tools)
        if (tools is not None) not in self.checked:  # checked once without tools, once with
            self.checked.add(tools is not None)
            for gen in (False, True):
                if self._fast(messages, gen, tools) != render(self.tokenizer, messages, gen, tools):
                    self.compiled = None
                    return render(self.tokenizer, messages, add_generation_prompt, tools)
        return self._fast(messages, add_generation_prompt, tools)


def answer_spans(tokenizer, messages, renderer: Renderer | None = None) -> tuple[str, list[tuple[int, int]]]:
    tools, messages = split_tools(messages)
    render_with = renderer or functools.partial(render, tokenizer)
    r = lambda m, g=False: render_with(m, g, tools)  # noqa: E731 (every render sees the row's tools)
    full = r(messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = r(messages[:i], True)
        upto = full if i == last and i == len(messages) - 1 else r(messages[: i + 1])
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise UserError(
                "the chat template renders earlier turns differently once later turns are added, "
                "so answer tokens cannot be located",
                "set `chat_template:` in the recipe to a template that renders conversations incrementally",
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def _labels(ids: np.ndarray, offsets: np.ndarray, spans, n_chars: int) -> np.ndarray:
    in_answer = np.zeros(n_chars + 1, dtype=bool)
    for s, e in spans:
        in_answer[s:e] = True
    starts, ends = offsets[:, 0], offsets[:, 1]
    return np.where((ends > starts) & in_answer[np.minimum(starts, n_chars)], ids, -100)


def _check_stops(ids: np.ndarray, offsets: np.ndarray, spans, stop: np.ndarray) -> None:
    # Each answer must end with a stop token inside the loss; otherwise generation never ends.
    starts, ends = offsets[:, 0], offsets[:, 1]
    is_stop = np.logical_or.reduce([ids == s for s in stop]) & (ends > starts)
    for s, e in spans:
        if not is_stop[(starts >= s) & (starts < e)].any():
            raise UserError(
                "the chat template does not end answers with an end-of-turn/EOS token, so the model "
                "would never learn to stop",
                "set `chat_template:` in the recipe to one that emits {{ eos_token }} after each answer",
            )


def _render_all(tokenizer, conversations, wheres: list[str] | None):
    renderer = Renderer(tokenizer)
    where = (lambda i: wheres[i]) if wheres else (lambda i: f"conversation {i + 1}")
    from .data.layouts import has_tools

    tool_rows = [i for i, c in enumerate(conversations) if has_tools(c)]
    if tool_rows:
        check_tool_support(tokenizer, where(tool_rows[0]), len(tool_rows))
    from jinja2 import TemplateError

    out = []
    for i, c in enumerate(conversations):
        try:
            out.append(answer_spans(tokenizer, c, renderer))
        except TemplateError as e:  # the template's own raise_exception, e.g. "roles must alternate"
            raise UserError(f"{where(i)}: the chat template refuses this conversation: {e}",
                            "fix the row's turn order, or set `chat_template:` in the recipe") from None
        except UserError as e:
            raise UserError(f"{where(i)}: {e.message}", e.hint) from None
    return out


def encode_batch(tokenizer, conversations, max_length: int, stop_ids: set[int], wheres: list[str] | None = None) -> list[Encoded]:
    """Render every conversation, tokenize all texts in one call (the Rust tokenizer batches and
    parallelises), then label each token by the answer span its first character falls in.
    `wheres` ("file:line" per conversation) name the row in errors."""
    rendered = _render_all(tokenizer, conversations, wheres)
    if not rendered:
        return []
    texts = [t for t, _ in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # the Rust tokenizer directly: same ids and offsets, without transformers' per-row conversion
    encodings = (backend.encode_batch(texts, add_special_tokens=False) if backend is not None
                 else tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True).encodings)
    stop = np.array(sorted(stop_ids), dtype=np.int64)
    out = []
    for (text, spans), e in zip(rendered, encodings):
        ids = np.asarray(e.ids, dtype=np.int64)
        offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        _check_stops(ids, offsets, spans, stop)
        labels = _labels(ids, offsets, spans, len(text))
        truncated = len(ids) > max_length
        answer_cut = truncated and bool((labels[max_length:] != -100).any())
        out.append(Encoded(ids[:max_length].tolist(), labels[:max_length].tolist(), truncated, answer_cut))
    return out


def encode(tokenizer, messages, max_length: int, stop_ids: set[int]) -> Encoded:
    return encode_batch(tokenizer, [messages], max_length, stop_ids)[0]


# --- a default system prompt baked into the template (merged models that stand alone) -------------

DEFAULT_SYSTEM_MARK = "qlora-kit: default system prompt"


def with_default_system(template, system_prompt: str | None):
    """The chat template, rendering `system_prompt` as the system message when the messages have
    none: a merged model or GGUF moved away from its run then prompts exactly as in training with
    plain `apply_chat_template` (transformers, llama.cpp --jinja). `template` may be a str or a
    {name: template} dict; a template already baked (or no prompt) is returned as it is.

    Only what Hugging Face's templates and llama.cpp's Jinja engine both know is used: a namespace
    flag, a top-level `set messages` (as Llama 3's template does) and a JSON string literal."""
    if not system_prompt or not template:
        return template
    if isinstance(template, dict):
        return {k: with_default_system(v, system_prompt) for k, v in template.items()}
    if DEFAULT_SYSTEM_MARK in template:
        return template
    import json

    literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal, escapes and all
    prefix = (
        f"{{#- {DEFAULT_SYSTEM_MARK} (the run's data.system_prompt, used when the messages have none) -#}}"
        "{%- set qk_ns = namespace(has_system=false) -%}"
        "{%- for qk_m in messages -%}{%- if qk_m['role'] == 'system' -%}{%- set qk_ns.has_system = true -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if not qk_ns.has_system -%}}{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
        "{%- endif %}"
    )
    return prefix + template
