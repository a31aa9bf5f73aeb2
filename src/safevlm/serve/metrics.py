"""The server's Prometheus metrics, kept with ``prometheus_client``.

Every :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-wide default), so
two apps in one process, or two tests, never share counts.

Counters: requests by endpoint and status, safety actions by action and risk type, head
errors, prompt and completion tokens (as reported in ``usage``), and in proxy mode upstream
requests by outcome. Histograms: request latency by endpoint, requests per model call,
upstream latency. Gauge: queue depth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's counters, histograms and gauge in one registry (thread-safe, as
    ``prometheus_client`` is). Update them directly, e.g.
    ``metrics.requests.labels(endpoint="/v1/models", status="200").inc()``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("safevlm_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("safevlm_request_duration_seconds",
                                          "HTTP request latency (until the last byte is sent).", ["endpoint"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.safety_actions = Counter("safevlm_safety_actions_total", "Policy decisions by action and risk type.",
                                      ["action", "risk_type"], registry=r)
        self.safety_head_errors = Counter("safevlm_safety_head_errors_total",
                                          "Inputs decided by the fail-closed path (head error or NaN).", registry=r)
        self.prompt_tokens = Counter("safevlm_prompt_tokens_total",
                                     "Prompt tokens (image tokens included) of generated requests.", registry=r)
        self.completion_tokens = Counter("safevlm_completion_tokens_total",
                                         "Completion tokens returned (as counted in usage).", registry=r)
        self.batch_size = Histogram("safevlm_batch_size", "Requests per model call.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("safevlm_queue_depth", "Requests waiting for the model.", registry=r)
        # guard proxy only: what the upstream engine answered
        self.upstream_requests = Counter("safevlm_upstream_requests_total",
                                         "Requests forwarded to the upstream, by its HTTP status or by "
                                         "timeout / unreachable / invalid_response.", ["outcome"], registry=r)
        self.upstream_duration = Histogram("safevlm_upstream_duration_seconds",
                                           "Upstream latency (until its last byte).", buckets=LATENCY_BUCKETS,
                                           registry=r)

    def count_decision(self, decision) -> None:
        """One policy decision (a :class:`~safevlm.policy.Decision` or a guarded result)."""
        self.safety_actions.labels(action=decision.action, risk_type=decision.decided_by or decision.risk_type).inc()
        if decision.error:
            self.safety_head_errors.inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of the exposition format the ``Accept`` header asks for:
        OpenMetrics when asked, the Prometheus text format otherwise."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]
