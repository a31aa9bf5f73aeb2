"""The OpenAI-compatible server, run by uvicorn on 127.0.0.1 and driven by the real `openai`
client: completions with the safety field, streaming, classify, limits, auth, metrics, and a
bounded load test."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import re
import socket
import statistics
import threading
import time

import pytest
import torch
from conftest import make_image
from test_guarded import count_calls, scripted_guard

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx
import uvicorn

from safevlm.model import SafeVLM
from safevlm.policy import Policy
from safevlm.serve import Engine, ServerSettings, create_app

KEY = "test-key"
MODEL = "tiny"


@contextlib.contextmanager
def running(app, timeout: float = 20.0):
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(raw).decode()


IMAGE_URL = data_url(png_bytes(make_image(0)))


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def engine(tiny):
    base, processor = tiny
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4).eval()
    engine = Engine(model, processor, "default", max_batch_size=8, batch_wait_ms=20)
    with scripted_guard(model, processor.tokenizer):
        yield engine
    engine.close()


SETTINGS = dict(served_model_name=MODEL, max_tokens=16, default_max_tokens=4, max_request_bytes=256 * 1024,
                max_image_bytes=64 * 1024, max_image_pixels=256 * 256)


@pytest.fixture(scope="module")
def server(engine):
    with running(create_app(ServerSettings(api_key=KEY, **SETTINGS), engine)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=30)


def metric(text: str, series: str) -> float:
    """A series' value in Prometheus text (0 when absent); ``series`` includes its labels."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def post(server, path, body, key=KEY, **kwargs):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server + path, content=body, headers={**headers, "content-type": "application/json"},
                          timeout=30, **kwargs)
    return httpx.post(server + path, json=body, headers=headers, timeout=30, **kwargs)


# -- completions --------------------------------------------------------------------------------------------
def test_allowed_completion_carries_the_safety_decision(client):
    r = client.chat.completions.create(model=MODEL, messages=user("What is it? [allow]", IMAGE_URL), max_tokens=6)
    safety = r.model_extra["safety"]
    assert safety["action"] == "allow" and safety["policy"] == "default" and safety["risk_type"] == "safe"
    assert safety["level_probs"] == pytest.approx([0.97, 0.01, 0.01, 0.01], abs=1e-4)
    assert r.choices[0].message.content and r.choices[0].message.refusal is None
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.model == MODEL


def test_hint_and_refusal(client):
    policy = Policy.default()
    hinted = client.chat.completions.create(model=MODEL, messages=user("How? [hint]", IMAGE_URL), max_tokens=4)
    assert hinted.model_extra["safety"]["action"] == "hint"
    assert hinted.model_extra["safety"]["hint"] == policy.hint_text("illegal", 2)
    refused = client.chat.completions.create(model=MODEL, messages=user("How? [refuse]", IMAGE_URL), max_tokens=4)
    choice = refused.choices[0]
    assert refused.model_extra["safety"]["action"] == "refuse"
    assert choice.message.content == policy.refusal_text("illegal") == choice.message.refusal
    assert choice.finish_reason == "content_filter" and refused.usage.completion_tokens == 0


def test_text_only_and_system_messages(client):
    r = client.chat.completions.create(
        model=MODEL, max_tokens=3,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello [allow]"}])
    assert r.model_extra["safety"]["action"] == "allow" and r.usage.completion_tokens >= 1


def test_head_nan_fails_closed(client, server):
    r = client.chat.completions.create(model=MODEL, messages=user("x [nan]", IMAGE_URL), max_tokens=4)
    assert r.model_extra["safety"]["action"] == "refuse" and "not finite" in r.model_extra["safety"]["error"]
    metrics = httpx.get(server + "/metrics").text
    assert metric(metrics, "safevlm_safety_head_errors_total") >= 1


def test_overrides_relax_only_relaxable_types(client):
    messages = user("Who is it? [privacy]", IMAGE_URL)
    refused = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    allowed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                             extra_body={"safety": {"allow_types": ["privacy"]}})
    assert refused.model_extra["safety"]["action"] == "refuse"
    assert allowed.model_extra["safety"]["action"] == "allow"
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), max_tokens=3,
                                       extra_body={"safety": {"allow_types": ["illegal"]}})
    assert err.value.code == "override_not_permitted" and "illegal" in err.value.message


