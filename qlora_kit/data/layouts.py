"""Records -> conversations: the layouts people bring (question/answer columns under the names
people use, alpaca, prompt/completion, OpenAI messages, ShareGPT, dialogue text), an explicit column
mapping that always wins, and questions built from several columns by a template (rowtemplate.py
has the syntax).

A conversation is a list of `{"role": "system"|"user"|"assistant"|"tool", "content": str}` messages;
every assistant turn is trained on. Tool-calling rows (OpenAI `tool_calls`/`tool` turns, ShareGPT
`function_call`/`observation` turns) keep the Hugging Face chat-template shape: an assistant turn
may carry `tool_calls` (content then ""), and the row's tool schemas ride on its first message
under `tools` (see `tools_of`), so every step that copies messages carries them along.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .. import rowtemplate
from . import readers

Message = dict  # role, content (str); optionally tool_calls, tools, name, tool_call_id
Conversation = list[Message]

# Plain question/answer columns under the names people actually use (matched case-insensitively).
QUESTION_KEYS = ("question", "query", "ask", "prompt", "input", "instruction", "q", "问题", "问", "提问",
                 "咨询", "问句", "用户", "患者提问", "咨询内容", "题目")
ANSWER_KEYS = ("answer", "response", "output", "completion", "reply", "a", "回答", "答", "答案", "回复",
               "医生回答", "律师回答", "解答", "答复", "处理建议", "处理方法", "处理措施", "解决方案")
SYSTEM_KEYS = ("system", "system_prompt", "系统提示")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
                # tool results: OpenAI `tool` (and the older `function`), ShareGPT/glaive `observation`
                "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
                "function_call": "assistant"}  # ShareGPT/glaive: the assistant's call, as JSON text
TOOLS_KEYS = ("tools", "functions")  # a row's tool schemas (OpenAI, ShareGPT/glaive; older OpenAI)
MAPPING_KEYS = ("question", "answer", "system", "input", "messages", "tools", "template")
# What `{question}` etc. name in a question template when no column has that very name.
ALIAS_KEYS = {"question": QUESTION_KEYS, "answer": ANSWER_KEYS, "system": SYSTEM_KEYS, "input": ("input",)}
# Layouts a question template applies to: one question and its answer per row.
QA_LAYOUTS = ("mapped", "question-answer", "alpaca", "prompt-completion", "unknown")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`question=ask,answer=answer` -> {"question": "ask", "answer": "answer"}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise UserError(f"--columns {spec!r}: expected FIELD=COLUMN pairs, e.g. question=ask,answer=answer")
        k, _, v = part.partition("=")
        k, v = k.strip(), v.strip()
        if k not in MAPPING_KEYS:
            raise UserError(f"--columns: unknown field {k!r}", f"fields: {', '.join(MAPPING_KEYS)}")
        out[k] = v
    return out


def pick_column(keys, candidates) -> str | None:
    lower = {str(k).strip().lower(): k for k in keys}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def detect_layout(rec: dict) -> str:
    if "__turns__" in rec:
        return "dialogue"
    if isinstance(rec.get("messages"), list):
        return "messages"
    if isinstance(rec.get("conversations"), list):
        return "sharegpt"
    if "instruction" in rec and ("output" in rec or "response" in rec):
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt-completion"
    if pick_column(rec, QUESTION_KEYS) and pick_column(rec, ANSWER_KEYS):
        return "question-answer"
    return "unknown"


def _text(v, where: str, name: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, readers.CellProblem):  # a formula without a result: not an empty cell
        raise UserError(f"{where}: {v.reason}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, list) and all(isinstance(p, dict) and "text" in p for p in v):  # OpenAI content parts
        return "".join(str(p["text"]) for p in v)
    raise UserError(f"{where}: field '{name}' must be text, got {type(v).__name__}")


def _json_value(v, where: str, name: str):
    """A field that holds JSON either as a value or as JSON text (glaive/ShareGPT store it as text)."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError as e:
        raise UserError(f"{where}: {name} is not valid JSON ({e.msg} at character {e.pos})") from None


def _tool_calls(v, where: str, name: str) -> list[dict]:
    """OpenAI `tool_calls` / `function_call`, or a glaive `function_call` turn's JSON, as the shape
    chat templates read: [{"type": "function", "function": {"name", "arguments": dict}}]."""
    v = _json_value(v, where, name)
    calls = []
    for c in v if isinstance(v, list) else [v]:
        fn = c.get("function") if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"].strip()):
            raise UserError(f"{where}: {name}: a tool call needs a function name, got {json.dumps(c, ensure_ascii=False)[:80]}",
                            'write it as {"name": "...", "arguments": {...}}')
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):  # OpenAI sends arguments as JSON text; templates expect an object
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # not JSON: kept as the text the model is to write
        call = {"type": "function", "function": {"name": fn["name"], "arguments": {} if args is None else args}}
        if isinstance(c, dict) and c.get("id"):
            call["id"] = str(c["id"])
        calls.append(call)
    return calls


