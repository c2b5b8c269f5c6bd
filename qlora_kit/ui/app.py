"""`qlora-kit ui`: the web app. Routes only; what they do lives in the modules named after it.

    /                   the single page (static/index.html; pages are #/runs, #/new, #/run/NAME, #/chat)
    /api/session        the CSRF token the page sends with every POST/DELETE
    /api/runs           every run under --runs (runs.py), plus runs whose process is still starting
    /api/run            one run: card, files, jobs with log tails; /api/run/progress streams its curve
    /api/uploads        a data file into RUNS/uploads (uploads.py)
    /api/check, /api/start   the New run form (newrun.py): train's own checks, then `qlora-kit train`
    /api/run/stop|resume|job  SIGINT, the same train command again, merge/export/eval (jobs.py)
    /api/chat           base vs adapters side by side through serve.Service (chatting.py)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .. import net, rundir
from ..errors import UserError
from . import downloads, jobs, newrun, runs, security, uploads
from .chatting import Chat

STATIC = Path(__file__).resolve().parent / "static"
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; sandbox"
MAX_JSON = 1 << 20  # a form or a chat question; anything larger is not one
MAX_OFFSET = 2**53 - 1  # the largest integer the page's JavaScript holds exactly
MAX_CHAT_TOKENS = 4096


class NotFound(UserError):
    status = 404


class TooLarge(UserError):
    status = 413


def _data_dirs(dirs) -> list[Path]:
    out = []
    for d in dirs or ():
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise UserError(f"--data-dir {p}: not a folder", "pass a folder that holds your data files")
        out.append(p)
    return out


def _runs_root(runs_dir: Path) -> Path:
    p = Path(runs_dir).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise UserError(f"--runs {p} is a file, not a folder", "pass the folder that holds your run directories")
    p.mkdir(parents=True, exist_ok=True)
    return p


def create_app(runs_dir: Path, token: str | None = None, max_upload_bytes: int = 200 * 2**20,
               grants=None, data_dirs: list[Path] | tuple = ()) -> FastAPI:
    """`grants` (recipe.Grants): `qlora-kit ui --trust-remote-code/--allow-pickle`, the only source of
    either for every job and Try this ui starts; no form field, --set or run directory grants them."""
    from ..recipe import Grants

    grants = grants or Grants()
    root = _runs_root(runs_dir)
    if token is not None:
        security.check_token(token)
    # where the New run form's recipe and data files may come from (uploads live under the root)
    readable = [root, *_data_dirs(data_dirs), *newrun.sample_dirs()]
    sessions = security.Sessions()
    index = runs.RunIndex(root)
    work = jobs.Jobs(root / ".ui", grants)
    chat = Chat(grants)
    api = FastAPI(title="qlora-kit ui", docs_url=None, redoc_url=None, openapi_url=None)
    login_page = (STATIC / "login.html").read_bytes()
    csrf = secrets.token_urlsafe(32)  # per UI process; only pages of this origin can read it

    @api.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return JSONResponse({"error": e.message, "hint": e.hint}, status_code=getattr(e, "status", 400))

    @api.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        # FastAPI's 422 lists pydantic's internals; a 400 that names the field is what the form shows
        msgs = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(msgs) or "bad request", "hint": None}, status_code=400)

    def run_path(name: str | None) -> Path:
        """A run's folder from its name in the list: one or two plain path parts under the root, and
        (symlinks followed) still under it."""
        parts = (name or "").split("/")
        if not name or len(parts) > 2 or any(not p or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
            raise UserError(f"no run named {name!r}")
        if parts[0] in runs.SKIP:
            raise UserError(f"no run named {name!r}")
        d = root.joinpath(*parts)
        if not runs.inside(root, d):
            raise NotFound(f"no run named {name!r} in {root}")
        return d

    def existing_run(name: str | None) -> Path:
        d = run_path(name)
        if not rundir.is_run_dir(d):
            raise NotFound(f"no run named {name!r} in {root}")
        return d

    def _no_constants(c: str):
        raise UserError(f"the request holds {c}, which is not a number")

    async def body_json(request: Request) -> dict:
        """The JSON object a page sent: 413 past MAX_JSON, by its Content-Length before reading a byte,
        and while reading a body sent without one."""
        raw = await net.read_body(request, MAX_JSON, lambda: TooLarge(
            f"the request is larger than {MAX_JSON >> 10} KiB", "send a shorter question or form"))
        try:
            v = json.loads(bytes(raw) or b"{}", parse_constant=_no_constants)
        except ValueError:
            raise UserError("the request is not JSON") from None
        if not isinstance(v, dict):
            raise UserError("expected a JSON object")
        return v

    # --- the page ------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @api.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/api/session")
    def session(request: Request):
        return {"csrf": csrf, "auth": token is not None, "runs_dir": str(root),
                "python": sys.version.split()[0]}

    @api.post("/api/logout")
    def logout(request: Request):
        sessions.end(request.cookies.get(security.COOKIE))  # the id is forgotten: a copy of the cookie is dead too
        r = JSONResponse({"ok": True})
        r.headers["set-cookie"] = f"{security.COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        return r

    # --- runs ------------------------------------------------------------------------------------

    def starting() -> list[dict]:
        """Train jobs whose run directory train has not written yet (or never did: a failed start)."""
        out = []
        for j in work.all():
            if j["kind"] != "train":
                continue
            try:
                d = run_path(j["run"])
            except UserError:
                continue
            if (d / "run.json").is_file():
                continue
            status = {"running": "starting", "stopped": "interrupted"}.get(j["state"], "failed")
            out.append({"name": j["run"], "status": status, "recipe": None, "started": None, "job": True,
                        "job_started": j.get("started")})
        return out

    @api.get("/api/runs")
    def list_runs():
        t0 = time.perf_counter()
        found = index.list()
        names = {r["name"] for r in found}
        pending = [s for s in starting() if s["name"] not in names]
        # a JSONResponse skips FastAPI's jsonable_encoder, which costs more than the listing itself
        return JSONResponse({"runs": pending + found, "root": str(root), "ms": round((time.perf_counter() - t0) * 1000, 2)})

    def job_view(j: dict) -> dict:
        return {k: j.get(k) for k in ("id", "kind", "state", "command", "returncode", "started", "ended")} | {
            "log": jobs.tail(Path(j["log"])), "result": result_of(j)}

    def result_of(j: dict) -> dict | None:
        """What a finished merge/export wrote: the CLI prints that path as its last stdout line."""
        if j["state"] != "finished" or j["kind"] == "train":
            return None
        lines = [x for x in jobs.tail(Path(j["out"]), 4096).splitlines() if x.strip()]
        if not lines:
            return None
        try:
            d = run_path(j["run"]).resolve()
            p = Path(lines[-1].strip()).resolve()
            rel = p.relative_to(d)
        except (UserError, ValueError, OSError):
            return {"path": lines[-1].strip()}
        return {"path": str(p), "rel": rel.as_posix(), "dir": p.is_dir()}

    def artifacts(d: Path) -> list[dict]:
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

    @api.get("/api/run")
    def run_detail(name: str):
        d = run_path(name)
        job_list = [job_view(j) for j in work.for_run(name)]
        if not rundir.is_run_dir(d):
            if not job_list:
                raise NotFound(f"no run named {name!r} in {root}")
            train_job = next((j for j in job_list if j["kind"] == "train"), None)
            state = {"running": "starting", "stopped": "interrupted"}.get(train_job and train_job["state"], "failed")
            return {"name": name, "summary": {"name": name, "status": state}, "jobs": job_list, "pending": True}
        summary = index.get(name, d) or {"name": name, "status": "unknown"}
        info = runs._read_json(d / "run.json") or {}
        metrics = runs._read_json(d / "metrics.json") or {}
        ev = runs._read_json(d / "eval.json")

        def text(p: Path, limit: int = 256 << 10) -> str | None:
            try:
                return p.read_text(encoding="utf-8", errors="replace")[:limit]
            except OSError:
                return None

        return {
            "name": name, "dir": str(d), "summary": summary, "jobs": job_list,
            "info": {k: info.get(k) for k in ("device", "compute_dtype", "data", "lora", "tokenizer", "resumed_from",
                                               "adapter_check", "error", "wall_s", "from_adapter")},
            "metrics": {k: metrics.get(k) for k in ("global_step", "train_loss", "eval_loss", "eval_perplexity",
                                                    "best_checkpoint", "stopped_early", "warning")},
            "readme": text(d / "README.md"), "recipe_yaml": text(d / "recipe.yaml"),
            "report": (d / "report.html").is_file(), "eval": (ev or {}).get("summary"),
            "artifacts": artifacts(d), "checkpoints": rundir.complete_checkpoints(d),
            "resume_command": jobs.shown(resume_argv(name, d)),
            "stopping": summary.get("status") == "running" and stopping.get(name) == summary.get("pid"),
        }

    @api.get("/api/run/progress")
    def run_progress(name: str, offset: int = Query(0, ge=0, le=MAX_OFFSET)):
        d = run_path(name)
        events, new_offset = runs.read_progress(d / runs.PROGRESS, offset)
        history = None
        if offset == 0 and not events:
            # a run from before progress.jsonl existed: its curve is in metrics.json
            h = (runs._read_json(d / "metrics.json") or {}).get("log_history") or []
            history = [{"event": "log", "step": x.get("step"), **{k: x[k] for k in ("loss", "eval_loss") if k in x}}
                       for x in h if isinstance(x, dict) and ("loss" in x or "eval_loss" in x)]
        summary = index.get(name, d) if (d / "run.json").is_file() else None
        train = work.read(jobs.Jobs.job_id(name, "train"))
        return {"events": history if history is not None else events, "offset": new_offset,
                "summary": summary, "job": train and {"state": train["state"], "log": jobs.tail(Path(train["log"]), 4096)}}

    @api.get("/run/report", include_in_schema=False)
    def run_report(name: str):
        p = existing_run(name) / "report.html"
        if not p.is_file():
            raise UserError(f"{name}: no evaluation report yet", "run Evaluate on the run page (qlora-kit eval)")
        # the report has inline styles and data: images; it runs no script and is sandboxed
        return FileResponse(p, media_type="text/html", headers={"content-security-policy": REPORT_CSP})

    @api.get("/api/run/file")
    def run_file(name: str, path: str):
        d = existing_run(name)
        p = downloads.inside(d, path)
        if p.is_dir():
            fname = f"{d.name}-{p.name}.zip"
            return StreamingResponse(downloads.zip_stream(p), media_type="application/zip",
                                     headers={"content-disposition": f'attachment; filename="{fname}"'})
        return FileResponse(p, filename=p.name, media_type="application/octet-stream")

    # --- starting, stopping, resuming --------------------------------------------------------------

    @api.post("/api/uploads")
    async def upload(request: Request, name: str):
        uploads.safe_name(name)  # refused before a byte is read
        try:
            chunks = net.body_chunks(request, max_upload_bytes, uploads.TooLarge)
            p = await uploads.save(chunks, root / "uploads", name, max_upload_bytes)
        except uploads.TooLarge:
            return JSONResponse({"error": f"the file is larger than the upload limit ({max_upload_bytes / 2**20:.0f} MiB)",
                                 "hint": "type the file's path on this machine instead"}, status_code=413)
        return {"path": str(p), "name": p.name, "bytes": p.stat().st_size}

    @api.get("/api/recipes")
    def recipes():
        return {"recipes": newrun.recipe_defaults()}

    @api.post("/api/check")
    async def check(request: Request):
        spec = newrun.parse(await body_json(request), readable, grants)
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(newrun.check, spec)
        return {**result, "command": jobs.shown(newrun.argv(spec, root / "NAME"))}

    @api.post("/api/start")
    async def start(request: Request):
        form = await body_json(request)
        spec = newrun.parse(form, readable, grants)
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(newrun.check, spec)  # what train would refuse is refused here, same words
        name = newrun.new_name(root, spec, (form.get("name") or "").strip() or None)
        argv = newrun.argv(spec, root / name)
        try:
            job = work.start(name, "train", argv)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        return {"name": name, "command": job["command"]}

    def resume_argv(name: str, d: Path) -> list[str]:
        """The command that started the run, or (run from a shell, or an older UI) its saved recipe."""
        old = work.read(jobs.Jobs.job_id(name, "train"))
        recorded = jobs.train_argv(old.get("argv")) if old else None
        if recorded and "--run-dir" in recorded:
            return recorded
        return jobs.cli("train", str(d / "recipe.yaml"), "--run-dir", str(d))

    stopping: dict[str, int] = {}  # run -> pid already sent one SIGINT

    @api.post("/api/run/stop")
    async def stop(request: Request):
        """First Stop: one SIGINT (checkpoint, then exit). A second SIGINT quits at once, losing the
        step in progress, so it is sent only when asked for with "now": a double click is not that."""
        form = await body_json(request)
        name, now = form.get("name"), bool(form.get("now"))
        d = run_path(name)
        job = work.read(jobs.Jobs.job_id(name, "train"))
        s = index.get(name, d) if (d / "run.json").is_file() else None
        if job and job["state"] == "running":
            pid, leader, since = job["pid"], True, job.get("started")
        elif s and s["status"] == "running":
            pid, leader, since = s["pid"], None, runs.unix_time(s.get("started"))
        else:
            raise UserError(f"{name} is not running")
        if stopping.get(name) == pid and not now:
            return {"ok": True, "signalled": None, "stopping": True}
        # the pid comes from a file: signal it only when it is this run's own `qlora-kit train`
        why = runs.not_train_of(pid, d, since)
        if why:
            raise UserError(f"{name}: refused to stop process {pid}: {why}",
                            "stop the training where it was started (Ctrl-C), or check the run's run.json")
        if not jobs.signal_run(pid, leader):
            raise UserError(f"cannot signal process {pid}", "stop it where it was started (Ctrl-C)")
        stopping[name] = pid
        return {"ok": True, "signalled": pid, "stopping": True}

    @api.post("/api/run/resume")
    async def resume(request: Request):
        name = (await body_json(request)).get("name")
        d = existing_run(name)
        s = index.get(name, d)
        job = work.read(jobs.Jobs.job_id(name, "train"))
        if s["status"] == "running" or (job and job["state"] == "running"):
            raise UserError(f"{name} is still running (or still saving its checkpoint and exiting)",
                            "wait until it has stopped, then resume")
        if s["status"] == "finished":
            raise UserError(f"{name} is a finished run", "start a new run instead")
        try:
            job = work.start(name, "train", resume_argv(name, d))
        except RuntimeError as e:
            raise UserError(str(e)) from None
        return {"ok": True, "command": job["command"]}

    @api.post("/api/run/job")
    async def run_job(request: Request):
        form = await body_json(request)
        name, kind = form.get("name"), form.get("kind")
        d = existing_run(name)
        s = index.get(name, d)
        if s["status"] != "finished" or not s["has_adapter"]:
            raise UserError(f"{name}: the run has not finished, so there is no adapter to {kind} yet")
        if kind == "merge":
            dtype = form.get("dtype") or "bf16"
            if dtype not in ("bf16", "fp16", "fp32"):
                raise UserError(f"dtype {dtype!r}: choose bf16, fp16 or fp32")
            if (d / "merged").exists():
                raise UserError(f"{d / 'merged'} already exists", "download it, or delete it to merge again")
            argv = jobs.cli("merge", str(d), "--dtype", dtype)
        elif kind == "export":
            fmt = form.get("format") or "gguf"
            if fmt not in ("gguf", "peft"):
                raise UserError(f"format {fmt!r}: choose gguf or peft")
            argv = jobs.cli("export", str(d), "--format", fmt)
        elif kind == "eval":
            argv = jobs.cli("eval", str(d))
        else:
            raise UserError(f"unknown job {kind!r}", "merge, export or eval")
        try:
            job = work.start(name, kind, argv)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        return {"ok": True, "command": job["command"]}

    @api.delete("/api/run/job")
    def forget_job(name: str, kind: str):
        run_path(name)
        if kind not in jobs.KINDS:
            raise UserError(f"unknown job {kind!r}")
        j = work.read(jobs.Jobs.job_id(name, kind))
        if j is None:
            raise UserError(f"no {kind} job for {name}")
        if j["state"] == "running":
            raise UserError(f"the {kind} job for {name} is still running", "stop it first")
        work._path(j["id"]).unlink(missing_ok=True)
        return {"ok": True}

    # --- try it --------------------------------------------------------------------------------

    @api.get("/api/adapters")
    def adapters():
        found = [r for r in index.list() if r["status"] == "finished" and r.get("has_adapter")]
        return {"adapters": [{"name": r["name"], "recipe": r["recipe"], "base_model": r["base_model"],
                              "base_model_path": r["base_model_path"], "eval_loss": r["eval_loss"]} for r in found]}

    @api.post("/api/chat")
    async def ask(request: Request):
        form = await body_json(request)
        names = form.get("runs") or []
        question = str(form.get("question") or "").strip()
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UserError("tick at least one adapter")
        if not question:
            raise UserError("type a question")
        max_tokens = form.get("max_tokens")
        if max_tokens is None or max_tokens == "":
            max_tokens = 256
        if isinstance(max_tokens, str) and max_tokens.strip().isdigit():
            max_tokens = int(max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_CHAT_TOKENS:
            raise UserError(f"max_tokens {form.get('max_tokens')!r}: expected a whole number from 1 to {MAX_CHAT_TOKENS}")
        chosen = {n: existing_run(n) for n in dict.fromkeys(names)}

        def events():
            for ev in chat.ask(chosen, question, max_tokens):
                yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    api.state.index, api.state.jobs, api.state.root = index, work, root
    api.add_middleware(security.Guard, token=token, csrf=csrf, login_page=login_page, sessions=sessions)
    return api


def main(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, token_file: Path | None = None,
         grants=None, data_dirs: list[Path] | tuple = ()) -> None:
    """Serve the UI until Ctrl-C. Runs started from it keep training after it stops."""
    token = security.read_token(token_file)
    security.check_bind(host, token)
    app = create_app(runs_dir, token, grants=grants, data_dirs=data_dirs)
    try:  # a clear message for a busy port, before uvicorn's own log line
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]"), port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                        "pass another --port, or stop the program that uses it") from None
    import uvicorn

    shown_host = f"[{host}]" if ":" in host else host
    print(f"qlora-kit ui: http://{shown_host}:{port}/  (runs: {Path(runs_dir).resolve()}; Ctrl-C stops the UI, "
          "not the runs)", file=sys.stderr, flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False)
