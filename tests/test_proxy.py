"""The guard proxy (`safevlm serve --upstream URL`), loopback only.

The upstream is a real OpenAI-compatible server on 127.0.0.1: safevlm's own server in direct
mode on the tiny model (0 prefix tokens, a policy that allows everything), behind an ASGI
wrapper that records every chat request it receives and can be told to misbehave (sleep,
answer 500, send bad JSON, stall a stream). Decisions are forced with policies (allow / hint /
refuse everything), never left to the random head.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import socket
import time

import pytest
import torch
from conftest import make_image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx
from test_serve import data_url, image_host, metric, png_bytes, running, samples, user

from safevlm.model import SafeVLM
from safevlm.policy import Policy
from safevlm.serve import Engine, ServerSettings, create_app
from safevlm.tiny import build_tiny

MODEL = "tiny-guard"  # the id clients send to the proxy
UPSTREAM_MODEL = "tiny-engine"  # the id the upstream serves
UPSTREAM_KEY = "upstream-secret-key-1234"
KEY_ENV = "SAFEVLM_TEST_UPSTREAM_KEY"
IMAGE_URL = data_url(png_bytes(make_image(0)))
SAFETY_SIZES = dict(num_prefix_tokens=0, num_query_tokens=4, head_num_heads=4)
HINTS = {"low": "Low-risk hint text.", "medium": "Medium-risk hint text.", "high": "High-risk hint text."}


def forcing_policy(name: str, action: str, hint_position: str = "system") -> Policy:
    """A policy that gives ``action`` to every input (thresholds at 1e-9 fire on any head output)."""
    rule = {"hint_threshold": None, "refuse_threshold": None}
    if action == "hint":
        rule.update(hint_threshold=1e-9, hint_level=1)
    elif action == "refuse":
        rule.update(refuse_threshold=1e-9, refuse_level=1)
    return Policy.from_dict({"name": name, "hint_position": hint_position, "rules": {"default": rule},
                             "hints": {"default": HINTS}, "refusals": {"default": f"Refused by {name}."}})


def safe_model():
    """A SafeVLM on its own copy of the tiny base (identical weights every call)."""
    base, processor = build_tiny("test", seed=0)
    torch.manual_seed(0)
    return SafeVLM(base, **SAFETY_SIZES).eval(), processor


# -- the upstream: safevlm in direct mode behind a recording, fault-injecting wrapper --------------------------
class RecordingUpstream:
    """ASGI wrapper: records the JSON body of every ``POST /v1/chat/completions`` it gets, and
    misbehaves as ``fault`` says: None (pass through), ``("sleep", s)``, ``("status", code, body)``,
    ``("stall_stream", s)`` (the first event, then silence for s seconds)."""

    def __init__(self, app):
        self.app = app
        self.received: list[dict] = []
        self.fault = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.received.append(json.loads(body))
        fault = self.fault
        if fault and fault[0] == "sleep":
            await asyncio.sleep(fault[1])
        if fault and fault[0] == "status":
            await send({"type": "http.response.start", "status": fault[1],
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": fault[2]})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if fault and fault[0] == "stall_stream":
            events = 0

            async def stalling_send(message):
                nonlocal events
                if message["type"] == "http.response.body" and message.get("body"):
                    events += 1
                    if events == 2:
                        await asyncio.sleep(fault[1])
                await send(message)

            await self.app(scope, replay, stalling_send)
            return
        await self.app(scope, replay, send)


@pytest.fixture(scope="module")
def upstream():
    """(base URL, recorder): the tiny model in direct mode, allowing everything, with an API key."""
    model, processor = safe_model()
    engine = Engine(model, processor, forcing_policy("upstream_allow", "allow"), batch_wait_ms=1)
    settings = ServerSettings(served_model_name=UPSTREAM_MODEL, api_key=UPSTREAM_KEY, max_tokens=16,
                              default_max_tokens=5)
    recorder = RecordingUpstream(create_app(settings, engine))
    with running(recorder) as url:
        yield url, recorder
    engine.close()


@pytest.fixture(scope="module")
def guard():
    """The proxy's guard model (a full SafeVLM here; loading guard-only is tested from a folder)."""
    return safe_model()


