"""The New run form -> the `qlora-kit train` command line, and the checks train makes before it starts.

The form's fields become CLI arguments (`--data`, `--base-model`, `--max-steps`, `--set k=v`) and
the recipe is resolved from those same arguments with the same precedence `train` applies, so
the check shown in the browser is the check the training process will make, message for message.

What a form may ask for is narrower than what a shell may: the recipe and data files must lie under
the runs folder (uploads included), a folder named with `qlora-kit ui --data-dir`, or the built-in
recipes' sample data, and be a recipe (.yaml) or a data file by name, so a typed /etc/passwd is
neither read nor quoted back in an error; nothing the form sends turns on trust_remote_code or
allow_pickle (both let a model's files run code); numbers have ranges.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

from ..errors import UserError
from .uploads import DATA_SUFFIXES  # what readers.read reads, and what may be uploaded

# form field -> recipe field; each is passed as --set so a bad value is reported as train reports it
SET_FIELDS = {"r": "lora.r", "learning_rate": "training.learning_rate", "epochs": "training.num_train_epochs",
              "max_length": "training.max_length"}
RUN_NAME = re.compile(r"^[A-Za-z0-9\u4e00-\u9fff][\w.\-\u4e00-\u9fff]{0,99}$")
RECIPE_SUFFIXES = (".yaml", ".yml")
# recipe keys that let a model's files run code (spelled any way: lower case, letters and digits only)
CODE_KEYS = ("trustremotecode", "allowpickle")
# form field -> (label, largest value). The recipe checks the lower bounds and types in its own words
# (naming the field); these are the ceilings it lacks, and no inf/nan.
NUMBERS = {"r": ("LoRA rank", 1024), "learning_rate": ("learning rate", 1.0), "epochs": ("epochs", 10_000),
           "max_length": ("max length", 1 << 20)}
MAX_STEPS = 100_000_000
SET_NUMBER_MAX = 2**32  # any number in an extra `--set` line (seeds are the largest legitimate ones)


def recipe_defaults() -> list[dict]:
    """What the form is prefilled with, per built-in recipe."""
    from .. import domains
    from ..recipe import resolve

    out = []
    for name in domains.names():
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


def sample_dirs() -> list[Path]:
    """The built-in recipes' sample data (their `data.path`), shipped with qlora-kit."""
    from ..recipe import RECIPE_DIRS

    return [d / "data" for d in RECIPE_DIRS if (d / "data").is_dir()]


def _allowed_path(field: str, typed: str, allowed: list[Path] | None, suffixes: tuple[str, ...]) -> str:
    """The typed path, resolved (symlinks followed), when it lies under an allowed folder and is named
    like a file of its kind; else a UserError that names the path but quotes nothing from the file."""
    try:
        p = Path(typed).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        raise UserError(f"{field} {typed!r}: not a usable path") from None
    if allowed is not None and not any(p == a or a in p.parents for a in allowed):
        raise UserError(f"{field} {p}: outside the folders this UI reads ({', '.join(map(str, allowed))})",
                        "upload the file on the New run page, or start the UI with --data-dir FOLDER "
                        "(the folder that holds it)")
    if p.suffix.lower() not in suffixes:
        raise UserError(f"{field} {p}: not a {'recipe' if suffixes == RECIPE_SUFFIXES else 'data'} file "
                        f"(expected {', '.join(suffixes)})", "choose the file itself")
    return str(p)


def _recipe(typed: str, allowed: list[Path] | None) -> str:
    from .. import domains

    if typed in domains.names():
        return typed
    if Path(typed).suffix.lower() not in RECIPE_SUFFIXES and "/" not in typed and "\\" not in typed:
        import difflib

        close = difflib.get_close_matches(typed, domains.names(), n=1)
        raise UserError(f"unknown recipe {typed!r} (built-in: {', '.join(domains.names())})",
                        f"did you mean '{close[0]}'?" if close else "or type the path of a recipe .yaml file")
    return _allowed_path("recipe", typed, allowed, RECIPE_SUFFIXES)


def _ceiling(field: str, value: str) -> None:
    label, top = NUMBERS[field]
    try:
        v = float(value)
    except ValueError:
        return  # not a number: the recipe says so, naming its field
    if not math.isfinite(v) or v > top:
        raise UserError(f"{label} ({field}) {value!r}: expected a number no larger than {top:g}")


