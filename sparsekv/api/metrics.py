"""Prometheus metrics with vLLM's names under the `sparsekv:` prefix, so dashboards carry over.

Latencies are measured here, in the front end, from the time the API received the request
(as vLLM does); engine-wide gauges and counters are read from the engine's stats at scrape time.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sparsekv.engine.outputs import RequestOutput

PREFIX = "sparsekv:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class EngineStatsCollector(Collector):
    """Gauges and cumulative counters straight from the engine's latest stats snapshot."""

    def __init__(self, stats: Callable[[], object], model_name: str) -> None:
        self._stats, self._model = stats, model_name

    def collect(self):
        s = self._stats()
        for name, doc, value in (("num_requests_running", "Requests in model execution batches.", s.num_running),
                                 ("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
                                 ("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", s.kv_cache_usage)):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self._model], value)
            yield g
        for name, doc, value in (("prefix_cache_queries", "Prefix-cache queries, in tokens.", s.prefix_cache_queries),
                                 ("prefix_cache_hits", "Prefix-cache hits, in tokens.", s.prefix_cache_hits),
                                 ("num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([self._model], value)
            yield c


class Metrics:
    """One app's metrics in its own registry (several apps may live in one process)."""

    def __init__(self, model_name: str, stats: Callable[[], object]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", label,
                              registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens.", label,
                             registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             label, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefill tokens processed.", label, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests.", label + ["finished_reason"],
                               registry=r)
        self.attended = Histogram(PREFIX + "attended_fraction", "Fraction of causal (query, key) pairs "
                                  "attended per request.", label + ["phase"], registry=r, buckets=FRACTION_BUCKETS)
        self.kv_bytes = Histogram(PREFIX + "kv_bytes_fraction", "KV bytes kept relative to dense, per request.",
                                  label, registry=r, buckets=FRACTION_BUCKETS)
        r.register(EngineStatsCollector(stats, model_name))

    def tracker(self, num_requests: int, n: int) -> "RequestTracker":
        return RequestTracker(self, num_requests, n)


class RequestTracker:
    """Latency bookkeeping for the engine requests of one API call, fed every output."""

    def __init__(self, metrics: Metrics, num_requests: int, n: int) -> None:
        self.m, self.n = metrics, n
        self.arrival = time.monotonic()
        self.last_token: list[float | None] = [None] * num_requests
        self.num_tokens = [0] * num_requests

    def observe(self, index: int, out: RequestOutput) -> None:
        now, name = time.monotonic(), self.m.model_name
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if tokens > self.num_tokens[index]:
            last = self.last_token[index]
            if last is None:
                self.m.ttft.labels(name).observe(now - self.arrival)
            else:
                self.m.itl.labels(name).observe(now - last)
            self.last_token[index], self.num_tokens[index] = now, tokens
        if not out.finished:
            return
        self.m.e2e.labels(name).observe(now - self.arrival)
        self.m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        self.m.generation_tokens.labels(name).inc(tokens)
        for o in out.outputs:
            self.m.success.labels(name, o.finish_reason or "abort").inc()
        stats = out.sparsity.as_dict()
        for phase in ("prefill", "decode"):
            if stats[f"{phase}_attended_fraction"] is not None:
                self.m.attended.labels(name, phase).observe(stats[f"{phase}_attended_fraction"])
        if stats["kv_bytes_fraction"] is not None:
            self.m.kv_bytes.labels(name).observe(stats["kv_bytes_fraction"])

    def aborted(self, num_requests: int) -> None:
        """Requests dropped before they finished (client gone): counted per choice, as finished ones."""
        if num_requests:
            self.m.success.labels(self.m.model_name, "abort").inc(num_requests * self.n)
