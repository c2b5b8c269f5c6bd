"""The human grading loop: a blind review sheet, grades that are never overwritten, grades read back."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time

import pytest

from qlora_kit.eval import evaluate, grades
from qlora_kit.errors import UserError

from conftest import write_qa

# Imports the CLI, runs it, and tells on stderr whether torch was ever imported (reading grades must not).
CLI = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('\\nTORCH IMPORTED\\n' if 'torch' in sys.modules "
       "else '')); from qlora_kit.cli import main; main()")


def cli(*args):
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def sheet_rows(path):
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))


def write_csv(path, rows, encoding="utf-8-sig", delimiter=","):
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter).writerows(rows)
    path.write_text(buf.getvalue(), encoding=encoding)
    return path


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "review*", "report.*", "eval.json", "grades.json"))
    return dst


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """A real eval of the tiny run (its own copy) on 6 new questions: (run_dir, eval result, questions file)."""
    d = tmp_path_factory.mktemp("grading")
    run_dir = copy_run(tiny_run[0], d / "run")
    q = write_qa(d / "held.jsonl", n=6)
    return run_dir, evaluate.run(run_dir, str(q), max_new_tokens=6), q


def key_of(run_dir, sheet="review"):
    return json.loads((run_dir / f"{sheet}.key.json").read_text(encoding="utf-8"))["versions"][-1]["rows"]


def test_review_sheet_is_blind_and_the_key_maps_back(evaluated):
    run_dir, res, _ = evaluated
    sheet = run_dir / "review.csv"
    assert sheet.read_bytes()[:3] == b"\xef\xbb\xbf"  # Excel reads Chinese UTF-8 only with the BOM
    rows = sheet_rows(sheet)
    assert rows[0] == grades.HEADER and len(rows) == 7
    assert not any(w in " ".join(rows[0]).lower() for w in ("base", "tuned"))  # nothing says who wrote what
    key = key_of(run_dir)
    assert [r[0] for r in rows[1:]] == list(key) and len(set(key)) == 6
    a_sides = [key[r[0]]["A"] for r in rows[1:]]
    assert a_sides.count("tuned") == 3 and a_sides.count("base") == 3  # order varies, balanced
    assert a_sides == ["tuned" if t else "base" for t in grades._order(6, grades.SEED)]  # seeded: reproducible
    assert any(r["base"]["answer"] != r["tuned"]["answer"] for r in res["rows"])  # so the mapping check means something
    for r, ev in zip(rows[1:], res["rows"]):
        k = key[r[0]]
        assert r[2] == ev["question"] and r[3] == ev["reference"]
        assert (r[4], r[5]) == (ev[k["A"]]["answer"], ev[k["B"]]["answer"]) and {k["A"], k["B"]} == {"base", "tuned"}
        assert r[6:] == ["", "", "", ""]
    assert "review.csv" in (run_dir / "report.md").read_text(encoding="utf-8")


def test_a_graded_sheet_is_never_overwritten(evaluated, tmp_path, capsys):
    src, _, q = evaluated
    run_dir = copy_run(src, tmp_path / "run")
    shutil.copy(src / "review.csv", run_dir)
    shutil.copy(src / "review.key.json", run_dir)
    rows = sheet_rows(run_dir / "review.csv")
    rows[2][6] = "4"  # one grade is enough
    graded = write_csv(run_dir / "review.csv", rows).read_bytes()
    capsys.readouterr()

    evaluate.run(run_dir, str(q), limit=2, max_new_tokens=3)
    assert (run_dir / "review.csv").read_bytes() == graded
    assert len(sheet_rows(run_dir / "review-2.csv")) == 3 and len(key_of(run_dir, "review-2")) == 2
    err = capsys.readouterr().err
    assert "wrote review-2.csv" in err and "kept review.csv" in err

    evaluate.run(run_dir, str(q), limit=2, max_new_tokens=3)  # review-2.csv is untouched: replaced, say so
    err = capsys.readouterr().err
    assert "replaced review-2.csv" in err and not (run_dir / "review-3.csv").exists()
    assert (run_dir / "review.csv").read_bytes() == graded
    versions = json.loads((run_dir / "review-2.key.json").read_text())["versions"]
    assert len(versions) == 2  # the replaced sheet's key stays: a copy of it may be out with a grader

    rows = sheet_rows(run_dir / "review-2.csv")
    rows[1][9] = "答案B更好"  # a comment alone is grading work too
    write_csv(run_dir / "review-2.csv", rows)
    evaluate.run(run_dir, str(q), limit=2, max_new_tokens=3)
    assert (run_dir / "review-3.csv").exists() and sheet_rows(run_dir / "review-2.csv")[1][9] == "答案B更好"

    old = write_csv(tmp_path / "old.csv", [["where", "question", "reference", "base_answer", "tuned_answer",
                                            "grade_base (1-5)", "grade_tuned (1-5)", "reviewer_notes"],
                                           ["q.jsonl:1", "问", "答", "x", "y", "", "", ""]])
    assert grades._untouched(old)  # the pre-blind sheet, ungraded, may go
    write_csv(old, [sheet_rows(old)[0], ["q.jsonl:1", "问", "答", "x", "y", "3", "", ""]])
    assert not grades._untouched(old)


# Per sheet row: (base grade, tuned grade, preferred model or None to leave the cell empty).
ALICE = [(2, 4, "tuned"), (3, 5, "tuned"), (1, 3, None), (4, 2, "base"), (3, 3, "tie"), (4, 2, "base")]
BOB = [(1, 5, "tuned"), (3, 4, "tuned"), (2, 2, "tie"), (2, 4, "tuned"), (3, 4, "tuned"), None]


def graded(rows, key, plan):
    """The sheet's cells as a grader would fill them in, blind: translate models to A/B through the key."""
    out = [rows[0]]
    for r, p in zip(rows[1:], plan):
        r = list(r)
        if p:
            k = key[r[0]]
            g = {"base": p[0], "tuned": p[1]}
            pref = "" if p[2] is None else "tie" if p[2] == "tie" else "A" if k["A"] == p[2] else "B"
            r[6:10] = [g[k["A"]], g[k["B"]], pref, ""]
        out.append(r)
    return out


