"""The Try page: one question, answered by the base model and by each ticked adapter, streamed.

It goes through `serve.Service`, the code behind the OpenAI-compatible API, on one
`serve.engine.Engine` (one 4-bit base, each run's adapter and its own stored chat template), so what
the page shows is what `qlora-kit serve` would answer. One engine is kept, for the last set of
adapters asked; ticking others loads a new one in its place.
"""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

from .. import rundir
from ..errors import UserError


def adapter_ids(names: list[str]) -> dict[str, str]:
    """Run name -> adapter name: PEFT keeps adapters in module dicts (no '.' or '/'), and 'base' is the base."""
    out: dict[str, str] = {}
    for n in names:
        a = re.sub(r"[^\w\-]", "_", n)
        while a == "base" or a in out.values():
            a += "_"
        out[n] = a
    return out


class Chat:
    def __init__(self, grants=None):
        from ..recipe import Grants

        self.grants = grants or Grants()  # from `qlora-kit ui`'s own flags; never from a run or a form
        self.lock = threading.Lock()  # one comparison at a time: they share one model anyway
        self.key = None
        self.service = None

    def _key(self, runs: dict[str, Path]):
        def mtime(p: Path):
            try:
                return (p / rundir.ADAPTER / "adapter_model.safetensors").stat().st_mtime_ns
            except OSError:
                return None
        return tuple((n, str(p), mtime(p)) for n, p in runs.items())

    def ask(self, runs: dict[str, Path], question: str, max_tokens: int):
        """Events: status, start/delta/done per model ("base" first), error (with the model when it is one's)."""
        # a generator may be resumed on different worker threads and, when the browser goes away,
        # closed late: so a plain Lock (any thread may release it) and a bounded wait, not a `with`
        if not self.lock.acquire(timeout=120):
            yield {"type": "error", "error": "another comparison is still answering", "hint": "try again in a moment"}
            return
        try:
            ids = adapter_ids(list(runs))
            key = self._key(runs)
            if key != self.key or self.service is None:
                yield {"type": "status", "text": "loading the 4-bit base and the adapters…"}
                self.service = self.key = None
                gc.collect()  # the previous engine's weights go before the new ones load
                try:
                    from .. import serve
                    from ..serve.engine import Engine

                    engine = Engine.from_runs({ids[n]: p for n, p in runs.items()}, self.grants)
                    self.service, self.key = serve.Service(engine), key
                except UserError as e:
                    yield {"type": "error", "error": e.message, "hint": e.hint}
                    return
            from .. import serve

            for label, model in [("base", "base"), *((n, ids[n]) for n in runs)]:
                yield {"type": "start", "model": label}
                body = {"model": model, "messages": [{"role": "user", "content": question}],
                        "max_tokens": max_tokens, "stream": True}
                finish = None
                stream = None
                try:
                    stream = self.service.stream(body)
                    for chunk in stream:
                        for choice in chunk.get("choices") or []:
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                yield {"type": "delta", "model": label, "text": text}
                            finish = choice.get("finish_reason") or finish
                except serve.ApiError as e:
                    err = (e.body() or {}).get("error") or {}
                    yield {"type": "error", "model": label, "error": err.get("message") or str(e)}
                    continue
                except UserError as e:
                    yield {"type": "error", "model": label, "error": e.message, "hint": e.hint}
                    continue
                finally:
                    if stream is not None:
                        stream.close()  # the page went away mid-answer: stop generating for it
                yield {"type": "done", "model": label, "finish_reason": finish}
        finally:
            self.lock.release()
