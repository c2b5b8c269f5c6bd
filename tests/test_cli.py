"""The CLI as a user meets it: fast help, clear errors with exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time


from conftest import ROOT

QK = [sys.executable, "-m", "qlora_kit.cli"]


def run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(QK + args, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), env=env, timeout=300, **kw)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys, time; t=time.time()\n"
        "from qlora_kit.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','transformers','peft','trl','bitsandbytes','datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'SECONDS', time.time()-t)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stdout, r.stdout
    assert float(r.stdout.split("SECONDS")[1]) < 2.0
    t = time.time()
    r = run(["--help"])
    assert r.returncode == 0 and "train" in r.stdout and "merge" in r.stdout
    assert time.time() - t < 5


def test_recipes_table_lists_all_four():
    r = run(["recipes"])
    assert r.returncode == 0, r.stderr
    for name in ("medical", "legal", "finance", "industrial"):
        assert name in r.stdout
    assert "Qwen/Qwen2.5-7B-Instruct" in r.stdout


def test_dry_run_prints_resolved_yaml_and_touches_nothing(tmp_path):
    import yaml

    r = run(["train", "legal", "--dry-run", "--set", "lora.r=32", "--base-model", "/models/x"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["lora"]["r"] == 32 and doc["base_model"] == "/models/x" and doc["name"] == "legal"
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe_key_exit_2_with_field_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base_model: a/b\nlora:\n  rnak: 4\n", encoding="utf-8")
    assert_user_error(run(["train", str(p), "--dry-run"]), "mine.yaml:3: lora.rnak: unknown key; did you mean lora.r?")
    assert_user_error(run(["train", "legal", "--set", "training.lernrate=1"]), "training.lernrate: unknown key")


def test_missing_data_file(tmp_path):
    assert_user_error(run(["train", "legal", "--data", str(tmp_path / "nope.jsonl")]), "data file not found", "nope.jsonl")


def test_model_dir_without_weights(tmp_path, qa_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    r = run(["train", "legal", "--data", str(qa_file), "--base-model", str(d), "--run-dir", str(tmp_path / "run")])
    assert_user_error(r, "no weights", "fix:")
    assert not (tmp_path / "run").exists(), "a failed start must not leave a run directory"
    r = run(["train", "legal", "--data", str(qa_file), "--base-model", str(tmp_path / "missing")])
    assert_user_error(r, "base model directory not found")


def test_offline_hub_model_is_one_clear_message(qa_file, tmp_path):
    r = run(["train", "legal", "--data", str(qa_file), "--base-model", "nobody/no-such-model-7B", "--run-dir", str(tmp_path / "r")])
    assert_user_error(r, "cannot get base model 'nobody/no-such-model-7B'", "--base-model /path/to/model")


def test_bad_data_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', encoding="utf-8")
    assert_user_error(run(["train", "legal", "--data", str(p)]), f"{p}:2: invalid JSON")


def test_merge_and_generate_reject_non_run_dirs(tmp_path):
    assert_user_error(run(["merge", str(tmp_path)]), "not a qlora-kit run directory")
    assert_user_error(run(["merge", str(tmp_path / "x")]), "run directory not found")
    assert_user_error(run(["generate", str(tmp_path), "-p", "hi"]), "neither a qlora-kit run directory")


def test_data_parallel_workers_get_the_launchers_grants(tmp_path, qa_file):
    """--gpus/--cpu-processes: each worker runs `train` on the launcher's resolved recipe file. A
    grant the launcher's command line gave reaches the workers' command line (a recipe file alone
    cannot grant it: the workers would refuse with exit 2)."""
    import yaml

    from qlora_kit import cli, recipe

    for grant, field in (("--allow-pickle", "allow_pickle"), ("--trust-remote-code", "trust_remote_code")):
        resolved, _ = recipe.resolve("legal", [], {"base_model": "builtin:tiny", "data.path": str(qa_file), field: True})
        argv = cli._worker_argv(resolved, tmp_path, tmp_path / "run", False, False)
        assert grant in argv
        r = run(["train", *argv, "--dry-run"])
        assert r.returncode == 0, r.stderr
        assert yaml.safe_load(r.stdout)[field] is True
    resolved, _ = recipe.resolve("legal", [], {"base_model": "builtin:tiny", "data.path": str(qa_file)})
    assert not {"--allow-pickle", "--trust-remote-code"} & set(cli._worker_argv(resolved, tmp_path, tmp_path / "r", False, False))
