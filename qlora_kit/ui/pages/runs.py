"""The runs list and one run's page: its card, files, jobs with their log tails, its loss curve
(streamed by byte offset) and its evaluation report. Read from the run directories (runs.py) and
the jobs this ui started (jobs.py)."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse

from ... import rundir, run
from ...errors import UserError
from .. import jobs
from ..runs import PROGRESS, read_json, read_progress
from ..state import NotFound, State, UiState

REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; sandbox"
MAX_OFFSET = 2**53 - 1  # the largest integer the page's JavaScript holds exactly
INFO_KEYS = ("device", "compute_dtype", "data", "lora", "tokenizer", "resumed_from", "adapter_check", "error",
             "wall_s", "from_adapter")
METRIC_KEYS = ("global_step", "train_loss", "eval_loss", "eval_perplexity", "best_checkpoint", "stopped_early",
               "warning")
# a train job's state -> what the list says of a run whose directory train has not written (yet)
PENDING_STATUS = {"running": "starting", "stopped": "interrupted"}

router = APIRouter()


def starting(ui: UiState) -> list[dict]:
    """Train jobs whose run directory train has not written yet (or never did: a failed start)."""
    out = []
    for j in ui.jobs.all():
        if j["kind"] != "train":
            continue
        try:
            d = ui.run_path(j["run"])
        except UserError:
            continue
        if run.has_info(d):
            continue
        status = PENDING_STATUS.get(j["state"], "failed")
        out.append({"name": j["run"], "status": status, "recipe": None, "started": None, "job": True,
                    "job_started": j.get("started")})
    return out


@router.get("/api/runs")
def list_runs(ui: State):
    t0 = time.perf_counter()
    found = ui.index.list()
    names = {r["name"] for r in found}
    pending = [s for s in starting(ui) if s["name"] not in names]
    # a JSONResponse skips FastAPI's jsonable_encoder, which costs more than the listing itself
    return JSONResponse({"runs": pending + found, "root": str(ui.root),
                         "ms": round((time.perf_counter() - t0) * 1000, 2)})


def job_view(ui: UiState, j: dict) -> dict:
    return {k: j.get(k) for k in ("id", "kind", "state", "command", "returncode", "started", "ended")} | {
        "log": jobs.tail(Path(j["log"])), "result": result_of(ui, j)}


def result_of(ui: UiState, j: dict) -> dict | None:
    """What a finished merge/export wrote: the CLI prints that path as its last stdout line."""
    if j["state"] != "finished" or j["kind"] == "train":
        return None
    lines = [x for x in jobs.tail(Path(j["out"]), 4096).splitlines() if x.strip()]
    if not lines:
        return None
    try:
        d = ui.run_path(j["run"]).resolve()
        p = Path(lines[-1].strip()).resolve()
        rel = p.relative_to(d)
    except (UserError, ValueError, OSError):
        return {"path": lines[-1].strip()}
    return {"path": str(p), "rel": rel.as_posix(), "dir": p.is_dir()}


def artifacts(d: Path) -> list[dict]:
    """The merged model and the exports, with their sizes (a folder's: its files')."""
    out = []
    cands = [d / "merged", *sorted((d / "export").glob("*"))] if (d / "export").is_dir() else [d / "merged"]
    for p in cands:
        if p.is_symlink() or not p.exists() or p.name.startswith("."):  # .tmp: an export being written
            continue
        if p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        else:
            size = p.stat().st_size
        out.append({"rel": p.relative_to(d).as_posix(), "dir": p.is_dir(), "bytes": size})
    return out


def _text(p: Path, limit: int = 256 << 10) -> str | None:
    try:
        return p.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError:
        return None


def _pending(name: str, job_list: list[dict]) -> dict:
    """A run train has not written yet: what its jobs say."""
    train_job = next((j for j in job_list if j["kind"] == "train"), None)
    state = PENDING_STATUS.get(train_job and train_job["state"], "failed")
    return {"name": name, "summary": {"name": name, "status": state}, "jobs": job_list, "pending": True}


@router.get("/api/run")
def run_detail(name: str, ui: State):
    d = ui.run_path(name)
    job_list = [job_view(ui, j) for j in ui.jobs.for_run(name)]
    if not run.is_run_dir(d):
        if not job_list:
            raise NotFound(f"no run named {name!r} in {ui.root}")
        return _pending(name, job_list)
    summary = ui.index.get(name, d) or {"name": name, "status": "unknown"}
    found = run.try_read_info(d)
    info = found.to_json() if found else {}
    metrics = read_json(d / "metrics.json") or {}
    ev = read_json(d / "eval.json")
    return {
        "name": name, "dir": str(d), "summary": summary, "jobs": job_list,
        "info": {k: info.get(k) for k in INFO_KEYS},
        "metrics": {k: metrics.get(k) for k in METRIC_KEYS},
        "readme": _text(d / "README.md"), "recipe_yaml": _text(d / "recipe.yaml"),
        "report": (d / "report.html").is_file(), "eval": (ev or {}).get("summary"),
        "artifacts": artifacts(d), "checkpoints": rundir.complete_checkpoints(d),
        "resume_command": jobs.shown(ui.jobs.resume_argv(name, d)),
        "stopping": summary.get("status") == "running" and ui.stopping.get(name) == summary.get("pid"),
    }


def _history(d: Path) -> list[dict]:
    """A run from before progress.jsonl existed: its curve is in metrics.json."""
    h = (read_json(d / "metrics.json") or {}).get("log_history") or []
    return [{"event": "log", "step": x.get("step"), **{k: x[k] for k in ("loss", "eval_loss") if k in x}}
            for x in h if isinstance(x, dict) and ("loss" in x or "eval_loss" in x)]


@router.get("/api/run/progress")
def run_progress(name: str, ui: State, offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    d = ui.run_path(name)
    events, new_offset = read_progress(d / PROGRESS, offset)
    if offset == 0 and not events:
        events = _history(d)
    summary = ui.index.get(name, d) if run.has_info(d) else None
    train = ui.jobs.read(ui.jobs.job_id(name, "train"))
    return {"events": events, "offset": new_offset, "summary": summary,
            "job": train and {"state": train["state"], "log": jobs.tail(Path(train["log"]), 4096)}}


@router.get("/run/report", include_in_schema=False)
def run_report(name: str, ui: State):
    p = ui.existing_run(name) / "report.html"
    if not p.is_file():
        raise UserError(f"{name}: no evaluation report yet", "run Evaluate on the run page (qlora-kit eval)")
    # the report has inline styles and data: images; it runs no script and is sandboxed
    return FileResponse(p, media_type="text/html", headers={"content-security-policy": REPORT_CSP})
