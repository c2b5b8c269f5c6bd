"""What the JSON constraint (qlora_kit/serve/structured.py) costs per generated token, measured.

1. Real generation on the built-in tiny-chat model (1,024-token byte-level BPE) and on stories260K
   (512-token SentencePiece with byte fallback, when ../shared/models/stories260K exists): the same
   prompts answered free and under the finance recipe's schema, alternating so that whatever else
   runs on the machine slows both alike. Per token: wall time free, wall time constrained, and the
   processor's own time (llguidance's mask + the budget check).
2. The processor alone on a 151,936-entry vocabulary (Qwen2.5's size; the entries are the byte
   alphabet plus substrings of the bundled recipes' data, so most are multi-byte Chinese, as in a
   real Chinese-capable vocabulary), driven by random logits: a weak model, where the constraint
   does the most work. This is the part that grows with the vocabulary; the model's forward pass
   on a GPU is the part it is compared with.

    .venv/bin/python scripts/bench_structured.py [--prompts 6] [--out bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
SCHEMA = ROOT / "recipes" / "finance.schema.json"
PROMPTS = ["借款人应于2025年3月31日前一次性归还本金人民币500万元，年利率4.35%。",
           "本合同项下借款金额为人民币叁仟万元整，借款期限为36个月。",
           "租赁物件总价款为港币800万元，租期24个月，按季支付租金。",
           "本期债券发行规模为美元5亿元，票面利率4.2%，期限5年。",
           "逾期按日万分之五计收罚息，以名下房产提供抵押担保。",
           "Extract the clause: a loan of EUR 2,000,000 at 3.1% per year for 18 months."]


def generation(name: str, path: Path, prompts: list[str], chat: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from qlora_kit.serve import structured

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    stops = [tok.eos_token_id]
    constraint = structured.load(SCHEMA)
    need = constraint.min_tokens(tok, stops)
    budget = max(128, need + 32)
    free_s = free_n = json_s = json_n = proc_s = 0.0
    valid = 0
    for i, p in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) if chat else p
        ids = tok(text, return_tensors="pt", add_special_tokens=not chat).input_ids
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": budget, "do_sample": True,
              "temperature": 1.0, "top_k": 0, "eos_token_id": stops, "pad_token_id": stops[0]}
        for constrained in (False, True):
            proc = constraint.processor(tok, stops, budget) if constrained else None
            torch.manual_seed(i)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**kw, **({"logits_processor": LogitsProcessorList([proc])} if proc else {}))
            dt = time.perf_counter() - t0
            n = int(out.shape[1] - ids.shape[1])
            if constrained:
                json_s, json_n, proc_s = json_s + dt, json_n + n, proc_s + proc.seconds
                answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                valid += constraint.problem(answer) is None
            else:
                free_s, free_n = free_s + dt, free_n + n
    return {"model": name, "vocabulary": len(tok), "prompts": len(prompts), "max_new_tokens": budget,
            "schema_min_tokens": need, "valid_constrained": f"{valid}/{len(prompts)}",
            "ms_per_token_free": round(1e3 * free_s / free_n, 3),
            "ms_per_token_constrained": round(1e3 * json_s / json_n, 3),
            "processor_ms_per_token": round(1e3 * proc_s / json_n, 3)}


def big_vocabulary(size: int = 151936):
    """A byte-level BPE tokenizer of `size` entries: the byte alphabet, then substrings of the recipes' data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    text = "".join(json.loads(line)[k] for f in sorted((ROOT / "recipes" / "data").glob("*.jsonl"))
                   for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
                   for k in ("question", "answer") if k in json.loads(line))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for n in (2, 3, 4, 5, 6, 8):
        for i in range(len(text) - n):
            piece = "".join(byte_char[b] for b in text[i:i + n].encode("utf-8"))
            if piece not in vocab:
                vocab[piece] = len(vocab)
            if len(vocab) >= size - 1:
                break
    vocab["<|im_end|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def _bytes_to_unicode() -> list[str]:
    # GPT-2's byte -> printable character table, as byte-level BPE vocabularies spell bytes
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def processor_alone(runs: int) -> dict:
    import torch

    from qlora_kit.serve import structured

    t0 = time.perf_counter()
    tok = big_vocabulary()
    stops = [tok.eos_token_id]
    constraint = structured.load(SCHEMA)
    structured.vocab(tok, stops)
    setup = time.perf_counter() - t0
    need = constraint.min_tokens(tok, stops)
    budget = max(128, need + 32)
    per_token, valid = [], 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(runs):
        proc = constraint.processor(tok, stops, budget, sample=False)
        ids = torch.zeros(1, 1, dtype=torch.long)
        for _step in range(budget):
            scores = proc(ids, torch.randn(1, len(tok), generator=gen))
            t = int(scores.argmax())
            if t in stops:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
        n = ids.shape[1] - 1
        per_token.append(1e3 * proc.seconds / max(n, 1))
        valid += constraint.problem(tok.decode(ids[0, 1:])) is None
    return {"vocabulary": len(tok), "runs": runs, "max_new_tokens": budget, "schema_min_tokens": need,
            "valid": f"{valid}/{runs}",
            "vocabulary_setup_s": round(setup, 2), "processor_ms_per_token_median": round(statistics.median(per_token), 3),
            "processor_ms_per_token_max": round(max(per_token), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--runs", type=int, default=5, help="random-logit runs on the big vocabulary")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured.json")
    args = ap.parse_args()
    import os

    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("QLORA_KIT_CACHE", tempfile.mkdtemp(prefix="qlora-kit-bench-"))
    from qlora_kit import tiny

    prompts = (PROMPTS * 4)[: args.prompts]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 2",
               "load_average_before": os.getloadavg()[0], "generation": []}
    results["generation"].append(generation("builtin:tiny-chat (fp32)", tiny.ensure("tiny-chat"), prompts, chat=True))
    if (STORIES / "config.json").is_file():
        results["generation"].append(generation("stories260K (fp32)", STORIES, prompts, chat=False))
    results["processor_alone"] = processor_alone(args.runs)
    results["load_average_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
