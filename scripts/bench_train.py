#!/usr/bin/env python
"""Training throughput and memory: the plain blog recipe against qlora-kit's path, same session.

    python scripts/bench_train.py                              # CPU: a tiny config, ratios only
    python scripts/bench_train.py --arch Qwen/Qwen2.5-1.5B-Instruct --layers 2 --max-length 512
    python scripts/bench_train.py --arch meta-llama/Llama-3.1-8B-Instruct --cap-gib 24 --longest   # on a GPU

Each architecture is built from its config with random weights (layers optionally cut), saved
once, and loaded through the real 4-bit path. Both variants train on the same samples in the
same order:
    plain     NF4 + prepare_model_for_kbit_training (fp32 upcast of embeddings and head),
              attention LoRA, padded batches, paged_adamw_8bit
    qlora-kit NF4, no upcast, attention LoRA, padding-free batches, paged_adamw_8bit (+ liger on GPU)
Reported: non-pad tokens/s (median over --steps after --warmup steps), and on a GPU peak allocated
and reserved memory and NVML device memory, with the planner's prediction beside the measured
peak; with --cap-gib the process is capped (set_per_process_memory_fraction, which does not
count the CUDA context or paged optimizer memory, hence NVML) and --longest searches the longest
trainable context at the cap. Writes bench/results/bench_train.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=4096)


def build(arch: str, layers: int | None, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit import plan

    cfg = dict(TINY if arch == "tiny" else plan.KNOWN[arch])
    if layers:
        cfg["num_hidden_layers"] = layers
    mt = cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16)
    model.save_pretrained(out)
    # token ids are random; a tokenizer is only needed for its pad token (the built-in one's ids fit)
    from transformers import AutoTokenizer

    from qlora_kit import tiny

    tok = AutoTokenizer.from_pretrained(tiny.ensure("tiny"))
    tok.pad_token = "<pad>"
    tok.save_pretrained(out)
    return dict(cfg, model_type=mt)


def samples(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Lengths spread like real Q/A data (a quarter to all of max_length), answer = second half."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        L = rng.randint(max_length // 4, max_length)
        ids = [rng.randrange(3, vocab) for _ in range(L)]
        rows.append({"input_ids": ids, "labels": [-100] * (L // 2) + ids[L // 2:]})
    return rows


def run_variant(name: str, model_dir: Path, rows, args, work: Path) -> dict:
    import torch
    from trl import SFTTrainer

    from qlora_kit.model import attach_lora, has_gpu, load_4bit, load_tokenizer
    from qlora_kit.recipe import Recipe
    from qlora_kit.train import sft_config

    plain = name == "plain"
    rec = Recipe.model_validate({
        "base_model": str(model_dir),
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "attention"},
        "training": {"max_steps": args.warmup + args.steps, "per_device_train_batch_size": args.batch,
                     "gradient_accumulation_steps": 1, "max_length": args.max_length, "logging_steps": 1000,
                     "save_steps": 100000, "eval_steps": 100000, "padding_free": not plain, "upcast_embeddings": plain,
                     "liger_kernel": "auto" if not plain else False, "early_stopping_patience": 0,
                     "load_best_model_at_end": False, "warmup_ratio": 0.0},
    })
    if has_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_4bit(str(model_dir), rec)
    model.config.use_cache = False
    model = attach_lora(model, rec)
    tok = load_tokenizer(str(model_dir), rec)
    cfg = sft_config(rec, work / name, has_eval=False)
    cfg.save_strategy = "no"
    cfg.shuffle_dataset = False
    cfg.dataloader_drop_last = True
    times, tokens = [], []

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if has_gpu():
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            if has_gpu():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return out

    import datasets

    trainer = Timed(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    t, k = times[args.warmup:], tokens[args.warmup:]
    res = {"tokens_per_s_median": statistics.median(n / s for n, s in zip(k, t)), "steps_timed": len(t),
           "non_pad_tokens_per_step": statistics.mean(k)}
    if not plain:
        res["saved_for_backward_bytes"] = saved_bytes(trainer, rows[: args.batch])
    if has_gpu():
        res.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, nvml_used_gib=nvml_used())
    del trainer, model
    return res


def longest_context(model_dir: Path, cfg: dict, args, work: Path) -> dict:
    """Binary search of the longest max_length that trains (3 steps, micro-batch 1) per variant at the cap."""
    import copy

    from qlora_kit.resilience import is_oom

    found = {}
    for name in ("plain", "qlora-kit"):
        lo, hi = 512, cfg.get("max_position_embeddings") or 131072
        while lo < hi:
            mid = (lo + hi + 1) // 2
            a = copy.copy(args)
            a.max_length, a.batch, a.warmup, a.steps = mid, 1, 1, 2
            try:
                run_variant(name, model_dir, samples(3, cfg["vocab_size"], mid, seed=1), a, work)
                lo = mid
            except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer here
                if not is_oom(e):
                    raise
                hi = mid - 1
            import torch

            torch.cuda.empty_cache()
        found[name] = lo
    return found


def saved_bytes(trainer, batch_rows) -> int:
    """Bytes autograd keeps for backward in one training forward (unique storages), counted with
    saved_tensors_hooks: with checkpointing, essentially the layer inputs the planner predicts."""
    import torch

    batch = trainer.data_collator(batch_rows)
    batch = {k: v.to(trainer.model.device) for k, v in batch.items() if hasattr(v, "to")}
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen, total = set(), 0

    def pack(t):  # activations only: weights saved for a matmul's backward are not counted
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trainer.model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")})
    out.loss.backward()
    return total


def nvml_used() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", help="tiny, or a config name from qlora_kit.plan.KNOWN")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=None, help="simulate a smaller card on a GPU")
    ap.add_argument("--longest", action="store_true", help="GPU: search the longest trainable max_length at micro-batch 1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("QLORA_KIT_CACHE", tempfile.mkdtemp(prefix="qk-bench-"))
    from qlora_kit import plan
    from qlora_kit.model import has_gpu, quiet_libraries
    from qlora_kit.recipe import Recipe
    from qlora_kit.rundir import now, versions

    quiet_libraries()
    if args.cap_gib and has_gpu():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    work = Path(tempfile.mkdtemp(prefix="qk-bench-train-"))
    model_dir = work / "model"
    cfg = build(args.arch, args.layers, model_dir)
    rows = samples(args.batch * (args.warmup + args.steps), cfg["vocab_size"], args.max_length)
    results = {name: run_variant(name, model_dir, rows, args, work) for name in ("plain", "qlora-kit")}
    ratio = results["qlora-kit"]["tokens_per_s_median"] / results["plain"]["tokens_per_s_median"]
    longest = longest_context(model_dir, cfg, args, work) if args.longest and has_gpu() else None
    shape = plan.Shape.from_config(cfg)
    parts = plan.estimate(shape, r=16, target="attention", max_length=args.max_length, micro_batch=args.batch)
    predicted = sum(parts.values())
    # the planner assumes bf16 activations (GPU); on CPU the compute dtype is fp32: twice the bytes
    scale = 1 if has_gpu() else 2
    tokens = results["qlora-kit"]["non_pad_tokens_per_step"]
    ratio_tokens = tokens / (args.batch * args.max_length)  # the planner's estimate assumes full rows
    pred_saved = scale * ratio_tokens * (parts["activations_checkpointed"] + parts["logits_and_loss"])
    device = torch.cuda.get_device_name(0) if has_gpu() else f"cpu ({args.threads} threads)"
    out = {"arch": args.arch, "layers": cfg["num_hidden_layers"], "max_length": args.max_length, "micro_batch": args.batch,
           "device": device, "results": results, "speedup_tokens_per_s": ratio,
           "planner_predicted_peak_gib": predicted / 2**30, "planner_parts_gib": {k: v / 2**30 for k, v in parts.items()},
           "saved_for_backward_measured_bytes": results["qlora-kit"]["saved_for_backward_bytes"],
           "saved_for_backward_planner_bytes": pred_saved,
           "measured_peak_gib": results["qlora-kit"].get("peak_allocated_gib", "not measured (no GPU)"),
           "longest_context": longest if longest is not None else "not measured (needs a GPU and --longest)",
           "versions": versions(), "date": now(), "threads": args.threads}
    _ = Recipe  # the recipe schema validates every variant above
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.arch.split('/')[-1]}-L{cfg['num_hidden_layers']}-T{args.max_length}-{'gpu' if has_gpu() else 'cpu'}"
    (args.out / f"bench_train-{tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# bench_train {tag} ({device}, {out['date']})", "",
             "| variant | non-pad tokens/s (median) | tokens/step | peak alloc GiB | NVML GiB |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        peak = r.get("peak_allocated_gib")
        nvml = r.get("nvml_used_gib")
        lines.append(f"| {name} | {r['tokens_per_s_median']:.0f} | {r['non_pad_tokens_per_step']:.0f} | "
                     f"{'–' if peak is None else f'{peak:.2f}'} | {'–' if nvml is None else f'{nvml:.2f}'} |")
    lines += ["", f"speed-up qlora-kit / plain: {ratio:.2f}x; planner prediction {out['planner_predicted_peak_gib']:.2f} GiB "
              f"vs measured {out['measured_peak_gib']}",
              f"saved for backward in one step (exact, saved_tensors_hooks): {out['saved_for_backward_measured_bytes']:,} bytes; "
              f"planner's activation + logits/loss peak terms at these tokens (they include backward's working set, so an upper bound): {out['saved_for_backward_planner_bytes']:,.0f} bytes", "",
              ", ".join(f"{k} {v}" for k, v in out["versions"].items())]
    (args.out / f"bench_train-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