def proxy_settings(upstream_url: str, **extra) -> ServerSettings:
    values = dict(served_model_name=MODEL, upstream=upstream_url + "/v1", upstream_model=UPSTREAM_MODEL,
                  upstream_api_key_env=KEY_ENV, upstream_timeout_s=20, max_tokens=32, default_max_tokens=5)
    return ServerSettings(**{**values, **extra})


@contextlib.contextmanager
def proxy(upstream_url, guard, policy, **extra):
    """A running guard proxy in front of ``upstream_url``; yields (URL, engine)."""
    model, processor = guard
    engine = Engine(model, processor, policy, batch_wait_ms=1)
    with _env(KEY_ENV, UPSTREAM_KEY):
        app = create_app(proxy_settings(upstream_url, **extra), engine)
    try:
        with running(app) as url:
            yield url, engine
    finally:
        engine.close()


@contextlib.contextmanager
def _env(name, value):
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.fixture(scope="module")
def allow_proxy(upstream, guard):
    with proxy(upstream[0], guard, forcing_policy("allow_all", "allow")) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def refuse_proxy(upstream, guard):
    with proxy(upstream[0], guard, forcing_policy("refuse_all", "refuse")) as (url, _):
        yield url


def client(url: str, key: str = "unused", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)


def direct(upstream_url: str) -> openai.OpenAI:
    return client(upstream_url, UPSTREAM_KEY)


def joined(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


CASES = {
    "image": (user("What is in the picture?", IMAGE_URL), 8),
    "image, longer": (user("Describe the photo, its colours and everything in it.", IMAGE_URL), 12),
    "text only with a system turn": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], 6),
    "two turns": (user("What is it?", IMAGE_URL) + [{"role": "assistant", "content": "A picture."},
                                                  {"role": "user", "content": "Which colours?"}], 6),
}


# -- allow: the upstream's own answer, token for token -------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_allowed_answers_equal_the_upstreams_direct_answers(upstream, allow_proxy, case):
    messages, max_tokens = CASES[case]
    url, recorder = upstream
    want = direct(url).chat.completions.create(model=UPSTREAM_MODEL, messages=messages, max_tokens=max_tokens)
    before = len(recorder.received)
    got = client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
    assert got.choices[0].message.content == want.choices[0].message.content  # greedy: the same tokens
    assert want.choices[0].message.content  # an answer, not an empty string that would match anything
    assert got.choices[0].finish_reason == want.choices[0].finish_reason
    assert got.usage.model_dump() == want.usage.model_dump()  # the upstream's usage, passed on
    assert got.model == MODEL and got.model_extra["safety"]["action"] == "allow"
    assert got.model_extra["safety"]["policy"] == "allow_all"
    forwarded = recorder.received[before:]
    assert len(forwarded) == 1 and forwarded[0]["model"] == UPSTREAM_MODEL
    assert forwarded[0]["messages"] == messages  # as sent: the image's data URL unchanged, no hint
    assert "safety" not in forwarded[0]


def test_the_safety_field_is_the_one_direct_mode_gives(upstream, guard, allow_proxy):
    """The proxy's decision equals what a direct-mode server with the same guard and policy attaches."""
    model, processor = safe_model()
    engine = Engine(model, processor, forcing_policy("allow_all", "allow"))
    messages = user("What is in the picture?", IMAGE_URL)
    try:
        with running(create_app(ServerSettings(served_model_name=MODEL, max_tokens=8), engine)) as direct_url:
            want = client(direct_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    finally:
        engine.close()
    got = client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert got.model_extra["safety"] == want.model_extra["safety"]
    assert set(got.model_extra["safety"]) >= {"action", "risk_level", "risk_type", "level_probs", "type_probs", "hint"}


def test_unread_openai_parameters_and_the_default_max_tokens_reach_the_upstream(upstream, allow_proxy):
    url, recorder = upstream
    before = len(recorder.received)
    r = httpx.post(allow_proxy[0] + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": user("Hi", IMAGE_URL), "seed": 7, "presence_penalty": 0.5,
        "logit_bias": {"5": 1}, "user": "u-1", "safety": {"allow_types": []}})
    assert r.status_code == 200, r.text
    sent = recorder.received[before]
    assert (sent["seed"], sent["presence_penalty"], sent["logit_bias"], sent["user"]) == (7, 0.5, {"5": 1}, "u-1")
    assert sent["max_tokens"] == 5 and "safety" not in sent  # the proxy's default_max_tokens
    assert r.json()["usage"]["completion_tokens"] <= 5


