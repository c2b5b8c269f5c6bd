"""The typed recipe: one schema, loaded from YAML, overridden, validated, saved.

Precedence, applied in `resolve()` and nowhere else:
    schema defaults < recipe file < `--set a.b=value` < explicit CLI flags

Field names follow the libraries they map to (`r`, `lora_alpha`, `bnb_4bit_quant_type`,
`max_length`, ...) so each mapping into PEFT / bitsandbytes / TRL is a one-line copy that a test
checks for every shipped recipe. Unknown keys are errors, never silently ignored: a misspelt key
that is never read is the most common way a config lies to its user.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import domains
from .errors import UserError

# Recipes ship at the repository top level; an installed wheel carries them inside the package.
_PKG_DIR = Path(__file__).resolve().parent
RECIPE_DIRS = [_PKG_DIR / "recipes", _PKG_DIR.parent / "recipes"]
BUILTIN_RECIPES = domains.names()  # as registered at import; code asks domains.names() (a domain may be added later)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str | list[str] | None = Field(
        None, description="data file, folder (the data files directly in it, sorted by name) or a list of them, read "
                          "as one dataset; relative paths resolve against the recipe file")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of rows held out for eval loss")
    split_seed: int = 42
    system_prompt: str | None = Field(None, description="system message added to every sample that has none")
    columns: dict[str, str] = Field(
        default_factory=dict, description="explicit mapping, wins over detection: {question: ask, answer: answer}; "
                                          "template: a column holding each row's own question template"
    )
    question_template: str | None = Field(
        None, description="the question built from several columns of a Q/A row: {column} inserts that row's cell "
                          "(empty cells stay empty), {{ and }} are literal braces; e.g. \"【故障代码】{fault_code}\\n【问题】{question}\"")
    skip_bad: bool = Field(False, description="drop unreadable rows (counted) instead of stopping")
    drop_duplicates: bool = Field(True, description="train on one copy of rows repeated exactly")
    scrub_pii: bool = Field(False, description="redact ID/card/phone numbers, e-mails and labelled names first")

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v):
        allowed = ("question", "answer", "system", "input", "messages", "tools", "template")
        bad = [k for k in v if k not in allowed]
        if bad:
            raise ValueError(f"unknown field(s) {', '.join(bad)}; map any of: {', '.join(allowed)}")
        return v

    @field_validator("path")
    @classmethod
    def _some_path(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list names no data; give a file, a folder or a list of them")
        return v

    @field_validator("question_template")
    @classmethod
    def _template_syntax(cls, v):
        if v is not None:
            from .rowtemplate import fields

            fields(v)  # a lone brace or an empty {} is a ValueError, reported with the field's line
        return v

    @property
    def paths(self) -> list[str]:
        """data.path as a list (one file, a folder, or several of either)."""
        return [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)


class QuantizationConfig(_Section):
    # QLoRA is the point of this tool, so 4-bit is not optional; the quant type and double
    # quantization are, because fp4 and single quantization are legitimate comparisons.
    load_in_4bit: Literal[True] = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU"
    )


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "attention": every attention projection of the loaded architecture, found from its modules.
    # "all-linear": every linear layer but the output head. Or an explicit list of module names.
    target_modules: Literal["attention", "all-linear"] | list[str] = "attention"
    bias: Literal["none", "all", "lora_only"] = "none"
    # Base models whose EOS (or other needed tokens) never got a trained embedding cannot learn to
    # stop through LoRA alone. "auto": train the (small) embedding matrix when that is detected.
    trainable_embeddings: bool | Literal["auto"] = "auto"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list trains nothing; use 'attention', 'all-linear' or module names")
        return v


class TrainingConfig(_Section):
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(0.3, gt=0, description="QLoRA paper's clipping value")
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = "paged_adamw_8bit"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="auto: the memory plan decides none, every n-th layer or all, from the GPU's memory "
                            "(on CPU the available RAM); true/false: always/never")
    # --- the fast path (each switch tested for the same loss as the plain path) ---
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="flatten each micro-batch into one sequence (no pad tokens computed); only with a kernel "
                            "that attends within each sample. auto: where that is the faster layout, else "
                            "micro-batches grouped by length")
    packing: bool = Field(False, description="pack samples into max_length token budgets (fewer, fuller micro-steps)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on a GPU with flash-attn installed, else SDPA")
    activation_offloading: bool = Field(False, description="keep checkpointed activations in CPU memory (long contexts)")
    liger_kernel: bool | Literal["auto"] = Field("auto", description="fused linear cross-entropy: auto = on a GPU with liger-kernel installed")
    upcast_embeddings: bool = Field(False, description="the blog recipe's fp32 upcast of embeddings/head (costs memory; for comparison)")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(25, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=2, description=">= 2: the previous complete checkpoint survives a new save")
    load_best_model_at_end: bool = Field(True, description="the adapter saved is the checkpoint with the lowest eval loss")
    early_stopping_patience: int = Field(3, ge=0, description="stop after N evaluations without improvement; 0: never")
    seed: int = 42

    @model_validator(mode="after")
    def _best_needs_aligned_saves(self):
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                             "to keep the best checkpoint; or set load_best_model_at_end: false")
        return self


class EvaluationConfig(_Section):
    task: str = Field("generic", description="which domain metrics `qlora-kit eval` adds to the generic ones: "
                                             "generic or a domain of domains.py")
    glossary: list[str] = Field(default_factory=list, description="terms an answer should use (read by the key-term metrics)")
    max_new_tokens: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate at most this many held-out samples")
    json_schema: str | None = Field(
        None, description="JSON Schema file the answers follow (relative to the recipe): `eval` also answers under "
                          "it (constrained decoding) and reports valid JSON with and without; `generate`/`chat`/`serve` "
                          "use it when asked (--json-schema, response_format)")

    @field_validator("task", mode="before")
    @classmethod
    def _known_task(cls, v):
        """One of domains.tasks(), checked when validated (not fixed at import), in a Literal's words."""
        tasks = domains.tasks()
        if v not in tasks:
            expected = ", ".join(repr(t) for t in tasks[:-1]) + f" or {tasks[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v


