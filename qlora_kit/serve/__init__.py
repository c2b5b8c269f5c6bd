"""`qlora-kit serve`: an OpenAI-compatible HTTP API over the shared inference Engine.

Two layers, so the local web UI reuses the same code instead of copying it:

- `Service`: transport-free. Validates OpenAI chat-completion bodies, picks the adapter named by
  `model` ("base": the base model with the adapter disabled), generates through
  `generate.Engine` (one 4-bit base, each run's own stored chat template) and returns OpenAI
  objects (`chat.completion`, `chat.completion.chunk`, `list` of models); `response_format` makes
  the answer JSON matching a schema, enforced while decoding (structured.py). Mistakes raise
  `ApiError`, which carries the HTTP status and OpenAI's error body.
- `create_app`: FastAPI routes over a Service (/v1/models, /v1/chat/completions with SSE
  streaming, /health), bearer-key auth, OpenAI-style errors for everything.

`main` loads the runs and runs uvicorn, or hands the same runs to vLLM's own OpenAI server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

# at module level: FastAPI resolves the (postponed) `request: Request` annotations from here
from starlette.requests import Request

from .. import rundir
from ..errors import UserError
from ..run import RunInfo as RunRecord  # run.json; RunInfo below is what vLLM is started with
from ..run import default_name, read_info, resolve
from ..net import check_serve_bind as check_bind  # check_bind: the name serve's main and its tests use
from ..net import read_body

if TYPE_CHECKING:
    import fastapi

    from .engine import Engine, Result

log = logging.getLogger("qlora_kit.serve")

BASE = "base"  # model id of the base model; reserved, no adapter may use it
MAX_STOP = 4  # OpenAI's limit on stop strings
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_BODY = 8 << 20
MAX_SEED = 2**63 - 1  # torch.manual_seed takes an int64


# --- errors -----------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# --- the service --------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    """A validated chat-completion request, ready for the Engine."""

    model: str
    adapter: str | None  # None: the base model
    messages: list[dict]  # with the run's stored system prompt inserted when the client sent none
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: int = 0  # counted after admission (Service._admit): tokenizing is the costly part
    prompt_ids: object = None  # the tokenized prompt (Engine.prompt_ids), handed to the Engine: tokenized once
    max_tokens_param: str = "max_tokens"  # or max_completion_tokens: the field an error names
    constraint: object = None  # structured.Constraint from response_format: JSON (matching a schema) only


JSON_TYPES = {bool: "boolean", str: "string", list: "array", dict: "object", float: "number", int: "integer"}


def _kind(v) -> str:
    return JSON_TYPES.get(type(v), type(v).__name__)


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    # bool is an int in Python but not a number in JSON; inf/nan parse from JSON but mean nothing here
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(f"'{key}' must be a number, got {_kind(v)}", key, "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:  # int vs float compares exactly, so a 400-digit int is fine
        raise _bad(f"'{key}' must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v}", key, "invalid_value")
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int, message: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{key}' must be an integer, got {_kind(v)}", key, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(message or f"'{key}' must be between {lo} and {hi}, got {v}", key, "invalid_value")
    return v


def _logit_bias(body: dict) -> None:
    """Accepted and ignored (clients send {}), but checked as OpenAI checks it: token id -> -100..100."""
    lb = body.get("logit_bias")
    if lb is None:
        return
    if not isinstance(lb, dict):
        raise _bad(f"'logit_bias' must be an object, got {_kind(lb)}", "logit_bias", "invalid_type")
    for tok, bias in lb.items():
        if not tok.isdigit():
            raise _bad(f"'logit_bias' keys must be token ids, got {tok!r}", "logit_bias", "invalid_value")
        _number({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0)


def _context_limit(model) -> int | None:
    """The model's context length in tokens, if its config states one."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token can cover, so a prompt's length in characters
    bounds its token count from below without tokenizing it.

    A token covers at most as many characters as its vocabulary entry has (byte-level entries spell
    one character per byte, SentencePiece's and byte-fallback entries over-count). x4: Unicode
    normalization (NFC in Qwen's tokenizer) folds at most four code points into one. The floor
    keeps small vocabularies generous too. Only a normalizer that deletes characters outright
    could beat it; chat models' tokenizers do not."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    return 4 * max(longest, 16)


def _content(i: int, c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}",
                           f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise _bad(f"messages[{i}].role must be one of system, user, assistant; got {m.get('role')!r}",
                       f"messages[{i}].role")
        out.append({"role": role, "content": _content(i, m.get("content"))})
    if out[-1]["role"] != "user":
        raise _bad("the last message must have role 'user'", "messages")
    return out


class ChatStream(Iterator[dict]):
    """`chat.completion.chunk` dicts of one streamed answer, generated in a worker thread.

    The worker starts at once, so the request waits for the Engine from the moment it is
    accepted, not from when the reader first asks for a chunk. `close()`
    (also on garbage collection) cancels the generation at its next token and frees the Engine;
    it may be called from any thread, also while another thread waits in `__next__`.
    """

    def __init__(self, service: Service, req: ChatRequest):
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.request = req
        self.result: Result | None = None
        self._q: queue.Queue = queue.Queue()  # unbounded: the worker never blocks on a slow reader
        self._cancel = threading.Event()
        self._state = "role"
        # the worker holds no reference to self, so an abandoned stream is collected and cancels
        threading.Thread(target=_stream_worker, args=(service, req, self._q, self._cancel),
                         name=f"qlora-kit-stream-{self.id[-6:]}", daemon=True).start()

    def _chunk(self, delta: dict, finish_reason: str | None = None, choices: bool = True) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.request.model,
             "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else []}
        if self.request.include_usage:
            c["usage"] = None
        return c

    def __next__(self) -> dict:
        if self._state == "role":
            self._state = "body"
            return self._chunk({"role": "assistant", "content": ""})
        if self._state == "usage":
            self._state = "done"
            c = self._chunk({}, choices=False)
            c["usage"] = _usage(self.result)
            return c
        if self._state == "done":
            raise StopIteration
        kind, x = self._q.get()
        if kind == "text":
            return self._chunk({"content": x})
        if kind == "closed":
            self._state = "done"
            raise StopIteration
        if kind == "error":
            self._state = "done"
            raise x
        self.result = x
        self._state = "usage" if self.request.include_usage else "done"
        return self._chunk({}, _finish(x))

    def close(self) -> None:
        self._cancel.set()
        self._q.put(("closed", None))

    def __del__(self):
        try:
            self._cancel.set()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown; nothing left to cancel
            pass


def _stream_worker(service: Service, req: ChatRequest, q: queue.Queue, cancel: threading.Event) -> None:
    try:
        res = service._generate(req, on_text=lambda t: q.put(("text", t)), cancel=cancel)
        q.put(("end", res))
    except BaseException as e:  # noqa: BLE001 - handed to the reader, who re-raises it
        q.put(("error", e))


def _finish(res: Result) -> str:
    return "length" if res.finish_reason == "length" else "stop"


def _usage(res: Result | None) -> dict:
    p, c = (res.prompt_tokens, res.new_tokens) if res else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _epoch(iso: str | None, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else default
    except ValueError:
        return default


class Service:
    """OpenAI chat completions over one Engine; safe to call from many threads at once.

    At most one generation runs (the Engine's lock); up to `max_queue` more wait for it, beyond
    that requests are refused with 429 so a flood cannot pile up unbounded threads and memory.
    """

    def __init__(self, engine: Engine, default_max_tokens: int = 256, *, max_queue: int = 64,
                 max_tokens_cap: int = 4096):
        if engine.kind == "adapter" and BASE in engine.adapters:
            raise UserError(f"an adapter may not be named '{BASE}': that id means the base model",
                            "give it another name with NAME=RUN_DIR")
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self.max_tokens_cap = max(max_tokens_cap, default_max_tokens)
        self.max_queue = max_queue
        self.context = _context_limit(engine.model)
        # per adapter (and the base, which renders with the first adapter's tokenizer): see parse()
        self._chars_per_token = {n: _chars_per_token(a.tokenizer) for n, a in engine.adapters.items()}
        self._inflight = 0
        self._count_lock = threading.Lock()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._models = self._describe()

    # --- models

    def _describe(self) -> dict[str, dict]:
        now = int(time.time())
        out: dict[str, dict] = {}
        first = None
        for name, a in self.engine.adapters.items():
            info = read_info(a.run_dir) if a.run_dir is not None else RunRecord()
            out[name] = {"id": name, "object": "model", "created": _epoch(info.finished or info.started, now),
                         "owned_by": "qlora-kit", "kind": self.engine.kind,
                         "run_dir": str(a.run_dir) if a.run_dir is not None else None,
                         "base_model": info.base_model, "system_prompt": a.system_prompt}
            first = first or out[name]
        if self.engine.kind == "adapter":
            out[BASE] = {"id": BASE, "object": "model", "created": first["created"], "owned_by": "qlora-kit",
                         "kind": "base", "run_dir": None, "base_model": first["base_model"],
                         "system_prompt": self.engine.system_prompt_for(None)}
        return out

    @property
    def model_ids(self) -> list[str]:
        return list(self._models)

    def models(self) -> dict:
        return {"object": "list", "data": [dict(m) for m in self._models.values()]}

    def model(self, model_id: str) -> dict:
        if model_id not in self._models:
            raise self._unknown(model_id)
        return dict(self._models[model_id])

    def _unknown(self, model_id) -> ApiError:
        return ApiError(404, f"The model '{model_id}' does not exist; loaded: {', '.join(self._models)}",
                        "invalid_request_error", "model", "model_not_found")

    # --- validation

    def parse(self, body: dict) -> ChatRequest:
        """Validate an OpenAI chat-completion body; unknown fields are ignored (clients send many)."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if model is None or model == "":
            raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        if model not in self._models:
            raise self._unknown(model)
        adapter = None if (model == BASE and self.engine.kind == "adapter") else model
        msgs = _messages(body)

        cap = min(self.max_tokens_cap, self.context or self.max_tokens_cap)
        lengths = {k: _integer(body, k, None, 1, cap) for k in ("max_tokens", "max_completion_tokens")}
        key = "max_completion_tokens" if lengths["max_completion_tokens"] is not None else "max_tokens"
        max_tokens = lengths[key] or min(self.default_max_tokens, cap)

        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        _integer(body, "n", 1, 1, 1, "only n=1 is supported")
        seed = _integer(body, "seed", None, 0, MAX_SEED)
        # accepted and ignored, but held to OpenAI's ranges so a typo is not silently taken
        for k in ("presence_penalty", "frequency_penalty"):
            _number(body, k, 0.0, -2.0, 2.0)
        _integer(body, "top_logprobs", None, 0, 20)
        _logit_bias(body)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) for x in stop):
            raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream", "invalid_type")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if opts.get("include_usage") is not None and not isinstance(opts["include_usage"], bool):
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
        constraint = self._response_format(body.get("response_format"), adapter)

        system = self.engine.system_prompt_for(adapter)  # none for the base model
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        self._check_chars(adapter, msgs, max_tokens, key)
        return ChatRequest(model, adapter, msgs, max_tokens, temperature, top_p, seed, stop, bool(stream),
                           bool(opts.get("include_usage")), max_tokens_param=key, constraint=constraint)

    def _response_format(self, rf, adapter: str | None):
        """OpenAI's response_format as a structured.Constraint (None: free text); 400 naming it when the
        type is unknown, the schema invalid or not compilable, or the model's tokenizer unsupported."""
        if rf is None:
            return None
        from . import structured

        try:
            constraint = structured.from_response_format(rf)
            if constraint is not None:  # built once per tokenizer; refused here, not mid-generation
                a = self.engine.template_for(adapter)
                structured.vocab(a.tokenizer, a.stop_ids)
        except ValueError as e:
            raise _bad(str(e), "response_format", "invalid_value") from None
        except UserError as e:
            raise _bad(e.message, "response_format", "unsupported_value") from None
        return constraint

    def _check_chars(self, adapter: str | None, msgs: list[dict], max_tokens: int, key: str) -> None:
        """Refuse, without tokenizing, a prompt too long in characters to fit the context in tokens.

        Tokenizing a prompt of megabytes takes seconds and gigabytes; a character count bounds
        the token count from below (see _chars_per_token), so what this refuses, tokenizing would
        refuse too. What passes is counted exactly once admitted (_measure)."""
        if not self.context:
            return
        chars = sum(len(m["content"]) for m in msgs)
        per = self._chars_per_token[adapter or next(iter(self._chars_per_token))]
        at_least = -(-chars // per)
        if at_least + max_tokens > self.context:
            raise _bad(f"This model's maximum context length is {self.context} tokens; the messages have {chars} "
                       f"characters, at least {at_least} tokens (at most {per} characters per token), and {key} "
                       f"asks for {max_tokens} more", "messages", "context_length_exceeded")

    def _measure(self, req: ChatRequest) -> None:
        """Render and count the prompt (template errors are a 400), refusing what does not fit."""
        from jinja2.exceptions import TemplateError

        try:
            req.prompt_ids = self.engine.prompt_ids(req.messages, req.adapter)
        except TemplateError as e:
            raise _bad(f"the model's chat template refused these messages: {e}", "messages") from e
        req.prompt_tokens = int(req.prompt_ids.shape[1])
        if self.context and req.prompt_tokens + req.max_tokens > self.context:
            raise _bad(f"This model's maximum context length is {self.context} tokens; the messages take "
                       f"{req.prompt_tokens} and {req.max_tokens_param} asks for {req.max_tokens} more", "messages",
                       "context_length_exceeded")

    # --- admission

    def _check_room(self) -> None:
        # caller holds _count_lock
        if self._inflight > self.max_queue:  # one running + max_queue waiting
            self.stats["rejected"] += 1
            raise ApiError(429, f"the server is busy: {self._inflight - 1} requests are already waiting; retry later",
                           "rate_limit_error", None, "server_busy", {"Retry-After": "1"})

    def refuse_if_full(self) -> None:
        """429 at once when no slot is free, before a body is even read: a flood costs nothing.
        Takes no slot; `_enter` checks again when the request is parsed."""
        with self._count_lock:
            self._check_room()

    def _enter(self) -> None:
        with self._count_lock:
            self._check_room()
            self._inflight += 1

    def _leave(self, outcome: str | None) -> None:
        with self._count_lock:
            self._inflight -= 1
            if outcome:
                self.stats[outcome] += 1

    def _admit(self, req: ChatRequest) -> None:
        """Take a slot (or 429), then tokenize: a flood is refused before it costs any tokenizing."""
        self._enter()
        try:
            self._measure(req)
        except BaseException:
            self._leave(None)  # a request refused with 400, not a failed generation
            raise

    @property
    def inflight(self) -> int:
        """Requests admitted and not finished: the one generating plus those waiting."""
        return self._inflight

    # --- generation

    def _generate(self, req: ChatRequest, on_text=None, cancel: threading.Event | None = None) -> Result:
        """Generate for an admitted request and release its slot, whatever happens."""
        outcome = "failed"
        try:
            res = self.engine.generate(req.messages, req.max_tokens, on_text, adapter=req.adapter,
                                       temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                                       cancel=cancel, constraint=req.constraint, prompt_ids=req.prompt_ids)
            outcome = "cancelled" if res.finish_reason == "cancelled" else "completed"
            log.info("%s%s: %d prompt + %d new tokens in %.2f s (%s)", req.model, " (stream)" if on_text else "",
                     res.prompt_tokens, res.new_tokens, res.seconds, res.finish_reason)
            return res
        finally:
            self._leave(outcome)

    def complete(self, body: dict | ChatRequest, cancel: threading.Event | None = None) -> dict:
        """A `chat.completion` object. Blocks while earlier requests generate."""
        req = body if isinstance(body, ChatRequest) else self.parse(body)
        self._admit(req)
        res = self._generate(req, cancel=cancel)
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text}, "logprobs": None,
                             "finish_reason": _finish(res)}],
                "usage": _usage(res)}

    def stream(self, body: dict | ChatRequest) -> ChatStream:
        """`chat.completion.chunk` dicts: a role delta, content deltas, one with finish_reason, and
        a usage chunk if `stream_options.include_usage`. Validation, the 429 and the prompt's
        tokenizing happen here, before the first chunk (so call it off the event loop); close() the
        stream when the reader goes away."""
        req = body if isinstance(body, ChatRequest) else self.parse(body)
        self._admit(req)
        try:
            return ChatStream(self, req)
        except BaseException:
            self._leave("failed")
            raise


