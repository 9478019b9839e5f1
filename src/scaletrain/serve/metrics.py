"""Prometheus metrics under the names users chart for vLLM, prefixed
``scaletrain:`` (vLLM's ``vllm:`` names, docs/design/metrics), each labelled
with ``model_name``. Counters gain ``_total`` when exposed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; vLLM's TTFT / ITL / E2E buckets, trimmed.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5)


class ServeMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        m, label = ["model_name"], {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(f"scaletrain:{name}", doc, m, registry=r).labels(**label)

        def counter(name, doc):
            return Counter(f"scaletrain:{name}", doc, m, registry=r).labels(**label)

        def histogram(name, doc, buckets):
            return Histogram(f"scaletrain:{name}", doc, m, buckets=buckets, registry=r).labels(**label)

        self.model_name = model_name
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens received.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted to free KV-cache blocks.")
        self._success = Counter("scaletrain:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two output tokens.", TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS)

    def success(self, finished_reason: str) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=finished_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
