#!/usr/bin/env python
"""How fast `data check` is on 100k rows, cold and cached, against a per-row baseline.

The baseline is what a plain script does: for each row, tokenize the prompt and the full chat
with `apply_chat_template(tokenize=True)` and mask the prompt by its length. qlora-kit renders
with the compiled template, tokenizes all rows in one Rust call, labels from character offsets,
and caches the result by content. Both use the same tokenizer and rows in the same process.

    python scripts/bench_data.py [--rows 100000] [--tokenizer builtin:tiny-chat] [--threads 2]

Prints a table and writes bench/results/data_check.json (rows, seconds, ratios, versions, date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic finance extractions (the recipe's own generator) mixed with short legal Q/A."""
    rng = random.Random(seed)
    try:
        from qlora_kit.data import synth

        rows = synth.generate("finance", n // 2, seed)
    except Exception:
        rows = []
    topics = ["试用期", "加班费", "经济补偿", "竞业限制", "年休假", "工伤", "租赁押金", "民间借贷利息"]
    while len(rows) < n:
        t = rng.choice(topics)
        i = len(rows)
        rows.append({"question": f"第{i}号咨询：关于{t}，公司的做法{rng.randint(1, 10**6)}是否合法？",
                     "answer": f"依据《劳动合同法》第{rng.randint(1, 98)}条，关于{t}的问题需要结合具体情况判断，建议保留证据。"})
    rng.shuffle(rows)
    return rows


def baseline(tokenizer, convs, max_length: int) -> float:
    t = time.perf_counter()
    for c in convs:
        prompt = tokenizer.apply_chat_template(c[:-1], tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(c, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
        full = full["input_ids"] if isinstance(full, dict) else full
        labels = [-100] * len(prompt) + full[len(prompt):]
        _ = (full[:max_length], labels[:max_length])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tokenizer", default="builtin:tiny-chat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-rows", type=int, default=10_000, help="the baseline is timed on a subset and scaled")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_check.json")
    args = ap.parse_args()

    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # the Rust tokenizer's thread pool
    cache = Path(tempfile.mkdtemp(prefix="qk-bench-cache-"))
    os.environ["QLORA_KIT_CACHE"] = str(cache)
    import torch

    torch.set_num_threads(args.threads)
    from qlora_kit import data as data_mod
    from qlora_kit.data import check as datacheck
    from qlora_kit.model import load_tokenizer, prepare_tokenizer, resolve_base_model
    from qlora_kit.quiet import quiet_libraries
    from qlora_kit.recipe import Recipe
    from qlora_kit.rundir import versions

    quiet_libraries()
    model_dir = resolve_base_model(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="qk-bench-"))
    path = work / "rows.jsonl"
    rows = make_rows(args.rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = Recipe.model_validate({"base_model": model_dir, "data": {"path": str(path)}, "training": {"max_length": 512}})
    tok = load_tokenizer(model_dir, recipe)
    stop = set(prepare_tokenizer(tok, recipe, model_dir).stop_token_ids)

    timings = {}
    t = time.perf_counter()
    ds = data_mod.load(path)
    timings["read_only_s"] = time.perf_counter() - t
    t = time.perf_counter()
    datacheck.prepare(recipe, tok, stop)
    timings["check_cold_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prep = datacheck.prepare(recipe, tok, stop)
    timings["check_cached_s"] = time.perf_counter() - t
    assert prep.report["tokens"]["cached"]
    sub = ds.conversations[: args.baseline_rows]
    base_sub = baseline(tok, sub, 512)
    timings["baseline_tokenize_only_s"] = base_sub * len(ds.conversations) / len(sub)
    from qlora_kit.template import encode_batch

    t = time.perf_counter()
    encode_batch(tok, sub, 512, stop)
    ours_sub = time.perf_counter() - t
    result = {
        "rows": len(ds.conversations), "tokenizer": args.tokenizer, "threads": args.threads,
        **{k: round(v, 2) for k, v in timings.items()},
        "tokenize_speedup_vs_baseline": round(base_sub / ours_sub, 2),
        "rows_per_s_cold": round(len(ds.conversations) / timings["check_cold_s"]),
        "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {result['rows']:,} rows, {args.tokenizer}, {args.threads} threads | seconds |")
    print("|---|---|")
    print(f"| read + layouts only | {timings['read_only_s']:.1f} |")
    print(f"| data check, cold (read, duplicates, split, tokenize, report) | {timings['check_cold_s']:.1f} |")
    print(f"| data check, cached | {timings['check_cached_s']:.1f} |")
    print(f"| baseline per-row apply_chat_template, tokenize only (scaled from {len(sub):,}) | {timings['baseline_tokenize_only_s']:.1f} |")
    print(f"| tokenize+label speed-up vs baseline (same {len(sub):,} rows) | {result['tokenize_speedup_vs_baseline']}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
