"""Prometheus text metrics, kept in-process (no client library needed).

Counters: requests by endpoint and status, safety actions by action and risk type, head
errors, prompt and completion tokens. Histograms: request latency by endpoint, model batch
size. Gauge: queue depth. ``render()`` gives the text exposition format (version 0.0.4).
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

_DEFINITIONS = {
    "safevlm_requests_total": ("counter", "HTTP requests by endpoint and status code."),
    "safevlm_request_duration_seconds": ("histogram", "HTTP request latency (until the last byte is sent)."),
    "safevlm_safety_actions_total": ("counter", "Policy decisions by action and risk type."),
    "safevlm_safety_head_errors_total": ("counter", "Inputs decided by the fail-closed path (head error or NaN)."),
    "safevlm_prompt_tokens_total": ("counter", "Prompt tokens (image tokens included) of generated requests."),
    "safevlm_completion_tokens_total": ("counter", "Generated tokens."),
    "safevlm_batch_size": ("histogram", "Requests per model call."),
    "safevlm_queue_depth": ("gauge", "Requests waiting for the model."),
}


def _labels(labels: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(labels: tuple, extra: tuple = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    """Thread-safe counters, histograms and gauges, rendered in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {name: {} for name in _DEFINITIONS}
        self._histograms: dict[str, dict[tuple, list]] = {}
        self._buckets = {"safevlm_request_duration_seconds": LATENCY_BUCKETS, "safevlm_batch_size": BATCH_BUCKETS}

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = _labels(labels)
        with self._lock:
            table = self._values[name]
            table[key] = table.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = self._buckets[name]
        key = _labels(labels)
        with self._lock:
            hist = self._histograms.setdefault(name, {}).setdefault(key, [[0] * len(buckets), 0, 0.0])
            index = bisect.bisect_left(buckets, value)
            if index < len(buckets):
                hist[0][index] += 1
            hist[1] += 1
            hist[2] += value

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (0 when never set)."""
        with self._lock:
            return self._values[name].get(_labels(labels), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in _DEFINITIONS.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    buckets = self._buckets[name]
                    for key, (counts, count, total) in sorted(self._histograms.get(name, {}).items()):
                        cumulative = 0
                        for bound, c in zip(buckets, counts):
                            cumulative += c
                            lines.append(f"{name}_bucket{_fmt_labels(key, (('le', _num(bound)),))} {cumulative}")
                        lines.append(f"{name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {count}")
                        lines.append(f"{name}_count{_fmt_labels(key)} {count}")
                        lines.append(f"{name}_sum{_fmt_labels(key)} {_num(total)}")
                else:
                    values = self._values[name]
                    if not values and kind in ("counter", "gauge") and name in (
                        "safevlm_safety_head_errors_total", "safevlm_queue_depth",
                        "safevlm_prompt_tokens_total", "safevlm_completion_tokens_total",
                    ):
                        lines.append(f"{name} 0")
                    for key, v in sorted(values.items()):
                        lines.append(f"{name}{_fmt_labels(key)} {_num(v)}")
        return "\n".join(lines) + "\n"


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]
