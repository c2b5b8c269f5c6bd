"""How much memory can one client make `qlora-kit serve` take?

Starts the real `qlora-kit serve` (a subprocess, loopback, API key) on a tiny run and watches the
server process's peak resident memory (VmHWM in /proc/PID/status) while it sends:

  a) one 300 MB body, streamed in 1 MiB pieces, once with a Content-Length header and once chunked
     (Transfer-Encoding: chunked, no length): the server may answer before the body is sent, so
     a sender thread writes while the reader waits for the response;
  b) three concurrent chat requests, each with a 7.6 MB prompt (inside the 8 MiB body limit).

Before each case VmHWM is reset to the current RSS (/proc/PID/clear_refs), so every case shows its
own peak. For each case: VmHWM before and after, the HTTP status codes, how much of the body had been
sent when the answer came, and the wall time. Prints a table; writes JSON with the machine,
versions and date.

    .venv/bin/python scripts/bench_serve_rss.py [--run-dir RUN] [--src DIR] [--baseline-src DIR]
                                                [--out bench/results/serve_rss.json]

Without --run-dir it trains a tiny run first (`qlora-kit train legal --base-model builtin:tiny
--max-steps 2`). --src serves the qlora_kit package found in DIR instead of this checkout;
--baseline-src measures another one first (e.g. an older commit unpacked with `git archive`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 10**6
PIECE = 1 << 20
PROMPT_TEXT = "试用期最长多久？劳动合同期限三个月以上不满一年的，试用期不得超过一个月。The lawyer cited the statute. "


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory field in bytes (VmHWM: peak resident set, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def train_tiny(where: Path) -> Path:
    run = where / "run"
    cmd = [sys.executable, "-m", "qlora_kit.cli", "train", "legal", "--base-model", "builtin:tiny", "--max-steps", "2",
           "--run-dir", str(run)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run


class Served:
    """`qlora-kit serve RUN --port 0 --api-key-file F` in a subprocess; its stderr goes to a file."""

    def __init__(self, run: Path, tmp: Path, src: Path | None):
        self.key = secrets.token_urlsafe(24)
        key_file = tmp / "key"
        key_file.write_text(self.key)
        self.log = tmp / "serve.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src or ROOT)}
        cmd = [sys.executable, "-m", "qlora_kit.cli", "serve", f"legal={run}", "--port", "0",
               "--api-key-file", str(key_file), "--max-tokens", "8", "--max-queue", "8"]
        self.proc = subprocess.Popen(cmd, stderr=open(self.log, "w"), stdout=subprocess.DEVNULL, env=env,
                                     cwd=tmp)  # cwd: `-m qlora_kit` must come from PYTHONPATH, not ROOT
        t0 = time.time()
        while True:
            m = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.time() - t0 > 300:
                raise SystemExit(f"serve did not start:\n{self.log.read_text()}")
            time.sleep(0.2)
        time.sleep(0.5)  # uvicorn starts serving just after the line is printed (the socket is already bound)

    def headers(self, extra: str = "") -> bytes:
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n{extra}\r\n").encode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, bytes, str | None]:
    """(status, body, error): reads until the headers' Content-Length is satisfied or the socket ends."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"content-length: *(\d+)", head, re.I)
                if m and len(rest) >= int(m.group(1)):
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        if not data:
            return None, b"", f"{type(e).__name__}: {e}"
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return (int(m.group(1)) if m else None), data.partition(b"\r\n\r\n")[2], None


def big_body(s: Served, total: int, chunked: bool) -> dict:
    """Send `total` bytes of body in 1 MiB pieces while waiting for the answer."""
    extra = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
    sock = socket.create_connection(("127.0.0.1", s.port))
    sent = [0]
    answered = threading.Event()
    send_error: list[str] = []

    def send():
        piece = b"x" * PIECE
        try:
            sock.sendall(s.headers(extra))
            while sent[0] < total and not answered.is_set():
                n = min(PIECE, total - sent[0])
                sock.sendall((f"{n:x}\r\n".encode() + piece[:n] + b"\r\n") if chunked else piece[:n])
                sent[0] += n
            if chunked and not answered.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError as e:
            send_error.append(f"{type(e).__name__}: {e.strerror or e}")

    t0 = time.perf_counter()
    th = threading.Thread(target=send, daemon=True)
    th.start()
    status, body, err = read_response(sock, timeout=600)
    seconds = time.perf_counter() - t0
    answered.set()
    th.join(30)
    sock.close()
    code = None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        pass
    return {"statuses": [status], "codes": [code], "seconds": round(seconds, 3),
            "body_sent_before_answer_mb": round(sent[0] / MB, 1), "read_error": err,
            "send_error": send_error[0] if send_error else None}


