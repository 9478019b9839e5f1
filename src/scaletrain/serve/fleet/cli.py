"""Typer options of the fleet (shared by ``scaletrain serve --replicas`` and
``scaletrain router``) and the ``router`` command. Only typer at import time."""

from __future__ import annotations

from typing import List, Optional

import typer

STRATEGY = typer.Option("least_outstanding", "--strategy", help="round_robin, least_outstanding, weighted, "
                        "latency (EWMA of time to first token), power_of_two, session (consistent hash of "
                        "--session-header or the request's `user`), prefix (replica that has the prompt's "
                        "prefix cached).")
WEIGHTS = typer.Option(None, "--weights", help="weighted: one weight per backend/replica in order (e.g. 3,1), "
                       "or 'measured' (1 / EWMA time to first token).")
PREFIX_THRESHOLD = typer.Option(4, "--prefix-threshold", help="prefix: load (in-flight requests, each weighted "
                                "by its replica's measured slowness) the prefix holder may have beyond the least "
                                "loaded before the least loaded takes the request.")
SESSION_HEADER = typer.Option("x-session-id", "--session-header", help="session: the header naming a session "
                              "(else the request's `user`).")
RETRIES = typer.Option(2, "--retries", help="Other backends tried when one fails before the first byte.")
CONNECT_TIMEOUT = typer.Option(2.0, "--connect-timeout", help="Seconds to connect to a backend.")
READ_TIMEOUT = typer.Option(120.0, "--read-timeout", help="Seconds a backend may stay silent (a whole plain "
                            "generation must fit).")
PROBE_INTERVAL = typer.Option(1.0, "--probe-interval", help="Seconds between two health probes of a backend.")
PROBE_TIMEOUT = typer.Option(2.0, "--probe-timeout", help="Seconds a health probe may take; three late ones in "
                             "a row take the backend out.")
NO_CACHE = typer.Option(False, "--no-cache", help="Turn the response cache off.")
CACHE_BYTES = typer.Option("64M", "--cache-bytes", help="Response cache budget (LRU past it).")
CACHE_TTL = typer.Option(600.0, "--cache-ttl", help="Seconds a cached response stays valid.")


def router_options(host, port, strategy, weights, prefix_threshold, session_header, retries, connect_timeout,
                   read_timeout, probe_interval, probe_timeout, no_cache, cache_bytes, cache_ttl, grace, api_key):
    from scaletrain.serve.fleet.fleet import RouterOptions

    return RouterOptions(host, port, strategy, weights, prefix_threshold, session_header, retries,
                         connect_timeout, read_timeout, probe_interval, probe_timeout, cache=not no_cache,
                         cache_bytes=cache_bytes, cache_ttl_s=cache_ttl, grace_s=grace, api_key=api_key)


def router(
    backend: List[str] = typer.Option([], "--backend", help="Base URL of an engine (repeat for each)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    strategy: str = STRATEGY,
    weights: Optional[str] = WEIGHTS,
    prefix_threshold: int = PREFIX_THRESHOLD,
    session_header: str = SESSION_HEADER,
    retries: int = RETRIES,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    probe_interval: float = PROBE_INTERVAL,
    probe_timeout: float = PROBE_TIMEOUT,
    no_cache: bool = NO_CACHE,
    cache_bytes: str = CACHE_BYTES,
    cache_ttl: float = CACHE_TTL,
    grace: float = typer.Option(30.0, "--grace", help="Seconds in-flight requests get to finish on SIGTERM."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SCALETRAIN_API_KEY",
                                          help="The engines' key: for the health probes, and required here."),
) -> None:
    """Front engines started elsewhere: one OpenAI endpoint with load balancing, health checks, retries,
    circuit breaking and a response cache."""
    from scaletrain.serve.fleet.fleet import run_router

    opts = router_options(host, port, strategy, weights, prefix_threshold, session_header, retries,
                          connect_timeout, read_timeout, probe_interval, probe_timeout, no_cache, cache_bytes,
                          cache_ttl, grace, api_key)
    raise typer.Exit(run_router(list(backend), opts))


def replica_args(opts) -> list[str]:
    """The engine options of ``scaletrain serve`` passed on to every replica."""
    args = ["--tp", str(opts.tp), "--dtype", opts.dtype, "--max-num-seqs", str(opts.max_num_seqs),
            "--max-batch-tokens", str(opts.max_batch_tokens), "--block-size", str(opts.block_size),
            "--max-queue", str(opts.max_queue), "--grace", str(opts.grace_s), "--attention", opts.attention]
    optional = [("--kv-cache-tokens", opts.kv_cache_tokens), ("--kv-cache-bytes", opts.kv_cache_bytes),
                ("--threads", opts.threads), ("--model-memory-budget", opts.model_memory_budget),
                ("--debug-step-delay", opts.debug_step_delay_s or None)]
    args += [a for flag, value in optional if value is not None for a in (flag, str(value))]
    args += [] if opts.prefix_caching else ["--no-prefix-caching"]
    for spec in opts.models:
        args += ["--model", spec]
    if not opts.models:
        args += ["--served-model-name", opts.served_model_name or opts.model]
    return args


def parse_threads(text: str | None) -> list[int]:
    from scaletrain.errors import UserError

    if not text:
        return []
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        threads = []
    if not threads or any(t < 1 for t in threads):
        raise UserError(f"--replica-threads {text!r}; allowed: positive integers, one per replica (e.g. 2,1)")
    return threads


def parse_step_delays(text: str | None) -> list[float]:
    """--replica-debug-step-delay 0,0.03: seconds slept after every engine step, per replica in order."""
    from scaletrain.errors import UserError

    if not text:
        return []
    try:
        delays = [float(d) for d in text.split(",")]
    except ValueError:
        delays = []
    if not delays or not all(0 <= d <= 60 for d in delays):
        raise UserError(f"--replica-debug-step-delay {text!r}; allowed: seconds in 0..60, one per replica "
                        "(e.g. 0,0.03)")
    return delays
