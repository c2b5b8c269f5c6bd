"""export --format peft: a folder vLLM loads with --enable-lora (and PEFT with from_pretrained): the
adapter, its config naming the hub base model, the run's tokenizer (so its chat template travels)
and a README with the serve command."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


from .. import rundir
from ..errors import UserError
from ..run import RunInfo, default_name, open_run
from ..terminal import console
from .source import check_free, is_merged_dir, read_json

# vLLM's default --max-lora-rank; a larger adapter rank needs the flag
VLLM_MAX_LORA_RANK = 16


def export_peft(path: Path, out: str | Path | None) -> dict:
    if is_merged_dir(path):
        raise UserError(f"{path} is a merged model, which has no adapter to export",
                        "pass the run directory (the merged folder's parent), or use --format gguf")
    r = open_run(path)  # RUN, or RUN/checkpoints/checkpoint-N with its adapter
    run, adapter, info = r.dir, r.adapter, r.info
    out = Path(out) if out else run / "export" / ("peft" if adapter.name == rundir.ADAPTER else f"peft-{adapter.name}")
    check_free(out)
    cfg = read_json(adapter / "adapter_config.json")
    warnings = []
    base = info.base_model
    if base.startswith("builtin:"):
        base = info.base_model_path
        warnings.append(f"{info.base_model} is a local test model; the config names its folder {base}")
    # vLLM (and PEFT) look the base up by this name; a training machine's cache path means nothing elsewhere
    cfg["base_model_name_or_path"] = base
    if cfg.get("modules_to_save"):
        warnings.append(f"the adapter also trains whole modules (modules_to_save: {', '.join(cfg['modules_to_save'])}); "
                        "vLLM's LoRA refuses such adapters ('vLLM only supports modules_to_save being None'), and "
                        "without those weights the model would answer differently; serve it with PEFT, or use "
                        "`qlora-kit merge` (vllm serve MERGED_DIR) or --format gguf")
    if cfg.get("use_dora"):
        warnings.append("DoRA adapters are not supported by vLLM's LoRA")
    if cfg.get("bias", "none") != "none":
        warnings.append(f"lora bias={cfg['bias']} is not supported by vLLM's LoRA")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", default_name(path)).strip("-") or "adapter"
    rank = max([cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()])
    serve = f"vllm serve {base} --enable-lora --lora-modules {name}={out.resolve()}"
    if rank > VLLM_MAX_LORA_RANK:
        serve += f" --max-lora-rank {rank}"
    template_source = info.tokenizer.template_source
    tok_dir = run / rundir.TOKENIZER
    if template_source != "model" and (tok_dir / "chat_template.jinja").is_file():
        # vLLM renders prompts with the base model's template unless told otherwise
        serve += f" --chat-template {out.resolve() / 'chat_template.jinja'}"

    with rundir.publishing(out) as tmp:
        shutil.copyfile(adapter / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for f in sorted(tok_dir.iterdir()) if tok_dir.is_dir() else []:
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        (tmp / "README.md").write_text(_peft_readme(info, base, name, serve, template_source, warnings), encoding="utf-8")
    files = sorted(p.name for p in out.iterdir())
    console.print(f"export: wrote {out} ({len(files)} files)\n  serve: {serve}")
    for w in warnings:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    return {"format": "peft", "out": str(out), "files": files, "bytes": sum((out / f).stat().st_size for f in files),
            "base_model": base, "adapter_name": name, "rank": rank, "serve": serve, "warnings": warnings}


def _peft_readme(info: RunInfo, base: str, name: str, serve: str, template_source: str, warnings: list) -> str:
    lines = [
        f"# LoRA adapter `{name}` (qlora-kit)",
        "",
        (f"Base model: `{base}`. Trained by qlora-kit recipe `{info.recipe or '?'}` on "
         f"{'?' if info.data.train_rows is None else info.data.train_rows} examples against the 4-bit NF4 base."),
        "",
        "Serve with vLLM:",
        "",
        "```",
        serve,
        "```",
        "",
        (f"then ask for `\"model\": \"{name}\"` in OpenAI-style requests. The tokenizer files here carry the chat "
         f"template used in training ({template_source}); "
         + ("it is the base model's own." if template_source == "model" else "`--chat-template` above makes vLLM use it.")),
        "",
        "With PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)`.",
        "",
    ]
    if warnings:
        lines += ["Warnings:", "", *[f"- {w}" for w in warnings], ""]
    return "\n".join(lines)
