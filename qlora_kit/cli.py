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

from . import domains
from .errors import UserError
from .terminal import console as err  # the one console every command prints its progress to

app = typer.Typer(
    name="qlora-kit",
    help="QLoRA fine-tuning for domain experts: recipes, 4-bit training, merging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

# Commands that read a run directory take these grants from their own command line only: the run's
# recipe.yaml may come from anyone (recipe.Grants, model.refuse_unsafe).
TRUST_HELP = "allow the base model's own Python code (auto_map) to run; a run's recipe.yaml never grants it"
PICKLE_HELP = "accept pickled *.bin weights (they can run code); a run's recipe.yaml never grants it"


JSON_SCHEMA_HELP = ("answer with JSON matching this JSON Schema file, enforced while decoding (compact, finished within "
                    "the token budget), e.g. recipes/finance.schema.json")


QUESTION_TEMPLATE_HELP = ("build each question from several columns (data.question_template): {column} inserts the "
                          "row's cell, {{ }} are literal braces, \\n is a line break; e.g. "
                          "'【故障代码】{fault_code}\\n【问题】{question}'")


def _grants(trust_remote_code: bool, allow_pickle: bool):
    from .recipe import Grants

    return Grants(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


@app.command("recipes")
def recipes_cmd() -> None:
    """List the built-in recipes: name, base model, data, what each is for."""
    from rich.table import Table

    from .recipe import builtin_recipe_path, read_recipe_file

    table = Table(title="qlora-kit recipes")
    for col in ("name", "base model", "data", "for"):
        table.add_column(col, overflow="fold")
    for name in domains.names():
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
    recipe: str = typer.Argument(..., help=f"built-in recipe name ({', '.join(domains.names())}) or a YAML file"),
    data: list[Path] = typer.Option([], "--data", help="data file or folder to train on (repeatable: read as one "
                                    "dataset; overrides data.path)"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="hub id, local model folder, or builtin:tiny"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe field: --set lora.r=32 (repeatable)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory (default: <output_dir>/<recipe>-<time>)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop after N optimizer steps"),
    columns: Optional[str] = typer.Option(None, "--columns", help="explicit data mapping, e.g. question=ask,answer=answer"),
    question_template: Optional[str] = typer.Option(None, "--question-template", help=QUESTION_TEMPLATE_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="drop unreadable data rows (counted) instead of stopping"),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="redact personal data before training"),
    # --no-...: the ui's jobs state the ui's own grants, overriding whatever the recipe file says
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                                     help="allow model code from its repository (a recipe cannot grant this itself)"),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle/--no-allow-pickle",
                                                help="accept pickled *.bin weights, they can run code (a recipe cannot grant this itself)"),
    from_adapter: Optional[Path] = typer.Option(None, "--from-adapter", help="continue training this run's adapter on new data"),
    force: bool = typer.Option(False, "--force", help="start an existing --run-dir over instead of resuming it"),
    auto_batch: bool = typer.Option(False, "--auto-batch", help="on CUDA out-of-memory, halve the micro-batch and retry"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="data-parallel training on N GPUs (torchrun, DDP)"),
    fsdp: bool = typer.Option(False, "--fsdp", help="with --gpus: shard the 4-bit base across the GPUs (FSDP QLoRA)"),
    cpu_processes: Optional[int] = typer.Option(None, "--cpu-processes", help="the data-parallel path on N CPU processes (gloo; slow, for testing)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe as YAML and exit"),
) -> None:
    """Fine-tune a 4-bit base model with LoRA on a Q/A file."""
    from . import data as data_mod
    from . import recipe as recipe_mod
    from .rowtemplate import from_command_line

    flags = {
        "data.path": _data_paths(data),
        "data.columns": data_mod.parse_columns(columns) if columns else None,
        "data.question_template": from_command_line(question_template),
        "data.skip_bad": True if skip_bad else None,
        "data.scrub_pii": True if scrub_pii else None,
        "base_model": base_model,
        "training.max_steps": max_steps,
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
        "from_adapter": str(from_adapter.resolve()) if from_adapter else None,
    }
    resolved, _ = recipe_mod.resolve(recipe, set_, flags)
    _refuse_recipe_grants(resolved, trust_remote_code, allow_pickle)
    if dry_run:
        sys.stdout.write(resolved.to_yaml())
        return
    if gpus or cpu_processes or fsdp:
        from . import distributed

        if distributed.world().size == 1:  # the launcher; workers (under torchrun) train below
            sys.exit(_launch_parallel(resolved, run_dir, gpus, cpu_processes, fsdp, force, auto_batch))
    from . import train

    path = train.run(resolved, str(run_dir) if run_dir else None, force=force, auto_batch=auto_batch)
    if "QLORA_KIT_PARALLEL" not in os.environ:  # our launcher prints the path once, not each worker
        print(path)


