"""Several columns into one question (data.question_template, a per-row template column) and
several files into one dataset (--data repeated, folders, data.path as a list): real CSV, XLSX and
JSONL files, the real `qlora-kit` command, and training on the built-in tiny model."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

QK = [sys.executable, "-m", "qlora_kit.cli"]
TEMPLATE = "【故障代码】{故障代码}\\n【传感器数据】温度:{温度}℃ 振动:{振动}mm/s\\n【问题】{question}"
HEADER = ["故障代码", "温度", "振动", "电流", "指示灯", "问题", "处理建议"]
ROWS = [
    ["F30001", "65", "2.1", "168", "RDY 灯红色常亮", "变频器报过流跳闸，怎么查？", "先断电等待母线放电，再检查电机电缆绝缘和加速时间。"],
    ["TAH-1103", "86", "3.9", "55", "温度报警灯黄色常亮", "泵轴承温度高，正常应该多少度？", "滚动轴承一般不超过80 °C，检查油位、对中和冷却水。"],
    ["VAH-1104", "", "4.0", "52", "振动报警灯黄色常亮", "振动4.0 mm/s正常吗？", "按ISO 10816属于C区，应安排计划检修并缩短巡检间隔。"],
    ["E03", "116", "2.0", "0", "停机灯红色常亮", "空压机排气温度高停机怎么办？", "泄压冷却后检查油位、冷却器、温控阀和油滤器。"],
]


def cli(args, cache, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "QLORA_KIT_CACHE": str(cache)}
    return subprocess.run(QK + [str(a) for a in args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600)


def write_csv(path: Path, header=HEADER, rows=ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def questions_of(tmp_path, files, *extra):
    """The questions `data check` would train on, in file order (the JSON report has no per-row
    text, so the same settings go through data.load, which the check itself uses)."""
    from qlora_kit import data

    args = dict(extra)
    ds = data.load(files, None, args.get("columns"), args.get("skip_bad", False), args.get("question_template"))
    return [data.question_text(c) for c in ds.conversations], ds


# --- several columns into one question -------------------------------------------------------------


def test_template_over_csv_columns_lists_unused_and_empty_cells(tmp_path, cache):
    f = write_csv(tmp_path / "sensors.csv")
    r = cli(["data", "check", f, "--columns", "question=问题,answer=处理建议", "--question-template", TEMPLATE, "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["question_template"]["example"] == {
        "where": f"{f}:2", "question": "【故障代码】F30001\n【传感器数据】温度:65℃ 振动:2.1mm/s\n【问题】变频器报过流跳闸，怎么查？"}
    assert rep["unused_columns"] == ["电流", "指示灯"]  # read by nothing: said, not dropped silently
    assert rep["question_template"]["empty_cells"] == {"温度": 1}
    assert any(f"{{温度}} in 1 row (e.g. {f}:4)" in w and "kept empty" in w for w in rep["warnings"])
    # every row, as trained on: the empty temperature cell stays empty
    qs, _ = questions_of(tmp_path, f, ("columns", {"question": "问题", "answer": "处理建议"}),
                         ("question_template", TEMPLATE.replace("\\n", "\n")))
    assert qs[2] == "【故障代码】VAH-1104\n【传感器数据】温度:℃ 振动:4.0mm/s\n【问题】振动4.0 mm/s正常吗？"
    # the human report shows the unused columns and one rendered question
    r = cli(["data", "check", f, "--columns", "question=问题,answer=处理建议", "--question-template", TEMPLATE], cache)
    assert r.returncode == 0 and "columns not used" in r.stderr and "电流, 指示灯" in r.stderr
    assert "温度:65℃ 振动:2.1mm/s" in r.stderr
    # without a template the other columns are not silently dropped either: they are listed
    r = cli(["data", "check", f, "--columns", "question=问题,answer=处理建议", "--json"], cache)
    assert json.loads(r.stdout)["unused_columns"] == ["故障代码", "温度", "振动", "电流", "指示灯"]


def test_unknown_column_in_template_exit_2_names_columns(tmp_path, cache):
    f = write_csv(tmp_path / "sensors.csv")
    r = cli(["data", "check", f, "--question-template", "{故障码} {question}"], cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--question-template" in r.stderr and "no column {故障码}" in r.stderr
    assert "故障代码, 温度, 振动, 电流, 指示灯, 问题, 处理建议" in r.stderr
    # from a recipe file: the field is named, and a lone brace is refused with its line
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: builtin:tiny\ndata:\n  path: {f.name}\n  question_template: \"{{温度}} {{压力}}\"\n",
                      encoding="utf-8")
    r = cli(["train", recipe, "--max-steps", "1", "--run-dir", tmp_path / "run"], cache)
    assert r.returncode == 2 and "data.question_template" in r.stderr and "no column {压力}" in r.stderr
    assert not (tmp_path / "run").exists()
    recipe.write_text(f"base_model: builtin:tiny\ndata:\n  path: {f.name}\n  question_template: \"温度 {{温度\"\n",
                      encoding="utf-8")
    r = cli(["train", recipe, "--dry-run"], cache)
    assert r.returncode == 2 and f"{recipe}:4: data.question_template" in r.stderr and "{{ or }}" in r.stderr


def test_xlsx_literal_braces_and_json_numbers(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["设备", "温度", "问题", "回答"])
    ws.append(["P-101", 86.5, "轴承温度高怎么办？", "检查润滑和对中。"])
    ws.append(["P-102", 70, "密封漏液怎么办？", "判断泄漏量，必要时停泵更换密封。"])
    wb.save(tmp_path / "t.xlsx")
    write_jsonl(tmp_path / "t.jsonl", [{"设备": "C-1", "温度": 116, "question": "排气温度高？", "answer": "查冷却器。"}])
    qs, ds = questions_of(tmp_path, [tmp_path / "t.xlsx", tmp_path / "t.jsonl"],
                          ("question_template", "{{设备}}={设备} 温度{温度}℃：{question}"))
    assert qs == ["{设备}=P-101 温度86.5℃：轴承温度高怎么办？", "{设备}=P-102 温度70℃：密封漏液怎么办？",
                  "{设备}=C-1 温度116℃：排气温度高？"]
    assert [s.unused for s in ds.sources] == [[], []]  # 问题 is read through {question}


def test_per_row_template_column(tmp_path, cache):
    header = ["模板", "设备", "温度", "问题", "回答"]
    rows = [["设备{设备}温度{温度}℃，{问题}", "P-1", "86", "怎么办？", "检查润滑。"],
            ["", "P-2", "70", "密封漏液怎么办？", "判断泄漏量。"],  # no template of its own: the global one, or the question
            ["【{设备}】{问题}", "P-3", "", "振动大怎么办？", "查对中。"]]
    f = write_csv(tmp_path / "sheet.csv", header, rows)
    qs, ds = questions_of(tmp_path, f, ("columns", {"template": "模板"}))
    assert qs == ["设备P-1温度86℃，怎么办？", "密封漏液怎么办？", "【P-3】振动大怎么办？"]
    assert ds.sources[0].unused == []
    qs, _ = questions_of(tmp_path, f, ("columns", {"template": "模板"}), ("question_template", "[{设备}] {问题}"))
    assert qs[1] == "[P-2] 密封漏液怎么办？"  # a row's own template wins; an empty one falls back to the recipe's
    r = cli(["data", "check", f, "--columns", "template=模板", "--json"], cache)
    assert r.returncode == 0, r.stderr
    # an unknown name in one row's template: a bad row by file:line, naming the columns
    rows[2][0] = "【{设备号}】{问题}"
    write_csv(f, header, rows)
    r = cli(["data", "check", f, "--columns", "template=模板"], cache)
    assert r.returncode == 2 and f"{f}:4: template column '模板': no column {{设备号}}" in r.stderr
    assert "模板, 设备, 温度, 问题, 回答" in r.stderr
    r = cli(["data", "check", f, "--columns", "template=模板", "--skip-bad", "--json"], cache)
    assert r.returncode == 0 and json.loads(r.stdout)["bad_rows"][0]["where"] == f"{f}:4"


def test_template_refused_for_conversations(tmp_path, cache):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "泵振动大？"},
                                                          {"role": "assistant", "content": "查对中。"}]}])
    r = cli(["data", "check", f, "--question-template", "{question}"], cache)
    assert r.returncode == 2 and "data.question_template (--question-template)" in r.stderr
    assert "'messages' conversation" in r.stderr and "does not apply" in r.stderr


# --- several files ---------------------------------------------------------------------------------


def _sources(tmp_path: Path) -> list[Path]:
    """a.csv, b.jsonl (its first row repeats a.csv's last) and a folder of two more files, with a
    note, a hidden file and a subfolder that are not read."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_csv(tmp_path / "a.csv", ["问题", "回答", "记录人"],
              [[f"第{i}台泵{t}怎么处理？", f"先停泵挂牌上锁，再检查{t}的第{i}项原因。", "张工"]
               for i, t in enumerate(["轴承过热", "机械密封泄漏", "出口压力波动", "电流偏低"])])
    write_jsonl(tmp_path / "b.jsonl", [{"question": "第3台泵电流偏低怎么处理？", "answer": "先停泵挂牌上锁，再检查电流偏低的第3项原因。"}]
                + [{"question": f"第{i}台电机{t}怎么办？", "answer": f"断电验电后检查{t}，第{i}步复测。", "id": i}
                   for i, t in enumerate(["异响", "过热", "三相不平衡"], start=10)])
    folder = tmp_path / "more"
    (folder / "old").mkdir(parents=True)
    write_jsonl(folder / "2.jsonl", [{"question": "变频器报过压怎么办？", "answer": "延长减速时间，检查制动电阻。"}])
    write_csv(folder / "1.csv", ["question", "answer"], [["空压机排气温度高？", "检查油位、冷却器和温控阀。"],
                                                          ["皮带打滑尖叫？", "停机挂牌后调整张紧力，整组更换皮带。"]])
    (folder / "notes.md").write_text("说明", encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    write_jsonl(folder / "old" / "x.jsonl", [{"question": "旧的", "answer": "不读"}])
    return [tmp_path / "a.csv", tmp_path / "b.jsonl", folder]


def test_several_files_and_a_folder_one_dataset(tmp_path, cache):
    srcs = _sources(tmp_path)
    r = cli(["data", "check", *srcs, "--json"], cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    files = [srcs[0], srcs[1], srcs[2] / "1.csv", srcs[2] / "2.jsonl"]  # the folder: sorted by name
    assert [s["path"] for s in rep["sources"]] == [str(f) for f in files]
    assert [s["rows_read"] for s in rep["sources"]] == [4, 4, 2, 1] and rep["rows_read"] == 11
    assert [s["sha256"] for s in rep["sources"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    # the same row in two files is counted once: b.jsonl:1 repeats a.csv:5
    assert rep["duplicates"]["exact_dropped"] == 1
    assert rep["duplicates"]["exact_examples"] == [{"row": f"{srcs[1]}:1", "repeats": f"{srcs[0]}:5"}]
    assert [s["duplicates_dropped"] for s in rep["sources"]] == [0, 1, 0, 0]
    split = rep["split"]
    assert split["train"] + split["eval"] == 10 and split["eval"] == 2
    assert sum(s["train"] for s in rep["sources"]) == split["train"] and sum(s["eval"] for s in rep["sources"]) == 2
    assert [s["unused_columns"] for s in rep["sources"]] == [["记录人"], ["id"], [], []]
    assert {Path(n["path"]).name for n in rep["not_read"]} == {"notes.md", "old"}
    # a missing file among several is named
    r = cli(["data", "check", srcs[0], tmp_path / "nope.csv"], cache)
    assert r.returncode == 2 and f"data file not found: {tmp_path / 'nope.csv'}" in r.stderr


def test_train_on_several_files_records_each_and_resume_sees_a_change(tmp_path, cache, tiny_dir):
    srcs = _sources(tmp_path)
    run = tmp_path / "run"
    args = ["train", "industrial", "--base-model", "builtin:tiny", "--max-steps", "2", "--run-dir", run,
            "--set", "data.question_template=null", "--set", "training.max_length=128"]
    for s in srcs:
        args += ["--data", s]
    r = cli(args, cache)
    assert r.returncode == 0, r.stderr
    data = json.loads((run / "run.json").read_text(encoding="utf-8"))["data"]
    files = [srcs[0], srcs[1], srcs[2] / "1.csv", srcs[2] / "2.jsonl"]
    assert [(f["path"], f["sha256"], f["rows"]) for f in data["files"]] == [
        (str(p), hashlib.sha256(p.read_bytes()).hexdigest(), n) for p, n in zip(files, [4, 4, 2, 1])]
    assert data["path"] == str(files[0]) and data["rows"] == 11 and data["duplicates_dropped"] == 1
    assert data["train_rows"] + data["eval_rows"] == 10
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "| data files | 4 files" in card and f"| `{files[1]}` | rows read 4, train / eval" in card
    # one file of four changes: an interrupted run is not resumed on other data, and the file is named
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    info["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with open(files[2], "a", encoding="utf-8") as f:
        f.write("电机振动大？,检查对中和地脚螺栓。\n")
    r = cli(args, cache)
    assert r.returncode == 2 and f"data file changed: {files[2]}" in r.stderr and "--force" in r.stderr


def test_recipe_data_path_as_a_list(tmp_path, cache):
    from qlora_kit import recipe
    from qlora_kit.data import check as datacheck

    srcs = _sources(tmp_path / "data")
    f = tmp_path / "mine.yaml"
    f.write_text("base_model: builtin:tiny\ndata:\n  path: [data/a.csv, data/more]\n", encoding="utf-8")
    rec, _ = recipe.resolve(str(f))
    assert rec.data.path == [str(srcs[0]), str(srcs[2])]  # relative to the recipe file
    rep = datacheck.prepare(rec).report
    assert [Path(s["path"]).name for s in rep["sources"]] == ["a.csv", "1.csv", "2.jsonl"]
    r = cli(["train", f, "--dry-run"], cache)
    assert r.returncode == 0 and f"- {srcs[2]}" in r.stdout
    f.write_text("base_model: builtin:tiny\ndata:\n  path: []\n", encoding="utf-8")
    r = cli(["train", f, "--dry-run"], cache)
    assert r.returncode == 2 and f"{f}:3: data.path: " in r.stderr


def test_industrial_recipe_trains_with_its_template(tmp_path, cache, tiny_dir):
    run = tmp_path / "run"
    r = cli(["train", "industrial", "--base-model", "builtin:tiny", "--max-steps", "2", "--run-dir", run], cache)
    assert r.returncode == 0, r.stderr
    check = json.loads((run / "data_check.json").read_text(encoding="utf-8"))
    sample = "".join(text for text, _ in check["sample"]["segments"])
    row = json.loads((ROOT / "recipes" / "data" / "industrial.jsonl").read_text(encoding="utf-8")
                     .splitlines()[int(check["sample"]["where"].rsplit(":", 1)[1]) - 1])
    assert f"【故障代码】{row['fault_code']}" in sample
    assert f"温度:{row['temp']}℃ 振动:{row['vibration']}mm/s 电流:{row['current']}A" in sample
    assert f"【指示灯】{row['lights']}" in sample and f"【问题】{row['question']}" in sample
    assert check["unused_columns"] == [] and check["warnings"] == []
    assert "question_template" in json.loads((run / "run.json").read_text(encoding="utf-8"))["data"]["layout"]
