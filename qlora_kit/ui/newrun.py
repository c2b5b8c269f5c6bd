"""The New run form -> the `qlora-kit train` command line, and the checks train makes before it starts.

The form's fields become CLI arguments (`--data`, `--base-model`, `--max-steps`, `--set k=v`) and
the recipe is resolved from those same arguments with the same precedence `train` applies, so
the check shown in the browser is the check the training process will make, message for message.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from ..errors import UserError

# form field -> recipe field; each is passed as --set so a bad value is reported as train reports it
SET_FIELDS = {"r": "lora.r", "learning_rate": "training.learning_rate", "epochs": "training.num_train_epochs",
              "max_length": "training.max_length"}
RUN_NAME = re.compile(r"^[A-Za-z0-9\u4e00-\u9fff][\w.\-\u4e00-\u9fff]{0,99}$")


def recipe_defaults() -> list[dict]:
    """What the form is prefilled with, per built-in recipe."""
    from ..recipe import BUILTIN_RECIPES, resolve

    out = []
    for name in BUILTIN_RECIPES:
        try:
            r, path = resolve(name)
        except UserError:
            continue
        out.append({"name": name, "description": r.description, "base_model": r.base_model, "data": r.data.path,
                    "r": r.lora.r, "learning_rate": r.training.learning_rate, "epochs": r.training.num_train_epochs,
                    "max_length": r.training.max_length, "max_steps": r.training.max_steps if r.training.max_steps > 0 else None,
                    "save_steps": r.training.save_steps, "eval_steps": r.training.eval_steps, "file": str(path)})
    return out


def _text(form: dict, key: str) -> str:
    v = form.get(key)
    return "" if v is None else str(v).strip()


def parse(form: dict) -> dict:
    """{recipe, data, base_model, sets, max_steps} from the submitted form (strings or numbers)."""
    recipe = _text(form, "recipe")
    if not recipe:
        raise UserError("choose a recipe")
    data = _text(form, "data")
    if not data:
        raise UserError("no data file", "upload a file or type the path of one on this machine")
    sets = [f"{key}={_text(form, field)}" for field, key in SET_FIELDS.items() if _text(form, field)]
    extra = form.get("extra") or ""
    for line in (extra.splitlines() if isinstance(extra, str) else list(extra)):
        line = line.strip()
        if line and not line.startswith("#"):
            sets.append(line)
    max_steps = _text(form, "max_steps")
    if max_steps:
        try:
            max_steps = int(max_steps)
        except ValueError:
            raise UserError(f"max steps {max_steps!r}: expected a whole number (empty: train for the epochs)") from None
    return {"recipe": recipe, "data": str(Path(data).expanduser().resolve()), "base_model": _text(form, "base_model") or None,
            "sets": sets, "max_steps": max_steps or None}


def argv(spec: dict, run_dir: Path) -> list[str]:
    from .jobs import cli

    args = [spec["recipe"], "--run-dir", str(run_dir), "--data", spec["data"]]
    if spec["base_model"]:
        args += ["--base-model", spec["base_model"]]
    for s in spec["sets"]:
        args += ["--set", s]
    if spec["max_steps"]:
        args += ["--max-steps", str(spec["max_steps"])]
    return cli("train", *args)


def resolve(spec: dict):
    """The recipe exactly as `qlora-kit train` builds it from these arguments."""
    from .. import recipe as recipe_mod

    flags = {"data.path": spec["data"], "base_model": spec["base_model"], "training.max_steps": spec["max_steps"]}
    return recipe_mod.resolve(spec["recipe"], spec["sets"], flags)[0]


def check(spec: dict) -> dict:
    """train.preflight + the data report with token lengths (as `data check --recipe` shows it)."""
    from .. import train

    recipe = resolve(spec)
    pre = train.preflight(recipe, quiet=True, measure=True)  # one pass over the data, with token lengths
    prep = pre.prep
    # train refuses this after encoding, past its preflight: the same check, from train itself
    if prep.encoded is not None:
        train.require_trainable(train.training_rows(prep, prep.train_idx), prep, recipe)
    return {"recipe": recipe.name, "recipe_yaml": recipe.to_yaml(), "report": prep.report, "plan": pre.plan,
            "warnings": list(pre.warnings), "model_dir": pre.model_dir}


def new_name(runs_dir: Path, spec: dict, wanted: str | None) -> str:
    if wanted:
        if not RUN_NAME.match(wanted):
            raise UserError(f"run name {wanted!r}: use letters, digits, '.', '-' and '_' (no spaces or slashes)")
        if (runs_dir / wanted).exists():
            raise UserError(f"{runs_dir / wanted} already exists", "choose another run name")
        return wanted
    base = Path(spec["recipe"]).stem if spec["recipe"].endswith((".yaml", ".yml")) else spec["recipe"]
    base = re.sub(r"[^\w.\-]", "-", base) or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = f"{base}-{stamp}", 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{base}-{stamp}-{n}"
    return name
