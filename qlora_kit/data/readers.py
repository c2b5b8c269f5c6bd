"""Files -> records. Knows encodings and file formats; nothing about question/answer layouts.

Formats: JSON Lines (whatever the extension), JSON arrays, concatenated or pretty-printed JSON
objects, CSV/TSV (quoted multi-line cells), XLSX, and plain dialogue text ("用户：… 律师：…").
Encodings: UTF-8, UTF-8 with BOM, UTF-16 with BOM, GB18030 (a superset of GBK and GB2312),
detected from the bytes and reported. XLSX formulas give their cached results; a formula without
one (never calculated) or with an Excel error is reported by sheet and cell, not read as empty.

Every record carries `where` ("file:line"), the place a person opens to fix it. A record that
cannot be parsed becomes a `Bad` with that place and the reason, so the caller decides whether
to stop (the default) or skip it (--skip-bad).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import ParseError

from ..errors import UserError


@dataclass
class Record:
    where: str
    value: object


@dataclass
class Bad:
    where: str
    reason: str


@dataclass
class CellProblem:
    """A spreadsheet cell whose value cannot be used (a formula never calculated, an Excel error).
    Kept in the record in place of a value: only data.py knows whether the column is used, and a
    column nobody maps should not stop a file."""

    reason: str  # names the sheet and cell and says what to do


@dataclass
class Read:
    records: list[Record]
    bad: list[Bad]
    format: str  # jsonl | json | csv | tsv | xlsx | dialogue
    encoding: str
    columns: list[str] | None = None  # header of a tabular file


# --- encodings ------------------------------------------------------------------------------------


def decode(raw: bytes, path: Path) -> tuple[str, str]:
    """Bytes -> (text, encoding name). UTF-8 first (strict), then GB18030, which Excel and
    Notepad on Chinese Windows write; anything else is refused with the line of the first bad byte."""
    if raw.startswith(codecs.BOM_UTF8):
        return _strict(raw[3:], "utf-8", path), "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _strict(raw, "utf-16", path), "utf-16"
    if b"\x00" in raw[:4096]:
        raise UserError(f"{path}: a binary file, not text (it contains NUL bytes)",
                        "export the data as JSONL, CSV (UTF-8) or XLSX")
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        return raw.decode("gb18030"), "gb18030"
    except UnicodeDecodeError:
        pass
    line = raw[: utf8_error.start].count(b"\n") + 1
    raise UserError(
        f"{path}:{line}: unknown text encoding (not UTF-8, UTF-16 or GB18030/GBK; first bad byte "
        f"0x{raw[utf8_error.start]:02x})",
        "re-save the file as UTF-8 (Excel: 'CSV UTF-8'; Notepad: Save as, Encoding UTF-8)",
    )


def _strict(raw: bytes, enc: str, path: Path) -> str:
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: the file says it is {enc.upper()} but this line is not",
                        "re-save the file as UTF-8") from None


# --- JSON -----------------------------------------------------------------------------------------


def _json_stream(text: str, path: Path) -> tuple[list[Record], list[Bad]]:
    """JSON Lines, or JSON objects one after another (pretty-printed counts): raw_decode each.
    A malformed object is reported by line and skipped to the next line that starts an object."""
    dec = json.JSONDecoder()
    records, bad = [], []
    pos, n = 0, len(text)
    line, counted = 1, 0  # line numbers counted incrementally: a count from 0 per record is quadratic
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= n:
            break
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            bad.append(Bad(f"{path}:{line}", f"invalid JSON ({e.msg})"))
            nxt = re.compile(r"\n\s*\{").search(text, pos + 1)
            if nxt is None:
                break
            pos = nxt.start() + 1
            continue
        records.append(Record(f"{path}:{line}", value))
        pos = end
    return records, bad


def _json_document(text: str, path: Path, value) -> list[Record]:
    if isinstance(value, dict):
        if _is_registry(value):
            first = next(iter(value.values())).get("file_name", "one of the files it lists")
            raise UserError(f"{path}: this is a dataset registry (LLaMA-Factory's dataset_info.json), not data",
                            f"pass a data file it names, e.g. {first}; qlora-kit detects the layout itself")
        if len(value) > 1 and all(isinstance(v, dict) for v in value.values()):
            # {"id1": {...}, "id2": {...}}: records keyed by an id
            lines = _key_lines(text, list(value))
            return [Record(f"{path}:{lines.get(k, 1)}", v) for k, v in value.items()]
        lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
                 and k not in ("messages", "conversations", "history")]  # those are one record's turns
        if len(lists) == 1 and len(value) <= 3:  # {"data": [...]}, {"version": 1, "train": [...]}
            value = value[lists[0]]
        else:
            return [Record(f"{path}:1", value)]
    if not isinstance(value, list):
        raise UserError(f"{path}: JSON holding a {type(value).__name__}, not records",
                        "use a JSON array of objects or one JSON object per line")
    lines = _array_element_lines(text, len(value))
    return [Record(f"{path}:{ln}", v) for ln, v in zip(lines, value)]


def _key_lines(text: str, keys: list[str]) -> dict[str, int]:
    out, pos, line = {}, 0, 1
    for k in keys:
        i = text.find(json.dumps(k), pos)
        if i < 0:
            break
        line += text.count("\n", pos, i)
        out[k], pos = line, i
    return out


_REGISTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}


def _is_registry(value: dict) -> bool:
    """LLaMA-Factory's dataset_info.json: a mapping of dataset names to where their files are."""
    entries = list(value.values())
    hits = sum(1 for v in entries if isinstance(v, dict) and _REGISTRY_KEYS & set(v))
    return len(entries) >= 1 and hits >= 0.8 * len(entries)


