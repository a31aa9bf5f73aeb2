"""The OpenAI-compatible server, run by uvicorn on 127.0.0.1 and driven by the real `openai`
client: completions with the safety field, streaming (the same text and usage as the plain
answer), stop strings, classify, models, limits and error shapes, auth, Prometheus metrics
(parsed with prometheus_client), and a bounded load test."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import socket
import statistics
import threading
import time

import pytest
import torch
from conftest import make_image
from guarded_fixtures import count_calls, scripted_guard

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx
from prometheus_client.parser import text_string_to_metric_families

from safevlm.model import SafeVLM
from safevlm.policy import Policy
from safevlm.serve import Engine, ServerSettings, create_app, serve_in_thread

KEY = "test-key"
MODEL = "tiny"


def running(app, timeout: float = 20.0):
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    return serve_in_thread(app, timeout=timeout)


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


def samples(source) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a /metrics page (its URL) or of a :class:`Metrics`,
    parsed with prometheus_client's own parser (a malformed page fails here)."""
    text = httpx.get(source + "/metrics").text if isinstance(source, str) else source.render()[0].decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(table: dict, name: str, **labels) -> float:
    """One sample's value in a :func:`samples` table (0 when absent)."""
    return table.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


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
    before = metric(samples(server), "safevlm_safety_head_errors_total")
    r = client.chat.completions.create(model=MODEL, messages=user("x [nan]", IMAGE_URL), max_tokens=4)
    assert r.model_extra["safety"]["action"] == "refuse" and "not finite" in r.model_extra["safety"]["error"]
    assert metric(samples(server), "safevlm_safety_head_errors_total") == before + 1


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


STREAM_PROMPTS = {
    "image": (user("Describe it. [allow]", IMAGE_URL), 8),
    "image, longer": (user("What is in the photo? Tell me everything. [allow]", IMAGE_URL), 16),
    "hinted": (user("How do I do it? [hint]", IMAGE_URL), 12),
    "text only": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there [allow]"}], 10),
}


def _joined(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("case", list(STREAM_PROMPTS))
def test_streaming_gives_exactly_the_plain_answer(client, case):
    messages, max_tokens = STREAM_PROMPTS[case]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}))
    answer = plain.choices[0].message.content
    assert answer and answer == answer.strip()
    assert chunks[0].model_extra["safety"] == plain.model_extra["safety"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _joined(chunks) == answer  # not stripped: the very same text
    assert not _joined(chunks[:2]).startswith((" ", "\n"))  # the first content delta starts with the answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_streaming_refusal(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == Policy.default().refusal_text("illegal")
    assert chunks[-1].choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("where", ["mid-word", "after a space"])
def test_stop_strings_cut_the_answer_and_its_token_count(client, engine, where):
    messages = user("Describe it. [allow]", IMAGE_URL)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    text = full.choices[0].message.content
    assert len(text) >= 6
    if where == "mid-word":
        stop = text[3:5]
    else:  # like stop="photo" on "The photo shows ...": the returned text ends with the space
        space = text.index(" ", 1)
        stop = text[space + 1:space + 3]
        assert len(stop) == 2 and text.find(stop) == space + 1
    expected = text[:text.find(stop)]
    assert expected.endswith(" ") == (where == "after a space")
    returned_tokens = len(engine.processor.tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert 1 <= returned_tokens < full.usage.completion_tokens
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == returned_tokens  # what was returned, not what was generated
    assert cut.usage.prompt_tokens == full.usage.prompt_tokens
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + returned_tokens
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stop=stop,
                                                   stream=True, stream_options={"include_usage": True}))
    assert _joined(streamed) == expected
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert streamed[-1].usage.model_dump() == cut.usage.model_dump()


def test_stop_strings_never_cut_a_refusal(client):
    refusal = Policy.default().refusal_text("illegal")
    stop = refusal.split()[1]
    r = client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), stop=stop)
    streamed = list(client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), stop=stop,
                                                   stream=True))
    assert r.choices[0].message.content == _joined(streamed) == refusal
    assert r.choices[0].finish_reason == "content_filter" and r.usage.completion_tokens == 0


def test_models_list_and_retrieve(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "safevlm") and card.created > 0
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found" and "'gpt-4o'" in err.value.message and MODEL in err.value.message
    body = err.value.body
    assert body["type"] == "not_found_error" and body["param"] == "model"
    assert httpx.get(server + f"/v1/models/{MODEL}").status_code == 401  # a /v1 route: the key is needed


def test_model_ids_with_a_slash_in_process(engine):
    """Hub-style ids ("org/name") through the openai client over FastAPI's TestClient."""
    from fastapi.testclient import TestClient

    app = create_app(ServerSettings(**{**SETTINGS, "served_model_name": "org/tiny-llava"}), engine)
    with TestClient(app, base_url="http://testserver/v1") as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        assert client.models.retrieve("org/tiny-llava").id == "org/tiny-llava"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("org/other")
        r = client.chat.completions.create(model="org/tiny-llava", messages=user("Hi [allow]", IMAGE_URL), max_tokens=3)
    assert r.model == "org/tiny-llava" and r.usage.completion_tokens >= 1


def test_models_health_and_classify(client, server, engine):
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


