"""`qlora-kit serve` and the generation it shares with `generate`, `chat`, `eval` and the web UI.

    engine.py      Engine: a 4-bit base + any number of adapters (or a merged model), each run's own
                   stored chat template -> text; the one place a trained model is loaded for inference
    structured.py  constrained decoding: answers that are JSON matching a schema
    chat.py        `qlora-kit chat`: the terminal conversation over an Engine
    request.py     an OpenAI chat-completion body, checked field by field (ApiError: status + OpenAI's body)
    limits.py      how much a request may ask for: body size, answer length, the model's context
    service.py     Service: OpenAI chat completions over one Engine, transport-free (the ui calls it too)
    api.py         create_app: the FastAPI routes over a Service
    vllm.py        the same runs handed to vLLM's own OpenAI server
    server.py      main: name the runs, refuse an unsafe bind, run uvicorn (or exec vLLM)

Floors: engine, structured and chat know no HTTP; request, limits and service no FastAPI; only api
and server do. Nothing here imports training. Who may bind where (and the body cap both servers
use) is net.py's, shared with the ui.

The serve command's names (`from qlora_kit import serve; serve.Service(...)`) are looked up in
the module that defines them on first use, so importing the Engine for `generate`, `chat` or
`eval` does not load the HTTP server's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, for readers and type checkers
    from ..net import check_serve_bind as check_bind
    from .api import create_app
    from .limits import MAX_BODY
    from .request import BASE, ApiError, ChatRequest
    from .server import _bind, main, parse_runs
    from .service import ChatStream, Service
    from .vllm import RunInfo, run_infos, vllm_command, vllm_env

# name -> (module, its name there)
_WHERE = {
    "check_bind": ("..net", "check_serve_bind"),  # check_bind: the name serve's tests use
    "create_app": (".api", "create_app"),
    "MAX_BODY": (".limits", "MAX_BODY"),
    "BASE": (".request", "BASE"), "ApiError": (".request", "ApiError"), "ChatRequest": (".request", "ChatRequest"),
    "_bind": (".server", "_bind"), "main": (".server", "main"), "parse_runs": (".server", "parse_runs"),
    "ChatStream": (".service", "ChatStream"), "Service": (".service", "Service"),
    "RunInfo": (".vllm", "RunInfo"), "run_infos": (".vllm", "run_infos"), "vllm_command": (".vllm", "vllm_command"),
    "vllm_env": (".vllm", "vllm_env"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
