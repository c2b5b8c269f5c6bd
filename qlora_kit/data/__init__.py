"""Data: from the files people bring to checked conversations ready to encode.

    readers      files and encodings -> records, each with its file:line
    layouts      one record -> one conversation (Q/A columns, alpaca, messages, ShareGPT, tool calls)
    dataset      files and folders -> one Dataset; the train/eval split by duplicate cluster
    rowtemplate  the question-template syntax ({column} names)
    dedup        exact and near duplicates
    pii          redaction of personal data
    check        `data check` and train's data step: the pure pipeline -> a report (dict)
    render       that report as a Rich table
    synth/       synthetic starter data, one generator per domain

`from qlora_kit import data; data.load(...)` reads as before: the names in _HOME below (load,
split, question_text, ...) are the package's API for callers that only want conversations.
"""

from __future__ import annotations

from importlib import import_module

# Each public name and the module that defines it. Looked up on first use (PEP 562), not imported
# here: `qlora-kit --help` imports data.rowtemplate, and a package import that read every layout
# and file reader would put them on every command's start-up.
_HOME = {
    **dict.fromkeys(("Dataset", "Source", "combined_sha256", "data_files", "file_changes", "file_sha256",
                     "list_sources", "load", "load_recipe_data", "split"), "dataset"),
    **dict.fromkeys(("Conversation", "Message", "answer_text", "answered", "detect_layout", "has_tools",
                     "parse_columns", "question_text", "to_conversation", "to_record", "tools_of"), "layouts"),
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
