"""export --format gguf: one llama.cpp / Ollama / LM Studio file: the merged model (the adapter
merged into the dequantized NF4 base, exactly as `qlora-kit merge` does and verifies), its tokenizer
and the run's chat template, in f32, f16, bf16 or q8_0. The tensors are planned and written here;
the vocabulary and its metadata in vocab.py.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


from .. import rundir
from ..errors import UserError
from ..run import resolve
from ..terminal import console
from .source import Source, check_free, open_source, read_json
from .vocab import add_vocab, vocab_kind


DTYPES = ("f16", "bf16", "q8_0", "f32")
# Hugging Face architecture -> llama.cpp architecture. Mistral is llama to llama.cpp (as in its converter).
ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
Q8_BLOCK = 32


def _arch(config: dict) -> tuple[str, str]:
    names = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type", ""), config.get("model_type", "?"))]
    hf = names[0]
    if hf not in ARCHES:
        raise UserError(f"GGUF export does not support the {hf} architecture (supported: {', '.join(ARCHES)})",
                        "use --format peft, or `qlora-kit merge` and llama.cpp's convert_hf_to_gguf.py")
    return hf, ARCHES[hf]


# --- GGUF -----------------------------------------------------------------------------------------


def export_gguf(path: Path, out: str | Path | None, dtype: str, grants=None) -> dict:
    from .. import merge as merge_mod
    from ..model import refuse_unsafe
    from ..recipe import Grants

    grants = grants or Grants()
    src = open_source(path)
    if src.merged_dir is None:  # the base the merge will load: refused before anything is read
        refuse_unsafe(src.info.base_model_path, grants.trust_remote_code, grants.allow_pickle)
    src.trust_remote_code = grants.trust_remote_code
    hf_arch, arch = _arch(src.config)
    if out is None:
        # a merged folder without its run: next to the folder, not inside the model
        out = (resolve(src.run_dir)[0] / "export" if src.run_dir else path.parent) / f"{src.name}-{dtype}.gguf"
    out = Path(out)
    check_free(out)
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


def _looks_like_hub_id(s: str | None) -> bool:
    return bool(s) and not s.startswith(("builtin:", "/", ".", "~")) and s.count("/") == 1


def write_gguf(model_dir: Path, src: Source, arch: str, out: Path, dtype: str) -> dict:
    """Write the merged model in model_dir as one GGUF file at out (via a temporary file)."""
    import gguf
    import numpy as np

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    cfg = read_json(model_dir / "config.json")
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
        tok_summary = add_vocab(w, src, arch, n_vocab, warnings)

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
