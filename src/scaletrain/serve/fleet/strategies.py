"""Load-balancing strategies: one small class each behind ``Strategy.choose``.

The router hands a strategy the backends that may take the request now
(healthy, not draining, breaker closed or half-open, holding the model where
some do) and a ``RouteRequest``; the strategy returns one of them. Choice
rules follow the vLLM production-stack router (round robin, session,
prefix-aware), Envoy (least request, power of two choices, weighted round
robin), and Mitzenmacher's "power of two choices" (IEEE TPDS 2001)."""

from __future__ import annotations

import abc
import bisect
import hashlib
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass

from scaletrain.serve.fleet.backend import Backend


@dataclass
class RouteRequest:
    model: str = ""
    prompt: str = ""  # the prompt text, or the chat messages' text joined
    session: str | None = None  # the session header's value, else the request's ``user``


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Strategy(abc.ABC):
    name = ""

    @abc.abstractmethod
    def choose(self, backends: list[Backend], request: RouteRequest) -> Backend:
        """The backend for ``request`` among the usable ``backends``."""

    def routed(self, backend: Backend, request: RouteRequest) -> None:
        """Called once the request went to ``backend`` (for strategies that learn)."""


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self):
        self._next = itertools.count()

    def choose(self, backends, request):
        return backends[next(self._next) % len(backends)]


def _least_loaded(backends: list[Backend]) -> Backend:
    fewest = min(b.in_flight for b in backends)
    return next(b for b in backends if b.in_flight == fewest)


class LeastOutstanding(Strategy):
    """Fewest requests in flight; ties to the earliest listed."""

    name = "least_outstanding"

    def choose(self, backends, request):
        return _least_loaded(backends)


