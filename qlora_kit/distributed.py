"""Data-parallel (DDP) and FSDP QLoRA training over several processes, launched with torchrun.

`qlora-kit train legal --gpus 2` does not change what a run is: the same recipe, run directory,
checkpoints and resume. The CLI process runs torchrun's agent, which starts one worker per GPU;
each worker runs the ordinary `qlora-kit train` code path, and transformers' Trainer (through
accelerate) wraps the model in DDP or FSDP. The rules that keep one run directory consistent:

    - rank 0 alone writes the run directory (recipe, run.json, card, adapter, markers, logs);
      the others only read, and only before rank 0 starts writing (a barrier separates the two);
    - a checkpoint is marked complete by rank 0 after every rank has saved its part;
    - a stop (Ctrl-C, NaN, full disk) is agreed by all ranks at the same step, or DDP would hang;
    - only rank 0 prints.

Effective batch: the recipe's `per_device_train_batch_size x gradient_accumulation_steps` is what
one GPU sees. With N processes the accumulation is divided by N when it divides evenly, so the
effective batch and the learning rate stay what the recipe says; otherwise the effective batch is
N times larger and the learning rate is left as it is (no automatic scaling: small Q/A sets
overfit quickly, and a silently raised learning rate is the worse surprise). The run card says
which happened.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass

from .errors import UserError

STRATEGY_ENV = "QLORA_KIT_PARALLEL"  # "ddp" | "fsdp", set by the launcher for its workers


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    strategy: str  # "single" | "ddp" | "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = os.environ.get(STRATEGY_ENV, "ddp") if size > 1 else "single"
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size, strategy)


def is_main() -> bool:
    return world().main


def init() -> World:
    """Join the process group early (before any file is written) so the run directory can be
    guarded with barriers; accelerate reuses an initialised group."""
    w = world()
    if w.size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(w.local_rank)
                dist.init_process_group("nccl", device_id=torch.device("cuda", w.local_rank))
            else:
                dist.init_process_group("gloo")
        if not w.main:
            silence()
    return w


def silence() -> None:
    """Non-zero ranks print nothing: one run, one log. Every command prints to the one console of
    qlora_kit.terminal, so quieting it quiets them all without importing any of them."""
    import logging

    from .terminal import console

    console.quiet = True
    logging.getLogger().setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: all ranks must stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def batch_plan(micro: int, accum: int, processes: int, learning_rate: float) -> dict:
    """How the recipe's batch maps onto N processes (see the module docstring)."""
    if processes > 1 and accum % processes == 0:
        per_accum, note = accum // processes, (
            f"gradient accumulation {accum} -> {accum // processes} per process, so the effective batch "
            f"({micro} x {accum} = {micro * accum}) and the learning rate are the recipe's")
    else:
        per_accum = accum
        note = (f"gradient accumulation {accum} does not divide by {processes} processes: the effective batch is "
                f"{micro} x {accum} x {processes} = {micro * accum * processes}, {processes}x the recipe's; the "
                f"learning rate ({learning_rate:g}) is not scaled") if processes > 1 else "single process"
    return {"processes": processes, "per_device_train_batch_size": micro, "gradient_accumulation_steps": per_accum,
            "effective_batch": micro * per_accum * processes, "learning_rate": learning_rate, "note": note}


def check_request(gpus: int, cpu: bool, fsdp: bool) -> None:
    """Refuse a launch that cannot work, before anything starts."""
    if gpus < 2:
        raise UserError(f"--gpus {gpus}: data-parallel training needs at least 2 processes",
                        "leave --gpus out for one GPU")
    if cpu:
        if fsdp:
            raise UserError("--fsdp needs CUDA GPUs (FSDP with 4-bit weights is not supported on CPU)",
                            "use --cpu-processes without --fsdp to test the data-parallel path on CPU")
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < gpus:
        raise UserError(f"--gpus {gpus}: this machine has {have} CUDA GPU{'s' if have != 1 else ''}",
                        f"use --gpus {have}" if have >= 2 else
                        "to try the data-parallel path without GPUs, --cpu-processes 2 runs it on CPU (gloo; slow)")


