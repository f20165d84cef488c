"""Prometheus metrics (one registry per app) and the JSON log line of each finished request.

Latencies are measured on the server's side of the engine: from the moment a request
was received to its first and last outputs, so they include queueing in the engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kiln.runtime.request import RequestOutput

request_log = logging.getLogger("kiln.serve.requests")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5, 1.0, 2.0)

# engine.stats() key -> (metric name, help, kind)
_ENGINE_GAUGES = {
    "num_running": ("kiln_num_requests_running", "Requests the engine is running", "gauge"),
    "num_waiting": ("kiln_num_requests_waiting", "Requests waiting for the engine", "gauge"),
    "kv_cache_usage": ("kiln_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                       "gauge"),
    "kv_blocks_used": ("kiln_kv_blocks_used", "KV cache blocks in use", "gauge"),
    "kv_blocks_total": ("kiln_kv_blocks_total", "KV cache blocks in all", "gauge"),
    "prefix_cache_hit_rate": ("kiln_prefix_cache_hit_rate",
                              "Fraction of looked-up prompt tokens found in the prefix cache",
                              "gauge"),
    "num_preemptions": ("kiln_num_preemptions", "Requests preempted since start", "counter"),
    "kernel_compiles_after_load": ("kiln_kernel_compiles_after_load",
                                   "Triton kernels compiled after the engine loaded (each "
                                   "stalled a step; the log names them)", "counter"),
    "kernel_compile_stall_seconds": ("kiln_kernel_compile_stall_seconds",
                                     "Seconds of those compiles", "counter"),
    # Speculative decoding (only with --speculative-config).
    "spec_num_draft_tokens": ("kiln_spec_draft_tokens", "Draft tokens proposed", "counter"),
    "spec_num_accepted_tokens": ("kiln_spec_accepted_tokens", "Draft tokens accepted",
                                 "counter"),
    "spec_acceptance_rate": ("kiln_spec_acceptance_rate",
                             "Fraction of draft tokens accepted since start", "gauge"),
    "spec_mean_accepted_length": ("kiln_spec_mean_accepted_length",
                                  "Tokens emitted per verify step since start", "gauge"),
}


class _EngineCollector:
    """Reads the engine's stats snapshot at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, help_text, kind) in _ENGINE_GAUGES.items():
            if key in stats:
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    name, help_text, value=float(stats[key]))
                yield family


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = registry = CollectorRegistry()
        self.in_flight = 0  # HTTP requests not yet answered in full (the drain waits on them)
        self.http_requests = Counter("kiln_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=registry)
        self.finished = Counter("kiln_requests_finished",
                                "Engine requests by how they ended (stop, length, abort, error)",
                                ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens processed",
                                     registry=registry)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated",
                                         registry=registry)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("kiln_time_per_output_token_seconds",
                              "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine_stats))  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, request_id: str, route: str) -> RequestTracker:
        return RequestTracker(self, request_id, route)


class RequestTracker:
    """Follows one API call (one or more engine requests) from receipt to its end."""

    def __init__(self, metrics: ServerMetrics, request_id: str, route: str) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.route = route
        self.started = time.perf_counter()
        self.first_token: dict[str, float] = {}
        self.last: dict[str, RequestOutput] = {}
        self.done = False

    def observe(self, output: RequestOutput) -> None:
        if output.request_id not in self.first_token and any(c.token_ids
                                                             for c in output.outputs):
            self.first_token[output.request_id] = time.perf_counter()
        self.last[output.request_id] = output

    def finish(self, status: str, error: str | None = None) -> None:
        """Record metrics and log one line; `status`: ok, aborted or error. Idempotent."""
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        m = self.metrics
        prompt_tokens = completion_tokens = 0
        finish_reasons = []
        # A choice that did not finish was cut short: by an error if the call failed
        # (the engine failed mid-answer), else aborted (a hang-up, a drain).
        unfinished = "error" if status == "error" else "abort"
        for request_id, output in self.last.items():
            for completion in output.outputs:  # one per choice (n > 1)
                reason = completion.finish_reason or unfinished
                finish_reasons.append(reason)
                m.finished.labels(reason).inc()
                completion_tokens += len(completion.token_ids)
            prompt_tokens += len(output.prompt_token_ids)
            longest = max((len(c.token_ids) for c in output.outputs), default=0)
            first = self.first_token.get(request_id)
            if first is not None:
                m.ttft.observe(first - self.started)
                if longest > 1:
                    m.tpot.observe((now - first) / (longest - 1))
            if output.finished:
                m.e2e.observe(now - self.started)
        if status != "ok" and not self.last:  # failed or aborted before any output came
            m.finished.labels("error" if status == "error" else "abort").inc()
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        firsts = self.first_token.values()
        record = {
            "event": "request", "request_id": self.request_id, "route": self.route,
            "status": status, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "finish_reasons": finish_reasons,
            "ttft_ms": round((min(firsts) - self.started) * 1000, 2) if firsts else None,
            "latency_ms": round((now - self.started) * 1000, 2),
        }
        if error:
            record["error"] = error
        request_log.info(json.dumps(record))
