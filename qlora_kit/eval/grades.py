"""The human grading loop: a blind review sheet for a domain expert, and the grades read back.

`qlora-kit eval RUN` writes review.csv: per held-out question the reference and the two answers as
"answer A" and "answer B". Which model wrote which is a seeded, balanced shuffle (half the rows show
the base model first), so the grader cannot tell and position bias cancels out. The key lives in
review.key.json beside the sheet; only the sheet goes to the grader.

A sheet with anything typed into it (a grade, a preference, a comment, any non-generated column)
is never replaced: the next eval writes review-2.csv, review-3.csv, ... and says so. An untouched
sheet may be replaced, but its key is kept (keys append, they never drop an old version), because
a copy of it may be out with a grader.

`qlora-kit eval RUN --grades FILE [--grades FILE ...]` reads graded sheets (CSV as Excel or
LibreOffice save it, or .xlsx), joins them with the key through the row ids, and summarises:
mean grade per model, the tuned model's win rate with a Wilson interval, agreement between
graders (Cohen's kappa, Krippendorff's alpha) and the rows they disagree on. No model is loaded.

Pure python on purpose: scipy/sklearn are not dependencies, and the three formulas are short and
tested against published values (tests/test_grading.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import secrets
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist


from .. import rundir
from ..data import readers
from ..errors import UserError
from ..terminal import console


HEADER = ["id", "where", "question", "reference", "answer_A", "answer_B",
          "grade_A (1-5)", "grade_B (1-5)", "preferred (A/B/tie)", "comment"]
# Columns eval fills in; anything typed anywhere else makes a sheet "graded" (never replaced).
GENERATED = {"id", "where", "question", "reference", "answer_a", "answer_b", "base_answer", "tuned_answer"}
FIELDS = ("grade_A", "grade_B", "preferred", "comment")
_FIELD_RE = re.compile(r"^(grade_A|grade_B|preferred|comment)(?:[ _](.+))?$", re.IGNORECASE)
# Row ids are "<token>-<n>": consonants only, so no spreadsheet reads one as a date or a number.
_TOKEN_CHARS = "bcdfghjkmnpqrstvwxz"
SEED = 42


def key_path(sheet: Path) -> Path:
    return sheet.with_name(sheet.stem + ".key.json")


# --- writing the blind sheet -------------------------------------------------------------------

def _order(n: int, seed: int) -> list[bool]:
    """Per row: does the tuned model's answer appear as A? Balanced, shuffled, reproducible."""
    tuned_first = [True] * (n // 2) + [False] * (n - n // 2)
    random.Random(seed).shuffle(tuned_first)
    return tuned_first


def _untouched(path: Path) -> bool:
    """True when the file is a review sheet with nothing typed outside the generated columns."""
    try:
        table = read_table(path)
    except UserError:
        return False  # unreadable or foreign: keep it, whatever it is
    if not table or "question" not in {_norm(h).lower() for h in table[0]}:
        return False
    try:
        _load_key(key_path(path)) if key_path(path).is_file() else None
    except UserError:
        return False  # its key is damaged: leave both alone rather than append to it
    extra = [i for i, h in enumerate(table[0]) if _norm(h).lower() not in GENERATED]
    return not any(i < len(row) and row[i].strip() for row in table[1:] for i in extra)


def _target(run_dir: Path) -> tuple[Path, str]:
    """The sheet to write: review.csv, else the first review-N.csv that is absent or untouched."""
    kept = []
    for n in range(1, 10_000):
        p = run_dir / ("review.csv" if n == 1 else f"review-{n}.csv")
        if not p.exists():
            note = f"wrote {p.name}"
        elif _untouched(p):
            note = f"replaced {p.name} (nothing was graded in it)"
        else:
            kept.append(p.name)
            continue
        if kept:
            note += f"; kept {', '.join(kept)} as is: grades are in it"
        return p, note
    raise UserError(f"{run_dir}: 10,000 graded review sheets", "move some of them away")


def write_sheet(run_dir: Path, rows: list[dict], seed: int = SEED) -> Path:
    """The blind sheet for the eval rows (each with question/reference/base/tuned answers) and its key."""
    run_dir = Path(run_dir)
    sheet, note = _target(run_dir)
    token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(5))  # unique per eval: ids never collide
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(HEADER)
    mapping = {}
    for i, (r, tuned_a) in enumerate(zip(rows, _order(len(rows), seed))):
        rid = f"{token}-{i + 1}"
        a, b = ("tuned", "base") if tuned_a else ("base", "tuned")
        mapping[rid] = {"A": a, "B": b, "where": r["where"]}
        w.writerow([rid, r["where"], r["question"], r["reference"], r[a]["answer"], r[b]["answer"], "", "", "", ""])
    kp = key_path(sheet)
    versions = _load_key(kp) if kp.is_file() else []
    versions.append({"token": token, "sheet": sheet.name, "created": rundir.now(), "seed": seed, "rows": mapping})
    rundir.write_json(kp, {"about": f"Which model wrote answer A and answer B in {sheet.name}. Keep this file "
                                    "here and do not send it to the grader; every version is kept so that "
                                    "copies already sent out can still be read back.",
                           "versions": versions})
    rundir.write_atomic(sheet, "\ufeff" + buf.getvalue())  # BOM: Excel opens UTF-8 CSV with Chinese correctly
    console.print(f"review: {note}; send {sheet.name} to the grader, keep {kp.name} here", highlight=False)
    return sheet


