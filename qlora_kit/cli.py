"""The `qlora-kit` command line. Parses, prints, exits; the work lives in the modules it calls.

No torch (or transformers, peft, trl) import at module level: `--help`, `recipes` and
`train --dry-run` must answer in a fraction of a second. Exit codes: 0 ok, 2 bad input, 1 failure.
Human messages go to stderr; stdout carries what a script would capture (paths, YAML).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="qlora-kit",
    help="QLoRA fine-tuning for domain experts: recipes, 4-bit training, merging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


@app.command("recipes")
def recipes_cmd() -> None:
    """List the built-in recipes: name, base model, data, what each is for."""
    from rich.table import Table

    from .recipe import BUILTIN_RECIPES, builtin_recipe_path, read_recipe_file

    table = Table(title="qlora-kit recipes")
    for col in ("name", "base model", "data", "for"):
        table.add_column(col, overflow="fold")
    for name in BUILTIN_RECIPES:
        path = builtin_recipe_path(name)
        if path is None:
            continue
        raw = read_recipe_file(path)
        data = (raw.get("data") or {}).get("path") or "–"
        table.add_row(name, str(raw.get("base_model", "")), os.path.relpath(data) if data != "–" else data,
                      str(raw.get("description", "")))
    out.print(table)


@app.command("train")
def train_cmd(
    recipe: str = typer.Argument(..., help="built-in recipe name (legal, medical, finance, industrial) or a YAML file"),
    data: Optional[Path] = typer.Option(None, "--data", help="Q/A file to train on (overrides data.path)"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="hub id, local model folder, or builtin:tiny"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe field: --set lora.r=32 (repeatable)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory (default: <output_dir>/<recipe>-<time>)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop after N optimizer steps"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from its repository"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe as YAML and exit"),
) -> None:
    """Fine-tune a 4-bit base model with LoRA on a Q/A file."""
    from . import recipe as recipe_mod

    flags = {
        "data.path": str(data.expanduser().resolve()) if data else None,
        "base_model": base_model,
        "training.max_steps": max_steps,
        "trust_remote_code": True if trust_remote_code else None,
    }
    resolved, _ = recipe_mod.resolve(recipe, set_, flags)
    if dry_run:
        sys.stdout.write(resolved.to_yaml())
        return
    from . import train

    path = train.run(resolved, str(run_dir) if run_dir else None)
    print(path)


@app.command("merge")
def merge_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory from `qlora-kit train`"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN_DIR/merged)"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | fp16 | fp32"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="safetensors shard size"),
) -> None:
    """Dequantize the 4-bit base, merge the adapter, verify, save a standalone model."""
    from . import merge

    report = merge.run(run_dir, out_dir, dtype, max_shard_size)
    print(report["out"])


@app.command("generate")
def generate_cmd(
    model_dir: Path = typer.Argument(..., help="a run directory (adapter) or a merged model folder"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the question"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
) -> None:
    """Answer one question with a trained adapter or merged model (greedy, stored chat template)."""
    from . import generate

    loaded = generate.load(model_dir)
    print(generate.answer(loaded, prompt, max_new_tokens))


def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error[/]: {e.message}", highlight=False)
        if e.hint:
            err.print(f"  [bold]fix[/]: {e.hint}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