def _tools(v, where: str, name: str) -> list[dict] | None:
    """A row's tool schemas as chat templates read them: [{"type": "function", "function": schema}]."""
    v = _json_value(v, where, name)
    if not v:
        return None  # glaive rows without tools have "tools": "[]"
    out = []
    for t in v if isinstance(v, list) else [v]:
        if isinstance(t, dict) and isinstance(t.get("function"), dict):
            out.append(t)
        elif isinstance(t, dict) and isinstance(t.get("name"), str):
            out.append({"type": "function", "function": t})
        else:
            raise UserError(f"{where}: {name}: each tool must be a function schema with a name",
                            'e.g. {"name": "get_weather", "description": "...", "parameters": {...}}')
    return out


def _turn(t: dict, role: str, where: str, label: str) -> Message:
    raw = str(t.get("role", t.get("from"))).strip().lower()
    value = t.get("content", t.get("value"))
    if raw == "function_call":  # glaive: the turn's text is the call
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(value, where, label)}
    if role == "tool" and isinstance(value, (dict, list)):  # a structured tool result
        value = json.dumps(value, ensure_ascii=False)
    msg = {"role": role, "content": _text(value, where, "content")}
    if role == "assistant" and (t.get("tool_calls") or t.get("function_call")):
        calls = t.get("tool_calls") or t.get("function_call")
        msg["tool_calls"] = _tool_calls(calls, where, f"{label}.tool_calls")
    if role == "tool":  # templates that name the function or match call ids read these
        msg.update({k: str(t[k]) for k in ("name", "tool_call_id") if t.get(k)})
    return msg


def _turns(turns, where: str, key: str) -> Conversation:
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise UserError(f"{where}: every turn in '{key}' must be an object with role and content")
        role = t.get("role", t.get("from"))
        r = ROLE_ALIASES.get(str(role).strip().lower())
        if r is None:
            raise UserError(f"{where}: unknown role {role!r} in '{key}'",
                            "use system, user or assistant (human/gpt), tool (observation) or function_call")
        msgs.append(_turn(t, r, where, f"{key}[{i}]"))
    _check_answers(msgs, where, lambda i: f"turn {i + 1} ({key}[{i}])")
    return msgs


def answered(m: Message) -> bool:
    """An assistant turn that teaches something: text, or a tool call (whose content may be empty)."""
    return bool(m["content"].strip() or m.get("tool_calls"))


def tools_of(conv: Conversation) -> list[dict] | None:
    return next((m["tools"] for m in conv if m.get("tools")), None)


def has_tools(conv: Conversation) -> bool:
    return any(m.get("tool_calls") or m["role"] == "tool" or m.get("tools") for m in conv)


def to_record(conv: Conversation) -> dict:
    """A conversation as one OpenAI-layout JSONL record (tools beside the messages), which load() reads back."""
    tools = tools_of(conv)
    msgs = [{k: v for k, v in m.items() if k != "tools"} for m in conv]
    return {"messages": msgs, **({"tools": tools} if tools else {})}


def _check_answers(msgs: Conversation, where: str, name) -> None:
    """An empty assistant turn among answered ones would teach the model to say nothing after that
    question, so the row is refused like any bad row (file:line, and the turn). A conversation with
    no answer at all is not refused here: load() drops it as "empty answer", as for a Q/A row.
    An assistant turn that only calls a tool (content "" or null) is an answer."""
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    empty = [i for i in answers if not answered(msgs[i])]
    if empty and len(empty) < len(answers):
        more = f" ({len(empty) - 1} more in this conversation)" if len(empty) > 1 else ""
        raise UserError(f"{where}: {name(empty[0])} is an empty assistant turn{more}; "
                        "fill in the answer, or remove it together with the question before it")


