"""Never lose a run: SIGKILL at any point, Ctrl-C, NaN, out of memory, full disk, resume checks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import rundir, train
from qlora_kit.errors import UserError
from qlora_kit.train import resilience

from conftest import ROOT, Snapshot, make_recipe, write_qa

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from conftest import make_recipe
    from qlora_kit import train
    from qlora_kit.errors import UserError
    mode, run_dir = sys.argv[1], sys.argv[2]
    recipe = make_recipe({model!r}, {data!r}, max_steps=12, eval_steps=3, save_steps=3, early_stopping_patience=0)
    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if mode == "kill-step" and state.global_step == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        def on_step_begin(self, args, state, control, **kw):
            if mode.startswith("sigint") and state.global_step == 3:  # Ctrl-C while step 4 runs
                os.kill(os.getpid(), signal.SIGINT)
                if mode == "sigint-twice":
                    os.kill(os.getpid(), signal.SIGINT)
    if mode == "kill-save":  # die in the middle of writing checkpoint-6: adapter written, optimizer not
        import transformers
        orig = transformers.Trainer._save_optimizer_and_scheduler
        def dying(self, output_dir):
            if self.state.global_step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, output_dir)
        transformers.Trainer._save_optimizer_and_scheduler = dying
    try:
        train.run(recipe, run_dir, [Fault()])
    except UserError as e:
        print("STOPPED:", e.message, "|", e.hint)
        sys.exit(getattr(e, "exit_code", 2))
""")


@pytest.fixture(scope="module")
def harness(tiny_dir, tmp_path_factory, cache):
    d = tmp_path_factory.mktemp("resilience")
    data = write_qa(d / "qa.jsonl", n=40)
    script = d / "run_train.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), model=str(tiny_dir), data=str(data)))

    def go(mode, run_dir):
        env = {**os.environ, "QLORA_KIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, str(script), mode, str(run_dir)], capture_output=True, text=True,
                              timeout=600, env=env)

    ref = d / "reference"
    r = go("clean", ref)
    assert r.returncode == 0, r.stderr[-2000:]
    return go, d, load_file(ref / "adapter" / "adapter_model.safetensors")


def _same(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["kill-step", "kill-save"])
def test_sigkill_then_resume_equals_uninterrupted(harness, mode):
    go, d, ref = harness
    run_dir = d / mode
    r = go(mode, run_dir)
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    complete = [c for c in ckpts if (run_dir / "checkpoints" / c / resilience.MARKER).is_file()]
    if mode == "kill-save":
        assert "checkpoint-6" in ckpts and "checkpoint-6" not in complete  # the half-written one
    assert complete and complete[-1] == ("checkpoint-6" if mode == "kill-step" else "checkpoint-3")
    assert not (run_dir / "adapter").exists()
    r = go("clean", run_dir)  # the same command again
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "removing incomplete checkpoint" in r.stderr if mode == "kill-save" else True
    diff = _same(ref, load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    print(f"{mode}: max |resumed - uninterrupted| = {diff:.2e}")
    assert diff == 0.0, "resume on CPU must be bit-identical"
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] in complete


