"""Prometheus metrics of the router, ``scaletrain:router_*`` (per backend where
it matters). Gauges that mirror the pool are refreshed at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scaletrain.serve.fleet.backend import STATE_CODES
from scaletrain.serve.metrics import LATENCY_BUCKETS


class RouterMetrics:
    def __init__(self, strategy: str):
        self.registry = r = CollectorRegistry()
        b = ["backend"]

        def name(n):
            return f"scaletrain:router_{n}"

        self.requests = Counter(name("requests"), "Requests sent to a backend (each try).", b, registry=r)
        self.errors = Counter(name("errors"), "Failed tries by kind: connect, timeout, status, stream_broken, "
                              "backend_down.", b + ["kind"], registry=r)
        self.retries = Counter(name("retries"), "Tries that failed before the first byte and went to another "
                               "backend (labelled with the one that failed).", b, registry=r)
        self.latency = Histogram(name("request_latency_seconds"), "A try's start to its last byte.", b,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(name("time_to_first_token_seconds"), "Streamed requests: start to the first token "
                              "event.", b, buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(name("in_flight"), "Requests in flight per backend.", b, registry=r)
        self.state = Gauge(name("backend_state"), "Circuit breaker: 0 closed, 1 half-open, 2 open; -1 not ready; "
                           "-2 draining.", b, registry=r)
        self.strategy = Gauge(name("strategy_info"), "The load-balancing strategy (value 1).", ["strategy"],
                              registry=r)
        self.strategy.labels(strategy=strategy).set(1)
        self.no_backend = Counter(name("no_backend"), "Requests answered 503: no healthy backend.", registry=r)
        self.cache = Counter(name("cache"), "Response cache lookups by result: hit, miss, bypass "
                             "(Cache-Control), uncacheable (not deterministic).", ["result"], registry=r)
        self.cache_bytes = Gauge(name("cache_bytes"), "Bytes held by the response cache.", registry=r)
        self.cache_entries = Gauge(name("cache_entries"), "Responses held by the response cache.", registry=r)
        self.replicas = Gauge(name("replicas"), "Backends: total, healthy (taking requests), draining.",
                              ["state"], registry=r)
        self.restarts = Counter(name("replica_restarts"), "Replica processes restarted after they died.",
                                registry=r)
        self.scale = Counter(name("autoscaler_decisions"), "Scaling decisions by direction (up, down).",
                             ["direction"], registry=r)
        self.desired = Gauge(name("autoscaler_desired_replicas"), "Replicas the autoscaler wants.", registry=r)
        self.load = Gauge(name("autoscaler_mean_in_flight"), "Mean requests in flight over the look-back "
                          "window.", registry=r)
        self.served_step = Gauge(name("served_step"), "Training step of the checkpoint the replicas serve "
                                 "(follow mode), per backend.", b, registry=r)
        self.rolls = Counter(name("rolls"), "Follow-mode rolls to a new checkpoint by result (done, "
                             "rolled_back).", ["result"], registry=r)
        self._known: set[str] = set()

    def render(self, backends, cache=None) -> bytes:
        names = {b.name for b in backends}
        for gone in self._known - names:  # a backend removed: its gauges go too
            for gauge in (self.in_flight, self.state, self.served_step):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        self._known = names
        for b in backends:
            self.in_flight.labels(b.name).set(b.in_flight)
            code = -2 if b.draining else (-1 if not b.ready else STATE_CODES[b.breaker.state])
            self.state.labels(b.name).set(code)
            if b.served_step() is not None:
                self.served_step.labels(b.name).set(b.served_step())
        self.replicas.labels("total").set(len(backends))
        self.replicas.labels("healthy").set(sum(b.usable() for b in backends))
        self.replicas.labels("draining").set(sum(b.draining for b in backends))
        if cache is not None:
            self.cache_bytes.set(cache.bytes)
            self.cache_entries.set(len(cache.entries))
        return generate_latest(self.registry)
