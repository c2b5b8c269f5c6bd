"""`qlora-kit merge RUN_DIR`: a standalone model that answers like the adapter did.

The adapter was trained against the *dequantized NF4* weights, not the original ones, so:
    1. reference: adapter on the 4-bit base (exactly as trained), logits on a few real inputs
    2. dequantize a fresh 4-bit base to full precision, then merge the LoRA delta into it
       (merging into the original weights drifts ~6e-2; merging into 4-bit weights re-rounds)
    3. compare logits, refuse to write a model that does not match, then cast and save
The output loads with plain AutoModelForCausalLM.from_pretrained and has no quantization_config.

A merged folder stands alone: moved away from its run it still answers as the adapter did. The
run's system prompt is baked into the saved chat template as its default (rendered when the
messages have no system message), and generation_config.json stops at every id that ends an
answer (the EOS and the template's end-of-turn), so plain transformers (apply_chat_template +
generate), `qlora-kit generate FOLDER` and a GGUF exported from it prompt and stop as in training.

`combine` (merge --adapter RUN=W ...): several runs on one base combined through PEFT's
add_weighted_adapter into one adapter, written as a run directory of its own (so chat, serve,
generate and export take it like any run), then merged and checked exactly as above.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .errors import UserError
from .run import RunInfo, data_changed, is_run_dir, open_run, read_info, resolve, write_info
from .terminal import console


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| accepted between the merged model (in the working dtype) and the adapter.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}

FALLBACK_PROBES = ["Hello, how are you?", "请简要回答：这是一个测试问题。", "Return JSON: {\"a\": 1}"]


def probe_texts(run_dir: Path, tokenizer, recipe, n: int = 4) -> list[str]:
    """A few rendered training conversations (what the model actually sees), else fixed texts."""
    from . import data as data_mod
    from .recipe import load_saved
    from .template import render

    info = read_info(run_dir)
    sources = [Path(a["run"]) for a in (info.combination or {}).get("adapters", [])]
    if sources:  # a combination: a few conversations of each run it combines, rendered with its template
        per = -(-n // len(sources))
        texts = [t for s in sources if is_run_dir(s)
                 for t in probe_texts(s, tokenizer, load_saved(s / "recipe.yaml"), per) if t not in FALLBACK_PROBES]
        return texts or FALLBACK_PROBES
    path = Path(info.data.path or "")
    try:
        ds = data_mod.load_recipe_data(recipe.data, path, skip_bad=True)
        changed = data_changed(info, run_dir, [(s.path, s.sha256) for s in ds.sources])
        if changed:  # the check compares two models on the same texts, any texts do: said, not refused
            console.print(f"[yellow]warning[/]: {changed}; merge probes with it as it is now", highlight=False)
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


def bake_system_prompt(tokenizer, system_prompt: str | None) -> bool:
    """Make the run's system prompt the template's default (template.with_default_system), kept
    only if the baked template renders conversations without a system message exactly as the
    original renders them with it; True when the template now carries the prompt."""
    from .template import render, with_default_system

    original = tokenizer.chat_template
    if not system_prompt or not original:
        return False
    turns = [[{"role": "user", "content": "Hello?"}],
             [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]]
    cases = [(t, gen) for t in turns for gen in (True, False)]
    try:
        want = [render(tokenizer, [{"role": "system", "content": system_prompt}] + t, gen) for t, gen in cases]
        tokenizer.chat_template = with_default_system(original, system_prompt)
        if [render(tokenizer, t, gen) for t, gen in cases] == want:
            return True
    except Exception:  # a template that refuses the probe turns: keep it as it was
        pass
    tokenizer.chat_template = original
    return False


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
    r, out = _checked(run_dir, out, dtype, grants)  # every refusal before torch loads
    import torch

    from .model import load_saved_tokenizer
    from .quiet import quiet_libraries

    quiet_libraries()
    tokenizer = load_saved_tokenizer(r.tokenizer_dir, r.recipe.trust_remote_code)
    texts = probe_texts(r.dir, tokenizer, r.recipe)
    ref, n_params = _reference(r, tokenizer, texts)
    merged, work = _merge_dequantized(r, n_params)

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
    report.update(_standalone(merged, tokenizer, r))

    # 4. write atomically: a temporary folder renamed into place
    with rundir.publishing(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        report.update(run_dir=str(r.dir.resolve()), adapter=str(r.adapter.resolve()), base_model=r.info.base_model,
                      created=rundir.now())
        (tmp / "qlora_kit_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["out"] = str(out)
    return report


def _checked(path, out, dtype: str, grants):
    """(the run opened, the output folder), or a UserError: nothing here loads torch."""
    from .model import refuse_unsafe

    r = open_run(path, grants)  # RUN, or RUN/checkpoints/checkpoint-N
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out) if out else r.dir / ("merged" if r.adapter.name == rundir.ADAPTER else f"merged-{r.adapter.name}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty", "pass another --out or delete it")
    # refused here, before the probe data is read, not only inside load_4bit
    refuse_unsafe(r.base_model_path, r.recipe.trust_remote_code, r.recipe.allow_pickle)
    return r, out


def _reference(r, tokenizer, texts: list[str]):
    """1. (logits of the adapter on the 4-bit base, exactly as trained; the model's numel())."""
    import torch
    from peft import PeftModel

    from .model import load_4bit

    console.print("merge: computing reference logits with the adapter on the 4-bit base")
    quantized = PeftModel.from_pretrained(load_4bit(r.base_model_path, r.recipe), r.adapter).eval()
    ref = logits_for(quantized, tokenizer, texts)
    n_params = sum(p.numel() for p in quantized.parameters())
    del quantized
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ref, n_params


def _merge_dequantized(r, n_params: int):
    """2. a fresh 4-bit base dequantized to full precision, the LoRA delta merged in: (model, dtype)."""
    from peft import PeftModel

    from .model import load_4bit

    work = _work_dtype(n_params * 2)  # a 4-bit param counts as half an element in numel()
    console.print(f"merge: dequantizing the NF4 base to {str(work).replace('torch.', '')} and merging LoRA")
    base = load_4bit(r.base_model_path, r.recipe)
    base = base.dequantize(dtype=work)
    if hasattr(base, "hf_quantizer"):
        del base.hf_quantizer
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    base.config.dtype = work
    return PeftModel.from_pretrained(base, r.adapter).merge_and_unload(safe_merge=True).eval(), work


def _standalone(merged, tokenizer, r) -> dict:
    """What makes the folder answer alone as in training: generate() stops where training's answers
    ended, and the run's system prompt is the template's default; the report's part about it."""
    stop = r.info.tokenizer.stop_token_ids
    if stop:  # generation_config.json: plain generate() stops at the end-of-turn as well as at EOS
        merged.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    system = r.recipe.data.system_prompt
    out = {"system_prompt": system, "stop_token_ids": stop or [],
           "system_prompt_in_template": bake_system_prompt(tokenizer, system)}
    if system and not out["system_prompt_in_template"]:
        console.print("[yellow]warning[/]: this chat template cannot take the run's system prompt as a default; "
                      "outside qlora-kit pass it as the system message yourself (qlora_kit_merge.json has it)",
                      highlight=False)
    return out


# --- combining several runs' adapters (merge --adapter RUN=W --adapter RUN=W --method M) ----------

METHODS = ("linear", "cat", "ties", "dare_ties")
SAME_RANK = ("linear", "ties", "dare_ties")  # PEFT combines A and B matrices entry by entry: equal r
DENSITY_METHODS = ("ties", "dare_ties")
# ties/dare_ties keep this fraction of each adapter's largest entries (PEFT's density); half keeps
# most of what a small adapter learned while still resolving sign conflicts between the two
DEFAULT_DENSITY = 0.5
COMBINED = "combined"  # the adapter name inside PEFT; the components are a0, a1, ...
SEED = 0  # dare_ties drops entries at random: a fixed seed makes the same combination every time


def parse_spec(spec: str) -> tuple[Path, float]:
    """'runs/legal-1=0.7' -> (runs/legal-1, 0.7); the weight is required, any finite number
    (negative weights subtract an adapter, as in PEFT)."""
    import math

    path, sep, weight = spec.rpartition("=")
    try:
        w = float(weight) if sep and path else math.nan
    except ValueError:
        w = math.nan
    if not math.isfinite(w):
        raise UserError(f"--adapter {spec!r}: expected RUN_DIR=WEIGHT, e.g. --adapter runs/legal-1=0.7",
                        "give each run its weight in the combination")
    return Path(path), w


@dataclass
class _Part:
    run: Path  # the run directory
    adapter: Path  # its adapter folder (the final one, or a checkpoint's)
    weight: float
    info: RunInfo
    recipe: object
    config: dict  # adapter_config.json


def _read_parts(specs: list[str], grants) -> list[_Part]:
    parts = []
    for spec in specs:
        path, weight = parse_spec(spec)
        r = open_run(path, grants)  # RUN or RUN/checkpoints/checkpoint-N
        cfg = json.loads((r.adapter / "adapter_config.json").read_text(encoding="utf-8"))
        parts.append(_Part(path, r.adapter, weight, r.info, r.recipe, cfg))
    return parts


def check_combinable(parts: list[_Part], method: str) -> list[str]:
    """Refuse (UserError) what PEFT cannot combine or what would not be the base they were trained
    on; return warnings for what is taken from the first run."""
    first = parts[0]
    for p in parts[1:]:
        if p.info.base_model_path != first.info.base_model_path:
            raise UserError(f"{first.run} was trained on {first.info.base_model} ({first.info.base_model_path}) "
                            f"but {p.run} on {p.info.base_model} ({p.info.base_model_path})",
                            "adapters can only be combined on the base model they share")
        if p.recipe.quantization != first.recipe.quantization:
            raise UserError(f"{first.run} and {p.run} were trained on differently quantized bases "
                            f"({first.recipe.quantization.model_dump()} vs {p.recipe.quantization.model_dump()})",
                            "combine runs trained with the same quantization settings")
    for p in parts:
        if p.config.get("modules_to_save"):
            raise UserError(f"{p.run}: the adapter also trains whole modules ({', '.join(p.config['modules_to_save'])}), "
                            "which cannot be weighted and combined", "retrain it with lora.trainable_embeddings: false")
        # PEFT gives the combination r = lora_alpha and no patterns: these would change its scaling
        bad = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if p.config.get(k)]
        if bad:
            raise UserError(f"{p.run}: adapters with {', '.join(bad)} cannot be combined here",
                            "combine plain LoRA adapters")
    ranks = {str(p.run): p.config.get("r") for p in parts}
    if method in SAME_RANK and len(set(ranks.values())) > 1:
        raise UserError(f"--method {method} combines the adapters' matrices entry by entry and needs one LoRA rank, "
                        f"but the ranks differ: {', '.join(f'{k} r={v}' for k, v in ranks.items())}",
                        "use --method cat (any ranks), or combine runs trained with the same lora.r")
    kinds = {type(p.config.get("target_modules")).__name__ for p in parts}
    if len(kinds) > 1:
        raise UserError("the adapters name their target modules in different forms (a list and a pattern): "
                        + ", ".join(f"{p.run}: {p.config.get('target_modules')!r}" for p in parts),
                        "combine runs trained with lora.target_modules given the same way")
    warnings = []
    modules = [set(p.config.get("target_modules") or []) if not isinstance(p.config.get("target_modules"), str)
               else {p.config["target_modules"]} for p in parts]
    if len({frozenset(m) for m in modules}) > 1:
        warnings.append("the adapters adapt different modules (" + "; ".join(
            f"{p.run}: {', '.join(sorted(m))}" for p, m in zip(parts, modules)) + "): each module is combined from "
            "the adapters that have it")
    for what, get in (("system prompt", lambda p: p.recipe.data.system_prompt),
                      ("chat template", _template_text)):
        if len({get(p) for p in parts}) > 1:
            warnings.append(f"the runs differ in their {what}; the combination uses the first run's ({first.run})")
    return warnings


