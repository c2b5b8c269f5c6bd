"""`qlora-kit export RUN_DIR --format gguf|peft`: the tuned model in a form other tools serve.

    gguf  one llama.cpp / Ollama / LM Studio file: the merged model (the adapter merged into the
          dequantized NF4 base, exactly as `qlora-kit merge` does and verifies), its tokenizer and
          the run's chat template, in f32, f16, bf16 or q8_0 (gguf.py; its vocabulary: vocab.py)
    peft  a folder vLLM loads with --enable-lora: the adapter, a config naming the hub base model,
          the run's tokenizer (so its chat template travels) and a README with the serve command (peft.py)

What is exported, a run or a merged folder, is read by source.py. A new format is a module here
and a line in run(). Nothing is half-written: the output is built next to its target and renamed
into place.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .gguf import DTYPES, export_gguf
from .peft import export_peft

FORMATS = ("gguf", "peft")


def run(run_dir: str | Path, fmt: str = "gguf", out: str | Path | None = None, dtype: str = "f16",
        grants=None) -> dict:
    """Export a finished run (or, for gguf, a folder written by `qlora-kit merge`); returns a report
    whose "out" is the written path. `grants` (recipe.Grants): this command's own flags; the run's
    recipe.yaml grants nothing."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if fmt == "peft":
        return export_peft(Path(run_dir), out)
    return export_gguf(Path(run_dir), out, dtype, grants)