def to_conversation(rec: dict, layout: str, where: str, mapping: dict[str, str]) -> Conversation:
    msgs: Conversation = []
    layout = row_shape(rec, layout, mapping)
    if layout == "dialogue":
        msgs = [{"role": r, "content": c} for r, c in rec["__turns__"]]
        _check_answers(msgs, where, lambda i: f"turn {i + 1}")
        return msgs
    if layout in ("messages", "sharegpt"):
        key = mapping.get("messages") or ("messages" if layout == "messages" else "conversations")
        if not isinstance(rec.get(key), list):
            raise UserError(f"{where}: '{key}' must be a list of turns")
        msgs = _turns(rec[key], where, key)
        sys_key = mapping.get("system") or pick_column(rec, SYSTEM_KEYS)
        if sys_key and rec.get(sys_key) and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": _text(rec[sys_key], where, sys_key)})
        tools_key = mapping.get("tools") or pick_column(rec, TOOLS_KEYS)
        tools = _tools(rec[tools_key], where, tools_key) if tools_key in rec else None
        if tools and msgs:
            msgs[0]["tools"] = tools
        return msgs
    if layout == "alpaca":
        if rec.get("system"):
            msgs.append({"role": "system", "content": _text(rec["system"], where, "system")})
        for pair in rec.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise UserError(f"{where}: 'history' must be a list of [question, answer] pairs")
            msgs += [{"role": "user", "content": _text(pair[0], where, "history")},
                     {"role": "assistant", "content": _text(pair[1], where, "history")}]
        q = _text(rec.get("instruction"), where, "instruction")
        extra = _text(rec.get("input"), where, "input")
        msgs.append({"role": "user", "content": f"{q}\n\n{extra}" if extra.strip() else q})
        out_key = "output" if "output" in rec else "response"
        msgs.append({"role": "assistant", "content": _text(rec.get(out_key), where, out_key)})
        first = len(msgs) - 2 * len(rec.get("history") or []) - 2  # where history starts (after a system turn)
        _check_answers(msgs, where, lambda i: f"history[{(i - first) // 2}]'s answer" if i < len(msgs) - 1 else out_key)
        return msgs
    if layout == "prompt-completion":
        return [{"role": "user", "content": _text(rec["prompt"], where, "prompt")},
                {"role": "assistant", "content": _text(rec["completion"], where, "completion")}]
    if layout == "question-answer":
        qk = mapping.get("question") or pick_column(rec, QUESTION_KEYS)
        ak = mapping.get("answer") or pick_column(rec, ANSWER_KEYS)
        if qk not in rec or ak not in rec:
            missing = qk if qk not in rec else ak
            raise UserError(f"{where}: no column '{missing}' in this row")
        sk = mapping.get("system") or pick_column(rec, SYSTEM_KEYS)
        if sk and rec.get(sk):
            msgs.append({"role": "system", "content": _text(rec[sk], where, sk)})
        q = _text(rec[qk], where, qk)
        ik = mapping.get("input")
        if ik and rec.get(ik):
            q = f"{q}\n\n{_text(rec[ik], where, ik)}"
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _text(rec[ak], where, ak)}]
        return msgs
    keys = ", ".join(map(str, list(rec)[:8])) + (f", ... ({len(rec)} keys)" if len(rec) > 8 else "")
    raise UserError(f"{where}: cannot tell question from answer (keys: {keys})",
                    "use question/answer (问题/回答), instruction/input/output, prompt/completion or messages, "
                    "or name the columns: --columns question=COL,answer=COL")


# --- question templates over columns (rowtemplate.py has the syntax) ------------------------------


def _lookup(name: str, keys, mapping: dict[str, str]) -> str | None:
    """The column a template name means: the column of that name, else for question/answer/system/
    input the column mapped or detected for that field."""
    keys = list(keys)
    for n in (name, name.strip()):
        if n in keys:
            return n
    alias = name.strip()
    if alias in ALIAS_KEYS:
        col = mapping.get(alias) or pick_column(keys, ALIAS_KEYS[alias])
        if col in keys:
            return col
    return None


def _unknown_names(names: list[str], columns: list[str], mapping: dict[str, str]) -> list[str]:
    return [n for n in names if _lookup(n, columns, mapping) is None]


