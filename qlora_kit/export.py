"""`qlora-kit export RUN_DIR --format gguf|peft`: the tuned model in a form other tools serve.

    gguf  one llama.cpp / Ollama / LM Studio file: the merged model (the adapter merged into the
          dequantized NF4 base, exactly as `qlora-kit merge` does and verifies), its tokenizer and
          the run's chat template, in f32, f16, bf16 or q8_0
    peft  a folder vLLM loads with --enable-lora: the adapter, a config naming the hub base model,
          the run's tokenizer (so its chat template travels) and a README with the serve command

Nothing is half-written: the output is built next to its target and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import rundir
from .errors import UserError

console = Console(stderr=True, soft_wrap=True)

FORMATS = ("gguf", "peft")
DTYPES = ("f16", "bf16", "q8_0", "f32")
# Hugging Face architecture -> llama.cpp architecture. Mistral is llama to llama.cpp (as in its converter).
ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
Q8_BLOCK = 32
# vLLM's default --max-lora-rank; a larger adapter rank needs the flag
VLLM_MAX_LORA_RANK = 16


def run(run_dir: str | Path, fmt: str = "gguf", out: str | Path | None = None, dtype: str = "f16",
        grants=None) -> dict:
    """Export a finished run (or, for gguf, a folder written by `qlora-kit merge`); returns a report
    whose "out" is the written path. `grants` (recipe.Grants): this command's own flags; the run's
    recipe.yaml grants nothing."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if fmt == "peft":
        return export_peft(Path(run_dir), out)
    return export_gguf(Path(run_dir), out, dtype, grants)


# --- what is exported -----------------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    name: str
    config: dict  # config.json of the base (a run) or of the merged model
    tokenizer_dir: Path  # the tokenizer with the chat template used in training
    stop_token_ids: list[int]
    base_model: str | None
    spm_model: Path | None  # sentencepiece tokenizer.model, when the base has one
    run_dir: Path | None = None  # set when the adapter still has to be merged
    merged_dir: Path | None = None  # set when the model is already merged
    info: dict = field(default_factory=dict)
    trust_remote_code: bool = False  # this command's --trust-remote-code, for loading the tokenizer
    system_prompt: str | None = None  # the run's, baked into the GGUF's chat template as its default


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def _is_merged_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "qlora_kit_merge.json").is_file()


def _source(path: Path) -> Source:
    if _is_merged_dir(path):
        meta = _read_json(path / "qlora_kit_merge.json")
        run = Path(meta.get("run_dir") or "")
        info = rundir.read_info(run) if meta.get("run_dir") and rundir.is_run_dir(run) else {}
        stops = info.get("tokenizer", {}).get("stop_token_ids") or _generation_eos(path)
        spm = path / "tokenizer.model"
        if not spm.is_file() and info.get("base_model_path"):
            spm = Path(info["base_model_path"]) / "tokenizer.model"
        # merge records the prompt (and bakes it into the folder's template); older folders: the run's recipe
        system = meta["system_prompt"] if "system_prompt" in meta else _run_system_prompt(run) if info else None
        return Source(path=path, name=run.name if info else path.name, config=_read_json(path / "config.json"),
                      tokenizer_dir=path, stop_token_ids=list(stops), base_model=meta.get("base_model"),
                      spm_model=spm if spm.is_file() else None, merged_dir=path, info=info,
                      run_dir=run if info else None, system_prompt=system)
    run, _ = rundir.resolve(path)  # a UserError for anything that is not a run directory or a complete checkpoint
    info = rundir.read_info(run)
    base = Path(info["base_model_path"])
    if not (base / "config.json").is_file():
        raise UserError(f"base model of this run not found at {base}",
                        "restore the base model there (the run card names it)")
    spm = base / "tokenizer.model"
    # run_dir: what merge reads (RUN or its checkpoint); the name says which checkpoint it was
    return Source(path=path, name=rundir.default_name(path), config=_read_json(base / "config.json"),
                  tokenizer_dir=run / rundir.TOKENIZER, stop_token_ids=list(info.get("tokenizer", {}).get("stop_token_ids") or []),
                  base_model=info.get("base_model"), spm_model=spm if spm.is_file() else None, run_dir=path, info=info,
                  system_prompt=_run_system_prompt(run))


def _run_system_prompt(run: Path) -> str | None:
    from .recipe import load_saved

    return load_saved(run / "recipe.yaml").data.system_prompt


def _generation_eos(model_dir: Path) -> list[int]:
    p = model_dir / "generation_config.json"
    if not p.is_file():
        return []
    eos = _read_json(p).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []


def _arch(config: dict) -> tuple[str, str]:
    names = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type", ""), config.get("model_type", "?"))]
    hf = names[0]
    if hf not in ARCHES:
        raise UserError(f"GGUF export does not support the {hf} architecture (supported: {', '.join(ARCHES)})",
                        "use --format peft, or `qlora-kit merge` and llama.cpp's convert_hf_to_gguf.py")
    return hf, ARCHES[hf]


def _check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists", "pass another --out or delete it")


# --- GGUF -----------------------------------------------------------------------------------------


def export_gguf(path: Path, out: str | Path | None, dtype: str, grants=None) -> dict:
    from . import merge as merge_mod
    from .model import refuse_unsafe
    from .recipe import Grants

    grants = grants or Grants()
    src = _source(path)
    if src.merged_dir is None:  # the base the merge will load: refused before anything is read
        refuse_unsafe(src.info["base_model_path"], grants.trust_remote_code, grants.allow_pickle)
    src.trust_remote_code = grants.trust_remote_code
    hf_arch, arch = _arch(src.config)
    if out is None:
        # a merged folder without its run: next to the folder, not inside the model
        out = (rundir.resolve(src.run_dir)[0] / "export" if src.run_dir else path.parent) / f"{src.name}-{dtype}.gguf"
    out = Path(out)
    _check_free(out)
    if out.is_dir():
        raise UserError(f"output {out} is a directory", "pass a file name ending in .gguf with --out")
    vocab_kind(src)  # an unexportable tokenizer fails now, not after merging
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = None
    try:
        if src.merged_dir is not None:
            model_dir, merge_report = src.merged_dir, None
        else:
            # fp32: every GGUF dtype is then rounded once, from the weights the merge check verified
            scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
            merge_report = merge_mod.run(src.run_dir, scratch / "merged", dtype="fp32", grants=grants)
            model_dir = scratch / "merged"
        report = write_gguf(model_dir, src, arch, out, dtype)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    report["architecture"] = hf_arch
    if merge_report:
        report["merge"] = {k: merge_report[k] for k in ("max_abs_logit_diff", "work_dtype", "tolerance", "probes")}
    console.print(f"export: wrote {out} ({report['bytes'] / 2**20:.1f} MiB, {report['tensors']} tensors, {dtype})")
    for w in report["warnings"]:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    return report


def _hparams(cfg: dict) -> dict:
    n_head = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    return {
        "n_layer": cfg["num_hidden_layers"], "n_embd": cfg["hidden_size"], "n_ff": cfg["intermediate_size"],
        "n_head": n_head, "n_kv": cfg.get("num_key_value_heads") or n_head,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        "n_ctx": cfg.get("max_position_embeddings", 4096), "eps": cfg.get("rms_norm_eps", 1e-6),
        # transformers 5 keeps rope_theta inside rope_parameters; older configs at the top level
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "rope": rope, "rope_type": rope.get("rope_type", rope.get("type", "default")) or "default",
        "vocab": cfg["vocab_size"], "tied": bool(cfg.get("tie_word_embeddings", False)),
    }


