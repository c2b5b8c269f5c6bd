"""What a client may send: an OpenAI chat-completion body checked field by field.

Every refusal is an `ApiError` carrying the HTTP status and OpenAI's error body, so a client's
SDK reports it as it would OpenAI's own. Fields clients send but qlora-kit does not use
(penalties, logit_bias, top_logprobs) are still held to OpenAI's ranges, so a typo is not
silently taken. Which model a body names, and whether it fits the model, is `Service.parse`'s
part (service.py); how much it may ask for is limits.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BASE = "base"  # model id of the base model; reserved, no adapter may use it
MAX_STOP = 4  # OpenAI's limit on stop strings
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_SEED = 2**63 - 1  # torch.manual_seed takes an int64
JSON_TYPES = {bool: "boolean", str: "string", list: "array", dict: "object", float: "number", int: "integer"}


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request itself is wrong."""
    return ApiError(400, message, "invalid_request_error", param, code)


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


@dataclass
class Options:
    """The sampling and streaming fields of a body, checked."""

    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _kind(v) -> str:
    return JSON_TYPES.get(type(v), type(v).__name__)


def number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    # bool is an int in Python but not a number in JSON; inf/nan parse from JSON but mean nothing here
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"'{key}' must be a number, got {_kind(v)}", key, "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:  # int vs float compares exactly, so a 400-digit int is fine
        raise bad(f"'{key}' must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v}", key, "invalid_value")
    return float(v)


def integer(body: dict, key: str, default: int | None, lo: int, hi: int, message: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer, got {_kind(v)}", key, "invalid_type")
    if not lo <= v <= hi:
        raise bad(message or f"'{key}' must be between {lo} and {hi}, got {v}", key, "invalid_value")
    return v


def _logit_bias(body: dict) -> None:
    """Accepted and ignored (clients send {}), but checked as OpenAI checks it: token id -> -100..100."""
    lb = body.get("logit_bias")
    if lb is None:
        return
    if not isinstance(lb, dict):
        raise bad(f"'logit_bias' must be an object, got {_kind(lb)}", "logit_bias", "invalid_type")
    for tok, bias in lb.items():
        if not tok.isdigit():
            raise bad(f"'logit_bias' keys must be token ids, got {tok!r}", "logit_bias", "invalid_value")
        number({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0)


def _content(i: int, c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}",
                          f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def messages(body: dict) -> list[dict]:
    """The body's messages as {role, content} with text content, OpenAI's roles folded onto the
    template's (developer -> system); the last one must be the user's."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad(f"messages[{i}].role must be one of system, user, assistant; got {m.get('role')!r}",
                      f"messages[{i}].role")
        out.append({"role": role, "content": _content(i, m.get("content"))})
    if out[-1]["role"] != "user":
        raise bad("the last message must have role 'user'", "messages")
    return out


def options(body: dict) -> Options:
    """Sampling, stop strings and streaming, in the order OpenAI reports their mistakes."""
    temperature = number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    integer(body, "n", 1, 1, 1, "only n=1 is supported")
    seed = integer(body, "seed", None, 0, MAX_SEED)
    # accepted and ignored, but held to OpenAI's ranges so a typo is not silently taken
    for k in ("presence_penalty", "frequency_penalty"):
        number(body, k, 0.0, -2.0, 2.0)
    integer(body, "top_logprobs", None, 0, 20)
    _logit_bias(body)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) for x in stop):
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    if opts.get("include_usage") is not None and not isinstance(opts["include_usage"], bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
    return Options(temperature, top_p, seed, stop, bool(stream), bool(opts.get("include_usage")))
