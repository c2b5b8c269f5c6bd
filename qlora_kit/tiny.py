"""Built-in tiny models, made here with no network: `--base-model builtin:tiny`.

A random-weight transformer from a transformers config plus a byte-level BPE tokenizer trained
with `tokenizers` on the bundled sample data, so Chinese and English both tokenize compactly.
Built once per machine into the cache (QLORA_KIT_CACHE, default ~/.cache/qlora-kit) and reused;
the build is deterministic and atomic (a temporary folder renamed into place).

    tiny       Llama architecture, no chat template, no pad token set (like many base models)
    tiny-chat  Qwen2 architecture with a ChatML template whose end-of-turn token is EOS
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

VERSION = 1
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_ENGLISH = (
    "Once upon a time a careful engineer checked the pump, the motor and the valve. "
    "The lawyer cited the statute and the article. The doctor asked about the symptoms. "
    "Return JSON with the principal, the interest rate and the maturity date. "
)


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit")).expanduser()


def _corpus() -> list[str]:
    from .recipe import RECIPE_DIRS

    texts = [_ENGLISH] * 4
    for d in RECIPE_DIRS:
        data = d / "data"
        if data.is_dir():
            for f in sorted(data.glob("*.jsonl")):
                for line in f.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        texts.extend(str(v) for v in rec.values())
            break
    return texts


def _train_tokenizer(texts: list[str], specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build(name: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from .quiet import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    texts = _corpus()
    if name == "tiny":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        tok = _train_tokenizer(texts, specials, vocab_size=1024)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        cfg = LlamaConfig(
            vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    elif name == "tiny-chat":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _train_tokenizer(texts, specials, vocab_size=1024)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        hf_tok.chat_template = CHATML
        cfg = Qwen2Config(
            vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            eos_token_id=hf_tok.eos_token_id, tie_word_embeddings=True,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        raise UserError(f"unknown built-in model 'builtin:{name}'", "use builtin:tiny or builtin:tiny-chat")
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)


def ensure(name: str = "tiny") -> Path:
    """Path of the built-in model, building it on first use."""
    key = hashlib.sha256(json.dumps([VERSION, name, _corpus()], ensure_ascii=False).encode()).hexdigest()[:10]
    final = cache_dir() / "builtin" / f"{name}-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(name, tmp)
        from .rundir import share_tree

        share_tree(tmp)  # mkdtemp and the safetensors writer make owner-only folders and files
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
