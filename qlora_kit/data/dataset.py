"""Records -> conversations: the layouts people bring, an explicit column mapping that always
wins, and a train/eval split that keeps near-duplicates on one side.

A conversation is a list of `{"role": "system"|"user"|"assistant"|"tool", "content": str}` messages;
every assistant turn is trained on. Tool-calling rows (OpenAI `tool_calls`/`tool` turns, ShareGPT
`function_call`/`observation` turns) keep the Hugging Face chat-template shape: an assistant turn
may carry `tool_calls` (content then ""), and the row's tool schemas ride on its first message
under `tools` (see `tools_of`), so every step that copies messages carries them along. `readers.py` knows files and encodings; `template.py` turns
conversations into tokens and labels; this module is the part in between.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import readers, rowtemplate
from ..errors import UserError

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
# What a data folder is read for (one level deep); any other file in it is listed as not read.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".xlsx", ".xlsm", ".txt")


@dataclass
class Source:
    """One file of the data, as `data check` and run.json report it."""

    path: Path
    sha256: str
    format: str
    encoding: str
    layout: str
    rows_read: int
    rows: int  # usable conversations (before duplicates are dropped)
    columns: list[str] | None
    unused: list[str]  # columns (JSON keys) that no field and no template reads


@dataclass
class Dataset:
    path: Path
    conversations: list[Conversation]
    wheres: list[str]  # "file:line" of each conversation
    format: str
    encoding: str
    layout: str
    sha256: str
    mapping: dict[str, str] = field(default_factory=dict)  # internal field -> source column, when tabular
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason): empty Q or A
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, reason): unreadable rows (skipped)
    rows_read: int = 0
    columns: list[str] | None = None  # header of a tabular file
    sources: list[Source] = field(default_factory=list)  # one per file, in reading order
    source_of: list[int] = field(default_factory=list)  # per conversation: its index in sources
    template_empty: dict[str, list[str]] = field(default_factory=dict)  # "{name}" -> rows whose cell was empty
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (path, why): files in a data folder skipped


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _pick(keys, candidates) -> str | None:
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
    if _pick(rec, QUESTION_KEYS) and _pick(rec, ANSWER_KEYS):
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
    layout = _shape(rec, layout, mapping)
    if layout == "dialogue":
        msgs = [{"role": r, "content": c} for r, c in rec["__turns__"]]
        _check_answers(msgs, where, lambda i: f"turn {i + 1}")
        return msgs
    if layout in ("messages", "sharegpt"):
        key = mapping.get("messages") or ("messages" if layout == "messages" else "conversations")
        if not isinstance(rec.get(key), list):
            raise UserError(f"{where}: '{key}' must be a list of turns")
        msgs = _turns(rec[key], where, key)
        sys_key = mapping.get("system") or _pick(rec, SYSTEM_KEYS)
        if sys_key and rec.get(sys_key) and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": _text(rec[sys_key], where, sys_key)})
        tools_key = mapping.get("tools") or _pick(rec, TOOLS_KEYS)
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
        qk = mapping.get("question") or _pick(rec, QUESTION_KEYS)
        ak = mapping.get("answer") or _pick(rec, ANSWER_KEYS)
        if qk not in rec or ak not in rec:
            missing = qk if qk not in rec else ak
            raise UserError(f"{where}: no column '{missing}' in this row")
        sk = mapping.get("system") or _pick(rec, SYSTEM_KEYS)
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


def _check_mapping(mapping: dict[str, str], columns: list[str] | None, first: dict | None, path: Path) -> None:
    available = columns if columns is not None else (list(first) if isinstance(first, dict) else [])
    for field_name, col in mapping.items():
        if available and col not in available:
            raise UserError(f"{path}: --columns {field_name}={col}: no column '{col}'",
                            f"columns in this file: {', '.join(map(str, available))}")


def _tabular_mapping(columns: list[str], path: Path, mapping: dict[str, str], templated: bool = False) -> dict[str, str]:
    """For CSV/XLSX the columns are known up front: resolve the mapping once and report it. With a
    question template the question column is optional (the template makes the question)."""
    m = dict(mapping)
    if "messages" in m:
        return m
    m.setdefault("question", _pick(columns, QUESTION_KEYS) or "")
    m.setdefault("answer", _pick(columns, ANSWER_KEYS) or "")
    missing = [k for k in ("question", "answer") if not m[k] and not (k == "question" and templated)]
    if missing:
        raise UserError(f"{path}: no {' and no '.join(missing)} column among: {', '.join(columns)}",
                        "name them: --columns question=COL,answer=COL (or data.columns in the recipe)")
    if not m["question"]:
        del m["question"]
    sk = _pick(columns, SYSTEM_KEYS)
    if sk and "system" not in m:
        m["system"] = sk
    return m


# --- several files --------------------------------------------------------------------------------


def list_sources(spec) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files `data.path` / `--data` name, in order: each file as given, and for a folder the
    data files directly inside it, sorted by name. Not recursive: a subfolder (an archive, last
    year's export) is read only when named itself. Hidden files and Office lock files (~$x.xlsx)
    are skipped; any other file is returned in `not_read` with the reason. A file named twice is read once."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    if not specs:
        raise UserError("no data file given", "pass --data FILE (repeatable), or set data.path in the recipe")
    files: list[Path] = []
    not_read: list[tuple[str, str]] = []
    for s in specs:
        p = Path(s).expanduser()
        if not p.is_dir():
            if not p.exists():
                raise UserError(f"data file not found: {p}", "check the path, or pass --data FILE")
            files.append(p)
            continue
        found = []
        for child in sorted(p.iterdir(), key=lambda c: c.name):
            if child.name.startswith((".", "~$")):
                continue
            if child.is_dir():
                not_read.append((str(child), "a subfolder: folders are read one level deep; pass it as its own --data"))
            elif child.suffix.lower() in DATA_SUFFIXES:
                found.append(child)
            else:
                not_read.append((str(child), f"not a data file type: {' '.join(DATA_SUFFIXES)}"))
        if not found:
            raise UserError(f"{p}: a folder with no data files in it ({', '.join(DATA_SUFFIXES)})",
                            "put the data files directly in it (subfolders are not read), or pass the files themselves")
        files += found
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, not_read


def data_files(spec) -> list[Path]:
    return list_sources(spec)[0]


def combined_sha256(digests: list[str]) -> str:
    """One file: its sha256. Several: the sha256 of their digests in reading order (the order sets
    the split), so any change to any file, or to their order, changes it; their paths do not."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def file_changes(old_files: list[dict], new_files: list[dict]) -> list[str]:
    """What differs between two runs' data files ({"path", "sha256"} each), for the resume check."""
    old = {f["path"]: f["sha256"] for f in old_files}
    new = {f["path"]: f["sha256"] for f in new_files}
    out = [f"data file changed: {p} (sha256 differs)" for p in new if p in old and old[p] != new[p]]
    out += [f"data file added: {p}" for p in new if p not in old]
    out += [f"data file no longer read: {p}" for p in old if p not in new]
    if not out and [f["path"] for f in old_files] != [f["path"] for f in new_files]:
        out.append("data files are read in another order (the split depends on it)")
    return out


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
        col = mapping.get(alias) or _pick(keys, ALIAS_KEYS[alias])
        if col in keys:
            return col
    return None