def _array_element_lines(text: str, n: int) -> list[int]:
    dec = json.JSONDecoder()
    out, pos = [], text.index("[") + 1
    line, counted = 1, 0
    ws = re.compile(r"[\s,]*")
    for _ in range(n):
        pos = ws.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        out.append(line)
        _, pos = dec.raw_decode(text, pos)
    return out


def read_json(text: str, path: Path) -> Read:
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})",
                            "fix that line; a JSON array must be valid as a whole") from None
        return Read(_json_document(text, path, value), [], "json", "")
    try:  # one document: a wrapper such as {"data": [...]}, a registry, or a one-record file
        value = json.loads(text)
    except json.JSONDecodeError:  # JSON Lines, or several objects one after another
        records, bad = _json_stream(text, path)
        return Read(records, bad, "jsonl", "")
    return Read(_json_document(text, path, value), [], "json", "")


# --- tables ---------------------------------------------------------------------------------------


def read_csv(text: str, path: Path, delimiter: str | None = None) -> Read:
    csv.field_size_limit(1 << 30)  # a long answer in one cell is data, not an error (default: 128 KiB)
    if delimiter is None:
        sample = text[:20000]
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
        except csv.Error:
            delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, bad, header, start = [], [], None, 1
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip().lstrip("\ufeff") for c in row]
                if len(header) < 2 or len(set(header)) != len(header):
                    raise UserError(f"{where}: the first row must be a header naming each column once (got {row!r})",
                                    "add a header row such as: question,answer")
                continue
            if len(row) != len(header):
                bad.append(Bad(where, f"{len(row)} cells but the header has {len(header)} columns"))
                continue
            records.append(Record(where, dict(zip(header, row))))
    except csv.Error as e:
        bad.append(Bad(f"{path}:{reader.line_num}", f"unreadable CSV ({e})"))
    if header is None:
        raise UserError(f"{path}: no rows", "the file is empty")
    return Read(records, bad, "tsv" if delimiter == "\t" else "csv", "", header)


