"""Typer commands of serving: ``scaletrain serve`` and ``scaletrain bench
serve``. Only typer at import time; the work loads when a command runs."""

from __future__ import annotations

from typing import List, Optional

import typer

from scaletrain.serve.fleet import cli as fleet_cli
from scaletrain.serve.fleet.cli import router  # noqa: F401  (registered by scaletrain.cli)


def serve(
    model: Optional[str] = typer.Argument(None, help="A scaletrain checkpoint directory, a run directory (its "
                                          "newest valid checkpoint) or a HF Llama folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 to accept remote clients)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel processes holding the model split Megatron-style."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights and KV cache: fp32, bf16 or fp16."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Sequences in the running batch at most."),
    max_batch_tokens: int = typer.Option(512, "--max-batch-tokens", help="Tokens computed per step at most "
                                         "(decodes + prefill chunks)."),
    kv_cache_tokens: Optional[int] = typer.Option(None, "--kv-cache-tokens", help="KV-cache size in tokens."),
    kv_cache_bytes: Optional[int] = typer.Option(None, "--kv-cache-bytes", help="KV-cache size in bytes per "
                                                 "rank (default: a quarter of the available memory, at most "
                                                 "max-num-seqs full contexts)."),
    block_size: int = typer.Option(16, "--block-size", help="Tokens per KV-cache block."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SCALETRAIN_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (all endpoints but /health)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model name in the API "
                                                    "(default: MODEL as given)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests past which new ones get 429."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching", help="Turn prefix caching off."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds in-flight requests get to finish on SIGTERM."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per process (default: torch's)."),
    attention: str = typer.Option("auto", "--attention", help="CPU attention: rows (a contiguous K/V row per "
                                  "running sequence, no per-step gather), gather (copy blocks every step), or "
                                  "auto (rows where max-num-seqs full contexts fit in memory)."),
    model_specs: List[str] = typer.Option([], "--model", help="NAME=PATH, repeatable: several models by name, "
                                          "loaded on first use, least recently used evicted past the budget."),
    model_memory_budget: Optional[str] = typer.Option(None, "--model-memory-budget", help="Bytes for the loaded "
                                                      "models of one process (e.g. 8G; default half the free "
                                                      "memory)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Engine processes behind a router (a fleet)."),
    router_port: Optional[int] = typer.Option(None, "--router-port", help="The router's port (default --port)."),
    strategy: str = fleet_cli.STRATEGY,
    weights: Optional[str] = fleet_cli.WEIGHTS,
    prefix_threshold: int = fleet_cli.PREFIX_THRESHOLD,
    session_header: str = fleet_cli.SESSION_HEADER,
    retries: int = fleet_cli.RETRIES,
    connect_timeout: float = fleet_cli.CONNECT_TIMEOUT,
    read_timeout: float = fleet_cli.READ_TIMEOUT,
    probe_interval: float = fleet_cli.PROBE_INTERVAL,
    probe_timeout: float = fleet_cli.PROBE_TIMEOUT,
    no_cache: bool = fleet_cli.NO_CACHE,
    cache_bytes: str = fleet_cli.CACHE_BYTES,
    cache_ttl: float = fleet_cli.CACHE_TTL,
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="Autoscaling: fewest replicas."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="Autoscaling: most replicas."),
    target_ongoing_requests: float = typer.Option(2.0, "--target-ongoing-requests", help="Autoscaling: requests "
                                                  "in flight per replica to aim for (Ray Serve's default 2)."),
    upscale_delay: float = typer.Option(30.0, "--upscale-delay", help="Autoscaling: seconds a wish for more "
                                        "replicas must hold."),
    downscale_delay: float = typer.Option(600.0, "--downscale-delay", help="Autoscaling: seconds a wish for "
                                          "fewer replicas must hold."),
    look_back: float = typer.Option(30.0, "--look-back", help="Autoscaling: seconds of in-flight samples "
                                    "averaged."),
    replica_threads: Optional[str] = typer.Option(None, "--replica-threads", help="torch threads per replica, "
                                                  "in order (e.g. 2,1; default the cores shared out)."),
    debug_step_delay: float = typer.Option(0.0, "--debug-step-delay", help="Debugging/benchmarks: seconds the "
                                           "engine sleeps after every step, making this server really slower."),
    replica_debug_step_delay: Optional[str] = typer.Option(None, "--replica-debug-step-delay", help="Debugging/"
                                                           "benchmarks: --debug-step-delay per replica, in order "
                                                           "(e.g. 0,0.03: the second replica slower)."),
    follow: bool = typer.Option(False, "--follow", help="MODEL is a training run: roll the replicas to each new "
                                "valid checkpoint, one at a time."),
) -> None:
    """Serve a model with an OpenAI-compatible API (continuous batching, paged KV cache, prefix caching);
    with --replicas, a fleet of engines behind a router."""
    from scaletrain.errors import UserError
    from scaletrain.serve.server import ServeOptions, serve as run

    if (model is None) == (not model_specs):
        raise UserError("give MODEL or --model NAME=PATH (repeatable), not both" if model else
                        "missing MODEL (a checkpoint, run directory or HF folder) or --model NAME=PATH")
    opts = ServeOptions(model, host, port, tp, dtype, max_num_seqs, max_batch_tokens, kv_cache_tokens,
                        kv_cache_bytes, block_size, api_key, served_model_name, max_queue, not no_prefix_caching,
                        grace, threads, attention, tuple(model_specs), model_memory_budget, debug_step_delay)
    if replicas is None and min_replicas is None and max_replicas is None and not follow:
        raise typer.Exit(run(opts))
    from scaletrain.serve.fleet.fleet import FleetOptions, run_fleet
    from scaletrain.serve.server import check_options

    check_options(opts)
    ropts = fleet_cli.router_options(host, router_port if router_port is not None else port, strategy, weights,
                                     prefix_threshold, session_header, retries, connect_timeout, read_timeout,
                                     probe_interval, probe_timeout, no_cache, cache_bytes, cache_ttl, grace,
                                     api_key)
    count = replicas if replicas is not None else (min_replicas or 1)
    fopts = FleetOptions(count, min_replicas, max_replicas, target_ongoing_requests, upscale_delay,
                         downscale_delay, look_back, fleet_cli.parse_threads(replica_threads), follow,
                         replica_step_delays=fleet_cli.parse_step_delays(replica_debug_step_delay))
    raise typer.Exit(run_fleet(model, fleet_cli.replica_args(opts), ropts, fopts))


def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Base URL of an OpenAI-compatible server."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (default: the server's first)."),
    concurrency: str = typer.Option("1,4,16,64", "--concurrency", help="Comma-separated concurrency levels."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Requests per level (default: "
                                              "max(16, 2 x concurrency))."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="max_tokens of every request."),
    time_limit: float = typer.Option(300.0, "--time-limit", help="Seconds per level at most."),
    api_key: str = typer.Option("none", "--api-key", envvar="OPENAI_API_KEY", help="Bearer key, if the server needs one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Load-test a running server: streamed greedy completions of a fixed prompt set
    (mixed lengths, half sharing a long prefix); throughput, TTFT, TPOT, ITL."""
    import asyncio
    import json

    import httpx

    from scaletrain.errors import UserError
    from scaletrain.serve.loadgen import format_table, prompt_set, run_load

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise UserError(f"--concurrency {concurrency!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if any(c < 1 for c in levels) or max_tokens < 1 or (num_prompts is not None and num_prompts < 1):
        raise UserError("--concurrency, --num-prompts and --max-tokens must be positive")
    base = url.rstrip("/")
    try:
        listed = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    except httpx.TransportError as exc:
        raise UserError(f"--url {url}: cannot reach the server ({exc})") from None
    if listed.status_code != 200:
        raise UserError(f"--url {url}: GET /v1/models answered {listed.status_code}: {listed.text[:200]}")
    entry = next((m for m in listed.json()["data"] if m["id"] == model), listed.json()["data"][0])
    model = model or entry["id"]
    # Prompts (byte-tokenizer characters) short enough for the context, where the server says it.
    max_chars = min(800, entry.get("max_model_len", 1 << 30) - max_tokens - 8)
    if max_chars < 64:
        raise UserError(f"--max-tokens {max_tokens} leaves too little of the model's context for the prompts")
    rows = []
    for level in levels:
        prompts = prompt_set(num_prompts or max(16, 2 * level), seed=level, shared_prefix_chars=min(384, max_chars // 2),
                             max_chars=max_chars)
        rows.append({"server": base, **asyncio.run(run_load(f"{base}/v1", model, prompts, level, max_tokens,
                                                             time_limit, api_key))})
    print(json.dumps(rows, indent=1) if as_json else format_table(rows))