# --- HTTP ------------------------------------------------------------------------------------------------

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


def _too_large(limit: int) -> ApiError:
    # close the connection: otherwise the server would go on receiving (and discarding) the rest
    return ApiError(413, f"the request body is larger than {limit >> 20} MiB", "invalid_request_error", None,
                    "request_too_large", {"Connection": "close"})


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


def _auth_error(message: str) -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def create_app(service: Service, api_key: str | None = None) -> fastapi.FastAPI:
    """FastAPI app: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, GET /health.

    With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`. Every error, including
    unknown routes and crashes, has OpenAI's error body."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from .. import __version__

    app = FastAPI(title="qlora-kit", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    key = api_key.encode("utf-8") if api_key else None

    def reply(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def crash(request, exc: BaseException) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return reply(ApiError(500, f"internal server error: {type(exc).__name__}", "server_error"))

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return reply(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return reply(ApiError(404, f"Invalid URL ({where})", "invalid_request_error", None, "unknown_url"))
        if exc.status_code == 405:
            return reply(ApiError(405, f"Method not allowed ({where})", "invalid_request_error", None, "method_not_allowed"))
        return reply(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return reply(_bad(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return crash(request, exc)

    def auth(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _auth_error("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
        if not hmac.compare_digest(token.strip().encode("utf-8"), key):
            raise _auth_error("Incorrect API key provided.")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": service.model_ids, "inflight": service.inflight,
                "max_queue": service.max_queue, "requests": dict(service.stats)}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return service.models()

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def get_model(model_id: str):
        return service.model(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _bad(f"Content-Type must be application/json, got {ctype or 'none'!r}", None, "invalid_content_type")
        service.refuse_if_full()
        raw = await read_body(request, MAX_BODY, lambda: _too_large(MAX_BODY))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"We could not parse the JSON body of your request: {e}", None, "invalid_json") from e
        del raw
        req = await _in_thread(service.parse, body)  # walks megabytes of messages: keep it off the loop
        if req.stream:
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
            return crash(request, e)
        finally:
            gone.cancel()

    return app


# --- command line ------------------------------------------------------------------------------------------

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


@dataclass
class RunInfo:
    name: str
    run_dir: Path
    adapter_dir: Path
    base_model: str
    base_model_path: str
    rank: int
    modules_to_save: list[str]
    chat_template: str | None = None


def _template(tok_dir: Path) -> str | None:
    f = tok_dir / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = tok_dir / "tokenizer_config.json"
    return json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None


def run_infos(runs: dict[str, Path]) -> list[RunInfo]:
    out = []
    for name, p in runs.items():
        p, adir = resolve(p)  # RUN, or RUN/checkpoints/checkpoint-N with its adapter
        info = read_info(p)
        cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
        out.append(RunInfo(name, p, adir, info.base_model, info.base_model_path, int(cfg.get("r") or 8),
                           list(cfg.get("modules_to_save") or []), _template(p / rundir.TOKENIZER)))
    return out


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank accepts only these


def vllm_command(runs_info: list[RunInfo], host: str, port: int, api_key: str | None) -> list[str]:
    """argv for vLLM's OpenAI server: the runs' shared base, each adapter as a LoRA module.

    `api_key` never goes into argv (any local user can read a process's argv): `vllm_env(api_key)`
    passes it as VLLM_API_KEY, which vLLM's server reads like --api-key."""
    if not runs_info:
        raise UserError("nothing to serve", "pass one or more run directories")
    first = runs_info[0]
    for r in runs_info:
        if r.base_model_path != first.base_model_path:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) was trained on {r.base_model}, not on {first.base_model}",
                            "adapters served together must share their base model")
        if r.chat_template != first.chat_template:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) was trained with another chat template than "
                            f"'{first.name}', and vLLM renders every adapter with one",
                            "serve them with --engine hf (each adapter keeps its template), or separately")
        if r.modules_to_save:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) also trains whole modules ({', '.join(r.modules_to_save)}), "
                            "which vLLM's LoRA support cannot load", "serve it with --engine hf, or merge it first")
    rank = max(r.rank for r in runs_info)
    max_rank = next((x for x in VLLM_RANKS if x >= rank), rank)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", first.base_model_path, "--served-model-name", BASE,
            # every run stores the tokenizer with the exact template it was trained with
            "--tokenizer", str(first.run_dir / rundir.TOKENIZER),
            # the adapters were trained against the NF4-quantized base, not the bf16 original
            "--quantization", "bitsandbytes",
            "--host", host, "--port", str(port),
            "--enable-lora", "--max-loras", str(len(runs_info)), "--max-lora-rank", str(max_rank),
            "--lora-modules", *[f"{r.name}={r.adapter_dir}" for r in runs_info]]
    return argv