def _unknown_names(names: list[str], columns: list[str], mapping: dict[str, str]) -> list[str]:
    return [n for n in names if _lookup(n, columns, mapping) is None]


class _Questions:
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


def _shape(rec: dict, layout: str, mapping: dict[str, str]) -> str:
    """The layout to_conversation reads a row as: a mapping wins over detection; a mapping that
    names only tools/system ("mapped") leaves the row's own layout."""
    if mapping.get("messages"):
        return "messages"
    if mapping.get("question") or mapping.get("answer"):
        return "question-answer"
    return detect_layout(rec) if layout == "mapped" else layout


def _layout_keys(rec: dict, shape: str, mapping: dict[str, str]) -> set[str]:
    """The keys to_conversation reads for a row of this shape; the others are reported as unused."""
    keys = {v for v in mapping.values() if v}
    if shape == "question-answer":
        keys |= {mapping.get("question") or _pick(rec, QUESTION_KEYS), mapping.get("answer") or _pick(rec, ANSWER_KEYS),
                 mapping.get("system") or _pick(rec, SYSTEM_KEYS)}
    elif shape == "alpaca":
        keys |= {"instruction", "input", "output" if "output" in rec else "response", "system", "history"}
    elif shape == "prompt-completion":
        keys |= {"prompt", "completion"}
    elif shape in ("messages", "sharegpt"):
        keys |= {"messages" if shape == "messages" else "conversations", mapping.get("system") or _pick(rec, SYSTEM_KEYS),
                 mapping.get("tools") or _pick(rec, TOOLS_KEYS)}
    elif shape != "dialogue":
        keys |= set(rec)  # a layout this list does not know: claim nothing is unused
    return {k for k in keys if k}