def worker_env(strategy: str, cpu_threads: int | None = None) -> dict[str, str]:
    """What the workers get on top of this process's environment (which stays as it is): the
    strategy, and OMP_NUM_THREADS: `cpu_threads` for a CPU run (a run's speed depends on it), else
    this process's own or 1, torchrun's default for several workers on one machine."""
    threads = str(cpu_threads) if cpu_threads else os.environ.get("OMP_NUM_THREADS", "1")
    return {STRATEGY_ENV: strategy, "OMP_NUM_THREADS": threads}


def launch(command: list[str], processes: int, env: dict[str, str]) -> int:
    """Run `command` (a program and its arguments) in `processes` workers under torchrun's agent,
    each with `env` added to this process's environment; returns rank 0's exit code (0, 2 for a
    user mistake, 130 when interrupted, 1 otherwise).

    The agent runs in a thread: torchrun installs its signal handlers only in the main thread,
    and those would turn Ctrl-C into "kill every worker" (SIGINT, then SIGKILL after 30 s). Its
    workers run in sessions of their own, so Ctrl-C does not reach them; this process forwards
    each Ctrl-C (or SIGTERM) to them instead: every rank saves a checkpoint at the same agreed step
    and exits 130; a second Ctrl-C stops them at once, as with one process."""
    import logging

    # it warns that it cannot install its signal handlers in a thread: that is the point, see above
    # and it logs each worker's non-zero exit; rank 0 has already said why (an interrupt, a bad file)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    result: dict = {}
    interrupts: list[int] = []

    def forward(signum, frame):
        interrupts.append(signum)
        for pid in _children():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if len(interrupts) == 1 and signum == signal.SIGINT:
            sys.stderr.write("\ninterrupt: workers are saving a checkpoint (Ctrl-C again to stop them now)\n")

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        th = threading.Thread(target=_agent, args=(command, processes, env, result), name="torchrun-agent",
                              daemon=True)
        th.start()
        while th.is_alive():
            th.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in result:
        raise result["error"]
    return 130 if interrupts and result.get("code") else result.get("code", 1)


def _agent(command: list[str], processes: int, env: dict[str, str], result: dict) -> None:
    """torchrun's agent as `torchrun --standalone --nproc-per-node=N --max-restarts=0
    --monitor-interval=0.5` runs it, started through its Python API (torchrun's command line would
    write OMP_NUM_THREADS into this process's environment). Each worker is `env K=V ... command`:
    the variables reach the workers alone. Puts the exit code (or the error) into `result`."""
    import shutil
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          role="default", rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5,
                          log_line_prefix_template=os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"))
    try:
        elastic_launch(config, shutil.which("env") or "env")(*[f"{k}={v}" for k, v in env.items()], *command)
        result["code"] = 0
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        code = codes.get(0, next(iter(codes.values()), 1))
        result["code"] = code if code in (1, 2, 130) else 1
    except BaseException as e:  # noqa: BLE001 - reported by launch, the CLI maps it to exit 1
        result["error"] = e


def _children(parent: int | None = None) -> list[int]:
    """Direct child processes of `parent` (default: this one, whose are torchrun's workers), from /proc."""
    me, out = parent or os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(entry.name))
    return out


def mark_failed(run_dir, code: int) -> None:
    """A worker that died (killed, crashed) cannot record it; the launcher does, if rank 0 did not."""
    from . import rundir
    from .run import is_run_dir, read_info, write_info

    if not is_run_dir(run_dir):
        return
    info = read_info(run_dir)
    if info.status == "running":
        write_info(run_dir, info.model_copy(update={
            "status": "interrupted" if code == 130 else "failed", "finished": rundir.now(),
            "error": f"a data-parallel worker exited with code {code}"}))
