"""A run directory carries no privileges, and a run always learns something or says it did not.

The sent run here is real: the tiny run the suite trains, copied, with its recipe.yaml turned to
trust_remote_code/allow_pickle true and run.json's base_model_path pointed at a folder whose
config.json maps the model class to a .py file that writes a marker file when imported (or at
pickled weights that create a marker when unpickled). Every command that reads a run must refuse
it with exit 2 and a message naming the flag, and the marker must not exist; with the flag on the
command line the code does run, which shows the folder is a real threat and not a broken model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

QK = [sys.executable, "-m", "qlora_kit.cli"]


# --- building the sent run ------------------------------------------------------------------------

def custom_code_base(tiny_dir: Path, where: Path, marker: Path) -> Path:
    """The tiny model, plus an auto_map whose module writes `marker` when transformers imports it."""
    d = where / "base-with-code"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_model.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('this code ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    return d


def pickle_only_base(tiny_dir: Path, where: Path, marker: Path) -> Path:
    """The tiny model's folder with its weights as pytorch_model.bin only: a pickle that creates
    `marker` when it is unpickled (open(marker, 'w') is called by the unpickler)."""
    d = where / "base-pickle"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))

    class Opens:
        def __reduce__(self):
            return open, (str(marker), "w")

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Opens()))
    return d


def sent_run(run: Path, where: Path, base: Path) -> Path:
    """A copy of a real finished run whose files claim every privilege and name `base`."""
    d = where / "sent-run"
    # without the outputs of earlier commands on the shared fixture run (eval.json, reports), so the
    # tests can see that a refused command wrote nothing
    shutil.copytree(run, d, ignore=shutil.ignore_patterns("checkpoints", "merged", "export", "eval.json", "report*",
                                                          "review*", "plots", "grades.json"))
    recipe = yaml.safe_load((d / "recipe.yaml").read_text())
    recipe.update(trust_remote_code=True, allow_pickle=True)
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    info = json.loads((d / "run.json").read_text())
    info["base_model_path"] = str(base)
    (d / "run.json").write_text(json.dumps(info))
    return d


@pytest.fixture
def code_run(tiny_run, tiny_dir, tmp_path):
    marker = tmp_path / "MARKER-custom-code-ran"
    return sent_run(tiny_run[0], tmp_path, custom_code_base(tiny_dir, tmp_path, marker)), marker


# --- running the real CLI -------------------------------------------------------------------------

def cli(args, capsys) -> tuple[int, str]:
    """`qlora-kit ARGS` in this process, through the same main() as the console script."""
    from qlora_kit import cli as cli_mod

    old = sys.argv
    sys.argv = ["qlora-kit", *map(str, args)]
    try:
        cli_mod.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def spawn(args, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    return subprocess.Popen(QK + [str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def refused(code: int, err: str, flag: str) -> None:
    assert code == 2, (code, err)
    assert flag in err and "Traceback" not in err, err


# --- item 1: a run directory grants nothing -------------------------------------------------------

def test_generate_and_serve_refuse_a_sent_run_but_the_flag_runs_its_code(code_run, tmp_path):
    run, marker = code_run
    # three real processes at once: the refusals, and the control with the flag on the command line
    gen = spawn(["generate", run, "-p", "hi"], tmp_path)
    srv = spawn(["serve", run, "--port", "0"], tmp_path)
    try:
        for p in (gen, srv):
            _, err = p.communicate(timeout=240)
            refused(p.returncode, err, "--trust-remote-code")
        assert not marker.exists(), "the run's recipe.yaml made qlora-kit run the base model's code"
    finally:
        for p in (gen, srv):
            if p.poll() is None:
                p.kill()
    ok = spawn(["generate", run, "-p", "hi", "--max-new-tokens", "4", "--trust-remote-code"], tmp_path)
    out, err = ok.communicate(timeout=240)
    assert ok.returncode == 0, err
    assert marker.read_text() == "this code ran"  # the folder is a real threat, and the flag is the key


def test_every_run_reader_refuses_a_sent_run(code_run, tmp_path, capsys):
    run, marker = code_run
    for args in (["chat", run, "-p", "hi"],
                 ["eval", run, "--limit", "1"],
                 ["merge", run, "--out", tmp_path / "merged"],
                 ["export", run, "--format", "gguf", "--out", tmp_path / "m.gguf"]):
        code, err = cli(args, capsys)
        refused(code, err, "--trust-remote-code")
    assert not marker.exists()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m.gguf").exists()
    assert not (run / "eval.json").exists()


def test_train_refuses_a_base_that_asks_for_code(tiny_dir, qa_file, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    base = custom_code_base(tiny_dir, tmp_path, marker)
    code, err = cli(["train", "legal", "--data", qa_file, "--base-model", base, "--run-dir", tmp_path / "r1"], capsys)
    refused(code, err, "--trust-remote-code")
    assert "evil_model.py" in err
    # a recipe file that grants it is overruled by --no-trust-remote-code (the ui's train jobs pass it)
    rec = tmp_path / "granting.yaml"
    rec.write_text(yaml.safe_dump({"base_model": str(base), "trust_remote_code": True, "data": {"path": str(qa_file)}}))
    code, err = cli(["train", rec, "--no-trust-remote-code", "--run-dir", tmp_path / "r2"], capsys)
    refused(code, err, "--trust-remote-code")
    assert not marker.exists()
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_recipe_allow_pickle_does_not_load_pickled_weights(tiny_run, tiny_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER-unpickled"
    run = sent_run(tiny_run[0], tmp_path, pickle_only_base(tiny_dir, tmp_path, marker))
    for args in (["generate", run, "-p", "hi"], ["merge", run, "--out", tmp_path / "merged"]):
        code, err = cli(args, capsys)
        refused(code, err, "--allow-pickle")
    assert not marker.exists()


def test_ui_try_and_jobs_grant_nothing_the_ui_was_not_started_with(code_run, tmp_path):
    from fastapi.testclient import TestClient

    from qlora_kit.recipe import Grants
    from qlora_kit.ui import create_app, jobs

    run, marker = code_run
    root = tmp_path / "runs"
    root.mkdir()
    shutil.move(str(run), root / "sent")
    origin = "http://127.0.0.1:7860"
    c = TestClient(create_app(root), base_url=origin)
    h = {"origin": origin, "x-csrf-token": c.get("/api/session").json()["csrf"]}

    r = c.post("/api/chat", json={"runs": ["sent"], "question": "hi", "max_tokens": 4}, headers=h)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    errors = [e for e in events if e["type"] == "error"]
    assert errors and "--trust-remote-code" in errors[0]["hint"], events

    r = c.post("/api/run/job", json={"name": "sent", "kind": "merge"}, headers=h)
    assert r.status_code == 200, r.text
    assert "--trust-remote-code" not in r.json()["command"]
    work = c.app.state.jobs
    deadline = time.time() + 240
    while (job := work.read(work.job_id("sent", "merge")))["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert job["returncode"] == 2 or work.procs[job["id"]].returncode == 2, job
    assert "--trust-remote-code" in Path(job["log"]).read_text()
    assert not marker.exists() and not (root / "sent" / "merged").exists()

    # what each job is given: the ui's own grants, whatever a recorded command or a recipe said
    recorded = jobs.cli("train", "r/recipe.yaml", "--run-dir", "r", "--trust-remote-code", "--allow-pickle")
    assert jobs.with_grants(recorded, "train", Grants())[-2:] == ["--no-trust-remote-code", "--no-allow-pickle"]
    assert "--trust-remote-code" not in jobs.with_grants(recorded, "train", Grants())
    assert jobs.with_grants(jobs.cli("merge", "r"), "merge", Grants()) == jobs.cli("merge", "r")
    assert jobs.with_grants(jobs.cli("eval", "r"), "eval", Grants(trust_remote_code=True))[-1] == "--trust-remote-code"
    assert jobs.train_argv(["/bin/sh", "-c", "touch x"]) is None  # a planted job record is never rerun


# --- item 7: every run learns something, or says it did not ---------------------------------------

def test_warmup_never_gives_the_first_step_learning_rate_zero():
    import torch
    from transformers import TrainingArguments, get_scheduler

    from qlora_kit.train import lr_schedule

    for kind in ("cosine", "linear", "constant_with_warmup", "constant"):
        for total, ratio in ((1, 0.03), (2, 0.5), (10, 0.3), (100, 0.03)):
            args = TrainingArguments(output_dir="unused", lr_scheduler_type=kind, warmup_steps=ratio, report_to="none")
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            f = lr_schedule(opt, args, total).lr_lambdas[0]
            assert f(0) > 0, (kind, total, ratio)
            w = args.get_warmup_steps(total)
            lib = get_scheduler(kind, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                num_warmup_steps=w, num_training_steps=total).lr_lambdas[0]
            assert [f(k) for k in range(w, total)] == [lib(k) for k in range(w, total)]  # after warm-up: unchanged
            if w:
                assert f(w - 1) == 1.0  # warm-up ends at the full learning rate


def test_one_step_trains_and_a_run_that_changed_nothing_says_so(cache, qa_file, tmp_path, capsys):
    code, err = cli(["train", "legal", "--data", qa_file, "--base-model", "builtin:tiny", "--max-steps", "1",
                     "--run-dir", tmp_path / "one"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info["status"] == "finished" and "non-zero" in info["adapter_check"]
    assert (tmp_path / "one" / "adapter" / "adapter_model.safetensors").is_file()

    # an update too small for fp32 (the recipe refuses 0): the run ends, clearly, with exit 1
    code, err = cli(["train", "legal", "--data", qa_file, "--base-model", "builtin:tiny", "--max-steps", "1",
                     "--set", "training.learning_rate=1e-46", "--run-dir", tmp_path / "none"], capsys)
    assert code == 1, err
    assert "changed nothing" in err and "training.learning_rate" in err and "Traceback" not in err
    info = json.loads((tmp_path / "none" / "run.json").read_text())
    assert info["status"] == "failed" and "changed nothing" in info["error"]
    assert not (tmp_path / "none" / "adapter").exists()


def test_a_recipe_file_cannot_grant_code_or_pickles(qa_file, tmp_path, capsys):
    """A recipe may come from a colleague: asking for trust_remote_code/allow_pickle in it (or via
    --set) is refused unless this command line grants it, and nothing is written."""
    rec = tmp_path / "granting.yaml"
    for field, flag in (("trust_remote_code", "--trust-remote-code"), ("allow_pickle", "--allow-pickle")):
        rec.write_text(yaml.safe_dump({"base_model": "builtin:tiny", field: True, "data": {"path": str(qa_file)}}))
        code, err = cli(["train", rec, "--run-dir", tmp_path / "r", "--dry-run"], capsys)
        refused(code, err, flag)
        code, err = cli(["train", "legal", "--set", f"{field}=true", "--run-dir", tmp_path / "r", "--dry-run"], capsys)
        refused(code, err, flag)
        code, err = cli(["train", rec, flag, "--run-dir", tmp_path / "r", "--dry-run"], capsys)
        assert code == 0, err
    assert not (tmp_path / "r").exists()


def test_data_check_takes_the_grant_from_its_command_line_not_the_recipe(tiny_dir, qa_file, tmp_path, capsys):
    """`data check --recipe R` loads R's tokenizer: a recipe file asking for trust_remote_code does
    not grant it; a base that asks for code is refused naming the flag, and the flag lets it load."""
    marker = tmp_path / "ran"
    base = custom_code_base(tiny_dir, tmp_path, marker)
    rec = tmp_path / "colleague.yaml"
    rec.write_text(yaml.safe_dump({"base_model": str(base), "trust_remote_code": True, "data": {"path": str(qa_file)}}))
    code, err = cli(["data", "check", qa_file, "--recipe", rec], capsys)
    refused(code, err, "--trust-remote-code")
    assert "asks to run its own Python code" in err and not marker.exists()
    code, err = cli(["data", "check", qa_file, "--recipe", rec, "--trust-remote-code"], capsys)
    assert code == 0 and "unavailable" not in err, err
