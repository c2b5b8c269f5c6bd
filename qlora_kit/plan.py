"""`qlora-kit plan`: will this recipe fit on this GPU, before any weight is loaded?

The estimate is built from the model's config alone, component by component, for the path
`train` takes (bf16 compute, embeddings and head in bf16, no fp32 upcast, gradient
checkpointing, TRL's tiled loss):

    4-bit weights      0.5 byte per parameter of every decoder linear layer, plus quantization
                       constants: 1 byte per 64-weight block (double quantization) + fp32 per 256 blocks
    embeddings, head   vocabulary x hidden x 2 bytes each (one copy when tied)
    LoRA               r x (in + out) per adapted layer; fp32 weights 4 + fp32 gradients 4 +
                       8-bit Adam 2 bytes per parameter
    activations        with checkpointing, each layer keeps its bf16 input (tokens x hidden x 2);
                       backward recomputes one layer at a time, whose working set is bounded by the
                       attention and MLP intermediates of that layer
    dequantization     one bf16 copy of the largest 4-bit weight while it is multiplied
    logits and loss    the final hidden states plus one vocabulary tile of logits in fp32
    CUDA context       about 0.5 GiB, plus 5 % allocator fragmentation

Components that are exact byte counts (weights, constants, LoRA, optimizer) are checked
against a real 4-bit model on CPU in the tests; the activation terms are estimates until a GPU
run measures them (scripts/bench_train.py records prediction beside measurement).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

GiB = 1 << 30
CUDA_CONTEXT = int(0.5 * GiB)
FRAGMENTATION = 0.05
LOSS_TILE_TOKENS = 1024  # tokens whose fp32 logits exist at once in a tiled loss

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
    try:
        from huggingface_hub import hf_hub_download

        f = hf_hub_download(spec, "config.json")
        return json.loads(Path(f).read_text(encoding="utf-8")), f
    except Exception as e:
        raise UserError(f"cannot get the config of '{spec}' ({type(e).__name__})",
                        "pass --base-model with a local model folder or its config.json") from None


def estimate(shape: Shape, *, r: int, target: str | list, max_length: int, micro_batch: int,
             double_quant: bool = True, checkpointing: bool = True, padding_efficiency: float = 1.0) -> dict[str, int]:
    lin = shape.linears()
    n4 = sum(i * o for i, o in lin.values()) * shape.layers
    blocks = n4 / 64
    consts = (blocks * 1 + blocks / 256 * 4) if double_quant else blocks * 4
    emb = shape.vocab * shape.hidden * 2 * (1 if shape.tied else 2)
    n_lora = shape.lora_params(r, target)
    tokens = micro_batch * max_length / max(padding_efficiency, 1e-6)
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    saved_per_layer = tokens * h * 2 if checkpointing else tokens * (6 * h + 2 * q + 2 * kv + 4 * i) * 2
    # one layer recomputed in backward: norms, q/k/v/o, attention output, MLP gate/up/act/product,
    # plus the gradients flowing through them (about the same again)
    layer_work = tokens * (4 * h + 2 * q + 2 * kv + 4 * i) * 2 * 2 if checkpointing else 0
    dequant = max(a * b for a, b in lin.values()) * 2
    loss = tokens * h * 2 + min(tokens, LOSS_TILE_TOKENS) * shape.vocab * 4 * 2
    parts = {
        "weights_4bit": int(n4 * 0.5),
        "quant_constants": int(consts),
        "embeddings_and_head_bf16": int(emb),
        "lora_weights_fp32": int(n_lora * 4),
        "lora_gradients_fp32": int(n_lora * 4),
        "optimizer_8bit_adam": int(n_lora * 2),
        "activations_checkpointed": int(saved_per_layer * shape.layers),
        "layer_recompute": int(layer_work),
        "dequantized_weight": int(dequant),
        "logits_and_loss": int(loss),
        "cuda_context": CUDA_CONTEXT,
    }
    parts["fragmentation"] = int(FRAGMENTATION * sum(parts.values()))
    return parts


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


def make(recipe, model_spec: str | None = None, gpu_memory: int = 24 * GiB, max_length: int | None = None) -> Plan:
    spec = model_spec or recipe.base_model
    cfg, source = load_config(spec)
    shape = Shape.from_config(cfg)
    t, lo = recipe.training, recipe.lora
    T = max_length or t.max_length
    kw = dict(r=lo.r, target=lo.target_modules, double_quant=recipe.quantization.bnb_4bit_use_double_quant,
              checkpointing=t.gradient_checkpointing)
    parts = estimate(shape, max_length=T, micro_batch=t.per_device_train_batch_size, **kw)
    total = sum(parts.values())

    def fits(b, length):
        return sum(estimate(shape, max_length=length, micro_batch=b, **kw).values()) <= gpu_memory

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
    return Plan(spec, source, gpu_memory, T, t.per_device_train_batch_size, parts, total, total <= gpu_memory,
                best_b, lo_len, n_lora)


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
