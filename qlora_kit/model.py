"""Base model, tokenizer and LoRA: everything between a recipe and a trainable PeftModel.

Each library mapping (BitsAndBytesConfig, LoraConfig) is built in exactly one function here, so a
test can check it for every shipped recipe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .devices import has_gpu
from .errors import UserError
from .recipe import Recipe
from .template import DEFAULT_CHAT_TEMPLATE

PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def compute_dtype(recipe: Recipe) -> torch.dtype:
    name = recipe.quantization.bnb_4bit_compute_dtype
    if name == "auto":
        if has_gpu():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU: bf16 matmuls are slow and, on AVX512-BF16 parts, a different kernel
    return getattr(torch, name)


def bnb_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    from .distributed import world

    q = recipe.quantization
    extra = {}
    if world().strategy == "fsdp":
        # FSDP shards flat tensors of one dtype: store the packed 4-bit weights as the compute
        # dtype (same bytes, another view) instead of uint8, so they shard with everything else
        extra["bnb_4bit_quant_storage"] = compute_dtype(recipe)
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(recipe),
        **extra,
    )


# --- finding the base model -----------------------------------------------------------------------

WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def resolve_base_model(spec: str, revision: str | None = None, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> str:
    """A local directory (checked for config and weights), builtin:tiny, or a hub id (checked now,
    so an offline machine fails in one second with a fix, not after data preparation)."""
    if spec.startswith("builtin:"):
        from . import tiny

        return str(tiny.ensure(spec.split(":", 1)[1]))
    p = Path(spec).expanduser()
    looks_local = p.exists() or spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise UserError(f"base model directory not found: {spec}", "pass --base-model with an existing directory or a hub id")
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: no config.json, so this is not a Hugging Face model directory",
                            "point --base-model at the folder that holds config.json and the weights")
        if not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
            raise UserError(f"{p}: config.json but no weights (*.safetensors)",
                            "the download is incomplete; fetch the model again (hf download ID --local-dir DIR)")
        refuse_pickle(p, allow_pickle)
        refuse_custom_code(p, trust_remote_code)
        return str(p.resolve())
    from huggingface_hub import snapshot_download

    try:
        # safetensors only: pickled *.bin weights can run code when loaded
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        path = snapshot_download(spec, revision=revision, allow_patterns=patterns + (["*.py"] if trust_remote_code else []))
    except Exception as e:  # offline, unknown repo, gated, ...: all fixable by the user
        kind = type(e).__name__
        raise UserError(
            f"cannot get base model '{spec}' from the Hugging Face hub ({kind}); it is not in the local cache "
            "and could not be downloaded",
            f"on a machine with network run `hf download {spec} --local-dir DIR` (or copy the model folder here) "
            "and pass --base-model /path/to/model; for a quick offline test use --base-model builtin:tiny",
        ) from None
    refuse_custom_code(path, trust_remote_code)
    return path


# --- what a model folder may run ------------------------------------------------------------------
# Loading can run code from the folder: Python files named by `auto_map` (with trust_remote_code)
# and pickled *.bin weights. Only the person who starts a command grants either, on its command
# line; a recipe.yaml or run.json inside a run directory someone sent never does. These checks are
# cheap file reads, done before anything is loaded, so a refusal costs no time and runs nothing.


def custom_code_files(model_dir: str | Path) -> list[str]:
    """The Python files a model folder asks transformers to import (`auto_map` in config.json or
    tokenizer_config.json), e.g. ['modeling_x.py']; [] for a model built into transformers."""
    files: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            cfg = json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        amap = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if not amap:
            continue
        refs = amap.values() if isinstance(amap, dict) else [amap]
        for ref in refs:
            for r in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(r, str) and r:
                    # "module.Class" or "owner/repo--module.Class": the file is module.py
                    files.add(r.split("--")[-1].rsplit(".", 1)[0] + ".py")
                elif r is not None:
                    files.add(f"{name}: auto_map")
    return sorted(files)


class CustomCodeRefused(UserError):
    """A model folder asks to run its own code and this command was not given --trust-remote-code."""


def refuse_custom_code(model_dir: str | Path, trust_remote_code: bool) -> None:
    """UserError when the folder asks for its own code and this command was not given --trust-remote-code.
    (Without the check transformers would silently fall back to its built-in class, or prompt.)"""
    files = custom_code_files(model_dir)
    if files and not trust_remote_code:
        raise CustomCodeRefused(f"{model_dir}: this model asks to run its own Python code when loaded ({', '.join(files)})",
                                "if you trust where the model came from, pass --trust-remote-code to this command "
                                "(a recipe.yaml in a run directory never grants it)")


def refuse_pickle(model_dir: str | Path, allow_pickle: bool) -> None:
    p = Path(model_dir)
    if not allow_pickle and not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise UserError(f"{p}: weights only in pickle format (*.bin), which can run code when loaded",
                        "convert them to safetensors, or pass --allow-pickle to this command if you trust the source")


def refuse_unsafe(model_dir: str | Path, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Both checks, for a folder about to be loaded with these grants."""
    refuse_custom_code(model_dir, trust_remote_code)
    refuse_pickle(model_dir, allow_pickle)


