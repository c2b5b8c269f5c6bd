"""`qlora-kit ui` without a browser: binding, auth, CSRF, uploads, run statuses, train's refusals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qlora_kit.errors import UserError
from qlora_kit.ui import create_app, security

ORIGIN = "http://127.0.0.1:7860"
TOKEN = "test-token-0123456789abcdef"


def client(root: Path, token: str | None = None, **kw) -> TestClient:
    return TestClient(create_app(root, token, **kw), base_url=ORIGIN)


def csrf(c: TestClient, **headers) -> dict:
    tok = c.get("/api/session", headers=headers).json()["csrf"]
    return {"origin": ORIGIN, "x-csrf-token": tok, **headers}


def tree(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*")) if p.exists() else []


def write_run(root: Path, name: str, status: str, pid: int | None = None, started: str = "2026-01-01T10:00:00+00:00",
              metrics: dict | None = None, progress: list[dict] | None = None) -> Path:
    d = root / name
    (d / "logs").mkdir(parents=True)
    info = {"recipe": "legal", "base_model": "builtin:tiny", "base_model_path": "/models/tiny", "status": status,
            "started": started, "data": {"path": "/data/qa.jsonl", "rows": 24}}
    if pid is not None:
        info["pid"] = pid
    (d / "run.json").write_text(json.dumps(info))
    (d / "recipe.yaml").write_text("name: legal\nbase_model: builtin:tiny\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if progress is not None:
        (d / "logs" / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in progress))
    return d


# --- binding and auth -----------------------------------------------------------------------------

def test_non_loopback_bind_without_token_refuses_to_start(tmp_path):
    from qlora_kit import ui

    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(UserError) as e:
            ui.main(tmp_path / "runs", host=host, port=1)
        assert "without a token" in e.value.message and "--token-file" in e.value.hint
    security.check_bind("127.0.0.1", None)
    security.check_bind("localhost", None)
    security.check_bind("::1", None)
    security.check_bind("0.0.0.0", TOKEN)
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    with pytest.raises(UserError, match="at least 16"):
        ui.main(tmp_path / "runs", host="0.0.0.0", port=1, token_file=short)
    with pytest.raises(UserError, match="cannot read"):
        ui.main(tmp_path / "runs", host="0.0.0.0", port=1, token_file=tmp_path / "missing.token")


def test_cli_exits_2_off_loopback_without_token(tmp_path):
    from qlora_kit import cli

    if "ui" not in {c.name for c in cli.app.registered_commands}:
        pytest.skip("`qlora-kit ui` is not wired into the CLI")
    r = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "ui", "--runs", str(tmp_path / "runs"), "--host", "0.0.0.0"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "without a token" in r.stderr and "--token-file" in r.stderr and "Traceback" not in r.stderr


def test_token_required_bearer_or_login_cookie(tmp_path):
    c = client(tmp_path / "runs", TOKEN)
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/run?name=x").status_code == 401
    page = c.get("/")
    assert page.status_code == 401 and '<label for="token">' in page.text  # the login form
    assert c.post("/api/uploads?name=a.jsonl", content=b"x", headers={"origin": ORIGIN}).status_code == 401
    assert c.get("/api/runs", headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert c.get("/api/runs", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200

    bad = c.post("/login", data={"token": "nope"}, headers={"origin": ORIGIN}, follow_redirects=False)
    assert bad.status_code == 401 and "Wrong token" in bad.text
    assert c.post("/login", data={"token": TOKEN}, headers={"origin": "http://evil.example"}).status_code == 403
    ok = c.post("/login", data={"token": TOKEN}, headers={"origin": ORIGIN}, follow_redirects=False)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert c.get("/api/runs").status_code == 200  # the cookie jar now holds the session
    assert c.get("/").status_code == 200
    c.post("/api/logout", headers=csrf(c))
    c.cookies.clear()
    assert c.get("/api/runs").status_code == 401


def test_cross_site_posts_are_refused(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "r1", "finished")
    c = client(root, TOKEN)
    c.post("/login", data={"token": TOKEN}, headers={"origin": ORIGIN})
    good = csrf(c)
    body = {"name": "r1"}
    # a foreign page: its Origin, even with a guessed header
    assert c.post("/api/run/stop", json=body, headers={**good, "origin": "http://evil.example"}).status_code == 403
    # same origin but no CSRF token (a form post, or a script that could not read /api/session)
    assert c.post("/api/run/stop", json=body, headers={"origin": ORIGIN}).status_code == 403
    assert c.post("/api/run/stop", json=body, headers={"origin": ORIGIN, "x-csrf-token": "guess"}).status_code == 403
    # neither Origin nor Referer
    assert c.post("/api/run/stop", json=body, headers={"x-csrf-token": good["x-csrf-token"]}).status_code == 403
    assert c.delete("/api/run/job?name=r1&kind=merge", headers={"origin": "http://evil.example"}).status_code == 403
    # the page's own request passes the guard (and is then refused on its merits: not running)
    r = c.post("/api/run/stop", json=body, headers=good)
    assert r.status_code == 400 and "not running" in r.json()["error"]
    r = c.post("/api/run/stop", json=body, headers={"referer": ORIGIN + "/#/run/r1", "x-csrf-token": good["x-csrf-token"]})
    assert r.status_code == 400
    # a bearer token is not something a browser attaches cross-site: no CSRF header needed
    r = c.post("/api/run/stop", json=body, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400


def test_loopback_without_token_checks_host_and_csrf(tmp_path):
    c = client(tmp_path / "runs")
    assert c.get("/api/runs").status_code == 200
    assert c.get("/api/runs", headers={"host": "localhost:7860"}).status_code == 200
    # every loopback address the ui may bind to (`ui --host 127.0.0.2`), bracketed IPv6 too
    for host in ("127.0.0.2:7860", "[::1]:7860", "LOCALHOST"):
        assert c.get("/api/runs", headers={"host": host}).status_code == 200, host
    assert c.get("/api/runs", headers={"host": "127.0.0.1.evil.example"}).status_code == 403
    # DNS rebinding: a foreign name that resolves to 127.0.0.1
    assert c.get("/api/runs", headers={"host": "evil.example:7860"}).status_code == 403
    assert c.post("/api/uploads?name=a.jsonl", content=b"x", headers={"origin": ORIGIN}).status_code == 403
    assert c.post("/api/uploads?name=a.jsonl", content=b"x", headers=csrf(c)).status_code == 200


def test_security_headers(tmp_path):
    c = client(tmp_path / "runs")
    for path in ("/", "/api/runs", "/static/app.js", "/api/run?name=nope"):
        r = c.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert c.get("/api/runs").headers["cache-control"] == "no-store"


def test_static_assets_come_from_this_server(tmp_path):
    static = Path(__file__).resolve().parent.parent / "qlora_kit" / "ui" / "static"
    for f in static.iterdir():
        text = f.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
        for bad in ("http://", "https://", "//cdn", "@import"):
            assert bad not in text.lower(), (f.name, bad)
    html = (static / "index.html").read_text(encoding="utf-8")
    # every form control has a label
    import re

    ids = set(re.findall(r'<(?:input|select|textarea)[^>]*\bid="([^"]+)"', html))
    labelled = set(re.findall(r'<label for="([^"]+)"', html))
    assert ids <= labelled, ids - labelled


# --- uploads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a/../../x", "../x", "..", "a\\b.jsonl", "x\x00y.jsonl",
                                  ".hidden", "a/b"])
def test_upload_names_with_path_parts_are_refused(tmp_path, name):
    root = tmp_path / "base" / "runs"
    c = client(root)
    headers = csrf(c)
    before, before_parent = tree(root), tree(tmp_path)
    r = c.post("/api/uploads", params={"name": name}, content=b'{"question": "q", "answer": "a"}\n', headers=headers)
    assert r.status_code == 400, r.text
    assert tree(root) == before and tree(tmp_path) == before_parent
    assert not Path("/etc/x").exists()


def test_upload_size_limit_leaves_nothing(tmp_path):
    root = tmp_path / "runs"
    c = client(root, max_upload_bytes=1000)
    headers = csrf(c)
    before = tree(root)
    r = c.post("/api/uploads?name=big.jsonl", content=b"x" * 2000, headers=headers)
    assert r.status_code == 413
    assert tree(root) == before

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(5):
            yield b"y" * 400

    r = c.post("/api/uploads?name=big.jsonl", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert [p for p in tree(root) if p.startswith("uploads/")] == []


def test_upload_is_stored_and_never_overwritten(tmp_path):
    root = tmp_path / "runs"
    c = client(root)
    h = csrf(c)
    a = c.post("/api/uploads?name=法律问答.jsonl", content=b"one\n", headers=h).json()
    assert Path(a["path"]) == root / "uploads" / "法律问答.jsonl"
    same = c.post("/api/uploads?name=法律问答.jsonl", content=b"one\n", headers=h).json()
    assert same["path"] == a["path"]
    other = c.post("/api/uploads?name=法律问答.jsonl", content=b"two\n", headers=h).json()
    assert other["path"] != a["path"] and Path(other["path"]).read_bytes() == b"two\n"
    assert Path(a["path"]).read_bytes() == b"one\n"


# --- the runs list --------------------------------------------------------------------------------

def test_runs_statuses_from_run_dirs(tmp_path):
    root = tmp_path / "runs"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 5))
        write_run(root, "live", "running", pid=live.pid, started=now,
                  progress=[{"event": "log", "step": 3, "max_steps": 10, "loss": 2.5, "time": 1.0}])
        write_run(root, "killed", "running", pid=dead.pid, started=now)
        # the pid is alive but belongs to a process younger than the run: reused after a reboot
        write_run(root, "reused", "running", pid=live.pid, started="2020-01-01T00:00:00+00:00")
        write_run(root, "done", "finished", metrics={"global_step": 12, "train_loss": 1.25, "eval_loss": 1.5})
        write_run(root, "broke", "failed")
        write_run(root / "smoke", "legal", "interrupted")
        (root / "uploads").mkdir()
        (root / "not-a-run").mkdir()
        c = client(root)
        runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
        assert {k: v["status"] for k, v in runs.items()} == {
            "live": "running", "killed": "interrupted", "reused": "interrupted", "done": "finished",
            "broke": "failed", "smoke/legal": "interrupted"}
        assert runs["live"]["steps"] == 3 and runs["live"]["max_steps"] == 10 and runs["live"]["last_loss"] == 2.5
        assert (runs["done"]["steps"], runs["done"]["train_loss"], runs["done"]["eval_loss"]) == (12, 1.25, 1.5)
        assert runs["done"]["data_file"] == "qa.jsonl" and runs["done"]["base_model"] == "builtin:tiny"
        # the cache follows the files: the run finishes
        write_run(root, "later", "running", pid=dead.pid, started=now)
        (root / "later" / "run.json").write_text(json.dumps({"status": "finished", "recipe": "legal"}))
        runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
        assert runs["later"]["status"] == "finished"
        detail = c.get("/api/run", params={"name": "smoke/legal"}).json()
        assert detail["summary"]["status"] == "interrupted"
        for bad in ("../runs", "/etc", "uploads", ".ui", "a/b/c"):
            assert c.get("/api/run", params={"name": bad}).status_code == 400
    finally:
        live.kill()
        live.wait()


def test_progress_is_read_incrementally(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "r", "running", progress=[{"event": "begin", "step": 0}, {"event": "log", "step": 1, "loss": 3.0}])
    with open(d / "logs" / "progress.jsonl", "a") as f:
        f.write('{"event": "log", "step": 2, "lo')  # the writer is mid-line
    c = client(root)
    p = c.get("/api/run/progress?name=r").json()
    assert [e["step"] for e in p["events"]] == [0, 1]
    with open(d / "logs" / "progress.jsonl", "a") as f:
        f.write('ss": 2.5}\n')
    q = c.get(f"/api/run/progress?name=r&offset={p['offset']}").json()
    assert [e["loss"] for e in q["events"]] == [2.5]
    # an old run without progress.jsonl draws its curve from metrics.json
    write_run(root, "old", "finished", metrics={"global_step": 2, "log_history": [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.2}]})
    ev = c.get("/api/run/progress?name=old").json()["events"]
    assert [e.get("loss", e.get("eval_loss")) for e in ev] == [3.0, 2.0, 2.2]


def test_files_report_and_zip_stay_inside_the_run(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "r", "finished")
    (d / "merged").mkdir()
    (d / "merged" / "config.json").write_text("{}")
    (d / "merged" / "model.safetensors").write_bytes(b"\0" * 5000)
    (d / "report.html").write_text("<html><style>b{}</style><b>report</b></html>")
    (tmp_path / "secret.txt").write_text("no")
    c = client(root)
    z = c.get("/api/run/file", params={"name": "r", "path": "merged"})
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert sorted(zf.namelist()) == ["merged/config.json", "merged/model.safetensors"]
        assert zf.read("merged/model.safetensors") == b"\0" * 5000
    for bad in ("../../secret.txt", "/etc/passwd", "../r/../../secret.txt"):
        assert c.get("/api/run/file", params={"name": "r", "path": bad}).status_code == 400
    os.symlink(tmp_path / "secret.txt", d / "link.txt")
    assert c.get("/api/run/file", params={"name": "r", "path": "link.txt"}).status_code == 400
    rep = c.get("/run/report?name=r")
    assert rep.status_code == 200 and "sandbox" in rep.headers["content-security-policy"]
    assert "script-src" not in rep.headers["content-security-policy"]  # default-src 'none': no script at all
    detail = c.get("/api/run?name=r").json()
    assert detail["report"] is True and detail["artifacts"][0]["rel"] == "merged"


# --- the New run form: train's own checks ---------------------------------------------------------

def test_preflight_refusals_carry_trains_message(tmp_path, cache):
    from qlora_kit import train
    from qlora_kit.ui import newrun

    root = tmp_path / "runs"
    c = client(root, data_dirs=[tmp_path])  # the form reads data only from folders the UI was given
    h = csrf(c)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"question": "", "answer": ""}\n{"question": "  ", "answer": "x"}\n', encoding="utf-8")
    form = {"recipe": "legal", "data": str(empty), "base_model": "builtin:tiny", "max_length": "128"}
    with pytest.raises(UserError) as expected:
        train.preflight(newrun.resolve(newrun.parse(form)), quiet=True)
    r = c.post("/api/check", json=form, headers=h)
    assert r.status_code == 400
    assert r.json() == {"error": expected.value.message, "hint": expected.value.hint}
    r = c.post("/api/start", json=form, headers=h)
    assert r.status_code == 400 and r.json()["error"] == expected.value.message

    r = c.post("/api/check", json={**form, "data": str(tmp_path / "qa.jsonl"), "extra": "lora.rnak=8"}, headers=h)
    assert r.status_code == 400
    assert r.json()["error"] == "--set lora.rnak=8: lora.rnak: unknown key; did you mean lora.r?"
    r = c.post("/api/check", json={**form, "r": "0"}, headers=h)
    assert r.status_code == 400 and r.json()["error"].startswith("--set lora.r=0: lora.r:")
    assert tree(root) == []  # nothing was started or written


def test_check_reports_data_and_plan(tmp_path, cache):
    from conftest import write_qa

    data = write_qa(tmp_path / "qa.jsonl", 12)
    with open(data, "a", encoding="utf-8") as f:
        f.write('{"question": "", "answer": "没有问题"}\n')
    c = client(tmp_path / "runs", data_dirs=[tmp_path])
    r = c.post("/api/check", json={"recipe": "legal", "data": str(data), "base_model": "builtin:tiny",
                                   "max_length": "256", "extra": "data.system_prompt=你是律师。"}, headers=csrf(c))
    assert r.status_code == 200, r.text
    j = r.json()
    rep = j["report"]
    assert rep["rows_read"] == 13 and rep["dropped"][0]["where"] == f"{data}:13"
    assert rep["tokens"]["max_length"] == 256 and "sample" in rep
    assert j["plan"]["total"] > 0 and j["plan"]["fits"] is True
    assert j["command"].startswith("qlora-kit train legal --run-dir ")
    assert "--set lora.r=" not in j["command"]  # empty fields are the recipe's, not overrides
