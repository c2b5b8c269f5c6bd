"""Where a run writes: a new run directory, an existing one started over (--force), or a stopped
run resumed from its last complete checkpoint (same settings, same data, same number of processes).
A new run that stops before its first step leaves nothing behind (leave_nothing)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..errors import UserError
from ..recipe import Recipe
from ..run import RunInfo, is_run_dir, read_info
from ..terminal import console
from .preflight import Preflight, data_files


@dataclass
class Place:
    """The run directory this run writes, and what was there before it."""
    run_dir: Path
    reuse: bool  # an existing run: resumed, or started over with --force
    was_there: bool  # the folder existed (empty, unless reused): emptied, never removed
    resume_from: Path | None  # the complete checkpoint training continues from


def open_run_dir(recipe: Recipe, run_dir_arg: str | None, pre: Preflight, world, force: bool) -> Place:
    """4. run directory: a new one, or an existing run to resume (same settings, same data)."""
    from .. import distributed

    resume_from = None
    existing = Path(run_dir_arg) if run_dir_arg else None
    reuse = existing is not None and is_run_dir(existing)
    was_there = existing is not None and existing.exists()
    old = read_info(existing) if reuse else None
    distributed.barrier()  # every worker has looked at the directory before rank 0 writes to it
    if reuse:
        if force:
            console.print(f"--force: starting {existing} over")
            if world.main:
                for child in existing.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif old.status == "finished":
            raise UserError(f"{existing} is a finished run", "choose another --run-dir, or pass --force to train it again")
        else:
            resume_from = _resume_point(existing, old, recipe, pre, world)
    if reuse:
        run_dir = existing
    elif world.main:
        run_dir = rundir.new_run_dir(recipe.output_dir, recipe.name, run_dir_arg)
    else:
        run_dir = Path(run_dir_arg)
    return Place(run_dir, reuse, was_there, resume_from)


def _resume_point(existing: Path, old: RunInfo, recipe: Recipe, pre: Preflight, world) -> Path | None:
    """The last complete checkpoint of a stopped run, once its settings, data and process count
    are checked to be this run's (incomplete checkpoints are removed by rank 0)."""
    from ..recipe import load_saved
    from . import resilience

    rep = pre.report
    resilience.check_resume(existing, old, load_saved(existing / "recipe.yaml"), recipe, pre.model_dir, rep["sha256"],
                            data_files(rep))
    was = (old.distributed or {}).get("processes", 1)
    if was != world.size:
        raise UserError(f"{existing} was trained with {was} process{'es' if was != 1 else ''}, not {world.size}: "
                        "the data order and the saved random states depend on it",
                        f"resume with {'--gpus ' + str(was) if was > 1 else 'no --gpus'}, or pass --force to start over")
    resume_from = resilience.last_complete_checkpoint(existing / rundir.CHECKPOINTS, console if world.main else None,
                                                      remove=world.main)
    console.print(f"resuming {existing} from {resume_from.name if resume_from else 'the start (no complete checkpoint)'}")
    return resume_from


def leave_nothing(run_dir: Path, was_there: bool) -> None:
    """A new run that failed before its first step has nothing to resume or read: remove what it
    wrote, so the corrected command can use the same --run-dir without --force. A folder that was
    there before (empty: --run-dir, or the data-parallel launcher's) is emptied, not removed."""
    if was_there:
        for child in run_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    console.print(f"{run_dir}: {'emptied' if was_there else 'removed'}, as the run stopped before its first step",
                  highlight=False)
