"""Engine replicas as child processes of the fleet: ``scaletrain serve`` on
127.0.0.1 and a free port each, restarted when they die, drained before
they stop.

A replica that exits on its own is restarted on the same port (after 1, 2,
4, ... 30 s when it keeps failing); its backend is marked down at once so
that requests waiting on it fail over. ``drain`` takes a replica out of the
choice, waits for its in-flight requests, then stops it with SIGTERM (the
engine's own grace period covers any straggler). Replicas get
PR_SET_PDEATHSIG so that they die with the fleet even if it is SIGKILLed."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.serve.fleet.backend import Backend
from scaletrain.serve.fleet.pool import Pool

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: replicas outlive a SIGKILLed fleet
        pass


@dataclass(eq=False)
class Replica:
    port: int
    model: str  # MODEL of its `scaletrain serve` (a checkpoint directory once follow mode rolls it)
    threads: int | None
    backend: Backend
    proc: subprocess.Popen | None = None
    restarts: int = 0
    failures_in_a_row: int = 0
    next_start_s: float = 0.0
    stopping: bool = False
    log: Path | None = None
    step_delay_s: float | None = None  # --debug-step-delay of this replica (None: the fleet's serve_args)


@dataclass
class Supervisor:
    pool: Pool
    serve_args: list[str]  # engine options passed to every replica
    log_dir: Path
    on_restart: object = None  # callable(): a metric
    replicas: list[Replica] = field(default_factory=list)
    startup_s: float = 300.0
    api_key: str | None = None  # to the replicas through the environment, not argv (ps shows argv)

    def start(self, model: str, threads: int | None = None, port: int | None = None,
              step_delay_s: float | None = None) -> Replica:
        port = port or free_port()
        replica = Replica(port, model, threads, self.pool.add(f"http://127.0.0.1:{port}"), step_delay_s=step_delay_s)
        self.replicas.append(replica)
        self._spawn(replica)
        return replica

    def _spawn(self, replica: Replica) -> None:
        env = dict(os.environ)
        if self.api_key:
            env["SCALETRAIN_API_KEY"] = self.api_key
        if replica.threads:
            env["OMP_NUM_THREADS"] = str(replica.threads)
        args = ([replica.model] if replica.model else []) + ["--port", str(replica.port), *self.serve_args]
        if replica.threads:
            args += ["--threads", str(replica.threads)]
        if replica.step_delay_s is not None:  # the last --debug-step-delay given wins over serve_args'
            args += ["--debug-step-delay", str(replica.step_delay_s)]
        replica.log = self.log_dir / f"replica-{replica.port}.log"
        with replica.log.open("a") as log:
            replica.proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "serve", *args], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def describe(self, backend: Backend) -> dict:
        replica = next((r for r in self.replicas if r.backend is backend), None)
        if replica is None or replica.proc is None:
            return {}
        return {"pid": replica.proc.pid, "restarts": replica.restarts, "model_path": replica.model,
                "threads": replica.threads, "debug_step_delay_s": replica.step_delay_s}

    async def wait_ready(self, replica: Replica, timeout_s: float | None = None) -> bool:
        return await self.pool.wait_ready(replica.backend, timeout_s or self.startup_s,
                                          alive=lambda: replica.proc.poll() is None)

    def log_tail(self, replica: Replica, chars: int = 2000) -> str:
        return replica.log.read_text(errors="replace")[-chars:] if replica.log and replica.log.exists() else ""

    async def watch(self, interval_s: float = 0.25) -> None:
        """Restart replicas that died (not those being stopped)."""
        while True:
            now = time.monotonic()
            for replica in list(self.replicas):
                if replica.stopping or replica.proc is None or replica.proc.poll() is None:
                    continue
                if replica.next_start_s == 0.0:
                    rc = replica.proc.returncode
                    print(f"replica on port {replica.port} exited with {rc}; restarting it", file=sys.stderr,
                          flush=True)
                    self.pool.reset(replica.backend)
                    replica.next_start_s = now + min(30.0, 2.0 ** replica.failures_in_a_row - 1)
                    replica.failures_in_a_row += 1
                if now >= replica.next_start_s:
                    replica.next_start_s = 0.0
                    replica.restarts += 1
                    if self.on_restart:
                        self.on_restart()
                    self._spawn(replica)
                    asyncio.ensure_future(self._settle(replica))
            await asyncio.sleep(interval_s)

    async def _settle(self, replica: Replica) -> None:
        if await self.wait_ready(replica):
            replica.failures_in_a_row = 0

    async def drain(self, replica: Replica, timeout_s: float) -> bool:
        """No new requests; True once its in-flight ones are done (False at the timeout)."""
        replica.backend.draining = True
        deadline = time.monotonic() + timeout_s
        while replica.backend.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return replica.backend.in_flight == 0

    async def stop(self, replica: Replica, grace_s: float = 30.0) -> None:
        replica.stopping = True
        proc = replica.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s + 10
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async def retire(self, replica: Replica, drain_s: float, grace_s: float) -> None:
        """Drain, stop and forget a replica (scale-down)."""
        print(f"draining replica on port {replica.port} ({replica.backend.in_flight} in flight)", file=sys.stderr,
              flush=True)
        await self.drain(replica, drain_s)
        await self.stop(replica, grace_s)
        self.replicas.remove(replica)
        self.pool.remove(replica.backend)

    async def reload(self, replica: Replica, model: str, drain_s: float, grace_s: float) -> bool:
        """Drain, restart on ``model`` (same port), health check, rejoin. False if it never got healthy."""
        await self.drain(replica, drain_s)
        await self.stop(replica, grace_s)
        self.pool.reset(replica.backend)
        replica.model = model
        self._spawn(replica)
        ok = await self.wait_ready(replica)  # still `stopping`: a start that dies is not restarted by watch()
        replica.stopping = False
        replica.backend.draining = not ok
        return ok

    def shutdown(self, grace_s: float = 30.0) -> None:
        for replica in self.replicas:
            replica.stopping = True
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10
        for replica in self.replicas:
            if replica.proc is None:
                continue
            try:
                replica.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()