class Questions:
    """How a row's question is made when a template is in play: the row's own template cell (the
    template column) when it has one, else data.question_template, else the question column."""

    def __init__(self, template: str | None, column: str | None, columns: list[str], mapping: dict[str, str], path: Path):
        self.template, self.column, self.columns, self.mapping = template, column, columns, mapping
        if template is not None:
            try:
                names = rowtemplate.fields(template)
            except ValueError as e:
                raise UserError(f"{rowtemplate.OPTION}: {e}") from None
            unknown = _unknown_names(names, columns, mapping)
            if unknown:
                raise UserError(f"{path}: {rowtemplate.OPTION}: no column {{{unknown[0]}}}"
                                + (f" (nor {', '.join('{' + n + '}' for n in unknown[1:])})" if unknown[1:] else ""),
                                self.hint())

    def hint(self) -> str:
        return (f"columns available: {', '.join(self.columns)}; {{question}}, {{answer}}, {{system}} and {{input}} also "
                f"name the columns mapped to those fields; {rowtemplate.BRACES}")

    def fill(self, rec: dict, where: str) -> rowtemplate.Filled | None:
        """The row's question from its template; None: no template for this row (use the question column)."""
        text, what = self.template, rowtemplate.OPTION
        if self.column:
            own = _text(rec.get(self.column), where, self.column)
            if own.strip():
                text, what = own, f"template column '{self.column}'"
                try:
                    unknown = _unknown_names(rowtemplate.fields(own), self.columns, self.mapping)
                except ValueError as e:
                    raise UserError(f"{where}: {what}: {e}") from None
                if unknown:
                    raise UserError(f"{where}: {what}: no column {{{unknown[0]}}} (columns: {', '.join(self.columns)})")
        if text is None:
            if _lookup("question", rec, self.mapping) is None:
                return rowtemplate.Filled("")  # an empty template cell and no question column: an empty question
            return None
        filled = rowtemplate.Filled("")

        def cell(name: str) -> str:
            col = _lookup(name, rec, self.mapping) or _lookup(name, self.columns, self.mapping)
            value = _text(rec.get(col), where, col)
            filled.columns.add(col)
            if not value.strip() and name not in filled.empty:
                filled.empty.append(name)
            return value

        filled.text = rowtemplate.render(text, cell)
        return filled


def row_shape(rec: dict, layout: str, mapping: dict[str, str]) -> str:
    """The layout to_conversation reads a row as: a mapping wins over detection; a mapping that
    names only tools/system ("mapped") leaves the row's own layout."""
    if mapping.get("messages"):
        return "messages"
    if mapping.get("question") or mapping.get("answer"):
        return "question-answer"
    return detect_layout(rec) if layout == "mapped" else layout


def keys_read(rec: dict, shape: str, mapping: dict[str, str]) -> set[str]:
    """The keys to_conversation reads for a row of this shape; the others are reported as unused."""
    keys = {v for v in mapping.values() if v}
    if shape == "question-answer":
        keys |= {mapping.get("question") or pick_column(rec, QUESTION_KEYS), mapping.get("answer") or pick_column(rec, ANSWER_KEYS),
                 mapping.get("system") or pick_column(rec, SYSTEM_KEYS)}
    elif shape == "alpaca":
        keys |= {"instruction", "input", "output" if "output" in rec else "response", "system", "history"}
    elif shape == "prompt-completion":
        keys |= {"prompt", "completion"}
    elif shape in ("messages", "sharegpt"):
        keys |= {"messages" if shape == "messages" else "conversations", mapping.get("system") or pick_column(rec, SYSTEM_KEYS),
                 mapping.get("tools") or pick_column(rec, TOOLS_KEYS)}
    elif shape != "dialogue":
        keys |= set(rec)  # a layout this list does not know: claim nothing is unused
    return {k for k in keys if k}


def templated_conversation(rec: dict, shape: str, where: str, mapping: dict[str, str], filled) -> tuple[Conversation, set[str]]:
    """A Q/A row whose question is `filled.text`; the answer (and system) come from their columns."""
    used = set(filled.columns)
    if shape == "alpaca":  # keep its system and history; the template replaces instruction + input
        msgs = to_conversation(rec, shape, where, mapping)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last] = {"role": "user", "content": filled.text}
        return msgs, used | ({"output" if "output" in rec else "response", "system", "history"} & set(rec))
    ak = mapping.get("answer") or pick_column(rec, ANSWER_KEYS)
    if not ak or ak not in rec:
        raise UserError(f"{where}: no answer column" + (f" '{ak}'" if ak else ""),
                        "name it: --columns answer=COL")
    sk = mapping.get("system") or pick_column(rec, SYSTEM_KEYS)
    msgs = [{"role": "system", "content": _text(rec[sk], where, sk)}] if sk and rec.get(sk) else []
    msgs += [{"role": "user", "content": filled.text}, {"role": "assistant", "content": _text(rec[ak], where, ak)}]
    return msgs, used | {ak} | ({sk} if sk else set())


def question_text(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv if m["role"] == "user")


def answer_text(conv: Conversation) -> str:
    # a tool call is the answer of its turn: two rows calling different functions are not duplicates
    return "\n".join(m["content"] or (json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else "")
                     for m in conv if m["role"] == "assistant")
