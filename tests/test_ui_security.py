"""`qlora-kit ui` hardening, over real HTTP: request sizes and numbers, Stop and planted pids, runs
behind symlinks, sessions and login throttling, which files the New run form may read, the keys it
may never set, and upload names that hide what they are.

The app runs in a real uvicorn server (in a thread, or as `qlora-kit ui` for --data-dir) on a free
port; requests go through sockets, and runs are real folders (tests/test_ui.py's write_run).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client starlette and huggingface_hub use (httpx under its new name)
import pytest
from test_ui import TOKEN, tree, write_run

from qlora_kit.ui import create_app, security


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UI:
    """A running UI and an HTTP client that talks to it like its own page does."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def page_headers(self) -> dict:
        token = self.http.get("/api/session").json()["csrf"]
        return {"origin": self.url, "x-csrf-token": token}

    def post(self, path: str, body=None, **kw):
        return self.http.post(path, json=body, headers=self.page_headers(), **kw)

    def login(self, token: str) -> httpx.Response:
        return self.http.post("/login", data={"token": token}, headers={"origin": self.url}, follow_redirects=False)


@contextlib.contextmanager
def serve(root: Path, token: str | None = None, **kw):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(root, token, **kw), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the UI did not start")
        time.sleep(0.05)
    ui = UI(f"http://127.0.0.1:{port}")
    try:
        yield ui
    finally:
        ui.http.close()
        server.should_exit = True
        thread.join(10)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


# --- A. request bodies: 413, from Content-Length before reading, and while streaming ---------------

