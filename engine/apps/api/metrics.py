"""Prometheus metrics of ``corolla api``: requests, tokens, latency, errors (one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ApiMetrics:
    """The counters one app updates; ``render()`` is the text served at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corolla_api_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "corolla_api_errors",
            "Requests that failed, by error code (also those that failed mid-stream)",
            ["code"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "corolla_api_tokens", "Tokens processed, by kind (prompt, completion)", ["kind"], registry=self.registry
        )
        self.latency = Histogram(
            "corolla_api_request_seconds",
            "Seconds from request to last byte, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "corolla_api_first_token_seconds",
            "Seconds from request to the first streamed text",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "corolla_api_requests_in_progress", "Generations running right now", registry=self.registry
        )
        self.disconnects = Counter(
            "corolla_api_client_disconnects",
            "Streams whose client went away before the end (their sessions were closed)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