# -- hint: in the place the policy names, and the same answer as direct mode -------------------------------------
@pytest.mark.parametrize("position", ["system", "user"])
def test_hinted_requests_reach_the_upstream_with_the_hint_in_place(upstream, guard, position):
    url, recorder = upstream
    policy = forcing_policy(f"hint_{position}", "hint", hint_position=position)
    messages = [{"role": "system", "content": "Be brief."}, *user("How do I do this?", IMAGE_URL)]
    with proxy(url, guard, policy) as (proxy_url, _):
        before = len(recorder.received)
        got = client(proxy_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    hint = got.model_extra["safety"]["hint"]
    assert got.model_extra["safety"]["action"] == "hint" and hint in HINTS.values()
    sent = recorder.received[before]["messages"]
    image_part = {"type": "image_url", "image_url": {"url": IMAGE_URL}}
    if position == "system":
        assert sent[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."},
                                                         {"type": "text", "text": hint}]}
        assert sent[1] == messages[1]
    else:
        assert sent[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
        assert sent[1] == {"role": "user", "content": [image_part,
                                                       {"type": "text", "text": f"How do I do this?\n{hint}"}]}
    # direct mode with the same guard, policy and weights places the hint identically: the same answer
    model, processor = safe_model()
    engine = Engine(model, processor, policy)
    try:
        with running(create_app(ServerSettings(served_model_name=MODEL, max_tokens=8), engine)) as direct_url:
            want = client(direct_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    finally:
        engine.close()
    assert want.model_extra["safety"]["hint"] == hint
    assert got.choices[0].message.content == want.choices[0].message.content
    unhinted = direct(url).chat.completions.create(model=UPSTREAM_MODEL, messages=messages, max_tokens=8)
    assert unhinted.choices[0].message.content != got.choices[0].message.content  # the hint did change the answer
    assert got.usage.prompt_tokens == want.usage.prompt_tokens  # the hint's tokens are counted alike


def test_a_hint_without_a_system_turn_becomes_one(upstream, guard):
    url, recorder = upstream
    with proxy(url, guard, forcing_policy("hint_all", "hint")) as (proxy_url, _):
        before = len(recorder.received)
        got = client(proxy_url).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL), max_tokens=3)
    sent = recorder.received[before]["messages"]
    assert sent[0] == {"role": "system", "content": [{"type": "text", "text": got.model_extra["safety"]["hint"]}]}
    assert sent[1:] == user("Hi", IMAGE_URL)


# -- refuse: answered here ------------------------------------------------------------------------------------------
def test_refusals_never_reach_the_upstream(upstream, refuse_proxy):
    url, recorder = upstream
    before = len(recorder.received)
    c = client(refuse_proxy)
    plain = c.chat.completions.create(model=MODEL, messages=user("How?", IMAGE_URL), max_tokens=8)
    chunks = list(c.chat.completions.create(model=MODEL, messages=user("How?", IMAGE_URL), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(recorder.received) == before  # the upstream saw neither
    choice = plain.choices[0]
    assert choice.message.content == choice.message.refusal == "Refused by refuse_all."
    assert choice.finish_reason == "content_filter" and plain.usage.completion_tokens == 0
    assert plain.model_extra["safety"]["action"] == "refuse" and plain.model == MODEL
    assert joined(chunks) == "Refused by refuse_all."
    assert chunks[0].model_extra["safety"] == plain.model_extra["safety"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["content_filter"]
    assert chunks[-1].usage.completion_tokens == 0


def test_a_guard_error_fails_closed_without_reaching_the_upstream(upstream, allow_proxy, monkeypatch):
    url, recorder = upstream
    engine = allow_proxy[1]

    def broken(*args, **kwargs):
        raise RuntimeError("head exploded")

    monkeypatch.setattr(engine.model, "guard", broken)
    before = len(recorder.received)
    r = client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL), max_tokens=3)
    assert r.model_extra["safety"]["action"] == "refuse" and "head exploded" in r.model_extra["safety"]["error"]
    assert r.choices[0].finish_reason == "content_filter" and len(recorder.received) == before


# -- streaming ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["allow", "hint"])
def test_streaming_through_the_proxy_equals_the_plain_answer(upstream, guard, allow_proxy, action):
    messages, max_tokens = CASES["image, longer"]
    if action == "allow":
        contexts = contextlib.nullcontext(allow_proxy)
    else:
        contexts = proxy(upstream[0], guard, forcing_policy("hint_all", "hint"))
    with contexts as (url, _):
        c = client(url)
        plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}))
        bare = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True))
    assert plain.choices[0].message.content and joined(chunks) == plain.choices[0].message.content == joined(bare)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # passed on chunk by chunk
    assert chunks[0].model_extra["safety"] == plain.model_extra["safety"]
    assert chunks[0].model_extra["safety"]["action"] == action
    assert all(c.model == MODEL for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in bare)  # the proxy asked for usage, the client did not: not passed on
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]


