"""Prometheus metrics of one server (a registry of its own: no global state)."""
from __future__ import annotations

from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Requests by endpoint and status, prompt and generated tokens, the engine's queue depth
    and slots in use (read when scraped), time to first token and time per output token."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("grok_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("grok_prompt_tokens", "Prompt tokens of the completions "
                                     "submitted to the engine", registry=r)
        self.generated_tokens = Counter("grok_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("grok_queue_depth", "Requests waiting for a slot", registry=r)
        self.queue_depth.set_function(lambda: len(engine.waiting))
        self.slots_in_use = Gauge("grok_slots_in_use", "Engine slots holding a request",
                                  registry=r)
        self.slots_in_use.set_function(lambda: sum(s is not None for s in list(engine.slots)))
        self.ttft = Histogram("grok_time_to_first_token_seconds", "Time from submission to a "
                              "request's first token", buckets=_TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("grok_time_per_output_token_seconds", "Time between a "
                                       "request's successive tokens", buckets=_TOKEN_BUCKETS,
                                       registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