# --- reading a sheet back ----------------------------------------------------------------------

def _norm(header: str) -> str:
    """'grade_A (1-5)' -> 'grade_A': the hint in brackets is for people."""
    return re.sub(r"\s*[(（].*[)）]\s*$", "", unicodedata.normalize("NFKC", str(header))).strip()


def col_letter(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA: columns as a spreadsheet names them."""
    from openpyxl.utils import get_column_letter  # only for a message: not imported before one is needed

    return get_column_letter(i + 1)


def read_table(path: Path) -> list[list[str]]:
    """Rows of cells as strings; row i is spreadsheet row i+1. CSV (any of the encodings and separators
    Excel and LibreOffice save) or .xlsx."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grades file not found: {path}", "pass the review sheet the grader sent back")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        import zipfile

        import openpyxl

        try:
            wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
            rows = [[readers.cell_text(v) for v in row] for row in wb.worksheets[0].iter_rows(values_only=True)]
            wb.close()
            return rows
        except (zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
            raise UserError(f"{path}: not a readable .xlsx file ({e})", "save it again from Excel, or as CSV") from None
    # UTF-8 (with or without BOM), Excel's "Unicode text" (UTF-16) and its plain "CSV" on a Chinese
    # Windows (GB18030): the data files' decoder, with its messages
    text, _ = readers.decode(path.read_bytes(), path)
    first = text.split("\n", 1)[0]
    delim = max(",;\t", key=lambda d: len(next(csv.reader([first], delimiter=d), [])))
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})", "save it again as CSV UTF-8, or as .xlsx") from None


@dataclass
class Judgement:
    grader: str
    unit: str  # the row id
    grades: dict = field(default_factory=dict)  # "base"/"tuned" -> 1..5
    preferred: str | None = None  # "base", "tuned", "tie"; explicit, or from the two grades
    comment: str = ""


@dataclass
class Sheet:
    path: Path
    graders: list[str]
    judgements: list[Judgement]
    keys: dict[str, dict]  # token -> key version used
    rows: dict[str, dict]  # row id -> where, question