def _templated(rec: dict, shape: str, where: str, mapping: dict[str, str], filled) -> tuple[Conversation, set[str]]:
    """A Q/A row whose question is `filled.text`; the answer (and system) come from their columns."""
    used = set(filled.columns)
    if shape == "alpaca":  # keep its system and history; the template replaces instruction + input
        msgs = to_conversation(rec, shape, where, mapping)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last] = {"role": "user", "content": filled.text}
        return msgs, used | ({"output" if "output" in rec else "response", "system", "history"} & set(rec))
    ak = mapping.get("answer") or _pick(rec, ANSWER_KEYS)
    if not ak or ak not in rec:
        raise UserError(f"{where}: no answer column" + (f" '{ak}'" if ak else ""),
                        "name it: --columns answer=COL")
    sk = mapping.get("system") or _pick(rec, SYSTEM_KEYS)
    msgs = [{"role": "system", "content": _text(rec[sk], where, sk)}] if sk and rec.get(sk) else []
    msgs += [{"role": "user", "content": filled.text}, {"role": "assistant", "content": _text(rec[ak], where, ak)}]
    return msgs, used | {ak} | ({sk} if sk else set())


# --- loading --------------------------------------------------------------------------------------


def load(path, system_prompt: str | None = None, columns: dict[str, str] | None = None,
         skip_bad: bool = False, question_template: str | None = None) -> Dataset:
    """Read and convert a file, a folder's data files, or a list of both (`list_sources`), as one
    dataset: the rows of every file in order, each with its file:line. Unreadable rows stop the
    load with every bad place listed, unless skip_bad; rows with an empty question or answer are
    dropped and reported either way. `question_template` (and a `template` column in `columns`)
    build each question from several columns (rowtemplate.py)."""
    files, not_read = list_sources(path)
    parts = [_load_file(f, system_prompt, dict(columns or {}), question_template) for f in files]
    bad = [b for part in parts for b in part.bad]
    if bad and not skip_bad:
        shown = "\n".join(f"  {w}: {why}" for w, why in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        where = files[0] if len(files) == 1 else f"{len({w.rsplit(':', 1)[0] for w, _ in bad})} of {len(files)} data files"
        raise UserError(f"{where}: {len(bad)} unreadable row(s):\n{shown}{more}",
                        "fix these rows, or pass --skip-bad to drop them (they are counted in the report)")
    for part in parts:
        if not part.conversations:
            why = f"{len(part.dropped)} rows have an empty question or answer" if part.dropped else "no rows"
            raise UserError(f"{part.path}: no usable Q/A pairs ({why})",
                            "remove the file from the data" if len(parts) > 1 else None)
    if len(parts) == 1:
        parts[0].not_read = not_read
        return parts[0]
    out = Dataset(parts[0].path, [], [], "+".join(dict.fromkeys(p.format for p in parts)),
                  "+".join(dict.fromkeys(p.encoding for p in parts)), " | ".join(dict.fromkeys(p.layout for p in parts)),
                  combined_sha256([p.sha256 for p in parts]), parts[0].mapping, not_read=not_read)
    for i, part in enumerate(parts):
        out.conversations += part.conversations
        out.wheres += part.wheres
        out.source_of += [i] * len(part.conversations)
        out.dropped += part.dropped
        out.bad += part.bad
        out.rows_read += part.rows_read
        out.sources += part.sources
        out.columns = list(dict.fromkeys((out.columns or []) + (part.columns or []))) or None
        for name, rows in part.template_empty.items():
            out.template_empty.setdefault(name, []).extend(rows)
    return out


def load_recipe_data(d, path=None, skip_bad: bool | None = None) -> Dataset:
    """load() with every data setting of a recipe (`recipe.data`), so a new setting reaches data
    check, eval and merge alike; `path` and `skip_bad` replace the recipe's own."""
    return load(d.path if path is None else path, d.system_prompt, d.columns,
                d.skip_bad if skip_bad is None else skip_bad, d.question_template)


def _load_file(p: Path, system_prompt: str | None, mapping: dict[str, str], question_template: str | None) -> Dataset:
    """One file -> a Dataset with its bad rows listed (not raised: load() reports every file's)."""
    r = readers.read(p)
    first_rec = next((rec for rec in r.records if isinstance(rec.value, dict)), None)
    first = first_rec.value if first_rec else None
    _check_mapping(mapping, r.columns, first, p)
    templated = question_template is not None or bool(mapping.get("template"))
    if r.columns is not None:
        mapping = _tabular_mapping(r.columns, p, mapping, templated)
    # every column (JSON key) of the file, in order of first appearance
    all_keys = r.columns if r.columns is not None else list(dict.fromkeys(
        k for rec in r.records if isinstance(rec.value, dict) for k in rec.value if not str(k).startswith("__")))
    questions = None
    if templated:
        shape = _shape(first, "mapped" if mapping else detect_layout(first), mapping) if isinstance(first, dict) else None
        if shape is not None and shape not in QA_LAYOUTS:
            _not_qa(first_rec.where, shape, question_template)
        questions = _Questions(question_template, mapping.get("template"), all_keys, mapping, p)
    bad = [(b.where, b.reason) for b in r.bad]
    convs, wheres, dropped, layouts, used, empty = [], [], [], {}, set(), {}
    for rec in r.records:
        if not isinstance(rec.value, dict):
            bad.append((rec.where, f"expected an object with question and answer, got {type(rec.value).__name__}"))
            continue
        layout = detect_layout(rec.value) if not mapping else "mapped"
        shape = _shape(rec.value, layout, mapping)
        if questions is not None and shape not in QA_LAYOUTS:
            _not_qa(rec.where, shape, question_template)
        try:
            filled = questions.fill(rec.value, rec.where) if questions is not None else None
            if filled is None:
                conv = to_conversation(rec.value, layout, rec.where, mapping)
                row_used = _layout_keys(rec.value, shape, mapping)
            else:
                conv, row_used = _templated(rec.value, shape, rec.where, mapping, filled)
                row_used |= {mapping["template"]} if mapping.get("template") else set()
        except UserError as e:
            bad.append((rec.where, e.message.split(": ", 1)[-1]))
            continue
        used |= row_used
        if not any(m["role"] == "assistant" and answered(m) for m in conv):
            dropped.append((rec.where, "empty answer"))
            continue
        if not any(m["role"] == "user" and m["content"].strip() for m in conv):
            dropped.append((rec.where, "empty question"))
            continue
        for name in filled.empty if filled is not None else ():
            empty.setdefault(name, []).append(rec.where)
        if conv[-1]["role"] != "assistant":
            conv = conv[: max(i for i, m in enumerate(conv) if m["role"] == "assistant") + 1]
        if system_prompt and not any(m["role"] == "system" for m in conv):
            conv.insert(0, {"role": "system", "content": system_prompt})
        layouts[layout] = layouts.get(layout, 0) + 1
        convs.append(conv)
        wheres.append(rec.where)
    layout = "+".join(sorted(layouts))
    if layout == "mapped":
        layout = "columns " + ", ".join(f"{k}={v}" for k, v in mapping.items())
    if templated:
        layout += "; question from " + " else ".join(
            ([f"template column '{mapping['template']}'"] if mapping.get("template") else [])
            + (["data.question_template"] if question_template is not None else []))
    sha = file_sha256(p)
    unused = [k for k in all_keys if k not in used]
    source = Source(p, sha, r.format, r.encoding, layout, len(r.records) + len(r.bad), len(convs), r.columns, unused)
    return Dataset(p, convs, wheres, r.format, r.encoding, layout, sha, mapping, dropped, bad,
                   rows_read=len(r.records) + len(r.bad), columns=r.columns, sources=[source],
                   source_of=[0] * len(convs), template_empty=empty)


def _not_qa(where: str, shape: str, question_template: str | None) -> None:
    what = rowtemplate.OPTION if question_template is not None else "the template column (--columns template=)"
    raise UserError(f"{where}: {what} builds the question of a question/answer row (a table, alpaca, "
                    f"prompt/completion); this row is a '{shape}' conversation, where it does not apply",
                    "remove the question template for this data, or convert the rows to question/answer columns")


def question_text(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv if m["role"] == "user")


def answer_text(conv: Conversation) -> str:
    # a tool call is the answer of its turn: two rows calling different functions are not duplicates
    return "\n".join(m["content"] or (json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else "")
                     for m in conv if m["role"] == "assistant")


def split(n: int, eval_fraction: float, seed: int, clusters: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) indices. With `clusters` (near-duplicate groups from dedup),
    whole groups go to one side, so eval never holds a near copy of a training row."""
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    target = min(max(round(n * eval_fraction), 1), n - 1)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(clusters[i] if clusters else i, []).append(i)
    # A group bigger than the whole eval set (templated data: everything looks alike) cannot be
    # kept on one side without emptying eval; its rows are split one by one and the leak reported.
    for k in [k for k, g in groups.items() if len(g) > target]:
        for i in groups.pop(k):
            groups[-1 - i] = [i]
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    eval_idx: list[int] = []
    for k in keys:
        if len(eval_idx) >= target:
            break
        if len(eval_idx) + len(groups[k]) <= target or not eval_idx:
            eval_idx.extend(groups[k])
    eval_set = set(eval_idx)
    if len(eval_set) >= n:  # one giant cluster: nothing left to train on
        return list(range(n)), []
    return [i for i in range(n) if i not in eval_set], sorted(eval_set)
