"""qlora_kit.run: run.json typed, read and written in one place; a run opened for reading checks
that the data a command reads again is the data the run was trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from qlora_kit import recipe, run
from qlora_kit.errors import UserError


def _run_dir(tmp_path: Path, info: dict, rec=None) -> Path:
    d = tmp_path / "run"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (d / "recipe.yaml").write_text(rec.to_yaml() if rec else "base_model: builtin:tiny\n", encoding="utf-8")
    run.write_info(d, info)
    return d


def test_older_run_json_reads_and_keeps_what_it_does_not_name(tmp_path):
    # a run from before multi-file data and fast-path facts: no files, no tokenizer, an unknown field
    d = _run_dir(tmp_path, {"recipe": "legal", "base_model": "builtin:tiny", "status": "finished",
                            "data": {"path": "/x/a.jsonl", "sha256": "ab"}, "something_new": {"k": 1}})
    info = run.read_info(d)
    assert info.status == "finished" and info.data.files == [] and info.tokenizer.stop_token_ids == []
    assert info.to_json()["something_new"] == {"k": 1}
    run.write_info(d, info.model_copy(update={"status": "failed"}))
    again = json.loads((d / run.RUN_JSON).read_text(encoding="utf-8"))
    assert again["status"] == "failed" and again["something_new"] == {"k": 1} and "tokenizer" not in again


def test_a_broken_run_json_is_named_and_the_writer_refuses_wrong_types(tmp_path):
    d = _run_dir(tmp_path, {"status": "running"})
    (d / run.RUN_JSON).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="run.json is not a readable run.json"):
        run.read_info(d)
    assert run.try_read_info(d) is None
    with pytest.raises(ValidationError):
        run.write_info(d, {"status": "running", "data": {"files": "not a list"}})


def test_data_changed_names_the_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    info = run.RunInfo.model_validate({"data": {"path": str(a), "sha256": "all", "files": [
        {"path": str(a), "sha256": "1"}, {"path": str(b), "sha256": "2"}]}})
    assert run.data_changed(info, tmp_path, [(a, "1"), (b, "2")]) is None
    msg = run.data_changed(info, tmp_path, [(a, "1"), (b, "3")])
    assert f"{b} changed since training" in msg and str(a) not in msg
    assert "was not part of the training data" in run.data_changed(info, tmp_path, [(tmp_path / "c.jsonl", "9")])
    single = run.RunInfo.model_validate({"data": {"path": str(a), "sha256": "1"}})  # before multi-file data
    assert run.data_changed(single, tmp_path, [(a, "1")]) is None
    assert "changed since training" in run.data_changed(single, tmp_path, [(a, "2")])


def test_data_changed_when_a_training_file_is_gone_or_reordered(tmp_path):
    """eval's held-out split runs over all rows in file order: one file fewer, or the files in another
    order, gives another split (trained questions could be scored as held out)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    info = run.RunInfo.model_validate({"data": {"files": [{"path": str(a), "sha256": "1"}, {"path": str(b), "sha256": "2"}]}})
    assert f"{b} was part of the training data and is not read now" in run.data_changed(info, tmp_path, [(a, "1")])
    assert "another order" in run.data_changed(info, tmp_path, [(b, "2"), (a, "1")])


def test_a_run_whose_base_is_gone_is_refused_naming_the_folder(tmp_path):
    info = run.RunInfo.model_validate({"base_model_path": str(tmp_path / "moved-away")})
    r = run.Run(tmp_path, tmp_path, tmp_path / "adapter", info, None)
    with pytest.raises(UserError, match="base model of this run not found at .*moved-away"):
        r.base_model_path


def test_eval_refuses_a_held_out_split_of_changed_data(tmp_path, cache):
    from qlora_kit.eval.evaluate import held_out

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": f"Answer {i}."}, ensure_ascii=False) + "\n"
                            for i in range(40)), encoding="utf-8")
    f = tmp_path / "r.yaml"
    f.write_text(f"base_model: builtin:tiny\ndata:\n  path: {data}\n  eval_fraction: 0.25\n", encoding="utf-8")
    rec, _ = recipe.resolve(str(f))
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    d = _run_dir(tmp_path, {"base_model": "builtin:tiny", "base_model_path": str(tmp_path), "status": "finished",
                            "data": {"path": str(data), "sha256": sha, "files": [{"path": str(data), "sha256": sha}]}},
                 rec)
    convs, _ = held_out(run.open_run(d), None)
    assert convs
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": "New?", "answer": "New."}) + "\n")
    with pytest.raises(UserError) as e:
        held_out(run.open_run(d), None)
    assert f"{data} changed since training" in str(e.value) and "--data FILE" in e.value.hint


def test_merge_probes_say_when_the_data_changed(tmp_path, cache, tiny_chat_dir, capsys):
    from qlora_kit import merge
    from qlora_kit.model import load_saved_tokenizer

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(8)),
                    encoding="utf-8")
    f = tmp_path / "r.yaml"
    f.write_text(f"base_model: builtin:tiny\ndata:\n  path: {data}\n", encoding="utf-8")
    rec, _ = recipe.resolve(str(f))
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    d = _run_dir(tmp_path, {"data": {"path": str(data), "sha256": sha, "files": [{"path": str(data), "sha256": sha}]}},
                 rec)
    tok = load_saved_tokenizer(tiny_chat_dir)
    texts = merge.probe_texts(d, tok, rec)
    assert texts != merge.FALLBACK_PROBES and "changed since training" not in capsys.readouterr().err
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": "New?", "answer": "New."}) + "\n")
    assert merge.probe_texts(d, tok, rec) == texts  # any texts serve the logit check: said, not refused
    err = capsys.readouterr().err
    assert "warning" in err and str(data) in err.replace("\n", "") and "changed since training" in err