def _load_key(path: Path) -> list[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return list(obj["versions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a review key written by qlora-kit eval ({e})",
                        "restore it from a backup; without its key a blind sheet cannot be read back") from None


def _keys(run_dir: Path, sheet: Path) -> dict[str, dict]:
    """token -> key version, from every review key in the run and the one beside the sheet."""
    found = {}
    for kp in sorted({*run_dir.glob("review*.key.json"), key_path(sheet)}):
        if kp.is_file():
            for v in _load_key(kp):
                found[v["token"]] = v
    return found


def _grade(s: str):
    """'4', '4.0' or '４' -> 4; '' -> None; anything else -> ValueError."""
    if not s:
        return None
    f = float(s)
    if not f.is_integer() or not 1 <= f <= 5:
        raise ValueError
    return int(f)


_PREF = {"a": "A", "b": "B", "tie": "tie"}


def read_sheet(path: Path, run_dir: Path) -> Sheet:
    path, run_dir = Path(path), Path(run_dir)
    table = read_table(path)
    if not table:
        raise UserError(f"{path}: empty file", "pass the review sheet the grader filled in")
    header = [_norm(h) for h in table[0]]
    lower = [h.lower() for h in header]
    if "id" not in lower or "answer_a" not in lower:
        raise UserError(f"{path}, row 1: no 'id' and 'answer_A' columns, so this is not a blind review sheet",
                        "grade a review.csv written by `qlora-kit eval` (keep its header row as it is)")
    id_col = lower.index("id")
    cols: dict[str, dict[str, int]] = defaultdict(dict)  # grader suffix ('' = none) -> field -> column
    for i, h in enumerate(header):
        m = _FIELD_RE.match(h)
        if m:
            fld = next(f for f in FIELDS if f.lower() == m.group(1).lower())
            cols[m.group(2) or ""][fld] = i
    cols = {g: c for g, c in cols.items() if set(c) - {"comment"}}
    if not cols:
        raise UserError(f"{path}, row 1: no grade_A, grade_B or preferred column",
                        "keep the header row eval wrote; a second grader adds columns like grade_A_li, grade_B_li")
    names = {g: (g or path.stem) for g in cols}
    keys = _keys(run_dir, path)
    judgements, rows, used, seen = [], {}, {}, {}
    for r, row in enumerate(table[1:], start=2):
        cell = lambda i: unicodedata.normalize("NFKC", row[i]).strip() if i < len(row) else ""  # noqa: E731
        if not any(cell(i) for i in range(len(row))):
            continue  # blank lines a spreadsheet leaves at the end
        where = f"{path}, row {r}, column {col_letter(id_col)} (id)"
        rid = cell(id_col)
        version = keys.get(rid.rsplit("-", 1)[0]) if "-" in rid else None
        if version is None or rid not in version["rows"]:
            raise UserError(f"{where}: '{rid}' is in no review key of {run_dir}",
                            f"grade a sheet written by `qlora-kit eval {run_dir}`, keep its review*.key.json in "
                            "the run directory, and do not edit the id column")
        if rid in seen:
            raise UserError(f"{where}: id '{rid}' appears twice (rows {seen[rid]} and {r})", "delete one of the two rows")
        seen[rid] = r
        used[version["token"]] = version
        side = version["rows"][rid]
        q = lower.index("question") if "question" in lower else None
        rows[rid] = {"where": side.get("where", ""), "question": row[q].strip() if q is not None and q < len(row) else ""}
        for g, c in cols.items():
            j = Judgement(names[g], rid)
            for letter in "AB":
                i = c.get(f"grade_{letter}")
                if i is None:
                    continue
                try:
                    v = _grade(cell(i))
                except ValueError:
                    raise UserError(f"{path}, row {r}, column {col_letter(i)} ({header[i]}): '{cell(i)}' is not a grade",
                                    "write a whole number from 1 (bad) to 5 (good), or leave the cell empty") from None
                if v is not None:
                    j.grades[side[letter]] = v
            i = c.get("preferred")
            if i is not None and cell(i):
                p = _PREF.get(cell(i).lower())
                if p is None:
                    raise UserError(f"{path}, row {r}, column {col_letter(i)} ({header[i]}): '{cell(i)}' is not a preference",
                                    "write A, B or tie, or leave the cell empty")
                j.preferred = "tie" if p == "tie" else side[p]
            elif len(j.grades) == 2:  # no explicit preference: the higher grade wins
                b, t = j.grades["base"], j.grades["tuned"]
                j.preferred = "tuned" if t > b else "base" if b > t else "tie"
            j.comment = cell(c["comment"]) if "comment" in c else ""
            if j.grades or j.preferred:
                judgements.append(j)
    if not judgements:
        raise UserError(f"{path}: no grades filled in", "fill in grade_A/grade_B (1-5) or preferred (A/B/tie), then run again")
    return Sheet(path, list(names.values()), judgements, used, rows)


# --- statistics --------------------------------------------------------------------------------

def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two graders' labels on the same items; None when chance agreement is 1."""
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    return None if pe == 1 else (po - pe) / (1 - pe)


def krippendorff_alpha(units: list[list], metric: str = "nominal") -> float | None:
    """Krippendorff's alpha; units = the values the graders gave each item (missing ones left out).

    Coincidence-matrix form (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"),
    metrics nominal, ordinal and interval. None when there is nothing to compare or no variation."""
    pairable = [u for u in units if len(u) >= 2]
    o: dict[tuple, float] = defaultdict(float)
    for u in pairable:
        for i, c in enumerate(u):
            for j, k in enumerate(u):
                if i != j:
                    o[c, k] += 1 / (len(u) - 1)
    values = sorted({c for c, _ in o})
    nc = {c: sum(o[c, k] for k in values) for c in values}
    n = sum(nc.values())
    if n <= 1:
        return None

    def delta(c, k):
        if metric == "nominal":
            return float(c != k)
        if metric == "interval":
            return float(c - k) ** 2
        lo, hi = sorted((values.index(c), values.index(k)))  # ordinal: ranks, by the values' frequencies
        return (sum(nc[values[g]] for g in range(lo, hi + 1)) - (nc[c] + nc[k]) / 2) ** 2

    observed = sum(o[c, k] * delta(c, k) for c in values for k in values)
    expected = sum(nc[c] * nc[k] * delta(c, k) for c in values for k in values)
    return None if expected == 0 else 1 - (n - 1) * observed / expected


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarise(sheets: list[Sheet]) -> dict:
    """Mean grade per model, win rate with its interval, agreement, disagreements (a JSON-able dict)."""
    judgements = [j for s in sheets for j in s.judgements]
    graders = list(dict.fromkeys(j.grader for j in judgements))
    rows = {k: v for s in sheets for k, v in s.rows.items()}
    models = {m: {"mean": _mean(g := [j.grades[m] for j in judgements if m in j.grades]), "n": len(g)}
              for m in ("base", "tuned")}
    by_unit: dict[str, dict[str, Judgement]] = defaultdict(dict)
    for j in judgements:
        by_unit[j.unit][j.grader] = j
    # A row's verdict is its graders' majority (tuned 1, base 0, tie 1/2); a split vote is a tie.
    # The interval is over rows, the independent units, not over judgements.
    tally = {"tuned": 0, "base": 0, "tie": 0}
    score = {"tuned": 1.0, "base": 0.0, "tie": 0.5}
    for js in by_unit.values():
        prefs = [score[j.preferred] for j in js.values() if j.preferred]
        if prefs:
            m = _mean(prefs)
            tally["tuned" if m > 0.5 else "base" if m < 0.5 else "tie"] += 1
    decided = tally["tuned"] + tally["base"]
    ci = wilson(tally["tuned"], decided)
    per_grader = []
    for g in graders:
        mine = [j for j in judgements if j.grader == g]
        per_grader.append({"grader": g, "n": len(mine),
                           **{f"{m}_mean": _mean([j.grades[m] for j in mine if m in j.grades]) for m in ("base", "tuned")},
                           **{f"prefers_{p}": sum(j.preferred == p for j in mine) for p in ("tuned", "tie", "base")}})
    out = {
        "sheets": [str(s.path) for s in sheets],
        "keys": sorted({f"{v['sheet']} ({v['created']})" for s in sheets for v in s.keys.values()}),
        "graders": graders, "rows_graded": len(by_unit), "models": models,
        "preference": {"tuned_wins": tally["tuned"], "base_wins": tally["base"], "ties": tally["tie"],
                       "win_rate": tally["tuned"] / decided if decided else None,
                       "ci95": list(ci) if ci else None},
        "per_grader": per_grader,
    }
    if len(graders) >= 2:
        out["agreement"] = _agreement(by_unit, graders)
        out["disagreements"] = _disagreements(by_unit, rows)
    return out


def _agreement(by_unit: dict, graders: list[str]) -> dict:
    prefs = [[j.preferred for j in js.values() if j.preferred] for js in by_unit.values()]
    grades = [[j.grades[m] for j in js.values() if m in j.grades] for js in by_unit.values() for m in ("base", "tuned")]
    out = {"alpha_preference_nominal": krippendorff_alpha(prefs, "nominal"),
           "alpha_grades_interval": krippendorff_alpha(grades, "interval"),
           "units_preference": sum(len(p) >= 2 for p in prefs)}
    if len(graders) == 2:
        a, b = graders
        both = [js for js in by_unit.values() if a in js and b in js and js[a].preferred and js[b].preferred]
        out["cohen_kappa_preference"] = cohen_kappa([js[a].preferred for js in both], [js[b].preferred for js in both])
        out["units_both"] = len(both)
    return out


def _disagreements(by_unit: dict, rows: dict) -> list[dict]:
    """Rows where the graders' preferences differ, or one answer's grades are 2 or more apart."""
    out = []
    for unit, js in by_unit.items():
        if len(js) < 2:
            continue
        prefs = {j.preferred for j in js.values() if j.preferred}
        spread = max((max(g) - min(g) for m in ("base", "tuned")
                      if len(g := [j.grades[m] for j in js.values() if m in j.grades]) >= 2), default=0)
        if len(prefs) > 1 or spread >= 2:
            out.append({"id": unit, **rows.get(unit, {}),
                        "graders": {g: {"base": j.grades.get("base"), "tuned": j.grades.get("tuned"),
                                        "preferred": j.preferred, "comment": j.comment} for g, j in js.items()}})
    return out


# --- the command -------------------------------------------------------------------------------

def read_all(run_dir: Path, files: list[Path]) -> list[Sheet]:
    files = list({Path(f).resolve(): Path(f) for f in files}.values())  # one file twice is one grader, not two
    sheets = [read_sheet(f, run_dir) for f in files]
    seen: dict[str, int] = {}
    for s in sheets:  # the same grader name from two files: two graders (e.g. two folders' review.csv)
        for j_name in list(s.graders):
            seen[j_name] = seen.get(j_name, 0) + 1
            if seen[j_name] > 1:
                new = f"{j_name} ({seen[j_name]})"
                s.graders[s.graders.index(j_name)] = new
                for j in s.judgements:
                    if j.grader == j_name:
                        j.grader = new
    return sheets


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def num(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def headline(s: dict) -> str:
    """One sentence on the preference; ties reported separately, not counted as half."""
    p = s["preference"]
    decided = p["tuned_wins"] + p["base_wins"]
    if not decided:
        return f"No row decided between the models ({p['ties']} ties)."
    lo, hi = p["ci95"]
    return (f"Tuned preferred over base in {p['tuned_wins']} of {decided} decided rows: {pct(p['win_rate'])} "
            f"(95% Wilson interval {pct(lo)}–{pct(hi)}); ties (not counted in the rate): {p['ties']}.")


def verdicts(d: dict) -> str:
    """'li: 2/4, tuned (clearer); wang: 4/3, base' for one row of disagreement (grades base/tuned)."""
    return "; ".join(f"{n}: {num(v['base'], 0)}/{num(v['tuned'], 0)}, {v['preferred'] or '–'}"
                     + (f" ({v['comment']})" if v["comment"] else "") for n, v in d["graders"].items())


def print_summary(s: dict) -> None:
    m = s["models"]
    console.print(f"grades: {s['rows_graded']} rows by {', '.join(s['graders'])}; mean grade base "
                  f"{num(m['base']['mean'])} (n={m['base']['n']}), tuned {num(m['tuned']['mean'])} (n={m['tuned']['n']})",
                  highlight=False)
    console.print(headline(s), highlight=False)
    a = s.get("agreement")
    if a:
        console.print(f"agreement: Krippendorff's alpha on preferences {num(a['alpha_preference_nominal'])}, on grades "
                      f"{num(a['alpha_grades_interval'])}" + (f", Cohen's kappa {num(a['cohen_kappa_preference'])}"
                                                               if "cohen_kappa_preference" in a else "")
                      + f"; {len(s['disagreements'])} rows with disagreement", highlight=False)
