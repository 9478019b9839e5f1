"""The engine in its own thread, fed by the HTTP server's event loop.

Requests and cancellations go in through a thread-safe inbox; after every
step the outputs go back to the loop in one ``call_soon_threadsafe`` and are
sorted into each request's queue. The engine thread also keeps the metrics.
A failure inside a step (a TP worker gone) is fatal: ``on_fatal`` ends the
process, because the KV cache and the workers' state can no longer be trusted.

``step_delay_s`` (``scaletrain serve --debug-step-delay``) is a debugging and
benchmarking knob: the engine thread sleeps that long after every step before
handing its outputs on, so each step of this replica really takes longer, as
on a slower accelerator. A sleep rather than fewer threads or a pinned core:
on a machine with few cores, fewer torch threads is not slower (README,
serving threads) and pinning only moves the contention between the replicas
around, while a sleep slows this engine alone, by a known amount, and does not
take CPU from the others (the GIL is released while it sleeps, so the HTTP
loop keeps accepting requests).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from scaletrain.serve.engine import ChoiceOutput, Engine
from scaletrain.serve.metrics import ServeMetrics
from scaletrain.serve.sampling import SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    offset: int  # choice index of this prompt's first choice in the response
    n: int
    arrival_s: float
    last_token_s: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)  # choices done, as the engine thread saw them
    delivered_finishes: int = 0  # final outputs handed to the event loop


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServeMetrics, on_fatal: Callable[[BaseException], None],
                 step_delay_s: float = 0.0):
        self.engine, self.metrics, self.on_fatal = engine, metrics, on_fatal
        self.step_delay_s = step_delay_s  # --debug-step-delay: slept after every step (module docstring)
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._queued: set[str] = set()  # accepted, not yet in the running batch
        self._stats_seen = (0, 0, 0)
        self.thread = threading.Thread(target=self._run, name="scaletrain-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_length(self) -> int:
        """Requests accepted but not yet in the running batch."""
        return len(self._queued)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int) -> AsyncIterator[ChoiceOutput]:
        """Queue the request now (so the next admission check counts it); its
        outputs, every choice of every prompt (choice index = prompt * n + choice)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        now = time.monotonic()
        ids = [f"{next(self._ids)}" for _ in prompts]
        for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
            self._streams[request_id] = _Stream(loop, queue, i * n, n, now)
            self._queued.add(request_id)
            self._submit(("add", request_id, prompt, params, n, now))
        return self._outputs(ids, queue, len(prompts) * n)

    async def _outputs(self, ids: list[str], queue: asyncio.Queue, remaining: int) -> AsyncIterator[ChoiceOutput]:
        try:
            while remaining:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                remaining -= out.finish_reason is not None
                yield out
        finally:
            for request_id in ids:
                self._queued.discard(request_id)
                stream = self._streams.pop(request_id, None)
                if stream is not None and len(stream.finished) < stream.n:
                    self._submit(("abort", request_id))

    def _submit(self, op: tuple) -> None:
        self._inbox.append(op)
        self._wake.set()

    # -- the engine thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_work():
                    self._update_gauges()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                if self.step_delay_s:  # before the outputs are timed and delivered: the step took this much longer
                    time.sleep(self.step_delay_s)
                self._record(outputs)
                if outputs:
                    loop = next(iter(self._streams.values())).loop if self._streams else None
                    if loop is not None:
                        loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as exc:  # noqa: BLE001 - reported, then the process ends
            self.on_fatal(exc)
        finally:
            for request_id in list(self.engine.by_request):
                self.engine.abort(request_id)

    def _drain_inbox(self) -> None:
        while self._inbox:
            op = self._inbox.popleft()
            if op[0] == "add":
                _, request_id, prompt, params, n, arrival_s = op
                if request_id in self._streams:  # not already cancelled
                    self.engine.add(request_id, prompt, params, n, arrival_s)
                    self.metrics.prompt_tokens.inc(len(prompt))
            else:
                if op[1] in self.engine.by_request:
                    self.metrics.success("abort")
                self.engine.abort(op[1])

    def _deliver(self, outputs: list[ChoiceOutput]) -> None:
        """On the event loop: each output into its request's queue."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                out.index += stream.offset
                stream.queue.put_nowait(out)
                stream.delivered_finishes += out.finish_reason is not None
                if stream.delivered_finishes == stream.n:  # also when nobody ever reads the stream
                    self._streams.pop(out.request_id, None)
                    self._queued.discard(out.request_id)

    def _record(self, outputs: list[ChoiceOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens.inc(len(outputs))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            last = stream.last_token_s.get(out.index)
            if last is None and out.index == 0:
                m.ttft.observe(now - out.arrival_s)
                m.queue_time.observe((out.scheduled_s or now) - out.arrival_s)
            elif last is not None:
                m.itl.observe(now - last)
            stream.last_token_s[out.index] = now
            if out.finish_reason is not None:
                stream.finished.add(out.index)
                if len(stream.finished) == stream.n:
                    m.e2e.observe(now - out.arrival_s)
                    m.success(out.finish_reason)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, stats = self.metrics, self.engine.scheduler.stats
        self._queued -= self.engine.running_requests()
        m.running.set(self.engine.num_running())
        m.waiting.set(self.engine.num_waiting())
        m.kv_cache_usage.set(self.engine.blocks.usage())
        seen = (stats.prefix_queries, stats.prefix_hits, stats.preemptions)
        for counter, now, before in zip((m.prefix_queries, m.prefix_hits, m.preemptions), seen, self._stats_seen):
            if now > before:
                counter.inc(now - before)
        self._stats_seen = seen
