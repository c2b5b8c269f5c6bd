"""`qlora-kit train`: recipe -> run directory with a checked adapter. Reads top to bottom:

    data -> base model -> tokenizer + template -> encode (answer-only labels, EOS in loss)
    -> split -> run dir -> 4-bit model + LoRA -> SFTTrainer (paged 8-bit AdamW) -> save + check
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .. import rundir
from ..errors import UserError
from ..recipe import Recipe

console = Console(stderr=True, soft_wrap=True)


def sft_config(recipe: Recipe, run_dir: Path, has_eval: bool, fast=None):
    """The one mapping from the recipe to TRL's SFTConfig. `fast`: this run's fastpath.decide()
    (layout, checkpointing), decided here from the recipe when not given."""
    import torch
    from trl import SFTConfig

    from ..model import compute_dtype, has_gpu

    from .. import distributed, fastpath

    t = recipe.training
    if fast is None:
        fast = fastpath.decide(recipe, recipe.base_model)
    layout = fast.layout
    dtype = compute_dtype(recipe)
    w = distributed.world()
    batch = distributed.batch_plan(t.per_device_train_batch_size, t.gradient_accumulation_steps, w.size, t.learning_rate)
    return SFTConfig(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=batch["gradient_accumulation_steps"],
        # LoRA reaches every adapted layer in every step: no search for unused parameters
        ddp_find_unused_parameters=False if w.strategy == "ddp" else None,
        **(fsdp_args(recipe, fast.every_n_layers > 0) if w.strategy == "fsdp" else {}),
        max_length=None if (layout.padding_free and not t.packing) else t.max_length,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # non-reentrant checkpointing: works with frozen 4-bit layers and reaches the LoRA weights;
        # none, every n-th layer or all, as the memory plan decided (gradient_checkpointing: auto)
        activation_checkpointing=fast.every_n_layers > 0,
        activation_checkpointing_kwargs={"use_reentrant": False,
                                         **({"every_n_layers": fast.every_n_layers} if fast.every_n_layers > 1 else {})},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop the run), not averaged away
        eval_strategy="steps" if has_eval else "no",
        # small data: keep the checkpoint with the lowest eval loss, not the last one
        load_best_model_at_end=has_eval and t.load_best_model_at_end,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not has_gpu(),
        report_to="none",  # TensorBoard is added explicitly, writing into the run directory
        disable_tqdm=True,  # Rich shows progress instead
        dataloader_pin_memory=has_gpu(),
        # padding-free: samples are already truncated here, so TRL need not enforce max_length.
        # Otherwise micro-batches of similar lengths, right-padded to a multiple of 8 (attention.py)
        padding_free=layout.padding_free,
        pad_to_multiple_of=layout.pad_to_multiple_of,
        **_length_grouping(SFTConfig, layout.group_by_length),
        packing=t.packing,
        packing_strategy="bfd",
        activation_offloading=t.activation_offloading,
        # liger is applied by qlora-kit (fastpath.apply_liger): TRL would switch its fused loss off
        use_liger_kernel=False,
        completion_only_loss=None,  # labels are built here, answer-only; TRL keeps a given labels column
        assistant_only_loss=False,
    )


def _length_grouping(config_cls, on: bool) -> dict:
    """transformers >= 5.x: train_sampling_strategy; before it, group_by_length."""
    if "train_sampling_strategy" in config_cls.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def _warmup_from_first_step(step: int, warmup: int, after) -> float:
    return (step + 1) / warmup if step < warmup else after(step)


def lr_schedule(optimizer, args, num_training_steps: int):
    """transformers' schedule for `lr_scheduler_type` with its warm-up ramp moved one step earlier.

    transformers' warm-up gives step 0 a learning rate of exactly 0 (factor step/W), so the first
    optimizer step changes nothing, and with `--max-steps 1` (warm-up ceil(0.03 x 1) = 1 step) the
    whole run learns nothing. Here warm-up step k gets (k+1)/W, as transformers' own
    cosine_warmup_with_min_lr does; from the end of warm-up on, transformers' factors unchanged."""
    import functools

    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    warmup = args.get_warmup_steps(num_training_steps)
    # the library's factors, read from a scheduler on a throwaway optimizer (the real one is untouched)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    lib = get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=warmup,
                        num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    after = lib.lr_lambdas[0]
    ramp = warmup if after(0) == 0 else 0  # "constant" has no warm-up to move
    return LambdaLR(optimizer, functools.partial(_warmup_from_first_step, warmup=ramp, after=after))


