"""Data: from the files people bring to checked conversations ready to encode.

    readers      files and encodings -> records, each with its file:line
    layouts      one record -> one conversation (Q/A columns, alpaca, messages, ShareGPT, tool calls)
    dataset      files and folders -> one Dataset; the train/eval split by duplicate cluster
    dedup        exact and near duplicates
    pii          redaction of personal data
    check        `data check` and train's data step: the pure pipeline -> a report (dict)
    render       that report as a Rich table
    synth/       synthetic starter data, one generator per domain

`from qlora_kit import data; data.load(...)`: the names below are the package's API for callers that
only want conversations. The question-template syntax the recipe schema also checks is one floor
down, in qlora_kit/rowtemplate.py.
"""

from __future__ import annotations

from .dataset import (DATA_SUFFIXES, Dataset, Source, combined_sha256, data_files, file_changes, file_sha256,
                      list_sources, load, load_recipe_data, split)
from .layouts import (Conversation, Message, answer_text, answered, detect_layout, has_tools, parse_columns,
                      question_text, to_conversation, to_record, tools_of)

__all__ = ["Conversation", "DATA_SUFFIXES", "Dataset", "Message", "Source", "answer_text", "answered", "combined_sha256",
           "data_files", "detect_layout", "file_changes", "file_sha256", "has_tools", "list_sources", "load", "load_recipe_data",
           "parse_columns", "question_text", "split", "to_conversation", "to_record", "tools_of"]