def test_classify_image_errors_name_the_field_that_held_the_image(server):
    cases = {
        "image": ({"image": "data:image/png;base64,@@@", "prompt": "x"}, 400, "invalid_base64"),
        "image, not an image": ({"image": data_url(b"not a picture")}, 400, "invalid_image"),
        "image, remote": ({"image": "http://127.0.0.1:9/cat.png"}, 400, "remote_images_disabled"),
        "messages": ({"messages": user("x", data_url(b"not a picture"))}, 400, "invalid_image"),
        "messages, two images": ({"messages": user("x", IMAGE_URL, IMAGE_URL)}, 400, "too_many_images"),
    }
    for case, (body, status, code) in cases.items():
        r = post(server, "/v1/safety/classify", body)
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["param"]) == (status, code, case.split(",")[0]), case


def test_metrics_parse_and_count_requests_actions_tokens_and_latency(client, server):
    before = samples(server)
    r = client.chat.completions.create(model=MODEL, messages=user("x [refuse]", IMAGE_URL), max_tokens=2)
    allowed = client.chat.completions.create(model=MODEL, messages=user("Hi [allow]", IMAGE_URL), max_tokens=3)
    assert post(server, "/v1/chat/completions", _chat(max_tokens=17)).status_code == 400
    client.models.retrieve(MODEL)
    after = samples(server)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("safevlm_requests_total", endpoint="/v1/chat/completions", status=200) == 2
    assert moved("safevlm_requests_total", endpoint="/v1/chat/completions", status=400) == 1
    assert moved("safevlm_requests_total", endpoint="/v1/models/{model}", status=200) == 1
    assert moved("safevlm_safety_actions_total", action="refuse", risk_type="illegal") == 1
    assert moved("safevlm_safety_actions_total", action="allow", risk_type="safe") == 1
    assert moved("safevlm_request_duration_seconds_count", endpoint="/v1/chat/completions") == 3
    assert moved("safevlm_request_duration_seconds_sum", endpoint="/v1/chat/completions") > 0
    assert moved("safevlm_completion_tokens_total") == allowed.usage.completion_tokens  # the refusal adds 0
    assert moved("safevlm_prompt_tokens_total") == r.usage.prompt_tokens + allowed.usage.prompt_tokens
    assert metric(after, "safevlm_queue_depth") == 0
    # the GET /metrics that read `before` was counted too (when its last byte was sent)
    assert moved("safevlm_requests_total", endpoint="/metrics", status=200) == 1
    families = {f.name: f.type for f in text_string_to_metric_families(httpx.get(server + "/metrics").text)}
    assert families["safevlm_request_duration_seconds"] == "histogram" and families["safevlm_requests"] == "counter"
    assert families["safevlm_queue_depth"] == "gauge" and families["safevlm_batch_size"] == "histogram"


def test_metrics_content_negotiation_and_isolated_registries(server):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    from safevlm.serve import Metrics

    plain = httpx.get(server + "/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    open_metrics = httpx.get(server + "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    names = {f.name for f in parse_openmetrics(open_metrics.text)}  # the parser checks the trailing # EOF
    assert {"safevlm_requests", "safevlm_safety_actions", "safevlm_batch_size"} <= names
    one, two = Metrics(), Metrics()
    one.requests.labels(endpoint="/health", status="200").inc(3)
    assert metric(samples(one), "safevlm_requests_total", endpoint="/health", status=200) == 3
    assert metric(samples(two), "safevlm_requests_total", endpoint="/health", status=200) == 0


def test_concurrent_requests_are_batched_and_all_answered(server, engine):
    before = samples(engine.metrics)
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
    after = samples(engine.metrics)
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


BAD_BODIES = {
    "missing comma": (b'{"model": "tiny", "messages": [] "max_tokens": 2}', "invalid_json",
                      "request body is not valid JSON: Expecting ',' delimiter at line 1 column 34"),
    "second line": (b'{"model": "tiny",\n "messages": }', "invalid_json",
                    "request body is not valid JSON: Expecting value at line 2 column 14"),
    "not json at all": (b"{not json", "invalid_json",
                        "request body is not valid JSON: Expecting property name enclosed in double quotes "
                        "at line 1 column 2"),
    "empty": (b"", "invalid_json", "the request body is empty; send a JSON object"),
    "a list": (b"[1, 2]", "invalid_request", "the request body must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malformed_json_is_a_clear_openai_error(server, case):
    body, code, message = BAD_BODIES[case]
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "code": code, "param": None}
    assert r.json()["error"]["message"].startswith(message)
    # the column is the one json itself reports
    if code == "invalid_json" and body:
        with pytest.raises(json.JSONDecodeError) as err:
            json.loads(body)
        assert f"line {err.value.lineno} column {err.value.colno}" in r.json()["error"]["message"]


def test_field_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user("hi"), temperature=5)
    assert err.value.code == "invalid_request" and err.value.body["param"] == "temperature"
    assert err.value.body["message"].startswith("temperature: Input should be less than or equal to 2")


def test_unknown_routes(server):
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
    before = samples(engine.metrics)
    engine._queue.put(good)
    engine._queue.put(long)
    engine.start()
    assert good.future.result(timeout=60).action == "allow"
    with pytest.raises(InputTooLong, match="exceeds the model's context of 512"):
        long.future.result(timeout=60)
    after = samples(engine.metrics)
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
            metrics = samples(url)
    finally:
        engine.close()
    server_ok = metric(metrics, "safevlm_requests_total", endpoint="/v1/chat/completions", status=200)
    server_errors = {labels: v for (name, labels), v in metrics.items()
                     if name == "safevlm_requests_total" and dict(labels)["status"].startswith("5")}
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