@pytest.fixture
def two_graders(evaluated, tmp_path):
    """Alice's sheet as CSV and Bob's as .xlsx, both copies outside the run directory."""
    import openpyxl

    run_dir = evaluated[0]
    rows, key = sheet_rows(run_dir / "review.csv"), key_of(run_dir)
    alice = write_csv(tmp_path / "alice.csv", graded(rows, key, ALICE))
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    wb = openpyxl.Workbook()
    for r in graded(rows, key, BOB):  # the tiny model's answers hold control characters no .xlsx may
        wb.active.append([ILLEGAL_CHARACTERS_RE.sub("", c) if isinstance(c, str) else c for c in r])
    wb.save(tmp_path / "bob.xlsx")
    return run_dir, alice, tmp_path / "bob.xlsx", [r[0] for r in rows[1:]]


def test_grades_read_back_into_the_report(two_graders):
    run_dir, alice, bob, ids = two_graders
    t = time.time()
    r = cli("eval", run_dir, "--grades", alice, "--grades", bob)
    seconds = time.time() - t
    assert r.returncode == 0, r.stderr
    assert "TORCH IMPORTED" not in r.stderr and seconds < 30  # no model: only the run dir, the sheets and the key
    print(f"eval --grades: {seconds:.1f} s")
    assert r.stdout.strip() == str(run_dir / "report.html")
    g = json.loads((run_dir / "grades.json").read_text(encoding="utf-8"))
    # Hand-computed. Base grades: alice 2,3,1,4,3,4, bob 1,3,2,2,3 = 28/11; tuned 4,5,3,2,3,2 and 5,4,2,4,4 = 38/11.
    assert g["graders"] == ["alice", "bob"] and g["rows_graded"] == 6
    assert g["models"]["base"] == {"mean": pytest.approx(28 / 11), "n": 11}
    assert g["models"]["tuned"] == {"mean": pytest.approx(38 / 11), "n": 11}
    # Row verdicts (majority; alice's row 3 has no preference, its grades 1<3 decide): tuned, tuned, tuned,
    # tie (alice base, bob tuned), tuned, base -> 4 of 5 decided; Wilson 95% for 4/5 = 0.3755-0.9638.
    p = g["preference"]
    assert (p["tuned_wins"], p["base_wins"], p["ties"]) == (4, 1, 1) and p["win_rate"] == pytest.approx(0.8)
    assert p["ci95"] == pytest.approx([0.3755, 0.9638], abs=1e-4)
    # Preferences on rows 1-5, alice t t t b tie, bob t t tie t t: p_o = 2/5; p_e = .6*.8 + .2*.2 = .52;
    # kappa = (.4 - .52) / .48 = -0.25. Krippendorff nominal: n=10 values (t 7, tie 2, b 1), 6 disagreeing
    # ordered pairs: 1 - 9*6 / (100 - 54) = -0.1739. Interval on grades: squared differences 6 (base) + 8
    # (tuned), 20 values with mean 3 and squared deviations 26: 1 - 19*28 / (2*20*26) = 0.4885.
    a = g["agreement"]
    assert a["cohen_kappa_preference"] == pytest.approx(-0.25) and a["units_both"] == 5
    assert a["alpha_preference_nominal"] == pytest.approx(1 - 54 / 46)
    assert a["alpha_grades_interval"] == pytest.approx(1 - 532 / 1040)
    assert [d["id"] for d in g["disagreements"]] == ids[2:5]
    assert g["disagreements"][1]["graders"]["alice"] == {"base": 4, "tuned": 2, "preferred": "base", "comment": ""}
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Human grades (blind)" in md and "| base | 2.55 | 11 |" in md and "| tuned | 3.45 | 11 |" in md
    assert g["per_grader"] == [
        {"grader": "alice", "n": 6, "base_mean": 17 / 6, "tuned_mean": 19 / 6, "prefers_tuned": 3, "prefers_tie": 1, "prefers_base": 2},
        {"grader": "bob", "n": 5, "base_mean": 11 / 5, "tuned_mean": 19 / 5, "prefers_tuned": 4, "prefers_tie": 1, "prefers_base": 0}]
    assert "4 of 5 decided rows: 80% (95% Wilson interval 38%–96%); ties (not counted in the rate): 1" in md
    assert "| alice | 2.83 | 3.17 | 3 | 1 | 2 |" in md and ids[3] in md
    assert "| JSON field accuracy |" in md or "| ROUGE-L (char) |" in md  # the metrics are still there
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Human grades (blind)" in page and "Cohen's kappa on preferences -0.25" in page


