"""Structured output: answers that are JSON (any object, or one JSON Schema), enforced while decoding.

llguidance compiles the schema into a grammar and, before every token, says which tokens may come
next; `JsonProcessor` (a transformers logits processor) masks the rest. llguidance works on the
bytes each token spells, so byte-level BPE vocabularies (Qwen, Llama 3, the built-in tiny model)
and SentencePiece vocabularies with byte fallback (Llama 2, Mistral, stories260K, whose `{` and
`}` exist only as the byte tokens <0x7B>/<0x7D>) are handled alike. It needs the model's fast
tokenizer (tokenizer.json); a model without one is refused with a message.

Compact JSON: no whitespace at all (`{"a":1,"b":null}`), so a weak model has no free spaces and
newlines to spend its budget on.

The budget: an object cut off by max_tokens does not parse. So the processor keeps, at every
step, the shortest way it knows to finish the JSON from where the answer is (forced text, closing
the open string and brackets, the smallest values the schema allows for required fields not yet
written). Near the end of the budget the model may only choose tokens after which that still fits;
when none of its likely choices does, the processor writes the finish itself. An answer that
cannot be finished in time at all (max_tokens below what the schema needs) ends with
finish_reason "length", as OpenAI's API reports it. Bounded strings (maxLength) and enums in a
schema keep the finish short and the answers useful.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# no whitespace anywhere: the separators are fixed, the model has nothing to wander in
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT = {"type": "object"}
DANGER = 16  # steps before the budget ends (beyond the finish itself) when the model's choices are checked
TOP_K = 8  # how many of the model's likeliest tokens are checked there
RECHECK = 8  # far from the end, the finish is looked for again every this many steps


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled JSON constraint: the schema (for validating answers) and llguidance's grammar."""

    name: str
    schema: dict
    grammar: str
    _min_tokens: dict = field(default_factory=dict, repr=False)

    def processor(self, tokenizer, stop_ids: list[int], max_new_tokens: int, sample: bool = True) -> JsonProcessor:
        """`sample` False (greedy decoding): near the end only the likeliest fitting token is looked for."""
        return JsonProcessor(vocab(tokenizer, stop_ids), self.grammar, max_new_tokens, sample)

    def min_tokens(self, tokenizer, stop_ids: list[int]) -> int | None:
        """Tokens the shortest answer this processor knows takes (None: it found none): the least
        max_tokens that gives a complete answer."""
        key = (id(tokenizer), tuple(stop_ids))
        if key not in self._min_tokens:
            p = self.processor(tokenizer, stop_ids, 1 << 20)
            path = p.finish(p.matcher, _Lex(), 1 << 12)
            self._min_tokens[key] = None if path is None else len(path)
        return self._min_tokens[key]

    def problem(self, text: str) -> str | None:
        """Why `text` is not one JSON value matching the schema (None: it is)."""
        try:
            value = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        errors = sorted(_validator(self.schema).iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            where = "/".join(str(x) for x in e.absolute_path) or "(the answer)"
            return f"{where}: {e.message}"
        return None


def _validator(schema: dict):
    from jsonschema.validators import validator_for

    return validator_for(schema)(schema)


def compile_schema(schema, name: str = "schema") -> Constraint:
    """A Constraint for a JSON Schema (a dict); ValueError saying what is wrong with it."""
    import llguidance
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON Schema is an object, got {type(schema).__name__}")
    try:
        _validator(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(x) for x in e.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {e.message}") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except ValueError as e:
        raise ValueError(f"the schema cannot be compiled: {e}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(f"the schema cannot be used for constrained decoding: {'; '.join(messages)}")
    return Constraint(name, schema, grammar)


def json_object() -> Constraint:
    """OpenAI's {"type": "json_object"}: any JSON object."""
    return compile_schema(ANY_OBJECT, "json_object")


def load(path: str | Path, origin: str = "--json-schema") -> Constraint:
    """A JSON Schema file; mistakes are UserErrors naming the file (and line), `origin` says who named it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{origin} {p}: no such file", "pass a JSON Schema file, e.g. recipes/finance.schema.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{origin} {p}: cannot read it ({e})", "pass a readable UTF-8 JSON Schema file") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}", "fix the JSON Schema file") from None
    try:
        return compile_schema(schema, p.stem)
    except ValueError as e:
        raise UserError(f"{p}: {e}", "see the JSON Schema keywords llguidance supports (type, properties, required, "
                                     "enum, anyOf, maxLength, pattern, minimum/maximum, items, $ref ...)") from None


def from_response_format(rf) -> Constraint | None:
    """OpenAI's `response_format` -> a Constraint (None for {"type": "text"}); ValueError naming the field."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ValueError("'response_format' must be an object like {\"type\": \"json_object\"}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise ValueError(f"'response_format.type' must be one of text, json_object, json_schema; got {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise ValueError("'response_format.json_schema' must be an object with 'name' and 'schema'")
    name = js.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        raise ValueError("'response_format.json_schema.name' must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise ValueError("'response_format.json_schema.strict' must be a boolean")
    schema = js.get("schema", ANY_OBJECT)
    try:
        return compile_schema(schema, name)
    except ValueError as e:
        raise ValueError(f"'response_format.json_schema.schema': {e}") from None


# --- the tokenizer as llguidance sees it -------------------------------------------------------------

_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def vocab(tokenizer, stop_ids: list[int]) -> _Vocab:
    """The llguidance view of a tokenizer, built once per tokenizer and end-token set (~1 s for 150k tokens)."""
    with _VOCABS_LOCK:
        per = _VOCABS.setdefault(tokenizer, {})
        key = tuple(stop_ids)
        if key not in per:
            per[key] = _Vocab(tokenizer, list(stop_ids))
        return per[key]


class _Vocab:
    # the cheap ways on, by where the answer is (see _Lex): close a string; write the smallest value;
    # close a bracket or go on to the next (forced) key
    IN_STRING = ('"',)
    VALUE = ("null", "0", "false", '""', "[]", "{}")
    AFTER_VALUE = ("}", "]", ",")

    def __init__(self, tokenizer, stop_ids: list[int]):
        import llguidance.hf

        try:
            self.tok = llguidance.hf.from_tokenizer(tokenizer, eos_token=stop_ids or None)
        except ValueError as e:
            raise UserError(f"structured output needs the model's fast tokenizer (tokenizer.json): {e}",
                            "save the model with a tokenizer.json (transformers' fast tokenizer)") from None
        self.n = self.tok.vocab_size
        self.stops = list(stop_ids)
        # greedy_tokenize works on bytes, without the tokenizer's normalizer (no SentencePiece '▁' prefix)
        self.cheap = {k: [self.tok.greedy_tokenize(s) for s in v]
                      for k, v in (("str", self.IN_STRING), ("value", self.VALUE), ("after", self.AFTER_VALUE))}
        self._lengths = None
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, t: int) -> bytes:
        b = self._bytes.get(t)
        if b is None:
            b = self._bytes[t] = self.tok.decode_bytes([t])
        return b

    def allowed(self, matcher):
        """Boolean numpy array over the vocabulary: what the grammar allows next."""
        import numpy as np

        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[: self.n].astype(bool)

    def longest(self, allowed) -> int | None:
        """The allowed token spelling the most bytes (fewest steps through a pattern or an enum)."""
        import numpy as np

        if self._lengths is None:
            lengths = np.array([len(self.tok.decode_bytes([i])) for i in range(self.n)], dtype=np.int64)
            lengths[[s for s in self.stops if s < self.n]] = -1
            self._lengths = lengths
        scores = np.where(allowed, self._lengths, -1)
        best = int(scores.argmax())
        return best if scores[best] > 0 else None


class _Lex:
    """Where a (partial) JSON text is, from its bytes: inside a string, at a value, after one."""

    __slots__ = ("in_str", "esc", "stack", "last")

    def __init__(self):
        self.in_str, self.esc, self.stack, self.last = False, False, [], None

    def copy(self) -> _Lex:
        c = _Lex()
        c.in_str, c.esc, c.stack, c.last = self.in_str, self.esc, list(self.stack), self.last
        return c

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif b == 0x5C:  # backslash
                    self.esc = True
                elif b == 0x22:
                    self.in_str, self.last = False, b
            elif b == 0x22:
                self.in_str = True
            elif b in (0x7B, 0x5B):  # { [
                self.stack.append(b)
                self.last = b
            elif b in (0x7D, 0x5D):
                if self.stack:
                    self.stack.pop()
                self.last = b
            elif b > 0x20:
                self.last = b

    @property
    def where(self) -> str:
        if self.in_str:
            return "str"
        if self.last in (None, 0x3A, 0x5B) or (self.last == 0x2C and self.stack and self.stack[-1] == 0x5B):
            return "value"  # start, after ':', after '[', after ',' in an array
        return "after"


class JsonProcessor:
    """transformers LogitsProcessor for one generation (batch of one): only tokens the grammar
    allows, and the JSON finished within max_new_tokens whenever the schema makes that possible."""

    def __init__(self, v: _Vocab, grammar: str, max_new_tokens: int, sample: bool = True):
        import llguidance

        self.v = v
        self.matcher = llguidance.LLMatcher(v.tok, grammar, log_level=0)  # refusals are expected here: no stderr noise
        if self.matcher.is_error():
            raise ValueError(f"structured output: {self.matcher.get_error()}")
        self.max_new, self.sample = max_new_tokens, sample
        self.lex = _Lex()
        self.start: int | None = None
        self.forced: list[int] = []
        self.path: list[int] | None = None  # the current shortest finish (see finish), found at path_step
        self.path_step = 0
        self.hopeless = False
        self.seconds = 0.0  # time spent here, for the overhead measurement

    # --- the shortest finish from a state

    def finish(self, matcher, lex: _Lex, limit: int) -> list[int] | None:
        """Tokens that complete the JSON from `matcher`'s state (not the end token), or None when
        more than `limit` would be needed."""
        m, lex, out = matcher.deep_copy(), lex.copy(), []
        while not m.is_accepting():
            if len(out) >= limit or m.is_error():
                return None
            seq = m.compute_ff_tokens()  # text the grammar forces (a key name, the rest of an enum value)
            if not seq:
                seq = next((s for s in self.v.cheap[lex.where] if s and m.validate_tokens(s) == len(s)), None)
            if not seq:
                t = self.v.longest(self.v.allowed(m))
                if t is None:
                    return None
                seq = [t]
            if not m.consume_tokens(seq):
                return None
            out += seq
            for t in seq:
                lex.feed(self.v.bytes_of(t))
        return out

    # --- the processor

    def __call__(self, input_ids, scores):
        import time

        t0 = time.perf_counter()
        try:
            return self._step(input_ids, scores)
        finally:
            self.seconds += time.perf_counter() - t0

    def _step(self, input_ids, scores):
        import torch

        if input_ids.shape[0] != 1:
            raise ValueError("structured output decodes one sequence at a time")
        n = int(input_ids.shape[1])
        last = None
        if self.start is None:
            self.start = n
        else:
            last = int(input_ids[0, -1])
            if not self.matcher.consume_token(last):
                raise RuntimeError(f"structured output: token {last} was not allowed ({self.matcher.get_error()})")
            self.lex.feed(self.v.bytes_of(last))
        left = self.max_new - (n - self.start)  # tokens still to come, this one included
        if self.forced:
            return _only(scores, [self.forced.pop(0)])
        allowed = torch.from_numpy(self.v.allowed(self.matcher))
        masked = _apply(scores, allowed)
        if self.matcher.is_accepting():  # complete: the grammar allows only the end token now
            return masked
        step = n - self.start
        if self.hopeless:
            return masked  # no finish fits the budget: the answer ends with finish_reason "length"
        if self.path is not None and step - self.path_step < RECHECK and len(self.path) + 1 + 2 * DANGER < left:
            return masked  # far from the end: the finish found a few steps ago leaves plenty of room
        self.path, self.path_step = self._finish_from(self.matcher, self.lex, last, left), step
        if self.path is None:  # the budget only shrinks from here: stop looking
            self.hopeless = True
            return masked
        if len(self.path) + 1 + DANGER < left:
            return masked
        keep = self._fitting(masked, left)
        if keep:
            return _only(scores, keep)
        self.forced = self.path[1:]  # none of the model's likely choices leaves room: write the finish
        return _only(scores, self.path[:1])

    def _finish_from(self, matcher, lex: _Lex, token: int | None, limit: int) -> list[int] | None:
        """The finish after `token`: the previous one when it still completes the JSON (the common case,
        e.g. one more character inside a string: ~20 us), else a new one (~0.5 ms)."""
        old = self.path
        if old:
            rest = old[1:] if token == old[0] else old
            if _completes(matcher, rest):
                return rest
        return self.finish(matcher, lex, limit)

    def _fitting(self, masked, left: int) -> list[int]:
        """Of the model's likeliest allowed tokens, those after which the JSON and its end token still fit."""
        import torch

        top = torch.topk(masked[0], min(TOP_K, masked.shape[-1]))
        keep = []
        for value, t in zip(top.values.tolist(), top.indices.tolist()):
            if value == float("-inf") or t >= self.v.n or t in self.v.stops:
                continue
            m = self.matcher.deep_copy()
            if not m.consume_token(t):
                continue
            lex = self.lex.copy()
            lex.feed(self.v.bytes_of(t))
            rest = self._finish_from(m, lex, t, left - 2)
            if rest is not None and len(rest) + 2 <= left:  # t, the rest, the end token
                keep.append(t)
                if not self.sample:  # greedy takes the likeliest anyway
                    break
        return keep


def _completes(matcher, tokens: list[int]) -> bool:
    if matcher.validate_tokens(tokens) != len(tokens):
        return False
    m = matcher.deep_copy()
    return m.consume_tokens(tokens) and m.is_accepting()


def _apply(scores, allowed):
    """Scores with every token the grammar forbids (and any beyond the tokenizer's vocabulary) at -inf."""
    out = scores.clone()
    n = allowed.shape[0]
    out[:, :n] = out[:, :n].masked_fill(~allowed.to(out.device), float("-inf"))
    out[:, n:] = float("-inf")
    return out


def _only(scores, tokens: list[int]):
    import torch

    out = torch.full_like(scores, float("-inf"))
    idx = torch.tensor(tokens, device=scores.device)
    out[:, idx] = scores[:, idx]
    return out
