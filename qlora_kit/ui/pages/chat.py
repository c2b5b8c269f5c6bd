"""The Try page: the finished runs that have an adapter, and one question answered by the base
model and each ticked adapter side by side, streamed as server-sent events (chatting.py)."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ...errors import UserError
from ..state import Form, State

MAX_CHAT_TOKENS = 4096
DEFAULT_CHAT_TOKENS = 256

router = APIRouter()


@router.get("/api/adapters")
def adapters(ui: State):
    found = [r for r in ui.index.list() if r["status"] == "finished" and r.get("has_adapter")]
    return {"adapters": [{"name": r["name"], "recipe": r["recipe"], "base_model": r["base_model"],
                          "base_model_path": r["base_model_path"], "eval_loss": r["eval_loss"]} for r in found]}


def max_tokens_of(form: dict) -> int:
    """The form's max_tokens: empty means the default; a whole number (or digits) from 1 to MAX_CHAT_TOKENS."""
    max_tokens = form.get("max_tokens")
    if max_tokens is None or max_tokens == "":
        return DEFAULT_CHAT_TOKENS
    if isinstance(max_tokens, str) and max_tokens.strip().isdigit():
        max_tokens = int(max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_CHAT_TOKENS:
        raise UserError(f"max_tokens {form.get('max_tokens')!r}: expected a whole number from 1 to {MAX_CHAT_TOKENS}")
    return max_tokens


@router.post("/api/chat")
async def ask(form: Form, ui: State):
    names = form.get("runs") or []
    question = str(form.get("question") or "").strip()
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError("tick at least one adapter")
    if not question:
        raise UserError("type a question")
    max_tokens = max_tokens_of(form)
    chosen = {n: ui.existing_run(n) for n in dict.fromkeys(names)}

    def events():
        for ev in ui.chat.ask(chosen, question, max_tokens):
            yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})
