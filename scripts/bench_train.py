#!/usr/bin/env python
"""Training speed and memory: the plain blog recipe against qlora-kit, each in its own process.

    python scripts/bench_train.py                                  # all jobs, 3 alternating reps, 1 thread
    python scripts/bench_train.py --jobs peers --steps 12 --reps 1 # a quick look at the peers job
    python scripts/bench_train.py --jobs qwen2.5-7b --memory-only  # plan vs exact bytes, no timing
    python scripts/bench_train.py --cap-gib 24                     # on a GPU: a 24 GB card, simulated

Variants (each rep runs plain, then qlora-kit, then plain, ...; every run is a fresh process):
    plain      the QLoRA recipe of the blog posts, as ../shared/peers/plain/train.py writes it:
               NF4 + double quant, prepare_model_for_kbit_training (fp32 upcast, gradient
               checkpointing), LoRA via get_peft_model, TRL SFTTrainer with its defaults,
               answer-only loss, paged_adamw_8bit. The peers job pads every batch to max_length
               as that file does; the slices pad to the longest row (TRL's default). On a GPU:
               bf16 compute and TRL's bf16=True default; on CPU: fp32 and bf16=False (as the peers).
    qlora-kit  `qlora-kit train RECIPE --run-dir DIR` (its CLI, in-process in the child), with
               qlora-kit's own defaults for everything the job does not fix (checkpointing,
               attention, collation, loss head, threads are overridden only by --threads).
Jobs:
    peers          stories260K + alpaca_en_demo.json from ../shared (skipped when absent), the job
                   of issue 15: LoRA r8/a16/d.05 q,k,v,o, max_length 256 (truncate), micro-batch 4,
                   no accumulation, --steps steps, lr 2e-4 linear no warm-up, paged_adamw_8bit,
                   answer-only loss, no packing, no eval. qlora-kit reads the peers' own recipe.
    llama-3.1-8b   Llama-3.1-8B / Qwen2.5-7B shapes (real hidden, MLP, heads, kv heads, head dim,
    qwen2.5-7b     vocabulary, rope) cut to --layers decoder layers, random weights, saved once
                   (safetensors, --cache) and loaded through the real 4-bit path. Tokenizer: a
                   byte-level BPE of the real vocabulary size in which each two-letter word is one
                   token, with a chat template, so the loss head sees the real vocabulary. Rows:
                   random words with the (prompt incl. system prompt, answer) token lengths of the
                   bundled recipes' data (recipes/data/*.jsonl, counted with the built-in tiny-chat
                   BPE tokenizer: 0.85-1.5 characters per token on that mostly Chinese text, so likely
                   longer than Qwen's or Llama's own tokenizers make them), max_length 1024,
                   micro-batch --slice-batch, LoRA r16/a32/d.05 on q,k,v,o (the recipes').
    tiny           the same machinery on a small Llama shape (tests).

Reported per variant (median over reps): non-pad tokens per CPU-second (time.process_time of the
training process) and per wall second, s/step split into decoder layers (forward, backward and
recompute), loss head (everything after the last decoder layer: norm, lm_head, loss, metrics,
forward and backward), optimizer step, and the rest (embedding, collation, clipping, scheduler,
callbacks, logging); peak RSS (whole process, and during training); on a GPU peak allocated memory
and NVML. The first --warmup (peers) / --slice-warmup steps are not timed. Torch threads are fixed
(--threads, default 1: OMP_NUM_THREADS and torch.set_num_threads in every training process).

Memory model check (slices, and --memory-only): one qlora-kit training step as train runs it here
(CPU: fp32 compute; --memory-gpu-dtypes adds bf16 compute with CUDA's dropout and peft branches),
every matmul returning zeros of the right shape (a dispatch mode under autograd and autocast, so
the same tensors are kept: tests/test_plan_exact.py checks it byte for byte against real compute),
counting exact tensor bytes: 4-bit weights and constants, embeddings and head, LoRA weights and
gradients, optimizer state after the step, activations the forward leaves for backward (live
tensors; saved_tensors_hooks counts the saved ones), the loss head's and the decoder layers'
backward working sets, the largest dequantized weight; beside `qlora-kit plan` for the same device.

Writes bench/results/bench_train-<cpu|gpu>.json and .md (machine, versions, date).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PEERS_MODEL = SHARED / "models" / "stories260K"
PEERS_DATA = SHARED / "data" / "llama-factory-demo" / "alpaca_en_demo.json"
PEERS_RECIPE = SHARED / "peers" / "qlora-kit" / "recipe.yaml"
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("QLORA_KIT_BENCH_CACHE", Path.home() / ".cache" / "qlora-kit-bench"))
SLICE_VERSION = 2
CATS = ("layers", "loss_head", "optimizer", "other")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# The real configs' shapes and rope settings (layers are cut with --layers).
SLICES = {
    "llama-3.1-8b": {
        "real": "meta-llama/Llama-3.1-8B-Instruct",
        "config": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                       bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
        "specials": {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                     "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                     "<|eot_id|>": 128009},
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3,
    },
    "qwen2.5-7b": {
        "real": "Qwen/Qwen2.5-7B-Instruct",
        "config": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
        "specials": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": CHATML,
    },
    "tiny": {  # small but real-shaped (head dim 128, LoRA matrices big enough for 8-bit optimizer state): tests
        "real": "a small Llama shape (tests)",
        "config": dict(model_type="llama", hidden_size=512, intermediate_size=1792, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=128, vocab_size=8192, tie_word_embeddings=False,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                       bos_token_id=8000, eos_token_id=8001),
        "specials": {"<|begin_of_text|>": 8000, "<|eot_id|>": 8001, "<|start_header_id|>": 8002,
                     "<|end_header_id|>": 8003},
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3,
    },
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # the recipes'
WORDS = tuple(a + b for a in string.ascii_letters for b in string.ascii_letters)  # one token each


# ---------------------------------------------------------------------------------------------- slices


def build_slice(job: str, layers: int, cache: Path) -> Path:
    """Random-weight model of a real shape, cut to `layers`, with a word-level tokenizer of the real
    vocabulary size; built once into the cache (atomic rename), reused after."""
    s = SLICES[job]
    final = cache / f"{job}-L{layers}-v{SLICE_VERSION}"
    if (final / "config.json").is_file() and (final / "tokenizer.json").is_file():
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job}-", dir=cache))
    cfg = dict(s["config"], num_hidden_layers=layers)
    mt = cfg.pop("model_type")
    torch.manual_seed(0)
    config = AutoConfig.for_model(mt, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    eos = cfg["eos_token_id"]
    GenerationConfig(bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos).save_pretrained(tmp)
    del model
    word_tokenizer(cfg["vocab_size"], s["specials"], s["tokens"], s["template"]).save_pretrained(tmp)
    tmp.rename(final)
    return final


def word_tokenizer(vocab_size: int, specials: dict, tokens: dict, template: str):
    """A byte-level BPE tokenizer (the kind Llama 3 and Qwen2.5 ship, so transformers' own Qwen2
    tokenizer class, which rebuilds BPE from vocab and merges, reads it the same) of the real
    vocabulary size, in which every two-letter word, with or without its leading space, is one
    token; the special tokens sit at their real ids; the rest of the vocabulary is unreachable filler."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [(a, b) for a, b in WORDS] + [("\u0120", w) for w in WORDS]  # \u0120 (Ġ): byte-level space
    regular = iter(sorted(pre_tokenizers.ByteLevel.alphabet()) + list(WORDS) + ["\u0120" + w for w in WORDS])
    by_id = {v: k for k, v in specials.items()}
    vocab = {}
    for i in range(vocab_size):
        vocab[by_id[i] if i in by_id else next(regular, None) or f"<filler_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    hf.chat_template = template
    return hf


def recipe_lengths() -> list[tuple[int, int]]:
    """(prompt, answer) token lengths of every row of the bundled recipes' data: system prompt +
    question, and answer, tokenized with the built-in tiny-chat tokenizer (a 1,024-token byte-level
    BPE trained on this data: about 0.9-1.5 characters per token on this mostly Chinese text)."""
    import yaml
    from transformers import AutoTokenizer

    from qlora_kit import tiny

    tok = AutoTokenizer.from_pretrained(tiny.ensure("tiny-chat"))
    out = []
    for f in sorted((ROOT / "recipes" / "data").glob("*.jsonl")):
        rec = ROOT / "recipes" / f"{f.stem}.yaml"
        system = ((yaml.safe_load(rec.read_text(encoding="utf-8")) or {}).get("data") or {}).get("system_prompt") or ""
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out.append((len(tok(system + r["question"])["input_ids"]), len(tok(r["answer"])["input_ids"])))
    return out


def slice_rows(n: int, lengths: list[tuple[int, int]], seed: int) -> list[dict]:
    """Question/answer rows of random one-token words with (prompt, answer) token lengths drawn from `lengths`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, a = rng.choice(lengths)
        rows.append({"question": " ".join(rng.choices(WORDS, k=p)), "answer": " ".join(rng.choices(WORDS, k=a))})
    return rows


# ---------------------------------------------------------------------------------------------- phases


class Phases:
    """Which part of a training step is running: decoder layers, loss head (everything after the
    last decoder layer, forward and backward), optimizer step, or other. Forward: hooks on the
    decoder layers; backward: a wrapper of torch.autograd.backward (the loss head runs first) and a
    marker on the last layer's output whose backward starts the layers; optimizer: the global
    step hooks of torch.optim (bitsandbytes' optimizers are torch optimizers). Layer hooks are
    ignored during backward, where checkpointing recomputes layers (that time is the layers')."""

    def __init__(self, on_switch):
        self.cat, self.phase, self.on_switch = "other", None, on_switch
        self.marks = 0  # backward passes that reached the decoder layers (a check on the split)
        self.on_last_hidden = None  # called with the last decoder layer's output (the final norm's input)
        self.handles, self.layers, self._orig_backward = [], None, None

    def switch(self, cat):
        if cat != self.cat:
            prev, self.cat = self.cat, cat
            self.on_switch(prev, cat)

    def install(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._orig_backward = orig = torch.autograd.backward

        def backward(*a, **k):
            self.phase = "bwd"
            self.switch("loss_head")
            try:
                return orig(*a, **k)
            finally:
                self.phase = None
                self.switch("other")

        torch.autograd.backward = backward
        self.handles += [register_optimizer_step_pre_hook(lambda *a: self.switch("optimizer")),
                         register_optimizer_step_post_hook(lambda *a: self.switch("other"))]

    def uninstall(self):
        import torch

        if self._orig_backward is not None:
            torch.autograd.backward = self._orig_backward
        for h in self.handles:
            h.remove()
        self.handles = []

    def attach(self, model) -> int:
        """Hooks on the decoder layers (the ModuleList of config.num_hidden_layers blocks) and on the
        final norm after them, whose input carries the marker: the norm is outside any checkpointed
        region, so the marker is in the graph whatever the checkpointing."""
        import torch

        n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        found = next(((name, m) for name, m in model.named_modules()
                      if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and (n is None or len(m) == n)), None)
        if found is None:
            raise RuntimeError("bench: no decoder layers found in the model")
        name, layers = found
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        norm = next((getattr(parent, a) for a in ("norm", "final_layernorm", "ln_f") if hasattr(parent, a)), None)
        if norm is None:
            raise RuntimeError("bench: no final norm after the decoder layers")
        self.layers = layers
        last = len(layers) - 1
        phases = self

        class Mark(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                phases.marks += 1
                phases.switch("layers")
                return g

        def pre(mod, args):
            if self.phase == "fwd":
                self.switch("layers")

        def post(i):
            def hook(mod, args, out):
                if self.phase == "fwd":
                    self.switch("loss_head" if i == last else "other")
            return hook

        def norm_pre(mod, args):
            if self.phase == "fwd" and args and torch.is_tensor(args[0]) and args[0].requires_grad:
                self.switch("loss_head")
                if self.on_last_hidden is not None:
                    self.on_last_hidden(args[0])
                return (Mark.apply(args[0]), *args[1:])
            return None

        for i, layer in enumerate(layers):
            self.handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post(i))]
        self.handles.append(norm.register_forward_pre_hook(norm_pre))
        return len(layers)

    def forward_begin(self):
        self.phase = "fwd"
        self.switch("other")


def non_pad_tokens(inputs) -> int:
    am, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if am is not None and am.dim() == 2:
        return int(am.sum())
    return int(ids.numel()) if ids is not None else 0


def unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


def rss_mb(field: str = "VmHWM") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of the process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def nvml_used_gib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**30
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- timing probe


class StepProbe:
    """Per optimizer step: wall and CPU seconds (time.process_time) by part, non-pad tokens, loss.
    A step runs from one on_step_begin to the next (the last one to on_train_end), so data loading,
    logging and callbacks are inside it."""

    def __init__(self, threads: int):
        self.threads = threads
        self.steps: list[dict] = []
        self.cur = None
        self.info: dict = {}
        self.gpu = False
        self.nvml_max = None
        self.phases = Phases(self._switched)
        self._t = None

    def _now(self):
        if self.gpu:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def _switched(self, prev, new, now=None):
        w, c = now or self._now()
        if self.cur is not None and self._t is not None:
            part = self.cur["parts"][prev]
            part[0] += w - self._t[0]
            part[1] += c - self._t[1]
        self._t = (w, c)

    def step_begin(self):
        self.close_step()
        w, c = self._now()
        self._t = (w, c)
        self.cur = {"t0": (w, c), "parts": {k: [0.0, 0.0] for k in CATS}, "tokens": 0, "loss_tokens": 0, "shape": None,
                    "marks0": self.phases.marks}
        u = nvml_used_gib()
        if u is not None:
            self.nvml_max = max(self.nvml_max or 0, u)

    def close_step(self):
        if self.cur is None:
            return
        w, c = self._now()
        self._switched(self.phases.cat, self.phases.cat, (w, c))  # the parts add up to the step exactly
        s = self.cur
        s["wall"], s["cpu"] = w - s["t0"][0], c - s["t0"][1]
        s["layer_backward_marks"] = self.phases.marks - s.pop("marks0")
        del s["t0"]
        self.steps.append(s)
        self.cur = None

    def first_step(self, trainer, model, inputs):
        import torch

        self.gpu = torch.cuda.is_available()
        self.info["library_torch_threads"] = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the bench fixes threads, whatever the library chose
        self.info["torch_threads"] = torch.get_num_threads()
        self.info["interop_threads"] = torch.get_num_interop_threads()
        m = unwrap(model)
        self.info["decoder_layers"] = self.phases.attach(m)
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        self.info["gradient_checkpointing"] = bool(getattr(base, "is_gradient_checkpointing", False))
        self.info["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
        self.info["collator"] = type(trainer.data_collator).__name__
        self.info["batch_keys"] = sorted(k for k in inputs)
        self.info["trainable_dtype"] = str(next(p.dtype for p in m.parameters() if p.requires_grad)).replace("torch.", "")
        self.info["rss_mb_at_first_step"] = rss_mb("VmRSS")
        self.info["peak_rss_mb_before_training"] = rss_mb()
        self.info["peak_rss_reset"] = reset_peak_rss()
        if self.gpu:
            self.info["gpu_peak_allocated_gib_before_training"] = torch.cuda.max_memory_allocated() / 2**30

    def install(self):
        from transformers import trainer as trainer_mod
        from transformers import trainer_callback

        probe = self
        Trainer, Handler = trainer_mod.Trainer, trainer_callback.CallbackHandler
        orig_step, orig_begin, orig_end = Trainer.training_step, Handler.on_step_begin, Handler.on_train_end

        def training_step(self, model, inputs, *a, **k):
            if not probe.info.get("torch_threads"):
                probe.first_step(self, model, inputs)
            if probe.cur is None:  # gradient accumulation: on_step_begin only on the first micro-batch
                probe.step_begin()
            probe.cur["tokens"] += non_pad_tokens(inputs)
            labels = inputs.get("labels")
            if labels is not None:
                probe.cur["loss_tokens"] += int((labels[..., 1:] != -100).sum())
            ids = inputs.get("input_ids")
            probe.cur["shape"] = list(ids.shape) if ids is not None else None
            probe.phases.forward_begin()
            out = orig_step(self, model, inputs, *a, **k)
            probe.phases.switch("other")
            with contextlib.suppress(Exception):
                probe.cur["loss"] = round(float(out), 5)
            return out

        def on_step_begin(self, args, state, control, **kw):
            probe.step_begin()
            return orig_begin(self, args, state, control, **kw)

        def on_train_end(self, args, state, control, **kw):
            probe.close_step()
            return orig_end(self, args, state, control, **kw)

        Trainer.training_step, Handler.on_step_begin, Handler.on_train_end = training_step, on_step_begin, on_train_end
        self.phases.install()

    def result(self) -> dict:
        out = {"info": self.info, "steps": self.steps, "peak_rss_mb_training": rss_mb(),
               "peak_rss_mb_process": max(filter(None, [rss_mb(), self.info.get("peak_rss_mb_before_training")]), default=None)}
        if self.gpu:
            import torch

            out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            out["nvml_used_gib_max"] = self.nvml_max
        return out


# ---------------------------------------------------------------------------------------------- exact memory


class ExactMemory:
    """Exact tensor bytes of the first training step, by part (see the module docstring).

    A TorchDispatchMode sees every tensor an operator returns (forward, backward, optimizer) and
    counts the bytes of each new storage until Python frees it, so live bytes and peaks are exact
    tensor bytes (not allocator or RSS figures). With zero_matmuls, mm/addmm/bmm/baddbmm return
    zeros of the output's shape and dtype instead of computing: autograd and autocast sit above the
    dispatch mode, so the same tensors are saved and cast as with real compute."""

    def __init__(self, zero_matmuls: bool = True, emulate_cuda: bool = False):
        self.zero, self.emulate_cuda = zero_matmuls, emulate_cuda
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.windows: dict[str, list[int]] = {}  # name -> [live at start, peak]
        self.saved: dict[str, int] = {}
        self.saved_seen: set[int] = set()
        self.static_ptrs: set[int] = set()
        self.dequant_max = 0
        self.figures: dict = {}
        self.phases = Phases(self._switched)
        self.last_hidden_bytes = 0
        self.phases.on_last_hidden = lambda t: setattr(self, "last_hidden_bytes",
                                                       self.live.get(t.untyped_storage().data_ptr(), 0))
        self._mode = None
        self._hooks = None
        self.done = False

    # windows: forward before the loss head, forward loss head, backward loss head, backward layers, optimizer
    def _window(self):
        p, c = self.phases.phase, self.phases.cat
        if c == "optimizer":
            return "optimizer"
        if p == "fwd":
            return "fwd_loss_head" if c == "loss_head" else "fwd_layers"
        if p == "bwd":
            return "bwd_loss_head" if c == "loss_head" else "bwd_layers"
        return None

    def _switched(self, prev, new):
        self._enter_window()

    def _enter_window(self):
        w = self._window()
        if w is not None and w not in self.windows:
            self.windows[w] = [self.current, self.current]

    def _alloc(self, t):
        import weakref

        try:
            st = t.untyped_storage()
        except Exception:
            return
        ptr = st.data_ptr()
        if ptr in self.live or ptr in self.static_ptrs or st.nbytes() == 0:
            return
        n = st.nbytes()
        self.live[ptr] = n
        self.current += n
        weakref.finalize(st, self._free, ptr)
        self.peak = max(self.peak, self.current)
        self._enter_window()
        w = self._window()
        if w is not None:
            self.windows[w][1] = max(self.windows[w][1], self.current)

    def _free(self, ptr):
        n = self.live.pop(ptr, 0)
        self.current -= n

    def _pack(self, t):
        try:
            st = t.untyped_storage()
        except Exception:
            return t
        ptr = st.data_ptr()
        if ptr not in self.static_ptrs and ptr not in self.saved_seen and self.phases.phase == "fwd":
            self.saved_seen.add(ptr)
            w = self._window()
            self.saved[w] = self.saved.get(w, 0) + st.nbytes()
        return t

    def _make_mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        aten = torch.ops.aten
        new_ops = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}
        out_ops = {aten.mm.out, aten.bmm.out, aten.addmm.out, aten.baddbmm.out}
        inplace_ops = {aten.addmm_.default, aten.baddbmm_.default}  # += a @ b: adding zeros changes nothing
        mem = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if mem.zero and func in new_ops:
                    a, b = args[new_ops[func]], args[new_ops[func] + 1]
                    out = torch.zeros((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)
                elif mem.zero and func in out_ops:
                    out = kwargs["out"].zero_()
                elif mem.zero and func in inplace_ops and kwargs.get("beta", 1) == 1:
                    out = args[0]
                else:
                    out = func(*args, **kwargs)
                name = str(func)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        mem._alloc(t)
                        if "dequantize_4bit" in name:
                            mem.dequant_max = max(mem.dequant_max, t.untyped_storage().nbytes())
                return out

        return Mode()

    def static_figures(self, model) -> dict:
        """Bytes of the model's tensors: 4-bit weights, quantization constants, embeddings and head,
        trainable (LoRA) weights, the rest."""
        import bitsandbytes as bnb

        seen, f = set(), {"weights_4bit": 0, "quant_constants": 0, "embeddings_and_head": 0, "lora_weights": 0,
                          "other_parameters": 0}

        def add(key, t):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                f[key] += st.nbytes()

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                add("weights_4bit", m.weight.data)
                qs = m.weight.quant_state
                add("quant_constants", qs.absmax)
                if qs.nested:
                    add("quant_constants", qs.state2.absmax)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        for mod in (emb, head):
            if mod is not None:
                add("embeddings_and_head", mod.weight)
        for p in model.parameters():
            add("lora_weights" if p.requires_grad else "other_parameters", p)
        self.static_ptrs |= seen
        for b in model.buffers():
            self.static_ptrs.add(b.untyped_storage().data_ptr())
        return f

    def install(self):
        """Hooks into transformers' Trainer: the first training step is measured, then StopAfterStep."""
        import torch
        from transformers import trainer as trainer_mod

        mem = self
        Trainer = trainer_mod.Trainer
        orig = Trainer.training_step
        self._restore = lambda: setattr(Trainer, "training_step", orig)

        def training_step(self, model, inputs, *a, **k):
            if mem.done:
                return orig(self, model, inputs, *a, **k)
            m = unwrap(model)
            mem.figures.update(mem.static_figures(m))
            mem.phases.attach(m)
            mem.figures["tokens"] = non_pad_tokens(inputs)
            base = m.get_base_model() if hasattr(m, "get_base_model") else m
            mem.figures["gradient_checkpointing"] = bool(getattr(base, "is_gradient_checkpointing", False))
            mem.figures["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
            mem.figures["loss_head"] = getattr(self, "qk_loss_head", None)
            mem.figures["compute_dtype"] = str(m.get_input_embeddings().weight.dtype).replace("torch.", "")
            mem._mode = mem._make_mode()
            mem._hooks = torch.autograd.graph.saved_tensors_hooks(mem._pack, lambda t: t)
            mem._mode.__enter__()
            mem._hooks.__enter__()
            mem.phases.forward_begin()
            mem._enter_window()
            out = orig(self, model, inputs, *a, **k)
            mem.phases.switch("other")
            mem.figures["lora_gradients"] = sum(p.grad.untyped_storage().nbytes() for p in m.parameters()
                                                if p.requires_grad and p.grad is not None)
            return out

        Trainer.training_step = training_step
        if self.emulate_cuda and not torch.cuda.is_available():
            self._emulate_cuda_branches()
        self.phases.install()
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.phases.handles.append(register_optimizer_step_post_hook(self._after_optimizer))

    def _emulate_cuda_branches(self):
        """On CPU, take the branches a CUDA run takes where they change which tensors are kept:
        peft asks torch.is_autocast_enabled() with no device, which means CUDA, so on CPU it casts
        each LoRA input to fp32 (a copy per adapted layer); and CPU dropout keeps a mask of the
        input's dtype where CUDA's fused kernel keeps a bool mask. Both kernels exist on CPU."""
        import torch
        import torch.nn.functional as F

        orig_enabled, orig_dropout = torch.is_autocast_enabled, F.dropout

        def is_autocast_enabled(*a, **k):
            return orig_enabled(*a, **k) if (a or k) else orig_enabled("cpu")

        def dropout(input, p=0.5, training=True, inplace=False):
            if training and 0 < p < 1 and not inplace:
                return torch.native_dropout(input, p, True)[0]
            return orig_dropout(input, p, training, inplace)

        torch.is_autocast_enabled, F.dropout = is_autocast_enabled, dropout
        restore = self._restore

        def undo():
            torch.is_autocast_enabled, F.dropout = orig_enabled, orig_dropout
            restore()

        self._restore = undo
        self.figures["cuda_branches_emulated"] = True

    def _after_optimizer(self, opt, *a):
        import torch

        if self.done:
            return
        seen, n = set(), 0
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    n += v.untyped_storage().nbytes()
        self.figures["optimizer_state"] = n
        self.figures["optimizer_class"] = type(opt).__name__
        self.finish()
        raise StopAfterStep()

    def abort(self):
        """Undo every patch, whether or not a step was measured (the run failed or ended early)."""
        if self.done:
            return
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._mode.__exit__(None, None, None)
        self.phases.uninstall()
        self._restore()

    def finish(self):
        if self.done:
            return
        self.abort()
        self.done = True
        f, w = self.figures, self.windows

        def rise(name):
            return (w[name][1] - w[name][0]) if name in w else 0

        f["activations_saved"] = self.saved.get("fwd_layers", 0)
        # what the forward leaves alive for backward when it reaches the loss head: saved tensors and
        # tensors kept by other references (RoPE cos/sin, checkpoint arguments), not the last hidden state
        f["activations"] = w.get("fwd_loss_head", [0, 0])[0] - w.get("fwd_layers", [0, 0])[0] - self.last_hidden_bytes
        f["loss_head_saved"] = self.saved.get("fwd_loss_head", 0)
        start = w.get("fwd_loss_head", [0, 0])[0]
        f["loss_head_working_set"] = max(w.get("fwd_loss_head", [0, 0])[1], w.get("bwd_loss_head", [0, 0])[1]) - start
        f["layer_backward_working_set"] = rise("bwd_layers")
        f["dequantized_weight"] = self.dequant_max
        f["step_peak_above_start"] = self.peak
        f["windows"] = {k: {"start": v[0], "peak": v[1]} for k, v in w.items()}


class StopAfterStep(BaseException):
    """Raised from the optimizer's post-hook once the first step is measured (ends the run)."""


def exact_step_memory(train, zero_matmuls: bool = True, emulate_cuda: bool = False) -> dict:
    """Run `train()` (anything that trains through transformers' Trainer) until its first optimizer
    step is done and return the exact byte figures of that step."""
    mem = ExactMemory(zero_matmuls, emulate_cuda)
    mem.install()
    try:
        train()
    except StopAfterStep:
        pass
    finally:
        mem.abort()
    if not mem.done:
        raise RuntimeError("no training step ran")
    return mem.figures


def plan_vs_exact(parts: dict, exact: dict, checkpointing: bool) -> list[dict]:
    """Rows of (component, plan bytes, exact bytes, % difference). The plan's keys are matched by
    prefix, so a renamed optimizer key (8-bit, 32-bit, ...) still pairs."""
    def p(prefix):
        return sum(v for k, v in parts.items() if k.startswith(prefix))

    rows = [
        ("4-bit weights", p("weights_4bit"), exact["weights_4bit"]),
        ("quantization constants", p("quant_constants"), exact["quant_constants"]),
        ("embeddings + head", p("embeddings"), exact["embeddings_and_head"]),
        ("LoRA weights", p("lora_weights"), exact["lora_weights"]),
        ("LoRA gradients", p("lora_gradients"), exact["lora_gradients"]),
        ("optimizer state", p("optimizer"), exact["optimizer_state"]),
        ("activations kept for backward", p("activations"), exact["activations"]),
        ("logits + loss (loss-head working set)", p("logits"), exact["loss_head_working_set"]),
        ("largest dequantized weight", p("dequantized"), exact["dequantized_weight"]),
    ]
    if checkpointing:
        rows.append(("layer recompute + dequantized weight (layer backward working set)",
                     p("layer_recompute") + p("dequantized"), exact["layer_backward_working_set"]))
    return [{"component": c, "plan": int(a), "exact": int(b), "diff_pct": round(100 * (a - b) / b, 1) if b else None}
            for c, a, b in rows]


# ---------------------------------------------------------------------------------------------- children


def child_plain(spec: dict) -> None:
    """The blog recipe (../shared/peers/plain/train.py), parameterised by the job."""
    import torch
    from datasets import Dataset, load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32  # CPU run: fp32 compute in every peer
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.pad_token = tokenizer.eos_token  # every blog post does this
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        dtype=dtype, **({"device_map": {"": 0}} if gpu else {}))
    model = prepare_model_for_kbit_training(model)  # fp32 upcast + gradient checkpointing
    lo = spec["lora"]
    model = get_peft_model(model, LoraConfig(r=lo["r"], lora_alpha=lo["lora_alpha"], lora_dropout=lo["lora_dropout"],
                                             bias="none", task_type="CAUSAL_LM", target_modules=lo["target_modules"]))
    if spec["format"] == "alpaca":
        system = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.\n\n")

        def to_pc(ex):
            query = ex["instruction"] + ("\n" + ex["input"] if ex["input"] else "")
            return {"prompt": system + "### Instruction:\n" + query + "\n\n### Response:\n", "completion": ex["output"]}

        ds = load_dataset("json", data_files=spec["data"], split="train")
        ds = ds.map(to_pc, remove_columns=ds.column_names)
    else:  # question/answer rows, as chat messages (the model's chat template)
        rows = [json.loads(x) for x in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if x.strip()]
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                 "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0,
        optim="paged_adamw_8bit", max_length=spec["max_length"], completion_only_loss=True,
        pad_to_multiple_of=spec.get("pad_to_multiple_of"), packing=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", seed=42, use_cpu=not gpu, bf16=gpu,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()


def child_qlora_kit(spec: dict) -> None:
    from qlora_kit import cli

    sys.argv = ["qlora-kit", "train", spec["recipe"], "--run-dir", spec["out"], "--max-steps", str(spec["steps"])]
    try:
        cli.main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def child_main(variant: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    import atexit

    if spec.get("cap_gib"):
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * 2**30 / total))
    if variant == "memory":
        figures = exact_step_memory(lambda: child_qlora_kit(spec), emulate_cuda=spec.get("emulate_cuda", False))
        Path(spec["result"]).write_text(json.dumps(figures, indent=1))
        os._exit(0)  # the run stopped mid-way on purpose; nothing after it is wanted
    probe = StepProbe(spec["threads"])
    probe.install()
    atexit.register(lambda: Path(spec["result"]).write_text(json.dumps(probe.result(), indent=1)))
    (child_plain if variant == "plain" else child_qlora_kit)(spec)


# ---------------------------------------------------------------------------------------------- parent


def run_child(variant: str, spec: dict, work: Path, threads: int, timeout: int) -> dict:
    spec_file = work / f"spec-{variant}.json"
    spec["result"] = str(work / f"result-{variant}.json")
    spec_file.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    env.setdefault("QLORA_KIT_CACHE", str(work / "qk-cache"))
    log = work / f"log-{variant}.txt"
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, __file__, "--child", variant, str(spec_file)], stdout=f, stderr=subprocess.STDOUT,
                           env=env, cwd=work, timeout=timeout)
    res_file = Path(spec["result"])
    if r.returncode != 0 or not res_file.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{variant} run failed (exit {r.returncode}); log {log}:\n{tail}")
    res = json.loads(res_file.read_text())
    res["process_wall_s"] = round(time.time() - t0, 1)
    return res


def summarize_run(res: dict, warmup: int) -> dict:
    steps = res["steps"][warmup:]
    if not steps:
        raise RuntimeError(f"no timed steps (saw {len(res['steps'])}, warm-up {warmup})")
    tok = sum(s["tokens"] for s in steps)
    wall, cpu = sum(s["wall"] for s in steps), sum(s["cpu"] for s in steps)
    n = len(steps)
    out = {
        "steps_timed": n, "non_pad_tokens": tok, "loss_tokens": sum(s["loss_tokens"] for s in steps),
        "tokens_per_cpu_s": tok / cpu, "tokens_per_wall_s": tok / wall,
        "s_per_step_wall": wall / n, "s_per_step_cpu": cpu / n,
        "parts_s_per_step_wall": {k: sum(s["parts"][k][0] for s in steps) / n for k in CATS},
        "parts_s_per_step_cpu": {k: sum(s["parts"][k][1] for s in steps) / n for k in CATS},
        "peak_rss_mb_process": res.get("peak_rss_mb_process"), "peak_rss_mb_training": res.get("peak_rss_mb_training"),
        "loss_first": steps[0].get("loss"), "loss_last": steps[-1].get("loss"),
        "max_batch_shape": max((s["shape"] for s in steps if s.get("shape")), key=lambda x: x[0] * x[-1], default=None),
        "process_wall_s": res.get("process_wall_s"),
        # every timed step's backward reached the decoder layers' marker, so the split is sound
        "split_checked": all(s.get("layer_backward_marks", 0) >= 1 for s in steps),
        **{k: res[k] for k in ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "nvml_used_gib_max") if k in res},
        **res["info"],
    }
    return out