def trainer_class():
    """SFTTrainer with `lr_schedule`, and the training loss and metrics of fastpath.FastStepMixin:
    every other part of the Trainer is the library's."""
    from trl import SFTTrainer

    from ..fastpath import FastStepMixin

    class Trainer(FastStepMixin, SFTTrainer):
        def create_optimizer(self, *args, **kwargs):
            _forget_bnb_overrides()
            return super().create_optimizer(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = lr_schedule(optimizer or self.optimizer, self.args, num_training_steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return Trainer


def _forget_bnb_overrides() -> None:
    """bitsandbytes keeps per-parameter optimizer overrides in a process-wide singleton, keyed by
    position in the parameter groups and by id(), and the Trainer adds one (32-bit state) for every
    embedding it trains. A previous run in the same process (tests, benchmarks, a notebook) leaves
    them behind: this run's first LoRA tensor then got 32-bit state by position, and the old
    models stayed alive. Each optimizer starts from an empty manager; the Trainer re-registers
    this run's own embeddings right after."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    from bitsandbytes.optim import GlobalOptimManager

    GlobalOptimManager.get_instance().initialize()


def fsdp_args(recipe: Recipe, checkpointing: bool = True) -> dict:
    """FSDP QLoRA (a base too large for one card): the 4-bit weights are stored in the compute
    dtype (model.bnb_config), so FSDP can flatten and shard them with the LoRA weights."""
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "backward_prefetch": "backward_pre",
            "forward_prefetch": False,
            "use_orig_params": False,
            "cpu_ram_efficient_loading": True,  # rank 0 loads the weights, the others receive them
            "sync_module_states": True,
            "activation_checkpointing": checkpointing,
        },
        # FSDP does its own checkpointing of wrapped blocks; the Trainer's would run twice
        "activation_checkpointing": False,
    }


def check_device_switches(recipe: Recipe) -> None:
    from ..model import has_gpu

    if recipe.training.activation_offloading and not has_gpu():
        raise UserError("training.activation_offloading moves activations from GPU to CPU memory; there is no GPU here",
                        "set training.activation_offloading: false")
    use_liger(recipe)
    from .. import attention

    attention.choose(recipe.training, has_gpu(), attention.flash_attn_available())  # refuses impossible layouts


def use_liger(recipe: Recipe) -> bool:
    """Fused linear cross-entropy never materialises full-vocabulary logits; it needs a GPU.
    training.liger_kernel: true where it cannot run is refused (fastpath.choose_loss_head)."""
    from .. import fastpath
    from ..model import has_gpu

    return fastpath.choose_loss_head(recipe.training, 0, has_gpu(), fastpath.liger_available())[0] == "liger"


def early_stopping(recipe: Recipe, has_eval: bool) -> list:
    from transformers import EarlyStoppingCallback

    p = recipe.training.early_stopping_patience
    return [EarlyStoppingCallback(early_stopping_patience=p)] if has_eval and p > 0 else []


def memorising_warning(train_loss, eval_loss) -> str | None:
    """Small data overfits fast: say so when the training loss falls far below the eval loss."""
    if train_loss is None or eval_loss is None:
        return None
    if eval_loss > 1.5 * train_loss + 0.1:
        return (f"train loss {train_loss:.3f} is far below eval loss {eval_loss:.3f}: the adapter is memorising the "
                "training rows; use fewer epochs, a lower learning rate or more data")
    return None


def check_adapter(model) -> str:
    """A saved adapter must be finite and trained: LoRA B starts at zero, so all-zero B means no learning."""
    import torch

    n_b, zero_b = 0, 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        if not torch.isfinite(p).all():
            raise RuntimeError(f"adapter weight {name} has NaN/inf values; the run diverged")
        if "lora_B" in name:
            n_b += 1
            zero_b += int(torch.count_nonzero(p) == 0)
    if n_b == 0:
        raise RuntimeError("the adapter has no LoRA weights")
    if zero_b == n_b:  # the user's settings, not a bug: a message and exit 1, no traceback
        from .resilience import RunStopped

        raise RunStopped("the training changed nothing: every LoRA B matrix is still zero, so the adapter would "
                         "answer exactly like the base model; no adapter was saved",
                         "raise training.learning_rate (a step this small rounds away to nothing) or train for more steps")
    return f"ok: {n_b} LoRA B matrices, {n_b - zero_b} non-zero, all weights finite"


@dataclass
class Preflight:
    """What `train` checks before it writes anything; the UI shows it before it starts a run."""
    prep: object  # datacheck.Prepared
    model_dir: str
    plan: dict | None
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict:
        return self.prep.report


def preflight(recipe: Recipe, quiet: bool = False, measure: bool = False) -> Preflight:
    """Data read/check/split, base model resolution, GPU-only switches, memory plan. Raises the
    UserError that `train` would raise, with the same message, and writes nothing. `measure`: the
    data report also has token lengths and an encoded sample (as `data check --recipe` shows),
    which needs the tokenizer; `train` encodes later with the one it trains with."""
    say = (lambda *a, **k: None) if quiet else console.print
    # 1. data: read, check, split (no model yet, so bad files fail in a second)
    from .. import datacheck

    prep = datacheck.prepare(recipe, *datacheck.load_tokenizer_for_check(recipe)) if measure else datacheck.prepare(recipe)
    rep = prep.report
    say(f"data: {rep['split']['train'] + rep['split']['eval']} conversations from {rep['file']} "
        f"({rep['format']}, {rep['encoding']}, {rep['layout']})")
    for row in (rep["bad_rows"] + rep["dropped"])[:5]:
        say(f"  [yellow]dropped[/] {row['where']}: {row['reason']}", highlight=False)

    # 2. base model (a hub id offline fails here, before anything heavy)
    from ..model import has_gpu, resolve_base_model

    warnings = []
    if not has_gpu() and not recipe.base_model.startswith("builtin:") and not Path(recipe.base_model).is_dir():
        warnings.append("no CUDA GPU found; a multi-billion-parameter model trains on CPU at a few tokens per "
                        "second (use --base-model builtin:tiny to check the pipeline)")
    model_dir = resolve_base_model(recipe.base_model, recipe.revision, recipe.trust_remote_code, recipe.allow_pickle)
    if recipe.from_adapter:
        from_adapter_folder(recipe.from_adapter, recipe.base_model, model_dir)
    check_device_switches(recipe)  # GPU-only switches are refused before anything is written

    # 2b. will it fit? (from the config alone; the planner's components are in `qlora-kit plan`)
    from .. import plan as plan_mod

    plan = None
    try:
        import torch

        budget = torch.cuda.mem_get_info()[1] if has_gpu() else 24 * plan_mod.GiB
        p = plan_mod.make(recipe, model_dir, budget)
        plan = p.to_dict()
        where = "this GPU" if has_gpu() else "a 24 GiB GPU (this run is on CPU)"
        say(f"memory plan: about {p.total / plan_mod.GiB:.1f} GiB peak on {where}", highlight=False)
        if not p.fits:
            warnings.append(f"the memory estimate exceeds {budget / plan_mod.GiB:.0f} GiB; micro-batch "
                            f"{p.best_micro_batch or 1} or max_length {p.longest_max_length:,} would fit "
                            f"(`qlora-kit plan {recipe.name}` shows the components)")
    except UserError as e:
        say(f"memory plan unavailable: {e.message}", highlight=False)
    return Preflight(prep, model_dir, plan, warnings)


def data_files(rep: dict) -> list[dict]:
    """run.json's record of each data file: its path, sha256, rows read, and its rows in the split."""
    return [{"path": str(Path(s["path"]).resolve()), "sha256": s["sha256"], "rows": s["rows_read"],
             "train": s.get("train"), "eval": s.get("eval")} for s in rep["sources"]]


def training_rows(prep, idx) -> list[dict]:
    """The encoded samples that teach something: a prompt that fills max_length has no answer token."""
    out = []
    for i in idx:
        e = prep.encoded[i]
        if any(x != -100 for x in e.labels):
            out.append({"input_ids": e.input_ids, "labels": e.labels})
    return out


def require_trainable(train_rows: list[dict], prep, recipe: Recipe) -> None:
    """The refusal that needs the encoded data (so it comes after preflight); the UI makes it too."""
    if not train_rows:
        raise UserError(f"{prep.report['file']}: no training sample has an answer token within "
                        f"max_length={recipe.training.max_length}", "raise training.max_length")


def run(recipe: Recipe, run_dir_arg: str | None = None, callbacks: list | None = None, *,
        force: bool = False, auto_batch: bool = False) -> Path:
    """Train and return the run directory. `callbacks` are extra TrainerCallbacks (tests use them to
    look at the live model; nothing in qlora-kit needs them)."""
    t0 = time.time()
    from .. import distributed

    world = distributed.init()  # one process, or one of N data-parallel workers started by `--gpus N`
    from .. import fastpath

    threads = fastpath.set_threads()  # before any torch work: the pool is sized once
    if world.size > 1 and run_dir_arg is None:
        raise UserError("a data-parallel worker needs --run-dir (the launcher chooses it)", "start it with --gpus N")
    pre = preflight(recipe, quiet=not world.main)
    prep, rep, model_dir = pre.prep, pre.report, pre.model_dir
    for warning in pre.warnings:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)

    # 3. tokenizer and template; answer-only labels with EOS in the loss (cached by content)
    import torch

    from .. import datacheck
    from ..model import (
        compute_dtype,
        has_gpu,
        load_tokenizer,
        prepare_tokenizer,
        quiet_libraries,
    )

    quiet_libraries()
    tokenizer = load_tokenizer(model_dir, recipe)
    tok_info = prepare_tokenizer(tokenizer, recipe, model_dir)
    datacheck.encode(prep, recipe, tokenizer, set(tok_info.stop_token_ids))
    for warning in rep["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)

    train_rows, eval_rows = training_rows(prep, prep.train_idx), training_rows(prep, prep.eval_idx)
    require_trainable(train_rows, prep, recipe)

    # 4. run directory: a new one, or an existing run to resume (same settings, same data)
    from . import resilience
    from ..recipe import load_saved

    resume_from = None
    existing = Path(run_dir_arg) if run_dir_arg else None
    reuse = existing is not None and rundir.is_run_dir(existing)
    was_there = existing is not None and existing.exists()  # (empty, unless reused): emptied, never removed
    old = rundir.read_info(existing) if reuse else {}
    distributed.barrier()  # every worker has looked at the directory before rank 0 writes to it
    if reuse:
        if force:
            console.print(f"--force: starting {existing} over")
            if world.main:
                for child in existing.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif old.get("status") == "finished":
            raise UserError(f"{existing} is a finished run", "choose another --run-dir, or pass --force to train it again")
        else:
            resilience.check_resume(existing, old, load_saved(existing / "recipe.yaml"), recipe, model_dir, rep["sha256"],
                                    data_files(rep))
            was = (old.get("distributed") or {}).get("processes", 1)
            if was != world.size:
                raise UserError(f"{existing} was trained with {was} process{'es' if was != 1 else ''}, not {world.size}: "
                                "the data order and the saved random states depend on it",
                                f"resume with {'--gpus ' + str(was) if was > 1 else 'no --gpus'}, or pass --force to start over")
            resume_from = resilience.last_complete_checkpoint(existing / rundir.CHECKPOINTS, console if world.main else None,
                                                              remove=world.main)
            console.print(f"resuming {existing} from {resume_from.name if resume_from else 'the start (no complete checkpoint)'}")
    if reuse:
        run_dir = existing
    elif world.main:
        run_dir = rundir.new_run_dir(recipe.output_dir, recipe.name, run_dir_arg)
    else:
        run_dir = Path(run_dir_arg)
    dtype = compute_dtype(recipe)
    info = {
        "recipe": recipe.name,
        "base_model": recipe.base_model,
        "base_model_path": model_dir,
        "status": "running",
        "pid": os.getpid(),  # a "running" run whose process is gone was killed: readers check this
        "started": rundir.now(),
        "device": torch.cuda.get_device_name(0) if has_gpu() else f"cpu ({torch.get_num_threads()} threads)",
        "compute_dtype": str(dtype).replace("torch.", ""),
        "data": {
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
        },
        "tokenizer": {"template_source": tok_info.template_source, "pad_token": tok_info.pad_token,
                      "stop_token_ids": tok_info.stop_token_ids},
        "from_adapter": recipe.from_adapter,
        # training.max_length above the model's context, capped by datacheck.encode (recipe.yaml has the cap)
        **({"max_length_capped": rep["tokens"]["context"]} if rep["tokens"].get("context") else {}),
        "resumed_from": resume_from.name if resume_from else None,
        "versions": rundir.versions(),
    }
    if world.size > 1:
        t = recipe.training
        info["distributed"] = {"strategy": world.strategy, "backend": "nccl" if has_gpu() else "gloo",
                               **distributed.batch_plan(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                                        world.size, t.learning_rate)}
        console.print(f"{world.strategy.upper()} over {world.size} processes: {info['distributed']['note']}", highlight=False)
    if world.main:  # the one writer of the run directory
        rundir.write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)
        rundir.write_json(run_dir / "run.json", info)
        rundir.write_json(run_dir / "data_check.json", rep)  # built from redacted text when scrub_pii is on
    console.print(f"run directory: {run_dir}")

    # the samples as Arrow tables from here on: the Python lists they came from cost tens of bytes
    # a token (15 MB for 1,000 short rows), memory the training step would otherwise add to
    train_rows, eval_rows = _dataset(train_rows), _dataset(eval_rows)
    prep.encoded = None
    attempt_recipe = recipe
    steps = _steps_done()
    try:
        while True:
            try:
                fast = fastpath.decide(attempt_recipe, model_dir, threads)
                info["fast_path"] = fast.to_dict()
                for line in fast.lines():
                    console.print(line, highlight=False)
                trainer, metrics, stops = _fit(attempt_recipe, model_dir, tokenizer, train_rows, eval_rows, run_dir,
                                               resume_from, info, [*(callbacks or []), steps], fast)
                break
            except BaseException as e:
                t = attempt_recipe.training
                if not (resilience.is_oom(e) and auto_batch and t.per_device_train_batch_size > 1):
                    raise
                # keep the effective batch: half the micro-batch, twice the accumulation, from the start
                attempt_recipe = attempt_recipe.model_copy(deep=True)
                attempt_recipe.training.per_device_train_batch_size = t.per_device_train_batch_size // 2
                attempt_recipe.training.gradient_accumulation_steps = t.gradient_accumulation_steps * 2
                console.print(f"[yellow]out of memory[/]: retrying with micro-batch "
                              f"{attempt_recipe.training.per_device_train_batch_size} x accumulation "
                              f"{attempt_recipe.training.gradient_accumulation_steps} (--auto-batch)")
                info.setdefault("auto_batch", []).append(
                    {"per_device_train_batch_size": attempt_recipe.training.per_device_train_batch_size,
                     "gradient_accumulation_steps": attempt_recipe.training.gradient_accumulation_steps})
                shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)
                resume_from = None
                import gc

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
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
        if not world.main:  # rank 0 saves the adapter and writes the results
            distributed.finish()
            return run_dir
        if attempt_recipe is not recipe:
            rundir.write_atomic(run_dir / "recipe.auto-batch.yaml", attempt_recipe.to_yaml())

        # 7. save the adapter atomically, then check the files
        info["adapter_check"] = check_adapter(trainer.model)
        final = run_dir / rundir.ADAPTER
        tmp = run_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        rundir.share_tree(tmp)  # the safetensors writer makes owner-only files
        info["adapter_check"] += "; " + check_adapter_files(tmp, info["lora"]["trainable_params"])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        info.update(status="finished", finished=rundir.now(), wall_s=round(time.time() - t0, 1))
        rundir.write_json(run_dir / "metrics.json", metrics)
        rundir.write_json(run_dir / "run.json", info)
        rundir.write_card(run_dir, info, recipe, metrics)
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", None) == 130
        if resilience.is_oom(e):
            e = resilience.RunStopped(f"CUDA out of memory with micro-batch {attempt_recipe.training.per_device_train_batch_size}"
                                      f" x max_length {attempt_recipe.training.max_length}",
                                      resilience.oom_advice(attempt_recipe))
        elif isinstance(e, OSError) and getattr(e, "errno", None) == 28:  # ENOSPC while writing a checkpoint
            last = resilience.last_complete_checkpoint(run_dir / rundir.CHECKPOINTS)
            e = resilience.RunStopped(f"the disk filled up while saving in {run_dir}; the last complete checkpoint "
                                      f"({last.name if last else 'none'}) is usable",
                                      f"free disk space, then rerun the same command with --run-dir {run_dir} to resume")
        info.update(status="interrupted" if stopped else "failed",
                    finished=rundir.now(), error=f"{type(e).__name__}: {e}"[:500])
        if world.main and not reuse and steps.done == 0:
            _leave_nothing(run_dir, was_there)
        elif world.main:
            rundir.write_json(run_dir / "run.json", info)
            rundir.write_card(run_dir, info, recipe, {})
        if isinstance(e, resilience.RunStopped):
            # an agreed stop (Ctrl-C, NaN, disk): no worker exits before rank 0 has written the status
            distributed.finish()
            raise e from None
        raise
    distributed.finish()
    ev_s = f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
    console.print(f"[green]done[/]: {metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}{ev_s}")
    return run_dir


