"""`qlora-kit ui`: a local web app to start, watch, stop and resume runs, merge and export them,
and compare adapters with the base model, all through the same code the CLI runs.

    create_app(runs_dir, token=None, max_upload_bytes=200 MiB, grants=None, data_dirs=()) -> FastAPI   (tests, embedding)
    main(runs_dir, host="127.0.0.1", port=7860, token_file=None, grants=None, data_dirs=())   (the CLI; blocks)

data_dirs: folders (besides the runs folder and its uploads) the New run form may read data from.
The CLI imports this package only when `qlora-kit ui` runs, so FastAPI stays off its start-up path.

    app.py       create_app: the FastAPI app from the pages' routers, the state and the security guard; main
    state.py     UiState, the one object a ui process holds, and the dependencies that hand it to routes
    pages/       one APIRouter per page: session, runs, new, jobs, chat, files
    security.py  Host, token/session, CSRF, headers (an ASGI middleware)
    runs.py, jobs.py, newrun.py, chatting.py, downloads.py, uploads.py   what the routes do
"""

from __future__ import annotations

from .app import create_app, main

__all__ = ["create_app", "main"]
