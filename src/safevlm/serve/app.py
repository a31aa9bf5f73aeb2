"""`create_app(settings)`: the OpenAI-compatible HTTP server with the safety guard.

Routes:

* ``POST /v1/chat/completions`` — OpenAI chat completions (``image_url`` parts with ``data:``
  base64 images; http(s) URLs only with ``allow_remote_images``); the safety decision is in the
  extra ``safety`` field; ``stream: true`` sends server-sent events.
* ``POST /v1/safety/classify`` — the safety head and the policy only.
* ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics`` (Prometheus
  text, or OpenMetrics when the ``Accept`` header asks for it).

With ``upstream`` set the server is a **guard proxy**: every chat request is guarded here (the
same image path, one vision pass, the policy) and refusals are answered here; allowed and
hinted requests are forwarded to the upstream engine (:mod:`safevlm.serve.upstream`) and its
answer comes back with the ``safety`` field, as in direct mode. ``/health`` then reports
whether the upstream answers.

A streamed answer is the plain answer cut into deltas: the same text (stop strings included)
and the same ``usage``.

Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "code", "param"}}``) with a
4xx status for every client mistake. ``/v1`` routes need ``Authorization: Bearer <key>``
when ``api_key`` is set (checked before the body is read); ``/health`` and ``/metrics`` do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safevlm.guarded import GuardedResult, InputTooLong
from safevlm.policy import PolicyOverrideError, PolicyOverrides
from safevlm.serve.engine import AsyncChannel, Engine, Job, Overloaded, ShuttingDown, cut_at_stop
from safevlm.serve.images import load_image
from safevlm.serve.metrics import Metrics
from safevlm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ClassifyRequest,
)
from safevlm.serve.settings import ServerSettings
from safevlm.serve.upstream import Upstream, forward_body

logger = logging.getLogger("safevlm.serve")

ENDPOINTS = ("/v1/chat/completions", "/v1/safety/classify", "/v1/models", "/health", "/metrics")
MODEL_ENDPOINT = "/v1/models/{model}"  # the label of every /v1/models/<id> request (bounded label values)


def _endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return MODEL_ENDPOINT if path.startswith("/v1/models/") else "other"


# -- dependencies (overridable in tests through app.dependency_overrides) --------------------------------
def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def api_key_error(settings: ServerSettings, authorization: str | None) -> APIError | None:
    """None when the request may pass; the 401 error otherwise (only /v1 routes are checked)."""
    expected = settings.api_key_value()
    if not expected:
        return None
    if not authorization:
        return APIError(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        return APIError(401, "invalid_api_key", "invalid API key")
    return None


# -- middleware: body size limit, request metrics ------------------------------------------------------------
class GatewayMiddleware:
    """Before the app sees a request: the API key check on ``/v1`` routes (401) and the body size
    limit (413), so neither an unauthenticated nor an oversized body is ever parsed. Records
    each request's endpoint, status and latency (until the last response byte)."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = _endpoint_label(scope["path"])
        state = {"status": 500, "recorded": False}

        def record(status: int) -> None:
            if not state["recorded"]:
                state["recorded"] = True
                self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
                self.metrics.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - start)

        async def send_recording(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record(state["status"])

        headers = dict(scope.get("headers") or [])
        if scope["path"].startswith("/v1/"):
            error = api_key_error(self.settings, headers.get(b"authorization", b"").decode("latin-1") or None)
            if error is not None:
                await _send_error(send_recording, error)
                return
        limit = self.settings.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send_recording, APIError(
                413, "request_too_large", f"the request body is {int(declared)} bytes; the limit is {limit} bytes"))
            return
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                record(499)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send_recording, APIError(
                    413, "request_too_large", f"the request body exceeds the limit of {limit} bytes"))
                return
            body.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_recording)
        finally:
            record(state["status"])  # a stream cut short, or an unhandled error (500), is still counted


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- request conversion ----------------------------------------------------------------------------------
async def _convert_messages(messages: list[ChatMessage], settings: ServerSettings, fetched: dict | None = None):
    """(image or None, messages in safevlm's chat format) with the image limits enforced;
    ``fetched`` collects downloaded images as data URLs (see :func:`load_image`)."""
    image_urls = [p.image_url.url for m in messages if isinstance(m.content, list)
                  for p in m.content if p.type == "image_url"]
    if len(image_urls) > settings.max_images:
        raise APIError(400, "too_many_images",
                       f"the request has {len(image_urls)} images; this server accepts at most {settings.max_images}",
                       param="messages")
    converted = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None:
            parts = []
        elif isinstance(m.content, str):
            parts = [{"type": "text", "text": m.content}]
        else:
            parts = [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image"} for p in m.content]
        converted.append({"role": role, "content": parts})
    if not any(m["role"] == "user" for m in converted):
        raise APIError(400, "invalid_messages", "the conversation needs at least one user message", param="messages")
    image = await load_image(image_urls[0], settings, fetched) if image_urls else None
    return image, converted


def _overrides(options, engine: Engine) -> PolicyOverrides | None:
    if options is None:
        return None
    try:
        overrides = PolicyOverrides.from_dict(options.model_dump())
        engine.policy.check_overrides(overrides)
    except PolicyOverrideError as err:
        raise APIError(403, "override_not_permitted", str(err), param="safety") from None
    return overrides


def _check_model(name: str | None, settings: ServerSettings) -> None:
    if name is not None and name != settings.model_id:
        raise APIError(404, "model_not_found", f"the model {name!r} does not exist; this server serves {settings.model_id!r}",
                       param="model")


def _generation(req: ChatCompletionRequest, settings: ServerSettings) -> dict:
    max_tokens = req.max_completion_tokens or req.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, "max_tokens_exceeded",
                       f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}", param=param)
    if req.n not in (None, 1):
        raise APIError(400, "unsupported_parameter", f"n={req.n} is not supported; use n=1", param="n")
    generation = {"max_new_tokens": max_tokens, "do_sample": False}
    if req.temperature:  # omitted or 0: greedy, so answers are reproducible
        generation.update(do_sample=True, temperature=req.temperature)
        if req.top_p is not None:
            generation["top_p"] = req.top_p
    return generation


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "invalid_stop", "stop takes up to 4 non-empty strings", param="stop")
    return stops


