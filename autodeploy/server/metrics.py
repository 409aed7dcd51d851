"""Prometheus metrics of a running server (``GET /metrics``), read from engine state.

Counters and histograms are updated by the engine thread as tokens come out (time to first token,
time per output token, end-to-end latency, tokens in and out, finished requests by reason,
speculative drafts proposed and accepted from each request's ``spec`` counts); gauges (requests
running and waiting, slots and KV pages in use; with prefix caching, prompt tokens looked up and
reused, the hit rate and the snapshots kept) are read from the engine when scraped. Each server
has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "autodeploy"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 30.0, 60.0)


class ServerMetrics:
    """The metrics of one engine loop (``loop``: reads ``loop.engine`` at scrape time)."""

    def __init__(self, loop: Any):
        self.loop = loop
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(f"{PREFIX}_requests_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Time between tokens after the first (per token when a step brings several)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "From arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.spec_drafts = Counter(f"{PREFIX}_spec_decode_draft_tokens", "Draft tokens proposed", registry=r)
        self.spec_accepted = Counter(f"{PREFIX}_spec_decode_accepted_tokens", "Draft tokens accepted", registry=r)
        r.register(_EngineGauges(loop))

    def on_arrival(self, prompt_len: int) -> None:
        self.prompt_tokens.inc(prompt_len)

    def on_tokens(self, tracked: Any, count: int, now: float) -> None:
        self.generation_tokens.inc(count)
        if tracked.last_token_time is None:
            self.ttft.observe(now - tracked.arrival)
            count -= 1
        if count > 0:
            per_token = (now - (tracked.last_token_time or now)) / count
            for _ in range(count):
                self.tpot.observe(per_token)
        tracked.last_token_time = now

    def on_finish(self, tracked: Any, req: Any, reason: str | None, now: float) -> None:
        self.requests.labels(finish_reason=reason or "unknown").inc()
        self.e2e.observe(now - tracked.arrival)
        spec = getattr(req, "spec", None)
        if spec is not None and spec.num_draft_tokens:
            self.spec_drafts.inc(spec.num_draft_tokens)
            self.spec_accepted.inc(spec.num_accepted_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """Requests running and waiting, slots and pages in use: read from the engine at scrape time."""

    def __init__(self, loop: Any):
        self.loop = loop

    def describe(self):
        return []

    def collect(self):
        engine = self.loop.engine
        yield _gauge("num_requests_running", "Requests in the running batch", len(engine.running))
        yield _gauge("num_requests_waiting", "Requests waiting for a slot or KV pages", len(engine.waiting))
        pools = engine.pools
        for name, pool in (("kv_pages", pools.pages), ("slots", pools.slots)):
            yield _gauge(f"{name}_used", f"{name} in use", pool.num_used)
            yield _gauge(f"{name}_total", f"{name} in the pool", pool.capacity)
        pages = pools.pages
        yield _gauge("kv_cache_usage_ratio", "Fraction of full-attention KV pages in use (slots when the model "
                     "has no full attention)", (pages.num_used / pages.capacity) if pages.capacity
                     else pools.slots.num_used / max(pools.slots.capacity, 1))
        yield _gauge("engine_healthy", "1 while the engine loop runs", 1.0 if self.loop.alive else 0.0)
        prefix = getattr(engine, "prefix", None)
        if prefix is not None:
            stats = prefix.stats
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=stats.num_prompt_tokens)
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Prompt tokens reused from the prefix cache",
                                      value=stats.num_cached_tokens)
            yield _gauge("prefix_cache_hit_rate", "Fraction of prompt tokens reused from the prefix cache",
                         stats.hit_rate)
            yield _gauge("prefix_cache_pages", "Full-attention pages holding a cached prefix", pages.num_cached)
            snaps = pools.snapshots
            yield _gauge("prefix_snapshots_used", "Prefix snapshots kept", len(snaps) if snaps is not None else 0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
