"""What a run writes about itself, as it goes: run.json (typed by qlora_kit.run) and the run card
(README.md, rundir.write_card) when it starts, when it finishes and when it stops; recipe.yaml,
tokenizer/ and data_check.json at the start; metrics.json at the end. Only rank 0 writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import rundir
from ..recipe import Recipe
from ..run import write_info
from ..terminal import console
from .preflight import Preflight, data_files
from .resume import Place, leave_nothing


def run_info(recipe: Recipe, pre: Preflight, place: Place, tok_info, train_rows: list[dict], eval_rows: list[dict],
             world) -> dict:
    """run.json as the run starts (status "running")."""
    import torch

    from .. import distributed
    from ..devices import has_gpu
    from ..model import compute_dtype

    rep = pre.report
    info = {
        "recipe": recipe.name,
        "base_model": recipe.base_model,
        "base_model_path": pre.model_dir,
        "status": "running",
        "pid": os.getpid(),  # a "running" run whose process is gone was killed: readers check this
        "started": rundir.now(),
        "device": torch.cuda.get_device_name(0) if has_gpu() else f"cpu ({torch.get_num_threads()} threads)",
        "compute_dtype": str(compute_dtype(recipe)).replace("torch.", ""),
        "data": _data_record(rep, train_rows, eval_rows),
        "tokenizer": {"template_source": tok_info.template_source, "pad_token": tok_info.pad_token,
                      "stop_token_ids": tok_info.stop_token_ids},
        "from_adapter": recipe.from_adapter,
        # training.max_length above the model's context, capped by data.check.encode (recipe.yaml has the cap)
        **({"max_length_capped": rep["tokens"]["context"]} if rep["tokens"].get("context") else {}),
        "resumed_from": place.resume_from.name if place.resume_from else None,
        "versions": rundir.versions(),
    }
    if world.size > 1:
        t = recipe.training
        info["distributed"] = {"strategy": world.strategy, "backend": "nccl" if has_gpu() else "gloo",
                               **distributed.batch_plan(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                                        world.size, t.learning_rate)}
        console.print(f"{world.strategy.upper()} over {world.size} processes: {info['distributed']['note']}", highlight=False)
    return info


def _data_record(rep: dict, train_rows: list[dict], eval_rows: list[dict]) -> dict:
    return {
        # path: the first (often only) file; sha256: that file's, or with several files the digest
        # of them all (data.combined_sha256); files: each file with its own sha256 and row counts
        "path": str(Path(rep["sources"][0]["path"]).resolve()), "sha256": rep["sha256"], "format": rep["format"],
        "files": data_files(rep),
        "encoding": rep["encoding"], "layout": rep["layout"], "rows": rep["rows_read"],
        "skipped": len(rep["bad_rows"]) + len(rep["dropped"]),
        "duplicates_dropped": rep["duplicates"].get("exact_dropped", 0),
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "truncated": rep["tokens"]["truncated"], "answer_cut": rep["tokens"]["answer_cut"],
        "train_tokens": sum(len(r["input_ids"]) for r in train_rows),
        "train_answer_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in train_rows),
        "pii_redacted": rep.get("pii_redacted"),
    }


def write_start(run_dir: Path, recipe: Recipe, tokenizer, info: dict, rep: dict, world) -> None:
    """The run directory as training starts: the resolved recipe, the tokenizer it trains with,
    run.json and the data report (built from redacted text when scrub_pii is on)."""
    if world.main:  # the one writer of the run directory
        rundir.write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)
        write_info(run_dir, info)
        rundir.write_json(run_dir / "data_check.json", rep)
    console.print(f"run directory: {run_dir}")


def write_auto_batch_recipe(run_dir: Path, attempt_recipe: Recipe) -> None:
    """--auto-batch changed the batch shape: the recipe that trained, beside the one asked for."""
    rundir.write_atomic(run_dir / "recipe.auto-batch.yaml", attempt_recipe.to_yaml())


def write_finished(run_dir: Path, info: dict, recipe: Recipe, metrics: dict, t0: float) -> None:
    info.update(status="finished", finished=rundir.now(), wall_s=round(time.time() - t0, 1))
    rundir.write_json(run_dir / "metrics.json", metrics)
    write_info(run_dir, info)
    rundir.write_card(run_dir, info, recipe, metrics)


def stop_reason(e: BaseException, attempt_recipe: Recipe, run_dir: Path) -> BaseException:
    """Out of memory and a full disk are the user's to act on: a RunStopped with advice in place of
    the library's exception; any other exception as it is."""
    from . import resilience

    if resilience.is_oom(e):
        return resilience.RunStopped(f"CUDA out of memory with micro-batch {attempt_recipe.training.per_device_train_batch_size}"
                                     f" x max_length {attempt_recipe.training.max_length}",
                                     resilience.oom_advice(attempt_recipe))
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:  # ENOSPC while writing a checkpoint
        last = resilience.last_complete_checkpoint(run_dir / rundir.CHECKPOINTS)
        return resilience.RunStopped(f"the disk filled up while saving in {run_dir}; the last complete checkpoint "
                                     f"({last.name if last else 'none'}) is usable",
                                     f"free disk space, then rerun the same command with --run-dir {run_dir} to resume")
    return e


def write_stopped(e: BaseException, info: dict, recipe: Recipe, place: Place, world, steps_done: int) -> None:
    """A run that stopped: status "interrupted" (Ctrl-C) or "failed" in run.json and the card, or,
    for a new run stopped before its first step, nothing left behind."""
    stopped = isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", None) == 130
    info.update(status="interrupted" if stopped else "failed",
                finished=rundir.now(), error=f"{type(e).__name__}: {e}"[:500])
    if world.main and not place.reuse and steps_done == 0:
        leave_nothing(place.run_dir, place.was_there)
    elif world.main:
        write_info(place.run_dir, info)
        rundir.write_card(place.run_dir, info, recipe, {})