def _usage(result) -> dict:
    """OpenAI's ``usage`` of a guarded result (its tokens count what was returned)."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _model_card(settings: ServerSettings) -> dict:
    return {"id": settings.model_id, "object": "model", "created": _STARTED, "owned_by": "safevlm"}


async def _load_field_image(url: str, settings: ServerSettings, field: str):
    """:func:`load_image`, with errors naming the request field that held the image."""
    try:
        return await load_image(url, settings)
    except APIError as err:
        err.param = field
        raise


def _validation_api_error(err: RequestValidationError) -> APIError:
    """A 400 for a body FastAPI could not parse or validate: the JSON syntax error with its
    line and column, a body that is not a JSON object, or the first field error (with its
    dotted path as ``param``)."""
    errors = err.errors()
    first = errors[0] if errors else {}
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        doc, pos = err.body, loc[-1] if loc else None  # FastAPI gives the text and the character offset
        if isinstance(doc, bytes):
            doc = doc.decode("utf-8", "replace")
        if isinstance(doc, str) and isinstance(pos, int):  # 1-based line and column, as json's own errors
            line, column = doc.count("\n", 0, pos) + 1, pos - doc.rfind("\n", 0, pos)
            reason += f" at line {line} column {column}"
        return APIError(400, "invalid_json", f"request body is not valid JSON: {reason}")
    if loc == ("body",):
        if kind == "missing":
            return APIError(400, "invalid_json", "the request body is empty; send a JSON object")
        return APIError(400, "invalid_request",
                        "the request body must be a JSON object (sent with content-type: application/json)")
    path = ".".join(str(x) for x in loc if x != "body")
    message = f"{path}: {first.get('msg', 'invalid request')}" if path else first.get("msg", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(400, "invalid_request", message, param=path or None)


def _safety_field(result_or_decision, policy_name: str) -> dict:
    """The ``safety`` field: the policy's decision (the refusal text is the answer itself)."""
    decision = getattr(result_or_decision, "decision", None) or result_or_decision
    d = decision.to_dict()
    d.pop("refusal", None)
    return {"policy": policy_name, **d}


_FINISH = {"stop": "stop", "length": "length", "refused": "content_filter"}


def _completion_body(result, completion_id: str, created: int, settings: ServerSettings, policy_name: str) -> dict:
    """The ``chat.completion`` answer for a guarded result (stops already applied)."""
    text, finish = result.text, _FINISH.get(result.finish_reason, "stop")
    refused = result.action == "refuse"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": settings.model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": text if refused else None},
            "finish_reason": finish,
            "logprobs": None,
        }],
        "usage": _usage(result),
        "safety": _safety_field(result, policy_name),
    }


def _answered_job(result) -> Job:
    """A finished streaming job holding ``result`` (its decision, then its end), for answers made
    without the worker (a proxy's refusal): :func:`_stream` sends them as it sends any other."""
    job = Job("generate", None, None, events=AsyncChannel())
    job.events.put(("decision", result.decision))
    job.events.put(("done", result))
    job.future.set_result(result)
    return job