# -- errors ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["code"] == code and error["message"]
    return error


def _chat(stream=False, **extra):
    return {"model": MODEL, "messages": user("Hi", IMAGE_URL), "max_tokens": 4, "stream": stream, **extra}


def test_upstream_down_is_a_502_and_the_proxy_keeps_serving(guard):
    down = f"http://127.0.0.1:{_free_port()}"
    with proxy(down, guard, forcing_policy("allow_all", "allow"), upstream_timeout_s=5) as (url, engine):
        for stream in (False, True):
            start = time.monotonic()
            r = httpx.post(url + "/v1/chat/completions", json=_chat(stream), timeout=30)
            error = _openai_error(r, 502, "upstream_unavailable")
            assert error["type"] == "server_error" and "ConnectError" in error["message"]
            assert time.monotonic() - start < 5
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "upstream_unreachable"
        assert health.json()["upstream"]["reachable"] is False and "cannot connect" in health.json()["upstream"]["error"]
        classify = httpx.post(url + "/v1/safety/classify", json={"image": IMAGE_URL, "prompt": "Hi"}, timeout=30)
        assert classify.status_code == 200 and classify.json()["safety"]["action"] == "allow"
        table = samples(url)
        assert metric(table, "safevlm_upstream_requests_total", outcome="unreachable") == 2


def test_slow_upstream_is_a_504_bounded_by_the_timeout_and_the_proxy_recovers(upstream, guard):
    url, recorder = upstream
    with proxy(url, guard, forcing_policy("allow_all", "allow"), upstream_timeout_s=1.0) as (proxy_url, _):
        recorder.fault = ("sleep", 4.0)
        try:
            for stream in (False, True):
                start = time.monotonic()
                r = httpx.post(proxy_url + "/v1/chat/completions", json=_chat(stream), timeout=30)
                elapsed = time.monotonic() - start
                error = _openai_error(r, 504, "upstream_timeout")
                assert "within 1 s" in error["message"] and error["type"] == "server_error"
                assert 1.0 <= elapsed < 3.0, elapsed  # the timeout, not the upstream's 4 s
            recorder.fault = ("stall_stream", 4.0)  # headers and the first event, then silence
            start = time.monotonic()
            with httpx.stream("POST", proxy_url + "/v1/chat/completions", json=_chat(True), timeout=30) as r:
                events = [line for line in r.iter_lines() if line.startswith("data:")]
            assert r.status_code == 200 and time.monotonic() - start < 3.0
            assert json.loads(events[0][5:])["safety"]["action"] == "allow"
            last = json.loads(events[-1][5:])
            assert last["error"]["code"] == "upstream_timeout" and "nothing for 1 s" in last["error"]["message"]
        finally:
            recorder.fault = None
        ok = client(proxy_url).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL), max_tokens=3)
        assert ok.choices[0].message.content and ok.model_extra["safety"]["action"] == "allow"
        table = samples(proxy_url)
        assert metric(table, "safevlm_upstream_requests_total", outcome="timeout") == 3
        assert metric(table, "safevlm_upstream_requests_total", outcome="200") == 1


