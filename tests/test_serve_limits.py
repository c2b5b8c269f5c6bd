"""`serve` under hostile or careless clients: bodies too big (declared or streamed), prompts that
cannot fit the context, numbers out of range, a flood of big prompts, a public bind without a real
key. A real uvicorn server on a free port over a real 4-bit tiny run (test_serve's Server)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from test_serve import KEY, Server, _listening, raw, serve_process

from qlora_kit import serve
from qlora_kit.serve import engine as generate

N = 8
URL = "/v1/chat/completions"
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine(tiny_run):
    return generate.Engine.from_runs({"legal": tiny_run[0]})


@pytest.fixture(scope="module")
def service(engine):
    return serve.Service(engine, default_max_tokens=N)


@pytest.fixture(scope="module")
def server(service):
    s = Server(serve.create_app(service, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture()
def renders(engine, monkeypatch):
    """How many prompts have been rendered (the step right before tokenizing, both in the Service
    and in the Engine): the real tokenizer, counted."""
    tok = engine.adapters["legal"].tokenizer
    calls = []
    real = tok.apply_chat_template

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tok, "apply_chat_template", counted)
    return calls


def post(server, body: dict, **kw):
    return raw(server.url + URL, json.dumps(body, ensure_ascii=False).encode(), {**AUTH, **kw.pop("headers", {})}, **kw)


def chat(content: str = "试用期最长多久？", **fields) -> dict:
    return {"model": "legal", "max_tokens": N, "messages": [{"role": "user", "content": content}], **fields}


def response(sock: socket.socket, timeout: float = 20) -> tuple[int, dict, bytes]:
    """(status, JSON body, raw head) of one HTTP/1.1 response with a Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: *(\d+)", head, re.I) if sep else None
        if m and len(rest) >= int(m.group(1)):
            return int(head.split()[1]), json.loads(rest[: int(m.group(1))]), head
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole response: {data[:200]!r}"
        data += chunk


def head(extra: str) -> bytes:
    return (f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
            f"{extra}\r\n").encode()


# --- body size ------------------------------------------------------------------------------------

def test_declared_length_over_the_limit_is_413_before_any_body_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head(f"Content-Length: {300 * 10**6}\r\n"))  # and not one byte of body
        t0 = time.perf_counter()
        status, body, raw_head = response(sock)  # reading the body first would wait here forever
    assert status == 413 and time.perf_counter() - t0 < 5
    assert body["error"]["code"] == "request_too_large" and "8 MiB" in body["error"]["message"]
    assert b"connection: close" in raw_head.lower()  # the rest of the body is not drained
    assert post(server, chat())[0] == 200