def test_big_json_bodies_answer_413(tmp_path):
    with serve(tmp_path / "runs") as ui:
        h = ui.page_headers()
        big = {"question": "x" * (2 << 20), "runs": ["r"]}
        for path in ("/api/chat", "/api/check", "/api/start", "/api/run/stop"):
            r = ui.http.post(path, json=big, headers=h)
            assert r.status_code == 413, (path, r.status_code, r.text)
            assert "larger than" in r.json()["error"]

        def chunks():  # no Content-Length: the cap is applied while reading
            yield b'{"question": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}'

        r = ui.http.post("/api/chat", content=chunks(), headers={**h, "content-type": "application/json"})
        assert r.status_code == 413

        # a Content-Length of 100 MiB is refused from the header alone: the client has sent 10 bytes
        host, port = ui.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("POST", "/api/check")
        for k, v in {**h, "content-type": "application/json", "content-length": str(100 << 20)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(b'{"recipe":')
        t0 = time.time()
        resp = conn.getresponse()
        assert resp.status == 413 and time.time() - t0 < 5
        assert "larger than" in json.loads(resp.read())["error"]
        conn.close()
        # a normal request still works on the same server
        assert ui.post("/api/check", {"recipe": ""}).json()["error"] == "choose a recipe"


# --- B. numbers have ranges; a bad one is a 400 naming its field -----------------------------------

def test_numbers_out_of_range_are_400_naming_the_field(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "r", "finished", progress=[{"event": "log", "step": 1, "loss": 3.0}])
    size = (d / "logs" / "progress.jsonl").stat().st_size
    with serve(root) as ui:
        for offset in (10**30, 2**63, -1, "abc", "1e9"):
            r = ui.http.get("/api/run/progress", params={"name": "r", "offset": offset})
            assert r.status_code == 400, (offset, r.status_code, r.text)
            assert "offset" in r.json()["error"]
        # a valid offset past the end (the file was replaced by a shorter one): read from the start
        r = ui.http.get("/api/run/progress", params={"name": "r", "offset": size + 1000})
        assert r.status_code == 200 and [e["step"] for e in r.json()["events"]] == [1]
        assert r.json()["offset"] == size

        for bad in (10**9, 0, -5, 2.5, "many", True):
            r = ui.post("/api/chat", {"runs": ["r"], "question": "q", "max_tokens": bad})
            assert r.status_code == 400 and "max_tokens" in r.json()["error"], (bad, r.text)
        r = ui.http.post("/api/chat", content=b'{"runs": ["r"], "question": "q", "max_tokens": Infinity}',
                         headers={**ui.page_headers(), "content-type": "application/json"})
        assert r.status_code == 400 and "Infinity" in r.json()["error"]

        form = {"recipe": "legal", "data": str(root / "uploads" / "qa.jsonl"), "base_model": "builtin:tiny"}
        for field, value, named in [("max_steps", "1e30", "max steps"), ("max_steps", "0", "max steps"),
                                    ("max_steps", "-3", "max steps"), ("epochs", "inf", "epochs"),
                                    ("epochs", "1e9", "epochs"), ("max_length", "99999999999", "max_length"),
                                    ("learning_rate", "nan", "learning_rate"), ("r", "4096", "LoRA rank")]:
            r = ui.post("/api/check", {**form, field: value})
            assert r.status_code == 400 and named in r.json()["error"], (field, value, r.text)
        r = ui.post("/api/check", {**form, "extra": "training.per_device_train_batch_size=100000000000000"})
        assert r.status_code == 400 and "training.per_device_train_batch_size" in r.json()["error"]
        # a missing required query field: 400 naming it, not FastAPI's 422
        r = ui.http.get("/api/run/progress")
        assert r.status_code == 400 and "name" in r.json()["error"]
    assert tree(root / "uploads") == [] and not (root / ".ui" / "jobs").exists()  # nothing was started


# --- C. Stop signals only this run's own `qlora-kit train` -----------------------------------------

# installs its Ctrl-C handler as train does: a process started from a background shell inherits
# SIGINT ignored, and Python then never raises KeyboardInterrupt
FAKE_TRAIN = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")


def test_stop_never_signals_a_planted_pid(tmp_path):
    root = tmp_path / "runs"
    fake = tmp_path / "bin" / "qlora-kit"  # a stand-in whose command line reads `qlora-kit train ...`
    fake.parent.mkdir()
    fake.write_text(FAKE_TRAIN)
    sleeper = subprocess.Popen(["sleep", "60"])
    mine = subprocess.Popen([sys.executable, str(fake), "train", "legal", "--run-dir", str(root / "mine")])
    other = subprocess.Popen([sys.executable, str(fake), "train", "legal", "--run-dir", str(root / "other")])
    try:
        now = iso(time.time() + 2)  # the runs "started" after these processes, as train's run.json says
        write_run(root, "planted", "running", pid=sleeper.pid, started=now)
        write_run(root, "stolen", "running", pid=other.pid, started=now)
        write_run(root, "mine", "running", pid=mine.pid, started=now)
        with serve(root) as ui:
            runs = {r["name"]: r["status"] for r in ui.http.get("/api/runs").json()["runs"]}
            assert runs["planted"] == "running"  # the pid is alive, so the list cannot tell

            r = ui.post("/api/run/stop", {"name": "planted"})
            assert r.status_code == 400, r.text
            assert "refused to stop process" in r.json()["error"] and "not `qlora-kit train`" in r.json()["error"]
            r = ui.post("/api/run/stop", {"name": "stolen"})  # a real train, but of another run
            assert r.status_code == 400 and "another run directory" in r.json()["error"]
            time.sleep(0.5)
            assert sleeper.poll() is None and other.poll() is None  # neither was signalled

            # the run's own process is stopped as before
            r = ui.post("/api/run/stop", {"name": "mine"})
            assert r.status_code == 200 and r.json()["signalled"] == mine.pid, r.text
            assert mine.wait(20) in (130, -2)
    finally:
        for p in (sleeper, mine, other):
            p.kill()
            p.wait()


# --- C. a run folder that is a symlink out of the root is not a run of this UI ---------------------

def test_symlinked_run_outside_the_root_is_neither_listed_nor_served(tmp_path):
    root = tmp_path / "runs"
    outside = write_run(tmp_path / "elsewhere", "secret-run", "finished", progress=[{"event": "log", "step": 1}])
    (outside / "report.html").write_text("<b>secret report</b>")
    write_run(root, "real", "finished")
    root.joinpath("group").mkdir()
    os.symlink(outside, root / "link")
    os.symlink(outside, root / "group" / "nested")
    os.symlink(tmp_path / "elsewhere", root / "parent-link")  # a folder of runs, outside
    os.symlink(root / "real", root / "alias")  # a symlink that stays inside the root is a run
    with serve(root) as ui:
        names = {r["name"] for r in ui.http.get("/api/runs").json()["runs"]}
        assert names == {"real", "alias"}
        for name in ("link", "group/nested", "parent-link/secret-run"):
            for path, params in [("/api/run", {}), ("/api/run/progress", {}), ("/run/report", {}),
                                 ("/api/run/file", {"path": "run.json"})]:
                r = ui.http.get(path, params={"name": name, **params})
                assert r.status_code == 404, (name, path, r.status_code)
                assert r.json()["error"].startswith("no run named") and "secret report" not in r.text
            for path in ("/api/run/stop", "/api/run/resume", "/api/run/job"):
                r = ui.post(path, {"name": name, "kind": "eval"})
                assert r.status_code == 404, (name, path, r.status_code)
        assert ui.http.get("/api/run", params={"name": "alias"}).status_code == 200


# --- C. sessions end at logout; wrong tokens are throttled -----------------------------------------

def test_logout_ends_the_session_for_every_copy_of_the_cookie(tmp_path):
    with serve(tmp_path / "runs", TOKEN) as ui:
        first = ui.login(TOKEN)
        assert first.status_code == 303
        cookie = first.cookies[security.COOKIE]
        assert "Max-Age=" in first.headers["set-cookie"] and TOKEN not in first.headers["set-cookie"]
        assert ui.http.get("/api/runs").status_code == 200
        # a second login gets another id: the cookie is not a value derived from the token
        other = UI(ui.url)
        second = other.login(TOKEN).cookies[security.COOKIE]
        assert second != cookie

        r = ui.post("/api/logout", {})
        assert r.status_code == 200
        stolen = httpx.get(ui.url + "/api/runs", cookies={security.COOKIE: cookie})
        assert stolen.status_code == 401  # the old cookie, replayed, is dead
        assert httpx.get(ui.url + "/api/runs", cookies={security.COOKIE: second}).status_code == 200
        other.http.close()


def test_wrong_tokens_are_throttled(tmp_path):
    with serve(tmp_path / "runs", TOKEN) as ui:
        for _ in range(security.LOGIN_FAILURES):
            r = ui.login("wrong-token-0123456789")
            assert r.status_code == 401 and "Wrong token" in r.text
        r = ui.login("wrong-token-0123456789")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "Too many wrong tokens" in r.text
        assert ui.login(TOKEN).status_code == 429  # not even the right one, until the minute is over
        r = ui.http.get("/api/runs", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 429  # scripts guessing bearer tokens share the limit

    # a bearer guesser is throttled the same way, and the window passes
    throttle = security.Throttle(limit=2, window=0.5)
    throttle.failed("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 0
    throttle.failed("1.2.3.4")
    assert 0 < throttle.wait("1.2.3.4") <= 0.5 and throttle.wait("5.6.7.8") == 0
    time.sleep(0.6)
    assert throttle.wait("1.2.3.4") == 0


# --- C. the form reads only the runs folder, its uploads and --data-dir folders --------------------

@contextlib.contextmanager
def ui_command(tmp_path: Path, cache: Path, *args: str):
    """`qlora-kit ui` itself, as a user starts it."""
    port = free_port()
    env = {**os.environ, "QLORA_KIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "ui.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "ui", "--runs", str(tmp_path / "runs"),
                                 "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    ui = UI(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60
        while True:
            try:
                if ui.http.get("/static/app.css").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the UI did not start:\n" + (tmp_path / "ui.log").read_text())
            time.sleep(0.2)
        yield ui
    finally:
        ui.http.close()
        proc.terminate()
        proc.wait(10)


def test_form_paths_stay_in_the_runs_folder_and_data_dirs(tmp_path, cache):
    from conftest import write_qa

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    good = write_qa(data_dir / "qa.jsonl", 12)
    (data_dir / "notes.cfg").write_text("secret-line-1\nsecret-line-2\n")
    (tmp_path / "elsewhere.jsonl").write_text('{"question": "outside-secret", "answer": "x"}\n')
    (tmp_path / "bad.yaml").write_text("name: secret-yaml\nbase_model: [\n")
    with ui_command(tmp_path, cache, "--data-dir", str(data_dir)) as ui:
        root = Path(ui.http.get("/api/session").json()["runs_dir"])
        (root / "uploads").mkdir()
        os.symlink("/etc/passwd", root / "uploads" / "passwd.jsonl")  # a link out of an allowed folder
        base = {"recipe": "legal", "base_model": "builtin:tiny", "max_length": "256"}
        for data in ("/etc/passwd", str(root / "uploads" / "passwd.jsonl"), str(tmp_path / "elsewhere.jsonl"),
                     str(data_dir / "notes.cfg"), str(data_dir / ".." / "elsewhere.jsonl")):
            for path in ("/api/check", "/api/start"):
                r = ui.post(path, {**base, "data": data})
                assert r.status_code == 400, (data, r.text)
                assert r.json()["error"].startswith("data ")
                assert "root:" not in r.text and "secret" not in r.text.replace(str(tmp_path), "")
        for recipe in ("/etc/passwd", str(tmp_path / "bad.yaml"), "../../etc/passwd.yaml"):
            r = ui.post("/api/check", {**base, "recipe": recipe, "data": str(good)})
            assert r.status_code == 400 and r.json()["error"].startswith("recipe ")
            assert "root:" not in r.text and "secret-yaml" not in r.text
        r = ui.post("/api/check", {**base, "recipe": "legl", "data": str(good)})
        assert r.status_code == 400 and "did you mean 'legal'" in r.json()["hint"]
        r = ui.post("/api/check", {**base, "data": str(good), "extra": f"from_adapter={tmp_path}"})
        assert r.status_code == 400 and "from_adapter" in r.json()["error"]
        # a file in a --data-dir folder is read, and checked as train would
        r = ui.post("/api/check", {**base, "data": str(good)})
        assert r.status_code == 200, r.text
        assert r.json()["report"]["rows_read"] == 12
    assert [p for p in tree(root) if not p.startswith("uploads")] == []  # nothing was started


# --- C. the form never turns on code from a model's files ------------------------------------------

@pytest.mark.parametrize("line", ["trust_remote_code=true", "Trust-Remote-Code = yes", "TRUSTREMOTECODE=1",
                                  "allow_pickle=true", "Allow.Pickle=on", "trust_remote_code: true",
                                  " allow-pickle=false"])
def test_set_trust_remote_code_or_allow_pickle_is_refused(tmp_path, line):
    root = tmp_path / "runs"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with serve(root) as ui:
        form = {"recipe": "legal", "data": str(root / "uploads" / "qa.jsonl"), "base_model": "builtin:tiny",
                "extra": f"lora.r=8\n{line}"}
        for path in ("/api/check", "/api/start"):
            r = ui.post(path, form)
            assert r.status_code == 400, r.text
            assert "never turns on trust_remote_code or allow_pickle" in r.json()["error"]
            assert "shell" in r.json()["hint"]
    assert tree(root) == ["uploads", "uploads/qa.jsonl"]


# --- C. upload names that hide what they are ---------------------------------------------------------

@pytest.mark.parametrize("name", ["evil\u202egpj.jsonl", "a\u202ab.jsonl", "a\u2066b.jsonl", "a\u2069.jsonl",
                                  "x\u200fy.jsonl", "bell\x07.jsonl", "esc\x1b[31m.jsonl", "line\u2028.jsonl",
                                  "model.bin"])
def test_upload_names_with_control_or_direction_characters_are_refused(tmp_path, name):
    root = tmp_path / "runs"
    with serve(root) as ui:
        before = tree(root)
        r = ui.http.post("/api/uploads", params={"name": name}, content=b'{"question": "q", "answer": "a"}\n',
                         headers=ui.page_headers())
        assert r.status_code == 400, r.text
        assert "\u202e" not in r.text  # the name is shown escaped
        assert tree(root) == before
        ok = ui.http.post("/api/uploads", params={"name": "法律问答 v2.jsonl"}, content=b"x\n",
                          headers=ui.page_headers())
        assert ok.status_code == 200
