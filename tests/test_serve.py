"""`serve`: a real HTTP server on a free local port, driven by the official `openai` client, over
two real adapters on one 4-bit tiny Llama. No mocks: answers are compared with what
`generate.Engine` gives directly for the same adapter."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, make_recipe, write_qa

from qlora_kit import serve, train
from qlora_kit.serve import engine as generate
from qlora_kit.errors import UserError

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-qlora-kit"
N = 8  # max_tokens everywhere: the tiny model is random-ish, a few tokens tell adapters apart
PROMPTS = ["试用期最长多久？", "工伤怎么认定？"]
MODELS = ["legal", "injury", "base"]


@pytest.fixture(scope="module")
def injury_run(tiny_dir, tmp_path_factory):
    """A second adapter on the same base, trained on other answers with a higher learning rate."""
    d = tmp_path_factory.mktemp("serve-injury")
    data = write_qa(d / "injury.jsonl", n=24, answer="工伤认定需要向社会保险行政部门申请，材料{i}份。")
    return train.run(make_recipe(str(tiny_dir), data, max_steps=6, learning_rate=3e-2), str(d / "run"))


@pytest.fixture(scope="module")
def engine(tiny_run, injury_run):
    return generate.Engine.from_runs({"legal": tiny_run[0], "injury": injury_run})


@pytest.fixture(scope="module")
def expected(engine):
    """Greedy answers straight from the Engine, the old way: use() then generate()."""
    out = {}
    for m in MODELS:
        engine.use(None if m == "base" else m)
        out[m] = {p: engine.generate(engine.messages(p), N).text for p in PROMPTS}
    engine.use("legal")
    return out


class Server:
    """uvicorn in a thread, on a socket bound by serve._bind like `serve.main` does."""

    def __init__(self, app, host="127.0.0.1"):
        self.sock = serve._bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def service(engine):
    return serve.Service(engine, default_max_tokens=N)


@pytest.fixture(scope="module")
def server(service):
    s = Server(serve.create_app(service, api_key=KEY))
    yield s
    s.stop()


def raw(url, data=None, headers=None, method=None):
    """(status, parsed JSON body) for a request the openai client would refuse to send."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(client, model, prompt=PROMPTS[0], **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=kw.pop("max_tokens", N), **kw)


def streamed(client, model, prompt=PROMPTS[0], **kw):
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=kw.pop("max_tokens", N), stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_both_adapters_and_base(server, tiny_run, injury_run):
    c = server.client()
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"legal", "injury", "base"}
    assert all(m.owned_by == "qlora-kit" and m.object == "model" for m in models.values())
    extra = models["injury"].model_extra
    assert extra["run_dir"] == str(injury_run) and extra["base_model"] and extra["kind"] == "adapter"
    assert models["base"].model_extra["run_dir"] is None and models["base"].model_extra["kind"] == "base"
    assert c.models.retrieve("legal").id == "legal"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nosuch")


def test_each_adapter_answers_like_the_engine_and_they_differ(server, expected):
    c = server.client()
    got = {m: ask(c, m) for m in MODELS}
    for m in MODELS:
        r = got[m]
        assert r.object == "chat.completion" and r.model == m and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected[m][PROMPTS[0]], m
        assert r.choices[0].finish_reason in ("stop", "length")
        u = r.usage
        assert u.completion_tokens <= N and u.prompt_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    texts = [got[m].choices[0].message.content for m in MODELS]
    assert len(set(texts)) == 3, texts  # two adapters and the base: three different answers


def test_stream_concatenates_to_the_plain_answer(server, expected):
    c = server.client()
    streamed_models = []
    for m in ("legal", "injury"):
        text, chunks = streamed(c, m, stream_options={"include_usage": True})
        assert text == expected[m][PROMPTS[0]]
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert len({ch.id for ch in chunks}) == 1
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals in (["length"], ["stop"])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1  # include_usage
        # really streamed: each token's text as it comes (a random model may emit only partial UTF-8
        # byte tokens, which are held back until a character is whole, so count printable answers only)
        if len(text.replace("\ufffd", "")) >= 2:
            streamed_models.append(m)
            assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2, (m, text)
    assert streamed_models, "no adapter produced printable text to stream"
    text, chunks = streamed(c, "base")
    assert text == expected["base"][PROMPTS[0]] and all(ch.usage is None for ch in chunks)


