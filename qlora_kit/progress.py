"""Rich progress for training: step, loss, eval loss, ETA and (on GPU) peak memory, on stderr.

On a terminal it is a live bar; elsewhere (CI, a log file) each logging step prints one line.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.loss = self.eval_loss = None

    def _status(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.4f}")
        if torch.cuda.is_available():
            parts.append(f"mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        return " · ".join(parts)

    def on_train_begin(self, args, state, control, **kw):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, status="", completed=state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.eval_loss = float(logs["eval_loss"])
        if self.progress is not None:
            self.progress.update(self.task, status=self._status())
        if not self.console.is_terminal and ("loss" in logs or "eval_loss" in logs):
            self.console.print(f"step {state.global_step}/{state.max_steps}  {self._status()}", highlight=False)

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
            self.progress.stop()
            self.progress = None
