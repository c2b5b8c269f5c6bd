"""`qlora-kit plan`: will this recipe fit on this GPU, before any weight is loaded?

The estimate is built from the model's config alone, component by component, for the path
`train` takes (compute dtype: bf16 on a GPU, fp32 on CPU; embeddings and head in it, no fp32
upcast; the loss head train picks for the device and vocabulary):

    4-bit weights      0.5 byte per parameter of every decoder linear layer, plus quantization
                       constants: 1 byte per 64-weight block (double quantization) + fp32 per 256 blocks
    embeddings, head   vocabulary x hidden in the compute dtype each (one copy when tied)
    LoRA               r x (in + out) per adapted layer; fp32 weights 4 + fp32 gradients 4 bytes
    optimizer          training.optim's states: 8-bit blockwise AdamW (2 bytes + absmax), or fp32 (8)
    activations        what each layer saves for backward (layer_activation_bytes, measured tensor by
                       tensor); a checkpointed layer keeps only its input, and backward recomputes
                       one layer at a time
    dequantization     one copy of the largest 4-bit weight in the compute dtype while it is multiplied
    logits and loss    full logits (the model's own loss), vocabulary tiles (chunked), or token chunks (liger)
    CUDA context       about 0.5 GiB on a GPU, plus 5 % allocator fragmentation

gradient_checkpointing: auto is decided here (decide_checkpointing), from the same estimate that
`qlora-kit plan` prints: none if the step fits the budget without it, else the fewest
checkpointed layers that fit, else every layer.

Components that are exact byte counts (weights, constants, LoRA, optimizer) are checked
against a real 4-bit model on CPU in the tests; the activation terms are estimates until a GPU
run measures them (scripts/bench_train.py records prediction beside measurement).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .devices import LARGE_VOCAB, liger_available
from .errors import UserError

GiB = 1 << 30
# Automatic choices (checkpointing, kept weights) leave this share of the budget unplanned: the
# GPU-only terms (CUDA context, allocator, kernels' workspaces) are not measured on a GPU yet.
AUTO_HEADROOM = 0.9
CUDA_CONTEXT = int(0.5 * GiB)
FRAGMENTATION = 0.05

# Configs of the architectures the recipes and benchmarks use, so `plan` works offline.
KNOWN = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                             tie_word_embeddings=False, max_position_embeddings=131072),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                     num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                                     tie_word_embeddings=False, max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                       num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                                       tie_word_embeddings=True, max_position_embeddings=32768),
}
KNOWN["meta-llama/Llama-3.1-8B"] = KNOWN["meta-llama/Llama-3.1-8B-Instruct"]
KNOWN["Qwen/Qwen2.5-7B"] = KNOWN["Qwen/Qwen2.5-7B-Instruct"]
KNOWN["Qwen/Qwen2.5-1.5B"] = KNOWN["Qwen/Qwen2.5-1.5B-Instruct"]


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        try:
            h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(h, int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"]), heads,
                       int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or h // heads),
                       int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)),
                       int(cfg.get("max_position_embeddings") or 0))
        except KeyError as e:
            raise UserError(f"the model config has no {e.args[0]}; plan supports decoder-only transformers "
                            "(Llama, Qwen2, Mistral, ...)") from None

    def adapted(self, target) -> list[str]:
        """The linear layers of a block that LoRA adapts for a recipe's target_modules."""
        lin = self.linears()
        if target == "all-linear":
            return list(lin)
        if target == "attention":
            return ["q_proj", "k_proj", "v_proj", "o_proj"]
        return [t for t in target if t in lin]

    def lora_params(self, r: int, target) -> int:
        lin = self.linears()
        return sum(r * (lin[t][0] + lin[t][1]) for t in self.adapted(target)) * self.layers

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


