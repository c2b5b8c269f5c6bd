"""What one `qlora-kit ui` process holds, in one object every page's routes are given (as a FastAPI
dependency): the runs folder, the token and CSRF secret, the limits, the grants it was started with,
the run index, the jobs it started and the Try page's engine.

    UiState.build(...)    from create_app's arguments: folders checked, nothing started
    ui_state              the dependency: the app's UiState (State in a route's signature)
    body_json             the dependency: the JSON object a page POSTed, size-capped (Form in a signature)
    run_path/existing_run a run's folder from its name in the list, refused when it is not one
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from .. import net, run
from ..errors import UserError
from . import newrun
from .chatting import Chat
from .jobs import Jobs
from .runs import SKIP, RunIndex, inside
from .security import Sessions, check_token

MAX_JSON = 1 << 20  # a form or a chat question; anything larger is not one
DEFAULT_MAX_UPLOAD = 200 * 2**20


class NotFound(UserError):
    status = 404


class TooLarge(UserError):
    status = 413


@dataclass
class UiState:
    root: Path  # the runs folder, resolved
    token: str | None  # None: loopback only, no login
    grants: object  # recipe.Grants: `qlora-kit ui --trust-remote-code/--allow-pickle`, the only source of either
    readable: list[Path]  # where the New run form's recipe and data files may come from
    index: RunIndex
    jobs: Jobs
    chat: Chat
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    sessions: Sessions = field(default_factory=Sessions)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # per process; only this origin reads it
    stopping: dict[str, int] = field(default_factory=dict)  # run -> pid already sent one SIGINT

    @classmethod
    def build(cls, runs_dir: Path, token: str | None, max_upload_bytes: int, grants, data_dirs) -> UiState:
        from ..recipe import Grants

        grants = grants or Grants()
        root = runs_root(runs_dir)
        if token is not None:
            check_token(token)
        # uploads live under the root; besides it, --data-dir folders and the built-in recipes' samples
        readable = [root, *data_folders(data_dirs), *newrun.sample_dirs()]
        return cls(root=root, token=token, grants=grants, readable=readable, index=RunIndex(root),
                   jobs=Jobs(root / ".ui", grants), chat=Chat(grants), max_upload_bytes=max_upload_bytes)

    def run_path(self, name: str | None) -> Path:
        """A run's folder from its name in the list: one or two plain path parts under the root, and
        (symlinks followed) still under it."""
        parts = (name or "").split("/")
        if not name or len(parts) > 2 or any(not p or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
            raise UserError(f"no run named {name!r}")
        if parts[0] in SKIP:
            raise UserError(f"no run named {name!r}")
        d = self.root.joinpath(*parts)
        if not inside(self.root, d):
            raise NotFound(f"no run named {name!r} in {self.root}")
        return d

    def existing_run(self, name: str | None) -> Path:
        d = self.run_path(name)
        if not run.is_run_dir(d):
            raise NotFound(f"no run named {name!r} in {self.root}")
        return d


def data_folders(dirs) -> list[Path]:
    out = []
    for d in dirs or ():
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise UserError(f"--data-dir {p}: not a folder", "pass a folder that holds your data files")
        out.append(p)
    return out


def runs_root(runs_dir: Path) -> Path:
    p = Path(runs_dir).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise UserError(f"--runs {p} is a file, not a folder", "pass the folder that holds your run directories")
    p.mkdir(parents=True, exist_ok=True)
    return p


async def ui_state(request: Request) -> UiState:
    # async: a sync dependency would cost a thread-pool hop on every request
    return request.app.state.ui


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


State = Annotated[UiState, Depends(ui_state)]
Form = Annotated[dict, Depends(body_json)]
