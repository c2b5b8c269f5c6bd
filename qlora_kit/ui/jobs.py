"""Processes the UI starts: `qlora-kit train`, `merge`, `export`, `eval`, exactly as typed in a shell.

Each runs in its own session (start_new_session), so it outlives the browser tab and the UI
itself, and Stop can send SIGINT to its whole process group: train's Ctrl-C handler then saves a
checkpoint and exits 130. A job is recorded in RUNS/.ui/jobs/ (so a restarted UI still knows what
it started); stderr goes to RUNS/.ui/logs/<run>.<kind>.log, outside the run directory, which train
creates itself (and refuses when it is not empty). stdout, where the CLI prints the path it
wrote, goes to a .out file beside it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import rundir
from .runs import pid_alive, read_tail

KINDS = ("train", "merge", "export", "eval")
GRANT_FLAGS = ("--trust-remote-code", "--no-trust-remote-code", "--allow-pickle", "--no-allow-pickle")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlora_kit.cli", *args]


def with_grants(argv: list[str], kind: str, grants) -> list[str]:
    """argv carrying exactly the grants the ui itself was started with (recipe.Grants), whatever a
    built or recorded command said. train states both either way, so that no recipe file (a run's
    recipe.yaml on resume, a form's recipe) nor --set grants what `qlora-kit ui` was not given."""
    kept = [a for a in argv if a not in GRANT_FLAGS]
    if kind != "train":
        return kept + grants.flags()
    return kept + ["--trust-remote-code" if grants.trust_remote_code else "--no-trust-remote-code",
                   "--allow-pickle" if grants.allow_pickle else "--no-allow-pickle"]


def train_argv(recorded) -> list[str] | None:
    """A recorded train command (RUNS/.ui/jobs/*.json, which is as shareable as the runs) as this ui
    may rerun it: `qlora-kit train ...` under this Python, or None for anything else."""
    if (isinstance(recorded, list) and len(recorded) > 3 and all(isinstance(a, str) for a in recorded)
            and recorded[1:4] == ["-m", "qlora_kit.cli", "train"]):
        return cli(*recorded[3:])
    return None


def shown(argv: list[str]) -> str:
    """The command as a person would type it."""
    if argv[:3] == [sys.executable, "-m", "qlora_kit.cli"]:
        argv = ["qlora-kit", *argv[3:]]
    return shlex.join(argv)


def tail(p: Path, n: int = 16384) -> str:
    got = read_tail(p, n)
    if got is None:
        return ""
    text = got[0].decode("utf-8", "replace")
    return text.split("\n", 1)[1] if got[1] and "\n" in text else text


class Jobs:
    def __init__(self, ui_dir: Path, grants=None):
        from ..recipe import Grants

        self.grants = grants or Grants()  # from `qlora-kit ui --trust-remote-code/--allow-pickle` only
        self.dir = Path(ui_dir) / "jobs"
        self.logs = Path(ui_dir) / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self._cache: dict[str, tuple[tuple, dict]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def job_id(run: str, kind: str) -> str:
        return f"{run.replace('/', '__')}.{kind}"

    def _path(self, jid: str) -> Path:
        return self.dir / f"{jid}.json"

    def _save(self, job: dict) -> None:
        rundir.write_json(self._path(job["id"]), job)

    def read(self, jid: str) -> dict | None:
        p = self._path(jid)
        try:
            st = p.stat()
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            hit = self._cache.get(jid)
            if hit is not None and hit[0] == key:
                job = hit[1]
            else:  # the runs list asks for every job on every refresh: parse each file once
                job = json.loads(p.read_text(encoding="utf-8"))
                self._cache[jid] = (key, job)
        except (OSError, ValueError):
            return None
        return self._state(job)

    def _state(self, job: dict) -> dict:
        proc = self.procs.get(job["id"])
        if job.get("returncode") is not None:
            state = "finished" if job["returncode"] == 0 else "stopped" if job["returncode"] == 130 else "failed"
        elif proc is not None and proc.poll() is None:
            state = "running"
        elif proc is None and pid_alive(job.get("pid"), job.get("started")):
            state = "running"  # started by an earlier UI process, still going
        elif proc is not None:
            state = "finished" if proc.returncode == 0 else "failed"
        else:
            state = "ended"  # started by an earlier UI process; its exit code was not seen
        return {**job, "state": state}

    def start(self, run: str, kind: str, argv: list[str], env: dict | None = None) -> dict:
        jid = self.job_id(run, kind)
        argv = with_grants(argv, kind, self.grants)
        with self.lock:
            old = self.read(jid)
            if old is not None and old["state"] == "running":
                raise RuntimeError(f"a {kind} job for {run} is already running")
            self.logs.mkdir(parents=True, exist_ok=True)
            log = self.logs / f"{jid}.log"
            out = self.logs / f"{jid}.out"
            with open(log, "ab") as lf:
                lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shown(argv)}\n".encode())
            with open(log, "ab") as lf, open(out, "wb") as of:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=of, stderr=lf, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                )
            job = {"id": jid, "run": run, "kind": kind, "argv": argv, "command": shown(argv), "pid": proc.pid,
                   "started": time.time(), "log": str(log), "out": str(out), "returncode": None}
            self.procs[jid] = proc
            self._save(job)
        threading.Thread(target=self._reap, args=(job, proc), daemon=True, name=f"reap-{jid}").start()
        return self._state(job)

    def _reap(self, job: dict, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self.lock:
            job = {**job, "returncode": rc, "ended": time.time()}
            self._save(job)

    def forget(self, jid: str) -> None:
        """Remove a job's record (its logs stay): the run page no longer lists it."""
        self._path(jid).unlink(missing_ok=True)

    def resume_argv(self, run: str, run_dir: Path) -> list[str]:
        """The command that started the run, or (run from a shell, or an older UI) its saved recipe."""
        old = self.read(self.job_id(run, "train"))
        recorded = train_argv(old.get("argv")) if old else None
        if recorded and "--run-dir" in recorded:
            return recorded
        return cli("train", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir))

    def for_run(self, run: str) -> list[dict]:
        return [j for j in (self.read(self.job_id(run, k)) for k in KINDS) if j is not None]

    def all(self) -> list[dict]:
        try:
            files = sorted(self.dir.glob("*.json"))
        except OSError:
            return []
        return [j for j in (self.read(f.stem) for f in files) if j is not None]

    def interrupt(self, jid: str) -> bool:
        job = self.read(jid)
        if job is None or job["state"] != "running":
            return False
        return signal_run(job["pid"], session_leader=True)


def signal_run(pid: int, session_leader: bool | None = None) -> bool:
    """SIGINT, as Ctrl-C would: to the process group when the process leads its own session (the UI
    started it), else to the process alone (a shell's job group may hold other programs)."""
    try:
        if session_leader is None:
            session_leader = os.getsid(pid) == pid
        if session_leader:
            os.killpg(pid, signal.SIGINT)
        else:
            os.kill(pid, signal.SIGINT)
        return True
    except (ProcessLookupError, PermissionError):
        return False