def big_prompts(s: Served, size: int, n: int) -> dict:
    """n concurrent chat requests, each with a prompt of `size` UTF-8 bytes."""
    reps = size // len(PROMPT_TEXT.encode()) + 1
    prompt = (PROMPT_TEXT * reps).encode()[:size].decode("utf-8", "ignore")
    body = json.dumps({"model": "legal", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]},
                      ensure_ascii=False).encode()
    results: list = [None] * n

    def one(i):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(s.headers(f"Content-Length: {len(body)}\r\n") + body)
            status, resp, err = read_response(sock, timeout=900)
        try:
            code = json.loads(resp)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        results[i] = (status, code, time.perf_counter() - t0, err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": [r[0] for r in results], "codes": [r[1] for r in results],
            "seconds": round(time.perf_counter() - t0, 3), "each_seconds": [round(r[2], 3) for r in results],
            "body_mb": round(len(body) / MB, 2), "prompt_chars": len(prompt),
            "read_errors": [r[3] for r in results if r[3]]}


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux 4.0+), so each case shows its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(s: Served, name: str, fn, *args) -> dict:
    reset = reset_peak(s.proc.pid)
    before = vm(s.proc.pid, "VmHWM")
    out = fn(s, *args)
    time.sleep(0.3)  # the last allocations of a refused request
    after = vm(s.proc.pid, "VmHWM")
    out = {"case": name, "peak_rss_before_mb": round(before / MB), "peak_rss_after_mb": round(after / MB),
           "peak_rss_growth_mb": round((after - before) / MB), "peak_reset_before": reset, **out}
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "tokenizers", "uvicorn", "h11", "starlette", "fastapi"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - reported as absent
            out[mod] = None
    try:
        out["qlora_kit_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                                 text=True).stdout.strip()
    except OSError:
        out["qlora_kit_commit"] = None
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "kernel": platform.release()}


def cases(run: Path, tmp: Path, src: Path | None, a) -> dict:
    s = Served(run, tmp, src)
    try:
        idle = vm(s.proc.pid, "VmHWM")
        total = int(a.body_mb * MB)
        out = [measure(s, f"{a.body_mb:g} MB body, Content-Length", big_body, total, False),
               measure(s, f"{a.body_mb:g} MB body, chunked", big_body, total, True),
               measure(s, f"{a.concurrent} x {a.prompt_mb:g} MB prompt", big_prompts, int(a.prompt_mb * MB),
                       a.concurrent)]
    finally:
        s.stop()
    return {"served_src": str(src or ROOT), "idle_peak_rss_mb": round(idle / MB), "cases": out}


def table(title: str, r: dict) -> None:
    print(f"\n{title}: serve peak RSS (VmHWM), idle {r['idle_peak_rss_mb']} MB")
    print(f"{'case':26} {'before MB':>9} {'after MB':>9} {'growth':>7} {'seconds':>8}  statuses (codes)")
    for c in r["cases"]:
        sent = f", {c['body_sent_before_answer_mb']} MB sent before the answer" if "body_sent_before_answer_mb" in c else ""
        print(f"{c['case']:26} {c['peak_rss_before_mb']:>9} {c['peak_rss_after_mb']:>9} {c['peak_rss_growth_mb']:>7} "
              f"{c['seconds']:>8}  {c['statuses']} ({', '.join(str(x) for x in c['codes'])}){sent}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--src", type=Path, help="serve the qlora_kit package in this folder instead of this checkout")
    ap.add_argument("--baseline-src", type=Path, help="also measure the package in this folder (e.g. an older "
                    "commit: git archive COMMIT qlora_kit | tar -x -C DIR), reported as the baseline")
    ap.add_argument("--baseline-label", help="what the baseline is, for the record (e.g. its commit)")
    ap.add_argument("--body-mb", type=float, default=300)
    ap.add_argument("--prompt-mb", type=float, default=7.6)
    ap.add_argument("--concurrent", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_rss.json")
    a = ap.parse_args()

    result = {"bench": "serve_rss", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(),
              "server": "qlora-kit serve, one builtin:tiny run (context 1024 tokens), loopback, API key, max-queue 8"}
    with tempfile.TemporaryDirectory(prefix="bench-serve-rss-") as tmp:
        tmp = Path(tmp)
        run = a.run_dir or train_tiny(tmp)
        if a.baseline_src:
            result["baseline"] = {"label": a.baseline_label, **cases(run, tmp, a.baseline_src, a)}
            table(f"baseline ({a.baseline_label or a.baseline_src})", result["baseline"])
        result.update(cases(run, tmp, a.src, a))
    table(f"this checkout ({a.src or ROOT})", result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
