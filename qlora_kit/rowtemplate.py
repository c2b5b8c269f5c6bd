"""A question built from several columns: `data.question_template` / `--question-template`, and a
per-row template column (`--columns template=COL`, as lora-scripts-style sheets have).

Syntax is Python's str.format without its formatting language: `{column}` inserts that row's cell
exactly as read, `{{` and `}}` are literal braces. A name is a column of the file; `{question}`,
`{answer}`, `{system}` and `{input}` also name the column mapped or detected for that field (so
`{question}` works whether the column is called question, 问题 or 咨询内容). An empty cell is
inserted empty (the data check counts and names them); an unknown name is an error that lists the
file's columns.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

OPTION = "data.question_template (--question-template)"
BRACES = "write a literal brace as {{ or }}"
FORMATTER = string.Formatter()


def _full(name: str, conversion: str | None, spec: str) -> str:
    """The text between the braces. str.format reads `{a:b}` as column a with format b; here a
    column name may contain ':' or '!' (时间:秒), so the parts are put back together."""
    return name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")


def fields(text: str) -> list[str]:
    """Placeholder names in order of first use. ValueError for a lone brace or an empty `{}`."""
    out: list[str] = []
    try:
        parts = list(FORMATTER.parse(text))
    except ValueError as e:  # "Single '}' encountered in format string", "expected '}' before end of string"
        raise ValueError(f"{e} ({BRACES})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        full = _full(name, conversion, spec)
        if not full.strip():
            raise ValueError(f"an empty {{}} names no column; write {{column name}}, or {{{{}}}} for literal braces")
        if full not in out:
            out.append(full)
    return out


def render(text: str, cell) -> str:
    """The template with each `{name}` replaced by `cell(name)`."""
    out = []
    for literal, name, spec, conversion in FORMATTER.parse(text):
        out.append(literal)
        if name is not None:
            out.append(cell(_full(name, conversion, spec)))
    return "".join(out)


@dataclass
class Filled:
    """One rendered question and what it read: the columns, and the names whose cell was empty."""

    text: str
    columns: set[str] = field(default_factory=set)
    empty: list[str] = field(default_factory=list)


def from_command_line(text: str | None) -> str | None:
    """`--question-template` as typed in a shell, where a line break is hard to type: the two
    characters \\n stand for a line break (a recipe's YAML string has its own escapes)."""
    return None if text is None else text.replace("\\n", "\n")
