"""`qlora-kit ui`: a local web app to start, watch, stop and resume runs, merge and export them,
and compare adapters with the base model, all through the same code the CLI runs.

    create_app(runs_dir, token=None, max_upload_bytes=200 MiB, grants=None, data_dirs=()) -> FastAPI   (tests, embedding)
    main(runs_dir, host="127.0.0.1", port=7860, token_file=None, grants=None, data_dirs=())   (the CLI; blocks)

data_dirs: folders (besides the runs folder and its uploads) the New run form may read data from.

Imports are deferred so `import qlora_kit.ui` stays cheap for the CLI.
"""

from __future__ import annotations

from pathlib import Path


def create_app(runs_dir: Path, token: str | None = None, max_upload_bytes: int = 200 * 2**20, grants=None,
               data_dirs=()):
    from .app import create_app as _create

    return _create(runs_dir, token, max_upload_bytes, grants, data_dirs)


def main(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, token_file: Path | None = None,
         grants=None, data_dirs=()) -> None:
    from .app import main as _main

    _main(runs_dir, host, port, token_file, grants, data_dirs)


__all__ = ["create_app", "main"]