def _permute(w, n_head: int):
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(hp: dict):
    """The rope_freqs tensor llama.cpp expects for rope_type llama3 (as its converter computes it)."""
    import math

    import numpy as np

    rope, dim = hp["rope"], hp["head_dim"]
    freqs = 1.0 / (hp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_rope(w, hp: dict) -> None:
    import gguf

    rtype, rope = hp["rope_type"], hp["rope"]
    if rtype in ("default", "llama3"):  # llama3 scaling travels as the rope_freqs tensor
        return
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        raise UserError(f"GGUF export does not support rope scaling type '{rtype}'",
                        "use --format peft, or `qlora-kit merge` and llama.cpp's convert_hf_to_gguf.py")


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None  # None for tensors made here (rope_freqs)
    file: Path | None
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0


def _qtype(gguf_name: str, shape: tuple[int, ...], dtype: str, fallbacks: list):
    from gguf import GGMLQuantizationType as T

    # as llama.cpp: 1-D tensors (norms, biases) stay f32 whatever the file type
    if len(shape) == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16":
        return T.F16
    if dtype == "bf16":
        return T.BF16
    if shape[-1] % Q8_BLOCK:
        fallbacks.append({"tensor": gguf_name, "shape": list(shape), "type": "F16",
                          "reason": f"row length {shape[-1]} is not a multiple of the q8_0 block ({Q8_BLOCK})"})
        return T.F16
    return T.Q8_0


def _plan(model_dir: Path, arch: str, hp: dict, dtype: str, fallbacks: list) -> list[_Planned]:
    import gguf
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights", "merge the run again (`qlora-kit merge`)")
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            keys = st.keys()  # a safe_open handle is not iterable
            for k in keys:
                names[k] = (f, tuple(st.get_slice(k).get_shape()))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, hp["n_layer"])
    plan = []
    for k, (f, shape) in names.items():
        if k.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from rope.freq_base
            continue
        if k == "lm_head.weight" and hp["tied"]:  # llama.cpp uses token_embd when output is absent
            continue
        g = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UserError(f"{model_dir}: tensor {k} has no GGUF equivalent for the {arch} architecture",
                            "this model variant is not supported by GGUF export; use --format peft")
        heads = 0
        if arch == "llama" and re.search(r"\.self_attn\.q_proj\.(weight|bias)$", k):
            heads = hp["n_head"]
        elif arch == "llama" and re.search(r"\.self_attn\.k_proj\.(weight|bias)$", k):
            heads = hp["n_kv"]
        plan.append(_Planned(g, k, f, shape, _qtype(g, shape, dtype, fallbacks), heads))
    if hp["rope_type"] == "llama3":
        plan.append(_Planned("rope_freqs.weight", None, None, (hp["head_dim"] // 2,), gguf.GGMLQuantizationType.F32))
    gnames = [p.gguf_name for p in plan]
    if "token_embd.weight" not in gnames:
        raise UserError(f"{model_dir}: no token embedding (model.embed_tokens.weight) in the weights",
                        "merge the run again (`qlora-kit merge`)")
    # keep llama.cpp's usual order (embedding, blocks in order, output): readers and diffs like it
    def order(p: _Planned):
        m = re.match(r"blk\.(\d+)\.", p.gguf_name)
        return (1, int(m.group(1)), p.gguf_name) if m else ((0 if p.gguf_name.startswith("token_embd") else 2), 0, p.gguf_name)

    return sorted(plan, key=order)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from math import prod

    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == T.F32:
        return prod(shape) * 4
    if qtype == T.F16:
        return prod(shape) * 2
    return prod(quant_shape_to_byte_shape(shape, qtype))


def _tensor_data(p: _Planned, hp: dict):
    """The tensor as the bytes/array GGUFWriter writes, loaded only now (one tensor in memory at a time)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    from safetensors import safe_open

    if p.hf_name is None:
        a = _llama3_rope_factors(hp)
    else:
        with safe_open(p.file, framework="pt") as st:
            t = st.get_tensor(p.hf_name).float()
        if p.permute_heads:
            t = _permute(t, p.permute_heads)
        a = t.contiguous().numpy()
    if p.qtype == T.F32:
        return a.astype(np.float32, copy=False), a
    if p.qtype == T.F16:
        return a.astype(np.float16), a
    return quantize(a, p.qtype), a


# --- tokenizer metadata ---------------------------------------------------------------------------

# tokenizers' Split regexes of the byte-level BPE families llama.cpp knows, by its pre-tokenizer name
_PRE_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def vocab_kind(src: Source) -> str:
    """'gpt2' (byte-level BPE from tokenizer.json) or 'llama' (sentencepiece tokenizer.model)."""
    p = src.tokenizer_dir / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{src.tokenizer_dir}: no tokenizer.json", "GGUF export needs a fast (tokenizers) tokenizer")
    model = _read_json(p).get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "gpt2"
    if model.get("type") in ("BPE", "Unigram"):
        # a sentencepiece model converted to tokenizers: llama.cpp needs the sentencepiece scores
        if src.spm_model is None:
            raise UserError(f"{src.tokenizer_dir}: a sentencepiece tokenizer, but its tokenizer.model was not found",
                            "copy the base model's tokenizer.model into the model folder")
        return "llama"
    raise UserError(f"{p}: tokenizer model type {model.get('type')} is not supported by GGUF export",
                    "use --format peft")


def _bpe_pre(tokenizer_json: dict, arch: str, warnings: list) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [i["pattern"].get("Regex") for i in items if i.get("type") == "Split" and isinstance(i.get("pattern"), dict)]
    byte_level = [i for i in items if i.get("type") == "ByteLevel"]
    if not regexes and byte_level and byte_level[0].get("use_regex", True) and not byte_level[0].get("add_prefix_space"):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's (llama.cpp spells the pre-tokenizer gpt-2)
    if len(regexes) == 1 and regexes[0] in _PRE_REGEX:
        return _PRE_REGEX[regexes[0]]
    guess = "qwen2" if arch == "qwen2" else "default"
    warnings.append(f"tokenizer pre-tokenizer not recognised; wrote tokenizer.ggml.pre='{guess}', so llama.cpp "
                    "may split some text differently from training")
    return guess


def _looks_special(text: str) -> bool:
    # as llama.cpp's converter: template tokens are control tokens even when not flagged special
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


def _bpe_vocab(tok, src: Source, n_vocab: int, arch: str, warnings: list):
    from gguf import TokenType

    tj = _read_json(src.tokenizer_dir / "tokenizer.json")
    rev = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            a = added[i]
            tokens.append(a.content)
            types.append(TokenType.CONTROL if a.special or _looks_special(a.content) else TokenType.USER_DEFINED)
        elif i in rev:
            tokens.append(rev[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (vocabularies padded to a multiple of 64/128)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = tj.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        # tokenizers >= 0.20 stores pairs; GGUF keeps "a b" strings with spaces inside a part shifted
        # to U+0120+ as llama.cpp's gguf-py does
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in merges]
    return tokens, types, merges, _bpe_pre(tj, arch, warnings)


def _spm_vocab(tok, src: Source, n_vocab: int):
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(src.spm_model))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [TokenType.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
    added = tok.added_tokens_decoder
    mismatched = [i for i in range(min(sp.vocab_size(), len(tok)))
                  if i not in added and tok.convert_ids_to_tokens(i) != tokens[i]]
    if mismatched:
        i = mismatched[0]
        raise UserError(f"{src.spm_model} does not belong to the run's tokenizer (id {i}: "
                        f"{tokens[i]!r} vs {tok.convert_ids_to_tokens(i)!r}, {len(mismatched)} ids differ)",
                        "put the base model's own tokenizer.model next to its config.json")
    for i, a in added.items():
        if i < n_vocab and (i >= sp.vocab_size() or tokens[i] != a.content):  # tokens the run added (a pad token)
            tokens[i], scores[i] = a.content, -1000.0
            types[i] = TokenType.CONTROL if a.special or _looks_special(a.content) else TokenType.USER_DEFINED
    return tokens, scores, types, _spm_add_dummy_prefix(src.spm_model)


def _spm_add_dummy_prefix(path: Path) -> bool | None:
    try:  # the model proto needs protobuf, which sentencepiece itself does not require
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except ImportError:
        return None  # llama.cpp then assumes a prefix space, sentencepiece's default


def _eos_id(tok, stops: list[int]) -> int | None:
    # the tokenizer's EOS when it is one of the run's stop tokens (the end-of-turn the template writes)
    if tok.eos_token_id is not None and tok.eos_token_id in stops:
        return tok.eos_token_id
    return stops[0] if stops else tok.eos_token_id


def _add_vocab(w, src: Source, arch: str, n_vocab: int, warnings: list) -> dict:
    from .model import load_saved_tokenizer
    from .template import with_default_system

    tok = load_saved_tokenizer(src.tokenizer_dir, src.trust_remote_code)
    if len(tok) > n_vocab:
        raise UserError(f"{src.tokenizer_dir}: the tokenizer has {len(tok)} tokens but the embedding only {n_vocab} rows",
                        "a tokenizer and model that do not belong together cannot be exported")
    kind = vocab_kind(src)
    summary = {"model": kind}
    if kind == "gpt2":
        tokens, types, merges, pre = _bpe_vocab(tok, src, n_vocab, arch, warnings)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        summary.update(pre=pre, merges=len(merges))
    else:
        tokens, scores, types, add_prefix = _spm_vocab(tok, src, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        if add_prefix is not None:
            w.add_add_space_prefix(add_prefix)
        summary.update(pre="default", scores_from=str(src.spm_model))
    summary["tokens"] = len(tokens)
    ids = {"bos": tok.bos_token_id, "eos": _eos_id(tok, src.stop_token_ids), "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    # the template's end-of-turn, when it is another stop token than EOS (<|im_end|> beside <|endoftext|>):
    # llama.cpp ends generation at eos and eot alike
    ids["eot"] = next((i for i in src.stop_token_ids if i != ids["eos"]), None)
    for name, i in ids.items():
        if i is not None:
            getattr(w, f"add_{name}_token_id")(int(i))
    # what HF does to plain text, measured, since configs spell it several ways (or not at all)
    probe = tok("a").input_ids
    add_bos = bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id
    add_eos = bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    # a GGUF moved anywhere prompts as in training: the run's system prompt is the template's default
    # (llama.cpp renders it with --jinja; its built-in template guesses ignore any default)
    template = with_default_system(tok.chat_template, src.system_prompt)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    else:
        warnings.append("the tokenizer has no chat template; llama.cpp will guess one")
    summary.update({f"{k}_id": v for k, v in ids.items()}, add_bos=add_bos, add_eos=add_eos,
                   chat_template=bool(template), stop_token_ids=src.stop_token_ids, system_prompt=src.system_prompt)
    return summary


def _looks_like_hub_id(s: str | None) -> bool:
    return bool(s) and not s.startswith(("builtin:", "/", ".", "~")) and s.count("/") == 1


def write_gguf(model_dir: Path, src: Source, arch: str, out: Path, dtype: str) -> dict:
    """Write the merged model in model_dir as one GGUF file at out (via a temporary file)."""
    import gguf
    import numpy as np

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    cfg = _read_json(model_dir / "config.json")
    hp = _hparams(cfg)
    fallbacks, warnings = [], []
    plan = _plan(model_dir, arch, hp, dtype, fallbacks)
    n_vocab = next(p.shape[0] for p in plan if p.gguf_name == "token_embd.weight")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.name)
        if _looks_like_hub_id(src.base_model):
            w.add_base_model_count(1)
            w.add_base_model_name(0, src.base_model)
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_block_count(hp["n_layer"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_kv"])
        w.add_rope_freq_base(hp["rope_theta"])
        w.add_layer_norm_rms_eps(float(hp["eps"]))
        if arch == "llama":
            w.add_rope_dimension_count(hp["head_dim"])
        if cfg.get("head_dim"):
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        _add_rope(w, hp)
        w.add_vocab_size(n_vocab)
        w.add_file_type({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok_summary = _add_vocab(w, src, arch, n_vocab, warnings)

        for p in plan:
            nbytes = _nbytes(p.shape, p.qtype)
            if p.qtype in (T.F32, T.F16):
                w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32 if p.qtype == T.F32 else np.float16), nbytes)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype)
                w.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        overflow = []
        for p in plan:
            data, full = _tensor_data(p, hp)
            if p.qtype == T.F16 and not np.isfinite(data).all() and np.isfinite(full).all():
                overflow.append(p.gguf_name)
            w.write_tensor_data(data)
            del data, full
        w.close()
        rundir.share(tmp)  # mkstemp makes 0600; exports are meant to be copied and shared
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    if fallbacks:
        warnings.append(f"{len(fallbacks)} tensor(s) stored as F16 instead of Q8_0 (row length not a multiple of "
                        f"{Q8_BLOCK}): {', '.join(f['tensor'] for f in fallbacks)}")
    if overflow:
        warnings.append(f"values beyond the f16 range became inf in: {', '.join(overflow)}; use --dtype bf16")
    types: dict[str, int] = {}
    for p in plan:
        types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    return {"format": "gguf", "out": str(out), "bytes": out.stat().st_size, "tensors": len(plan), "dtype": dtype,
            "arch": arch, "tensor_types": types, "fallbacks": fallbacks, "tokenizer": tok_summary,
            "warnings": warnings}


# --- PEFT (vLLM) ----------------------------------------------------------------------------------


def export_peft(path: Path, out: str | Path | None) -> dict:
    if _is_merged_dir(path):
        raise UserError(f"{path} is a merged model, which has no adapter to export",
                        "pass the run directory (the merged folder's parent), or use --format gguf")
    run, adapter = rundir.resolve(path)  # RUN, or RUN/checkpoints/checkpoint-N with its adapter
    info = rundir.read_info(run)
    out = Path(out) if out else run / "export" / ("peft" if adapter.name == rundir.ADAPTER else f"peft-{adapter.name}")
    _check_free(out)
    cfg = _read_json(adapter / "adapter_config.json")
    warnings = []
    base = info["base_model"]
    if base.startswith("builtin:"):
        base = info["base_model_path"]
        warnings.append(f"{info['base_model']} is a local test model; the config names its folder {base}")
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
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", rundir.default_name(path)).strip("-") or "adapter"
    rank = max([cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()])
    serve = f"vllm serve {base} --enable-lora --lora-modules {name}={out.resolve()}"
    if rank > VLLM_MAX_LORA_RANK:
        serve += f" --max-lora-rank {rank}"
    template_source = info.get("tokenizer", {}).get("template_source", "model")
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


def _peft_readme(info: dict, base: str, name: str, serve: str, template_source: str, warnings: list) -> str:
    lines = [
        f"# LoRA adapter `{name}` (qlora-kit)",
        "",
        (f"Base model: `{base}`. Trained by qlora-kit recipe `{info.get('recipe', '?')}` on "
         f"{info.get('data', {}).get('train_rows', '?')} examples against the 4-bit NF4 base."),
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
