"""The guard proxy's other half: forward guarded chat requests to an OpenAI-compatible engine.

With ``--upstream http://host:port/v1`` the server loads only what the safety guard needs and
leaves generation to an engine that already serves the VLM (vLLM, SGLang, TGI). For each chat
request the app guards here (one vision pass, the policy) and then, for ``allow`` and ``hint``:

* :func:`forward_body` — the client's own JSON body (every OpenAI parameter it sent, the image
  URLs unchanged) with the upstream's model id, the hint inserted where the policy says
  (:func:`safevlm.guarded.insert_hint`, the code direct mode uses), ``max_tokens`` filled in
  from the server's default, usage asked for on streams, and the ``safety`` extension removed;
* :meth:`Upstream.complete` / :meth:`Upstream.open_stream` + :meth:`Upstream.relay` — the
  answer, plain or as server-sent events passed through chunk by chunk, with the model id the
  client asked for and the ``safety`` field added (on the first chunk of a stream);
* errors: an upstream that cannot be reached, answers 5xx or something that is not a chat
  completion gives HTTP 502 (``upstream_unavailable``, ``upstream_error``,
  ``upstream_invalid_response``); one that does not answer within ``upstream_timeout_s``
  gives 504 ``upstream_timeout``. A client mistake the upstream found (400, 413, 422, 429)
  is passed on with the upstream's message.

Nothing about a request outlives it here (the connection pool and the metrics aside), so any
number of replicas can run behind a load balancer. The upstream's API key is read from the
environment variable named by ``upstream_api_key_env`` and is never logged or shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from safevlm.serve.metrics import Metrics
from safevlm.serve.protocol import APIError

logger = logging.getLogger("safevlm.serve")

# upstream statuses that are the client's mistake (or its rate limit): passed on as they are
PASSED_ON_STATUSES = (400, 413, 422, 429)
HEALTH_TIMEOUT_S = 5.0  # the longest /health waits for the upstream's /models


# -- the forwarded request ----------------------------------------------------------------------------------
def hinted_messages(messages: list[dict], hint: str, position: str) -> list[dict]:
    """The client's OpenAI messages with ``hint`` inserted as :func:`safevlm.guarded.insert_hint`
    places it in direct mode: appended to (or as) the system message, or to the last user turn's
    text. String contents become one text part and ``developer`` turns ``system`` ones (as the
    guard read them); image parts are kept as they came."""
    from safevlm.guarded import insert_hint

    normalised = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if content is None:
            message["content"] = []
        elif isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        else:
            message["content"] = [dict(part) for part in content]
        normalised.append(message)
    return insert_hint(normalised, hint, position)


def forward_body(body: dict, *, model: str, hint: str | None, hint_position: str, default_max_tokens: int,
                 image_urls: dict[str, str] | None = None) -> dict:
    """The JSON body sent upstream for a client's chat request ``body`` (not modified).

    ``model``: the upstream's model id. ``hint``: inserted at ``hint_position`` (None: the
    messages go as they came). ``max_tokens`` is set to ``default_max_tokens`` when the client
    gave neither ``max_tokens`` nor ``max_completion_tokens``; a stream always asks for the usage
    chunk (the proxy counts tokens from it and drops it unless the client asked too).
    ``image_urls`` replaces image URLs (an http(s) image the proxy fetched for the guard goes
    upstream as the data URL of the bytes the guard judged, so the engine cannot see another one).
    """
    out = {key: value for key, value in body.items() if key != "safety"}
    out["model"] = model
    if image_urls:
        out["messages"] = [_replace_image_urls(m, image_urls) for m in out["messages"]]
    if hint is not None:
        out["messages"] = hinted_messages(out["messages"], hint, hint_position)
    if out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
        out["max_tokens"] = default_max_tokens
    if out.get("stream"):
        out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
    return out


def _replace_image_urls(message: dict, urls: dict[str, str]) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url" and part.get("image_url", {}).get("url") in urls:
            part = copy.deepcopy(part)
            part["image_url"]["url"] = urls[part["image_url"]["url"]]
        parts.append(part)
    return {**message, "content": parts}


# -- the client -------------------------------------------------------------------------------------------------
@dataclass
class Upstream:
    """An OpenAI-compatible server that generates for the guard proxy.

    ``base_url`` ends with the API root (``http://host:8000/v1``); ``model`` is the model id
    sent to it; ``timeout_s`` bounds a plain answer, a stream's headers and each next chunk.
    Call :meth:`start` on the event loop that serves requests and :meth:`close` at shutdown.
    """

    base_url: str
    model: str
    timeout_s: float
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    max_connections: int = 256
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    _client: httpx.AsyncClient | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings, metrics: Metrics | None = None) -> Upstream:
        """The upstream named by :class:`~safevlm.serve.settings.ServerSettings`; reads the API
        key from the environment variable ``upstream_api_key_env`` (an error when it is unset)."""
        api_key = None
        if settings.upstream_api_key_env:
            api_key = os.environ.get(settings.upstream_api_key_env)
            if not api_key:
                raise ValueError(
                    f"upstream_api_key_env: the environment variable {settings.upstream_api_key_env} "
                    "is not set (or empty); export the upstream's API key there"
                )
        return cls(settings.upstream, settings.upstream_model or settings.model_id, settings.upstream_timeout_s,
                   api_key, settings.upstream_api_key_env, settings.max_queue, metrics or Metrics())

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=self.max_connections,
                                    max_keepalive_connections=min(self.max_connections, 64)),
                headers=self._headers(),
                follow_redirects=False,
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        self.start()
        return self._client

    def _headers(self) -> dict:
        headers = {"accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    # -- requests ---------------------------------------------------------------------------------------------
    async def complete(self, body: dict) -> dict:
        """The upstream's chat completion for ``body`` (no stream): a dict with ``choices``, or
        APIError 502 / 504 / the passed-on 4xx. The whole answer is bounded by ``timeout_s``."""
        start = time.perf_counter()
        try:
            response = await asyncio.wait_for(self.client.post(self._url("/chat/completions"), json=body),
                                              self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise self._failed("timeout", start, APIError(
                504, "upstream_timeout", f"the upstream did not answer within {self.timeout_s:g} s")) from None
        except httpx.HTTPError as err:
            raise self._failed("unreachable", start, _unreachable(err)) from None
        self._record(str(response.status_code), start)
        if response.status_code != 200:
            raise _status_error(response.status_code, response.content)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise _invalid(f"the upstream's answer is not a chat completion ({_snippet(response.content)})")
        self._count_usage(data.get("usage"))
        return data

    async def open_stream(self, body: dict) -> httpx.Response:
        """Send a streamed request and return the open response once its status is 200 (the
        caller relays it with :meth:`relay`, which closes it); APIError otherwise."""
        start = time.perf_counter()
        request = self.client.build_request("POST", self._url("/chat/completions"), json=body,
                                            headers={"accept": "text/event-stream"})
        try:
            response = await asyncio.wait_for(self.client.send(request, stream=True), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise self._failed("timeout", start, APIError(
                504, "upstream_timeout", f"the upstream did not start answering within {self.timeout_s:g} s")) from None
        except httpx.HTTPError as err:
            raise self._failed("unreachable", start, _unreachable(err)) from None
        if response.status_code != 200:
            try:
                content = await asyncio.wait_for(response.aread(), self.timeout_s)
            except (asyncio.TimeoutError, httpx.HTTPError):
                content = b""
            finally:
                await response.aclose()
            self._record(str(response.status_code), start)
            raise _status_error(response.status_code, content)
        response.extensions["safevlm_start"] = start
        return response

    async def relay(self, response: httpx.Response, *, model_id: str, safety: dict, include_usage: bool,
                    deadline: float) -> AsyncIterator[str]:
        """Server-sent events for the client from an open upstream stream, chunk by chunk: each
        ``data:`` chunk re-labelled with ``model_id``, the first one carrying ``safety``, the
        usage chunk kept only when the client asked for it (``include_usage``), then ``[DONE]``.
        A gap longer than ``timeout_s``, or the whole stream passing ``deadline``
        (``time.monotonic()``), ends it with a 504 error event; a broken or malformed stream
        with a 502 one. The upstream response is closed however the relay ends (a client that
        goes away closes it too, which stops the upstream's generation)."""
        start = response.extensions.get("safevlm_start", time.perf_counter())
        outcome = "200"
        first = True
        lines = response.aiter_lines()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome = "timeout"
                    yield _event(APIError(504, "timeout", "the request did not finish in time").body())
                    return
                try:
                    line = await asyncio.wait_for(anext(lines), min(self.timeout_s, remaining))
                except StopAsyncIteration:
                    outcome = "invalid_response"
                    yield _event(_invalid("the upstream closed the stream before [DONE]").body())
                    return
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    if deadline - time.monotonic() <= 0:
                        continue  # the overall deadline passed: answered above
                    outcome = "timeout"
                    yield _event(APIError(504, "upstream_timeout",
                                          f"the upstream sent nothing for {self.timeout_s:g} s").body())
                    return
                except httpx.HTTPError as err:
                    outcome = "unreachable"
                    yield _event(_unreachable(err, "the upstream stream broke").body())
                    return
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    yield "data: [DONE]\n\n"
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    chunk = None
                if not isinstance(chunk, dict):
                    outcome = "invalid_response"
                    yield _event(_invalid(f"the upstream sent a chunk that is not JSON ({payload[:80]!r})").body())
                    return
                if "error" in chunk:  # the upstream's own error event: passed on, it ends the stream
                    yield _event(chunk)
                    continue
                if "model" in chunk:
                    chunk["model"] = model_id
                if first:
                    chunk["safety"] = safety  # the decision comes before any token, as in direct mode
                    first = False
                usage = chunk.get("usage")
                if usage:
                    self._count_usage(usage)
                if not include_usage:
                    if usage and not chunk.get("choices"):
                        continue  # the usage chunk the proxy asked for, not the client
                    chunk.pop("usage", None)
                yield _event(chunk)
        finally:
            self._record(outcome, start)
            await response.aclose()
            with contextlib.suppress(Exception):
                await lines.aclose()

    async def probe(self) -> dict:
        """Whether the upstream answers ``GET /models`` (for ``/health``): ``reachable``, its
        HTTP ``status``, ``latency_ms``, the ``model`` id this proxy sends and whether the
        upstream lists it (``model_listed``), or the ``error``."""
        start = time.perf_counter()
        out = {"reachable": False, "model": self.model}
        try:
            response = await asyncio.wait_for(self.client.get(self._url("/models")), min(self.timeout_s, HEALTH_TIMEOUT_S))
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return {**out, "error": f"no answer within {min(self.timeout_s, HEALTH_TIMEOUT_S):g} s"}
        except httpx.HTTPError as err:
            return {**out, "error": f"cannot connect ({type(err).__name__})"}
        out.update(status=response.status_code, latency_ms=round(1000 * (time.perf_counter() - start), 1))
        if response.status_code != 200:
            return {**out, "error": f"GET /models answered HTTP {response.status_code}"}
        try:
            ids = [m.get("id") for m in response.json().get("data", [])]
        except (ValueError, AttributeError):
            return {**out, "error": "GET /models did not answer a model list"}
        return {**out, "reachable": True, "model_listed": self.model in ids}

    # -- helpers -------------------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.base_url + path

    def _record(self, outcome: str, start: float) -> None:
        self.metrics.upstream_requests.labels(outcome=outcome).inc()
        self.metrics.upstream_duration.observe(time.perf_counter() - start)

    def _failed(self, outcome: str, start: float, error: APIError) -> APIError:
        self._record(outcome, start)
        logger.warning("upstream request failed: %s", error.message)
        return error

    def _count_usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.metrics.prompt_tokens.inc(max(int(usage.get("prompt_tokens") or 0), 0))
            self.metrics.completion_tokens.inc(max(int(usage.get("completion_tokens") or 0), 0))


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _snippet(content: bytes, limit: int = 120) -> str:
    text = content[:limit].decode("utf-8", "replace").strip()
    return repr(text) + ("..." if len(content) > limit else "") if text else "empty body"


def _unreachable(err: httpx.HTTPError, what: str = "cannot reach the upstream") -> APIError:
    return APIError(502, "upstream_unavailable", f"{what} ({type(err).__name__})", type="server_error")


def _invalid(message: str) -> APIError:
    return APIError(502, "upstream_invalid_response", message, type="server_error")


def _status_error(status: int, content: bytes) -> APIError:
    """The error for an upstream answer with HTTP ``status``: a client mistake the upstream found
    is passed on (its message kept), anything else is the upstream's fault (502)."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    elif not isinstance(error, dict):  # older vLLM: {"object": "error", "message", "code": 400} at the top level
        error = payload if isinstance(payload, dict) and "message" in payload else {}
    message = error.get("message") if isinstance(error.get("message"), str) else None
    if status in PASSED_ON_STATUSES:
        code, param = error.get("code"), error.get("param")
        return APIError(status, code if isinstance(code, str) and code else "upstream_rejected",
                        f"the upstream rejected the request: {message or _snippet(content)}",
                        param=param if isinstance(param, str) else None)
    detail = f": {message}" if message else f" ({_snippet(content)})"
    return APIError(502, "upstream_error", f"the upstream answered HTTP {status}{detail}", type="server_error")


__all__ = ["HEALTH_TIMEOUT_S", "PASSED_ON_STATUSES", "Upstream", "forward_body", "hinted_messages"]
