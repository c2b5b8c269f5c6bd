"""A run directory opened for reading: run.json typed, and the one place that reads and writes it.

`train` writes run.json (write_info) when a run starts and again when it ends; `merge` writes one for
a combination. Every later command reads it through read_info, as a RunInfo, or opens the whole run
with open_run: run.json, the recipe with this command's grants, the adapter (the final one or a
complete checkpoint's), the tokenizer folder, and, for a command that reads the training data again
(eval's held-out split, merge's probes), whether that data is still the data the run was trained on.

RunInfo is tolerant of run directories written by older versions: every field is optional, and the
fields it does not name are kept as they are (extra="allow"), so a read-modify-write loses nothing.
The layout of the directory (folder names, atomic writes, the run card) is rundir.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from . import rundir
from .errors import UserError

RUN_JSON = "run.json"
RECIPE = "recipe.yaml"
_HINT = "pass the folder that `qlora-kit train` printed"


class _Open(BaseModel):
    # older run.json files have fewer fields and newer ones may have more: keep whatever is there
    model_config = ConfigDict(extra="allow")


class DataFile(_Open):
    path: str
    sha256: str


class DataInfo(_Open):
    path: str | None = None  # the first (often only) data file, resolved
    sha256: str | None = None  # that file's, or with several files the digest of their digests
    files: list[DataFile] = []  # each file with its own sha256 (runs before multi-file data: absent)
    rows: int | None = None  # rows read
    train_rows: int | None = None
    eval_rows: int | None = None


class TokenizerInfo(_Open):
    template_source: str = "model"
    stop_token_ids: list[int] = []


class RunInfo(_Open):
    """run.json. Fields in the order train writes them; all optional (older runs, combinations)."""
    recipe: str | None = None
    base_model: str | None = None  # what the recipe named (a hub id or builtin:NAME)
    base_model_path: str | None = None  # the local folder it was loaded from
    status: str | None = None  # running | finished | failed | interrupted
    pid: Any = None  # raw as written: the ui checks it is a live train process before any signal
    started: str | None = None
    finished: str | None = None
    device: str | None = None
    compute_dtype: str | None = None
    data: DataInfo = DataInfo()
    tokenizer: TokenizerInfo = TokenizerInfo()
    error: str | None = None  # why a failed run failed
    distributed: dict | None = None  # a data-parallel run: strategy, processes, per-process batch
    combination: dict | None = None  # a combined adapter (merge --adapter ...): its parts

    @field_validator("data", "tokenizer", mode="before")
    @classmethod
    def _null_is_empty(cls, v):
        return {} if v is None else v  # "data": null reads as no data facts, as the readers always took it

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


# --- where a run is -------------------------------------------------------------------------------


def is_run_dir(p: Path) -> bool:
    return (Path(p) / RUN_JSON).is_file() and (Path(p) / RECIPE).is_file()


def has_info(p: Path) -> bool:
    """run.json is there (a run being written may not have its recipe yet)."""
    return (Path(p) / RUN_JSON).is_file()


def is_checkpoint(p: Path) -> bool:
    """RUN/checkpoints/checkpoint-N of a run directory (complete or not)."""
    p = Path(p)
    return (rundir.is_checkpoint_name(p.name) and p.parent.name == rundir.CHECKPOINTS
            and is_run_dir(p.parent.parent))


def is_run_path(p: Path) -> bool:
    """What the readers accept: a run directory or one of its checkpoints."""
    return is_run_dir(Path(p)) or is_checkpoint(Path(p))


def default_name(path) -> str:
    """The name an adapter is loaded/served under: the run's folder name, plus the checkpoint's."""
    p = Path(path)
    return f"{p.parent.parent.name}-{p.name}" if is_checkpoint(p) else p.name


# --- run.json -------------------------------------------------------------------------------------


def read_info(run_dir: Path) -> RunInfo:
    """run.json of a run directory (of its run, for a checkpoint folder)."""
    run_dir = Path(run_dir)
    if is_checkpoint(run_dir):
        run_dir = run_dir.parent.parent
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}", _HINT)
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a qlora-kit run directory (no {RUN_JSON}/{RECIPE})", _HINT)
    return parse_info(run_dir / RUN_JSON)


def parse_info(path: Path) -> RunInfo:
    """One run.json file, typed; a UserError naming the file when it is not one."""
    try:
        return RunInfo.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not a readable run.json: {str(e).splitlines()[0]}",
                        "it is written by `qlora-kit train`; restore it, or train the run again") from None


def try_read_info(run_dir: Path) -> RunInfo | None:
    """run.json, or None while it is missing, being replaced or not one (the ui lists what it can)."""
    try:
        return parse_info(Path(run_dir) / RUN_JSON)
    except (OSError, UserError):
        return None


def write_info(run_dir: Path, info: RunInfo | dict) -> None:
    """Write run.json atomically. A dict is checked against RunInfo first and written as it is (its
    keys in the writer's order); a RunInfo is written with the fields it was given."""
    if isinstance(info, RunInfo):
        obj = info.to_json()
    else:
        RunInfo.model_validate(info)  # a wrong type is a bug here, not a file a later command trips on
        obj = info
    rundir.write_json(Path(run_dir) / RUN_JSON, obj)


# --- a run opened for reading ---------------------------------------------------------------------


def require_adapter(run_dir: Path) -> Path:
    a = Path(run_dir) / rundir.ADAPTER
    if not (a / "adapter_model.safetensors").is_file():
        info = read_info(run_dir)
        raise UserError(f"{run_dir}: no finished adapter (run status: {info.status or '?'})",
                        "train to the end first; checkpoints are under checkpoints/")
    return a


def resolve(path) -> tuple[Path, Path]:
    """(run directory, adapter folder) for RUN (its final adapter) or RUN/checkpoints/checkpoint-N
    (that checkpoint's adapter; only a complete one: a folder being written or left by a crash
    may hold a partial adapter)."""
    p = Path(path)
    if p.name == rundir.CHECKPOINTS and is_run_dir(p.parent):
        done = rundir.complete_checkpoints(p.parent)
        raise UserError(f"{p} holds several checkpoints; pass one of them, or the run directory {p.parent}",
                        f"complete checkpoints: {', '.join(done)}" if done else "this run has no complete checkpoint")
    if not is_checkpoint(p):
        return p, require_adapter(p)
    run = p.parent.parent
    if not (p / rundir.COMPLETE).is_file():
        done = rundir.complete_checkpoints(run)
        raise UserError(f"{p} is not a complete checkpoint (no {rundir.COMPLETE}: it was being written when training "
                        "stopped, so its adapter may be partial)",
                        f"use a complete one ({', '.join(done)}) or the run directory {run}" if done
                        else f"use the run directory {run} once training has finished")
    if not (p / "adapter_model.safetensors").is_file() or not (p / "adapter_config.json").is_file():
        raise UserError(f"{p} has no adapter_model.safetensors/adapter_config.json", f"use the run directory {run}")
    return run, p


@dataclass(frozen=True)
class Run:
    path: Path  # what was given: RUN or RUN/checkpoints/checkpoint-N
    dir: Path  # the run directory
    adapter: Path  # the adapter folder `path` names
    info: RunInfo
    recipe: Any  # recipe.Recipe with this command's grants

    @property
    def name(self) -> str:
        return default_name(self.path)

    @property
    def base_model_path(self) -> str:
        """The base's local folder, refused with the fix when run.json names none or it is gone."""
        if not self.info.base_model_path:
            raise UserError(f"{self.dir / RUN_JSON} names no base_model_path",
                            "it is written by `qlora-kit train`; restore it, or train the run again")
        if not Path(self.info.base_model_path).is_dir():
            raise UserError(f"base model of this run not found at {self.info.base_model_path}",
                            "restore the base model there (the run card names it)")
        return self.info.base_model_path

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer with the chat template used in training, refused when it is missing."""
        t = self.dir / rundir.TOKENIZER
        if not t.is_dir():
            raise UserError(f"{self.dir}: no {rundir.TOKENIZER}/ folder (the tokenizer and chat template of the run)",
                            "copy the whole run directory, or train the run again")
        return t


def open_run(path, grants=None) -> Run:
    """RUN or one of its complete checkpoints, checked: run.json readable, an adapter there, and the
    recipe as this command's `grants` (recipe.Grants) allow; the run's recipe.yaml grants nothing."""
    from .recipe import Grants, load_run_recipe

    run_dir, adapter = resolve(path)
    info = read_info(run_dir)
    return Run(Path(path), run_dir, adapter, info, load_run_recipe(run_dir, grants or Grants()))


def data_changed(info: RunInfo, run_dir: Path, sources) -> str | None:
    """Why the data about to be read again is not the data this run was trained on (None when it
    is, or when run.json records no hash to compare). `sources`: (path, sha256) of each file read."""
    sources = [(str(Path(p).resolve()), sha) for p, sha in sources]
    recorded = {f.path: f.sha256 for f in info.data.files}
    if not recorded and info.data.path and info.data.sha256 and len(sources) == 1:
        recorded = {info.data.path: info.data.sha256}  # runs before multi-file data: one file, its hash
    if not recorded:
        return None
    changed = [p for p, sha in sources if p in recorded and recorded[p] != sha]
    unknown = [p for p, _ in sources if p not in recorded]
    now = [p for p, _ in sources]
    # a file gone or read in another order changes the split too (it runs over all rows in order)
    gone = [p for p in recorded if p not in now] if len(recorded) > 1 or info.data.files else []
    reordered = not (changed or unknown or gone) and [p for p in recorded if p in now] != now
    if not (changed or unknown or gone or reordered):
        return None
    what = "; ".join([f"{p} changed since training (sha256 differs)" for p in changed]
                     + [f"{p} was not part of the training data" for p in unknown]
                     + [f"{p} was part of the training data and is not read now" for p in gone]
                     + (["the data files are read in another order than in training"] if reordered else []))
    return f"{run_dir}: {what}"
