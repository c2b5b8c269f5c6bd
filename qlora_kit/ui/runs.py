"""The runs page's data, read from the run directories themselves (nothing else is the truth).

Each directory's summary is cached under the (mtime, size) of the files it comes from: run.json
and metrics.json are replaced atomically (new inode, new mtime) and progress.jsonl only grows, so
an unchanged run costs three stat calls per listing. Whether a "running" run still runs is not in
any file: it is asked of the process table on every listing (its pid, and that this pid was
started no later than the run, so a pid reused after a reboot does not look like training).
Stop asks more before it signals a pid read from a file: that the process is `qlora-kit train` for
this very run directory (its command line and working directory), started no later than the run.
A folder that is a symlink leading out of the runs folder is not a run of this UI.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

from .. import rundir
from ..run import RUN_JSON, try_read_info

PROGRESS = Path(rundir.LOGS) / "progress.jsonl"
SKIP = {"uploads", ".ui"}


def _stat_key(p: str):
    try:
        st = os.stat(p)
        return st.st_mtime_ns, st.st_size, st.st_ino
    except OSError:
        return None


# plain strings, not pathlib: with hundreds of runs pathlib's object creation costs more than the stat calls
_KEY_FILES = (RUN_JSON, "metrics.json", os.path.join(rundir.LOGS, "progress.jsonl"),
              os.path.join(rundir.ADAPTER, "adapter_model.safetensors"))


def read_json(p: Path) -> dict | None:
    try:
        v = json.loads(p.read_text(encoding="utf-8"))
        return v if isinstance(v, dict) else None
    except (OSError, ValueError):
        return None


def read_tail(p: Path, n: int) -> tuple[bytes, bool] | None:
    """The last `n` bytes of a file another process appends to, and whether that cut the file."""
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - n))
            return f.read(), end > n
    except OSError:
        return None


def last_line(p: Path, chunk: int = 8192) -> dict | None:
    """The last complete JSON line of a file that another process appends to."""
    got = read_tail(p, chunk)
    if got is None:
        return None
    tail, cut = got
    for line in reversed(tail.split(b"\n")[1 if cut else 0:]):
        if line.strip():
            try:
                v = json.loads(line)
                return v if isinstance(v, dict) else None
            except ValueError:
                continue  # the writer is mid-line
    return None


def read_progress(p: Path, offset: int = 0, limit: int = 4 << 20) -> tuple[list[dict], int]:
    """Complete lines from byte `offset` on, and the offset to ask from next time. An offset past
    the end means the file was replaced by a shorter one (a run started over): read it from the start."""
    try:
        with open(p, "rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
            f.seek(offset)
            data = f.read(limit)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a partial last line is read again next time
    events = []
    for line in data[:end].split(b"\n"):
        if line.strip():
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict):
                events.append(v)
    return events, offset + end


# --- is it still running? -------------------------------------------------------------------------

def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT = _boot_time()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_start(pid: int) -> float | None:
    """Unix time the process started (Linux /proc), or None where that cannot be known."""
    if _BOOT is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":  # exited, not yet reaped
        return float("inf")
    try:
        return _BOOT + int(fields[19]) / _TICKS
    except (IndexError, ValueError):
        return None


def pid_alive(pid, not_after: float | None = None) -> bool:
    """Does `pid` run, and (when `not_after` is given) did it start no later than that time?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    start = process_start(pid)
    if start == float("inf"):
        return False
    # a process that started after the run did is a newer one that got the same pid
    return start is None or not_after is None or start <= not_after + 2.0


def unix_time(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None



def _train_args(argv: list[str]) -> list[str] | None:
    """The arguments after `train` when argv runs qlora-kit's train command (`qlora-kit train`,
    `python -m qlora_kit.cli train`, torchrun's `-m qlora_kit.cli train`), else None."""
    for i, a in enumerate(argv[:-1]):
        if os.path.basename(a) == "qlora-kit" or (a in ("qlora_kit.cli", "qlora_kit") and i and argv[i - 1] == "-m"):
            return argv[i + 2:] if argv[i + 1] == "train" else None
    return None


def _run_dir_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--run-dir" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--run-dir="):
            return a.split("=", 1)[1]
    return None


