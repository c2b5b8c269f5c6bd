"""Read a user's Q/A file into one internal form: a list of conversations.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages; every
assistant turn is trained on. This module knows file formats and record layouts and nothing about
tokenizers; `template.py` turns conversations into tokens and labels.

Every rejected record names its file and line, so a user can open the file and fix it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

Message = dict[str, str]
Conversation = list[Message]

# Plain question/answer columns under the names people actually use.
QUESTION_KEYS = ("question", "query", "ask", "prompt", "input", "问题", "问", "提问", "instruction")
ANSWER_KEYS = ("answer", "response", "output", "completion", "reply", "回答", "答", "答案", "回复")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


@dataclass
class Dataset:
    path: Path
    conversations: list[Conversation]
    lines: list[int]  # source line (1-based) of each conversation
    layout: str
    sha256: str
    skipped: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _records(path: Path) -> list[tuple[int, object]]:
    """(line, record) pairs from a JSON array or JSON Lines file, whatever its extension says."""
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path}: the file is empty", "add one Q/A pair per line, e.g. {\"question\": ..., \"answer\": ...}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text", "save the file as UTF-8 (Excel: 'CSV UTF-8')") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        # line of each element: find where each top-level object starts
        starts = _array_element_lines(text, len(arr))
        return list(zip(starts, arr))
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})",
                "each line must be one JSON object; check quotes and commas on that line",
            ) from None
    return out


def _array_element_lines(text: str, n: int) -> list[int]:
    dec = json.JSONDecoder()
    lines, pos = [], text.index("[") + 1
    for _ in range(n):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)
    return lines


def _pick(rec: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k in rec:
            return k
    lower = {str(k).lower(): k for k in rec}
    for k in keys:
        if k in lower:
            return lower[k]
    return None


def detect_layout(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
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
    if not isinstance(v, str):
        if isinstance(v, (int, float)):
            return str(v)
        raise UserError(f"{where}: field '{name}' must be text, got {type(v).__name__}")
    return v


def to_conversation(rec: dict, layout: str, where: str, system_prompt: str | None = None) -> Conversation:
    msgs: Conversation = []
    if layout in ("messages", "sharegpt"):
        key = "messages" if layout == "messages" else "conversations"
        turns = rec[key]
        if not isinstance(turns, list):
            raise UserError(f"{where}: '{key}' must be a list of turns")
        for t in turns:
            if not isinstance(t, dict):
                raise UserError(f"{where}: every turn in '{key}' must be an object")
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            r = ROLE_ALIASES.get(str(role).lower())
            if r is None:
                raise UserError(f"{where}: unknown role {role!r}", "use system, user or assistant")
            msgs.append({"role": r, "content": _text(content, where, "content")})
        if "system" in rec and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
    elif layout == "alpaca":
        if rec.get("system"):
            msgs.append({"role": "system", "content": _text(rec["system"], where, "system")})
        for pair in rec.get("history") or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                msgs += [{"role": "user", "content": _text(pair[0], where, "history")},
                         {"role": "assistant", "content": _text(pair[1], where, "history")}]
        q = _text(rec.get("instruction"), where, "instruction")
        extra = _text(rec.get("input"), where, "input")
        msgs.append({"role": "user", "content": f"{q}\n\n{extra}" if extra.strip() else q})
        out_key = "output" if "output" in rec else "response"
        msgs.append({"role": "assistant", "content": _text(rec.get(out_key), where, out_key)})
    elif layout == "prompt-completion":
        msgs += [{"role": "user", "content": _text(rec["prompt"], where, "prompt")},
                 {"role": "assistant", "content": _text(rec["completion"], where, "completion")}]
    elif layout == "question-answer":
        qk, ak = _pick(rec, QUESTION_KEYS), _pick(rec, ANSWER_KEYS)
        msgs += [{"role": "user", "content": _text(rec[qk], where, qk)},
                 {"role": "assistant", "content": _text(rec[ak], where, ak)}]
    else:
        keys = ", ".join(map(str, rec))
        raise UserError(
            f"{where}: cannot tell question from answer (keys: {keys})",
            "use question/answer, instruction/input/output, prompt/completion, or messages",
        )
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def load(path: str | Path, system_prompt: str | None = None) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}", "check the path, or pass --data FILE")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a data file", "pass the .jsonl/.json file itself")
    convs, lines, skipped, layouts = [], [], [], set()
    for line, rec in _records(p):
        where = f"{p}:{line}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        layout = detect_layout(rec)
        conv = to_conversation(rec, layout, where, system_prompt)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in conv):
            skipped.append(f"{where}: empty answer")
            continue
        if not any(m["role"] == "user" and m["content"].strip() for m in conv):
            skipped.append(f"{where}: empty question")
            continue
        layouts.add(layout)
        convs.append(conv)
        lines.append(line)
    if not convs:
        raise UserError(f"{p}: no usable Q/A pairs ({len(skipped)} rows skipped: empty question or answer)")
    return Dataset(p, convs, lines, "+".join(sorted(layouts)), file_sha256(p), skipped)


def split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic shuffled split into (train, eval) indices; eval gets at least one row if asked."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_eval = round(n * eval_fraction) if eval_fraction > 0 else 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    return sorted(idx[n_eval:]), sorted(idx[:n_eval])
