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

The serve command's names are imported here (`from qlora_kit import serve; serve.Service(...)`);
`generate`, `chat` and `eval` import serve.engine, which loads the HTTP modules with them: a few
hundredths of a second (0.04-0.08 s measured) beside loading a model.
"""

from __future__ import annotations

from ..net import check_serve_bind as check_bind  # the name serve's tests use
from .api import create_app
from .limits import MAX_BODY
from .request import BASE, ApiError, ChatRequest
from .server import _bind, main, parse_runs
from .service import ChatStream, Service
from .vllm import RunInfo, run_infos, vllm_command, vllm_env

__all__ = ["BASE", "MAX_BODY", "ApiError", "ChatRequest", "ChatStream", "RunInfo", "Service", "_bind", "check_bind",
           "create_app", "main", "parse_runs", "run_infos", "vllm_command", "vllm_env"]