def test_streamed_body_is_cut_off_at_the_limit(server, service):
    """Chunked, no length: the answer comes once 8 MiB are in, while the client is still sending."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sent = [0]
    answered = threading.Event()

    def send():
        piece = b"x" * (1 << 20)
        try:
            sock.sendall(head("Transfer-Encoding: chunked\r\n"))
            while sent[0] < (64 << 20) and not answered.is_set():  # never ends the body by itself
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent[0] += len(piece)
            answered.wait(30)  # keep the body open: only a server that stops reading can answer
        except OSError:
            pass  # the server closed the connection after its 413

    th = threading.Thread(target=send, daemon=True)
    th.start()
    try:
        status, body, raw_head = response(sock, timeout=30)
    finally:
        answered.set()
        th.join(10)
        sock.close()
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert sent[0] < (48 << 20), f"{sent[0] >> 20} MiB sent before the answer"  # socket buffers, not the body
    assert service.inflight == 0 and post(server, chat())[0] == 200


def test_a_body_inside_the_limit_still_works_chunked(server):
    body = json.dumps(chat()).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head("Transfer-Encoding: chunked\r\n"))
        for i in range(0, len(body), 7):  # small pieces, as a streaming client would send
            part = body[i:i + 7]
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, out, _ = response(sock, timeout=120)
    assert status == 200 and out["object"] == "chat.completion"


# --- prompt length ----------------------------------------------------------------------------------

def test_huge_prompt_is_refused_without_tokenizing(server, service, renders):
    prompt = "试用期最长多久？The lawyer cited the statute. " * 150_000  # ~8 MB of UTF-8, just inside 8 MiB
    body = json.dumps(chat(prompt), ensure_ascii=False).encode()
    assert 5 * 10**6 < len(body) < serve.MAX_BODY
    for stream in (False, True):
        data = body if not stream else json.dumps(chat(prompt, stream=True), ensure_ascii=False).encode()
        t0 = time.perf_counter()
        status, out = raw(server.url + URL, data, AUTH)
        took = time.perf_counter() - t0
        assert status == 400, out
        err = out["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        assert f"{service.context} tokens" in err["message"]
        assert took < 2, f"{took:.2f} s"  # tokenizing it takes several seconds here
    assert renders == []  # structural: the prompt was never rendered, so never tokenized
    assert service.inflight == 0


def test_prompt_inside_the_character_bound_but_over_the_context_is_counted_exactly(server, service, renders):
    # over 1024 tokens, yet short enough in characters that only tokenizing can tell
    prompt = "试用期最长多久？" * 400
    status, out = post(server, chat(prompt))
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert re.search(r"the messages take \d+ and max_tokens asks for 8", out["error"]["message"])
    assert len(renders) == 1 and service.inflight == 0
    status, out = post(server, {**chat(prompt), "stream": True})  # refused before the stream starts
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    status, out = post(server, chat("试用期最长多久？", max_tokens=service.context - 5))  # fits alone, not with the prompt
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert "max_tokens asks for" in out["error"]["message"]


# --- numbers ------------------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("seed", 2**63), ("seed", -1), ("seed", True), ("seed", 1.5), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", 1025), ("max_tokens", True), ("max_tokens", 8.0), ("max_tokens", 10**400),
    ("max_completion_tokens", 0), ("max_completion_tokens", False),
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", True), ("temperature", "1"),
    ("temperature", 10**400), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0), ("top_p", 1.01), ("top_p", True), ("top_p", -1),
    ("n", 2), ("n", 0), ("n", True), ("n", 1.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("frequency_penalty", True),
    ("top_logprobs", 21), ("top_logprobs", -1),
    ("logit_bias", {"5": 101}), ("logit_bias", {"5": True}), ("logit_bias", {"x": 1}), ("logit_bias", [1]),
]


@pytest.mark.parametrize("field,value", BAD_NUMBERS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_NUMBERS])
def test_numbers_out_of_range_are_400_naming_the_field(server, field, value):
    for stream in (False, True):
        status, out = post(server, chat(**{field: value, "stream": stream}))
        assert status == 400, (field, value, out)
        assert out["error"]["param"] == field and out["error"]["type"] == "invalid_request_error"
        assert out["error"]["code"] in ("invalid_type", "invalid_value")
        assert field in out["error"]["message"]


def test_numbers_at_their_limits_are_taken(server, service):
    status, out = post(server, chat(seed=2**63 - 1, temperature=2, top_p=1, n=1, presence_penalty=-2,
                                    frequency_penalty=2, top_logprobs=0, logit_bias={"5": -100}, max_tokens=1))
    assert status == 200 and out["usage"]["completion_tokens"] <= 1, out
    a, b = (post(server, chat(seed=0, temperature=1.5))[1]["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b
    status, out = post(server, chat(stream_options={"include_usage": 1}, stream=True))
    assert status == 400 and out["error"]["param"] == "stream_options.include_usage"
    assert service.stats["failed"] == 0  # nothing above reached the model as a 500


# --- queue --------------------------------------------------------------------------------------------

def test_a_flood_of_big_prompts_gets_429_before_any_tokenizing(engine, renders):
    svc = serve.Service(engine, default_max_tokens=N, max_queue=1)
    s = Server(serve.create_app(svc))
    try:
        done: list = []
        engine.lock.acquire()  # a generation "running": the admitted requests wait behind it
        try:
            waiting = [threading.Thread(target=lambda: done.append(raw(s.url + URL, json.dumps(chat()).encode(),
                                                                       {"Content-Type": "application/json"})))
                       for _ in range(2)]
            for t in waiting:
                t.start()
            t0 = time.time()
            while svc.inflight < 2:
                assert time.time() - t0 < 30
                time.sleep(0.01)
            rendered = len(renders)
            assert rendered == 2  # the two admitted ones, tokenized once admitted
            # inside the character bound, so only tokenizing could refuse them
            big = json.dumps(chat("试用期最长多久？" * 7000, max_tokens=1), ensure_ascii=False).encode()
            got: list = []
            flood = [threading.Thread(target=lambda: got.append(raw(s.url + URL, big, {"Content-Type": "application/json"})))
                     for _ in range(12)]
            for t in flood:
                t.start()
            for t in flood:
                t.join(60)
            assert [st for st, _ in got] == [429] * 12
            assert all(b["error"]["code"] == "server_busy" for _, b in got)
            assert len(renders) == rendered  # refused before the tokenizer saw them
            with socket.create_connection(("127.0.0.1", s.port)) as sock:  # ... and before the body is read
                sock.sendall(head("Content-Length: 7000000\r\n"))
                assert response(sock)[:2] == (429, got[0][1])
        finally:
            engine.lock.release()
        for t in waiting:
            t.join(120)
        assert [st for st, _ in done] == [200, 200] and svc.inflight == 0
        assert len(renders) == rendered  # the Engine generated from the prompts tokenized at admission
        assert svc.stats["rejected"] == 13
    finally:
        s.stop()


# --- binding ------------------------------------------------------------------------------------------

def serve_cmd(run, *args):
    return [sys.executable, "-m", "qlora_kit.cli", "serve", str(run), "--port", "0", "--max-tokens", str(N), *args]


ENV = {k: v for k, v in os.environ.items() if k != "QLORA_KIT_API_KEY"} | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("key", [None, "short-key", "k" * 15])
def test_public_bind_without_a_real_key_exits_2_before_binding(tiny_run, tmp_path, key):
    args = ["--host", "0.0.0.0"]
    if key is not None:
        (tmp_path / "key").write_text(key + "\n")
        args += ["--api-key-file", str(tmp_path / "key")]
    p = subprocess.run(serve_cmd(tiny_run[0], *args), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "--api-key-file" in out and "16" in out and "0.0.0.0" in out
    assert "Traceback" not in out and "serving" not in out


def test_public_bind_with_a_real_key_serves_and_asks_for_it(tiny_run, tmp_path):
    key = "a-long-enough-key-0123456789"
    (tmp_path / "key").write_text(key + "\n")
    with serve_process(serve_cmd(tiny_run[0], "--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")), ENV) as out:
        m = re.search(r"serving .+ at http://0\.0\.0\.0:(\d+)/v1 \(API key required\)", out)
        assert m, out
        port = int(m.group(1))
        if os.path.exists("/proc/net/tcp"):
            assert _listening(port) == ["00000000"]  # every IPv4 address
        url = f"http://127.0.0.1:{port}/v1/models"
        assert raw(url)[0] == 401
        status, body = raw(url, headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and {m["id"] for m in body["data"]} == {tiny_run[0].name, "base"}
