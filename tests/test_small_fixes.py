"""Smaller things a user met on the way (issue 16): files a colleague can read (the umask is
respected by weights, checkpoints, merged models and exports), a failed run that leaves nothing
in the way of the corrected command, `plan` that fails fast offline, and inference commands that
print each warning once and no advice about packages the user does not need. All through the
real command line, on real files and the built-in tiny models."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_recipe

from qlora_kit import rundir, train

QK = [sys.executable, "-m", "qlora_kit.cli"]
UMASK = 0o002  # a shared group (the common "colleague on the same workstation" setting): 664 / 775
SMALL = ["--set", "training.per_device_train_batch_size=4", "--set", "training.max_length=512",
         "--set", "training.eval_steps=1", "--set", "training.save_steps=1", "--set", "training.logging_steps=1"]


def cli(args, umask: int = UMASK, env: dict | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(QK + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300, preexec_fn=lambda: os.umask(umask))


def modes(root: Path) -> dict[str, dict[str, str]]:
    """'file'/'dir' -> the set of modes found, with an example path for each mode."""
    found: dict[str, dict[int, str]] = {"file": {}, "dir": {}}
    for p in [root, *root.rglob("*")]:
        kind = "dir" if p.is_dir() else "file"
        found[kind].setdefault(stat.S_IMODE(p.stat().st_mode), str(p.relative_to(root.parent)))
    return {k: {oct(m): ex for m, ex in v.items()} for k, v in found.items()}


def assert_no_repeated_lines(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, stderr


@pytest.fixture(scope="module")
def run_002(cache, qa_file, tmp_path_factory) -> Path:
    """A finished tiny run with two checkpoints, trained under umask 002."""
    d = tmp_path_factory.mktemp("umask") / "run"
    r = cli(["train", "legal", "--data", qa_file, "--base-model", "builtin:tiny", "--max-steps", 2, "--run-dir", d, *SMALL])
    assert r.returncode == 0, r.stderr
    return d


# --- modes ------------------------------------------------------------------------------------------


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert rundir.umask() == 0o027
        assert rundir.umask() == 0o027  # reading it twice changed nothing
    finally:
        os.umask(old)


def test_weights_checkpoints_merged_model_and_gguf_follow_the_umask(run_002):
    """Before: every *.safetensors (adapter, checkpoints, merged model) was 0600 whatever the umask."""
    r = cli(["merge", run_002])
    assert r.returncode == 0, r.stderr
    r = cli(["export", run_002 / "merged", "--format", "gguf", "--out", run_002 / "export" / "tiny.gguf"])
    assert r.returncode == 0, r.stderr
    assert_no_repeated_lines(r.stderr)
    assert "pip install kernels" not in r.stderr
    for must in ("adapter/adapter_model.safetensors", "checkpoints/checkpoint-1/adapter_model.safetensors",
                 "merged/model.safetensors", "export/tiny.gguf"):
        assert (run_002 / must).is_file(), must
    m = modes(run_002)
    assert list(m["file"]) == [oct(0o664)], m["file"]  # one mode for every file, the one open() gives
    assert list(m["dir"]) == [oct(0o775)], m["dir"]


def test_a_private_umask_stays_private(cache, tmp_path):
    """umask 077 asks for owner-only files: the modes follow it that way too (a peft export copies
    the adapter; `train` is covered above)."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    old = os.umask(0o077)
    try:
        rundir.share(src)
        rundir.write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(src.stat().st_mode) == 0o600 and stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600


# --- a failed run leaves nothing behind -------------------------------------------------------------


def test_from_adapter_on_another_base_leaves_nothing_and_the_corrected_command_runs(run_002, qa_file, tmp_path):
    """Before: exit 2, but the new --run-dir was left behind and the corrected command refused it
    without --force."""
    target = tmp_path / "continued"
    r = cli(["train", "legal", "--data", qa_file, "--from-adapter", run_002, "--base-model", "builtin:tiny-chat",
             "--run-dir", target, "--max-steps", 1, *SMALL])
    assert r.returncode == 2, r.stderr
    assert "builtin:tiny" in r.stderr and "builtin:tiny-chat" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()
    r = cli(["train", "legal", "--data", qa_file, "--from-adapter", run_002, "--base-model", "builtin:tiny",
             "--run-dir", target, "--max-steps", 1, *SMALL])
    assert r.returncode == 0, r.stderr
    assert "continuing the adapter" in r.stderr and (target / "adapter" / "adapter_model.safetensors").is_file()


def _broken_copy(model: Path, dest: Path) -> Path:
    """A model folder whose weights file is cut short (an interrupted copy): found, then unloadable."""
    dest.mkdir()
    for f in model.iterdir():
        (dest / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    return dest


def test_a_run_that_fails_before_its_first_step_leaves_nothing(tiny_dir, qa_file, tmp_path):
    base = _broken_copy(tiny_dir, tmp_path / "broken")
    rec = make_recipe(str(base), qa_file, max_steps=1)
    new = tmp_path / "new"
    with pytest.raises(Exception):
        train.run(rec, str(new))
    assert not new.exists()
    empty = tmp_path / "empty"  # a folder the user made for the run: emptied, never removed
    empty.mkdir()
    with pytest.raises(Exception):
        train.run(rec, str(empty))
    assert empty.is_dir() and not any(empty.iterdir())


# --- plan offline -----------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", ["1", ""])
def test_plan_with_an_unknown_hub_id_fails_fast(offline):
    """Before: about 23 s of retries (HEAD with back-off) on a machine without network."""
    t = time.monotonic()
    r = cli(["plan", "legal", "--base-model", "no-such-org/no-such-model"], env={"HF_HUB_OFFLINE": offline})
    took = time.monotonic() - t
    assert r.returncode == 2, r.stderr
    assert "no-such-org/no-such-model" in r.stderr and "Traceback" not in r.stderr and "Retrying" not in r.stderr
    assert took < 10, took  # imports and one short request (5 s timeout) at most


# --- warnings -----------------------------------------------------------------------------------------


def test_inference_commands_print_no_kernel_advice_and_no_warning_twice(run_002, tmp_path):
    r = cli(["generate", run_002, "-p", "hi", "--max-new-tokens", 4])
    assert r.returncode == 0, r.stderr
    assert "pip install kernels" not in r.stderr and "gemm_4bit" not in r.stderr, r.stderr
    assert_no_repeated_lines(r.stderr)
    r = cli(["export", run_002, "--format", "peft", "--out", tmp_path / "peft"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("is a local test model") == 1, r.stderr  # export.run printed it; the CLI not again
    assert_no_repeated_lines(r.stderr)
