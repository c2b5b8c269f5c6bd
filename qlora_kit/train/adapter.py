"""The adapter a run trains: continued from an earlier run's (--from-adapter), checked, saved.

A saved adapter must be finite and trained (LoRA B starts at zero, so all-zero B learned nothing),
and its files on disk at least as big as the weights they hold; it is written beside the run and
renamed into place, so a crash never leaves a half-written adapter/ behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import rundir
from ..errors import UserError
from ..run import open_run
from ..terminal import console


def from_adapter_folder(source: str, base_model: str, model_dir: str) -> Path:
    """The adapter folder --from-adapter names (a run's final adapter, or one of its complete
    checkpoints), refused unless it was trained on this base model."""
    src = Path(source)
    r = open_run(src)
    info, adapter = r.info, r.adapter
    if info.base_model_path != model_dir:
        raise UserError(f"--from-adapter {src}: that adapter was trained on {info.base_model}, not on {base_model}",
                        f"use --base-model {info.base_model}, the base of the run you continue")
    return adapter


def continue_adapter(model, source: str, base_model: str, model_dir: str):
    """Start from a trained adapter (laws or guidelines changed: train on the new data)."""
    from peft import PeftModel

    adapter = from_adapter_folder(source, base_model, model_dir)
    console.print(f"continuing the adapter of {source}")
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


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


def save_adapter(model, run_dir: Path, info: dict) -> None:
    """Check the trained weights, save them atomically as RUN/adapter, check the files; the checks'
    findings go to info["adapter_check"]."""
    info["adapter_check"] = check_adapter(model)
    final = run_dir / rundir.ADAPTER
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    rundir.share_tree(tmp)  # the safetensors writer makes owner-only files
    info["adapter_check"] += "; " + check_adapter_files(tmp, info["lora"]["trainable_params"])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
