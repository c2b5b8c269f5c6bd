"""The console a training run prints to: qlora_kit.terminal's, the one every command shares (stderr,
so stdout stays free for what a command returns), so that distributed.silence, which imports no
command, quiets it on the workers that are not rank 0 (one run, one log)."""

from ..terminal import console  # noqa: F401 - the steps of the run import it from here