def _template_text(p: _Part) -> str:
    f = resolve(p.run)[0] / rundir.TOKENIZER / "chat_template.jinja"
    return f.read_text(encoding="utf-8") if f.is_file() else ""


def _combined_adapter(parts: list[_Part], method: str, density: float | None, recipe, dest: Path) -> dict:
    """Load every adapter on one 4-bit base, combine them with PEFT, save the result to `dest`."""
    import torch
    from peft import PeftModel

    from .model import load_4bit

    names = [f"a{i}" for i in range(len(parts))]
    model = PeftModel.from_pretrained(load_4bit(parts[0].info.base_model_path, recipe), parts[0].adapter,
                                      adapter_name=names[0])
    for name, p in zip(names[1:], parts[1:]):
        model.load_adapter(p.adapter, adapter_name=name)
    torch.manual_seed(SEED)
    try:
        model.add_weighted_adapter(names, [p.weight for p in parts], COMBINED, combination_type=method,
                                   density=density)
    except (ValueError, TypeError) as e:  # what check_combinable did not foresee, in PEFT's words
        raise UserError(f"PEFT cannot combine these adapters with --method {method}: {e}",
                        "try --method cat, or combine runs trained with the same LoRA settings") from None
    saved = dest.with_name(dest.name + ".peft")
    model.save_pretrained(saved, selected_adapters=[COMBINED], safe_serialization=True)
    os.replace(saved / COMBINED, dest)  # PEFT writes an adapter not named "default" into a subfolder
    shutil.rmtree(saved, ignore_errors=True)
    cfg = json.loads((dest / "adapter_config.json").read_text(encoding="utf-8"))
    del model
    gc.collect()
    return cfg


