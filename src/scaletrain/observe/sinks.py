"""Where alert events go: the log (stderr), ``alerts.jsonl`` in the run
directory, and a webhook (a Slack-compatible JSON body, as Alertmanager's
receivers send)."""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scaletrain.errors import UserError, warn


@dataclass(frozen=True)
class AlertEvent:
    time: float  # seconds since the epoch
    step: int
    name: str
    severity: str
    state: str  # "firing" or "resolved"
    message: str
    value: Any

    def to_dict(self) -> dict:
        """JSON-safe: a non-finite value becomes null (the message still says nan)."""
        value = self.value
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        return {"time": self.time, "step": self.step, "name": self.name, "severity": self.severity,
                "state": self.state, "message": self.message, "value": value}

    def line(self) -> str:
        return f"alert {self.state.upper()} [{self.severity}] {self.name}: {self.message} (step {self.step})"


class Sink(Protocol):
    def send(self, event: AlertEvent) -> None: ...

    def close(self) -> None: ...


class LogSink:
    """One line per event on stderr: ``alert FIRING [critical] nonfinite: ... (step 12)``."""

    def send(self, event: AlertEvent) -> None:
        print(event.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per event to ``path`` (``RUN_DIR/alerts.jsonl``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = None

    def send(self, event: AlertEvent) -> None:
        if self.file is None:
            self.file = self.path.open("a", buffering=1)
        self.file.write(json.dumps(event.to_dict(), default=str, allow_nan=False) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class WebhookSink:
    """POSTs each event as JSON: ``text`` (what Slack incoming webhooks show)
    plus the event's fields and ``run``.

    A background thread does the POST, so ``send`` never waits on the
    network; ``close`` waits at most ``timeout_s`` for events still queued.
    The first failure is logged once; a failing webhook never raises."""

    _QUEUE_LIMIT = 1000  # events; beyond it new ones are dropped, not buffered without end

    def __init__(self, url: str, timeout_s: float = 5.0, run: str = ""):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"alert webhook url must be http:// or https://, got {url!r}")
        if not timeout_s > 0:
            raise UserError(f"alert webhook timeout must be > 0 seconds, got {timeout_s!r}")
        self.url, self.timeout_s, self.run = url, float(timeout_s), run
        self.queue: queue.Queue = queue.Queue(self._QUEUE_LIMIT)
        self.failed = False
        self.thread = threading.Thread(target=self._deliver, name="scaletrain-alert-webhook", daemon=True)
        self.thread.start()

    def payload(self, event: AlertEvent) -> dict:
        run = f" {self.run}" if self.run else ""
        text = f"[{event.state.upper()}] {event.name} ({event.severity}){run}: {event.message} (step {event.step})"
        return {"text": text, **event.to_dict(), "run": self.run}

    def send(self, event: AlertEvent) -> None:
        try:
            self.queue.put_nowait(self.payload(event))
        except queue.Full:
            self._fail(f"more than {self._QUEUE_LIMIT} events queued; dropping")

    def close(self) -> None:
        """Deliver what is queued within ``timeout_s``, then give up on the rest."""
        deadline = time.monotonic() + self.timeout_s
        try:
            self.queue.put(None, timeout=self.timeout_s)
        except queue.Full:
            return
        self.thread.join(max(0.0, deadline - time.monotonic()))

    def _deliver(self) -> None:
        while (payload := self.queue.get()) is not None:
            request = urllib.request.Request(self.url, data=json.dumps(payload, default=str).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
            except Exception as exc:  # noqa: BLE001 - any failure is reported once, never raised
                self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = True
            warn(f"alert webhook {self.url} failed ({reason}); further failures are not shown")


def build_sinks(run_dir: str | Path | None, webhook_url: str | None = None,
                webhook_timeout_s: float = 5.0) -> list[Sink]:
    """The log, ``RUN_DIR/alerts.jsonl`` (where there is a run directory) and,
    given a url, the webhook labelled with the run directory's name."""
    sinks: list[Sink] = [LogSink()]
    if run_dir is not None:
        sinks.append(JsonlSink(Path(run_dir) / "alerts.jsonl"))
    if webhook_url:
        sinks.append(WebhookSink(webhook_url, webhook_timeout_s, run=Path(run_dir).name if run_dir else ""))
    return sinks
