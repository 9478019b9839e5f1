"""The router's backends and their active health probes.

Every ``interval_s`` each backend gets ``GET /health`` and ``GET /v1/models``
(the models it serves, which of them are loaded, the checkpoint behind them),
each with ``timeout_s``. A refused connection or a 503 opens the breaker at
once; timeouts count toward its threshold. A probe is also the half-open
trial, so a backend that came back rejoins within about ``open_s +
interval_s``, traffic or not. ``down`` wakes requests waiting on a backend
whose breaker a probe opened, so that they fail over instead of waiting for
their read timeout."""

from __future__ import annotations

import asyncio
import time

import httpx

from scaletrain.serve.fleet.backend import OPEN, Backend, CircuitBreaker

RECENT_S = 5.0


class Pool:
    def __init__(self, interval_s: float = 1.0, timeout_s: float = 2.0, failure_threshold: int = 3,
                 open_s: float = 2.0, api_key: str | None = None):
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.failure_threshold, self.open_s = failure_threshold, open_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.backends: list[Backend] = []
        self.down: dict[str, asyncio.Event] = {}
        self.client: httpx.AsyncClient | None = None

    def add(self, url: str, weight: float = 1.0) -> Backend:
        backend = Backend(url.rstrip("/"), weight, CircuitBreaker(self.failure_threshold, self.open_s))
        self.backends.append(backend)
        self.down[backend.name] = asyncio.Event()
        return backend

    def remove(self, backend: Backend) -> None:
        if backend in self.backends:
            self.backends.remove(backend)
        self.mark_down(backend)

    def reset(self, backend: Backend) -> None:
        """The backend's process was replaced: not ready until a probe passes."""
        backend.ready, backend.models, backend.served = False, set(), {}
        backend.breaker = CircuitBreaker(self.failure_threshold, self.open_s)
        backend.ewma_ttft_s = None
        self.mark_down(backend)

    def mark_down(self, backend: Backend) -> None:
        """Wake the requests waiting on ``backend`` (they fail over), arm a fresh event."""
        event = self.down.get(backend.name)
        if event is not None:
            event.set()
        self.down[backend.name] = asyncio.Event()

    def failure(self, backend: Backend, fatal: bool = False) -> None:
        was_open = backend.breaker.state == OPEN
        backend.breaker.failure(fatal)
        if backend.breaker.state == OPEN and not was_open:
            self.mark_down(backend)

    async def run(self) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        while True:
            await asyncio.gather(*(self.probe(b) for b in list(self.backends)))
            await asyncio.sleep(self.interval_s)

    async def probe(self, backend: Backend) -> None:
        # An open breaker is probed only once its open time is over (the half-open trial).
        if backend.ready and backend.breaker.state == OPEN and not backend.breaker.allows():
            return
        try:
            health = await self.client.get(f"{backend.url}/health")
            models = await self.client.get(f"{backend.url}/v1/models") if health.status_code == 200 else None
        except httpx.TimeoutException:
            if backend.ready:
                self.failure(backend)
            return
        except httpx.TransportError:
            if backend.ready:
                self.failure(backend, fatal=True)
            return
        if health.status_code != 200 or models is None or models.status_code != 200:
            if backend.ready:
                self.failure(backend, fatal=True)
            return
        backend.served = {m["id"]: m for m in models.json().get("data", [])}
        # A model sent here moments ago may not show as loading yet: keep it for a few seconds.
        recent = {name for name, at in backend.sent.items() if time.monotonic() - at < RECENT_S}
        backend.models = {name for name, m in backend.served.items()
                          if m.get("loaded", True) or m.get("loading") or name in recent}
        backend.ready = True
        backend.breaker.success()

    async def wait_ready(self, backend: Backend, timeout_s: float, alive=lambda: True) -> bool:
        """Probe ``backend`` every 0.2 s until it passes (True), ``alive()`` turns False or time is up."""
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            await self.probe(backend)
            if backend.ready and backend.breaker.state == "closed":
                return True
            await asyncio.sleep(0.2)
        return False