def test_streaming_matches_the_plain_answer(client):
    messages = user("Describe it. [allow]", IMAGE_URL)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].model_extra["safety"]["action"] == "allow" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_refusal(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == Policy.default().refusal_text("illegal")
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_stop_strings_cut_the_answer_streamed_or_not(client):
    messages = user("Tell me more. [allow]", IMAGE_URL)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12).choices[0].message.content
    assert len(full) >= 6
    stop = full[3:5]
    expected = full[:full.find(stop)]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == expected.strip()


def test_models_health_and_classify(client, server, engine):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["policy"] == "default"
    with count_calls(engine.model.backbone.language_model) as llm:
        r = post(server, "/v1/safety/classify", {"image": IMAGE_URL, "prompt": "How? [refuse]"})
        by_messages = post(server, "/v1/safety/classify", {"messages": user("What? [allow]", IMAGE_URL), "model": MODEL})
        image_only = post(server, "/v1/safety/classify", {"image": IMAGE_URL})
    assert llm == []
    assert r.status_code == 200 and r.json()["safety"]["action"] == "refuse"
    assert r.json()["safety"]["decided_by"] == "illegal" and r.json()["object"] == "safety.classification"
    assert by_messages.json()["safety"]["action"] == "allow"
    assert image_only.status_code == 200 and len(image_only.json()["safety"]["type_probs"]) == 7
    assert post(server, "/v1/safety/classify", {}).json()["error"]["code"] == "invalid_request"


