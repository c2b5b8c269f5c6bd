"""Keeping the terminal for qlora-kit's own messages.

`library_notes`: library messages that ask a qlora-kit user to do something they need not do,
dropped before the libraries are imported. Logging only, so `cli.main` installs it first and
`--help` stays light. `quiet_libraries`: once a command is about to load models, the libraries'
progress bars and known warnings off too (it imports them, so it is called, never run at import).
Importing this module costs nothing and imports no qlora_kit module, so model, tiny and the
commands all use it.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes 0.50 logs this at import on CPUs with AVX512-BF16: "Failed to load CPU
# gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you already
# `pip install kernels` ...". Without that optional package its own compiled CPU kernel computes the
# same 4-bit product (and `kernels` would fetch code from the hub at run time): nothing to act on.
_NOT_ACTIONABLE = {"bitsandbytes.backends.cpu.ops": ("gemm_4bit_forward from kernels-community",)}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(f in msg for f in self.fragments)


def library_notes() -> None:
    """Install the filters (once; calling again changes nothing). Must run before the library logs,
    which for bitsandbytes is at its import."""
    for name, fragments in _NOT_ACTIONABLE.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop(fragments))


def quiet_libraries() -> None:
    """Keep the terminal for qlora-kit's own messages: no per-file progress bars, no known warnings."""
    library_notes()
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # bitsandbytes has no paged memory on CPU; the CPU fallback is expected, not a problem
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