def load_config(spec: str) -> tuple[dict, str]:
    """config.json of a local folder, builtin model, known architecture, or the hub (config only)."""
    if spec.startswith("builtin:") or Path(spec).expanduser().exists():
        if spec.startswith("builtin:"):
            from . import tiny

            d = tiny.ensure(spec.split(":", 1)[1])
        else:
            d = Path(spec).expanduser()
        f = d / "config.json" if d.is_dir() else d
        if not f.is_file():
            raise UserError(f"{spec}: no config.json", "point --base-model at a model folder or its config.json")
        return json.loads(f.read_text(encoding="utf-8")), str(f)
    if spec in KNOWN:
        return dict(KNOWN[spec]), "built-in config"
    f = _hub_config(spec)
    return json.loads(f.read_text(encoding="utf-8")), str(f)


HUB_PROBE_TIMEOUT_S = 5.0
_NO_HUB_FIX = "pass --base-model with a local model folder or its config.json, or one of: " + ", ".join(KNOWN)


def _hub_config(spec: str) -> Path:
    """config.json of a hub id: from the local cache, else one request with a short timeout and no
    retries (hf_hub_download retries with back-off, about 23 s on a machine without network)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(spec, "config.json")
    except HFValidationError:
        raise UserError(f"--base-model {spec}: neither a local folder nor a Hugging Face hub id", _NO_HUB_FIX) from None
    if isinstance(cached, str):
        return Path(cached)
    if constants.is_offline_mode():
        raise UserError(f"cannot get the config of '{spec}': it is not in the local Hugging Face cache and "
                        "HF_HUB_OFFLINE is set", _NO_HUB_FIX)
    try:
        get_hf_file_metadata(hf_hub_url(spec, "config.json"), timeout=HUB_PROBE_TIMEOUT_S)
        return Path(hf_hub_download(spec, "config.json"))
    except RepositoryNotFoundError:  # also private and gated repositories without a login
        raise UserError(f"'{spec}' is not a model on the Hugging Face hub (or it is private or gated)",
                        "check the id; for a gated model log in with `hf auth login`; or " + _NO_HUB_FIX) from None
    except EntryNotFoundError:
        raise UserError(f"'{spec}' on the Hugging Face hub has no config.json", _NO_HUB_FIX) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else type(e).__name__
        raise UserError(f"cannot get the config of '{spec}' from the Hugging Face hub ({status})", _NO_HUB_FIX) from None
    except Exception as e:  # no network, DNS, proxy, timeout: the hub is not reachable from here
        raise UserError(f"cannot get the config of '{spec}': the Hugging Face hub is not reachable from here "
                        f"({type(e).__name__}) and it is not in the local cache", _NO_HUB_FIX) from None


OPTIMIZERS_8BIT = ("paged_adamw_8bit", "adamw_8bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256  # one fp32 absmax per block of 8-bit state


def optimizer_bytes(numels: list[int], optim: str) -> int:
    """State bytes of `optim` (training.optim) for trainable tensors of these sizes: AdamW keeps two
    states per weight, fp32 (adamw_torch, paged_adamw_32bit: 8 bytes) or 8-bit blockwise
    (bitsandbytes: 2 bytes + an fp32 absmax per 256 per state, and its two 256-entry code tables;
    tensors under 4096 weights keep fp32 states). torch's AdamW adds a 4-byte step per tensor."""
    if optim in OPTIMIZERS_8BIT:
        small = [n for n in numels if n < BNB_MIN_8BIT_SIZE]
        big = [n for n in numels if n >= BNB_MIN_8BIT_SIZE]
        return sum(8 * n for n in small) + sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) for n in big) + (2 * 256 * 4 if big else 0)
    return sum(8 * n for n in numels) + (4 * len(numels) if optim == "adamw_torch" else 0)


