"""OpenAI chat completions over one Engine, transport-free: the same code answers `qlora-kit serve`
(api.py puts HTTP around it) and the web UI's chat page (ui/chatting.py calls it directly).

`Service` takes a body (checked by request.py, bounded by limits.py), picks the adapter named by
`model` ("base": the base model with the adapter disabled), generates through `engine.Engine`
(one 4-bit base, each run's own stored chat template) and returns OpenAI objects
(`chat.completion`, `chat.completion.chunk`, `list` of models); `response_format` makes the
answer JSON matching a schema, enforced while decoding (structured.py). Mistakes raise
`ApiError`, which carries the HTTP status and OpenAI's error body.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from ..errors import UserError
from ..run import RunInfo as RunRecord  # run.json
from ..run import read_info
from . import limits
from .request import BASE, ApiError, ChatRequest, bad, messages, options

if TYPE_CHECKING:
    from .engine import Engine, Result

log = logging.getLogger("qlora_kit.serve")  # one logger for the whole server: server.main sends it to stderr


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
        self.context = limits.context_limit(engine.model)
        # per adapter (and the base, which renders with the first adapter's tokenizer): see parse()
        self._chars_per_token = {n: limits.chars_per_token(a.tokenizer) for n, a in engine.adapters.items()}
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
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if model is None or model == "":
            raise bad("you must provide a model parameter", "model", "missing_required_parameter")
        if not isinstance(model, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if model not in self._models:
            raise self._unknown(model)
        adapter = None if (model == BASE and self.engine.kind == "adapter") else model
        msgs = messages(body)
        cap = min(self.max_tokens_cap, self.context or self.max_tokens_cap)
        max_tokens, key = limits.max_tokens(body, cap, self.default_max_tokens)
        opts = options(body)
        constraint = self._response_format(body.get("response_format"), adapter)

        system = self.engine.system_prompt_for(adapter)  # none for the base model
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        # per adapter; the base renders with the first adapter's tokenizer (Engine.template_for)
        per = self._chars_per_token[adapter or next(iter(self._chars_per_token))]
        limits.refuse_by_chars(self.context, per, msgs, max_tokens, key)
        return ChatRequest(model, adapter, msgs, max_tokens, opts.temperature, opts.top_p, opts.seed, opts.stop,
                           opts.stream, opts.include_usage, max_tokens_param=key, constraint=constraint)

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
            raise bad(str(e), "response_format", "invalid_value") from None
        except UserError as e:
            raise bad(e.message, "response_format", "unsupported_value") from None
        return constraint

    def _measure(self, req: ChatRequest) -> None:
        """Render and count the prompt (template errors are a 400), refusing what does not fit."""
        from jinja2.exceptions import TemplateError

        try:
            req.prompt_ids = self.engine.prompt_ids(req.messages, req.adapter)
        except TemplateError as e:
            raise bad(f"the model's chat template refused these messages: {e}", "messages") from e
        req.prompt_tokens = int(req.prompt_ids.shape[1])
        limits.refuse_by_tokens(self.context, req.prompt_tokens, req.max_tokens, req.max_tokens_param)

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
