"""What is exported: a run (or one of its complete checkpoints), or a folder `qlora-kit merge` wrote.

Either way the exporter needs the model's config.json, the tokenizer with the chat template used in
training, the ids an answer stops at, the run's system prompt and the base's sentencepiece model
when it has one; Source holds them, open_source reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..errors import UserError
from ..run import RunInfo, default_name, is_run_dir, open_run, read_info


@dataclass
class Source:
    path: Path
    name: str
    config: dict  # config.json of the base (a run) or of the merged model
    tokenizer_dir: Path  # the tokenizer with the chat template used in training
    stop_token_ids: list[int]
    base_model: str | None
    spm_model: Path | None  # sentencepiece tokenizer.model, when the base has one
    run_dir: Path | None = None  # set when the adapter still has to be merged
    merged_dir: Path | None = None  # set when the model is already merged
    info: RunInfo | None = None  # the run's run.json (a merged folder moved away from its run: None)
    trust_remote_code: bool = False  # this command's --trust-remote-code, for loading the tokenizer
    system_prompt: str | None = None  # the run's, baked into the GGUF's chat template as its default


def read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def is_merged_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "qlora_kit_merge.json").is_file()


def open_source(path: Path) -> Source:
    if is_merged_dir(path):
        return _merged_source(path)
    r = open_run(path)  # a UserError for anything that is not a run directory or a complete checkpoint
    info = r.info
    base = Path(info.base_model_path or "")
    if not info.base_model_path or not (base / "config.json").is_file():
        raise UserError(f"base model of this run not found at {info.base_model_path}",
                        "restore the base model there (the run card names it)")
    spm = base / "tokenizer.model"
    # run_dir: what merge reads (RUN or its checkpoint); the name says which checkpoint it was
    return Source(path=path, name=default_name(path), config=read_json(base / "config.json"),
                  tokenizer_dir=r.dir / rundir.TOKENIZER, stop_token_ids=list(info.tokenizer.stop_token_ids),
                  base_model=info.base_model, spm_model=spm if spm.is_file() else None, run_dir=path, info=info,
                  system_prompt=r.recipe.data.system_prompt)


def _merged_source(path: Path) -> Source:
    meta = read_json(path / "qlora_kit_merge.json")
    run = Path(meta.get("run_dir") or "")
    info = read_info(run) if meta.get("run_dir") and is_run_dir(run) else None
    stops = (info.tokenizer.stop_token_ids if info else None) or _generation_eos(path)
    spm = path / "tokenizer.model"
    if not spm.is_file() and info and info.base_model_path:
        spm = Path(info.base_model_path) / "tokenizer.model"
    # merge records the prompt (and bakes it into the folder's template); older folders: the run's recipe
    system = meta["system_prompt"] if "system_prompt" in meta else _run_system_prompt(run) if info else None
    return Source(path=path, name=run.name if info else path.name, config=read_json(path / "config.json"),
                  tokenizer_dir=path, stop_token_ids=list(stops), base_model=meta.get("base_model"),
                  spm_model=spm if spm.is_file() else None, merged_dir=path, info=info,
                  run_dir=run if info else None, system_prompt=system)


def _run_system_prompt(run: Path) -> str | None:
    from ..recipe import load_saved

    return load_saved(run / "recipe.yaml").data.system_prompt


def _generation_eos(model_dir: Path) -> list[int]:
    p = model_dir / "generation_config.json"
    if not p.is_file():
        return []
    eos = read_json(p).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []


def check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists", "pass another --out or delete it")
