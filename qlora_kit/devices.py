"""What this machine has: a CUDA GPU, the cores this process may run on, liger-kernel, and the
vocabulary size from which a GPU needs a tiled loss head.

Both `plan` (the estimate, which must stay light: `qlora-kit plan` imports no torch when it can
avoid it) and `fastpath` (the choices a run makes) ask these questions; neither answers them for
the other, so this module imports no qlora_kit module and torch only inside the function that
needs it.
"""

from __future__ import annotations

import os

# Full logits of a micro-batch in fp32 stop being small around this vocabulary size (Llama 3:
# 128k, Qwen2.5: 152k; Llama 2 / Mistral: 32k): from here on a GPU computes the loss in tiles.
LARGE_VOCAB = 65536


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def liger_available() -> bool:
    import importlib.util

    # the package first: without it `qlora-kit plan` (which asks this) never imports torch (about 1 s)
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    return has_gpu()


def usable_cores() -> int:
    """The cores this process may run on (`os.sched_getaffinity`: a container's or taskset's share,
    not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
