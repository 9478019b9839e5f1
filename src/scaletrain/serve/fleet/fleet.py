"""``scaletrain serve MODEL --replicas N`` and ``scaletrain router --backend
URL ...``: a router on the public port, with (for serve) engine replicas as
child processes, the autoscaler and the follow-mode roller.

The router listens at once (503 + Retry-After until a backend is healthy);
a replica that exits during its first start-up ends the fleet with its
error. SIGINT/SIGTERM: the router stops taking connections and gives the
in-flight requests the grace period, then every replica gets SIGTERM (and
its own grace period)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.errors import UserError
from scaletrain.serve.fleet.autoscaler import AutoscaleConfig, Autoscaler, run_autoscaler
from scaletrain.serve.fleet.cache import ResponseCache
from scaletrain.serve.fleet.metrics import RouterMetrics
from scaletrain.serve.fleet.pool import Pool
from scaletrain.serve.fleet.router import Router, Timeouts, build_router_app
from scaletrain.serve.fleet.strategies import make_strategy
from scaletrain.serve.fleet.supervisor import Replica, Supervisor


@dataclass
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    strategy: str = "least_outstanding"
    weights: str | None = None  # "3,1" (per backend / replica, in order) or "measured"
    prefix_threshold: int = 4
    session_header: str = "x-session-id"
    retries: int = 2
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    failure_threshold: int = 3
    open_s: float = 2.0
    cache: bool = True
    cache_bytes: str = "64M"
    cache_ttl_s: float = 600.0
    grace_s: float = 30.0
    api_key: str | None = None


@dataclass
class FleetOptions:
    replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0
    replica_threads: list[int] = field(default_factory=list)
    follow: bool = False
    follow_poll_s: float = 2.0
    drain_timeout_s: float = 60.0
    replica_step_delays: list[float] = field(default_factory=list)  # --replica-debug-step-delay, in order


def check_router_options(opts: RouterOptions) -> list[float] | None:
    from scaletrain.debug.cli import parse_bytes

    checks = [(0 <= opts.port < 65536, f"--router-port {opts.port}: must be in 0..65535"),
              (opts.retries >= 0, f"--retries {opts.retries}: must be 0 or more"),
              (min(opts.connect_timeout_s, opts.read_timeout_s, opts.probe_interval_s, opts.probe_timeout_s) > 0,
               "--connect-timeout, --read-timeout, --probe-interval and --probe-timeout must be positive"),
              (opts.prefix_threshold >= 0, f"--prefix-threshold {opts.prefix_threshold}: must be 0 or more")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    make_strategy(opts.strategy)
    parse_bytes(opts.cache_bytes, "--cache-bytes")
    if opts.weights in (None, "measured"):
        return None
    try:
        weights = [float(w) for w in opts.weights.split(",")]
    except ValueError:
        weights = []
    if not weights or any(w <= 0 for w in weights):
        raise UserError(f"--weights {opts.weights!r}; allowed: positive numbers, one per backend (e.g. 3,1), "
                        "or 'measured'")
    return weights


def check_backend_url(url: str) -> str:
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UserError(f"--backend {url!r}: not a URL ({exc}); expected http://HOST:PORT") from None
    port_ok = parsed.port is None or 0 < parsed.port < 65536
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in ("", "/") or parsed.query \
            or not port_ok:
        raise UserError(f"--backend {url!r}: expected http://HOST:PORT or https://HOST:PORT (no path)")
    return url.rstrip("/")


def make_router(opts: RouterOptions, weights: list[float] | None) -> Router:
    from scaletrain.debug.cli import parse_bytes

    strategy = make_strategy(opts.strategy, opts.weights == "measured", opts.prefix_threshold)
    pool = Pool(opts.probe_interval_s, opts.probe_timeout_s, opts.failure_threshold, opts.open_s, opts.api_key)
    cache = ResponseCache(parse_bytes(opts.cache_bytes, "--cache-bytes"), opts.cache_ttl_s) if opts.cache else None
    return Router(pool, strategy, RouterMetrics(strategy.name), cache, opts.retries,
                  Timeouts(opts.connect_timeout_s, opts.read_timeout_s), opts.session_header.lower(),
                  api_key=opts.api_key)


class Fleet:
    """What the autoscaler and the follower act on."""

    def __init__(self, router: Router, supervisor: Supervisor, model: str, fleet: FleetOptions, grace_s: float,
                 weights: list[float] | None):
        self.router, self.supervisor, self.model, self.opts = router, supervisor, model, fleet
        self.metrics, self.grace_s, self.drain_s = router.metrics, grace_s, fleet.drain_timeout_s
        self.weights = weights
        self.lock = asyncio.Lock()  # one change of the replica set at a time (scaling, rolling)

    def active(self) -> list[Replica]:
        return [r for r in self.supervisor.replicas if not r.stopping and not r.backend.draining]

    def start_one(self) -> Replica:
        i = len(self.supervisor.replicas)
        threads = self.opts.replica_threads[i % len(self.opts.replica_threads)] if self.opts.replica_threads else None
        delays = self.opts.replica_step_delays
        replica = self.supervisor.start(self.model, threads, step_delay_s=delays[i % len(delays)] if delays else None)
        if self.weights:
            replica.backend.weight = self.weights[i % len(self.weights)]
        return replica

    async def scale_up(self, n: int) -> None:
        async with self.lock:
            started = [self.start_one() for _ in range(n)]
            for replica, ok in zip(started, await asyncio.gather(*(self.supervisor.wait_ready(r) for r in started))):
                if not ok:
                    print(f"autoscaler: the new replica on port {replica.port} did not get healthy:\n"
                          f"{self.supervisor.log_tail(replica, 800)}", file=sys.stderr, flush=True)
                    await self.supervisor.retire(replica, 0, self.grace_s)

    async def scale_down(self, n: int) -> None:
        async with self.lock:
            order = sorted(self.active(), key=lambda r: (r.backend.in_flight, -self.supervisor.replicas.index(r)))
            await asyncio.gather(*(self.supervisor.retire(r, self.drain_s, self.grace_s) for r in order[:n]))


def replica_threads_default(replicas: int) -> list[int]:
    """Without --threads / --replica-threads: the cores shared out, so replicas do not oversubscribe them."""
    return [max(1, (os.cpu_count() or 1) // replicas)]


def run_fleet(model: str, serve_args: list[str], ropts: RouterOptions, fopts: FleetOptions) -> int:
    from scaletrain.serve.loader import find_weights

    weights = check_router_options(ropts)
    lo = fopts.min_replicas if fopts.min_replicas is not None else fopts.replicas
    hi = fopts.max_replicas if fopts.max_replicas is not None else max(fopts.replicas, lo)
    if not 1 <= lo <= fopts.replicas <= hi:
        raise UserError(f"--min-replicas {lo}, --replicas {fopts.replicas}, --max-replicas {hi}: need "
                        "1 <= min <= replicas <= max")
    if fopts.target_ongoing_requests <= 0:
        raise UserError(f"--target-ongoing-requests {fopts.target_ongoing_requests}: must be positive")
    follower = None
    if model:
        kind, where = find_weights(Path(model))
        if fopts.follow:
            from scaletrain.serve.fleet.follow import Follower, checkpoint_root_of

            if kind != "checkpoint" or not (Path(model) / "config.toml").is_file():
                raise UserError(f"--follow: MODEL {model} must be a training run directory (with config.toml)")
            follower = Follower(checkpoint_root_of(Path(model)), where)
            model = str(where)  # every replica starts on the same checkpoint
    elif fopts.follow:
        raise UserError("--follow needs MODEL (a training run directory), not --model NAME=PATH")
    router = make_router(ropts, weights)
    log_dir = Path(tempfile.mkdtemp(prefix="scaletrain-fleet-"))
    supervisor = Supervisor(router.pool, serve_args, log_dir, on_restart=router.metrics.restarts.inc,
                            api_key=ropts.api_key)
    router.describe = supervisor.describe
    if not fopts.replica_threads and "--threads" not in serve_args:
        fopts.replica_threads = replica_threads_default(fopts.replicas)
    fleet = Fleet(router, supervisor, model, fopts, ropts.grace_s, weights)
    scaler = Autoscaler(AutoscaleConfig(lo, hi, fopts.target_ongoing_requests, fopts.upscale_delay_s,
                                        fopts.downscale_delay_s, fopts.look_back_s)) if hi > lo else None

    async def background(server) -> list:
        starting = [fleet.start_one() for _ in range(fopts.replicas)]
        tasks = [asyncio.ensure_future(router.pool.run())]
        ready = await asyncio.gather(*(supervisor.wait_ready(r) for r in starting))
        for replica, ok in zip(starting, ready):
            if not ok:
                print(f"error: replica on port {replica.port} did not start (log {replica.log}):\n"
                      f"{supervisor.log_tail(replica)}", file=sys.stderr, flush=True)
                server.should_exit, server.failed = True, True
                return tasks
        print(f"{len(starting)} replica(s) ready behind http://{ropts.host}:{ropts.port} (strategy "
              f"{router.strategy.name}; replica logs in {log_dir})", flush=True)
        tasks.append(asyncio.ensure_future(supervisor.watch()))
        if scaler is not None:
            tasks.append(asyncio.ensure_future(run_autoscaler(scaler, fleet)))
        if follower is not None:
            from scaletrain.serve.fleet.follow import run_follower

            tasks.append(asyncio.ensure_future(run_follower(follower, fleet, fopts.follow_poll_s)))
        return tasks

    return _serve_router(router, ropts, background, lambda: supervisor.shutdown(ropts.grace_s))


def run_router(backends: list[str], ropts: RouterOptions) -> int:
    if not backends:
        raise UserError("give at least one --backend URL")
    urls = [check_backend_url(u) for u in backends]
    weights = check_router_options(ropts)
    if weights and len(weights) != len(urls):
        raise UserError(f"--weights has {len(weights)} values for {len(urls)} --backend URLs")
    router = make_router(ropts, weights)

    async def background(server) -> list:
        for i, url in enumerate(urls):
            router.pool.add(url, weights[i] if weights else 1.0)
        print(f"router on http://{ropts.host}:{ropts.port} in front of {len(urls)} backend(s) (strategy "
              f"{router.strategy.name})", flush=True)
        return [asyncio.ensure_future(router.pool.run())]

    return _serve_router(router, ropts, background, lambda: None)


def _serve_router(router: Router, ropts: RouterOptions, background, cleanup) -> int:
    from scaletrain.serve.server import run_app

    async def main(server) -> None:
        router.open()
        starter = asyncio.ensure_future(background(server))
        try:
            await server.serve()
        finally:
            tasks = await starter if starter.done() else []
            starter.cancel()
            for task in tasks:
                task.cancel()
            await router.client.aclose()

    return run_app(ropts, build_router_app(router), None, cleanup, main)
