"""One upstream engine as the router sees it: its URL, a circuit breaker, the
requests in flight, an EWMA of time to first token, the models it holds, and
whether it is draining.

Circuit breaker (Nygard, *Release It!*, ch. 5; Envoy's outlier detection):
``closed`` lets everything through and counts consecutive failures; at
``failure_threshold`` (or at once on a refused connection, which means the
process is gone) it turns ``open`` and takes no requests for ``open_s``; then
``half_open`` lets one trial through (a request or the active probe), whose
success closes it and whose failure opens it again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the value of the breaker-state gauge


def step_of(root: str | None) -> int | None:
    """12 for .../step_00000012 (a checkpoint directory), else None."""
    from scaletrain.checkpoint.manifest import STEP_DIR

    match = STEP_DIR.match(Path(root).name) if root else None
    return int(match.group(1)) if match else None


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    open_s: float = 2.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float | None = None) -> bool:
        """Whether a request may go to this backend now (claims the half-open trial)."""
        now = time.monotonic() if now is None else now
        if self.state == OPEN and now - self.opened_at >= self.open_s:
            self.state, self.trial_in_flight = HALF_OPEN, False
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self.trial_in_flight:
            return True
        return False

    def available(self, now: float | None = None) -> bool:
        """Like ``allows`` but without claiming anything (for listings and gauges)."""
        now = time.monotonic() if now is None else now
        if self.state == OPEN:
            return now - self.opened_at >= self.open_s
        return self.state == CLOSED or not self.trial_in_flight

    def on_dispatch(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    def success(self) -> None:
        self.state, self.failures, self.trial_in_flight = CLOSED, 0, False

    def failure(self, fatal: bool = False, now: float | None = None) -> None:
        self.failures += 1
        if fatal or self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.trial_in_flight = OPEN, False
            self.opened_at = time.monotonic() if now is None else now


@dataclass(eq=False)
class Backend:
    url: str
    weight: float = 1.0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    in_flight: int = 0
    ewma_ttft_s: float | None = None  # time to first token as clients saw it
    ewma_cost_s: float | None = None  # the same divided by the requests in flight there at dispatch
    models: set[str] = field(default_factory=set)  # models loaded there (from its /v1/models)
    served: dict[str, dict] = field(default_factory=dict)  # model id -> its /v1/models entry
    sent: dict[str, float] = field(default_factory=dict)  # model -> when the router last sent it here
    draining: bool = False
    ready: bool = False  # answered a health probe at least once
    ewma_alpha: float = 0.3

    @property
    def name(self) -> str:
        return self.url

    def served_step(self) -> int | None:
        """The training step of the newest checkpoint this backend serves (from the `root` of its models)."""
        steps = [step_of(m.get("root")) for m in self.served.values()]
        return max((s for s in steps if s is not None), default=None)

    def usable(self) -> bool:
        return self.ready and not self.draining and self.breaker.available()

    def observe_ttft(self, seconds: float, load: int = 1) -> None:
        """``load``: requests in flight here when this one was sent, itself included. Dividing by it
        keeps a backend measured while busy from looking slow for good once it is idle again."""
        self.ewma_ttft_s = self._ewma(self.ewma_ttft_s, seconds)
        self.ewma_cost_s = self._ewma(self.ewma_cost_s, seconds / max(1, load))

    def _ewma(self, prev: float | None, sample: float) -> float:
        return sample if prev is None else self.ewma_alpha * sample + (1 - self.ewma_alpha) * prev
