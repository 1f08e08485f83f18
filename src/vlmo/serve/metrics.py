"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

Each app gets a private `CollectorRegistry`, not prometheus-client's global one: two apps in one process (tests,
a host application that embeds the server) then count separately, and no metric is registered twice.

    vlmo_requests_total{endpoint, status}        answered requests
    vlmo_prompt_tokens_total                     prompt tokens of finished generations (image tokens included)
    vlmo_completion_tokens_total                 generated tokens
    vlmo_queue_depth                             requests waiting for a batch slot (read at scrape time)
    vlmo_running_batch_size                      rows in the running batch (read at scrape time)
    vlmo_time_to_first_token_seconds             from accepted to first token, histogram
    vlmo_request_latency_seconds{endpoint}       from the request's arrival to its last byte, histogram
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a cached tiny-model answer takes milliseconds, a long 3B answer on a CPU minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The counters, gauges and histograms of one app; `waiting` and `running` are read at each scrape."""

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmo_requests", "Answered HTTP requests.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("vlmo_prompt_tokens", "Prompt tokens, image tokens included.", registry=r)
        self.completion_tokens = Counter("vlmo_completion_tokens", "Generated tokens.", registry=r)
        Gauge("vlmo_queue_depth", "Requests waiting for a batch slot.", registry=r).set_function(waiting)
        Gauge("vlmo_running_batch_size", "Rows in the running batch.", registry=r).set_function(running)
        self.time_to_first_token = Histogram(
            "vlmo_time_to_first_token_seconds",
            "From a request's acceptance to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "vlmo_request_latency_seconds",
            "From a request's arrival to the end of its answer.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def generated(self, prompt_tokens: int, completion_tokens: int, seconds_to_first_token: float) -> None:
        """Count one finished generation."""
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.time_to_first_token.observe(seconds_to_first_token)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["LATENCY_BUCKETS", "ServerMetrics"]
