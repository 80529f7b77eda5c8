"""Prometheus metrics of one server (a registry of its own: no global state)."""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The engine's KV pool and prefix cache (`Engine.kv_stats` key -> a series: name, help, kind).
# Counters render with the suffix _total; pages_used + pages_free == pages, and cached pages
# are among either (held by a request, or evictable).
KV_SERIES = {
    "pages": ("grok_kv_pages", "Pages of the KV cache's pool", GaugeMetricFamily),
    "page_size": ("grok_kv_page_size_tokens", "Tokens a page of the KV cache holds",
                  GaugeMetricFamily),
    "pages_used": ("grok_kv_pages_used", "KV pages held by requests", GaugeMetricFamily),
    "pages_free": ("grok_kv_pages_free", "KV pages that can be handed out now (free, or cached "
                   "and held by no request)", GaugeMetricFamily),
    "pages_cached": ("grok_kv_pages_cached", "KV pages the prefix cache can find (held or not)",
                     GaugeMetricFamily),
    "hit_rate": ("grok_prefix_cache_hit_rate", "Share of the prompt tokens looked up that the "
                 "prefix cache served", GaugeMetricFamily),
    "prompt_tokens_queried": ("grok_prefix_cache_queried_tokens", "Prompt tokens looked up in "
                              "the prefix cache (one lookup per engine request)",
                              CounterMetricFamily),
    "prompt_tokens_cached": ("grok_prefix_cache_hit_tokens", "Prompt tokens the prefix cache "
                             "served (their prefill skipped)", CounterMetricFamily),
    "evictions": ("grok_kv_evictions", "Cached KV pages evicted for new content",
                  CounterMetricFamily),
    "preemptions": ("grok_preemptions", "Requests preempted (their pages given back, recomputed "
                    "later) when the KV pool ran out", CounterMetricFamily),
}


class KVCollector:
    """KV_SERIES, read from the engine when scraped: one `kv_stats()` a scrape, so the series
    agree with each other."""

    def __init__(self, engine: Any):
        self.engine = engine

    def describe(self) -> list[Metric]:
        # the registry's check of names at registration: no call to the engine
        return [kind(name, text) for name, text, kind in KV_SERIES.values()]

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.kv_stats()
        for key, (name, text, kind) in KV_SERIES.items():
            yield kind(name, text, value=stats[key])


class Metrics:
    """Requests by endpoint and status, prompt and generated tokens, the engine's queue depth,
    slots in use and KV cache (read when scraped), time to first token and time per output
    token."""

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
        r.register(KVCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