FAULTS = {
    "500 with an OpenAI error": (("status", 500, b'{"error": {"message": "CUDA out of memory", "code": 500}}'),
                                 502, "upstream_error", "HTTP 500: CUDA out of memory"),
    "500 with HTML": (("status", 500, b"<html>Internal Server Error</html>"), 502, "upstream_error",
                      "HTTP 500 ('<html>Internal Server Error</html>')"),
    "503": (("status", 503, b""), 502, "upstream_error", "HTTP 503 (empty body)"),
    "401 (the proxy's key)": (("status", 401, b'{"error": {"message": "bad key"}}'), 502, "upstream_error",
                              "HTTP 401: bad key"),
    "200 with bad JSON": (("status", 200, b"{not json"), 502, "upstream_invalid_response", "not a chat completion"),
    "200 without choices": (("status", 200, b'{"object": "list"}'), 502, "upstream_invalid_response",
                            "not a chat completion"),
    "400 passed on": (("status", 400, b'{"error": {"message": "prompt too long", "code": "context_length_exceeded",'
                                      b' "param": "messages"}}'), 400, "context_length_exceeded", "prompt too long"),
    "400 in older vLLM's shape": (("status", 400, b'{"object": "error", "message": "max_tokens too large", "type": '
                                                  b'"BadRequestError", "param": null, "code": 400}'),
                                  400, "upstream_rejected", "the upstream rejected the request: max_tokens too large"),
    "429 passed on": (("status", 429, b'{"error": {"message": "slow down"}}'), 429, "upstream_rejected", "slow down"),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_upstream_errors_are_openai_shaped(upstream, allow_proxy, case):
    url, recorder = upstream
    fault, status, code, text = FAULTS[case]
    recorder.fault = fault
    try:
        for stream in (False, True):
            r = httpx.post(allow_proxy[0] + "/v1/chat/completions", json=_chat(stream), timeout=30)
            if stream and fault[1] == 200:  # the stream's status was 200: the broken body ends the event stream
                events = [line for line in r.text.splitlines() if line.startswith("data:")]
                assert json.loads(events[-1][5:])["error"]["code"] == code
                continue
            error = _openai_error(r, status, code)
            assert text in error["message"], error["message"]
    finally:
        recorder.fault = None
    assert client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL),
                                                          max_tokens=2).choices[0].message.content


def test_an_upstream_limit_is_passed_on(allow_proxy):
    """The proxy allows 32 new tokens, the upstream 16: its 400 reaches the client with its code."""
    with pytest.raises(openai.BadRequestError) as err:
        client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL), max_tokens=20)
    assert err.value.code == "max_tokens_exceeded" and "at most 16" in err.value.message


# -- health, classify, metrics, key -------------------------------------------------------------------------------
def test_health_reports_the_upstream(allow_proxy):
    health = httpx.get(allow_proxy[0] + "/health", timeout=30)
    body = health.json()
    assert health.status_code == 200 and body["status"] == "ok" and body["mode"] == "proxy"
    assert body["upstream"]["reachable"] is True and body["upstream"]["status"] == 200
    assert body["upstream"]["model"] == UPSTREAM_MODEL and body["upstream"]["model_listed"] is True
    assert body["upstream"]["latency_ms"] >= 0


def test_classify_works_as_before_and_never_calls_the_upstream(upstream, allow_proxy):
    from guarded_fixtures import count_calls

    url, recorder = upstream
    before = len(recorder.received)
    engine = allow_proxy[1]
    with count_calls(engine.model.backbone.language_model) as llm:
        r = httpx.post(allow_proxy[0] + "/v1/safety/classify", json={"image": IMAGE_URL, "prompt": "Hi"}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "safety.classification"
    assert r.json()["safety"]["policy"] == "allow_all" and llm == [] and len(recorder.received) == before


def test_metrics_count_the_upstreams_tokens(allow_proxy):
    before = samples(allow_proxy[0])
    r = client(allow_proxy[0]).chat.completions.create(model=MODEL, messages=user("Hi", IMAGE_URL), max_tokens=4)
    after = samples(allow_proxy[0])

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("safevlm_prompt_tokens_total") == r.usage.prompt_tokens
    assert moved("safevlm_completion_tokens_total") == r.usage.completion_tokens
    assert moved("safevlm_upstream_requests_total", outcome="200") == 1
    assert moved("safevlm_safety_actions_total", action="allow", risk_type=r.model_extra["safety"]["risk_type"]) == 1
    assert moved("safevlm_upstream_duration_seconds_count") == 1


def test_the_upstream_key_comes_from_the_named_variable_and_is_never_shown(upstream, guard, caplog, monkeypatch):
    url, _ = upstream
    model, processor = guard
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"the environment variable {KEY_ENV} is not set"):
        create_app(proxy_settings(url), Engine(model, processor, "default"))
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    caplog.set_level(logging.DEBUG)
    engine = Engine(model, processor, forcing_policy("allow_all", "allow"))
    app = create_app(proxy_settings(url), engine)
    try:
        with running(app) as proxy_url:
            r = httpx.post(proxy_url + "/v1/chat/completions", json=_chat(), timeout=30)
            health = httpx.get(proxy_url + "/health", timeout=30).text
    finally:
        engine.close()
    error = _openai_error(r, 502, "upstream_error")
    assert "HTTP 401" in error["message"] and "invalid API key" in error["message"]
    shown = caplog.text + r.text + health + repr(proxy_settings(url)) + repr(app.state.upstream)
    assert "wrong-key" not in shown and UPSTREAM_KEY not in shown


