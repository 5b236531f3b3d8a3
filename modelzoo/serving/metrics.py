"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own.

``modelzoo_requests_total{endpoint,status}``, ``modelzoo_prompt_tokens_total``,
``modelzoo_generation_tokens_total``, histograms ``modelzoo_time_to_first_token_seconds``,
``modelzoo_time_per_output_token_seconds`` and ``modelzoo_request_latency_seconds``, gauges
``modelzoo_queue_length`` (waiting requests) and ``modelzoo_running_requests`` (occupied slots).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The server's counters; ``waiting``/``running`` are read at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("modelzoo_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("modelzoo_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("modelzoo_generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("modelzoo_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("modelzoo_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=registry)
        self.latency = Histogram("modelzoo_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        Gauge("modelzoo_queue_length", "Requests waiting for a slot", registry=registry).set_function(waiting)
        Gauge("modelzoo_running_requests", "Requests in the cache's slots", registry=registry).set_function(running)

    def finished(self, prompt_tokens: int, new_tokens: int, ttft_s: float | None, latency_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)
        self.latency.observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if new_tokens > 1:
                self.tpot.observe((latency_s - ttft_s) / (new_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