def vllm_env(api_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def _check_vllm() -> None:
    hint = "pip install vllm (Linux with an NVIDIA GPU), or use --engine hf"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # any failure to import means it cannot run here
        raise UserError(f"--engine vllm needs vLLM on a CUDA machine (import vllm failed: {e})", hint) from e
    import torch

    if not torch.cuda.is_available():
        raise UserError("--engine vllm needs vLLM on a CUDA machine (no CUDA device found)", hint)


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


def main(runs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, engine: str = "hf",
         max_tokens: int = 256, max_queue: int = 64, grants=None) -> None:
    """Serve the runs (RUN_DIR or NAME=RUN_DIR) over an OpenAI-compatible API until interrupted.
    `grants` (recipe.Grants): this command's --trust-remote-code/--allow-pickle; the runs grant nothing."""
    from ..recipe import Grants

    grants = grants or Grants()
    check_bind(host, api_key)  # before anything is loaded or bound
    named = parse_runs(runs)
    if engine == "vllm":
        _check_vllm()
        infos = run_infos(named)
        if infos:  # vLLM loads the base itself: the same refusals first, in qlora-kit's words
            from ..model import refuse_unsafe

            refuse_unsafe(infos[0].base_model_path, grants.trust_remote_code, grants.allow_pickle)
        argv = vllm_command(infos, host, port, api_key) + ["--trust-remote-code"] * grants.trust_remote_code
        print(f"starting vLLM for {', '.join([*named, BASE])} at {_url(host, port)}", file=sys.stderr)
        os.execvpe(argv[0], argv, vllm_env(api_key))
    if engine != "hf":
        raise UserError(f"unknown engine {engine!r}", "use --engine hf or --engine vllm")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")

    import uvicorn

    from . import engine as generate

    # one line per answered request on stderr; uvicorn's own access log stays off
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    service = Service(generate.Engine.from_runs(named, grants), max_tokens, max_queue=max_queue)
    app = create_app(service, api_key)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    print(f"serving {', '.join(service.model_ids)} at {_url(host, bound)}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    # uvicorn.run() with our own socket: it is bound before the URL is printed, and port 0 works
    uvicorn.Server(config).run(sockets=[sock])