def test_remote_images_go_upstream_as_the_bytes_the_guard_judged(upstream, guard):
    url, recorder = upstream
    raw = png_bytes(make_image(3))
    with image_host(raw) as (image_url, hits):
        with proxy(url, guard, forcing_policy("allow_all", "allow"), allow_remote_images=True) as (proxy_url, _):
            before = len(recorder.received)
            r = client(proxy_url).chat.completions.create(model=MODEL, messages=user("Hi", image_url), max_tokens=3)
    assert r.model_extra["safety"]["action"] == "allow" and hits == ["/image.png"]  # fetched once, by the guard
    part = recorder.received[before]["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": data_url(raw)}}


# -- settings, folders, CLI --------------------------------------------------------------------------------------------
def test_proxy_settings_are_checked():
    assert ServerSettings(upstream="http://127.0.0.1:8000/v1/").upstream == "http://127.0.0.1:8000/v1"
    with pytest.raises(ValueError, match="upstream must be an http"):
        ServerSettings(upstream="127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="upstream_model only apply with upstream"):
        ServerSettings(upstream_model="x")
    assert ServerSettings(upstream="http://h:1/v1").upstream_timeout_s == 300


@pytest.fixture(scope="module")
def guard_folder(tmp_path_factory):
    """A tiny base folder and a (fresh, 0-prefix-token) safety adapter saved for it."""
    from safevlm.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("proxy")
    folder = save_tiny(tmp / "tiny-llava", preset="test", seed=0)
    from safevlm.loading import load_model_and_processor

    model, _ = load_model_and_processor(str(folder), None, **SAFETY_SIZES)
    model.save_pretrained(tmp / "adapter")
    return folder, tmp / "adapter"


def test_a_proxy_loads_only_the_guard_from_a_folder(upstream, guard_folder, monkeypatch):
    from fastapi.testclient import TestClient

    folder, adapter = guard_folder
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    settings = proxy_settings(upstream[0], model=str(folder), adapter=str(adapter), served_model_name=None,
                              policy="default")
    app = create_app(settings)
    model = app.state.engine.model
    assert model.guard_only is True
    names = [n for n, _ in model.named_parameters()]
    assert any("embed_tokens" in n for n in names) and any("vision_tower" in n for n in names)
    assert [n for n in names if "language_model" in n and "embed_tokens" not in n] == []  # no decoder layer
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": user("Hi", IMAGE_URL),
                                                    "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-llava" and r.json()["choices"][0]["message"]["content"]


def test_safevlm_serve_upstream_without_the_key_variable_is_a_one_line_error(guard_folder, monkeypatch):
    import subprocess
    import sys

    folder, _ = guard_folder
    env = {k: v for k, v in __import__("os").environ.items() if k != KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "safevlm.cli", "serve", "--model", str(folder), "--upstream",
                          "http://127.0.0.1:9/v1", "--upstream-api-key-env", KEY_ENV],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"the environment variable {KEY_ENV} is not set" in out.stderr.strip().splitlines()[-1]


def test_hinted_messages_keep_the_callers_messages_untouched():
    from safevlm.serve.upstream import forward_body

    body = {"model": MODEL, "messages": [{"role": "developer", "content": "Be kind."}, *user("Hi", IMAGE_URL)],
            "stream": True, "safety": {"allow_types": ["privacy"]}}
    original = copy.deepcopy(body)
    out = forward_body(body, model="m", hint="H", hint_position="system", default_max_tokens=7)
    assert body == original
    assert out["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Be kind."},
                                                                {"type": "text", "text": "H"}]}
    assert out["messages"][1] == original["messages"][1]
    assert (out["model"], out["max_tokens"], out["stream_options"]) == ("m", 7, {"include_usage": True})
    assert "safety" not in out
    plain = forward_body(body, model="m", hint=None, hint_position="system", default_max_tokens=7)
    assert plain["messages"] == original["messages"]