def _refuse_recipe_grants(resolved, trust_remote_code: Optional[bool], allow_pickle: Optional[bool]) -> None:
    """A recipe file (or --set) may be someone else's: it can ask for model code or pickles, but only
    this command line grants them. Without the flag the request is refused, never silently dropped,
    so a recipe that truly needs custom code says what to pass."""
    for field, flag, given in (("trust_remote_code", "--trust-remote-code", trust_remote_code),
                               ("allow_pickle", "--allow-pickle", allow_pickle)):
        if getattr(resolved, field) and given is not True:
            raise UserError(f"the recipe sets {field}: true, which only the command line can grant",
                            f"if you trust this model, add {flag} to the train command; otherwise remove "
                            f"{field} from the recipe")


def _launch_parallel(resolved, run_dir: Optional[Path], gpus: Optional[int], cpu_processes: Optional[int],
                     fsdp: bool, force: bool, auto_batch: bool) -> int:
    """Start N workers that each run this same `train` on the resolved recipe and one run directory."""
    import tempfile

    from . import devices, distributed, rundir

    if gpus and cpu_processes:
        raise UserError("--gpus and --cpu-processes exclude each other", "pass one of them")
    if fsdp and not (gpus or cpu_processes):
        raise UserError("--fsdp shards the model across GPUs", "pass --gpus N with it")
    n = gpus or cpu_processes
    distributed.check_request(n, cpu=bool(cpu_processes), fsdp=fsdp)
    from . import train

    # what train would refuse (bad data, a missing model), refused here before any worker starts
    # or any directory is made; the data report is cached, so the workers do not redo the work
    train.preflight(resolved, quiet=True)
    # the workers must agree on one directory: choose it here (a new, empty one unless given)
    made = run_dir is None or not run_dir.exists()
    target = run_dir or rundir.new_run_dir(resolved.output_dir, resolved.name, None)
    with tempfile.TemporaryDirectory(prefix="qlora-kit-launch-") as tmp:
        argv = _worker_argv(resolved, Path(tmp), target, force, auto_batch)
        threads = max(1, devices.usable_cores() // n) if cpu_processes else None  # as one process would use them
        worker = [sys.executable, "-u", "-m", "qlora_kit.cli", "train", *argv]  # `qlora-kit train` in each
        code = distributed.launch(worker, n, distributed.worker_env("fsdp" if fsdp else "ddp", threads))
    if code == 0:
        print(target)
    elif made and Path(target).is_dir() and not any(Path(target).iterdir()):
        Path(target).rmdir()  # the workers stopped before writing anything: leave nothing behind
    else:
        distributed.mark_failed(Path(target), code)
    return code


def _worker_argv(resolved, folder: Path, target: Path, force: bool, auto_batch: bool) -> list[str]:
    """`train` arguments for each data-parallel worker: the resolved recipe (written into `folder`)
    and this command line's grants, which a recipe file alone may not give (_refuse_recipe_grants)."""
    from .recipe import Grants

    recipe_file = folder / f"{resolved.name}.yaml"
    recipe_file.write_text(resolved.to_yaml(), encoding="utf-8")
    return [str(recipe_file), "--run-dir", str(target)] + (["--force"] if force else []) + \
        (["--auto-batch"] if auto_batch else []) + Grants(resolved.trust_remote_code, resolved.allow_pickle).flags()


@app.command("plan")
def plan_cmd(
    recipe: str = typer.Argument(..., help="built-in recipe name or a YAML file"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="hub id, local folder or config.json (config only, no weights)"),
    gpu_memory: str = typer.Option("24GiB", "--gpu-memory", help="the card's memory, e.g. 24GiB, 48GiB, 80GB"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="override training.max_length"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe field: --set lora.r=32"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON on stdout"),
) -> None:
    """Estimate peak GPU memory by component from the model config; does it fit, what would."""
    import json

    from . import plan as plan_mod
    from . import recipe as recipe_mod

    rec, _ = recipe_mod.resolve(recipe, set_, {"base_model": base_model})
    p = plan_mod.make(rec, None, plan_mod.parse_size(gpu_memory), max_length)
    if as_json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        plan_mod.render(p, err)


@app.command("merge")
def merge_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="a run directory from `qlora-kit train` (or use --adapter)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN_DIR/merged); with "
                                           "--adapter the combination's own run directory (merged model in DIR/merged)"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | fp16 | fp32"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="safetensors shard size"),
    adapter: list[str] = typer.Option([], "--adapter", metavar="RUN_DIR=WEIGHT", help="combine several runs on one "
                                      "base (repeatable): --adapter runs/legal-1=0.7 --adapter runs/contracts-2=0.3"),
    method: str = typer.Option("linear", "--method", help="with --adapter: linear | cat | ties | dare_ties (PEFT's "
                               "add_weighted_adapter; linear, ties and dare_ties need equal LoRA ranks)"),
    density: Optional[float] = typer.Option(None, "--density", help="ties/dare_ties: fraction of each adapter's "
                                            "entries kept (default 0.5)"),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="with --adapter: write only the combined "
                                      "adapter as a run directory (for chat/serve), no merged model"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Dequantize the 4-bit base, merge the adapter, verify, save a standalone model."""
    from . import merge

    grants = _grants(trust_remote_code, allow_pickle)
    if adapter:
        if run_dir is not None:
            raise UserError(f"pass either RUN_DIR ({run_dir}) or --adapter RUN_DIR=WEIGHT, not both",
                            f"to combine it with others: --adapter {run_dir}=WEIGHT")
        report = merge.combine(adapter, out_dir, method, density, dtype, max_shard_size, adapter_only, grants)
    elif run_dir is None:
        raise UserError("nothing to merge", "qlora-kit merge RUN_DIR, or --adapter RUN_DIR=WEIGHT (repeatable)")
    elif adapter_only or density is not None or method != "linear":
        raise UserError("--method, --density and --adapter-only combine several runs", "pass them with --adapter RUN_DIR=WEIGHT")
    else:
        report = merge.run(run_dir, out_dir, dtype, max_shard_size, grants=grants)
    print(report["out"])


@app.command("generate")
def generate_cmd(
    model_dir: Path = typer.Argument(..., help="a run directory (adapter) or a merged model folder"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the question"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", metavar="FILE", help=JSON_SCHEMA_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Answer one question with a trained adapter or merged model (greedy, stored chat template)."""
    from .serve import engine

    constraint = _json_schema(json_schema)  # a bad schema file is refused before the model loads
    loaded = engine.load(model_dir, _grants(trust_remote_code, allow_pickle))
    if constraint is None:
        print(engine.answer(loaded, prompt, max_new_tokens))
        return
    res = loaded.generate(loaded.messages(prompt), max_new_tokens, constraint=constraint)
    print(res.text)
    _json_cut(res, constraint, loaded, max_new_tokens)


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory from `qlora-kit train`"),
    data: Optional[Path] = typer.Option(None, "--data", help="questions to evaluate on (default: the run's held-out split)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate at most N samples"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", metavar="FILE", help="also answer each question "
                                               "under this JSON Schema (constrained decoding) and report valid JSON with "
                                               "and without it (default: the recipe's evaluation.json_schema)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    grades: list[Path] = typer.Option([], "--grades", metavar="FILE", help="read a graded review sheet (.csv/.xlsx) "
                                      "back into the report instead of answering again (repeatable: one per "
                                      "grader); no model is loaded"),
) -> None:
    """Base vs tuned on held-out questions: domain metrics, report.md/.html, a blind review.csv to grade."""
    if grades:
        from .eval import evaluate

        if data or limit or max_new_tokens or json_schema:
            raise UserError("--grades reads grades back and answers no questions: --data, --limit, "
                            "--max-new-tokens and --json-schema do not apply", f"run `qlora-kit eval {run_dir}` and `--grades` separately")
        evaluate.grade(run_dir, grades)
        print(run_dir / "report.html")
        return
    from .eval import evaluate

    result = evaluate.run(run_dir, str(data) if data else None, limit, max_new_tokens,
                          grants=_grants(trust_remote_code, allow_pickle), json_schema=json_schema)
    from .eval.report import metric_rows

    from rich.table import Table

    t = Table(title=f"{result['samples']} held-out samples, task {result['task']}")
    for col in ("metric", "base", "tuned", "delta"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for label, b, tu, d, higher in metric_rows(result["summary"]):
        f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        t.add_row(label + ("" if higher else " ↓"), f(b), f(tu), f(d))
    err.print(t)
    print(run_dir / "report.html")


@app.command("chat")
def chat_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="a run directory (its adapter is loaded under its folder name)"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=RUN_DIR, repeatable: several adapters on one base"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this one question and exit"),
    use: Optional[str] = typer.Option(None, "--use", help="adapter to start with (default: the first)"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", metavar="FILE", help=JSON_SCHEMA_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Chat with a tuned model, streaming; /use NAME switches adapters without reloading the base."""
    from .serve import chat
    from .serve.engine import Engine

    constraint = _json_schema(json_schema)
    engine = Engine.from_runs(chat.parse_adapters(run_dir, adapter), _grants(trust_remote_code, allow_pickle))
    if use:
        engine.use(None if use == "base" else use)
    if prompt is not None:
        res = chat.one_shot(engine, prompt, max_new_tokens, constraint=constraint)
        if constraint is not None:
            _json_cut(res, constraint, engine, max_new_tokens)
    else:
        chat.repl(engine, max_new_tokens, err, constraint=constraint)


def _json_schema(path: Optional[Path]):
    """--json-schema FILE as a compiled constraint (None without the option)."""
    if path is None:
        return None
    from .serve import structured

    return structured.load(path)


def _json_cut(res, constraint, engine, max_new_tokens: int) -> None:
    """A constrained answer cut by the token budget is not valid JSON: say so and exit 1."""
    if res.finish_reason != "length":
        return
    a = engine.current
    need = constraint.min_tokens(a.tokenizer, a.stop_ids)
    err.print(f"[bold red]error[/]: the answer reached --max-new-tokens {max_new_tokens} before its JSON was complete, "
              "so it is not valid JSON" + (f" (the schema needs at least {need} tokens with this model)" if need else ""),
              highlight=False)
    err.print("  [bold]fix[/]: raise --max-new-tokens, or bound the schema's strings (maxLength)", highlight=False)
    sys.exit(1)


@app.command("serve")
def serve_cmd(
    run_dirs: list[Path] = typer.Argument(None, help="run directories; each adapter is served under its folder name"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=RUN_DIR, repeatable: serve an adapter under NAME"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require `Authorization: Bearer KEY` (also QLORA_KIT_API_KEY)"),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="read the API key from this file"),
    engine: str = typer.Option("hf", "--engine", help="hf (transformers, 4-bit) | vllm (GPU, multi-LoRA)"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="default completion length when a request gives none"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests allowed to wait; beyond that, 429 server_busy"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """OpenAI-compatible API (/v1/models, /v1/chat/completions) for several adapters on one base."""
    from . import serve

    key = api_key or os.environ.get("QLORA_KIT_API_KEY")
    if api_key_file is not None:
        try:
            key = api_key_file.expanduser().read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"--api-key-file {api_key_file}: {e.strerror}", "pass a readable file holding the key") from None
        if not key:
            raise UserError(f"--api-key-file {api_key_file} is empty", "write the key into it")
    runs = [str(p) for p in (run_dirs or [])] + list(adapter)
    if not runs:
        raise UserError("no run directory given", "qlora-kit serve RUN_DIR [RUN_DIR ...] or --adapter NAME=RUN_DIR")
    serve.main(runs, host=host, port=port, api_key=key, engine=engine, max_tokens=max_tokens, max_queue=max_queue,
               grants=_grants(trust_remote_code, allow_pickle))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory from `qlora-kit train` (or a merged model folder)"),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama) | peft (a vLLM-ready adapter)"),
    dtype: str = typer.Option("f16", "--dtype", help="GGUF tensor type: f16 | bf16 | q8_0 | f32"),
    out: Optional[Path] = typer.Option(None, "--out", help="output file or folder (default: under RUN_DIR/export/)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Export the tuned model: a GGUF file of the merged model, or the adapter for vLLM."""
    from . import export

    report = export.run(run_dir, fmt, out, dtype, grants=_grants(trust_remote_code, allow_pickle))
    print(report["out"])  # export.run has printed its warnings


@app.command("ui")
def ui_cmd(
    runs: Path = typer.Option(Path("runs"), "--runs", help="folder holding the run directories"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; any other than loopback needs --token-file"),
    port: int = typer.Option(7860, "--port"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="file holding the access token (required off loopback)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let the page's runs, merges, exports, "
                                           "evaluations and Try load models that bring their own Python code; no form field can"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="the same for pickled *.bin weights"),
    data_dir: list[Path] = typer.Option([], "--data-dir", help="a folder the New run form may read data and recipes "
                                        "from, besides --runs and its uploads (repeatable)"),
) -> None:
    """A local web page to start, watch, compare and try fine-tunes."""
    from . import ui

    ui.main(runs, host=host, port=port, token_file=token_file, grants=_grants(trust_remote_code, allow_pickle),
            data_dirs=data_dir)


data_app = typer.Typer(help="Check, redact and generate training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _data_paths(paths: list[Path]):
    """--data (repeatable) as data.path: one path, a list of several, or None (the recipe's)."""
    resolved = [str(p.expanduser().resolve()) for p in paths]
    return resolved[0] if len(resolved) == 1 else resolved or None


def _data_recipe(recipe: Optional[str], files: list[Path], base_model: Optional[str], columns: Optional[str],
                 skip_bad: bool, max_length: Optional[int], scrub: bool = False, question_template: Optional[str] = None):
    from . import data as data_mod
    from . import recipe as recipe_mod
    from .rowtemplate import from_command_line

    flags = {"data.path": _data_paths(files), "data.question_template": from_command_line(question_template),
             "base_model": base_model,
             "training.max_length": max_length, "data.skip_bad": True if skip_bad else None,
             "data.scrub_pii": True if scrub else None}
    if columns:
        flags["data.columns"] = data_mod.parse_columns(columns)
    if recipe:
        return recipe_mod.resolve(recipe, [], flags)[0]
    raw = {"base_model": "builtin:none"}
    for k, v in flags.items():
        if v is not None:
            recipe_mod.apply_override(raw, k.split("."), v)
    return recipe_mod.validate(raw, "command line")


@data_app.command("check")
def data_check_cmd(
    files: list[Path] = typer.Argument(..., metavar="FILE|FOLDER", help="JSONL, JSON, CSV/TSV, XLSX or dialogue "
                                       "text files, or folders of them (one level deep): several are checked as one dataset"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="check under this recipe's tokenizer, template and max_length"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="tokenizer to measure lengths with (hub id, folder, builtin:tiny)"),
    columns: Optional[str] = typer.Option(None, "--columns", help="explicit mapping, e.g. question=ask,answer=answer "
                                          "(template=COL: a column holding each row's own question template)"),
    question_template: Optional[str] = typer.Option(None, "--question-template", help=QUESTION_TEMPLATE_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="drop unreadable rows (counted) instead of stopping"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="override training.max_length"),
    scrub: bool = typer.Option(False, "--scrub-pii", help="check the data as it would be after redaction"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Report what would be trained: rows, drops (file:line), duplicates, leakage, lengths, one sample."""
    import json

    from .data import check
    from .data.render import render

    rec = _data_recipe(recipe, files, base_model, columns, skip_bad, max_length, scrub, question_template)
    # the tokenizer is loaded with this command line's grant alone: a recipe file may be someone
    # else's, and a check only reads (no pickled weights are loaded at all)
    rec = rec.model_copy(update={"trust_remote_code": trust_remote_code, "allow_pickle": False})
    tok = stop = note = None
    if rec.base_model != "builtin:none":
        from .model import load_tokenizer_for_check

        tok, stop, note = load_tokenizer_for_check(rec)
    else:
        note = "pass --recipe or --base-model to measure token lengths"
    prep = check.prepare(rec, tok, stop, note)
    if as_json:
        print(json.dumps(prep.report, ensure_ascii=False, indent=2))
    else:
        render(prep.report, err)


@data_app.command("scrub")
def data_scrub_cmd(
    file: Path = typer.Argument(..., help="a data file in any format `data check` reads"),
    out_file: Path = typer.Option(..., "-o", "--out", help="output JSONL (OpenAI messages layout)"),
    columns: Optional[str] = typer.Option(None, "--columns", help="explicit mapping, e.g. question=ask,answer=answer"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="drop unreadable rows (counted) instead of stopping"),
) -> None:
    """Redact personal data (ID, bank card, phone numbers, e-mails, labelled names) into a new file."""
    import json

    from . import data as data_mod
    from .data import pii
    from .rundir import write_atomic

    if out_file.resolve() == file.resolve():
        raise UserError("--out must differ from the input file", "write the redacted copy to a new file")
    ds = data_mod.load(file, None, data_mod.parse_columns(columns), skip_bad)
    convs, counts = pii.scrub_conversations(ds.conversations)
    write_atomic(out_file, "".join(json.dumps(data_mod.to_record(c), ensure_ascii=False) + "\n" for c in convs))
    summary = ", ".join(f"{k}: {counts.get(k, 0)}" for k in pii.KINDS)
    err.print(f"redacted {sum(counts.values())} items in {len(convs)} conversations ({summary})", highlight=False)
    print(out_file)


@data_app.command("synth")
def data_synth_cmd(
    domain: str = typer.Argument(..., help="; ".join(f"{d.name}: {d.synth_about}" for d in map(domains.get, domains.with_synth()))),
    n: int = typer.Option(2000, "-n", help="number of pairs"),
    out_file: Path = typer.Option(..., "-o", "--out", help="output JSONL"),
    seed: int = typer.Option(0, "--seed", help="same seed, same file"),
) -> None:
    """Generate a starter set of synthetic Q/A pairs from templates (fixed seed)."""
    from .data import synth

    generate = domains.synth_generator(domain)
    if generate is None:
        raise UserError(f"no synthetic generator for '{domain}'", f"available: {', '.join(domains.with_synth())}")
    if n < 1:
        raise UserError("-n must be at least 1")
    synth.write_jsonl(out_file, generate(n=n, seed=seed))
    err.print(f"wrote {n} {domain} pairs (seed {seed})")
    print(out_file)


def main() -> None:
    from .quiet import library_notes

    library_notes()  # before any command imports bitsandbytes, which logs at import
    try:
        app()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # data-parallel workers: rank 0 speaks for all
            err.print(f"[bold red]error[/]: {e.message}", highlight=False)
            if e.hint:
                err.print(f"  [bold]fix[/]: {e.hint}", highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