def _default_parent(run_dir: Path, cwd: str) -> Path | None:
    """Where `qlora-kit train` without --run-dir, started in `cwd`, makes its run: the saved recipe's output_dir."""
    import yaml

    try:
        out = (yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("output_dir") or "runs"
        return (Path(cwd) / str(out)).resolve()
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def not_train_of(pid, run_dir: Path, not_after: float | None) -> str | None:
    """Why `pid` is not the `qlora-kit train` process of `run_dir` (None when it is). A run.json or a
    job record can be edited by anyone who can write the runs folder; a signal cannot be taken back."""
    import psutil

    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "the run records no valid process id"
    try:
        proc = psutil.Process(pid)
        argv, cwd, born = proc.cmdline(), proc.cwd(), proc.create_time()
    except psutil.NoSuchProcess:
        return "that process has exited"
    except (psutil.Error, OSError):
        return "that process cannot be inspected (another user's?)"
    if not_after is not None and born > not_after + 2.0:
        return "that process started after the run did (a reused process id)"
    args = _train_args(argv)
    if args is None:
        return "that process is not `qlora-kit train`"
    want = Path(run_dir).resolve()
    given = _run_dir_arg(args)
    if given is not None:
        where = (Path(cwd) / given).resolve()
    else:
        parent = _default_parent(want, cwd)
        where = parent / want.name if parent is not None else None
    if where != want:
        return "that process trains another run directory"
    return None


def inside(root: Path, p: Path) -> bool:
    """Is `p`, symlinks followed, `root` or under it? (`root` is resolved.)"""
    real = os.path.realpath(p)
    base = os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def live_status(summary: dict) -> str:
    s = summary.get("recorded_status") or "unknown"
    if s == "running" and summary.get("pid") is not None and not pid_alive(summary["pid"], unix_time(summary.get("started"))):
        return "interrupted"  # killed (SIGKILL, power, OOM killer): train never got to say so
    return s


# --- one directory --------------------------------------------------------------------------------

def summarize(d: Path, name: str) -> dict | None:
    info = try_read_info(d)
    if info is None:
        return None
    metrics = read_json(d / "metrics.json") or {}
    last = last_line(d / PROGRESS) or {}
    data = info.data
    running = info.status == "running"
    # a finished run's numbers come from metrics.json; a live one's from its latest progress line
    steps = metrics.get("global_step") if not running else None
    return {
        "name": name,
        "recipe": info.recipe,
        "base_model": info.base_model,
        "base_model_path": info.base_model_path,
        "data": data.path,
        "data_file": Path(data.path).name if data.path else None,
        "rows": data.rows,
        "recorded_status": info.status,
        "pid": info.pid,
        "started": info.started,
        "finished": info.finished,
        "error": info.error,
        "steps": steps if steps is not None else last.get("step"),
        "max_steps": last.get("max_steps"),
        "train_loss": metrics.get("train_loss") if not running else None,
        "eval_loss": metrics.get("eval_loss") if not running else None,
        "last_loss": last.get("loss"),
        "last_eval_loss": last.get("eval_loss"),
        "updated": last.get("time"),
        "has_adapter": (d / rundir.ADAPTER / "adapter_model.safetensors").is_file(),
    }


class RunIndex:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple, dict | None]] = {}
        self._lock = threading.Lock()

    def dirs(self) -> list[tuple[str, str]]:
        """Run directories directly under the root, and one level down (runs/smoke/legal); a symlink
        counts only when it leads to a folder inside the root."""
        out = []
        try:
            top = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return out
        for e in top:
            if e.name.startswith(".") or e.name in SKIP or not e.is_dir():
                continue
            if e.is_symlink() and not inside(self.root, e.path):
                continue
            if os.path.isfile(os.path.join(e.path, RUN_JSON)):
                out.append((e.name, e.path))
                continue
            try:
                for sub in sorted(os.scandir(e.path), key=lambda s: s.name):
                    if sub.name.startswith(".") or not sub.is_dir() or (sub.is_symlink() and not inside(self.root, sub.path)):
                        continue
                    if os.path.isfile(os.path.join(sub.path, RUN_JSON)):
                        out.append((f"{e.name}/{sub.name}", sub.path))
            except OSError:
                continue
        return out

    def get(self, name: str, d: Path | str) -> dict | None:
        base = str(d)
        key = tuple(_stat_key(os.path.join(base, f)) for f in _KEY_FILES)
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            s = hit[1]
        else:
            s = summarize(Path(d), name)
            with self._lock:
                self._cache[name] = (key, s)
        if s is None:
            return None
        return {**s, "status": live_status(s)}

    def list(self) -> list[dict]:
        t0 = time.perf_counter()
        found = [(n, d) for n, d in self.dirs()]
        runs = [s for s in (self.get(n, d) for n, d in found) if s is not None]
        names = {n for n, _ in found}
        with self._lock:
            for gone in set(self._cache) - names:
                del self._cache[gone]
        runs.sort(key=lambda r: r.get("started") or "", reverse=True)
        self.last_list_s = time.perf_counter() - t0
        return runs