def test_one_sheet_with_two_graders_columns_reads_the_same(two_graders, tmp_path):
    """Several graders in one file: grade_A_<name>, grade_B_<name>, preferred_<name> columns."""
    run_dir, alice, bob, _ = two_graders
    one = [grades.read_sheet(f, run_dir) for f in (alice, bob)]
    a, b = sheet_rows(alice), grades.read_table(bob)
    head = a[0][:6] + ["grade_A_alice (1-5)", "grade_B_alice", "preferred_alice", "comment_alice",
                       "grade_A_bob", "grade_B_bob", "preferred_bob"]
    both = write_csv(tmp_path / "both.csv", [head] + [x[:10] + y[6:9] for x, y in zip(a[1:], b[1:])])
    summary = {k: v for k, v in grades.summarise(grades.read_all(run_dir, [both])).items() if k != "sheets"}
    assert summary == {k: v for k, v in grades.summarise(one).items() if k != "sheets"}
    # Excel's plain "CSV" on a Chinese Windows: GB18030, and ';' where the list separator is one
    legacy = write_csv(tmp_path / "alice-gbk.csv", sheet_rows(alice), encoding="gb18030", delimiter=";")
    assert grades.summarise([grades.read_sheet(legacy, run_dir)])["models"] == grades.summarise(one[:1])["models"]


@pytest.mark.parametrize("cell,value,column,says", [
    (6, "6", "G", "grade_A"), (7, "good", "H", "grade_B"), (7, "4.5", "H", "grade_B"),
    (8, "C", "I", "preferred"), (0, "zzzzz-1", "A", "id"),
])
def test_bad_grades_name_file_row_and_column(two_graders, tmp_path, cell, value, column, says):
    run_dir, alice, _, _ = two_graders
    rows = sheet_rows(alice)
    rows[3][cell] = value
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError) as e:
        grades.read_sheet(bad, run_dir)
    assert f"bad.csv, row 4, column {column} ({says}" in str(e.value) and value in str(e.value)


def test_bad_grades_file_exits_2_and_writes_nothing(two_graders, tmp_path):
    run_dir, alice, _, _ = two_graders
    rows = sheet_rows(alice)
    rows[4][6] = "6"
    bad = write_csv(tmp_path / "bad.csv", rows)
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.*") if p.is_file()}
    r = cli("eval", run_dir, "--grades", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}, row 5, column G (grade_A): '6' is not a grade" in r.stderr and "1 (bad) to 5 (good)" in r.stderr
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.*") if p.is_file()} == before
    other = copy_run(run_dir, tmp_path / "other")  # the right sheet, the wrong run (no key): refused
    r = cli("eval", other, "--grades", alice)
    assert r.returncode == 2 and "row 2, column A (id)" in r.stderr and "in no review key" in r.stderr
    r = cli("eval", run_dir, "--grades", alice, "--limit", "3")
    assert r.returncode == 2 and "--grades reads grades back" in r.stderr
    empty = write_csv(tmp_path / "empty.csv", sheet_rows(run_dir / "review.csv"))
    r = cli("eval", run_dir, "--grades", empty)
    assert r.returncode == 2 and "no grades filled in" in r.stderr


def test_statistics_match_published_values():
    # Wilson score intervals: Newcombe (1998), Statistics in Medicine 17:857, table I
    for (s, n), ci in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                       (1, 29): (0.0061, 0.1718)}.items():
        assert grades.wilson(s, n) == pytest.approx(ci, abs=1e-4)
    # Cohen's kappa: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o .7, p_e .5, kappa .4
    a, b = ["y"] * 25 + ["n"] * 25, ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert grades.cohen_kappa(a, b) == pytest.approx(0.4)
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units, missing values
    obs = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
           [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [[o[i] for o in obs if o[i] is not None] for i in range(12)]
    for metric, alpha in {"nominal": 0.743, "ordinal": 0.815, "interval": 0.849}.items():
        assert grades.krippendorff_alpha(units, metric) == pytest.approx(alpha, abs=5e-4)
    assert grades.col_letter(0) == "A" and grades.col_letter(25) == "Z" and grades.col_letter(26) == "AA"
