"""The one console a training run prints to: stderr, so stdout stays free for what a command
returns. Every step of the run prints here, so distributed.silence can quiet it on the workers
that are not rank 0 (one run, one log)."""

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