# --- tokenizer ------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    template_source: str  # "model" | "recipe" | "default"
    pad_token: str
    stop_token_ids: list[int]


def _embedding_rows(model_dir: str) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def prepare_tokenizer(tokenizer, recipe: Recipe, model_dir: str) -> TokenizerInfo:
    """Chat template, a pad token distinct from EOS, and the ids that end an answer."""
    if recipe.chat_template:
        tokenizer.chat_template = recipe.chat_template
        source = "recipe"
    elif getattr(tokenizer, "chat_template", None):
        source = "model"
    else:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        source = "default"
    if tokenizer.eos_token is None:
        raise UserError(f"{model_dir}: the tokenizer defines no EOS token, so a model cannot learn to stop",
                        "use a model whose tokenizer_config.json sets eos_token")
    # pad must not be EOS: collators and losses that mask pad positions would hide EOS from the
    # loss, and the tuned model would never stop generating (peers' most reported chat bug).
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        choice = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        rows = _embedding_rows(model_dir)
        if choice is None and rows is not None and len(tokenizer) < rows:
            # a spare embedding row exists (vocabularies are often padded to a multiple of 64/128):
            # a new pad token there needs no resize; pad positions are masked, so its row never matters
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        elif choice is None and tokenizer.bos_token is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.bos_token  # masked in attention and loss; only must not be EOS
        elif choice is None:
            raise UserError(f"{model_dir}: no token can serve as padding without hiding EOS",
                            "add a pad token to the tokenizer (tokenizer_config.json: pad_token)")
        else:
            tokenizer.pad_token = choice
    stop = {tokenizer.eos_token_id}
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_dir)
        eos = gen.eos_token_id
        stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    return TokenizerInfo(source, tokenizer.pad_token, sorted(i for i in stop if i is not None))


def load_tokenizer(model_dir: str, recipe: Recipe):
    from transformers import AutoTokenizer

    refuse_custom_code(model_dir, recipe.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=recipe.trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{model_dir}: only a slow (Python) tokenizer is available",
                        "install `tokenizers` and make sure tokenizer.json is in the model folder")
    return tok


def load_saved_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A tokenizer folder qlora-kit wrote (RUN/tokenizer, a merged model). It may have come with a
    run someone sent: trust_remote_code is always explicit, so transformers neither runs its code
    unasked nor stops to prompt for it."""
    from transformers import AutoTokenizer

    refuse_custom_code(path, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# --- model ----------------------------------------------------------------------------------------


def pin_exact_cpu_kernels(model: nn.Module) -> int:
    """On AVX512-BF16 CPUs bitsandbytes switches Linear4bit to a repacked bf16 kernel in eval/no-grad
    mode: it asserts on out_features not divisible by 32 and moves logits by ~1e-2. Evaluation,
    generation and the merge check must see the same numbers as training, so use the exact path."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _device_map():
    """One whole model per process: GPU `LOCAL_RANK` (0 without torchrun), or the CPU. FSDP loads
    without a device map and places the shards itself."""
    from .distributed import world

    w = world()
    if w.strategy == "fsdp":
        return None
    return {"": w.local_rank} if has_gpu() else {"": "cpu"}


def load_4bit(model_dir: str, recipe: Recipe, attn_implementation: str | None = None):
    """The 4-bit base. `attn_implementation`: training passes its layout's kernel (attention.choose);
    everything else (generation, merge, evaluation) gets transformers' own for the recipe."""
    from transformers import AutoModelForCausalLM

    from . import attention

    # every loader of a base comes here (train, and each command reading a run's base_model_path)
    refuse_unsafe(model_dir, recipe.trust_remote_code, recipe.allow_pickle)
    dtype = compute_dtype(recipe)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=bnb_config(recipe),
            dtype=dtype,
            device_map=_device_map(),
            trust_remote_code=recipe.trust_remote_code,
            use_safetensors=None if recipe.allow_pickle else True,
            attn_implementation=attn_implementation or attention.inference_implementation(recipe),
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{model_dir}: this model needs custom code from its repository",
                            "if you trust it, pass --trust-remote-code") from None
        raise
    pin_exact_cpu_kernels(model)
    return model


