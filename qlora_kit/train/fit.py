"""The training itself: load the 4-bit base, attach LoRA (or continue an adapter), build the
Trainer with its callbacks, train, evaluate. `--auto-batch` retries out of memory with half the
micro-batch and twice the accumulation; an agreed stop (Ctrl-C, NaN, disk) becomes a RunStopped."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..recipe import Recipe
from ..terminal import console
from .trainer import early_stopping, sft_config, trainer_class


@dataclass
class Attempt:
    """The recipe the current try trains with (--auto-batch changes its batch shape after an out
    of memory) and the checkpoint it starts from (none after such a retry: it starts over)."""
    recipe: Recipe
    resume_from: Path | None


def train_with_retries(attempt: Attempt, model_dir: str, tokenizer, train_rows, eval_rows, run_dir: Path, info: dict,
                       callbacks: list, threads, auto_batch: bool):
    """Train; with auto_batch, an out of memory retries from the start with half the micro-batch and
    twice the accumulation (the same effective batch). Returns (trainer, metrics, stops)."""
    import torch

    from . import fastpath, resilience

    while True:
        try:
            fast = fastpath.decide(attempt.recipe, model_dir, threads)
            info["fast_path"] = fast.to_dict()
            for line in fast.lines():
                console.print(line, highlight=False)
            return fit(attempt.recipe, model_dir, tokenizer, train_rows, eval_rows, run_dir, attempt.resume_from,
                       info, callbacks, fast)
        except BaseException as e:
            t = attempt.recipe.training
            if not (resilience.is_oom(e) and auto_batch and t.per_device_train_batch_size > 1):
                raise
            # keep the effective batch: half the micro-batch, twice the accumulation, from the start
            attempt.recipe = attempt.recipe.model_copy(deep=True)
            attempt.recipe.training.per_device_train_batch_size = t.per_device_train_batch_size // 2
            attempt.recipe.training.gradient_accumulation_steps = t.gradient_accumulation_steps * 2
            console.print(f"[yellow]out of memory[/]: retrying with micro-batch "
                          f"{attempt.recipe.training.per_device_train_batch_size} x accumulation "
                          f"{attempt.recipe.training.gradient_accumulation_steps} (--auto-batch)")
            info.setdefault("auto_batch", []).append(
                {"per_device_train_batch_size": attempt.recipe.training.per_device_train_batch_size,
                 "gradient_accumulation_steps": attempt.recipe.training.gradient_accumulation_steps})
            shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)
            attempt.resume_from = None
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def fit(recipe: Recipe, model_dir: str, tokenizer, train_rows, eval_rows, run_dir: Path, resume_from,
        info: dict, callbacks, fast):
    """Load the 4-bit base, attach LoRA (or continue an adapter), train. Returns (trainer, metrics, stops)."""
    from . import resilience

    model = load_model(recipe, model_dir, tokenizer, info, fast)
    trainer, stops = build_trainer(recipe, model, tokenizer, train_rows, eval_rows, run_dir, callbacks, fast)
    with stops["interrupt"]:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except resilience.TrainingComplete:  # resumed from the last step's checkpoint: nothing to train
            finish_without_training(trainer)
            result = None
    metrics = {"global_step": trainer.state.global_step, "train_loss": _last(trainer.state.log_history, "loss"),
               "train_loss_mean": result.training_loss if result else None,
               "train_runtime_s": result.metrics.get("train_runtime") if result else None}
    if stops["interrupt"].requested or stops["finite"].bad_step is not None or stops["disk"].short is not None:
        return trainer, metrics, stops
    if eval_rows:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    metrics["log_history"] = trainer.state.log_history
    metrics["best_checkpoint"] = trainer.state.best_model_checkpoint
    metrics["stopped_early"] = bool(trainer.state.global_step < trainer.state.max_steps)
    warn = memorising_warning(metrics.get("train_loss"), metrics.get("eval_loss"))
    if warn:
        metrics["warning"] = warn
        console.print(f"[yellow]warning[/]: {warn}", highlight=False)
    return trainer, metrics, stops


def finish_without_training(trainer) -> None:
    """What the Trainer does after its last step, for a run resumed from that step's checkpoint (the
    train call stopped before a step past the end): the best checkpoint's adapter when the recipe
    keeps the best (the same PEFT load_adapter call the Trainer makes), then the end-of-training
    callbacks (progress bar, TensorBoard)."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer.model.load_adapter(best, trainer.model.active_adapters[0])
    trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)