def test_ctrl_c_saves_and_resumes(harness):
    go, d, ref = harness
    run_dir = d / "sigint"
    r = go("sigint", run_dir)
    assert r.returncode == 130, r.stdout + r.stderr[-2000:]
    assert "interrupted at step 4; checkpoint saved" in r.stdout and "resume" in r.stdout
    assert (run_dir / "checkpoints" / "checkpoint-4" / resilience.MARKER).is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    r = go("clean", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same(ref, load_file(run_dir / "adapter" / "adapter_model.safetensors")) < 1e-6


def test_second_ctrl_c_exits_at_once(harness):
    go, d, _ = harness
    r = go("sigint-twice", d / "sigint2")
    assert r.returncode != 0 and "Traceback" not in r.stdout
    assert not (d / "sigint2" / "checkpoints" / "checkpoint-4").exists()


def test_ctrl_c_during_the_ranks_stop_vote_is_not_lost(monkeypatch):
    """Data-parallel ranks vote each step on stopping (an all-reduce). On a loaded machine a rank
    spends much of its time waiting in that vote; a Ctrl-C handled there must still stop the run
    at the next step, on every rank, not be overwritten by the vote's answer."""
    from transformers import TrainerControl

    from qlora_kit import distributed
    from qlora_kit.terminal import console

    def vote_with_ctrl_c_arriving(flag):
        os.kill(os.getpid(), signal.SIGINT)  # lands while this rank waits for the others
        sum(range(100))  # Python runs the handler at a bytecode boundary, here, before the vote returns
        return flag  # the vote was cast before the press

    stop = resilience.Interrupt(console)
    with stop:
        monkeypatch.setattr(distributed, "any_rank", vote_with_ctrl_c_arriving)
        first = TrainerControl()
        stop.on_step_end(None, None, first)
        monkeypatch.setattr(distributed, "any_rank", lambda flag: flag)
        second = TrainerControl()
        stop.on_step_end(None, None, second)
    assert not first.should_training_stop  # the vote that missed it: every rank goes on together
    assert stop.requested and second.should_training_stop and second.should_save


class _Inject:
    def __new__(cls, fn):
        from transformers import TrainerCallback

        class C(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                fn(args, state, model)

            def on_step_begin(self, args, state, control, model=None, **kw):
                getattr(fn, "begin", lambda *a: None)(args, state, model)

        return C()


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_dir, qa_file, tmp_path):
    def poison(args, state, model):
        if state.global_step == 4:
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.fill_(float("nan"))

    rec = make_recipe(str(tiny_dir), qa_file, max_steps=10, eval_steps=3, save_steps=3)
    with pytest.raises(resilience.RunStopped, match=r"non-finite training values at step 5 .*last good checkpoint: checkpoint-3"):
        train.run(rec, str(tmp_path / "run"), [_Inject(poison)])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and not (tmp_path / "run" / "adapter").exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]


def _oom_when_batch_above(limit):
    def fn(args, state, model):
        pass

    def begin(args, state, model):
        if args.per_device_train_batch_size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fn.begin = begin
    return fn


def test_out_of_memory_advice_and_auto_batch(tiny_dir, qa_file, tmp_path):
    rec = make_recipe(str(tiny_dir), qa_file, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(resilience.RunStopped) as e:
        train.run(rec, str(tmp_path / "a"), [_Inject(_oom_when_batch_above(1))])
    assert "out of memory with micro-batch 4" in e.value.message
    assert "per_device_train_batch_size=2" in e.value.hint and "gradient_accumulation_steps=2" in e.value.hint
    run_dir = train.run(rec, str(tmp_path / "b"), [_Inject(_oom_when_batch_above(1))], auto_batch=True)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["auto_batch"][-1] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}  # effective 4 kept


def test_disk_full_during_save_keeps_previous_checkpoint(tiny_dir, qa_file, tmp_path, monkeypatch):
    import transformers

    orig = transformers.Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full)
    rec = make_recipe(str(tiny_dir), qa_file, max_steps=9, eval_steps=3, save_steps=3)
    with pytest.raises(resilience.RunStopped, match=r"disk filled up .*checkpoint-3\) is usable"):
        train.run(rec, str(tmp_path / "run"))
    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", orig)
    run_dir = train.run(rec, str(tmp_path / "run"))  # resumes from checkpoint-3
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == "checkpoint-3"


