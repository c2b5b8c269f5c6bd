"""`qlora-kit train`: recipe -> run directory with a checked adapter. `run` reads top to bottom:

    preflight: data read/check/split, base model, GPU-only switches, memory plan   preflight.py
    -> tokenizer + template -> encode (answer-only labels, EOS in loss)          preflight.encode_samples
    -> run dir: new, --force, or resumed                                          resume.py
    -> run.json, recipe.yaml, tokenizer/ written                                  record.py
    -> 4-bit model + LoRA -> SFTTrainer (paged 8-bit AdamW), callbacks            fit.py, trainer.py,
                                                                                  progress.py, resilience.py
    -> save + check the adapter                                                   adapter.py
    -> metrics.json, run.json, run card                                           record.py
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from ..recipe import Recipe
from ..terminal import console
from .fit import memorising_warning
from .preflight import preflight, require_trainable, training_rows, use_liger
from .trainer import early_stopping, fsdp_args, lr_schedule, sft_config

__all__ = ["early_stopping", "fsdp_args", "lr_schedule", "memorising_warning", "preflight",
           "require_trainable", "run", "sft_config", "training_rows", "use_liger"]


def run(recipe: Recipe, run_dir_arg: str | None = None, callbacks: list | None = None, *,
        force: bool = False, auto_batch: bool = False) -> Path:
    """Train and return the run directory. `callbacks` are extra TrainerCallbacks (tests use them to
    look at the live model; nothing in qlora-kit needs them)."""
    t0 = time.time()
    from .. import distributed
    from . import fastpath, fit, record
    from .adapter import save_adapter
    from .preflight import encode_samples
    from .resilience import RunStopped
    from .resume import open_run_dir

    world = distributed.init()  # one process, or one of N data-parallel workers started by `--gpus N`
    threads = fastpath.set_threads()  # before any torch work: the pool is sized once
    if world.size > 1 and run_dir_arg is None:
        raise UserError("a data-parallel worker needs --run-dir (the launcher chooses it)", "start it with --gpus N")
    pre = preflight(recipe, quiet=not world.main)
    for warning in pre.warnings:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    tokenizer, tok_info, train_rows, eval_rows = encode_samples(recipe, pre)
    place = open_run_dir(recipe, run_dir_arg, pre, world, force)
    run_dir = place.run_dir
    info = record.run_info(recipe, pre, place, tok_info, train_rows, eval_rows, world)
    record.write_start(run_dir, recipe, tokenizer, info, pre.report, world)

    # the samples as Arrow tables from here on: the Python lists they came from cost tens of bytes
    # a token (15 MB for 1,000 short rows), memory the training step would otherwise add to
    train_rows, eval_rows = fit.as_dataset(train_rows), fit.as_dataset(eval_rows)
    pre.prep.encoded = None
    attempt = fit.Attempt(recipe, place.resume_from)
    steps = fit.steps_done()
    try:
        trainer, metrics, stops = fit.train_with_retries(attempt, pre.model_dir, tokenizer, train_rows, eval_rows, run_dir,
                                                         info, [*(callbacks or []), steps], threads, auto_batch)
        fit.raise_if_stopped(trainer, stops, run_dir)
        if not world.main:  # rank 0 saves the adapter and writes the results
            distributed.finish()
            return run_dir
        if attempt.recipe is not recipe:
            record.write_auto_batch_recipe(run_dir, attempt.recipe)
        save_adapter(trainer.model, run_dir, info)
        record.write_finished(run_dir, info, recipe, metrics, t0)
    except BaseException as e:
        stop = record.stop_reason(e, attempt.recipe, run_dir)
        record.write_stopped(stop, info, recipe, place, world, steps.done)
        if isinstance(stop, RunStopped):
            # an agreed stop (Ctrl-C, NaN, disk): no worker exits before rank 0 has written the status
            distributed.finish()
            raise stop from None
        raise
    distributed.finish()
    ev_s = f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
    console.print(f"[green]done[/]: {metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}{ev_s}")
    return run_dir