class PowerOfTwo(Strategy):
    """Two distinct backends at random; the one with fewer in flight wins."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def choose(self, backends, request):
        if len(backends) == 1:
            return backends[0]
        a, b = self.rng.sample(backends, 2)
        return a if a.in_flight <= b.in_flight else b


class Weighted(Strategy):
    """Smooth weighted round robin (nginx's): every pick adds each weight to
    its backend's credit, the richest wins and pays the total. Weights are
    static (``Backend.weight``) or, with ``measured``, the measured capacity
    1 / EWMA(TTFT per request in flight) (backends not yet measured get the
    mean of the others)."""

    name = "weighted"

    def __init__(self, measured: bool = False):
        self.measured = measured
        self.credit: dict[str, float] = {}

    def weights(self, backends: list[Backend]) -> list[float]:
        if not self.measured:
            return [b.weight for b in backends]
        known = [1 / b.ewma_cost_s for b in backends if b.ewma_cost_s]
        default = sum(known) / len(known) if known else 1.0
        return [1 / b.ewma_cost_s if b.ewma_cost_s else default for b in backends]

    def choose(self, backends, request):
        weights = self.weights(backends)
        for b, w in zip(backends, weights):
            self.credit[b.name] = self.credit.get(b.name, 0.0) + w
        best = max(backends, key=lambda b: self.credit[b.name])
        self.credit[best.name] -= sum(weights)
        return best


class Latency(Strategy):
    """Lowest expected time to first token: cost x (in flight + 1), where cost
    is the EWMA of TTFT per request in flight at dispatch (Finagle's peak-EWMA
    load balancer scores latency x (pending + 1) the same way). Measuring per
    request in flight keeps a backend that was timed while busy from being
    starved once it is idle. A backend without a measurement yet scores 0, so
    every one gets measured."""

    name = "latency"

    def choose(self, backends, request):
        return min(backends, key=lambda b: ((b.ewma_cost_s or 0.0) * (b.in_flight + 1), b.in_flight))


class Session(Strategy):
    """Consistent hashing (Karger et al., STOC 1997) of the session key onto a
    ring of ``vnodes`` points per backend: when a backend comes or goes only
    its own keys move. Requests without a key go to the least loaded."""

    name = "session"

    def __init__(self, vnodes: int = 64):
        self.vnodes = vnodes
        self._ring: tuple[tuple[str, ...], list[int], list[str]] | None = None

    def _points(self, names: tuple[str, ...]) -> tuple[list[int], list[str]]:
        if self._ring is None or self._ring[0] != names:
            points = sorted((_stable_hash(f"{n}#{i}"), n) for n in names for i in range(self.vnodes))
            self._ring = (names, [p for p, _ in points], [n for _, n in points])
        return self._ring[1], self._ring[2]

    def choose(self, backends, request):
        if not request.session:
            return _least_loaded(backends)
        by_name = {b.name: b for b in backends}
        hashes, owners = self._points(tuple(sorted(by_name)))
        at = bisect.bisect(hashes, _stable_hash(request.session)) % len(hashes)
        return by_name[owners[at]]


class Prefix(Strategy):
    """Requests sharing a prompt prefix go where it was sent before, so that
    the engine's prefix cache holds it (the vLLM production stack's
    prefix-aware routing: hashes of ``chunk_chars``-character chunks, longest
    match wins). Where that backend's load exceeds the least loaded one's by
    more than ``threshold`` requests, the least loaded takes it instead (and
    new prefixes go there). Load is requests in flight weighted by speed:
    on a backend whose measured time to first token per request is c times
    the fastest one's, a request counts c times, so a slow replica keeps
    only the groups it can serve (with no measurements yet: plain counts)."""

    name = "prefix"

    def __init__(self, chunk_chars: int = 128, threshold: int = 4, capacity: int = 50_000):
        self.chunk_chars, self.threshold, self.capacity = chunk_chars, threshold, capacity
        self.seen: dict[str, OrderedDict[int, None]] = {}  # backend -> chunk-chain hashes, LRU

    def chain(self, prompt: str) -> list[int]:
        """Hash of every whole leading chunk run: [h(c0), h(c0 c1), ...]."""
        digest, out = hashlib.blake2b(digest_size=8), []
        for end in range(self.chunk_chars, len(prompt) + 1, self.chunk_chars):
            digest.update(prompt[end - self.chunk_chars:end].encode())
            out.append(int.from_bytes(digest.copy().digest(), "big"))
        return out

    def _match(self, backend: Backend, chain: list[int]) -> int:
        seen = self.seen.get(backend.name, {})
        n = 0
        while n < len(chain) and chain[n] in seen:
            n += 1
        return n

    @staticmethod
    def _loads(backends: list[Backend]) -> dict[str, float]:
        """In-flight requests in units of the fastest backend's requests."""
        costs = [b.ewma_cost_s for b in backends if b.ewma_cost_s]
        if len(costs) < len(backends):
            return {b.name: float(b.in_flight) for b in backends}
        fastest = min(costs)
        return {b.name: (b.in_flight + 1) * b.ewma_cost_s / fastest - 1 for b in backends}

    def choose(self, backends, request):
        chain = self.chain(request.prompt)
        load = self._loads(backends)
        least = min(backends, key=lambda b: (load[b.name], b.in_flight))
        best = max(backends, key=lambda b: (self._match(b, chain), -load[b.name]))
        if self._match(best, chain) == 0 or load[best.name] > load[least.name] + self.threshold:
            return least
        return best

    def routed(self, backend, request):
        seen = self.seen.setdefault(backend.name, OrderedDict())
        for h in self.chain(request.prompt):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)


STRATEGIES = {cls.name: cls for cls in (RoundRobin, LeastOutstanding, Weighted, Latency, PowerOfTwo, Session, Prefix)}


def make_strategy(name: str, measured_weights: bool = False, prefix_threshold: int = 4) -> Strategy:
    from scaletrain.errors import UserError

    if name not in STRATEGIES:
        raise UserError(f"--strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if name == "weighted":
        return Weighted(measured_weights)
    if name == "prefix":
        return Prefix(threshold=prefix_threshold)
    return STRATEGIES[name]()
