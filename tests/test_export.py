"""`qlora-kit export`: GGUF files read back with gguf's own reader and checked tensor by tensor
against the merged model, and a PEFT folder loaded back with PEFT. Real training, real merges."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_recipe
from safetensors.torch import load_file, save_file

from qlora_kit import export, merge, train
from qlora_kit.errors import UserError
from qlora_kit.template import with_default_system

# written here, independently of gguf's TensorNameMap, so a wrong mapping cannot check itself
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
CONTROL, BYTE = 3, 6


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    return f"blk.{m.group(1)}.{BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path):
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return {t.name: t for t in r.tensors}, meta


def merged_weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def as_hf_layout(name: str, data: np.ndarray, cfg: dict, arch: str) -> np.ndarray:
    if arch == "llama" and re.search(r"\.attn_q\.", name):
        return unpermute(data, cfg["num_attention_heads"])
    if arch == "llama" and re.search(r"\.attn_k\.", name):
        return unpermute(data, cfg["num_key_value_heads"])
    return data


def expected_names(weights: dict, tied: bool) -> set[str]:
    return {gguf_name(k) for k in weights if not (tied and k == "lm_head.weight")}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def llama_merged(tiny_run, out_dir) -> Path:
    """The reference: `qlora-kit merge` in fp32 (deterministic, so export's own merge must equal it)."""
    merge.run(tiny_run[0], out_dir / "llama-merged", dtype="fp32")
    return out_dir / "llama-merged"


@pytest.fixture(scope="module")
def llama_f32(tiny_run, out_dir, llama_merged):
    return export.run(tiny_run[0], "gguf", out_dir / "llama-f32.gguf", dtype="f32")


@pytest.fixture(scope="module")
def qwen_run(tiny_chat_dir, qa_file, tmp_path_factory) -> Path:
    return train.run(make_recipe(str(tiny_chat_dir), qa_file, max_steps=3), str(tmp_path_factory.mktemp("runs") / "qwen"))


@pytest.fixture(scope="module")
def stories_run(stories_dir, qa_file, tmp_path_factory) -> Path:
    return train.run(make_recipe(str(stories_dir), qa_file, max_steps=2), str(tmp_path_factory.mktemp("runs") / "stories"))


# --- GGUF: the tiny Llama ---------------------------------------------------------------------------


def test_llama_f32_equals_merged_weights_and_metadata(tiny_run, llama_merged, llama_f32):
    from transformers import AutoTokenizer

    run_dir, _ = tiny_run
    rep = llama_f32
    path = Path(rep["out"])
    assert rep["bytes"] == path.stat().st_size and rep["arch"] == "llama" and rep["dtype"] == "f32"
    assert rep["merge"]["max_abs_logit_diff"] < 1e-3  # export merged (and verified) on its own
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == [], "temporary files left"
    cfg = json.loads((llama_merged / "config.json").read_text())
    ref = merged_weights(llama_merged)
    tensors, meta = read(path)
    assert set(tensors) == expected_names(ref, tied=False) and "output.weight" in tensors
    assert rep["tensors"] == len(tensors) == len(ref)
    for hf, want in ref.items():
        t = tensors[gguf_name(hf)]
        assert t.tensor_type.name == "F32"
        assert tuple(t.data.shape) == want.shape and tuple(int(x) for x in t.shape) == want.shape[::-1], hf
        np.testing.assert_array_equal(as_hf_layout(t.name, t.data, cfg, "llama"), want, err_msg=hf)
    # q/k really are in llama.cpp's rotary layout, not copied as they are
    assert not np.array_equal(tensors["blk.0.attn_q.weight"].data, ref["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(tensors["blk.0.attn_k.weight"].data, ref["model.layers.0.self_attn.k_proj.weight"])

    info = json.loads((run_dir / "run.json").read_text())
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    assert meta["general.architecture"] == "llama" and meta["general.name"] == run_dir.name
    assert meta["general.file_type"] == 0
    assert meta["llama.block_count"] == cfg["num_hidden_layers"] == 2
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == cfg["max_position_embeddings"] == 1024
    assert meta["llama.embedding_length"] == 64 and meta["llama.feed_forward_length"] == 128
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"] == tensors["token_embd.weight"].data.shape[0]
    assert meta["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == len(merges) > 0
    types = meta["tokenizer.ggml.token_type"]
    assert [types[i] for i in tok.all_special_ids] == [CONTROL] * len(tok.all_special_ids)
    # the template the run trained with, its system prompt the default (a GGUF stands alone)
    assert meta["tokenizer.chat_template"] == with_default_system(tok.chat_template, "你是律师。") != tok.chat_template
    assert info["tokenizer"]["template_source"] == "default"  # ... which qlora-kit added for this base
    assert meta["tokenizer.ggml.eos_token_id"] == info["tokenizer"]["stop_token_ids"][0]
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # HF adds no BOS here; the template writes it


def test_llama_permutation_matches_llama_cpp_rope(llama_f32, llama_merged):
    """What the permutation is for: llama.cpp's rope rotates adjacent pairs, HF's rotates halves.
    With the permuted rows, attention scores computed llama.cpp's way equal Hugging Face's."""
    tensors, _ = read(llama_f32["out"])
    ref = merged_weights(llama_merged)
    d, pos_q, pos_k = 16, 5, 2
    x = np.random.default_rng(0).standard_normal(64).astype(np.float64)
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)

    def rope_half(v, pos):  # transformers' rotate_half
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        a, b = v[: d // 2], v[d // 2:]
        return np.concatenate([a * c - b * s, b * c + a * s])

    def rope_pairs(v, pos):  # ggml's normal mode: (v[2i], v[2i+1])
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        out = v.copy()
        out[0::2], out[1::2] = v[0::2] * c - v[1::2] * s, v[1::2] * c + v[0::2] * s
        return out

    def scores(wq, wk, rope):
        q, k = (wq @ x).reshape(4, d), (wk @ x).reshape(2, d)
        return np.array([rope(q[h], pos_q) @ rope(k[h // 2], pos_k) for h in range(4)])

    hf = scores(ref["model.layers.0.self_attn.q_proj.weight"], ref["model.layers.0.self_attn.k_proj.weight"], rope_half)
    gg = scores(tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_k.weight"].data, rope_pairs)
    np.testing.assert_allclose(gg, hf, rtol=1e-9, atol=1e-9)
    assert not np.allclose(scores(ref["model.layers.0.self_attn.q_proj.weight"],
                                  ref["model.layers.0.self_attn.k_proj.weight"], rope_pairs), hf)


def test_llama_f16_and_bf16_round_once_from_merged(llama_merged, out_dir):
    from gguf.quants import dequantize

    cfg = json.loads((llama_merged / "config.json").read_text())
    ref = merged_weights(llama_merged)
    for dtype, ftype, kind in (("f16", 1, "F16"), ("bf16", 32, "BF16")):
        rep = export.run(llama_merged, "gguf", out_dir / f"llama-{dtype}.gguf", dtype=dtype)  # a merged folder: no merge
        assert "merge" not in rep
        tensors, meta = read(rep["out"])
        assert meta["general.file_type"] == ftype and set(tensors) == expected_names(ref, tied=False)
        for hf, want in ref.items():
            t = tensors[gguf_name(hf)]
            if want.ndim == 1:  # norms stay f32, as llama.cpp keeps them
                assert t.tensor_type.name == "F32"
                np.testing.assert_array_equal(t.data, want)
                continue
            assert t.tensor_type.name == kind, hf
            got = as_hf_layout(t.name, dequantize(t.data, t.tensor_type).reshape(want.shape), cfg, "llama")
            rounded = want.astype(np.float16).astype(np.float32) if dtype == "f16" else \
                torch.from_numpy(want).bfloat16().float().numpy()
            np.testing.assert_array_equal(got, rounded, err_msg=hf)
        print(f"{dtype}: {rep['bytes']} bytes")


def test_llama_q8_0_within_quantization_error(llama_merged, out_dir):
    from gguf.quants import dequantize

    cfg = json.loads((llama_merged / "config.json").read_text())
    ref = merged_weights(llama_merged)
    rep = export.run(llama_merged, "gguf", out_dir / "llama-q8_0.gguf", dtype="q8_0")
    tensors, meta = read(rep["out"])
    assert meta["general.file_type"] == 7 and rep["fallbacks"] == []
    f32_size = sum(v.size * 4 for v in ref.values())
    assert rep["bytes"] < 0.4 * f32_size
    worst = 0.0
    for hf, want in ref.items():
        t = tensors[gguf_name(hf)]
        if want.ndim == 1:
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(t.data, want)
            continue
        assert t.tensor_type.name == "Q8_0", hf
        # reference rows in the order the file keeps them (q/k permuted), from the checked inverse
        stored = want[np.argsort(as_hf_layout(t.name, np.arange(want.shape[0]), cfg, "llama"))]
        got = dequantize(t.data, t.tensor_type)
        assert got.shape == want.shape, hf
        # per block of 32 along a row: |error| <= d/2 for the rounding to int8, plus the f16 rounding of
        # the scale d = absmax/127 (relative 2^-11, times |q| <= 127)
        d = np.abs(stored.reshape(stored.shape[0], -1, 32)).max(axis=-1, keepdims=True) / 127
        err = np.abs(got - stored).reshape(d.shape[0], -1, 32)
        assert (err <= d * (0.5 + 127 / 2048) * 1.001 + 1e-12).all(), hf
        assert err.max() > 0  # it really is quantized
        worst = max(worst, float((err / np.maximum(d, 1e-30)).max()))
    print(f"q8_0: {rep['bytes']} bytes (f32 {f32_size}); worst error {worst:.3f} x block scale")


# --- GGUF: Qwen2 ------------------------------------------------------------------------------------


def test_qwen2_biases_tied_output_and_pre_tokenizer(qwen_run):
    from transformers import AutoTokenizer

    merged = qwen_run / "merged"
    merge.run(qwen_run, merged, dtype="fp32")
    rep = export.run(merged)  # defaults: f16, next to the run
    out = qwen_run / "export" / f"{qwen_run.name}-f16.gguf"
    assert rep["out"] == str(out) and out.is_file() and [p.name for p in out.parent.iterdir()] == [out.name]
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    ref = merged_weights(merged)
    tensors, meta = read(out)
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == 2
    assert "output.weight" not in tensors and set(tensors) == expected_names(ref, tied=True)
    for i in range(2):
        for p in ("q", "k", "v"):
            b = tensors[f"blk.{i}.attn_{p}.bias"]
            assert b.tensor_type.name == "F32"
            np.testing.assert_array_equal(b.data, ref[f"model.layers.{i}.self_attn.{p}_proj.bias"])
    # qwen2 uses neox rope in llama.cpp: q/k are not permuted
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data,
                                  ref["model.layers.0.self_attn.q_proj.weight"].astype(np.float16))
    tok = AutoTokenizer.from_pretrained(qwen_run / "tokenizer")
    info = json.loads((qwen_run / "run.json").read_text())
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert meta["tokenizer.chat_template"] == with_default_system(tok.chat_template, "你是律师。")
    assert "<|im_start|>" in tok.chat_template
    eos = meta["tokenizer.ggml.eos_token_id"]
    assert eos == info["tokenizer"]["stop_token_ids"][0] == tok.convert_tokens_to_ids("<|im_end|>")
    # every stop token of the run ends generation in llama.cpp too (eos and the end-of-turn)
    assert {eos, meta.get("tokenizer.ggml.eot_token_id", eos)} == set(info["tokenizer"]["stop_token_ids"])
    assert meta["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_start|>")] == CONTROL


# --- GGUF: stories260K, a sentencepiece Llama ---------------------------------------------------------


def test_stories_sentencepiece_vocab_and_q8_fallbacks(stories_run, stories_dir):
    from sentencepiece import SentencePieceProcessor

    rep = export.run(stories_run, "gguf", dtype="q8_0")
    tensors, meta = read(rep["out"])
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(stories_dir / "tokenizer.model"))
    assert meta["tokenizer.ggml.model"] == "llama" and rep["tokenizer"]["model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    np.testing.assert_array_equal(np.array(meta["tokenizer.ggml.scores"], dtype=np.float32),
                                  np.array([sp.GetScore(i) for i in range(sp.vocab_size())], dtype=np.float32))
    assert min(meta["tokenizer.ggml.scores"]) < 0  # real merge scores, not placeholders
    types = meta["tokenizer.ggml.token_type"]
    assert types[sp.bos_id()] == types[sp.eos_id()] == CONTROL and types[sp.PieceToId("<0x0A>")] == BYTE
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta.get("tokenizer.ggml.add_space_prefix", True) is True  # sentencepiece's dummy prefix
    info = json.loads((stories_run / "run.json").read_text())
    assert meta["tokenizer.ggml.eos_token_id"] == info["tokenizer"]["stop_token_ids"][0] == sp.eos_id()
    # the MLP's 172-wide rows cannot be cut into 32-blocks: those stay f16, and the report says so
    down = {f"blk.{i}.ffn_down.weight" for i in range(5)}
    assert {f["tensor"] for f in rep["fallbacks"]} == down and any("ffn_down" in w for w in rep["warnings"])
    assert {n for n, t in tensors.items() if t.tensor_type.name == "F16"} == down
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert "output.weight" not in tensors  # tied


# --- PEFT ---------------------------------------------------------------------------------------------


def test_peft_folder_loads_and_matches_the_run_adapter(tiny_run, out_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora_kit.model import load_4bit
    from qlora_kit.recipe import load_saved

    run_dir, _ = tiny_run
    info = json.loads((run_dir / "run.json").read_text())
    rep = export.run(run_dir, "peft", out_dir / "peft")
    out = Path(rep["out"])
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == info["base_model"] == rep["base_model"]
    readme = (out / "README.md").read_text()
    assert f"vllm serve {info['base_model']} --enable-lora --lora-modules" in readme and rep["serve"] in readme
    assert "--chat-template" in rep["serve"]  # qlora-kit's own template: vLLM must be told
    assert rep["warnings"] == []
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(run_dir / "tokenizer").chat_template

    recipe = load_saved(run_dir / "recipe.yaml")
    ids = tok("劳动合同期满，用人单位不续签，要给经济补偿吗？", return_tensors="pt").input_ids
    exported = PeftModel.from_pretrained(load_4bit(info["base_model_path"], recipe), str(out)).eval()
    original = PeftModel.from_pretrained(load_4bit(info["base_model_path"], recipe), str(run_dir / "adapter")).eval()
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, original(input_ids=ids).logits
        with exported.disable_adapter():
            base = exported(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)  # the adapter is really on


def test_peft_warns_about_modules_to_save(stories_run, tmp_path):
    assert json.loads((stories_run / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    rep = export.run(stories_run, "peft", tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert any("modules_to_save" in w and "vLLM" in w for w in rep["warnings"])
    assert "modules_to_save" in (tmp_path / "peft" / "README.md").read_text()


# --- user mistakes --------------------------------------------------------------------------------------


def test_unknown_format_and_dtype_name_the_option(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    with pytest.raises(UserError, match="--format onnx: choose one of gguf, peft"):
        export.run(run_dir, "onnx", tmp_path / "x")
    with pytest.raises(UserError, match="--dtype q4_k: choose one of f16, bf16, q8_0, f32"):
        export.run(run_dir, "gguf", tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(UserError, match="not a qlora-kit run directory"):
        export.run(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_untouched(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    target = tmp_path / "model.gguf"
    target.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists") as e:
        export.run(run_dir, "gguf", target)
    assert e.value.hint and target.read_bytes() == b"keep" and list(tmp_path.iterdir()) == [target]
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        export.run(run_dir, "peft", tmp_path / "peft")
    assert [p.name for p in (tmp_path / "peft").iterdir()] == ["mine.txt"]


def test_unsupported_architecture_named_before_any_work(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    base = tmp_path / "gpt2-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    fake = tmp_path / "run"
    (fake / "adapter").mkdir(parents=True)
    shutil.copy(run_dir / "recipe.yaml", fake)
    shutil.copy(run_dir / "adapter" / "adapter_model.safetensors", fake / "adapter")
    info = json.loads((run_dir / "run.json").read_text())
    (fake / "run.json").write_text(json.dumps({**info, "base_model_path": str(base)}))
    with pytest.raises(UserError) as e:
        export.run(fake, "gguf", tmp_path / "out" / "x.gguf")
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value) and "Qwen2ForCausalLM" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(llama_merged, tmp_path):
    bad = tmp_path / "bad-merged"
    shutil.copytree(llama_merged, bad)
    st = next(bad.glob("*.safetensors"))
    w = load_file(st)
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:512].clone()  # fewer rows than tokens
    save_file(w, st)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="1024 tokens but the embedding only 512 rows"):
        export.run(bad, "gguf", out / "x.gguf", dtype="q8_0")
    assert list(out.iterdir()) == []
    w["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4)
    save_file(w, st)
    with pytest.raises(UserError, match="model.layers.0.mlp.extra.weight"):
        export.run(bad, "gguf", out / "x.gguf")
    assert list(out.iterdir()) == []
