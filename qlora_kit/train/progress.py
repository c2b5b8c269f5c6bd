"""Training progress: a Rich bar (or one line per logging step) on stderr, progress.jsonl and
TensorBoard event files in RUN_DIR/logs.

All three run at every logging step, so each is kept to a few tens of microseconds (under 1 % of
even a small model's step at `logging_steps: 1`): no Rich rendering when stderr is not a terminal,
progress.jsonl through one open file (a line per write), TensorBoard records buffered in memory
and written every few seconds. No tensor is read back from the device here.
"""

from __future__ import annotations

import json
import os
import socket
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
        if self.progress is not None and not self.progress.disable:
            self.progress.update(self.task, completed=state.global_step, status=self._status())

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.eval_loss = float(logs["eval_loss"])
        if self.progress is not None:
            self.progress.update(self.task, status=self._status())
        if not self.console.is_terminal and not self.console.quiet and ("loss" in logs or "eval_loss" in logs):
            # a log file, not a terminal: the plain line, without Rich's rendering (a quarter of a
            # millisecond per line). Written to the file directly, so the console's quiet (a
            # data-parallel worker other than rank 0) is checked here: one run, one log.
            self.console.file.write(f"step {state.global_step}/{state.max_steps}  {self._status()}\n")

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
        self._file = None
        self._cuda = torch.cuda.is_available()

    def _write(self, rec: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(rec) + "\n")  # one write of a whole line, then flushed
        self._file.flush()

    def _base(self, event: str, state) -> dict:
        now = time.time()
        rec = {"time": now, "event": event, "step": state.global_step, "max_steps": state.max_steps,
               "epoch": round(state.epoch or 0.0, 4), "elapsed_s": round(now - self.t0, 2)}
        done = state.global_step - self.step0
        if done > 0 and state.max_steps:
            rec["eta_s"] = round((now - self.t0) / done * (state.max_steps - state.global_step), 1)
        if self._cuda:
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
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLog(TrainerCallback):
    """The logged scalars as TensorBoard event files (`tensorboard --logdir runs/`), rank 0 only.
    transformers' TensorBoardCallback hands each scalar to SummaryWriter's writer thread, about
    0.45 ms per logging step; here the records are kept in memory and written together every
    `flush_s` seconds and at evaluation, save and the end (about 10 us a scalar)."""

    def __init__(self, log_dir, flush_s: float = 5.0):
        self.log_dir = Path(log_dir)
        self.flush_s = flush_s
        self._pending: list[tuple[int, float, str, float]] = []
        self._writer = self._file = None
        self._last_flush = time.time()

    def _open(self) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(self.log_dir / name, "ab")
        self._writer = RecordWriter(self._file)
        self._writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def flush(self) -> None:
        if not self._pending:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            self._open()
        for step, wall, tag, value in self._pending:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
            self._writer.write(event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString())
        self._file.flush()
        self._pending.clear()
        self._last_flush = time.time()

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and self._writer is None:
            self._open()  # imports the protobuf modules once, before the first step

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tag = "eval/" + k[5:] if k.startswith("eval_") else "test/" + k[5:] if k.startswith("test_") else "train/" + k
                self._pending.append((state.global_step, now, tag, float(v)))
        if now - self._last_flush >= self.flush_s:
            self.flush()

    def on_evaluate(self, args, state, control, **kw):
        self.flush()

    def on_save(self, args, state, control, **kw):
        self.flush()

    def on_train_end(self, args, state, control, **kw):
        self.flush()
        if self._file is not None:
            self._file.close()
            self._writer = self._file = None
