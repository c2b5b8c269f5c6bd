"""Files -> one Dataset: the files and folders `data.path` / `--data` name, each read (readers.py)
and converted row by row (layouts.py), every conversation with its file:line, what was dropped or
unreadable and why, each file's sha256; and a train/eval split that keeps near-duplicates on one
side. `template.py` turns the conversations into tokens and labels.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .. import rowtemplate
from . import readers
from .layouts import (
    ANSWER_KEYS,
    QA_LAYOUTS,
    QUESTION_KEYS,
    SYSTEM_KEYS,
    Conversation,
    Questions,
    answered,
    detect_layout,
    keys_read,
    pick_column,
    row_shape,
    templated_conversation,
    to_conversation,
)

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
    m.setdefault("question", pick_column(columns, QUESTION_KEYS) or "")
    m.setdefault("answer", pick_column(columns, ANSWER_KEYS) or "")
    missing = [k for k in ("question", "answer") if not m[k] and not (k == "question" and templated)]
    if missing:
        raise UserError(f"{path}: no {' and no '.join(missing)} column among: {', '.join(columns)}",
                        "name them: --columns question=COL,answer=COL (or data.columns in the recipe)")
    if not m["question"]:
        del m["question"]
    sk = pick_column(columns, SYSTEM_KEYS)
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
        shape = row_shape(first, "mapped" if mapping else detect_layout(first), mapping) if isinstance(first, dict) else None
        if shape is not None and shape not in QA_LAYOUTS:
            _not_qa(first_rec.where, shape, question_template)
        questions = Questions(question_template, mapping.get("template"), all_keys, mapping, p)
    bad = [(b.where, b.reason) for b in r.bad]
    convs, wheres, dropped, layouts, used, empty = [], [], [], {}, set(), {}
    for rec in r.records:
        if not isinstance(rec.value, dict):
            bad.append((rec.where, f"expected an object with question and answer, got {type(rec.value).__name__}"))
            continue
        layout = detect_layout(rec.value) if not mapping else "mapped"
        shape = row_shape(rec.value, layout, mapping)
        if questions is not None and shape not in QA_LAYOUTS:
            _not_qa(rec.where, shape, question_template)
        try:
            filled = questions.fill(rec.value, rec.where) if questions is not None else None
            if filled is None:
                conv = to_conversation(rec.value, layout, rec.where, mapping)
                row_used = keys_read(rec.value, shape, mapping)
            else:
                conv, row_used = templated_conversation(rec.value, shape, rec.where, mapping, filled)
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
