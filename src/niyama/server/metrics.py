"""Prometheus metrics, named like vLLM's with the ``niyama:`` prefix, in a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from niyama.engine.core import IterationStats
from niyama.request import Request

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                    640.0, 1280.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2552)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"niyama:{name}", doc, list(labels), registry=r, buckets=buckets).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"niyama:{name}", doc, list(labels), registry=r).labels(**labels)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token")
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled")
        self.iteration = hist("iteration_time_seconds", "Execution time of one engine iteration")
        self.chunk = hist("iteration_prefill_tokens", "Prefill tokens (chunk size) per iteration", _TOKEN_BUCKETS)
        self.batch_tokens = hist("iteration_tokens", "Tokens (prefill + decode) per iteration", _TOKEN_BUCKETS)
        self.running = gauge("num_requests_running", "Requests holding KV blocks")
        self.waiting = gauge("num_requests_waiting", "Requests queued, not relegated")
        self.relegated = gauge("num_requests_relegated", "Requests relegated (cannot meet their deadline)")
        self.batch_time_scale = gauge("batch_time_scale", "Measured / profiled batch time over recent "
                                      "iterations; the scheduler's predictor is the profile times this")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)")
        self.preemptions = Counter("niyama:num_preemptions", "Recompute preemptions", list(labels),
                                   registry=r).labels(**labels)
        self.requests = Counter("niyama:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.slo = Counter("niyama:request_slo", "Finished requests by QoS class and SLO outcome",
                           ["model_name", "qos_class", "outcome"], registry=r)
        self.rejected = Counter("niyama:request_rejected", "Requests refused with HTTP 429 (queue full), by QoS "
                                "class", ["model_name", "qos_class"], registry=r)
        self._labels = labels
        self._preemptions_seen = 0

    def observe_iteration(self, stats: IterationStats) -> None:
        self.iteration.observe(stats.seconds)
        self.chunk.observe(stats.num_prefill_tokens)
        self.batch_tokens.observe(stats.num_prefill_tokens + stats.num_decode_tokens)
        if stats.batch_time_scale is not None:
            self.batch_time_scale.set(stats.batch_time_scale)

    def observe_state(self, running: int, waiting: int, relegated: int, kv_usage: float,
                      preemptions: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.relegated.set(relegated)
        self.kv_usage.set(kv_usage)
        if preemptions > self._preemptions_seen:
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions

    def observe_token(self, request: Request, previous_token_time: float | None) -> None:
        """Called after a request's newest token was appended."""
        if request.num_output_tokens == 1 and request.ttft is not None:
            self.ttft.observe(request.ttft)
        elif previous_token_time is not None and request.last_token_time is not None:
            self.itl.observe(request.last_token_time - previous_token_time)

    def observe_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else "abort"
        self.requests.labels(finished_reason=reason, **self._labels).inc()
        if request.queue_time is not None:
            self.queue.observe(request.queue_time)
        if request.ttlt is not None and request.first_token_time is not None:
            self.e2e.observe(request.ttlt)
        if request.slo_met is not None and reason != "abort":
            outcome = "met" if request.slo_met else "violated"
            self.slo.labels(qos_class=request.qos.name, outcome=outcome, **self._labels).inc()

    def observe_rejected(self, qos_class: str) -> None:
        self.rejected.labels(qos_class=qos_class, **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