async def _run(engine: Engine, job: Job, settings: ServerSettings):
    try:
        return await engine.run(job, settings.request_timeout_s)
    except Overloaded as err:
        raise APIError(503, "server_overloaded", str(err)) from None
    except asyncio.TimeoutError:
        raise APIError(504, "timeout", f"the request did not finish within {settings.request_timeout_s} s") from None
    except ShuttingDown as err:
        raise APIError(503, "shutting_down", str(err)) from None
    except InputTooLong as err:
        raise APIError(400, "context_length_exceeded", str(err), param="messages") from None
    except PolicyOverrideError as err:
        raise APIError(403, "override_not_permitted", str(err), param="safety") from None
    except ValueError as err:
        raise APIError(400, "invalid_request", str(err)) from None


# -- the app ---------------------------------------------------------------------------------------------
def create_app(settings: ServerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The server app. Without ``engine``, the model, processor and policy named by ``settings``
    are loaded now (so a bad path fails before the server starts). An engine passed in is
    started with the app but not closed with it."""
    settings = settings or ServerSettings()
    metrics = engine.metrics if engine is not None else Metrics()
    owns_engine = engine is None
    upstream = Upstream.from_settings(settings, metrics) if settings.proxy else None  # the key's variable first
    if engine is None:
        engine = Engine.from_settings(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if upstream is not None:
            upstream.start()
        try:
            yield
        finally:
            if upstream is not None:
                await upstream.close()
            if owns_engine:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="safevlm", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible VLM server with the PSA-VLM safety guard.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.upstream = upstream
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        error = _validation_api_error(err)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(APIError(err.status_code, code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "server_error", "internal server error").body(), status_code=500)

    @app.get("/health")
    async def health(engine: Engine = Depends(get_engine), settings: ServerSettings = Depends(get_settings)):
        body = {"status": "ok", "mode": "proxy" if upstream is not None else "direct", "model": settings.model_id,
                "policy": engine.policy.name, "queue_depth": engine.queue_depth}
        if upstream is None:
            return body
        body["upstream"] = await upstream.probe()
        if not body["upstream"]["reachable"]:  # a load balancer takes this replica out until the engine is back
            return JSONResponse({**body, "status": "upstream_unreachable"}, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    @app.get("/v1/models")
    async def models(settings: ServerSettings = Depends(get_settings)):
        return {"object": "list", "data": [_model_card(settings)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, settings: ServerSettings = Depends(get_settings)):
        _check_model(model_id, settings)
        return _model_card(settings)

    @app.post("/v1/safety/classify")
    async def safety_classify(req: ClassifyRequest, engine: Engine = Depends(get_engine),
                              settings: ServerSettings = Depends(get_settings)):
        _check_model(req.model, settings)
        overrides = _overrides(req.safety, engine)
        if req.messages is not None:
            if req.image is not None or req.prompt is not None:
                raise APIError(400, "invalid_request", "give either messages or image/prompt, not both")
            image, prompt = await _convert_messages(req.messages, settings)
        else:
            if req.image is None and req.prompt is None:
                raise APIError(400, "invalid_request", "give an image, a prompt, or messages", param="image")
            if req.image is not None and settings.max_images < 1:
                raise APIError(400, "too_many_images", "this server accepts no images", param="image")
            image = await _load_field_image(req.image, settings, "image") if req.image is not None else None
            prompt = req.prompt
        decision = await _run(engine, Job("classify", image, prompt, overrides), settings)
        return {"id": f"safety-{uuid.uuid4().hex}", "object": "safety.classification", "created": int(time.time()),
                "model": settings.model_id, "safety": _safety_field(decision, engine.policy.name)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                               settings: ServerSettings = Depends(get_settings)):
        _check_model(req.model, settings)
        generation = _generation(req, settings)
        stops = _stops(req.stop)
        overrides = _overrides(req.safety, engine)
        fetched: dict[str, str] = {}
        image, messages = await _convert_messages(req.messages, settings, fetched)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if upstream is not None:
            decision = await _run(engine, Job("classify", image, messages, overrides), settings)
            if decision.action == "refuse":  # answered here: the upstream never sees it
                result = GuardedResult.from_decision(decision, decision.refusal)
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    return StreamingResponse(
                        _stream(_answered_job(result), engine, settings, completion_id, created, stops, include_usage),
                        media_type="text/event-stream", headers={"cache-control": "no-cache"})
                return _completion_body(result, completion_id, created, settings, engine.policy.name)
            return await _forward(request, req, decision, upstream, engine, settings, fetched)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            job = Job("generate", image, messages, overrides, generation, stops=stops, events=AsyncChannel())
            try:
                engine.submit(job)
            except Overloaded as err:
                raise APIError(503, "server_overloaded", str(err)) from None
            return StreamingResponse(
                _stream(job, engine, settings, completion_id, created, stops, include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        result = await _run(engine, Job("generate", image, messages, overrides, generation, stops=stops), settings)
        return _completion_body(result, completion_id, created, settings, engine.policy.name)

    return app


async def _forward(request: Request, req: ChatCompletionRequest, decision, upstream: Upstream, engine: Engine,
                   settings: ServerSettings, fetched: dict[str, str]):
    """Guard proxy: send an allowed or hinted request upstream and relay its answer with the
    ``safety`` field. The client's own JSON goes (every parameter it sent, its image URLs
    unchanged), with the hint inserted as the policy says."""
    body = json.loads(await request.body())  # FastAPI already read and validated it: this is the cached copy
    forwarded = forward_body(body, model=upstream.model, hint=decision.hint if decision.action == "hint" else None,
                             hint_position=engine.policy.hint_position, default_max_tokens=settings.default_max_tokens,
                             image_urls=fetched)
    safety = _safety_field(decision, engine.policy.name)
    if req.stream:
        deadline = time.monotonic() + settings.request_timeout_s
        response = await upstream.open_stream(forwarded)  # an upstream error is an HTTP error, before any event
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            upstream.relay(response, model_id=settings.model_id, safety=safety, include_usage=include_usage,
                           deadline=deadline),
            media_type="text/event-stream", headers={"cache-control": "no-cache"})
    answer = await upstream.complete(forwarded)
    return {**answer, "model": settings.model_id, "safety": safety}


async def _stream(job: Job, engine: Engine, settings: ServerSettings, completion_id: str, created: int,
                  stops: tuple[str, ...], include_usage: bool):
    """Server-sent events: a first chunk with the role and the safety decision, content deltas,
    a last chunk with the finish reason (and usage when asked), then ``[DONE]``.

    The joined deltas equal the plain answer exactly: that answer has no leading or trailing
    whitespace, so leading whitespace is never sent and trailing whitespace is held until more
    text follows; the engine's final text (stop strings applied) completes the stream."""
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": settings.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    deadline = time.monotonic() + settings.request_timeout_s
    full, sent = "", ""  # raw text received so far, text already sent
    hold = max((len(s) for s in stops), default=1) - 1  # held back: it might start a stop string
    stopped = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                job.cancel.set()
                yield f"data: {json.dumps(APIError(504, 'timeout', 'the request timed out').body())}\n\n"
                return
            try:
                kind, value = await job.events.get(remaining)
            except asyncio.TimeoutError:
                continue
            if kind == "decision":
                yield chunk({"role": "assistant", "content": ""}, safety=_safety_field(value, engine.policy.name))
                if value.action == "refuse":
                    yield chunk({"content": value.refusal, "refusal": value.refusal})
            elif kind == "delta" and not stopped:
                full += value
                text, stopped = cut_at_stop(full.lstrip(), stops)
                if stopped:
                    job.cancel.set()  # the client has all it asked for: stop generating
                else:
                    text = text[:len(text) - hold].rstrip()
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            elif kind == "done":
                result = value
                if result.action != "refuse":
                    if result.text.startswith(sent):
                        if len(result.text) > len(sent):
                            yield chunk({"content": result.text[len(sent):]})
                    else:  # never expected: incremental and whole decoding disagree
                        logger.warning("the %d characters streamed are not a prefix of the %d-character answer",
                                       len(sent), len(result.text))
                finish = "stop" if stopped else _FINISH.get(result.finish_reason, "stop")
                yield chunk({}, finish)
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": settings.model_id, "choices": [], "usage": _usage(result)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                error = value if isinstance(value, APIError) else _as_api_error(value)
                yield f"data: {json.dumps(error.body())}\n\n"
                return
    finally:
        if not job.future.done():
            job.cancel.set()


def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, InputTooLong):
        return APIError(400, "context_length_exceeded", str(err))
    if isinstance(err, ShuttingDown):
        return APIError(503, "shutting_down", str(err))
    if isinstance(err, ValueError):
        return APIError(400, "invalid_request", str(err))
    logger.error("stream failed: %s", err)
    return APIError(500, "server_error", "internal server error")


def _version() -> str:
    from safevlm import __version__

    return __version__


_STARTED = int(time.time())


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0, log_level: str = "warning"):
    """Serve ``app`` with uvicorn in a background thread (tests, benchmarks, notebooks); yields
    its base URL (``port=0``: a free port; a given port can be bound again after a restart).
    The server stops when the block ends."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may bind the same port again
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the server on {host} did not start within {timeout:g} s")
        time.sleep(0.02)
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def run_server(settings: ServerSettings) -> None:
    """Load the model and serve until interrupted (uvicorn)."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key_value():
        logger.warning("serving on %s without an API key: anyone who can reach it can use the model", settings.host)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


__all__ = ["GatewayMiddleware", "api_key_error", "create_app", "get_engine", "get_settings", "run_server",
           "serve_in_thread"]