def lora_bytes(act_bytes: int, device: str) -> tuple[float, float, float]:
    """Bytes a LoRA layer saves per token: (per input feature, per rank, per input feature that the
    first layer does not save). fp32: the dropped-out input and the dropout mask (a float tensor on
    CPU, bool on CUDA). Mixed precision (bf16/fp16 autocast): PEFT casts the input to the fp32 LoRA
    weights, the dropout keeps its fp32 output and mask, autocast saves a half-precision copy for
    LoRA A; A's output is kept in both precisions. Measured with saved_tensors_hooks on CPU.
    Mixed precision on CUDA: PEFT's input cast asks whether CUDA autocast is on, and it is, so the
    input stays in the compute dtype; the dropout's output and its bool mask, and A's output in the
    compute dtype (measured on CPU with CUDA's branches taken: bench_train.py --memory-gpu-dtypes)."""
    if act_bytes >= 4:
        mask = 4 if device == "cpu" else 1
        return 4 + mask, 4, mask
    if device != "cpu":
        return act_bytes + 1, act_bytes, 1
    return 6.25, 8.5, 4.125


def layer_activation_bytes(shape: Shape, tokens: float, *, r: int, target, act_bytes: int, device: str) -> float:
    """Bytes one decoder layer saves for backward without checkpointing (4-bit base, LoRA with dropout).
    Measured per tensor with torch.autograd.graph.saved_tensors_hooks on CPU (tests/test_plan.py):
    two RMSNorms (each its fp32 input and rsqrt, whatever the compute dtype), each adapted layer
    (lora_bytes), attention q, k, v and its output (q-sized) and one fp32 log-sum-exp per head, and
    the MLP's gate, up and activated gate."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lin = shape.linears()
    per_in, per_r, _ = lora_bytes(act_bytes, device)
    lora = sum(lin[t][0] * per_in + r * per_r for t in shape.adapted(target))
    per_token = 2 * (h * 4 + 4) + lora + (2 * q + 2 * kv) * act_bytes + 4 * shape.heads + 3 * i * act_bytes
    return tokens * per_token


def saved_activations(layers: int, every_n: int, full: float, layer_input: float) -> tuple[float, float]:
    """(saved at the end of the forward, extra peak while backward recomputes). A checkpointed layer
    (transformers: indices 0, n, 2n, ...) keeps only its input. Backward goes from the last layer
    down; when it reaches checkpointed layer i, the layers above have been released, those below
    still hold what they saved, and layer i's recomputed activations and the gradient flowing
    through it (two layer inputs) exist at once."""
    below = saved = 0.0
    peak = 0.0
    for i in range(layers):
        ck = every_n > 0 and i % every_n == 0
        if ck:
            peak = max(peak, below + full + 2 * layer_input)
        below += layer_input if ck else full
    saved = below
    return saved, max(0.0, peak - saved)


def checkpointed_layers(layers: int, every_n: int) -> int:
    """How many layers `every_n_layers` checkpoints (transformers: indices 0, n, 2n, ...); 0: none."""
    return 0 if every_n <= 0 else -(-layers // every_n)


def estimate(shape: Shape, *, r: int, target: str | list, max_length: int, micro_batch: int,
             double_quant: bool = True, checkpointing: bool | int = True, padding_efficiency: float = 1.0,
             optim: str = "paged_adamw_8bit", act_bytes: int = 2, device: str = "cuda",
             loss_head: str = "chunked", keep_dequantized: bool = False) -> dict[str, int]:
    """Peak memory by component. checkpointing: True (every layer), False (none) or n (every n-th
    layer); act_bytes: the compute dtype's size (2 on a GPU, 4 for fp32 on CPU); loss_head: model
    (full logits), chunked (vocabulary tiles) or liger (fused linear cross-entropy);
    keep_dequantized: the 4-bit weights are kept dequantized from forward to backward
    (fastpath.keep_dequantized_weights), saved like activations."""
    every_n = 1 if checkpointing is True else 0 if checkpointing is False else int(checkpointing)
    lin = shape.linears()
    n4 = sum(i * o for i, o in lin.values()) * shape.layers
    blocks = n4 / 64
    consts = (blocks * 1 + blocks / 256 * 4) if double_quant else blocks * 4
    emb = shape.vocab * shape.hidden * act_bytes * (1 if shape.tied else 2)
    n_lora = shape.lora_params(r, target)
    lora_numels = [n for t in shape.adapted(target) for n in (r * lin[t][0], r * lin[t][1])] * shape.layers
    tokens = micro_batch * max_length / max(padding_efficiency, 1e-6)
    h, V = shape.hidden, shape.vocab
    full = layer_activation_bytes(shape, tokens, r=r, target=target, act_bytes=act_bytes, device=device)
    saved, layer_work = saved_activations(shape.layers, every_n, full, tokens * h * act_bytes)
    saved += tokens * 2 * shape.head_dim * act_bytes  # RoPE cos and sin, shared by the layers
    if act_bytes < 4:  # autocast's cast cache: a compute-dtype copy of every LoRA weight for the step
        saved += n_lora * act_bytes
    if every_n == 0:
        # without checkpointing the first layer's input (frozen embeddings) needs no gradient: its
        # first norm saves nothing, nor do the dropouts of the projections reading that norm
        qkv = sum(1 for t in shape.adapted(target) if t in ("q_proj", "k_proj", "v_proj"))
        saved -= tokens * (h * 4 + 4 + qkv * h * lora_bytes(act_bytes, device)[2])
    dequant = max(a * b for a, b in lin.values()) * act_bytes
    kept = 0
    if keep_dequantized:
        # every frozen linear whose input needs a gradient: all but the first layer's q/k/v without
        # checkpointing (their input comes from the frozen embeddings)
        kept = sum(i * o for i, o in lin.values()) * shape.layers * act_bytes
        if every_n == 0:
            kept -= sum(lin[t][0] * lin[t][1] for t in ("q_proj", "k_proj", "v_proj")) * act_bytes
    if loss_head == "model":
        # logits in the compute dtype, their fp32 log-softmax and its gradient; in half precision
        # also the fp32 upcast of the logits and the gradient cast back (12 bytes per logit either way)
        loss = tokens * (V * (act_bytes + 8 + (act_bytes if act_bytes < 4 else 0)) + h * act_bytes)
    elif loss_head == "liger":  # token chunks whose logits are about the size of the hidden states
        loss = tokens * h * act_bytes * 3
    else:  # TRL's tiles: up to 4096 tokens x 32768 vocabulary entries in the compute dtype at once
        loss = tokens * h * act_bytes * 2 + min(tokens, 4096) * min(V, 32768) * act_bytes
    parts = {
        "weights_4bit": int(n4 * 0.5),
        "quant_constants": int(consts),
        "embeddings_and_head": int(emb),
        "lora_weights_fp32": int(n_lora * 4),
        "lora_gradients_fp32": int(n_lora * 4),
        "optimizer_state": optimizer_bytes(lora_numels, optim),
        "activations": int(saved),
        "activations_dequantized_weights": int(kept),
        "layer_recompute": int(layer_work),
        "dequantized_weight": int(dequant),
        "logits_and_loss": int(loss),
        "cuda_context": CUDA_CONTEXT if device == "cuda" else 0,
    }
    parts["fragmentation"] = int(FRAGMENTATION * sum(parts.values()))
    return parts


def checkpointing_choices(layers: int) -> list[int]:
    """every_n values from fastest to leanest: none (0), then fewer to more checkpointed layers, 1 = all."""
    out, seen = [0], {0}
    for n in range(layers, 0, -1):
        k = checkpointed_layers(layers, n)
        if k not in seen:
            seen.add(k)
            out.append(n)
    return out


def describe_checkpointing(every_n: int, layers: int) -> str:
    if every_n <= 0:
        return "none"
    if every_n == 1:
        return "all layers"
    nth = f"{every_n}{'nd' if every_n % 10 == 2 and every_n % 100 != 12 else 'rd' if every_n % 10 == 3 and every_n % 100 != 13 else 'th'}"
    return f"every {nth} layer ({checkpointed_layers(layers, every_n)} of {layers})"


@dataclass
class Plan:
    model: str
    source: str
    gpu_memory: int
    max_length: int
    micro_batch: int
    parts: dict
    total: int
    fits: bool
    best_micro_batch: int
    longest_max_length: int
    lora_params: int
    device: str = "cuda"
    optim: str = "paged_adamw_8bit"
    checkpointing: str = "all layers"  # none | all layers | every nth layer (k of L)
    every_n_layers: int = 1  # 0: none
    checkpointing_why: str = ""
    keep_dequantized: bool = False
    keep_dequantized_why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(s: str) -> int:
    t = s.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", GiB), ("gb", 10**9), ("mib", 1 << 20), ("mb", 10**6), ("g", GiB)):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise UserError(f"--gpu-memory {s!r}: expected a size such as 24GiB or 80GB") from None


def act_bytes_for(recipe, device: str) -> int:
    """Bytes per activation value in the compute dtype train uses on `device` (model.compute_dtype)."""
    name = recipe.quantization.bnb_4bit_compute_dtype
    if name == "auto":
        return 2 if device == "cuda" else 4
    return 4 if name == "float32" else 2


def default_loss_head(training, shape: Shape, device: str) -> str:
    """The head train picks on `device` (fastpath.choose_loss_head), without asking TRL whether it has
    the tiled head (that would import TRL and torch into `plan`): liger when training.liger_kernel
    is true (train uses it on the GPU, or refuses) or auto with liger-kernel installed."""
    if device == "cpu":
        return "model"
    if training.liger_kernel is True or (training.liger_kernel == "auto" and liger_available()):
        return "liger"
    return "chunked" if shape.vocab >= LARGE_VOCAB else "model"


def make(recipe, model_spec: str | None = None, gpu_memory: int = 24 * GiB, max_length: int | None = None, *,
         device: str = "cuda", loss_head: str | None = None, budget_name: str | None = None) -> Plan:
    """The memory plan for a recipe within a budget (`gpu_memory`: a GPU's memory, or with device
    "cpu" the RAM train may use). With gradient_checkpointing: auto it also decides checkpointing:
    none when the step fits without, else the fewest checkpointed layers that fit, else all."""
    spec = model_spec or recipe.base_model
    cfg, source = load_config(spec)
    shape = Shape.from_config(cfg)
    t, lo = recipe.training, recipe.lora
    T = max_length or t.max_length
    head = loss_head or default_loss_head(t, shape, device)
    kw = dict(r=lo.r, target=lo.target_modules, double_quant=recipe.quantization.bnb_4bit_use_double_quant,
              optim=t.optim, act_bytes=act_bytes_for(recipe, device), device=device, loss_head=head)
    B = t.per_device_train_batch_size

    def total(b, length, every_n):
        return sum(estimate(shape, max_length=length, micro_batch=b, checkpointing=every_n, **kw).values())

    every_n, why = decide_checkpointing(t.gradient_checkpointing, shape.layers, lambda n: total(B, T, n), gpu_memory,
                                        budget_name or (f"{gpu_memory / GiB:.1f} GiB GPU" if device == "cuda" else
                                                        f"{gpu_memory / GiB:.1f} GiB of RAM"))
    keep, keep_why = decide_keep_dequantized(every_n, total(B, T, every_n),
                                             lambda: sum(estimate(shape, max_length=T, micro_batch=B, checkpointing=0,
                                                                  keep_dequantized=True, **kw).values()),
                                             gpu_memory)
    parts = estimate(shape, max_length=T, micro_batch=B, checkpointing=every_n, keep_dequantized=keep, **kw)
    leanest = 1 if t.gradient_checkpointing == "auto" else every_n  # what auto would fall back to

    def fits(b, length):
        return total(b, length, leanest) <= gpu_memory

    best_b = 0
    while best_b < 1024 and fits(best_b + 1, T):
        best_b += 1
    lo_len, hi_len = 0, max(shape.max_positions, T, 1) * 4
    while lo_len < hi_len:  # longest max_length at micro-batch 1
        mid = (lo_len + hi_len + 1) // 2
        if fits(1, mid):
            lo_len = mid
        else:
            hi_len = mid - 1
    n_lora = shape.lora_params(lo.r, lo.target_modules)
    peak = sum(parts.values())
    return Plan(spec, source, gpu_memory, T, B, parts, peak, peak <= gpu_memory, best_b, lo_len, n_lora, device,
                t.optim, describe_checkpointing(every_n, shape.layers), every_n, why, keep, keep_why)


def decide_keep_dequantized(every_n: int, peak: int, peak_keeping, budget: int) -> tuple[bool, str]:
    """Keep the dequantized 4-bit weights from forward to backward (no second dequantization)
    only when nothing is checkpointed and the step still fits the budget with them."""
    if every_n:
        return False, "memory is short (checkpointing): each weight is dequantized again in backward"
    with_them = peak_keeping()
    if with_them <= budget * AUTO_HEADROOM:
        return True, f"they fit: {_size(with_them - peak)} more, about {_size(with_them)} in all"
    return False, f"they would not fit ({_size(with_them)} in all): each weight is dequantized again in backward"


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def decide_checkpointing(setting, layers: int, peak_with, budget: int, budget_name: str) -> tuple[int, str]:
    """(every_n_layers, why). `peak_with(every_n)` is the plan's peak; 0 = no checkpointing. Plans
    within AUTO_HEADROOM of the budget."""
    if setting is True:
        return 1, "training.gradient_checkpointing: true"
    if setting is False:
        return 0, "training.gradient_checkpointing: false"
    budget = int(budget * AUTO_HEADROOM)
    budget_name = f"{_size(budget)} planned of the {budget_name}"
    none = peak_with(0)
    if none <= budget:
        return 0, f"the step fits without: about {_size(none)} within {budget_name}"
    for n in checkpointing_choices(layers)[1:]:
        peak = peak_with(n)
        if peak <= budget:
            return n, (f"without checkpointing about {_size(none)}, over {budget_name}; "
                       f"with {describe_checkpointing(n, layers)}: about {_size(peak)}")
    return 1, (f"about {_size(peak_with(1))} even with every layer checkpointed, over {budget_name}; "
               "checkpointing all layers")


def memory_budget(gpu: bool) -> tuple[int, str]:
    """(bytes, description) that train may use: the GPU's free memory, or on CPU the available RAM."""
    if gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free, f"{free / GiB:.1f} GiB free on {torch.cuda.get_device_name(0)}"
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail, f"{avail / GiB:.1f} GiB of available RAM"


def render(plan: Plan, console) -> None:
    from rich.table import Table

    t = Table(title=f"memory plan: {plan.model} · max_length {plan.max_length} · micro-batch {plan.micro_batch}",
              title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    for k, v in plan.parts.items():
        t.add_row(k.replace("_", " "), f"{v / GiB:.2f}")
    t.add_row("[bold]total[/]", f"[bold]{plan.total / GiB:.2f}[/]")
    console.print(t)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"{verdict} in {plan.gpu_memory / GiB:.1f} GiB; largest micro-batch at max_length {plan.max_length}: "
                  f"{plan.best_micro_batch}; longest max_length at micro-batch 1: {plan.longest_max_length:,} tokens")
    console.print(f"gradient checkpointing: {plan.checkpointing} ({plan.checkpointing_why}); optimizer {plan.optim}",
                  highlight=False)
    console.print(f"dequantized weights kept for backward: {'yes' if plan.keep_dequantized else 'no'} "
                  f"({plan.keep_dequantized_why})", highlight=False)
