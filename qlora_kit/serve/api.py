"""The HTTP face of `qlora-kit serve`: FastAPI routes over a `Service` (service.py).

    GET  /health                   models, requests in flight, counts (no key needed)
    GET  /v1/models[/{id}]         OpenAI's model list / one model
    POST /v1/chat/completions      an answer, or with "stream": true server-sent events

With an API key, /v1/* needs `Authorization: Bearer KEY`. Every error, including unknown routes
and crashes, is answered with OpenAI's error body, so clients' SDKs report it as OpenAI's own.
Blocking work (parsing megabytes, tokenizing, generating) runs off the event loop in its own
threads, so /health and the 429 for a full queue answer at once while a long generation runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from typing import TYPE_CHECKING

# at module level: FastAPI resolves the (postponed) `request: Request` annotations from here
from starlette.requests import Request

from ..net import read_body
from .limits import MAX_BODY, too_large
from .request import ApiError, bad

if TYPE_CHECKING:
    import fastapi

    from .service import ChatStream, Service

log = logging.getLogger("qlora_kit.serve")


def create_app(service: Service, api_key: str | None = None) -> fastapi.FastAPI:
    """FastAPI app: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, GET /health.

    With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`. Every error, including
    unknown routes and crashes, has OpenAI's error body."""
    from fastapi import Depends, FastAPI

    from .. import __version__

    app = FastAPI(title="qlora-kit", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _openai_errors(app)
    auth = [Depends(_bearer(api_key))]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": service.model_ids, "inflight": service.inflight,
                "max_queue": service.max_queue, "requests": dict(service.stats)}

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return service.models()

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def get_model(model_id: str):
        return service.model(model_id)

    app.post("/v1/chat/completions", dependencies=auth)(_chat_completions(service))
    return app


# --- errors and auth ----------------------------------------------------------------------------------

def _reply(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _crash(request, exc: BaseException):
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _reply(ApiError(500, f"internal server error: {type(exc).__name__}", "server_error"))


def _openai_errors(app) -> None:
    """Every error the app can raise, answered with OpenAI's error body."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _reply(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return _reply(ApiError(404, f"Invalid URL ({where})", "invalid_request_error", None, "unknown_url"))
        if exc.status_code == 405:
            return _reply(ApiError(405, f"Method not allowed ({where})", "invalid_request_error", None,
                                   "method_not_allowed"))
        return _reply(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return _reply(bad(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _any_error(request, exc: Exception):
        return _crash(request, exc)


def _auth_error(message: str) -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def _bearer(api_key: str | None):
    """The dependency that checks `Authorization: Bearer KEY` (nothing to check without a key)."""
    key = api_key.encode("utf-8") if api_key else None

    def auth(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _auth_error("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
        if not hmac.compare_digest(token.strip().encode("utf-8"), key):
            raise _auth_error("Incorrect API key provided.")

    return auth


# --- chat completions ---------------------------------------------------------------------------------

def _chat_completions(service: Service):
    async def chat_completions(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise bad(f"Content-Type must be application/json, got {ctype or 'none'!r}", None, "invalid_content_type")
        service.refuse_if_full()
        raw = await read_body(request, MAX_BODY, lambda: too_large(MAX_BODY))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"We could not parse the JSON body of your request: {e}", None, "invalid_json") from e
        del raw
        req = await _in_thread(service.parse, body)  # walks megabytes of messages: keep it off the loop
        if req.stream:
            from fastapi.responses import StreamingResponse

            st = await _in_thread(service.stream, req)  # admits, then tokenizes the prompt
            return StreamingResponse(_sse_stream(st), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cancel = threading.Event()  # a client that gives up waiting should not cost a generation
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(lambda t: t.cancelled() or t.exception() or cancel.set())
        try:
            return await _in_thread(service.complete, req, cancel)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - answered as a 500 here, logged once
            return _crash(request, e)
        finally:
            gone.cancel()

    return chat_completions


async def _in_thread(fn, *args):
    """Run blocking code in its own thread: anyio's pool (40 threads) would cap the queue below
    max_queue and starve the other sync work behind long generations."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok, value):
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run():
        try:
            r, ok = fn(*args), True
        except BaseException as e:  # noqa: BLE001 - re-raised in the awaiting coroutine
            r, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, r)
        except RuntimeError:  # the loop is gone (server shut down); nobody is waiting
            pass

    threading.Thread(target=run, daemon=True, name="qlora-kit-request").start()
    return await fut


async def _disconnected(request) -> None:
    # the body has been read, so the next message is the disconnect (if the client goes away)
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _sse_stream(st: ChatStream):
    """Bridge the thread-side ChatStream to the event loop; closing it when the client leaves
    (this generator is cancelled or closed) stops the generation and frees the Engine."""
    loop = asyncio.get_running_loop()
    aq: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(aq.put_nowait, item)
        except RuntimeError:
            st.close()

    def pump():
        try:
            for chunk in st:
                put(("chunk", chunk))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            put(("error", e))
        put(("end", None))

    threading.Thread(target=pump, daemon=True, name="qlora-kit-sse").start()
    try:
        while True:
            kind, x = await aq.get()
            if kind == "chunk":
                yield _sse(x)
            elif kind == "error":
                log.error("stream %s failed", st.id, exc_info=x)
                err = x if isinstance(x, ApiError) else ApiError(500, f"internal server error: {type(x).__name__}", "server_error")
                yield _sse(err.body())
                return
            else:
                yield b"data: [DONE]\n\n"
                return
    finally:
        st.close()

