"""`qlora-kit ui`: the web app, assembled. Each page's routes are an APIRouter in ui/pages/, given
the process's one UiState (state.py) as a dependency; what a route does lives in the module named
after it.

    /                   the single page (static/index.html; pages are #/runs, #/new, #/run/NAME, #/chat)
    /api/session        the CSRF token the page sends with every POST/DELETE          pages/session.py
    /api/runs, /api/run, /api/run/progress, /run/report   runs and one run's page       pages/runs.py
    /api/recipes, /api/check, /api/start   the New run form: train's own checks, then `qlora-kit train`   pages/new.py
    /api/run/stop|resume|job  SIGINT, the same train command again, merge/export/eval   pages/jobs.py
    /api/adapters, /api/chat  base vs adapters side by side through serve.Service       pages/chat.py
    /api/run/file, /api/uploads  a run's files out (a folder zipped), data files in     pages/files.py

Every request passes security.Guard first (Host, token or session, CSRF, security headers).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import UserError
from . import security
from .pages import chat, files, jobs, new, runs, session
from .state import DEFAULT_MAX_UPLOAD, UiState


async def user_error(request: Request, e: UserError):
    return JSONResponse({"error": e.message, "hint": e.hint}, status_code=getattr(e, "status", 400))


async def bad_request(request: Request, e: RequestValidationError):
    # FastAPI's 422 lists pydantic's internals; a 400 that names the field is what the form shows
    msgs = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}" for err in e.errors()]
    return JSONResponse({"error": "; ".join(msgs) or "bad request", "hint": None}, status_code=400)


def create_app(runs_dir: Path, token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               grants=None, data_dirs: list[Path] | tuple = ()) -> FastAPI:
    """`grants` (recipe.Grants): `qlora-kit ui --trust-remote-code/--allow-pickle`, the only source of
    either for every job and Try this ui starts; no form field, --set or run directory grants them."""
    ui = UiState.build(runs_dir, token, max_upload_bytes, grants, data_dirs)
    api = FastAPI(title="qlora-kit ui", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(UserError, user_error)
    api.add_exception_handler(RequestValidationError, bad_request)
    api.include_router(session.router)
    api.mount("/static", StaticFiles(directory=session.STATIC), name="static")
    for page in (runs, files, new, jobs, chat):
        api.include_router(page.router)
    api.state.ui = ui
    api.state.index, api.state.jobs, api.state.root = ui.index, ui.jobs, ui.root  # for tests and embedding
    api.add_middleware(security.Guard, token=token, csrf=ui.csrf, login_page=(session.STATIC / "login.html").read_bytes(),
                       sessions=ui.sessions)
    return api


def _port_free(host: str, port: int) -> None:
    """A clear message for a busy port, before uvicorn's own log line."""
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]"), port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                        "pass another --port, or stop the program that uses it") from None


def main(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, token_file: Path | None = None,
         grants=None, data_dirs: list[Path] | tuple = ()) -> None:
    """Serve the UI until Ctrl-C. Runs started from it keep training after it stops."""
    token = security.read_token(token_file)
    security.check_bind(host, token)
    app = create_app(runs_dir, token, grants=grants, data_dirs=data_dirs)
    _port_free(host, port)
    import uvicorn

    shown_host = f"[{host}]" if ":" in host else host
    print(f"qlora-kit ui: http://{shown_host}:{port}/  (runs: {Path(runs_dir).resolve()}; Ctrl-C stops the UI, "
          "not the runs)", file=sys.stderr, flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False)
