"""Records -> conversations: the layouts people bring, an explicit column mapping that always
wins, and a train/eval split that keeps near-duplicates on one side.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages;
every assistant turn is trained on. `readers.py` knows files and encodings; `template.py` turns
conversations into tokens and labels; this module is the part in between.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import readers
from .errors import UserError

Message = dict[str, str]
Conversation = list[Message]

# Plain question/answer columns under the names people actually use (matched case-insensitively).
QUESTION_KEYS = ("question", "query", "ask", "prompt", "input", "instruction", "q", "问题", "问", "提问",
                 "咨询", "问句", "用户", "患者提问", "咨询内容", "题目")
ANSWER_KEYS = ("answer", "response", "output", "completion", "reply", "a", "回答", "答", "答案", "回复",
               "医生回答", "律师回答", "解答", "答复")
SYSTEM_KEYS = ("system", "system_prompt", "系统提示")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "observation": "user"}
MAPPING_KEYS = ("question", "answer", "system", "input", "messages")


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


def _turns(turns, where: str, key: str) -> Conversation:
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            raise UserError(f"{where}: every turn in '{key}' must be an object with role and content")
        role = t.get("role", t.get("from"))
        r = ROLE_ALIASES.get(str(role).strip().lower())
        if r is None:
            raise UserError(f"{where}: unknown role {role!r} in '{key}'", "use system, user or assistant (human/gpt)")
        msgs.append({"role": r, "content": _text(t.get("content", t.get("value")), where, "content")})
    _check_answers(msgs, where, lambda i: f"turn {i + 1} ({key}[{i}])")
    return msgs


def _check_answers(msgs: Conversation, where: str, name) -> None:
    """An empty assistant turn among answered ones would teach the model to say nothing after that
    question, so the row is refused like any bad row (file:line, and the turn). A conversation with
    no answer at all is not refused here: load() drops it as "empty answer", as for a Q/A row."""
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    empty = [i for i in answers if not msgs[i]["content"].strip()]
    if empty and len(empty) < len(answers):
        more = f" ({len(empty) - 1} more in this conversation)" if len(empty) > 1 else ""
        raise UserError(f"{where}: {name(empty[0])} is an empty assistant turn{more}; "
                        "fill in the answer, or remove it together with the question before it")


def to_conversation(rec: dict, layout: str, where: str, mapping: dict[str, str]) -> Conversation:
    msgs: Conversation = []
    if mapping.get("messages"):
        layout = "messages"
    elif mapping.get("question") or mapping.get("answer"):
        layout = "question-answer"
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


def _tabular_mapping(columns: list[str], path: Path, mapping: dict[str, str]) -> dict[str, str]:
    """For CSV/XLSX the columns are known up front: resolve the mapping once and report it."""
    m = dict(mapping)
    if "messages" in m:
        return m
    m.setdefault("question", _pick(columns, QUESTION_KEYS) or "")
    m.setdefault("answer", _pick(columns, ANSWER_KEYS) or "")
    missing = [k for k in ("question", "answer") if not m[k]]
    if missing:
        raise UserError(f"{path}: no {' and no '.join(missing)} column among: {', '.join(columns)}",
                        "name them: --columns question=COL,answer=COL (or data.columns in the recipe)")
    sk = _pick(columns, SYSTEM_KEYS)
    if sk and "system" not in m:
        m["system"] = sk
    return m


def load(path: str | Path, system_prompt: str | None = None, columns: dict[str, str] | None = None,
         skip_bad: bool = False) -> Dataset:
    """Read and convert a file. Unreadable rows stop the load with every bad place listed, unless
    skip_bad; rows with an empty question or answer are dropped and reported either way."""
    p = Path(path)
    r = readers.read(p)
    mapping = dict(columns or {})
    first = next((rec.value for rec in r.records if isinstance(rec.value, dict)), None)
    _check_mapping(mapping, r.columns, first, p)
    if r.columns is not None:
        mapping = _tabular_mapping(r.columns, p, mapping)
    bad = [(b.where, b.reason) for b in r.bad]
    convs, wheres, dropped, layouts = [], [], [], {}
    for rec in r.records:
        if not isinstance(rec.value, dict):
            bad.append((rec.where, f"expected an object with question and answer, got {type(rec.value).__name__}"))
            continue
        layout = detect_layout(rec.value) if not mapping else "mapped"
        try:
            conv = to_conversation(rec.value, layout, rec.where, mapping)
        except UserError as e:
            bad.append((rec.where, e.message.split(": ", 1)[-1]))
            continue
        if not any(m["role"] == "assistant" and m["content"].strip() for m in conv):
            dropped.append((rec.where, "empty answer"))
            continue
        if not any(m["role"] == "user" and m["content"].strip() for m in conv):
            dropped.append((rec.where, "empty question"))
            continue
        if conv[-1]["role"] != "assistant":
            conv = conv[: max(i for i, m in enumerate(conv) if m["role"] == "assistant") + 1]
        if system_prompt and not any(m["role"] == "system" for m in conv):
            conv.insert(0, {"role": "system", "content": system_prompt})
        layouts[layout] = layouts.get(layout, 0) + 1
        convs.append(conv)
        wheres.append(rec.where)
    if bad and not skip_bad:
        shown = "\n".join(f"  {w}: {why}" for w, why in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UserError(f"{p}: {len(bad)} unreadable row(s):\n{shown}{more}",
                        "fix these rows, or pass --skip-bad to drop them (they are counted in the report)")
    if not convs:
        why = f"{len(dropped)} rows have an empty question or answer" if dropped else "no rows"
        raise UserError(f"{p}: no usable Q/A pairs ({why})")
    layout = "+".join(sorted(layouts))
    if layout == "mapped":
        layout = "columns " + ", ".join(f"{k}={v}" for k, v in mapping.items())
    return Dataset(p, convs, wheres, r.format, r.encoding, layout, file_sha256(p), mapping, dropped, bad,
                   rows_read=len(r.records) + len(r.bad), columns=r.columns)


def question_text(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv if m["role"] == "user")


def answer_text(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv if m["role"] == "assistant")


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
