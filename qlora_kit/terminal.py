"""The one console qlora-kit's commands print their progress to: stderr, so stdout stays free for
what a command returns (a run directory's path, a JSON answer).

It lives on the floor below every command so that `distributed.silence` quiets all of them by
flipping one flag, on the data-parallel workers that are not rank 0 (one run, one log), without
importing a command.
"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