def _is_linear(m: nn.Module) -> bool:
    # nn.Linear covers bnb.nn.Linear4bit (a subclass); GPT-2 style models use transformers' Conv1D.
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def attention_module_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the model's attention blocks, found by structure:
    a module whose class name contains 'Attention' (LlamaAttention, Qwen2Attention, GPT2Attention,
    MistralAttention, ...) and the linear layers beneath it."""
    attn = [name for name, m in model.named_modules() if "attention" in type(m).__name__.lower() and name]
    out = []
    for name, m in model.named_modules():
        if _is_linear(m) and any(name.startswith(a + ".") for a in attn):
            out.append(name)
    return out


def target_modules_spec(model: nn.Module, target) -> str | list[str]:
    """PEFT `target_modules` for the recipe's choice: a regex naming the attention projections of
    this architecture (compact in adapter_config.json, loadable by plain PEFT), 'all-linear', or a list."""
    if target == "all-linear":
        return "all-linear"
    if isinstance(target, list):
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
        missing = [t for t in target if t not in names and not any(n.endswith("." + t) for n, _ in model.named_modules())]
        if missing:
            raise UserError(f"lora.target_modules: {', '.join(missing)} not found in this model",
                            f"linear layers here: {', '.join(sorted(names))}")
        return target
    names = attention_module_names(model)
    if not names:
        raise UserError("found no attention projections in this model (no module class named *Attention*)",
                        "set lora.target_modules to 'all-linear' or to a list of module names")
    # group as <attention block leaf>.<projection>: e.g. self_attn.(q_proj|k_proj|v_proj|o_proj)
    tails = sorted({".".join(n.split(".")[-2:]) for n in names})
    return r"^(?:.*\.)?(?:" + "|".join(re.escape(t) for t in tails) + r")$"


# Embedding matrices up to this size are trained whole when the EOS row looks untrained
# (stories260K: 33k params); above it (a 7B model's 545M) that would cost gigabytes, so only a warning.
AUTO_EMBEDDING_LIMIT = 64_000_000


def untrained_eos(model: nn.Module, eos_id: int | None) -> int:
    """How many embedding rows are near-copies (cosine > 0.99) of the EOS row. A trained EOS has
    none; a never-trained one sits in a cluster with the other untouched rows (byte tokens, unk)."""
    if eos_id is None:
        return 0
    w = model.get_input_embeddings().weight.detach().float()
    if eos_id >= w.shape[0]:
        return 0
    w = torch.nn.functional.normalize(w, dim=-1)
    return int(((w @ w[eos_id]) > 0.99).sum()) - 1


def embedding_modules(recipe: Recipe, model: nn.Module, eos_id: int | None = None) -> tuple[list[str], str]:
    """(modules_to_save, reason): the embedding (and an untied output head) when they must be trained."""
    choice = recipe.lora.trainable_embeddings
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    n_params = emb.weight.numel()
    cluster = untrained_eos(model, eos_id) if choice == "auto" else 0
    if choice is True or (choice == "auto" and cluster >= 8 and n_params <= AUTO_EMBEDDING_LIMIT):
        mods = [names[emb]]
        if head is not None and head.weight is not emb.weight:
            mods.append(names[head])
        why = "requested" if choice is True else f"EOS embedding untrained ({cluster} near-identical rows)"
        return mods, why
    if choice == "auto" and cluster >= 8:
        return [], (f"EOS embedding looks untrained ({cluster} near-identical rows) but the embedding has "
                    f"{n_params / 1e6:.0f}M parameters; set lora.trainable_embeddings: true to train it")
    return [], ""


def lora_config(recipe: Recipe, model: nn.Module, eos_id: int | None = None):
    from peft import LoraConfig

    lo = recipe.lora
    modules_to_save, _ = embedding_modules(recipe, model, eos_id)
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=target_modules_spec(model, lo.target_modules),
        bias=lo.bias,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save or None,
        # a tied output head must stay the same tensor as the trained embedding copy
        ensure_weight_tying=bool(modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )


def attach_lora(model, recipe: Recipe, eos_id: int | None = None):
    from peft import get_peft_model

    # Gradient checkpointing, where the memory plan wants it, is switched on by the Trainer
    # (SFTConfig.activation_checkpointing, from fastpath.decide).
    if recipe.training.upcast_embeddings:  # the plain blog recipe, kept for comparison benchmarks
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # By default not `prepare_model_for_kbit_training`: it upcasts embeddings and lm_head to fp32,
    # which doubles their memory and makes the logits fp32 (DESIGN.md section 4).
    peft_model = get_peft_model(model, lora_config(recipe, model, eos_id))
    return peft_model


def load_tokenizer_for_check(recipe: Recipe):
    """The recipe's tokenizer without downloading weights, for `data check` and train's data step;
    (tokenizer, stop_ids, note): the note says why there is none (offline, gated, not found)."""
    from .quiet import quiet_libraries

    quiet_libraries()
    spec = recipe.base_model
    try:
        if spec.startswith("builtin:") or Path(spec).expanduser().exists():
            model_dir = resolve_base_model(spec, recipe.revision, recipe.trust_remote_code, recipe.allow_pickle)
        else:
            from huggingface_hub import snapshot_download

            model_dir = snapshot_download(spec, revision=recipe.revision,
                                          allow_patterns=["tokenizer*", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
                                          + (["*.py"] if recipe.trust_remote_code else []),
                                          ignore_patterns=["*.safetensors*", "*.bin*"])
        tok = load_tokenizer(model_dir, recipe)
        info = prepare_tokenizer(tok, recipe, model_dir)
        return tok, set(info.stop_token_ids), None
    except CustomCodeRefused:  # a refusal the user must see (exit 2 naming the flag), not a missing tokenizer
        raise
    except UserError as e:
        return None, None, f"tokenizer of {spec} unavailable ({e.message.split(';')[0]}); pass --base-model DIR"
    except Exception as e:  # offline hub, gated repo, ...
        return None, None, f"tokenizer of {spec} unavailable ({type(e).__name__}); pass --base-model DIR"
