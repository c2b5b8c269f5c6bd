"""The page itself and the session: the single page, its icon, the CSRF token, logout."""

from __future__ import annotations

import sys
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from ..security import COOKIE
from ..state import State

STATIC = Path(__file__).resolve().parent.parent / "static"  # the page, its script and the login page (app.py)

router = APIRouter()


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/api/session")
def session(ui: State):
    """The CSRF token the page sends with every POST/DELETE."""
    return {"csrf": ui.csrf, "auth": ui.token is not None, "runs_dir": str(ui.root),
            "python": sys.version.split()[0]}


@router.post("/api/logout")
def logout(request: Request, ui: State):
    ui.sessions.end(request.cookies.get(COOKIE))  # the id is forgotten: a copy of the cookie is dead too
    r = JSONResponse({"ok": True})
    r.headers["set-cookie"] = f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
    return r
