"""Rich progress for training: step, loss, eval loss, ETA and (on GPU) peak memory, on stderr.

On a terminal it is a live bar; elsewhere (CI, a log file) each logging step prints one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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


class ProgressLog(TrainerCallback):
    """One JSON line per logging step in RUN_DIR/logs/progress.jsonl: what the UI (or `tail -f`)
    watches while a run trains. Appended and flushed per line so a reader never sees half a record;
    written by the main process only, so data-parallel runs do not duplicate it."""

    def __init__(self, path):
        self.path = Path(path)
        self.t0 = self.step0 = None
        self.last_tokens = self.last_time = None

    def _write(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _base(self, event: str, state) -> dict:
        now = time.time()
        rec = {"time": now, "event": event, "step": state.global_step, "max_steps": state.max_steps,
               "epoch": round(state.epoch or 0.0, 4), "elapsed_s": round(now - self.t0, 2)}
        done = state.global_step - self.step0
        if done > 0 and state.max_steps:
            rec["eta_s"] = round((now - self.t0) / done * (state.max_steps - state.global_step), 1)
        if torch.cuda.is_available():
            rec["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return rec

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.step0 = time.time(), state.global_step
        if state.is_world_process_zero:
            self._write(self._base("begin", state))

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = self._base("log", state)
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                rec[key] = float(logs[key])
        if "num_tokens" in logs:  # TRL counts the tokens seen so far (all processes)
            tokens = float(logs["num_tokens"])
            if self.last_tokens is not None and rec["time"] > self.last_time:
                rec["tokens_per_s"] = round((tokens - self.last_tokens) / (rec["time"] - self.last_time), 1)
            self.last_tokens, self.last_time = tokens, rec["time"]
        self._write(rec)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self._write(self._base("end", state))