def median_of(runs: list[dict]) -> dict:
    def med(key, sub=None):
        vals = [r[key][sub] if sub else r[key] for r in runs]
        vals = [v for v in vals if isinstance(v, (int, float))]
        return statistics.median(vals) if vals else None

    out = {k: med(k) for k in ("tokens_per_cpu_s", "tokens_per_wall_s", "s_per_step_wall", "s_per_step_cpu",
                               "peak_rss_mb_process", "peak_rss_mb_training", "gpu_peak_allocated_gib", "nvml_used_gib_max")
           if any(k in r for r in runs)}
    for kind in ("wall", "cpu"):
        out[f"parts_s_per_step_{kind}"] = {c: med(f"parts_s_per_step_{kind}", c) for c in CATS}
    return out


def job_specs(job: str, args, work: Path) -> dict | None:
    """Per variant: what the child needs. None when the job cannot run here (message printed)."""
    if job == "peers":
        if not (PEERS_MODEL.is_dir() and PEERS_DATA.is_file() and PEERS_RECIPE.is_file()):
            print(f"skip peers job: {SHARED} (stories260K, alpaca_en_demo.json, peers/qlora-kit/recipe.yaml) is absent")
            return None
        recipe = work / "recipe-peers.yaml"
        text = PEERS_RECIPE.read_text().replace("@MODEL@", str(PEERS_MODEL)).replace("@DATA@", str(PEERS_DATA))
        recipe.write_text(text.replace("@OUT@", str(work / "out")))
        common = {"model": str(PEERS_MODEL), "data": str(PEERS_DATA), "steps": args.steps, "batch": 4, "max_length": 256}
        return {"warmup": args.warmup, "settings": "stories260K + alpaca_en_demo, the peers job of issue 15",
                "plain": {**common, "format": "alpaca", "pad_to_multiple_of": 256,
                          "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
                "qlora-kit": {**common, "recipe": str(recipe)}}
    model = build_slice(job, args.layers, args.cache)
    s = SLICES[job]
    n = args.slice_batch * args.slice_steps
    data = work / f"data-{job}.jsonl"
    rows = slice_rows(n, recipe_lengths(), seed=1)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = LORA
    recipe = work / f"recipe-{job}.yaml"
    recipe.write_text(qlora_kit_recipe(job, model, data, lora, args.slice_batch, args.slice_max_length, args.slice_steps))
    common = {"model": str(model), "data": str(data), "steps": args.slice_steps, "batch": args.slice_batch,
              "max_length": args.slice_max_length}
    return {"warmup": args.slice_warmup, "model_dir": str(model),
            "settings": (f"{s['real']} shape, {args.layers} decoder layers, random weights; rows with the bundled "
                         f"recipes' token lengths; micro-batch {args.slice_batch}, max_length {args.slice_max_length}, "
                         "LoRA r16/a32/d.05 q,k,v,o"),
            "plain": {**common, "format": "qa", "lora": lora}, "qlora-kit": {**common, "recipe": str(recipe)}}


def qlora_kit_recipe(job, model, data, lora, batch, max_length, steps, **training) -> str:
    import yaml

    rec = {"name": f"bench-{job}", "base_model": str(model), "data": {"path": str(data), "eval_fraction": 0.0},
           "lora": {**lora, "trainable_embeddings": False},
           "training": {"max_steps": steps, "learning_rate": 2e-4, "per_device_train_batch_size": batch,
                        "gradient_accumulation_steps": 1, "max_length": max_length, "warmup_ratio": 0.0,
                        "lr_scheduler_type": "linear", "optim": "paged_adamw_8bit", "packing": False, "logging_steps": 1,
                        "save_steps": 100000, "eval_steps": 100000, "load_best_model_at_end": False,
                        "early_stopping_patience": 0, "seed": 42, **training}}
    return yaml.safe_dump(rec, sort_keys=False, allow_unicode=True)


def memory_recipe(job: str, model: Path, work: Path, tokens: int, checkpointing: bool, gpu_dtypes: bool = False) -> dict:
    """A qlora-kit recipe for one step on one row of exactly `tokens` tokens (a longer row, cut at
    max_length), micro-batch 1; compute dtype as train picks it here, or bf16 (a GPU's) with gpu_dtypes."""
    import yaml

    rows = slice_rows(4, [(tokens // 3, tokens)], seed=2)
    data = work / f"memdata-{job}-{tokens}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = yaml.safe_load(qlora_kit_recipe(job, model, data, LORA, 1, tokens, 1, gradient_checkpointing=checkpointing))
    if gpu_dtypes:
        rec["quantization"] = {"bnb_4bit_compute_dtype": "bfloat16"}
    return rec


def compare_with_plan(rec: dict, exact: dict, device: str) -> dict:
    """`qlora-kit plan`'s figures for this recipe on `device` (cpu: this machine's path; cuda: a GPU's
    dtypes and kernels, with the loss head this step used) beside the exact ones."""
    from qlora_kit import plan
    from qlora_kit.recipe import Recipe

    kw = {"device": device} if device == "cpu" else {"device": device, "loss_head": exact.get("loss_head", "model")}
    p = plan.make(Recipe.model_validate(rec), rec["base_model"], 1 << 50, **kw)
    ck = exact.get("gradient_checkpointing")
    return {"device_modelled": device, "checkpointing_requested": rec["training"]["gradient_checkpointing"],
            "checkpointing_used": ck, "tokens": exact.get("tokens"), "compute_dtype": exact.get("compute_dtype"),
            "plan_parts": p.parts, "exact": exact, "rows": plan_vs_exact(p.parts, exact, ck)}


def memory_check(job: str, args, work: Path, checkpointing: bool, gpu_dtypes: bool = False) -> dict:
    """One qlora-kit step in its own process, exact bytes beside `qlora-kit plan` for the same recipe."""
    import yaml

    model = build_slice(job, args.layers, args.cache)
    rec = memory_recipe(job, model, work, args.memory_tokens, checkpointing, gpu_dtypes)
    tag = f"{job}-{'ckpt' if checkpointing else 'nockpt'}{'-gpu' if gpu_dtypes else ''}"
    recipe = work / f"memrecipe-{tag}.yaml"
    recipe.write_text(yaml.safe_dump(rec, sort_keys=False))
    exact = run_child("memory", {"recipe": str(recipe), "out": str(work / f"memrun-{tag}"), "steps": 1,
                                 "emulate_cuda": gpu_dtypes}, work, args.threads, args.timeout)
    return compare_with_plan(rec, exact, "cuda" if gpu_dtypes else "cpu")


def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out = {"cpu": cpu, "cores_online": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
           "python": platform.python_version()}
    with contextlib.suppress(OSError):
        out["ram_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = subprocess.run(["git", "status", "--porcelain", "qlora_kit"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"commit": git("rev-parse", "--short", "HEAD"), "library_uncommitted": [x[3:] for x in status.splitlines()]}


def fmt(v, spec=".0f"):
    return "–" if v is None else format(v, spec)


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"# bench_train ({out['device']}, {out['date']})", "",
             f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m.get('ram_gib', '?')} GiB RAM"
             f"{', ' + m['gpu'] if 'gpu' in m else ''}. Torch threads fixed at {out['threads']} "
             f"(OMP_NUM_THREADS={out['threads']} and torch.set_num_threads in every training process). "
             f"qlora-kit at {out['git']['commit']}"
             f"{' + uncommitted ' + ', '.join(out['git']['library_uncommitted']) if out['git']['library_uncommitted'] else ''}.",
             "", ", ".join(f"{k} {v}" for k, v in out["versions"].items()), ""]
    for job, j in out["jobs"].items():
        lines += [f"## {job}", "", j["settings"] + f"; {j['reps']} reps alternating plain / qlora-kit, "
                  f"first {j['warmup']} steps untimed. Medians over reps; s/step parts in CPU seconds.", "",
                  "| variant | tokens / CPU-s | tokens / wall-s | s/step CPU | s/step wall | decoder layers | loss head "
                  "| optimizer | other | peak RSS MB | checkpointing | attention | batch (max shape) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for v in ("plain", "qlora-kit"):
            med, r0 = j["median"][v], j["runs"][v][0]
            parts = med["parts_s_per_step_cpu"]
            rss = fmt(med["peak_rss_mb_process"])
            if "gpu_peak_allocated_gib" in med:
                rss += f" (GPU peak {fmt(med['gpu_peak_allocated_gib'], '.2f')} GiB, NVML {fmt(med.get('nvml_used_gib_max'), '.2f')} GiB)"
            lines.append(f"| {v} | {fmt(med['tokens_per_cpu_s'])} | {fmt(med['tokens_per_wall_s'])} | "
                         f"{fmt(med['s_per_step_cpu'], '.3f')} | {fmt(med['s_per_step_wall'], '.3f')} | "
                         + " | ".join(fmt(parts[c], ".3f") for c in CATS) +
                         f" | {rss} | {r0.get('gradient_checkpointing')} | {r0.get('attn_implementation')} | "
                         f"{'padding-free' if 'cu_seq_lens_q' in (r0.get('batch_keys') or []) else 'padded'} "
                         f"{r0.get('max_batch_shape')} |")
        r = j["ratio"]
        lines += ["", f"qlora-kit / plain, per CPU-second: {r['per_cpu_s_median']:.2f}x (reps {', '.join(f'{x:.2f}' for x in r['per_cpu_s'])}); "
                  f"per wall second: {r['per_wall_s_median']:.2f}x (reps {', '.join(f'{x:.2f}' for x in r['per_wall_s'])}); "
                  f"peak RSS {r['peak_rss_median']:.2f}x.", ""]
        lines += [f"Threads seen in the training processes: torch {sorted({x.get('torch_threads') for v in j['runs'].values() for x in v})}, "
                  f"chosen by the library before the bench fixed them: {sorted({x.get('library_torch_threads') for v in j['runs'].values() for x in v})}.", ""]
    for job, checks in out.get("memory", {}).items():
        for c in checks:
            lines += [f"## memory model: {job}, checkpointing {'on' if c['checkpointing_used'] else 'off'}, "
                      f"{c['tokens']} tokens, micro-batch 1, {c['compute_dtype']} compute, plan for device "
                      f"{c['device_modelled']}" + (" (CUDA's kernel branches emulated on CPU)" if c["exact"].get("cuda_branches_emulated") else ""), "",
                      "| component | plan (qlora-kit plan) | exact | plan vs exact |", "|---|---:|---:|---:|"]
            for row in c["rows"]:
                d = row["diff_pct"]
                lines.append(f"| {row['component']} | {row['plan']:,} | {row['exact']:,} | "
                             f"{'–' if d is None else f'{d:+.1f}%'}{'' if d is None or abs(d) <= 5 else ' **>5%**'} |")
            e = c["exact"]
            lines += ["", f"Exact extras: loss-head tensors saved for backward {e.get('loss_head_saved', 0):,} B; "
                      f"whole step's live-tensor peak above its start {e.get('step_peak_above_start', 0):,} B; "
                      f"optimizer {e.get('optimizer_class')}; attention {e.get('attn_implementation')}; loss head {e.get('loss_head')}.", ""]
    lines += ["Unmeasured here: " + out["unmeasured"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="peers,llama-3.1-8b,qwen2.5-7b", help="comma-separated: peers, llama-3.1-8b, qwen2.5-7b, tiny")
    ap.add_argument("--reps", type=int, default=3, help="alternating reps per job (plain, qlora-kit, plain, ...)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every training process")
    ap.add_argument("--steps", type=int, default=40, help="peers job: optimizer steps (the issue's job: 40)")
    ap.add_argument("--warmup", type=int, default=5, help="peers job: untimed first steps (the peers harness: 5)")
    ap.add_argument("--layers", type=int, default=2, help="slices: decoder layers kept")
    ap.add_argument("--slice-steps", type=int, default=3, help="slices: optimizer steps per run (a step is ~30 CPU-s on CPU)")
    ap.add_argument("--slice-warmup", type=int, default=1)
    ap.add_argument("--slice-batch", type=int, default=2, help="slices: micro-batch (the legal and medical recipes use 2)")
    ap.add_argument("--slice-max-length", type=int, default=1024)
    ap.add_argument("--memory-tokens", type=int, default=1024, help="memory check: tokens in the one row")
    ap.add_argument("--no-memory", action="store_true", help="skip the plan-vs-exact memory check")
    ap.add_argument("--memory-only", action="store_true", help="only the plan-vs-exact memory check")
    ap.add_argument("--memory-gpu-dtypes", action="store_true",
                    help="also check the plan's GPU figures on CPU: bf16 compute, CUDA's dropout and peft branches")
    ap.add_argument("--cap-gib", type=float, default=None, help="GPU: cap this process's memory (a smaller card)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the slices are built once")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per training process")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default=None, help="file name tag (default: cpu or gpu)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(*args.child)
        return

    import torch

    from qlora_kit.rundir import versions

    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="qk-bench-train-"))
    print(f"bench_train: torch threads {args.threads} in every training process; work dir {work}", flush=True)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if gpu else f"cpu, {args.threads} thread(s)", "threads": args.threads,
           "machine": machine(), "versions": versions(), "git": git_state(), "cap_gib": args.cap_gib, "jobs": {},
           "memory": {},
           "unmeasured": ("GPU: no GPU run here; tokens/s, peak allocated, NVML and --cap-gib 24 are CPU-only so far"
                          if not gpu else "CPU figures are in bench_train-cpu.*")}
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    for job in jobs:
        if job != "peers" and job not in SLICES:
            sys.exit(f"unknown job {job!r}: choose from peers, {', '.join(SLICES)}")
        if not args.memory_only:
            specs = job_specs(job, args, work)
            if specs is not None:
                runs = {"plain": [], "qlora-kit": []}
                for rep in range(args.reps):
                    for v in ("plain", "qlora-kit") if rep % 2 == 0 else ("qlora-kit", "plain"):
                        spec = {**specs[v], "threads": args.threads, "cap_gib": args.cap_gib,
                                "out": str(work / f"{job}-{v}-{rep}")}
                        res = run_child(v, spec, work, args.threads, args.timeout)
                        runs[v].append(summarize_run(res, specs["warmup"]))
                        r = runs[v][-1]
                        print(f"{job} rep {rep + 1} {v}: {r['tokens_per_cpu_s']:.0f} tok/CPU-s, {r['tokens_per_wall_s']:.0f} tok/s, "
                              f"{r['s_per_step_wall']:.3f} s/step (layers {r['parts_s_per_step_wall']['layers']:.3f}, loss head "
                              f"{r['parts_s_per_step_wall']['loss_head']:.3f}, optimizer {r['parts_s_per_step_wall']['optimizer']:.3f}), "
                              f"peak RSS {fmt(r['peak_rss_mb_process'])} MB, threads {r.get('torch_threads')}", flush=True)
                per_cpu = [q["tokens_per_cpu_s"] / p["tokens_per_cpu_s"] for p, q in zip(runs["plain"], runs["qlora-kit"])]
                per_wall = [q["tokens_per_wall_s"] / p["tokens_per_wall_s"] for p, q in zip(runs["plain"], runs["qlora-kit"])]
                rss = [q["peak_rss_mb_process"] / p["peak_rss_mb_process"] for p, q in zip(runs["plain"], runs["qlora-kit"])
                       if p.get("peak_rss_mb_process") and q.get("peak_rss_mb_process")]
                out["jobs"][job] = {"settings": specs["settings"], "warmup": specs["warmup"], "reps": args.reps, "runs": runs,
                                    "median": {v: median_of(r) for v, r in runs.items()},
                                    "ratio": {"per_cpu_s": per_cpu, "per_cpu_s_median": statistics.median(per_cpu),
                                              "per_wall_s": per_wall, "per_wall_s_median": statistics.median(per_wall),
                                              "peak_rss_median": statistics.median(rss) if rss else float("nan")}}
        if job != "peers" and not args.no_memory:
            out["memory"][job] = [memory_check(job, args, work, ck) for ck in (True, False)]
            if args.memory_gpu_dtypes:
                out["memory"][job] += [memory_check(job, args, work, ck, gpu_dtypes=True) for ck in (True, False)]
            for c in out["memory"][job]:
                worst = max((abs(r["diff_pct"]) for r in c["rows"] if r["diff_pct"] is not None), default=0)
                print(f"{job} memory model (checkpointing {c['checkpointing_used']}): worst component {worst:.1f}% off", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("gpu" if gpu else "cpu")
    (args.out / f"bench_train-{tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = markdown(out)
    (args.out / f"bench_train-{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
