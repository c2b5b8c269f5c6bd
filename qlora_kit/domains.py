"""The domains qlora-kit ships: one registry, read by every place that lists them or acts on one.

A domain is
    a built-in recipe   recipes/<name>.yaml (`qlora-kit recipes`, `qlora-kit train <name>`, the ui's form);
                        its glossary is that recipe's evaluation.glossary
    a metric family     what `qlora-kit eval` adds to the generic metrics for evaluation.task: <name>
                        (a module of qlora_kit/eval with LABELS, PRIMARY and scores(pred, ref, glossary))
    a synth generator   optional: `qlora-kit data synth <name>` (a function(n=, seed=) -> rows)

Adding a fifth domain: one Domain(...) below, its recipe file, and, if it needs them, one synth module
and one metric family module. Nothing else names the domains.

Families and generators are named by import path, never imported here: the recipe schema reads this
registry and must stay free of everything but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GENERIC = "generic"  # the task of a recipe without a domain: the generic metrics only


@dataclass(frozen=True)
class Domain:
    name: str
    recipe: str | Path  # a file name in the built-in recipe folders (recipe.RECIPE_DIRS), or a path
    metrics: str  # module of its metric family, e.g. "qlora_kit.eval.citations"
    synth: str | None = None  # "module:function" making synthetic rows, or None
    synth_about: str = ""  # what the generator makes, for `data synth --help`


REGISTRY: dict[str, Domain] = {d.name: d for d in (
    Domain("medical", "medical.yaml", "qlora_kit.eval.key_terms"),
    Domain("legal", "legal.yaml", "qlora_kit.eval.citations"),
    Domain("finance", "finance.yaml", "qlora_kit.eval.json_fields", synth="qlora_kit.data.synth.finance:generate",
           synth_about="contract clauses -> JSON extraction"),
    Domain("industrial", "industrial.yaml", "qlora_kit.eval.key_terms"),
)}


def register(domain: Domain) -> Domain:
    """Add (or replace) a domain at run time, e.g. from a plugin or a test."""
    REGISTRY[domain.name] = domain
    return domain


def names() -> tuple[str, ...]:
    """The domains in the order `qlora-kit recipes` lists them."""
    return tuple(REGISTRY)


def get(name: str) -> Domain | None:
    return REGISTRY.get(name)


def tasks() -> tuple[str, ...]:
    """What a recipe's evaluation.task may say: generic or a domain."""
    return (GENERIC, *REGISTRY)


def with_synth() -> tuple[str, ...]:
    return tuple(n for n, d in REGISTRY.items() if d.synth)


def synth_generator(name: str):
    """The domain's generator function (imported now, not before), or None."""
    d = REGISTRY.get(name)
    if d is None or not d.synth:
        return None
    from importlib import import_module

    module, _, func = d.synth.partition(":")
    return getattr(import_module(module), func)