def test_low_disk_is_checked_before_saving(tiny_dir, qa_file, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    calls = {"n": 0}

    def usage(path):
        calls["n"] += 1
        u = real(path)
        return type(u)(u.total, u.used, 1024 if calls["n"] > 1 else u.free)  # room for the first save only

    monkeypatch.setattr(resilience.shutil, "disk_usage", usage)
    rec = make_recipe(str(tiny_dir), qa_file, max_steps=9, eval_steps=3, save_steps=3)
    with pytest.raises(resilience.RunStopped, match=r"not enough disk space .*checkpoint-3\) is usable"):
        train.run(rec, str(tmp_path / "run"))


def test_resume_refuses_other_settings_and_force_starts_over(tiny_dir, qa_file, tmp_path):
    rec = make_recipe(str(tiny_dir), qa_file, max_steps=4)
    run_dir = train.run(rec, str(tmp_path / "run"))
    with pytest.raises(UserError, match="finished run"):
        train.run(rec, str(run_dir))
    info = json.loads((run_dir / "run.json").read_text())
    info["status"] = "interrupted"
    rundir.write_json(run_dir / "run.json", info)
    other = make_recipe(str(tiny_dir), qa_file, max_steps=4)
    other.lora.r = 8
    with pytest.raises(UserError, match=r"lora\.r: 4 -> 8") as e:
        train.run(other, str(run_dir))
    assert "--force" in e.value.hint
    train.run(other, str(run_dir), force=True)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_not_a_run_dir_is_refused(tiny_dir, qa_file, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.docx").write_text("important")
    with pytest.raises(UserError, match="already exists and is not empty"):
        train.run(make_recipe(str(tiny_dir), qa_file, max_steps=2), str(d))
    assert (d / "thesis.docx").read_text() == "important"


def test_continue_an_adapter_on_new_data(tiny_run, tiny_dir, tmp_path):
    first, _ = tiny_run
    new = write_qa(tmp_path / "new_law.jsonl", n=20)
    rec = make_recipe(str(tiny_dir), new, max_steps=3)
    rec.from_adapter = str(first)
    snap = Snapshot()
    run_dir = train.run(rec, str(tmp_path / "next"), [snap])
    old = load_file(first / "adapter" / "adapter_model.safetensors")
    start = {k.replace(".default", ""): v for k, v in snap.before.items() if "lora_" in k}
    for k, v in old.items():
        assert torch.equal(start[k], v.float()), k  # training began from the old adapter
    assert json.loads((run_dir / "run.json").read_text())["from_adapter"] == str(first)


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_dir):
    from qlora_kit.model import resolve_base_model

    d = tmp_path / "old-model"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UserError, match="pickle format") as e:
        resolve_base_model(str(d))
    assert "--allow-pickle" in e.value.hint
    assert resolve_base_model(str(d), allow_pickle=True) == str(d.resolve())


def _interrupted_in_the_last_step(tiny_dir, qa_file, tmp_path):
    """A 4-step run (checkpoints every 2) that gets Ctrl-C while its last step runs: it saves
    checkpoint-4 and stops as 'interrupted'. Returns (recipe, run directory)."""
    rec = make_recipe(str(tiny_dir), qa_file, max_steps=4, eval_steps=2, save_steps=2)

    def ctrl_c_in_last_step(args, state, model):
        pass

    ctrl_c_in_last_step.begin = lambda args, state, model: (
        os.kill(os.getpid(), signal.SIGINT) if state.global_step == 3 else None)
    run_dir = tmp_path / "run"
    with pytest.raises(resilience.RunStopped, match="interrupted at step 4"):
        train.run(rec, str(run_dir), [_Inject(ctrl_c_in_last_step)])
    return rec, run_dir


def test_ctrl_c_during_the_last_step_then_resume_trains_no_step_more(tiny_dir, qa_file, tmp_path):
    """Ctrl-C lands while the last step runs: that step's checkpoint is saved and the run is
    'interrupted'. Resuming must finish it (eval, adapter) without training a step past max_steps,
    which transformers' resume does on its own when max_steps does not end an epoch."""
    rec, run_dir = _interrupted_in_the_last_step(tiny_dir, qa_file, tmp_path)
    saved = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    train.run(rec, str(run_dir))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed_from"] == "checkpoint-4"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    # the final adapter is the last step's weights, not one optimizer step further
    assert _same(saved, load_file(run_dir / "adapter" / "adapter_model.safetensors")) == 0.0


def test_resumed_at_the_last_step_still_ends_with_the_best_checkpoint(tiny_dir, qa_file, tmp_path):
    """A run resumed from its last step's checkpoint trains nothing, and still ends as a finished
    run does: with load_best_model_at_end (the default) its adapter is the best checkpoint's. Which
    checkpoint is best is read from the trainer state the Trainer saved; here checkpoint-2's."""
    rec, run_dir = _interrupted_in_the_last_step(tiny_dir, qa_file, tmp_path)
    ckpts = run_dir / "checkpoints"
    state_file = ckpts / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = str(ckpts / "checkpoint-2")  # as if step 2 had the lowest eval loss
    state_file.write_text(json.dumps(state))
    best = load_file(ckpts / "checkpoint-2" / "adapter_model.safetensors")
    assert _same(best, load_file(ckpts / "checkpoint-4" / "adapter_model.safetensors")) > 0
    train.run(rec, str(run_dir))
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    assert _same(best, load_file(run_dir / "adapter" / "adapter_model.safetensors")) == 0.0