def code_key(key: str) -> bool:
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    return any(k in norm for k in CODE_KEYS)


def _check_set(line: str, allowed: list[Path] | None) -> None:
    from ..recipe import parse_set

    key = line.partition("=")[0].strip()
    if code_key(key):
        raise UserError(f"--set {key}: the UI never turns on trust_remote_code or allow_pickle (with them a "
                        "model's files can run code on this machine)",
                        "remove the line; to train such a model, run `qlora-kit train` in a shell")
    path, value = parse_set(line)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            not math.isfinite(value) or abs(value) > SET_NUMBER_MAX):
        raise UserError(f"--set {line}: {'.'.join(path)}: expected a number up to {SET_NUMBER_MAX}")
    if path == ["from_adapter"] and isinstance(value, str) and value and allowed is not None:
        try:
            p = Path(value).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            raise UserError(f"--set {line}: not a usable path") from None
        if not any(p == a or a in p.parents for a in allowed):
            raise UserError(f"--set from_adapter={p}: outside the folders this UI reads", "choose one of the runs")


def parse(form: dict, allowed: list[Path] | None = None, grants=None) -> dict:
    """{recipe, data, base_model, sets, max_steps, grants} from the submitted form (strings or numbers).
    `allowed`: the folders recipe and data files may come from (None: anywhere, as the CLI).
    `grants` (recipe.Grants): the ui's own --trust-remote-code/--allow-pickle, the only source of them."""
    recipe = _text(form, "recipe")
    if not recipe:
        raise UserError("choose a recipe")
    recipe = _recipe(recipe, allowed)
    data = _text(form, "data")
    if not data:
        raise UserError("no data file", "upload a file or type the path of one on this machine")
    data = _allowed_path("data", data, allowed, DATA_SUFFIXES)
    for field in SET_FIELDS:
        if _text(form, field):
            _ceiling(field, _text(form, field))
    sets = [f"{key}={_text(form, field)}" for field, key in SET_FIELDS.items() if _text(form, field)]
    extra = form.get("extra") or ""
    if not isinstance(extra, (str, list)):
        raise UserError("extra: expected lines of KEY=VALUE")
    for line in (extra.splitlines() if isinstance(extra, str) else [str(x) for x in extra]):
        line = line.strip()
        if line and not line.startswith("#"):
            _check_set(line, allowed)
            sets.append(line)
    max_steps = _text(form, "max_steps")
    if max_steps:
        try:
            max_steps = int(max_steps)
        except ValueError:
            max_steps = -1
        if not 1 <= max_steps <= MAX_STEPS:
            raise UserError(f"max steps ({_text(form, 'max_steps')!r}): expected a whole number from 1 to {MAX_STEPS}",
                            "or leave it empty to train for the epochs")
    return {"recipe": recipe, "data": data, "base_model": _text(form, "base_model") or None,
            "sets": sets, "max_steps": max_steps or None,
            "trust_remote_code": bool(grants and grants.trust_remote_code), "allow_pickle": bool(grants and grants.allow_pickle)}


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

    # the grants as the train job gets them (jobs.with_grants): whatever the recipe file says, so the
    # check, which loads the tokenizer in this process, never runs a model's code unless the ui may
    flags = {"data.path": spec["data"], "base_model": spec["base_model"], "training.max_steps": spec["max_steps"],
             "trust_remote_code": bool(spec.get("trust_remote_code")), "allow_pickle": bool(spec.get("allow_pickle"))}
    return recipe_mod.resolve(spec["recipe"], spec["sets"], flags)[0]


def check(spec: dict) -> dict:
    """train's preflight + the data report with token lengths (as `data check --recipe` shows it)."""
    from ..train.preflight import preflight, require_trainable, training_rows  # here: it loads a tokenizer

    recipe = resolve(spec)
    pre = preflight(recipe, quiet=True, measure=True)  # one pass over the data, with token lengths
    prep = pre.prep
    # train refuses this after encoding, past its preflight: the same check, from train itself
    if prep.encoded is not None:
        require_trainable(training_rows(prep, prep.train_idx), prep, recipe)
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