def _combination_card(out: Path, info: dict) -> str:
    c = info["combination"]
    rows = "\n".join(f"| `{a['run']}` | {a['weight']:g} | r={a['r']} | `{a['adapter']}` |" for a in c["adapters"])
    density = f", density {c['density']:g}" if c.get("density") is not None else ""
    return (f"# qlora-kit combination\n\n{len(c['adapters'])} adapters on `{info['base_model']}`, combined "
            f"with PEFT's add_weighted_adapter, method **{c['method']}**{density} (seed {c['seed']}); "
            f"the combined adapter has r={c['r']}. Created {info['finished']}.\n\n"
            f"| run | weight | rank | adapter |\n|---|---|---|---|\n{rows}\n\n"
            "Chat template, tokenizer, system prompt and quantization are the first run's.\n\n"
            f"Chat: `qlora-kit chat {out}` · serve: `qlora-kit serve NAME={out}` · merge: `qlora-kit merge {out}`\n")


def combine(specs: list[str], out: str | Path, method: str = "linear", density: float | None = None,
            dtype: str = "bf16", max_shard_size: str = "5GB", adapter_only: bool = False, grants=None) -> dict:
    """Combine several runs' adapters into one, written as the run directory `out` (adapter/,
    tokenizer/, recipe.yaml, run.json, README.md) that every command takes like a trained run;
    then, unless `adapter_only`, merge it into out/merged with merge's logit check."""
    from .model import refuse_unsafe
    from .quiet import quiet_libraries
    from .recipe import Grants

    grants = grants or Grants()
    if method not in METHODS:
        raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if density is not None and method not in DENSITY_METHODS:
        raise UserError(f"--density applies to --method {' and '.join(DENSITY_METHODS)}, not {method}",
                        "drop --density, or choose one of those methods")
    if method in DENSITY_METHODS:
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise UserError(f"--density {density:g}: the fraction of each adapter's entries kept must be in (0, 1]")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if len(specs) < 2:
        raise UserError("combining needs at least two --adapter RUN_DIR=WEIGHT",
                        "to merge one run: qlora-kit merge RUN_DIR")
    if out is None:
        raise UserError("combining adapters needs --out DIR", "e.g. --out runs/legal-mix")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty", "pass another --out or delete it")
    parts = _read_parts(specs, grants)  # every path and weight refused before torch loads
    warnings = check_combinable(parts, method)
    first = parts[0]
    base_path = first.info.base_model_path
    if not base_path or not Path(base_path).is_dir():
        raise UserError(f"base model of these runs not found at {base_path}",
                        "restore the base model there (the run cards name it)")
    refuse_unsafe(base_path, grants.trust_remote_code, grants.allow_pickle)
    for w in warnings:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    quiet_libraries()

    first_run = resolve(first.run)[0]
    with rundir.publishing(out) as tmp:
        console.print(f"merge: combining {len(parts)} adapters with PEFT ({method}) on the 4-bit base")
        cfg = _combined_adapter(parts, method, density, first.recipe, tmp / rundir.ADAPTER)
        shutil.copytree(first_run / rundir.TOKENIZER, tmp / rundir.TOKENIZER)
        shutil.copy2(first_run / "recipe.yaml", tmp / "recipe.yaml")
        # what the readers of a run need (base, tokenizer facts); no data or metrics: nothing was trained here
        info = {k: v for k, v in first.info.to_json().items() if k in ("base_model", "base_model_path", "tokenizer", "compute_dtype",
                                                             "device")}
        info.update(recipe="combination", status="finished", started=rundir.now(), finished=rundir.now(),
                    versions=rundir.versions(), lora={"modules": len(cfg.get("target_modules") or []),
                                                      "trainable_params": 0},
                    combination={"method": method, "density": density, "seed": SEED, "r": cfg.get("r"),
                                 "adapters": [{"run": str(resolve(p.run)[0].resolve()),
                                               "adapter": str(p.adapter.resolve()), "weight": p.weight,
                                               "r": p.config.get("r"), "base_model": p.info.base_model}
                                              for p in parts],
                                 "warnings": warnings})
        write_info(tmp, info)
        rundir.write_atomic(tmp / "README.md", _combination_card(out, info))
    report = {"run_dir": str(out), "combination": info["combination"], "out": str(out)}
    if adapter_only:
        console.print(f"merge: wrote the combined adapter as the run directory {out}")
        return report
    try:  # the same merge and logit check as any run, against the combined adapter on the 4-bit base
        merged = run(out, out / "merged", dtype, max_shard_size, grants)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # made by this command: nothing half-done is left
        raise
    return {**merged, **report, "out": merged["out"]}
