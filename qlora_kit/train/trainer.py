"""The trainer a run uses and the one mapping from the recipe to its settings: TRL's SFTConfig
(with FSDP's), the learning-rate schedule, early stopping. The training step itself is
fastpath.FastStepMixin's; every other part of the Trainer is the library's."""

from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..recipe import Recipe


def sft_config(recipe: Recipe, run_dir: Path, has_eval: bool, fast=None):
    """The one mapping from the recipe to TRL's SFTConfig. `fast`: this run's fastpath.decide()
    (layout, checkpointing), decided here from the recipe when not given."""
    import torch
    from trl import SFTConfig

    from .. import distributed
    from ..devices import has_gpu
    from ..model import compute_dtype
    from . import fastpath

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

    from .fastpath import FastStepMixin

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


def early_stopping(recipe: Recipe, has_eval: bool) -> list:
    from transformers import EarlyStoppingCallback

    p = recipe.training.early_stopping_patience
    return [EarlyStoppingCallback(early_stopping_patience=p)] if has_eval and p > 0 else []

