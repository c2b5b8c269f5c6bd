"""The vocabulary of a GGUF file: the tokenizer's tokens, merges or scores, its special ids, what
it adds to plain text, and the chat template (with the run's system prompt as its default), in the
metadata llama.cpp reads. vocab_kind refuses a tokenizer GGUF cannot carry before anything is merged.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .source import Source, read_json

_PRE_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def vocab_kind(src: Source) -> str:
    """'gpt2' (byte-level BPE from tokenizer.json) or 'llama' (sentencepiece tokenizer.model)."""
    p = src.tokenizer_dir / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{src.tokenizer_dir}: no tokenizer.json", "GGUF export needs a fast (tokenizers) tokenizer")
    model = read_json(p).get("model", {})
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

    tj = read_json(src.tokenizer_dir / "tokenizer.json")
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


def add_vocab(w, src: Source, arch: str, n_vocab: int, warnings: list) -> dict:
    from ..model import load_saved_tokenizer
    from ..template import with_default_system

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