class Recipe(_Section):
    name: str = "custom"
    description: str = ""
    base_model: str = Field(..., description="hub id, local directory, or builtin:tiny")
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="accept pickled *.bin weights (they can run code when loaded)")
    from_adapter: str | None = Field(None, description="a run directory whose adapter this run continues training")
    chat_template: str | None = Field(
        None, description="Jinja chat template; default: the model's own, or qlora-kit's for models without one"
    )
    output_dir: str = Field("runs", description="parent folder of run directories")
    data: DataConfig = DataConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --- locating and reading -------------------------------------------------------------------------


def builtin_recipe_path(name: str) -> Path | None:
    """A domain's recipe (domains.py), else <name>.yaml in the built-in recipe folders."""
    domain = domains.get(name)
    file = Path(domain.recipe) if domain else Path(f"{name}.yaml")
    for d in RECIPE_DIRS:  # an absolute file stays itself: d / file == file
        p = d / file
        if p.is_file():
            return p
    return None


def find_recipe(spec: str) -> Path:
    """A built-in recipe name or a path to a YAML file."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or os.sep in spec or p.is_file():
        if not p.is_file():
            raise UserError(f"recipe file not found: {spec}", "check the path, or use a built-in recipe name")
        return p
    found = builtin_recipe_path(spec)
    if found is None:
        close = difflib.get_close_matches(spec, domains.names(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "run `qlora-kit recipes` for the list"
        raise UserError(f"unknown recipe '{spec}' (built-in: {', '.join(domains.names())})", hint)
    return found


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def read_recipe_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)  # safe loader: a recipe never constructs Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (name:, base_model:, lora:, ...)")
    # Paths in a recipe are relative to the recipe, not to wherever the user stands.
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = _relative_to(data["path"], path.parent)
    elif isinstance(data, dict) and isinstance(data.get("path"), list):
        data["path"] = [_relative_to(p, path.parent) if isinstance(p, str) else p for p in data["path"]]
    ev = raw.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("json_schema"), str):
        ev["json_schema"] = _relative_to(ev["json_schema"], path.parent)
    if isinstance(raw.get("base_model"), str) and raw["base_model"].startswith(("./", "../")):
        raw["base_model"] = _relative_to(raw["base_model"], path.parent)
    return raw


def _relative_to(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


# --- overrides ------------------------------------------------------------------------------------


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], typed value). YAML parses the value, so `r=32` is an int."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.r=32")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: empty key; expected e.g. lora.r=32")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


# --- validation with messages a person can act on -------------------------------------------------


def _all_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, field in model.model_fields.items():
        out.append((*prefix, name))
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_all_paths(ann, (*prefix, name)))
    return out


def _suggest(loc: tuple[str, ...]) -> str | None:
    """Closest valid key: first among siblings, then anywhere (lora.learning_rate -> training.learning_rate)."""
    paths = _all_paths(Recipe)
    key = loc[-1]
    siblings = [p[-1] for p in paths if p[:-1] == loc[:-1]]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if not close:
        # short names defeat the similarity ratio (lora.rnak -> lora.r): fall back to a shared prefix
        pref = [s for s in siblings if key.startswith(s) or s.startswith(key)]
        close = sorted(pref, key=len, reverse=True)[:1]
    if close:
        return ".".join((*loc[:-1], close[0]))
    elsewhere = [p for p in paths if p[-1] == key] or [
        p for p in paths if difflib.get_close_matches(key, [p[-1]], n=1, cutoff=0.8)
    ]
    if elsewhere:
        return ".".join(elsewhere[0])
    return None


def format_errors(err: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                  overridden: dict[tuple[str, ...], str] | None = None) -> str:
    overridden = overridden or {}
    out = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        # pydantic reports union members as extra loc parts ("list[str]", "literal[...]"); drop them
        loc = tuple(x for x in loc if not x.startswith(("list[", "literal[")))
        field = ".".join(loc) if loc else "(recipe)"
        line = lines.get(loc)
        origin = next((o for p, o in overridden.items() if loc[: len(p)] == p), None)
        if origin:
            where = f"{origin}: "
        else:
            where = f"{source}:{line}: " if line else (f"{source}: " if source else "")
        if e["type"] == "extra_forbidden":
            sugg = _suggest(loc)
            msg = f"{where}{field}: unknown key" + (f"; did you mean {sugg}?" if sugg else "")
        elif e["type"] == "missing":
            msg = f"{where}{field}: required (set it in the recipe or with --{loc[-1].replace('_', '-')})"
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{where}{field}: {e['msg']}{got_s}"
        if msg not in out:
            out.append(msg)
    return "\n".join(out)


def validate(raw: dict[str, Any], source: str = "", lines: dict | None = None,
             overridden: dict[tuple[str, ...], str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_errors(e, source, lines or {}, overridden)) from None


def resolve(spec: str, sets: list[str] | None = None, flags: dict[str, Any] | None = None) -> tuple[Recipe, Path]:
    """Build the effective recipe. Precedence: defaults < file < --set < flags (applied in that order)."""
    path = find_recipe(spec)
    raw = read_recipe_file(path)
    lines = _key_lines(path.read_text(encoding="utf-8"))
    overridden: dict[tuple[str, ...], str] = {}
    for item in sets or []:
        key, value = parse_set(item)
        apply_override(raw, key, value)
        overridden[tuple(key)] = f"--set {item}"
    for dotted, value in (flags or {}).items():
        if value is not None:
            apply_override(raw, dotted.split("."), value)
            overridden[tuple(dotted.split("."))] = f"--{dotted.rsplit('.', 1)[-1].replace('_', '-')}"
    return validate(raw, str(path), lines, overridden), path


def load_saved(path: Path) -> Recipe:
    """Read a resolved recipe back from a run directory."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return validate(raw, str(path), _key_lines(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Grants:
    """What the person who started a command allowed it on its own command line (--trust-remote-code,
    --allow-pickle). A run directory can come from anyone (a colleague, a download, a shared disk),
    so its recipe.yaml never grants either to the commands that read it."""

    trust_remote_code: bool = False
    allow_pickle: bool = False

    def flags(self) -> list[str]:
        """The same grants for a qlora-kit subprocess (the ui's merge, export, eval and train jobs)."""
        return ["--trust-remote-code"] * self.trust_remote_code + ["--allow-pickle"] * self.allow_pickle


def load_run_recipe(run_dir: Path, grants: Grants = Grants()) -> Recipe:
    """A run's saved recipe as the command reading it may use it: trust_remote_code and allow_pickle
    are this command's grants, whatever recipe.yaml says (the one place every run reader goes)."""
    recipe = load_saved(Path(run_dir) / "recipe.yaml")
    return recipe.model_copy(update={"trust_remote_code": grants.trust_remote_code, "allow_pickle": grants.allow_pickle})
