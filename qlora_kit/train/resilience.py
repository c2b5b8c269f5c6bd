"""Never lose a run: complete-checkpoint markers, resume checks, Ctrl-C, NaN, out of memory, disk.

A checkpoint counts only once `qlora_kit_complete.json` is in it. Transformers writes a
checkpoint folder piece by piece (adapter, optimizer, scheduler, RNG, trainer state) and only
then prunes old ones; the marker is written (atomically) after all of that, and only when the
adapter weights are finite. A `kill -9` at any moment therefore leaves either the previous
complete checkpoint or the new one; resume ignores and removes unmarked folders. With
save_total_limit >= 2 the previous complete checkpoint survives the pruning of the new save.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from ..errors import UserError
from ..run import RunInfo
from ..rundir import COMPLETE as MARKER
from ..rundir import checkpoint_step as _step
from ..rundir import complete_checkpoints


class RunStopped(UserError):
    """Training stopped for a reason the user can act on; `exit_code` says how the CLI exits."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message, hint)
        self.exit_code = exit_code


def last_complete_checkpoint(checkpoints: Path, console=None, remove: bool = True) -> Path | None:
    """The newest checkpoint with a marker; newer unmarked (half-written) folders are removed
    (by one process only: `remove=False` on the other data-parallel workers)."""
    if not checkpoints.is_dir():
        return None
    for p in sorted(checkpoints.glob("checkpoint-*"), key=_step, reverse=True):
        if (p / MARKER).is_file():
            return p
        if not remove:
            continue
        if console is not None:
            console.print(f"[yellow]removing incomplete checkpoint[/] {p.name} (interrupted while it was written)")
        shutil.rmtree(p, ignore_errors=True)
    return None


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def check_resume(run_dir: Path, info: RunInfo, old_recipe, recipe, model_dir: str, data_sha: str,
                 files: list[dict] | None = None) -> None:
    """Refuse to continue a run with different settings, base model or data. `data_sha` covers every
    data file (data.combined_sha256); `files` ({"path", "sha256"} each) names the one that changed."""
    problems = recipe_differences(old_recipe.model_dump(mode="json"), recipe.model_dump(mode="json"))
    if info.base_model_path != model_dir:
        problems.append(f"base model: {info.base_model_path} -> {model_dir}")
    if info.data.sha256 != data_sha:
        from ..data import file_changes

        old_files = [f.model_dump() for f in info.data.files]
        problems += (file_changes(old_files, files) if old_files and files else []) or \
            ["data file content changed (sha256 differs)"]
    if problems:
        raise UserError(f"{run_dir} was started with other settings, so it cannot be resumed:\n  " + "\n  ".join(problems[:12]),
                        "rerun with the original settings, or pass --force to start this run over")


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete after transformers has written every part of it."""

    def on_save(self, args, state, control, model=None, **kw):
        import torch

        from .. import distributed
        from ..rundir import share_tree, write_json

        distributed.barrier()  # every data-parallel worker has written its part (its RNG state)
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        if model is not None and any(not torch.isfinite(p).all() for n, p in model.named_parameters() if p.requires_grad):
            shutil.rmtree(ckpt, ignore_errors=True)  # never offer a NaN checkpoint to resume from
            return
        share_tree(ckpt)  # the safetensors writer makes owner-only files; a colleague may resume or read it
        write_json(ckpt / MARKER, {"step": state.global_step, "epoch": state.epoch})


class Interrupt(TrainerCallback):
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self, console):
        self.console = console
        self.requested = False  # agreed: some rank was interrupted, every rank stops at this step
        self._pressed = False  # this process got Ctrl-C (set only by the handler)
        self._previous = None

    def _handler(self, signum, frame):
        if self._pressed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._pressed = True
        self.console.print("\n[yellow]interrupt[/]: saving a checkpoint after this step (Ctrl-C again to quit now)")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (a UI worker): Ctrl-C is not ours to handle
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def on_step_end(self, args, state, control, **kw):
        from .. import distributed

        # data-parallel workers must stop at the same step, or the others wait forever in all-reduce.
        # The handler's flag is only read here, never assigned from the vote: a Ctrl-C landing while
        # this rank waits in the vote's all-reduce (most of a loaded machine's time) would otherwise
        # be overwritten by the vote's False and lost, and the run would train on to the end. Only the
        # vote decides (every rank calls it, every rank gets the same answer); a press it missed is
        # counted at the next step's vote.
        if distributed.any_rank(self._pressed):
            self.requested = True
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class TrainingComplete(Exception):
    """Every step was already trained: the run was resumed from a checkpoint of its last step."""


class NoStepPastTheEnd(TrainerCallback):
    """A run interrupted during its last step saves a checkpoint of that step. Resumed from it,
    transformers' Trainer (5.24) trains one step more whenever max_steps does not end an epoch: it
    re-enters the unfinished epoch and checks the step count only after a step. Stop it before that
    step starts, on every rank alike (no collective has begun), so the run ends as it would have."""

    def on_step_begin(self, args, state, control, **kw):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingComplete(state.global_step)


class FiniteLoss(TrainerCallback):
    """Stops the run at the first NaN/inf loss or gradient norm, without saving that state."""

    def __init__(self):
        self.bad_step: int | None = None
        self.what = ""

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        for key in ("loss", "grad_norm"):
            v = logs.get(key)
            if v is not None and not math.isfinite(float(v)):
                self.bad_step, self.what = state.global_step, f"{key} = {v}"
                control.should_training_stop = True
                control.should_save = False
                return


class DiskGuard(TrainerCallback):
    """Before each save: is there room for a checkpoint the size of the last one (x1.5)?"""

    def __init__(self, checkpoints: Path, minimum_bytes: int):
        self.checkpoints = checkpoints
        self.minimum = minimum_bytes
        self.short: tuple[int, int] | None = None

    def needed(self) -> int:
        done = complete_checkpoints(self.checkpoints.parent)  # oldest first
        if not done:
            return self.minimum
        last = self.checkpoints / done[-1]
        return int(1.5 * sum(f.stat().st_size for f in last.rglob("*") if f.is_file()))

    def on_step_end(self, args, state, control, **kw):
        if not control.should_save:
            return
        from .. import distributed

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.checkpoints).free
        need = self.needed()
        if distributed.any_rank(free < need):
            self.short = (free, need)
            control.should_save = False
            control.should_training_stop = True


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def oom_advice(recipe) -> str:
    t = recipe.training
    return (f"lower the micro-batch (--set training.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
            f"--set training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} keeps the effective batch), "
            f"or training.max_length (now {t.max_length}), or pass --auto-batch to retry automatically; "
            "`qlora-kit plan` estimates what fits")