def _dataset(rows):
    """A datasets.Dataset of encoded rows (list of dicts), or the one given."""
    import datasets

    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)


def _steps_done():
    """A TrainerCallback whose `done` is the last optimizer step this process finished (0: none yet)."""
    from transformers import TrainerCallback

    class StepsDone(TrainerCallback):
        done = 0

        def on_step_end(self, args, state, control, **kw):
            self.done = state.global_step

    return StepsDone()


def _leave_nothing(run_dir: Path, was_there: bool) -> None:
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


def _fit(recipe: Recipe, model_dir: str, tokenizer, train_rows, eval_rows, run_dir: Path, resume_from,
         info: dict, callbacks, fast):
    """Load the 4-bit base, attach LoRA (or continue an adapter), train. Returns (trainer, metrics, stops)."""
    from transformers import PrinterCallback, set_seed

    from . import resilience
    from ..model import attach_lora, embedding_modules, load_4bit
    from .progress import ProgressLog, RichProgress, TensorBoardLog

    from .. import attention, fastpath

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

    tensorboard = TensorBoardLog(run_dir / rundir.LOGS)  # not checkpoints/runs/<date>
    args = sft_config(recipe, run_dir, has_eval=bool(eval_rows), fast=fast)
    # TRL casts the trainable weights of a quantized model to bf16. Keep exact fp32 master weights:
    # autocast still computes in bf16 on GPU, small optimizer updates are not rounded away, a
    # continued adapter starts from exactly its saved values, and on CPU LoRA stays in fp32.
    # Not under FSDP: a flattened shard must hold one dtype, the storage dtype of the 4-bit weights.
    from .. import distributed

    fsdp = distributed.world().strategy == "fsdp"
    exact = {} if fsdp else {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    stops = {"interrupt": resilience.Interrupt(console), "finite": resilience.FiniteLoss(),
             "disk": resilience.DiskGuard(run_dir / rundir.CHECKPOINTS, minimum_bytes=16 * trainable + (8 << 20))}
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=[RichProgress(console), ProgressLog(run_dir / rundir.LOGS / "progress.jsonl"), tensorboard, *early_stopping(recipe, bool(eval_rows)),
                   stops["finite"], stops["disk"], stops["interrupt"], resilience.CompleteMarker(), *(callbacks or [])],
    )
    for n, p in trainer.model.named_parameters():
        if n in exact:
            p.data = exact[n]
    trainer.qk_loss_head = fast.loss_head
    trainer.qk_keep_dequantized = fast.keep_dequantized
    if fast.loss_head == "chunked":
        fastpath.reinstall_chunked_head(trainer.model)
    trainer.remove_callback(PrinterCallback)  # Rich prints progress; no raw dicts on stderr
    with stops["interrupt"]:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = {"global_step": trainer.state.global_step, "train_loss": _last(trainer.state.log_history, "loss"),
               "train_loss_mean": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime")}
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


def from_adapter_folder(source: str, base_model: str, model_dir: str) -> Path:
    """The adapter folder --from-adapter names (a run's final adapter, or one of its complete
    checkpoints), refused unless it was trained on this base model."""
    src = Path(source)
    info = rundir.read_info(src)
    _, adapter = rundir.resolve(src)
    if info.get("base_model_path") != model_dir:
        raise UserError(f"--from-adapter {src}: that adapter was trained on {info.get('base_model')}, not on {base_model}",
                        f"use --base-model {info.get('base_model')}, the base of the run you continue")
    return adapter


def continue_adapter(model, source: str, base_model: str, model_dir: str):
    """Start from a trained adapter (laws or guidelines changed: train on the new data)."""
    from peft import PeftModel

    adapter = from_adapter_folder(source, base_model, model_dir)
    console.print(f"continuing the adapter of {source}")
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def check_adapter_files(adapter_dir: Path, trainable_params: int) -> str:
    """The files on disk: present, and at least as big as the trainable weights they must hold."""
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise RuntimeError(f"adapter files missing in {adapter_dir}")
    size = f.stat().st_size
    expected = 2 * trainable_params  # at least bf16 bytes per trained weight
    if size < expected:
        raise RuntimeError(f"{f} is {size} bytes, less than the {expected} its {trainable_params} weights need")
    return f"adapter_model.safetensors {size:,} bytes for {trainable_params:,} weights"


def _last(history: list[dict], key: str):
    for h in reversed(history):
        if key in h:
            return float(h[key])
    return None
