"""`qlora-kit chat`: talk to a tuned model in the terminal, tokens streamed as they come.

Several adapters share one 4-bit base (`--adapter legal=RUN1 --adapter medical=RUN2`); each
answers with its own stored chat template. Commands: /use NAME, /base, /adapters, /reset, /exit.
With --json-schema FILE every answer is JSON matching the schema (structured.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError

HELP = "/use NAME · /base · /adapters · /reset · /exit"


def parse_adapters(run_dir: Path | None, specs: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    if run_dir is not None:
        from ..run import default_name

        runs[default_name(run_dir)] = run_dir
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: expected NAME=RUN_DIR, e.g. --adapter legal=runs/legal-1")
        if name in runs:
            raise UserError(f"--adapter {name}: the name is used twice")
        runs[name] = Path(path)
    if not runs:
        raise UserError("nothing to chat with", "pass a run directory or --adapter NAME=RUN_DIR")
    return runs


def one_shot(engine, prompt: str, max_new_tokens: int, out=None, constraint=None):
    """Stream one answer to `out` (default: sys.stdout as it is now, not at import, so a redirect
    is honoured); the engine.Result. `constraint`: JSON only (structured.Constraint)."""
    out = out or sys.stdout
    res = engine.generate(engine.messages(prompt), max_new_tokens, on_text=lambda t: (out.write(t), out.flush()),
                          constraint=constraint)
    out.write("\n")
    return res


def repl(engine, max_new_tokens: int, console, read=input, out=None, constraint=None) -> None:
    out = out or sys.stdout
    history: list[dict] = []
    console.print(f"chatting with [bold]{engine.active}[/] ({HELP})")
    while True:
        try:
            line = read(f"{engine.active or 'base'}> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history = []
            console.print("history cleared")
            continue
        if cmd == "/adapters":
            console.print(", ".join(f"[bold]{n}[/]" if n == engine.active else n for n in engine.adapters) + " · base")
            continue
        if cmd == "/base" or cmd.startswith("/use"):
            name = None if cmd == "/base" else cmd[4:].strip()
            if name == "":
                console.print(f"usage: /use NAME ({', '.join(engine.adapters)})")
                continue
            try:
                engine.use(name)
            except UserError as e:
                console.print(f"[red]{e.message}[/] ({e.hint})")
                continue
            history = []  # a different model: a fresh conversation
            console.print(f"now: {name or 'base model'}")
            continue
        if cmd.startswith("/"):
            console.print(f"unknown command; {HELP}")
            continue
        msgs = engine.messages(cmd, history)
        res = engine.generate(msgs, max_new_tokens, on_text=lambda t: (out.write(t), out.flush()), constraint=constraint)
        out.write("\n")
        if res.finish_reason == "length" and constraint is not None:
            console.print(f"[yellow]the answer reached --max-new-tokens {max_new_tokens} before its JSON was complete[/]")
        history = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
        history = history + [{"role": "assistant", "content": res.text}]
