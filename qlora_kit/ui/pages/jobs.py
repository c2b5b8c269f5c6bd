"""A run's buttons: Stop (SIGINT, as Ctrl-C), Resume (the same train command again), and Merge,
Export and Evaluate (`qlora-kit merge|export|eval RUN`), each a process jobs.py starts and records."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from ... import run
from ...errors import UserError
from .. import jobs
from ..runs import not_train_of, unix_time
from ..state import Form, State, UiState

router = APIRouter()


def _start(ui: UiState, name: str, kind: str, argv: list[str]) -> dict:
    try:
        job = ui.jobs.start(name, kind, argv)
    except RuntimeError as e:  # one of this kind already running for this run
        raise UserError(str(e)) from None
    return {"ok": True, "command": job["command"]}


def _running_pid(ui: UiState, name: str, d: Path) -> tuple[int, bool | None, float | None]:
    """(pid, leads its own session, started) of the run's training: the job this ui started, else the
    process run.json names (started from a shell)."""
    job = ui.jobs.read(ui.jobs.job_id(name, "train"))
    s = ui.index.get(name, d) if run.has_info(d) else None
    if job and job["state"] == "running":
        return job["pid"], True, job.get("started")
    if s and s["status"] == "running":
        return s["pid"], None, unix_time(s.get("started"))
    raise UserError(f"{name} is not running")


@router.post("/api/run/stop")
async def stop(form: Form, ui: State):
    """First Stop: one SIGINT (checkpoint, then exit). A second SIGINT quits at once, losing the
    step in progress, so it is sent only when asked for with "now": a double click is not that."""
    name, now = form.get("name"), bool(form.get("now"))
    d = ui.run_path(name)
    pid, leader, since = _running_pid(ui, name, d)
    if ui.stopping.get(name) == pid and not now:
        return {"ok": True, "signalled": None, "stopping": True}
    # the pid comes from a file: signal it only when it is this run's own `qlora-kit train`
    why = not_train_of(pid, d, since)
    if why:
        raise UserError(f"{name}: refused to stop process {pid}: {why}",
                        "stop the training where it was started (Ctrl-C), or check the run's run.json")
    if not jobs.signal_run(pid, leader):
        raise UserError(f"cannot signal process {pid}", "stop it where it was started (Ctrl-C)")
    ui.stopping[name] = pid
    return {"ok": True, "signalled": pid, "stopping": True}


@router.post("/api/run/resume")
async def resume(form: Form, ui: State):
    name = form.get("name")
    d = ui.existing_run(name)
    s = ui.index.get(name, d)
    job = ui.jobs.read(ui.jobs.job_id(name, "train"))
    if s["status"] == "running" or (job and job["state"] == "running"):
        raise UserError(f"{name} is still running (or still saving its checkpoint and exiting)",
                        "wait until it has stopped, then resume")
    if s["status"] == "finished":
        raise UserError(f"{name} is a finished run", "start a new run instead")
    return _start(ui, name, "train", ui.jobs.resume_argv(name, d))


def _choices(values) -> str:
    *head, last = list(values)
    return f"{', '.join(head)} or {last}" if head else last


def job_argv(kind, form: dict, d: Path) -> list[str]:
    """The command of a Merge, Export or Evaluate button, its options checked as the command checks them."""
    if kind == "merge":
        from ...merge import DTYPES

        dtype = form.get("dtype") or "bf16"
        if dtype not in tuple(DTYPES):  # a tuple: a JSON list or object sent as dtype is not hashable
            raise UserError(f"dtype {dtype!r}: choose {_choices(DTYPES)}")
        if (d / "merged").exists():
            raise UserError(f"{d / 'merged'} already exists", "download it, or delete it to merge again")
        return jobs.cli("merge", str(d), "--dtype", dtype)
    if kind == "export":
        from ...export import FORMATS

        fmt = form.get("format") or "gguf"
        if fmt not in FORMATS:
            raise UserError(f"format {fmt!r}: choose {_choices(FORMATS)}")
        return jobs.cli("export", str(d), "--format", fmt)
    if kind == "eval":
        return jobs.cli("eval", str(d))
    raise UserError(f"unknown job {kind!r}", "merge, export or eval")


@router.post("/api/run/job")
async def run_job(form: Form, ui: State):
    name, kind = form.get("name"), form.get("kind")
    d = ui.existing_run(name)
    s = ui.index.get(name, d)
    if s["status"] != "finished" or not s["has_adapter"]:
        raise UserError(f"{name}: the run has not finished, so there is no adapter to {kind} yet")
    return _start(ui, name, kind, job_argv(kind, form, d))


@router.delete("/api/run/job")
def forget_job(name: str, kind: str, ui: State):
    ui.run_path(name)
    if kind not in jobs.KINDS:
        raise UserError(f"unknown job {kind!r}")
    j = ui.jobs.read(ui.jobs.job_id(name, kind))
    if j is None:
        raise UserError(f"no {kind} job for {name}")
    if j["state"] == "running":
        raise UserError(f"the {kind} job for {name} is still running", "stop it first")
    ui.jobs.forget(j["id"])
    return {"ok": True}