def test_stop_strings_cut_both_ways(server, expected):
    full = expected["legal"][PROMPTS[0]]
    stop = full[len(full) // 2:][:2]  # something that occurs in the answer
    cut = full[: full.find(stop)]
    c = server.client()
    r = ask(c, "legal", stop=[stop, "never-occurs"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert streamed(c, "legal", stop=stop)[0] == cut


def test_content_parts_and_sampling(server, expected):
    c = server.client()
    r = c.chat.completions.create(model="injury", max_completion_tokens=N,
                                  messages=[{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}],
                                  user="someone", logit_bias={}, presence_penalty=0)  # unknown fields ignored
    assert r.choices[0].message.content == expected["injury"][PROMPTS[0]]
    a, b = (ask(c, "legal", temperature=1.3, top_p=0.9, seed=7).choices[0].message.content for _ in range(2))
    assert a == b  # same seed, same sample


def test_errors_are_openai_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        ask(c, "nosuch")
    assert e.value.code == "model_not_found" and "legal" in e.value.message and "base" in e.value.message
    with pytest.raises(openai.AuthenticationError) as e:
        ask(server.client(api_key="sk-wrong"), "legal")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    status, body = raw(server.url + "/v1/models")  # no Authorization header at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    bad = [({"messages": []}, "messages"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 5}, "temperature"),
           ({"top_p": 0}, "top_p"), ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
           ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
           ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
           ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content"),
           ({"max_tokens": 100000}, "max_tokens"), ({"model": None}, "model")]
    for change, param in bad:
        kw = {"model": "legal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": N, **change}
        if kw["model"] is None:
            kw.pop("model")
            status, body = raw(server.url + "/v1/chat/completions", json.dumps(kw).encode(),
                               {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            assert status == 400 and body["error"]["param"] == "model"
            continue
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**kw)
        assert e.value.param == param, (change, e.value.body)
        with pytest.raises(openai.BadRequestError):  # the same check before a stream starts
            c.chat.completions.create(**kw, stream=True)
    auth = {"Authorization": f"Bearer {KEY}"}
    for data, ctype in ((b'{"model": "legal", "messages": [', "application/json"), (b"\xff\xfe", "application/json"),
                        (b'{"model": "legal"}', "text/plain"), (b"[1, 2]", "application/json")):
        status, body = raw(server.url + "/v1/chat/completions", data, {"Content-Type": ctype, **auth})
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["message"], data
    status, body = raw(server.url + "/v1/nothing-here", headers=auth)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = raw(server.url + "/v1/chat/completions", headers=auth)  # GET on a POST route
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    assert raw(server.url + "/health") == (200, raw(server.url + "/health")[1])
    assert raw(server.url + "/health")[1]["status"] == "ok"
    assert ask(c, "legal").choices[0].message.content  # still serving


def test_twenty_concurrent_requests_never_cross_adapters(server, expected):
    c = server.client()
    jobs = [(MODELS[i % 3], PROMPTS[(i // 3) % 2], i % 2 == 0) for i in range(20)]
    got: dict[int, str] = {}
    errors: list = []

    def one(i, model, prompt, stream):
        try:
            got[i] = streamed(c, model, prompt)[0] if stream else ask(c, model, prompt).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    assert not errors, errors
    for i, (model, prompt, _) in enumerate(jobs):
        assert got[i] == expected[model][prompt], (i, model, prompt)
    print(f"\n20 concurrent requests: {wall:.2f} s wall, {wall / 20 * 1000:.0f} ms per request")


def test_client_disconnecting_mid_stream_frees_the_engine(server, service, expected):
    c = server.client()
    before = service.stats["cancelled"]
    t0 = time.perf_counter()
    # nearly the whole context: generating it to the end would take far longer than the check below
    stream = c.chat.completions.create(model="injury", messages=[{"role": "user", "content": PROMPTS[1]}],
                                       max_tokens=900, stream=True)
    it = iter(stream)
    got = [next(it) for _ in range(3)]
    assert got[-1].choices[0].delta.content
    stream.close()
    while service.inflight or service.stats["cancelled"] == before:
        assert time.perf_counter() - t0 < 60, "the abandoned generation still holds the engine"
        time.sleep(0.02)
    freed = time.perf_counter() - t0
    r = ask(c, "legal")
    assert r.choices[0].message.content == expected["legal"][PROMPTS[0]]
    print(f"\nengine free {freed:.2f} s after the stream started; next answer {time.perf_counter() - t0 - freed:.2f} s")

    # a plain (non-stream) request whose client hangs up is cancelled too
    before = service.stats["cancelled"]
    body = json.dumps({"model": "legal", "max_tokens": 900, "messages": [{"role": "user", "content": PROMPTS[0]}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        t0 = time.perf_counter()
        while not service.inflight:
            assert time.perf_counter() - t0 < 30
            time.sleep(0.01)
    while service.inflight or service.stats["cancelled"] == before:
        assert time.perf_counter() - t0 < 60, "a hung-up plain request still holds the engine"
        time.sleep(0.02)


def test_queue_full_answers_429(engine):
    svc = serve.Service(engine, default_max_tokens=N, max_queue=1)
    s = Server(serve.create_app(svc))
    try:
        c = s.client(api_key="unused")
        results: list = []
        engine.lock.acquire()  # a generation "running": whatever arrives now has to wait
        try:
            threads = [threading.Thread(target=lambda: results.append(ask(c, "legal"))) for _ in range(2)]
            for t in threads:
                t.start()
            t0 = time.time()
            while svc.inflight < 2:
                assert time.time() - t0 < 30
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                ask(c, "injury")
            assert e.value.status_code == 429 and e.value.code == "server_busy" and e.value.type == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                streamed(c, "injury")
            assert raw(s.url + "/health")[1]["inflight"] == 2  # the loop still answers while all wait
        finally:
            engine.lock.release()
        for t in threads:
            t.join(120)
        assert len(results) == 2 and svc.inflight == 0
        assert ask(c, "base").choices[0].message.content
    finally:
        s.stop()


def test_unexpected_exception_is_a_500_and_serving_goes_on(engine):
    class Faulty(serve.Service):  # a bug inside the service, injected; HTTP and model are real
        def complete(self, body, cancel=None):
            raise RuntimeError("boom")

    s = Server(serve.create_app(Faulty(engine, default_max_tokens=N)))
    try:
        c = s.client(api_key="unused")
        with pytest.raises(openai.InternalServerError) as e:
            ask(c, "legal")
        assert e.value.status_code == 500 and e.value.type == "server_error" and "boom" not in e.value.message
        assert raw(s.url + "/health")[0] == 200
        assert streamed(c, "legal")[0]  # streams are a separate path and still work
    finally:
        s.stop()


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) listening on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                addr, p = f[1].rsplit(":", 1)
                if int(p, 16) == port and f[3] == "0A":
                    out.append(addr)
    return out


@contextlib.contextmanager
def serve_process(cmd: list[str], env: dict):
    """`qlora-kit serve` as a real process: yields its stderr up to its "serving ... at URL" line (all
    of it, if it exited first); terminated on leaving."""
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if line.startswith("serving"):
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert started.wait(180), "serve printed nothing for 3 minutes"
        yield "".join(lines)
    finally:
        p.terminate()
        p.wait(30)


def test_main_serves_on_loopback_by_default(tiny_run, injury_run, tmp_path):
    """The real command: `qlora-kit serve RUN --adapter NAME=RUN --port 0 --api-key-file F`."""
    assert inspect.signature(serve.main).parameters["host"].default == "127.0.0.1"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    cmd = [sys.executable, "-m", "qlora_kit.cli", "serve", str(tiny_run[0]), "--adapter", f"injury={injury_run}",
           "--port", "0", "--api-key-file", str(key_file), "--max-tokens", str(N)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with serve_process(cmd, env) as out:
        m = re.search(r"serving (.+) at (http://127\.0\.0\.1:(\d+)/v1)", out)
        assert m, out
        assert m.group(1).split(", ") == [tiny_run[0].name, "injury", "base"] and "warning" not in out
        port = int(m.group(3))
        if os.path.exists("/proc/net/tcp"):
            assert _listening(port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 or ::
        c = openai.OpenAI(base_url=m.group(2), api_key=KEY, max_retries=0, timeout=120)
        assert {x.id for x in c.models.list().data} == {tiny_run[0].name, "injury", "base"}
        assert ask(c, "injury").usage.completion_tokens <= N


def test_check_bind_and_run_names(tiny_run, injury_run):
    for host in ("127.0.0.1", "::1", "[::1]", "localhost"):  # loopback: any key or none
        serve.check_bind(host, None)
        serve.check_bind(host, "k")
    serve.check_bind("0.0.0.0", "k" * 16)
    with pytest.raises(UserError, match="without an API key") as e:
        serve.check_bind("0.0.0.0", None)
    assert "--api-key-file" in e.value.hint
    with pytest.raises(UserError, match="at least 16"):
        serve.check_bind("192.168.1.5", "k" * 15)
    run = tiny_run[0]
    assert serve.parse_runs([str(run), f"injury={injury_run}"]) == {run.name: run, "injury": injury_run}
    with pytest.raises(UserError, match="reserved"):
        serve.parse_runs([f"base={run}"])
    with pytest.raises(UserError, match="used twice"):
        serve.parse_runs([f"a={run}", f"a={injury_run}"])
    with pytest.raises(UserError, match="nothing to serve"):
        serve.parse_runs([])


def test_vllm_command(tiny_run, injury_run, tmp_path):
    infos = serve.run_infos({"legal": tiny_run[0], "injury": injury_run})
    argv = serve.vllm_command(infos, "0.0.0.0", 8123, "sk-secret")
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    after = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    assert after["--model"] == infos[0].base_model_path and Path(after["--model"]).is_dir()
    assert after["--served-model-name"] == "base" and after["--host"] == "0.0.0.0" and after["--port"] == "8123"
    assert after["--max-lora-rank"] == "8" and after["--max-loras"] == "2"  # r=4, rounded up to what vLLM takes
    assert after["--tokenizer"] == str(tiny_run[0] / "tokenizer") and after["--quantization"] == "bitsandbytes"
    assert "--enable-lora" in argv
    i = argv.index("--lora-modules")
    assert argv[i + 1:] == [f"legal={tiny_run[0] / 'adapter'}", f"injury={injury_run / 'adapter'}"]
    assert all(Path(x.split("=", 1)[1], "adapter_model.safetensors").is_file() for x in argv[i + 1:])
    assert "sk-secret" not in " ".join(argv) and serve.vllm_env("sk-secret")["VLLM_API_KEY"] == "sk-secret"

    extra = tmp_path / "extra"
    shutil.copytree(injury_run, extra, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    cfg_path = extra / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules_to_save"] = ["lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="adapter 'extra'.*lm_head"):
        serve.vllm_command(serve.run_infos({"legal": tiny_run[0], "extra": extra}), "127.0.0.1", 8000, None)
    other = serve.RunInfo(**{**infos[1].__dict__, "name": "other", "base_model_path": "/elsewhere"})
    with pytest.raises(UserError, match="adapter 'other'"):
        serve.vllm_command([infos[0], other], "127.0.0.1", 8000, None)
    assert infos[0].chat_template and infos[0].chat_template == infos[1].chat_template
    other = serve.RunInfo(**{**infos[1].__dict__, "name": "other", "chat_template": "{{ messages }}"})
    with pytest.raises(UserError, match="adapter 'other'.*chat template"):
        serve.vllm_command([infos[0], other], "127.0.0.1", 8000, None)


def test_engine_vllm_without_vllm_is_a_user_error(tiny_run):
    try:
        import torch
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("vLLM and CUDA are here: main would start vLLM for real")
    except ImportError:
        pass
    with pytest.raises(UserError, match="--engine vllm needs vLLM on a CUDA machine") as e:
        serve.main([str(tiny_run[0])], engine="vllm")
    assert "pip install vllm" in e.value.hint