def load_model(recipe: Recipe, model_dir: str, tokenizer, info: dict, fast):
    """The 4-bit base with this run's attention and loss head, and LoRA attached (or the adapter
    of --from-adapter continued); what was trained goes to info["lora"]."""
    from transformers import set_seed

    from .. import attention
    from ..model import attach_lora, embedding_modules, load_4bit
    from . import fastpath
    from .adapter import continue_adapter

    set_seed(recipe.training.seed)  # LoRA A is initialised randomly: same seed, same run (and resume)
    if fast.layout.attn_implementation == attention.PER_SEQUENCE:
        attention.register()
    model = load_4bit(model_dir, recipe, attn_implementation=fast.layout.attn_implementation)
    if fast.loss_head == "liger" and not fastpath.apply_liger(model):
        fast.loss_head, fast.loss_head_why = fastpath.head_without_liger(
            model.config.get_text_config().vocab_size, note="; liger-kernel does not know this architecture")
        info["fast_path"] = fast.to_dict()
    # no KV cache in training: with a cache transformers cannot see padding-free sequence boundaries
    # in position_ids, and packed samples would attend to each other
    model.config.use_cache = False
    emb_mods, emb_why = embedding_modules(recipe, model, tokenizer.eos_token_id)
    if recipe.from_adapter:
        model = continue_adapter(model, recipe.from_adapter, recipe.base_model, model_dir)
    else:
        if emb_why:
            console.print(f"{'embeddings trained' if emb_mods else '[yellow]warning[/]'}: {emb_why}", highlight=False)
        model = attach_lora(model, recipe, tokenizer.eos_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    cfg = model.peft_config["default"]
    info["lora"] = {"trainable_params": trainable, "modules": lora_modules,
                    "modules_to_save": sorted(cfg.modules_to_save or []), "embeddings_note": emb_why,
                    "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)}
    return model


def build_trainer(recipe: Recipe, model, tokenizer, train_rows, eval_rows, run_dir: Path, callbacks, fast):
    """The Trainer with qlora-kit's callbacks (progress, logs, early stopping, the stops of
    resilience) and exact fp32 LoRA weights. Returns (trainer, stops)."""
    from transformers import PrinterCallback

    from .. import distributed
    from . import fastpath, resilience
    from .progress import ProgressLog, RichProgress, TensorBoardLog

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tensorboard = TensorBoardLog(run_dir / rundir.LOGS)  # not checkpoints/runs/<date>
    args = sft_config(recipe, run_dir, has_eval=bool(eval_rows), fast=fast)
    # TRL casts the trainable weights of a quantized model to bf16. Keep exact fp32 master weights:
    # autocast still computes in bf16 on GPU, small optimizer updates are not rounded away, a
    # continued adapter starts from exactly its saved values, and on CPU LoRA stays in fp32.
    # Not under FSDP: a flattened shard must hold one dtype, the storage dtype of the 4-bit weights.
    fsdp = distributed.world().strategy == "fsdp"
    exact = {} if fsdp else {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    stops = {"interrupt": resilience.Interrupt(console), "finite": resilience.FiniteLoss(),
             "disk": resilience.DiskGuard(run_dir / rundir.CHECKPOINTS, minimum_bytes=16 * trainable + (8 << 20))}
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=as_dataset(train_rows),
        eval_dataset=as_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=[RichProgress(console), ProgressLog(run_dir / rundir.LOGS / "progress.jsonl"), tensorboard, *early_stopping(recipe, bool(eval_rows)),
                   stops["finite"], stops["disk"], stops["interrupt"], resilience.CompleteMarker(),
                   resilience.NoStepPastTheEnd(), *(callbacks or [])],
    )
    for n, p in trainer.model.named_parameters():
        if n in exact:
            p.data = exact[n]
    trainer.qk_loss_head = fast.loss_head
    trainer.qk_keep_dequantized = fast.keep_dequantized
    if fast.loss_head == "chunked":
        fastpath.reinstall_chunked_head(trainer.model)
    trainer.remove_callback(PrinterCallback)  # Rich prints progress; no raw dicts on stderr
    return trainer, stops


def raise_if_stopped(trainer, stops: dict, run_dir: Path) -> None:
    """An agreed stop (Ctrl-C, non-finite values, a disk too full for the next checkpoint): a
    RunStopped that says which checkpoint a rerun of the same command resumes from."""
    from . import resilience

    step = trainer.state.global_step
    last = resilience.last_complete_checkpoint(run_dir / rundir.CHECKPOINTS)
    resume_cmd = f"rerun the same command (with --run-dir {run_dir}) to resume from {last.name if last else 'the start'}"
    if stops["interrupt"].requested:
        raise resilience.RunStopped(f"interrupted at step {step}; checkpoint saved", resume_cmd, exit_code=130)
    if stops["finite"].bad_step is not None:
        raise resilience.RunStopped(
            f"non-finite training values at step {stops['finite'].bad_step} ({stops['finite'].what}); stopped "
            f"without saving that state; last good checkpoint: {last.name if last else 'none'}",
            "lower training.learning_rate or training.max_grad_norm; then " + resume_cmd)
    if stops["disk"].short is not None:
        free, need = stops["disk"].short
        raise resilience.RunStopped(
            f"not enough disk space for the next checkpoint in {run_dir} ({free / 2**20:.0f} MiB free, "
            f"about {need / 2**20:.0f} MiB needed); the last complete checkpoint ({last.name if last else 'none'}) is usable",
            "free disk space, then " + resume_cmd)


def memorising_warning(train_loss, eval_loss) -> str | None:
    """Small data overfits fast: say so when the training loss falls far below the eval loss."""
    if train_loss is None or eval_loss is None:
        return None
    if eval_loss > 1.5 * train_loss + 0.1:
        return (f"train loss {train_loss:.3f} is far below eval loss {eval_loss:.3f}: the adapter is memorising the "
                "training rows; use fewer epochs, a lower learning rate or more data")
    return None


def as_dataset(rows):
    """A datasets.Dataset of encoded rows (list of dicts), or the one given."""
    import datasets

    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)


def steps_done():
    """A TrainerCallback whose `done` is the last optimizer step this process finished (0: none yet)."""
    from transformers import TrainerCallback

    class StepsDone(TrainerCallback):
        done = 0

        def on_step_end(self, args, state, control, **kw):
            self.done = state.global_step

    return StepsDone()


def _last(history: list[dict], key: str):
    for h in reversed(history):
        if key in h:
            return float(h[key])
    return None

