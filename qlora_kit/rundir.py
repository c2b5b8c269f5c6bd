"""The run directory: written by `train`, read back by every later command.

    runs/legal-20261201-093000/
      recipe.yaml      the resolved recipe (defaults + file + --set + flags)
      run.json         machine-readable facts: base model, data hash, rows, template, status, versions
      README.md        the run card, for people
      metrics.json     final losses and the full log history
      adapter/         adapter_model.safetensors + adapter_config.json (plain PEFT loads it)
      tokenizer/       tokenizer with the exact chat template used in training
      checkpoints/     Trainer checkpoints every save_steps
      logs/            TensorBoard event files; progress.jsonl, one JSON line per logged step (the UI reads it)

A run directory needs nothing else: merge, generate, eval, chat, serve and export take only its path.
Every reader also takes one complete checkpoint, RUN/checkpoints/checkpoint-N, in place of RUN:
run.resolve turns either into (run directory, adapter folder), so the run's recipe, tokenizer and
base model are used with that checkpoint's adapter. This module is the layout and the writing;
reading a run (run.json typed, the run opened and checked) is run.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError

ADAPTER, TOKENIZER, CHECKPOINTS, LOGS = "adapter", "tokenizer", "checkpoints", "logs"
# written into a checkpoint folder (by resilience.CompleteMarker) once every part of it is on disk
COMPLETE = "qlora_kit_complete.json"
_CHECKPOINT = re.compile(r"checkpoint-\d+")


_umask_lock = threading.Lock()
_umask_fallback: int | None = None


def umask() -> int:
    """The process umask. Linux shows it in /proc/self/status, a plain read; elsewhere the only way
    to read it is to set it, which is done once, under a lock (another thread creating a file in
    that instant would get the temporary mask)."""
    global _umask_fallback
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        if _umask_fallback is None:
            _umask_fallback = os.umask(0o077)
            os.umask(_umask_fallback)
        return _umask_fallback


def share(path, mode: int = 0o666) -> None:
    """Give a file the mode open() would have (`mode` minus the umask). mkstemp, and the safetensors
    writer (0.8, which saves through a temporary file), make owner-only files; run files, weights
    and exports are meant to be readable by whoever may read the folder they are in."""
    os.chmod(path, mode & ~umask())


def share_tree(folder) -> None:
    """share() every file and folder under `folder`, one this process has just written (an adapter,
    a checkpoint, a merged model): 0o666/0o777 minus the umask, as open() and mkdir() would make."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            share(Path(root) / d, 0o777)
        for f in files:
            share(Path(root) / f)
    share(folder, 0o777)


@contextmanager
def publishing(out):
    """Build the folder `out` (absent or empty) in a hidden sibling, yielded, and rename it into place
    when the block ends without an exception: no reader ever sees it half-written, and on an
    exception the sibling is removed. Its files get the modes open() would give (share_tree). The
    sibling's name is fixed, so a retry removes what a killed attempt left (gigabytes for a merge)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        share_tree(tmp)  # the safetensors writer makes owner-only files
        if out.exists():
            out.rmdir()  # empty: callers refuse a non-empty `out` before doing any work
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        share(tmp)  # mkstemp makes 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_dir(output_dir: str, recipe_name: str, explicit: str | None) -> Path:
    if explicit:
        p = Path(explicit)
        if p.exists() and any(p.iterdir()):
            raise UserError(f"run directory {p} already exists and is not empty",
                            "choose another --run-dir, or delete the old one")
        p.mkdir(parents=True, exist_ok=True)
        return p
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{recipe_name}-{stamp}"
    p, n = base, 1
    while p.exists():
        n += 1
        p = base.with_name(f"{base.name}-{n}")
    p.mkdir(parents=True)
    return p


def is_checkpoint_name(name: str) -> bool:
    """checkpoint-N, the name the Trainer gives a checkpoint folder."""
    return bool(_CHECKPOINT.fullmatch(name))


def checkpoint_step(p) -> int:
    """N of a checkpoint-N folder (-1 for another name): checkpoints sort by it."""
    try:
        return int(Path(p).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: Path) -> list[str]:
    """The names of the run's complete checkpoints (with their COMPLETE marker), oldest first."""
    found = [c for c in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*") if (c / COMPLETE).is_file()]
    return [c.name for c in sorted(found, key=checkpoint_step)]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("qlora-kit", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))