def cell_text(v) -> str:
    """A spreadsheet value as text: empty for a blank cell, 3 (not 3.0) for a whole number."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def read_xlsx(path: Path) -> Read:
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - a dependency of qlora-kit
        raise UserError("reading .xlsx needs openpyxl", "pip install openpyxl") from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # a corrupt or password-protected workbook
        raise UserError(f"{path}: cannot open as an Excel workbook ({type(e).__name__})",
                        "open it in Excel and save as .xlsx or CSV UTF-8") from None
    try:
        # Set by programs that write formulas without computing them (openpyxl, XlsxWriter): Excel
        # recalculates on opening, and XlsxWriter stores 0 as every formula's "cached" result.
        calc_on_load = bool(getattr(wb.calculation, "fullCalcOnLoad", False))
        for ws in wb.worksheets:
            try:
                read = _read_sheet(ws, path, len(wb.worksheets) > 1, calc_on_load)
            except (ParseError, zipfile.BadZipFile, zlib.error, EOFError) as e:  # sheets are read lazily
                raise UserError(f"{path}: sheet {ws.title!r} is damaged ({type(e).__name__})",
                                "open it in Excel and save as .xlsx or CSV UTF-8") from None
            if read is not None:
                return read
    finally:
        wb.close()
    raise UserError(f"{path}: no sheet has a header row with two or more columns",
                    "put column names (e.g. 问题, 回答) in the first row")


def _read_sheet(ws, path: Path, many_sheets: bool, calc_on_load: bool) -> Read | None:
    problems = _formula_problems(ws, calc_on_load)  # (row, column) -> why its value cannot be used
    records, header = [], None
    for i, row in enumerate(ws.iter_rows(values_only=True), start=1):
        cells: list = [cell_text(c) for c in row]
        for j in range(len(cells)) if problems else ():
            if (i, j + 1) in problems:
                cells[j] = CellProblem(problems[i, j + 1])
        if not any(isinstance(c, CellProblem) or c.strip() for c in cells):
            continue  # a blank row (a row of uncomputed formulas is not blank: it is reported)
        where = f"{path}:{ws.title}!{i}" if many_sheets else f"{path}:{i}"
        if header is None:
            header = [c.strip() if isinstance(c, str) else "" for c in cells]
            while header and not header[-1]:
                header.pop()
            if len(header) < 2:
                header = None  # a title row; look further down
            continue
        vals = cells[: len(header)] + [""] * (len(header) - len(cells))
        records.append(Record(where, {h: v for h, v in zip(header, vals) if h}))
    if header is None:
        return None
    return Read(records, [], "xlsx", "xlsx", [h for h in header if h])


_SHEET_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


def _formula_problems(ws, calc_on_load: bool) -> dict[tuple[int, int], str]:
    """Cells whose stored value is not a formula's real result: no cached value at all, an Excel
    error, or XlsxWriter's placeholder 0. openpyxl reads a missing result and a cached empty string
    (=IF(A2="","",…) saved by Excel) alike as None, so the sheet's XML is read directly; only a
    string result (t="str") may legitimately be empty."""
    from xml.etree.ElementTree import iterparse  # what openpyxl's own reader uses

    from openpyxl.utils import get_column_letter
    from openpyxl.utils.cell import column_index_from_string, coordinate_from_string

    fix = "open the file in Excel/LibreOffice and save it, or paste values"
    out: dict[tuple[int, int], str] = {}
    row_n = col_n = 0
    with ws._get_source() as src:  # the sheet's own part of the archive, as openpyxl's reader opens it
        for event, el in iterparse(src, events=("start", "end")):
            if el.tag == _SHEET_NS + "row":
                if event == "start":
                    row_n, col_n = int(el.get("r", row_n + 1)), 0
                else:
                    el.clear()
                continue
            if event != "end" or el.tag != _SHEET_NS + "c":
                continue
            ref = el.get("r")  # optional in the format: cells without it follow one another
            if ref:
                letters, row_n = coordinate_from_string(ref)
                col_n = column_index_from_string(letters)
            else:
                col_n += 1
            kind, value = el.get("t", "n"), el.findtext(_SHEET_NS + "v")
            why = None
            if kind == "e":
                why = f"holds the Excel error {value} (its formula failed); fix the formula or type the value"
            elif el.find(_SHEET_NS + "f") is not None:
                if not value and kind != "str":
                    why = f"is a formula with no cached value; {fix}"
                elif calc_on_load and kind == "n" and value.strip() == "0":
                    why = f"is a formula whose result was never calculated (the file's writer stored 0 instead); {fix}"
            if why:
                out[row_n, col_n] = f"{ws.title}!{get_column_letter(col_n)}{row_n} {why}"
            el.clear()
    return out


# --- dialogue text --------------------------------------------------------------------------------

_TURN = re.compile(r"^\s*([^\s:：]{1,8})\s*[:：]\s*(.*)$")
USER_LABELS = {"用户", "问", "提问", "客户", "患者", "病人", "病患", "来访者", "咨询者", "咨询人", "员工", "操作员",
               "q", "user", "human", "question", "customer", "patient"}
ASSISTANT_LABELS = {"律师", "医生", "大夫", "答", "回答", "客服", "助手", "工程师", "专家", "顾问", "老师", "分析师",
                    "a", "assistant", "answer", "doctor", "lawyer", "engineer", "bot", "ai", "gpt"}
SYSTEM_LABELS = {"系统", "system"}


def read_dialogue(text: str, path: Path) -> Read:
    """Blocks separated by blank lines; each turn starts with 'label：'. Known labels give the role;
    otherwise the first speaker of a block is the user and the second the assistant."""
    records, bad = [], []
    blocks: list[tuple[int, list[tuple[int, str]]]] = []
    cur: list[tuple[int, str]] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.strip() in ("---", "***", "==="):
            if cur:
                blocks.append((cur[0][0], cur))
                cur = []
            continue
        cur.append((i, line))
    if cur:
        blocks.append((cur[0][0], cur))
    labelled = 0
    for start, lines in blocks:
        turns: list[list] = []
        speakers: list[str] = []
        for ln, line in lines:
            m = _TURN.match(line)
            if m and (m.group(1).lower() in USER_LABELS | ASSISTANT_LABELS | SYSTEM_LABELS or len(speakers) < 2
                      or m.group(1) in speakers):
                label = m.group(1)
                if label not in speakers:
                    speakers.append(label)
                turns.append([label, m.group(2)])
                labelled += 1
            elif turns:
                turns[-1][1] += "\n" + line.strip()
            else:
                bad.append(Bad(f"{path}:{ln}", "text before the first 'speaker：' label"))
                break
        if not turns:
            continue
        roles = _roles(speakers)
        records.append(Record(f"{path}:{start}", {"__turns__": [(roles[s], t.strip()) for s, t in turns]}))
    if not labelled:
        raise UserError(f"{path}: not tabular or conversational data (no JSON, no CSV header, no 'speaker：' turns)",
                        "use JSONL with question/answer fields, CSV/XLSX with a header row, or dialogue lines "
                        "like '用户：…' / '律师：…' separated by blank lines")
    return Read(records, bad, "dialogue", "")


def _roles(speakers: list[str]) -> dict[str, str]:
    roles = {}
    for s in speakers:
        low = s.lower()
        roles[s] = ("system" if low in SYSTEM_LABELS else "user" if low in USER_LABELS
                    else "assistant" if low in ASSISTANT_LABELS else None)
    free = [s for s in speakers if roles[s] is None]
    for s in free:  # unknown labels: the first to speak asks, the next answers
        taken = set(roles.values())
        roles[s] = "user" if "user" not in taken else "assistant"
    return roles


# --- entry point ----------------------------------------------------------------------------------

XLSX_MAGIC = b"PK\x03\x04"
OLE_MAGIC = b"\xd0\xcf\x11\xe0"
PDF_MAGIC = b"%PDF"


def read(path: str | Path) -> Read:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}", "check the path, or pass --data FILE")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a data file", "pass the .jsonl/.json/.csv/.xlsx file itself")
    raw = p.read_bytes()
    if not raw.strip():
        raise UserError(f"{p}: the file is empty", "add one Q/A pair per line, e.g. {\"question\": ..., \"answer\": ...}")
    suffix = p.suffix.lower()
    if raw.startswith(XLSX_MAGIC) or suffix in (".xlsx", ".xlsm"):
        return read_xlsx(p)
    if raw.startswith(OLE_MAGIC) or suffix == ".xls":
        raise UserError(f"{p}: an old Excel .xls workbook", "open it in Excel and save as .xlsx or CSV UTF-8")
    if raw.startswith(PDF_MAGIC):
        raise UserError(f"{p}: a PDF, not tabular or conversational data", "export the Q/A pairs as JSONL, CSV or XLSX")
    text, encoding = decode(raw, p)
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        r = read_json(text, p)
    elif suffix in (".csv", ".tsv") or _looks_tabular(text):
        r = read_csv(text, p, "\t" if suffix == ".tsv" else None)
    else:
        r = read_dialogue(text, p)
    r.encoding = encoding
    return r


def _looks_tabular(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    return not _TURN.match(first) and (first.count(",") >= 1 or first.count("\t") >= 1)
