"""`qlora-kit data check`, and the same checks `train` runs before a single step.

    read (readers) -> conversations (layouts) -> redact (pii, optional) -> duplicates (dedup)
    -> split by duplicate cluster -> encode under the recipe's tokenizer and template (cached)
    -> report: rows, drops with file:line, duplicates, leakage, lengths, truncation, one sample

The encoding is cached by content: the conversations, the tokenizer, its chat template and
max_length make the key, so a second check or a train after a check re-encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..recipe import Recipe
from . import dataset, dedup, layouts

CACHE_VERSION = 3  # 2: tool-calling turns (observation is a tool result, no longer a user turn); 3: several files, question templates
PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")


@dataclass
class Prepared:
    key: str  # content hash of the file + the recipe's data settings
    conversations: list | None  # None when the checks came from the cache (loaded only if needed)
    wheres: list[str]
    train_idx: list[int]
    eval_idx: list[int]
    encoded: list | None  # template.Encoded per conversation, when a tokenizer was given
    report: dict = field(default_factory=dict)


# --- cache ----------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    from ..tiny import cache_dir

    return cache_dir() / "encoded"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def data_key(recipe: Recipe) -> str:
    """Every data file's bytes and every data setting (mapping, template, redaction, dedup, split):
    same key, same checks. A folder's key changes when a file in it is added, removed or edited."""
    d = recipe.data
    sha = [dataset.file_sha256(f) for f in dataset.data_files(d.path)]
    return hashlib.sha256(json.dumps([CACHE_VERSION, sha, d.model_dump(mode="json")], ensure_ascii=False,
                                     sort_keys=True).encode()).hexdigest()[:24]


def _read_cached_checks(key: str) -> dict | None:
    path = _cache_dir() / f"{key}.checks.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_cached_checks(key: str, obj: dict) -> None:
    try:
        from ..rundir import write_atomic

        write_atomic(_cache_dir() / f"{key}.checks.json", json.dumps(obj, ensure_ascii=False))
    except OSError:
        pass