def _parallel_row(d: dict) -> str:
    return (f"| data parallel | {d['strategy'].upper()} over {d['processes']} processes ({d['backend']}): per process "
            f"{d['per_device_train_batch_size']}x{d['gradient_accumulation_steps']}, effective batch "
            f"{d['effective_batch']}, lr {d['learning_rate']:g}; {d['note']} |")


def _data_rows(d: dict) -> list[str]:
    """The card's data rows: the file and its sha256, or each of several files with its rows."""
    files = d.get("files") or []
    if len(files) <= 1:
        return [f"| data file | `{d['path']}` |", f"| data sha256 | `{d['sha256']}` |"]
    return [f"| data files | {len(files)} files, combined sha256 `{d['sha256']}` |"] + [
        f"| `{f['path']}` | rows read {f['rows']}, train / eval {f.get('train')} / {f.get('eval')}; sha256 `{f['sha256']}` |"
        for f in files]


def _fast_path_rows(fast: dict | None) -> list[str]:
    """What train decided for speed and memory, and why (fastpath.FastPath)."""
    if not fast:
        return []
    rows = [f"| attention | {fast['layout']['attn_implementation']}: {fast['layout']['why']} |",
            f"| gradient checkpointing | {fast['checkpointing']}: {fast['checkpointing_why']} |",
            f"| loss | {fast['loss_head_why']} |"]
    if "keep_dequantized" in fast:
        rows.append(f"| dequantized 4-bit weights kept for backward | {'yes' if fast['keep_dequantized'] else 'no'}: "
                    f"{fast['keep_dequantized_why']} |")
    th = fast.get("threads")
    if th:
        rows.append(f"| torch threads | {th['threads']} thread{'s' if th['threads'] != 1 else ''} ({th['source']}), "
                    f"inter-op {th['interop_threads']} |")
    return rows


def write_card(run_dir: Path, info: dict, recipe, metrics: dict) -> None:
    t, lo, q = recipe.training, recipe.lora, recipe.quantization
    la = info.get("lora", {"modules": "?", "trainable_params": 0})
    lines = [
        f"# qlora-kit run: {info['recipe']}",
        "",
        f"Status: **{info['status']}** · started {info['started']} · finished {info.get('finished', '–')}",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{info['base_model']}` |",
        *_data_rows(info["data"]),
        f"| rows read / train / eval | {info['data']['rows']} / {info['data']['train_rows']} / {info['data']['eval_rows']} |",
        f"| samples truncated at max_length / with the answer cut | {info['data']['truncated']} / {info['data']['answer_cut']} |",
        f"| chat template | {info['tokenizer']['template_source']} (stored in `tokenizer/`) |",
        f"| quantization | 4-bit {q.bnb_4bit_quant_type}, double quant {q.bnb_4bit_use_double_quant}, compute {info['compute_dtype']} |",
        f"| LoRA | r={lo.r}, alpha={lo.lora_alpha}, dropout={lo.lora_dropout}, {la['modules']} modules, {la['trainable_params']:,} trainable params |",
        f"| training | lr={t.learning_rate}, epochs={t.num_train_epochs}, max_steps={t.max_steps}, batch={t.per_device_train_batch_size}x{t.gradient_accumulation_steps}, max_length={t.max_length}, optim={t.optim} |",
        *([f"| max_length capped | {info['max_length_capped']['requested']} -> {info['max_length_capped']['used']}, "
            "the base model's context (max_position_embeddings) |"] if info.get("max_length_capped") else []),
        *([_parallel_row(info["distributed"])] if info.get("distributed") else []),
        f"| steps | {metrics.get('global_step', '–')} |",
        f"| final train loss | {_fmt(metrics.get('train_loss'))} |",
        f"| final eval loss | {_fmt(metrics.get('eval_loss'))} |",
        f"| device | {info['device']} |",
        *_fast_path_rows(info.get("fast_path")),
        "",
        "Library versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
        "Adapter check: " + info.get("adapter_check", "not run"),
        *([f"Error: `{info['error']}`", ""] if info.get("error") else []),
        "",
        f"Merge: `qlora-kit merge {run_dir}`",
        "",
    ]
    write_atomic(Path(run_dir) / "README.md", "\n".join(lines))
