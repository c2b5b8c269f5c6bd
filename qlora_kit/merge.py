"""`qlora-kit merge RUN_DIR`: a standalone model that answers like the adapter did.

The adapter was trained against the *dequantized NF4* weights, not the original ones, so:
    1. reference: adapter on the 4-bit base (exactly as trained), logits on a few real inputs
    2. dequantize a fresh 4-bit base to full precision, then merge the LoRA delta into it
       (merging into the original weights drifts ~6e-2; merging into 4-bit weights re-rounds)
    3. compare logits, refuse to write a model that does not match, then cast and save
The output loads with plain AutoModelForCausalLM.from_pretrained and has no quantization_config.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

from rich.console import Console

from . import rundir
from .errors import UserError

console = Console(stderr=True, soft_wrap=True)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| accepted between the merged model (in the working dtype) and the adapter.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}

FALLBACK_PROBES = ["Hello, how are you?", "请简要回答：这是一个测试问题。", "Return JSON: {\"a\": 1}"]


def probe_texts(run_dir: Path, tokenizer, recipe, n: int = 4) -> list[str]:
    """A few rendered training conversations (what the model actually sees), else fixed texts."""
    from . import data as data_mod
    from .template import render

    info = rundir.read_info(run_dir)
    path = Path(info.get("data", {}).get("path", ""))
    try:
        ds = data_mod.load(path, recipe.data.system_prompt, recipe.data.columns, skip_bad=True,
                           question_template=recipe.data.question_template)
        return [render(tokenizer, c) for c in ds.conversations[:n]]
    except (UserError, OSError):
        return FALLBACK_PROBES


def logits_for(model, tokenizer, texts: list[str], max_tokens: int = 96):
    import torch

    out = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False, return_tensors="pt").input_ids[:, :max_tokens]
            out.append(model(input_ids=ids.to(model.device)).logits.float().cpu())
    return out


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _work_dtype(n_params: int):
    """fp32 on CPU; on a GPU fp32 when it fits in free memory, else the bf16 compute dtype."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    free, _ = torch.cuda.mem_get_info()
    return torch.float32 if n_params * 4 < 0.8 * free else torch.bfloat16


def run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "bf16", max_shard_size: str = "5GB",
        grants=None) -> dict:
    """`grants` (recipe.Grants): what this command's flags allow; the run's recipe.yaml grants nothing."""
    run_dir, adapter = rundir.resolve(run_dir)  # RUN, or RUN/checkpoints/checkpoint-N; refused before torch loads
    import torch
    from peft import PeftModel

    from .model import load_4bit, load_saved_tokenizer, quiet_libraries, refuse_unsafe
    from .recipe import Grants, load_run_recipe

    quiet_libraries()
    info = rundir.read_info(run_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out) if out else run_dir / ("merged" if adapter.name == rundir.ADAPTER else f"merged-{adapter.name}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty", "pass another --out or delete it")
    recipe = load_run_recipe(run_dir, grants or Grants())
    base_path = info["base_model_path"]
    if not Path(base_path).is_dir():
        raise UserError(f"base model of this run not found at {base_path}",
                        "restore the base model there (the run card names it)")
    # refused here, before the probe data is read, not only inside load_4bit
    refuse_unsafe(base_path, recipe.trust_remote_code, recipe.allow_pickle)
    tokenizer = load_saved_tokenizer(run_dir / rundir.TOKENIZER, recipe.trust_remote_code)
    texts = probe_texts(run_dir, tokenizer, recipe)

    # 1. reference: the adapter on the 4-bit base, exactly as trained
    console.print("merge: computing reference logits with the adapter on the 4-bit base")
    quantized = PeftModel.from_pretrained(load_4bit(base_path, recipe), adapter).eval()
    ref = logits_for(quantized, tokenizer, texts)
    n_params = sum(p.numel() for p in quantized.parameters())
    del quantized
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 2. dequantize a fresh 4-bit base to full precision, then merge the LoRA delta
    work = _work_dtype(n_params * 2)  # a 4-bit param counts as half an element in numel()
    console.print(f"merge: dequantizing the NF4 base to {str(work).replace('torch.', '')} and merging LoRA")
    base = load_4bit(base_path, recipe)
    base = base.dequantize(dtype=work)
    if hasattr(base, "hf_quantizer"):
        del base.hf_quantizer
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    base.config.dtype = work
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload(safe_merge=True).eval()

    # 3. verify before writing anything
    got = logits_for(merged, tokenizer, texts)
    diff = max_diff(ref, got)
    wname = str(work).replace("torch.", "")
    tol = TOLERANCE[wname]
    console.print(f"merge: max |logit difference| merged vs adapter-on-4-bit: {diff:.2e} ({wname}, tolerance {tol:g})")
    if not diff <= tol:
        raise RuntimeError(f"merged model does not reproduce the adapter (max logit difference {diff:.3g} > {tol:g}); nothing written")
    target = getattr(torch, DTYPES[dtype])
    report = {"max_abs_logit_diff": diff, "work_dtype": wname, "tolerance": tol, "probes": len(texts), "dtype": dtype}
    if target != work:
        merged = merged.to(target)
        report["max_abs_logit_diff_after_cast"] = max_diff(ref, logits_for(merged, tokenizer, texts))
        console.print(f"merge: after casting to {dtype}: {report['max_abs_logit_diff_after_cast']:.2e} (rounding of {dtype})")
    merged.config.dtype = target
    stop = info.get("tokenizer", {}).get("stop_token_ids")
    if stop:
        merged.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id

    # 4. write atomically: a temporary folder renamed into place
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        rundir.share_tree(tmp)  # the safetensors writer makes owner-only files
        report.update(run_dir=str(run_dir.resolve()), adapter=str(adapter.resolve()), base_model=info["base_model"],
                      created=rundir.now())
        (tmp / "qlora_kit_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report
