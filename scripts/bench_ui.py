"""How fast does the UI's runs list answer with hundreds of runs?

Creates N synthetic run directories (run.json, recipe.yaml, metrics.json with a full log history,
logs/progress.jsonl) in a temporary folder, serves the UI with uvicorn on a free port, and times
GET /api/runs over real HTTP: the first (cold: every directory read and parsed) request, then
REPEATS warm ones (the per-directory cache: a few stat calls each), min/median/max.

    .venv/bin/python scripts/bench_ui.py [--runs 200] [--repeats 20] [--out bench/results/ui_runs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def make_runs(root: Path, n: int, log_steps: int = 300) -> None:
    for i in range(n):
        d = root / f"legal-20261201-{i:06d}"
        (d / "logs").mkdir(parents=True)
        status = ("finished", "interrupted", "failed", "running")[i % 4]
        info = {"recipe": "legal", "base_model": "Qwen/Qwen2.5-7B-Instruct", "base_model_path": "/models/qwen",
                "status": status, "pid": 1 if status == "running" else None, "started": f"2026-12-01T09:{i % 60:02d}:00+00:00",
                "data": {"path": f"/data/cases-{i}.jsonl", "rows": 1000 + i, "sha256": "0" * 64, "train_rows": 800, "eval_rows": 200},
                "tokenizer": {"template_source": "model", "stop_token_ids": [151645]},
                "versions": {"torch": "2.13.0", "transformers": "5.23.0"}}
        (d / "run.json").write_text(json.dumps(info, indent=2))
        (d / "recipe.yaml").write_text("name: legal\nbase_model: Qwen/Qwen2.5-7B-Instruct\n")
        hist = [{"step": s, "loss": 2.0 - s / log_steps, "learning_rate": 2e-4, "grad_norm": 0.5} for s in range(1, log_steps + 1)]
        hist += [{"step": s, "eval_loss": 2.1 - s / log_steps} for s in range(25, log_steps + 1, 25)]
        if status == "finished":
            (d / "metrics.json").write_text(json.dumps({"global_step": log_steps, "train_loss": 1.0, "eval_loss": 1.1,
                                                        "log_history": hist}, indent=2))
        with open(d / "logs" / "progress.jsonl", "w") as f:
            f.writelines(json.dumps({"time": 1.8e9, "event": "log", "max_steps": log_steps, "epoch": 1.0, **h}) + "\n"
                         for h in hist)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ui_runs.json"))
    args = ap.parse_args()

    import uvicorn

    from qlora_kit.ui import create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        t0 = time.perf_counter()
        make_runs(root, args.runs)
        made_s = time.perf_counter() - t0
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/runs"

        def get() -> tuple[float, int, int]:
            t = time.perf_counter()
            with urllib.request.urlopen(url) as r:
                body = r.read()
            return time.perf_counter() - t, len(json.loads(body)["runs"]), len(body)

        cold, listed, size = get()
        warm = [get()[0] for _ in range(args.repeats)]
        server.should_exit = True

    result = {
        "runs": args.runs, "listed": listed, "response_bytes": size, "repeats": args.repeats,
        "cold_s": round(cold, 4), "warm_min_s": round(min(warm), 4), "warm_median_s": round(statistics.median(warm), 4),
        "warm_max_s": round(max(warm), 4), "setup_s": round(made_s, 2),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "note": "GET /api/runs over HTTP (uvicorn, one process); each run dir has run.json, metrics.json with "
                "a 300-step log history (finished runs) and a 300-line progress.jsonl",
    }
    print(f"python {result['python']} · {result['cpu_count']} CPUs · {args.runs} run directories "
          f"({listed} listed, {size / 1024:.0f} KiB response)")
    print(f"{'request':<22}{'seconds':>10}")
    print(f"{'cold (first)':<22}{cold:>10.4f}")
    for label, v in (("warm min", min(warm)), ("warm median", statistics.median(warm)), ("warm max", max(warm))):
        print(f"{label:<22}{v:>10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
