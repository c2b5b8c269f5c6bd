"""Synthetic starter data: `qlora-kit data synth DOMAIN -n 2000 -o rows.jsonl`.

One generator per domain, named in qlora_kit/domains.py as "module:function", the function taking
(n=, seed=) and returning rows of {"question", "answer"}; a domain's module may also offer
generate_with_meta(n, seed) (each row with what it was made from, for tests and inspection).
Here: the domain lookup, and writing rows as JSON Lines.

    chinese.py   Chinese numerals, for any generator that writes Chinese amounts
    finance/     contract clauses -> JSON extraction
"""

from __future__ import annotations

import json
import os
import uuid
from importlib import import_module
from pathlib import Path

from ... import domains

# test_synth reads the finance generator's tables and helpers through this package
from .chinese import parse_chinese_amount, to_chinese_amount
from .finance import CLAUSE_TYPES, CURRENCIES, SCHEMA_KEYS
from .finance.clauses import _ENG_MONTHS, render_amount
from .finance.templates import TEMPLATES
from .finance.vocabulary import _LOCATIONS

__all__ = ["CLAUSE_TYPES", "CURRENCIES", "DOMAINS", "SCHEMA_KEYS", "TEMPLATES", "generate", "generate_with_meta",
           "parse_chinese_amount", "render_amount", "to_chinese_amount", "write_jsonl"]


def __getattr__(name: str):
    """DOMAINS: the domains with a generator, read from the registry when asked (so a domain
    registered at run time is one)."""
    if name == "DOMAINS":
        return domains.with_synth()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unknown(domain: str) -> ValueError:
    return ValueError(f"unknown synth domain {domain!r}; supported: {', '.join(domains.with_synth())}")


def _module(domain: str):
    d = domains.get(domain)
    if d is None or not d.synth:
        raise _unknown(domain)
    return import_module(d.synth.partition(":")[0])


def generate_with_meta(domain: str = "finance", n: int = 2000, seed: int = 0) -> list[tuple[dict, dict]]:
    """generate(), plus per row what the domain's generator made it from (for tests/inspection)."""
    return _module(domain).generate_with_meta(n, seed)


def generate(domain: str = "finance", n: int = 2000, seed: int = 0) -> list[dict]:
    """n rows of {"question", "answer"} from the domain's generator.

    Deterministic: the same (domain, n, seed) gives the same rows, and a smaller n is a prefix of a
    larger one. Unknown domain -> ValueError naming the supported ones.
    """
    fn = domains.synth_generator(domain)
    if fn is None:
        raise _unknown(domain)
    return fn(n=n, seed=seed)


def write_jsonl(path, rows) -> None:
    """Write rows as UTF-8 JSON Lines (ensure_ascii=False), atomically: a temp file in the same
    folder, fsynced, then os.replace'd over `path`, so readers never see a half-written file."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
