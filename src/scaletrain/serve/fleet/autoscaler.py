"""Replica autoscaling on requests in flight, Ray Serve's rule
(docs.ray.io, "Ray Serve Autoscaling"): desired = ceil(mean in-flight over
the look-back window / target per replica), clamped to [min, max]; the fleet
moves to it only after the wish has held for the upscale (or downscale)
delay. Ray's defaults: target_ongoing_requests 2, upscale_delay_s 30,
downscale_delay_s 600, look_back_period_s 30.

Scaling up starts engines and adds each once healthy; scaling down drains
the least loaded replica (no new requests, in-flight ones finish) before
stopping it. Every decision is printed with its reason and counted."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class AutoscaleConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0
    interval_s: float = 0.5


@dataclass
class Decision:
    direction: str  # "up" or "down"
    current: int
    desired: int
    reason: str


@dataclass
class Autoscaler:
    cfg: AutoscaleConfig
    samples: deque = field(default_factory=deque)  # (time, requests in flight)
    wish_since: float | None = None
    wish: int | None = None

    def observe(self, now: float, in_flight: int) -> None:
        self.samples.append((now, in_flight))
        while self.samples and self.samples[0][0] < now - self.cfg.look_back_s:
            self.samples.popleft()

    def mean_load(self) -> float:
        return sum(v for _, v in self.samples) / len(self.samples) if self.samples else 0.0

    def desired(self) -> int:
        wanted = math.ceil(self.mean_load() / self.cfg.target_ongoing_requests)
        return max(self.cfg.min_replicas, min(self.cfg.max_replicas, wanted))

    def decide(self, now: float, current: int) -> Decision | None:
        desired = self.desired()
        if desired == current:
            self.wish, self.wish_since = None, None
            return None
        if desired != self.wish:
            self.wish, self.wish_since = desired, now
        delay = self.cfg.upscale_delay_s if desired > current else self.cfg.downscale_delay_s
        if now - self.wish_since < delay:
            return None
        self.wish, self.wish_since = None, None
        direction = "up" if desired > current else "down"
        reason = (f"mean in-flight {self.mean_load():.2f} over {self.cfg.look_back_s:g} s, target "
                  f"{self.cfg.target_ongoing_requests:g} per replica -> {desired} wanted for {delay:g} s")
        return Decision(direction, current, desired, reason)


async def run_autoscaler(scaler: Autoscaler, fleet) -> None:
    """Sample the router's in-flight count and act on decisions. ``fleet``:
    .active() replicas, .scale_up(n), .scale_down(n), .metrics."""
    while True:
        now = time.monotonic()
        active = fleet.active()
        scaler.observe(now, sum(r.backend.in_flight for r in active))
        fleet.metrics.load.set(scaler.mean_load())
        fleet.metrics.desired.set(scaler.desired())
        decision = scaler.decide(now, len(active))
        if decision is not None:
            print(f"autoscaler: scale {decision.direction} {decision.current} -> {decision.desired}: "
                  f"{decision.reason}", file=sys.stderr, flush=True)
            fleet.metrics.scale.labels(decision.direction).inc()
            n = abs(decision.desired - decision.current)
            await (fleet.scale_up(n) if decision.direction == "up" else fleet.scale_down(n))
        await asyncio.sleep(scaler.cfg.interval_s)
