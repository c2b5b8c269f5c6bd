"""`qlora-kit serve`: the runs named on the command line, served over an OpenAI-compatible API
until interrupted.

`main` refuses an unsafe bind before anything is loaded (net.check_serve_bind), names the runs
(`parse_runs`), then either execs vLLM's server on them (vllm.py) or loads them into one Engine
and runs uvicorn over `api.create_app` on a socket bound before the URL is printed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import UserError
from ..net import check_serve_bind
from ..run import default_name
from .request import BASE

log = logging.getLogger("qlora_kit.serve")


def parse_runs(runs: list[str]) -> dict[str, Path]:
    """RUN_DIR or NAME=RUN_DIR items -> {model id: run dir}; the id defaults to the folder name."""
    from .chat import parse_adapters

    plain, named = [], []
    for item in runs:
        name, sep, path = item.partition("=")
        # a path that exists wins, so a folder with '=' in its name still works
        (named if sep and not Path(item).exists() else plain).append(item)
    out: dict[str, Path] = {}
    for p in plain:
        p = Path(p)
        name = default_name(p)  # a checkpoint: RUN-checkpoint-N
        if name in out:
            raise UserError(f"two runs are both named '{name}'", f"name them: NAME={p}")
        out[name] = p
    for name, path in parse_adapters(None, named).items() if named else []:
        if name in out:
            raise UserError(f"the model id '{name}' is used twice", "give each run its own NAME=RUN_DIR")
        out[name] = path
    if not out:
        raise UserError("nothing to serve", "pass one or more run directories (RUN_DIR or NAME=RUN_DIR)")
    if BASE in out:
        raise UserError(f"'{BASE}' is reserved for the base model", f"serve that run under another name: NAME={out[BASE]}")
    return out


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}", "choose another --port") from e
    sock.listen(2048)  # accept into the backlog as soon as the URL is printed, before uvicorn is up
    return sock


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _log_requests_to_stderr() -> None:
    # one line per answered request on stderr; uvicorn's own access log stays off
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(runs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, engine: str = "hf",
         max_tokens: int = 256, max_queue: int = 64, grants=None) -> None:
    """Serve the runs (RUN_DIR or NAME=RUN_DIR) over an OpenAI-compatible API until interrupted.
    `grants` (recipe.Grants): this command's --trust-remote-code/--allow-pickle; the runs grant nothing."""
    from ..recipe import Grants

    grants = grants or Grants()
    check_serve_bind(host, api_key)  # before anything is loaded or bound
    named = parse_runs(runs)
    if engine == "vllm":
        from . import vllm

        argv = vllm.command_line(named, host, port, api_key, grants)
        print(f"starting vLLM for {', '.join([*named, BASE])} at {_url(host, port)}", file=sys.stderr)
        os.execvpe(argv[0], argv, vllm.vllm_env(api_key))
    if engine != "hf":
        raise UserError(f"unknown engine {engine!r}", "use --engine hf or --engine vllm")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")

    import uvicorn

    from .api import create_app
    from .engine import Engine
    from .service import Service

    _log_requests_to_stderr()
    service = Service(Engine.from_runs(named, grants), max_tokens, max_queue=max_queue)
    app = create_app(service, api_key)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    print(f"serving {', '.join(service.model_ids)} at {_url(host, bound)}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    # uvicorn.run() with our own socket: it is bound before the URL is printed, and port 0 works
    uvicorn.Server(config).run(sockets=[sock])