def test_metrics_count_requests_actions_and_latency(client, server):
    client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), max_tokens=2)
    text = httpx.get(server + "/metrics").text
    assert metric(text, 'safevlm_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    assert metric(text, 'safevlm_safety_actions_total{action="refuse",risk_type="illegal"}') >= 1
    assert metric(text, 'safevlm_request_duration_seconds_count{endpoint="/v1/chat/completions"}') >= 1
    assert metric(text, "safevlm_completion_tokens_total") >= 1
    assert "# TYPE safevlm_request_duration_seconds histogram" in text


def test_concurrent_requests_are_batched_and_all_answered(server, engine):
    before = engine.metrics.render()
    results, errors = [], []

    def one(i):
        try:
            c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
            r = c.chat.completions.create(model=MODEL, messages=user(f"Item {i}? [allow]", IMAGE_URL), max_tokens=4)
            results.append(r.model_extra["safety"]["action"])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == ["allow"] * 6
    after = engine.metrics.render()
    calls = metric(after, "safevlm_batch_size_count") - metric(before, "safevlm_batch_size_count")
    assert metric(after, "safevlm_batch_size_sum") - metric(before, "safevlm_batch_size_sum") == 6
    assert calls < 6  # some requests shared a model call


# -- limits and errors ----------------------------------------------------------------------------------------
def _noise_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")))


def _flat_png(side: int) -> bytes:
    from PIL import Image

    return png_bytes(Image.new("RGB", (side, side), (10, 20, 30)))


def _chat(text="hi [allow]", *urls, **extra):
    return {"model": MODEL, "messages": user(text, *urls), "max_tokens": 2, **extra}


LIMIT_CASES = {
    "request too large": (lambda: _chat("x" * 300_000), 413, "request_too_large"),
    "image bytes": (lambda: _chat("hi", data_url(_noise_png(200))), 413, "image_too_large"),
    "image pixels": (lambda: _chat("hi", data_url(_flat_png(300))), 413, "image_too_large"),
    "malformed base64": (lambda: _chat("hi", "data:image/png;base64,@@@not-base64@@@"), 400, "invalid_base64"),
    "not an image": (lambda: _chat("hi", data_url(b"hello world, not a picture")), 400, "invalid_image"),
    "not an image type": (lambda: _chat("hi", data_url(b"abc", "text/plain")), 400, "invalid_image"),
    "not base64 data url": (lambda: _chat("hi", "data:image/png,rawbytes"), 400, "invalid_image_url"),
    "two images": (lambda: _chat("hi", IMAGE_URL, IMAGE_URL), 400, "too_many_images"),
    "max tokens": (lambda: _chat(max_tokens=17), 400, "max_tokens_exceeded"),
    "n > 1": (lambda: _chat(n=2), 400, "unsupported_parameter"),
    "unknown model": (lambda: {**_chat(), "model": "gpt-4o"}, 404, "model_not_found"),
    "remote image": (lambda: _chat("hi", "http://127.0.0.1:9/cat.png"), 400, "remote_images_disabled"),
    "file url": (lambda: _chat("hi", "file:///etc/passwd"), 400, "invalid_image_url"),
    "no user message": (lambda: {"model": MODEL, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_messages"),
    "bad temperature": (lambda: _chat(temperature=5), 400, "invalid_request"),
    "empty messages": (lambda: {"model": MODEL, "messages": []}, 400, "invalid_request"),
    "too long for the context": (lambda: _chat("word " * 2000), 400, "context_length_exceeded"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits_give_clear_json_errors(server, case):
    make_body, status, code = LIMIT_CASES[case]
    r = post(server, "/v1/chat/completions", make_body())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_limit_messages_carry_the_numbers(server):
    r = post(server, "/v1/chat/completions", _chat("hi", data_url(_flat_png(300))))
    assert "300x300 = 90000 pixels; the limit is 65536" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", _chat(max_tokens=17))
    assert "max_tokens is 17; this server allows at most 16" in r.json()["error"]["message"]


def test_malformed_json_and_unknown_routes(server):
    r = post(server, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.get(server + "/v1/nothing-here", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key_is_required_and_checked(server):
    missing = post(server, "/v1/chat/completions", _chat(), key=None)
    wrong = post(server, "/v1/chat/completions", _chat(), key="wrong-key")
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    assert post(server, "/v1/safety/classify", {"prompt": "x"}, key=None).status_code == 401
    bad_client = openai.OpenAI(base_url=server + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    assert httpx.get(server + "/health").status_code == 200  # health and metrics stay open
    # the key is checked before the body is read: no parse error or size error leaks out
    assert post(server, "/v1/chat/completions", b"{not json", key=None).status_code == 401
    assert post(server, "/v1/chat/completions", _chat("x" * 300_000), key=None).status_code == 401


# -- the engine ---------------------------------------------------------------------------------------------
def test_a_failing_input_does_not_fail_its_batch(engine):
    from safevlm.guarded import InputTooLong
    from safevlm.serve import Job

    engine.close()  # stop the worker so that both jobs are queued before it runs
    generation = {"max_new_tokens": 3, "do_sample": False}
    good = Job("generate", make_image(0), "fine [allow]", generation=generation)
    long = Job("generate", make_image(1), "word " * 2000, generation=generation)
    before = engine.metrics.render()
    engine._queue.put(good)
    engine._queue.put(long)
    engine.start()
    assert good.future.result(timeout=60).action == "allow"
    with pytest.raises(InputTooLong, match="exceeds the model's context of 512"):
        long.future.result(timeout=60)
    after = engine.metrics.render()
    calls = metric(after, "safevlm_batch_size_count") - metric(before, "safevlm_batch_size_count")
    inputs = metric(after, "safevlm_batch_size_sum") - metric(before, "safevlm_batch_size_sum")
    assert (calls, inputs) == (1, 2)  # one call held both; the retry one by one is not a new batch


def test_full_queue_is_refused_and_shutdown_answers_every_waiting_request(tiny, monkeypatch):
    from safevlm.serve import Job
    from safevlm.serve.engine import Overloaded, ShuttingDown

    base, processor = tiny
    model = SafeVLM(base, num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4).eval()
    small = Engine(model, processor, "default", max_queue=2)
    monkeypatch.setattr(small, "start", lambda: small)  # no worker: requests stay queued
    jobs = [Job("classify", make_image(i), "hi") for i in range(2)]
    for job in jobs:
        small.submit(job)
    with pytest.raises(Overloaded, match="2 requests are already waiting"):
        small.submit(Job("classify", make_image(3), "hi"))
    small.close()
    for job in jobs:
        with pytest.raises(ShuttingDown):
            job.future.result(timeout=1)


# -- remote images ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def image_host(payload: bytes):
    """A one-file HTTP server on 127.0.0.1 that counts its requests."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/image.png", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_images_only_when_allowed(server, engine):
    with image_host(png_bytes(make_image(1))) as (url, hits):
        refused = post(server, "/v1/chat/completions", _chat("hi [allow]", url))
        assert refused.status_code == 400 and hits == []  # never fetched
        remote_settings = ServerSettings(allow_remote_images=True, **SETTINGS)
        with running(create_app(remote_settings, engine)) as remote_server:
            ok = post(remote_server, "/v1/chat/completions", _chat("hi [allow]", url), key=None)
        assert ok.status_code == 200 and ok.json()["safety"]["action"] == "allow" and hits == ["/image.png"]


# -- settings and app from a folder ---------------------------------------------------------------------------
def test_settings_come_from_env_and_flags_alike(monkeypatch):
    import argparse

    from safevlm.serve.settings import add_settings_arguments, settings_from_args

    monkeypatch.setenv("SAFEVLM_MAX_TOKENS", "64")
    monkeypatch.setenv("SAFEVLM_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert set(ServerSettings.model_fields) <= flags
    s = settings_from_args(parser.parse_args(["--port", "0", "--allow-remote-images", "--max-tokens", "32"]))
    assert (s.port, s.allow_remote_images, s.max_tokens, s.api_key_value()) == (0, True, 32, "from-env")
    assert s.default_max_tokens == 32  # follows max_tokens when not set
    assert settings_from_args(parser.parse_args([])).max_tokens == 64
    assert "from-env" not in repr(s)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerSettings(max_tokens=8, default_max_tokens=9)
    with pytest.raises(ValueError):
        ServerSettings(max_images=2)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from safevlm.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny-llava", preset="test", seed=0)


def test_create_app_loads_a_model_folder(tiny_folder, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(ServerSettings(model=str(tiny_folder), max_tokens=4, policy="strict"))
    with TestClient(app) as http:
        models = http.get("/v1/models").json()
        r = http.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": user("Hi", IMAGE_URL)})
    assert models["data"][0]["id"] == "tiny-llava"
    assert r.status_code == 200 and r.json()["safety"]["policy"] == "strict"
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        create_app(ServerSettings(model=str(tmp_path / "missing")))


def test_safevlm_serve_command_runs_the_server(tiny_folder):
    """`safevlm serve` in a subprocess: flags and environment both apply; SIGINT stops it."""
    import os
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SAFEVLM_MAX_TOKENS": "8", "SAFEVLM_DEFAULT_MAX_TOKENS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "safevlm.cli", "serve", "--model", str(tiny_folder), "--port", str(port),
         "--api-key", "cli-key", "--served-model-name", "cli-tiny", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        ok = httpx.post(url + "/v1/chat/completions", headers={"authorization": "Bearer cli-key"},
                        json={"model": "cli-tiny", "messages": user("Hi", IMAGE_URL)}, timeout=30)
        too_many = httpx.post(url + "/v1/chat/completions", headers={"authorization": "Bearer cli-key"},
                              json={"model": "cli-tiny", "messages": user("Hi"), "max_tokens": 9}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2  # env default
        assert "at most 8" in too_many.json()["error"]["message"]  # env limit
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # flag api key
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


# -- load ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_8_clients_for_20_seconds(capsys):
    """8 concurrent openai clients for 20 s against the tiny default model: 0 server errors,
    0 lost requests; prints throughput and p50/p99 latency."""
    from safevlm.tiny import build_tiny

    base, processor = build_tiny("default", seed=0)
    torch.manual_seed(0)
    engine = Engine(SafeVLM(base).eval(), processor, "default", max_batch_size=8, batch_wait_ms=10)
    settings = ServerSettings(served_model_name="tiny-default", max_tokens=16, default_max_tokens=16)
    clients, duration, cap = 8, 20.0, 2000
    latencies, errors, actions = [], [], {}
    sent = [0]
    lock = threading.Lock()
    images = [data_url(png_bytes(make_image(i, size=112))) for i in range(clients)]

    def loop(i: int, url: str, deadline: float):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        n = 0
        while time.monotonic() < deadline and n < cap:
            n += 1
            with lock:
                sent[0] += 1
            start = time.perf_counter()
            try:
                r = client.chat.completions.create(model="tiny-default", max_tokens=16,
                                                   messages=user(f"What is in picture {n}?", images[i]))
            except Exception as err:  # noqa: BLE001
                with lock:
                    errors.append(repr(err))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                action = r.model_extra["safety"]["action"]
                actions[action] = actions.get(action, 0) + 1

    try:
        with running(create_app(settings, engine)) as url:
            start = time.monotonic()
            threads = [threading.Thread(target=loop, args=(i, url, start + duration)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(duration + 120)
            elapsed = time.monotonic() - start
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.close()
    server_ok = metric(metrics, 'safevlm_requests_total{endpoint="/v1/chat/completions",status="200"}')
    server_errors = re.findall(r'^safevlm_requests_total\{endpoint="[^"]+",status="5\d\d"\} ', metrics, re.MULTILINE)
    batches = metric(metrics, "safevlm_batch_size_count")
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    report = {
        "clients": clients, "seconds": round(elapsed, 1), "requests": sent[0], "completed": len(latencies),
        "errors": len(errors), "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3), "p99_s": round(quantiles[98], 3),
        "mean_batch": round(len(latencies) / batches, 2), "actions": actions,
    }
    with capsys.disabled():
        print("\nload test:", json.dumps(report))
    assert errors == [] and not server_errors
    assert len(latencies) == sent[0] == server_ok  # nothing lost on either side
    assert len(latencies) >= clients  # every client completed at least one request