def _encode_cached(tokenizer, prep: "Prepared", recipe: Recipe, stop_ids: set[int]):
    from ..template import Encoded, encode_batch

    max_length = recipe.training.max_length
    key = hashlib.sha256(json.dumps([prep.key, max_length, sorted(stop_ids), tokenizer_fingerprint(tokenizer)]
                                    ).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            z = np.load(path, allow_pickle=False)  # plain arrays only: a cache file never runs code
            ids, labels, offs, flags = z["ids"], z["labels"], z["offsets"], z["flags"]
            return [Encoded(ids[a:b].tolist(), labels[a:b].tolist(), bool(f[0]), bool(f[1]))
                    for a, b, f in zip(offs[:-1], offs[1:], flags)], True
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt
    enc = encode_batch(tokenizer, conversations(prep, recipe), max_length, stop_ids, prep.wheres)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lens = np.array([len(e.input_ids) for e in enc], dtype=np.int64)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        np.savez(tmp, ids=np.array([t for e in enc for t in e.input_ids], dtype=np.int32),
                 labels=np.array([t for e in enc for t in e.labels], dtype=np.int32),
                 offsets=np.r_[0, np.cumsum(lens)], flags=np.array([[e.truncated, e.answer_cut] for e in enc], dtype=bool).reshape(-1, 2))
        from ..rundir import share

        share(tmp)  # mkstemp makes 0600; a cache shared through QLORA_KIT_CACHE is read by others
        os.replace(tmp, path)
    except OSError:
        pass  # no cache (read-only disk, full disk): correct, only slower next time
    return enc, False


# --- the checks -----------------------------------------------------------------------------------


def _percentiles(values) -> dict:
    a = np.asarray(values)
    if not len(a):
        return {}
    return {"min": int(a.min()), "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max()), "mean": round(float(a.mean()), 1)}


def _segments(tokenizer, enc) -> list[tuple[str, bool]]:
    """The sample as (text, carries_loss) runs, decoded from the tokens themselves."""
    out, run, state = [], [], None
    for tid, lab in zip(enc.input_ids, enc.labels):
        s = lab != -100
        if state is not None and s != state:
            out.append((tokenizer.decode(run), state))
            run = []
        run.append(tid)
        state = s
    if run:
        out.append((tokenizer.decode(run), state))
    return out


def prepare(recipe: Recipe, tokenizer=None, stop_ids: set[int] | None = None, tokenizer_note: str | None = None) -> Prepared:
    """All checks; from the cache when the file and the data settings are unchanged."""
    if not recipe.data.path:
        raise UserError("no data file: the recipe has no data.path", "pass --data FILE")
    key = data_key(recipe)  # a missing file or an empty folder is refused here, by name
    hit = _read_cached_checks(key)
    if hit is not None:
        prep = Prepared(key, None, hit["wheres"], hit["train_idx"], hit["eval_idx"], None, hit["report"])
        prep.report["checks_cached"] = True
    else:
        prep = _check(recipe, key)
        _write_cached_checks(key, {"report": prep.report, "wheres": prep.wheres,
                                   "train_idx": prep.train_idx, "eval_idx": prep.eval_idx})
        prep.report = json.loads(json.dumps(prep.report))  # what a cache hit would return, exactly
        prep.report["checks_cached"] = False
    prep.report["tokens"] = {"skipped": tokenizer_note or "no tokenizer"}
    if tokenizer is not None:
        encode(prep, recipe, tokenizer, stop_ids)
    return prep


def conversations(prep: Prepared, recipe: Recipe) -> list:
    """The conversations, re-read when the checks themselves came from the cache."""
    if prep.conversations is None:
        prep.conversations = _check(recipe, prep.key).conversations
    return prep.conversations


def _check(recipe: Recipe, key: str) -> Prepared:
    d = recipe.data
    ds = dataset.load_recipe_data(d)
    convs, wheres = ds.conversations, ds.wheres
    report, warnings = _read_report(ds)
    if d.scrub_pii:
        from . import pii

        convs, counts = pii.scrub_conversations(convs)
        report["pii_redacted"] = dict(counts)
    _template_report(d, ds, convs, wheres, report, warnings)  # after redaction: it quotes a question
    convs, wheres, questions, clusters, source_of = _duplicates(d, ds, convs, wheres, report, warnings)
    _row_warnings(ds, convs, wheres, questions, report, warnings)
    train_idx, eval_idx = _split_report(d, clusters, source_of, report, warnings)
    report["chars"] = {"question": _percentiles([len(q) for q in questions]),
                       "answer": _percentiles([len(layouts.answer_text(c)) for c in convs])}
    report["warnings"] = warnings
    return Prepared(key, convs, wheres, train_idx, eval_idx, None, report)


def _read_report(ds) -> tuple[dict, list[str]]:
    """What reading found: the files, their rows and columns, and the rows it could not use."""
    warnings: list[str] = []
    report: dict = {
        "file": _files_label(ds), "format": ds.format, "encoding": ds.encoding, "layout": ds.layout,
        "sha256": ds.sha256, "rows_read": ds.rows_read,
        "sources": [{"path": str(s.path), "sha256": s.sha256, "format": s.format, "encoding": s.encoding,
                     "layout": s.layout, "rows_read": s.rows_read, "rows": s.rows, "columns": s.columns,
                     "unused_columns": s.unused} for s in ds.sources],
        "unused_columns": list(dict.fromkeys(c for s in ds.sources for c in s.unused)),
        "not_read": [{"path": p, "reason": r} for p, r in ds.not_read],
        "bad_rows": [{"where": w, "reason": r} for w, r in ds.bad],
        "dropped": [{"where": w, "reason": r} for w, r in ds.dropped],
    }
    if ds.bad:
        warnings.append(f"{len(ds.bad)} unreadable rows skipped (--skip-bad)")
    if ds.dropped:
        warnings.append(f"{len(ds.dropped)} rows dropped: empty question or answer")
    if ds.not_read:
        warnings.append(f"{len(ds.not_read)} files in the data folder not read: "
                        + "; ".join(f"{Path(p).name} ({r})" for p, r in ds.not_read[:5]))
    return report, warnings


def _duplicates(d, ds, convs: list, wheres: list[str], report: dict, warnings: list[str]):
    """Exact and near duplicates reported; exact ones dropped when the recipe says so.
    -> (conversations, wheres, questions, duplicate clusters, source of each row), what is kept."""
    source_of = ds.source_of
    questions = [layouts.question_text(c) for c in convs]
    answers = [layouts.answer_text(c) for c in convs]
    dups = dedup.find(questions, answers)
    report["duplicates"] = {
        "exact": len(dups.exact),
        "near": len(dups.near),
        "exact_examples": [{"row": wheres[i], "repeats": wheres[j]} for i, j in dups.exact[:5]],
        "near_examples": [{"row": wheres[i], "like": wheres[j], "question": questions[i][:80]} for i, j in dups.near[:5]],
    }
    clusters = dups.cluster
    if d.drop_duplicates and dups.exact:
        gone = {i for i, _ in dups.exact}
        keep = [i for i in range(len(convs)) if i not in gone]
        convs, wheres, questions = [convs[i] for i in keep], [wheres[i] for i in keep], [questions[i] for i in keep]
        clusters, source_of = [clusters[i] for i in keep], [source_of[i] for i in keep]
        report["duplicates"]["exact_dropped"] = len(gone)
        for i in gone:  # a row repeated in a later file counts against that file
            src = report["sources"][ds.source_of[i]]
            src["duplicates_dropped"] = src.get("duplicates_dropped", 0) + 1
    if dups.near:
        warnings.append(f"{len(dups.near)} near-duplicate rows (same question after normalising, or >= 80% similar); "
                        "kept, but never split across train and eval")
    return convs, wheres, questions, clusters, source_of


def _row_warnings(ds, convs: list, wheres: list[str], questions: list[str], report: dict, warnings: list[str]) -> None:
    """Rows that read but look wrong (an empty-looking question, a placeholder), and the tool-calling rows."""
    # "无" / "none" in the question column usually means the question is in another column
    empty_words = {"无", "没有", "暂无", "空", "none", "null", "n/a", "na", "nan", "-"}
    empty_like = [wheres[i] for i, q in enumerate(questions) if len(q.strip()) <= 1 or q.strip().lower() in empty_words]
    if empty_like:
        cols = f" (columns: {', '.join(ds.columns)})" if ds.columns else ""
        warnings.append(f"{len(empty_like)} questions are empty-looking such as '无' (e.g. {empty_like[0]}); "
                        f"the question may be in another column{cols}: map it with --columns question=COL")
        report["empty_like_questions"] = len(empty_like)
    tool_rows = [i for i, c in enumerate(convs) if layouts.has_tools(c)]
    if tool_rows:
        report["tool_calls"] = {"rows": len(tool_rows), "first": wheres[tool_rows[0]],
                                "calls": sum(len(m.get("tool_calls") or []) for i in tool_rows for m in convs[i]),
                                "results": sum(m["role"] == "tool" for i in tool_rows for m in convs[i])}
    placeholders = sum(1 for c in convs if any(PLACEHOLDER.search(m["content"]) for m in c))
    if placeholders:
        warnings.append(f"{placeholders} rows contain template placeholders such as {{{{name}}}}: fill them in first")
        report["placeholder_rows"] = placeholders


def _split_report(d, clusters: list[int], source_of: list[int], report: dict, warnings: list[str]):
    """The split by duplicate cluster, and the leakage a row-level random split (what most tools do)
    would have had. -> (train indices, eval indices)"""
    n = len(clusters)
    naive_tr, naive_ev = dataset.split(n, d.eval_fraction, d.split_seed)
    in_train = {clusters[i] for i in naive_tr}
    naive_leak = sum(1 for i in naive_ev if clusters[i] in in_train)
    train_idx, eval_idx = dataset.split(n, d.eval_fraction, d.split_seed, clusters)
    train_clusters = {clusters[i] for i in train_idx}
    leak = sum(1 for i in eval_idx if clusters[i] in train_clusters)
    if leak:
        warnings.append(f"{leak} eval rows have a near duplicate in train: a near-duplicate group is larger than the "
                        "eval set (templated data?), so eval loss will look better than it is")
    report["split"] = {"train": len(train_idx), "eval": len(eval_idx), "eval_fraction": d.eval_fraction,
                       "leakage": leak, "leakage_with_row_split": naive_leak}
    for k, src in enumerate(report["sources"]):  # the split is made over all files together
        src.setdefault("duplicates_dropped", 0)
        src["train"] = sum(1 for i in train_idx if source_of[i] == k)
        src["eval"] = sum(1 for i in eval_idx if source_of[i] == k)
    return train_idx, eval_idx


def _files_label(ds) -> str:
    """The data as one line: the file, or how many files and their names."""
    if len(ds.sources) == 1:
        return str(ds.sources[0].path)
    names = [s.path.name for s in ds.sources]
    return f"{len(names)} files: " + ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")


def _template_report(d, ds, convs, wheres, report: dict, warnings: list[str]) -> None:
    """What the question template made: one rendered question to read, and the empty cells it kept."""
    if d.question_template is None and not d.columns.get("template"):
        return
    report["question_template"] = {"template": d.question_template, "template_column": d.columns.get("template"),
                                   "example": {"where": wheres[0], "question": layouts.question_text(convs[0])},
                                   "empty_cells": {k: len(v) for k, v in ds.template_empty.items()}}
    if ds.template_empty:
        rows = len({w for v in ds.template_empty.values() for w in v})
        names = ", ".join(f"{{{k}}} in {len(v)} row{'s' * (len(v) > 1)} (e.g. {v[0]})" for k, v in ds.template_empty.items())
        warnings.append(f"{rows} row{'s' * (rows > 1)} with empty cells in the question template (kept empty): {names}")


def model_context(model_dir) -> int | None:
    """The context length a model was trained for, from its config.json (None when it states none).
    A RoPE-scaled config (Qwen2.5's YaRN) whose max_position_embeddings is still the original
    length counts with its scaling factor."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    cfg = (cfg.get("text_config") or cfg) if isinstance(cfg, dict) else {}
    n = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
              if isinstance(cfg.get(k), int) and cfg[k] > 0), None)
    rope = cfg.get("rope_scaling") or {}
    orig, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
    if n and isinstance(orig, int) and isinstance(factor, (int, float)) and factor > 1 and n <= orig:
        n = int(orig * factor)
    return n


def cap_to_context(recipe: Recipe, tokenizer) -> dict | None:
    """training.max_length above the model's context would train positions the model never saw
    (silently worse, or out of range): cap it there, with a warning, rather than refuse. The recipe
    is changed in place, so the run records and uses the capped length. The tokenizer's folder is
    the model's (every tokenizer here is loaded from the model folder), which has config.json."""
    ctx = model_context(getattr(tokenizer, "name_or_path", None) or "")
    asked = recipe.training.max_length
    if ctx is None or asked <= ctx:
        return None
    recipe.training.max_length = ctx
    return {"requested": asked, "used": ctx, "model_context": ctx,
            "message": f"training.max_length={asked} is above the model's context of {ctx} tokens "
                       f"(max_position_embeddings); capped to {ctx}"}


def _longer_fix(tokenizer, max_length: int) -> str:
    ctx = model_context(getattr(tokenizer, "name_or_path", None) or "")
    if ctx is not None and max_length >= ctx:
        return f"max_length is already the model's context ({ctx} tokens): shorten these samples or split them"
    return "raise training.max_length"


def encode(prep: Prepared, recipe: Recipe, tokenizer, stop_ids: set[int] | None = None) -> None:
    """Tokenize under the recipe's template and add length, truncation and a loss-marked sample."""
    report, warnings, wheres, train_idx = prep.report, prep.report["warnings"], prep.wheres, prep.train_idx
    capped = cap_to_context(recipe, tokenizer)
    max_length = recipe.training.max_length
    encoded, cached = _encode_cached(tokenizer, prep, recipe, stop_ids or {tokenizer.eos_token_id})
    prep.encoded = encoded
    lengths = [len(e.input_ids) for e in encoded]
    truncated = sum(e.truncated for e in encoded)
    cut = sum(e.answer_cut for e in encoded)
    answer_tokens = [len(e.labels) - e.labels.count(-100) for e in encoded]
    no_answer = [wheres[i] for i, k in enumerate(answer_tokens) if k == 0]
    report["tokens"] = {
        "tokenizer": getattr(tokenizer, "name_or_path", "?"), "max_length": max_length, "cached": cached,
        "length": _percentiles(lengths), "answer_tokens": _percentiles(answer_tokens),
        "truncated": truncated, "answer_cut": cut, "prompt_fills_max_length": len(no_answer),
    }
    if capped:
        report["tokens"]["context"] = capped
        warnings.append(capped["message"])
    if truncated:
        warnings.append(f"{truncated} samples are longer than max_length={max_length} and will be cut; "
                        f"in {cut} of them part of the answer (and its EOS) is lost: {_longer_fix(tokenizer, max_length)}")
    if no_answer:
        warnings.append(f"{len(no_answer)} samples have no answer token left within max_length "
                        f"(e.g. {no_answer[0]}); they are not trained on")
    first = train_idx[0] if train_idx else 0
    report["sample"] = {"where": wheres[first], "segments": _segments(tokenizer, encoded[first])}
