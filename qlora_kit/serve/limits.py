"""How much a request may ask for: its body's size, its answer's length, and prompt + answer
within the model's context.

A prompt that cannot fit is refused before it is tokenized where possible: tokenizing megabytes
takes seconds and gigabytes, while a character count bounds the token count from below
(`chars_per_token`), so what `refuse_by_chars` refuses, tokenizing would refuse too. What passes
is counted exactly once admitted (`refuse_by_tokens`). The body's size is capped while it is read
(net.read_body), the same cap code the web UI uses.
"""

from __future__ import annotations

from .request import ApiError, bad, integer

MAX_BODY = 8 << 20


def too_large(limit: int) -> ApiError:
    # close the connection: otherwise the server would go on receiving (and discarding) the rest
    return ApiError(413, f"the request body is larger than {limit >> 20} MiB", "invalid_request_error", None,
                    "request_too_large", {"Connection": "close"})


def context_limit(model) -> int | None:
    """The model's context length in tokens, if its config states one."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token can cover, so a prompt's length in characters
    bounds its token count from below without tokenizing it.

    A token covers at most as many characters as its vocabulary entry has (byte-level entries spell
    one character per byte, SentencePiece's and byte-fallback entries over-count). x4: Unicode
    normalization (NFC in Qwen's tokenizer) folds at most four code points into one. The floor
    keeps small vocabularies generous too. Only a normalizer that deletes characters outright
    could beat it; chat models' tokenizers do not."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    return 4 * max(longest, 16)


def max_tokens(body: dict, cap: int, default: int) -> tuple[int, str]:
    """The answer's length in tokens (max_completion_tokens wins over max_tokens, each 1..cap)
    and the field that set it, for the errors that name it."""
    lengths = {k: integer(body, k, None, 1, cap) for k in ("max_tokens", "max_completion_tokens")}
    key = "max_completion_tokens" if lengths["max_completion_tokens"] is not None else "max_tokens"
    return lengths[key] or min(default, cap), key


def refuse_by_chars(context: int | None, per: int, msgs: list[dict], max_tokens: int, key: str) -> None:
    """Refuse, without tokenizing, a prompt too long in characters to fit the context in tokens
    (`per`: chars_per_token of the tokenizer that will render it)."""
    if not context:
        return
    chars = sum(len(m["content"]) for m in msgs)
    at_least = -(-chars // per)
    if at_least + max_tokens > context:
        raise bad(f"This model's maximum context length is {context} tokens; the messages have {chars} "
                  f"characters, at least {at_least} tokens (at most {per} characters per token), and {key} "
                  f"asks for {max_tokens} more", "messages", "context_length_exceeded")


def refuse_by_tokens(context: int | None, prompt_tokens: int, max_tokens: int, key: str) -> None:
    """Refuse a counted prompt that leaves no room for the answer asked for."""
    if context and prompt_tokens + max_tokens > context:
        raise bad(f"This model's maximum context length is {context} tokens; the messages take "
                  f"{prompt_tokens} and {key} asks for {max_tokens} more", "messages",
                  "context_length_exceeded")
