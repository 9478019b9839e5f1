"""``scaletrain serve``: load MODEL, size the KV cache, start the engine (and
its tensor-parallel workers), run uvicorn until Ctrl-C / SIGTERM.

Shutdown: uvicorn stops accepting connections and gives in-flight requests
``grace_s`` to finish, then cancels the rest; the engine and the workers stop
and the process exits 0. A failed engine step (a worker gone) prints one
``error:`` line and exits 1 at once."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from scaletrain.errors import UserError

DEFAULT_KV_MEMORY_FRACTION = 0.25  # of the available memory, when neither --kv-cache-* is given


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    dtype: str = "fp32"
    max_num_seqs: int = 64
    max_batch_tokens: int = 512
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    block_size: int = 16
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 256
    prefix_caching: bool = True
    grace_s: float = 30.0
    threads: int | None = None
    attention: str = "auto"  # rows, gather, or auto (rows where they fit in memory)
    models: tuple[str, ...] = ()  # NAME=PATH: several models, loaded on first use (serve/fleet/replica.py)
    model_memory_budget: str | None = None  # bytes for the loaded models together (default: half the free memory)
    debug_step_delay_s: float = 0.0  # slept after every engine step, to make a replica slower (async_engine.py)


def check_options(opts: ServeOptions) -> None:
    checks = [(opts.tp >= 1, f"--tp {opts.tp}: must be at least 1"),
              (opts.max_num_seqs >= 1, f"--max-num-seqs {opts.max_num_seqs}: must be at least 1"),
              (opts.max_batch_tokens >= 1, f"--max-batch-tokens {opts.max_batch_tokens}: must be at least 1"),
              (opts.block_size >= 1, f"--block-size {opts.block_size}: must be at least 1"),
              (opts.max_queue >= 1, f"--max-queue {opts.max_queue}: must be at least 1"),
              (0 <= opts.port < 65536, f"--port {opts.port}: must be in 0..65535"),
              (not (opts.kv_cache_tokens and opts.kv_cache_bytes), "give --kv-cache-tokens or --kv-cache-bytes, not both"),
              (opts.attention in ("auto", "rows", "gather"), f"--attention {opts.attention!r}; allowed: auto, rows, gather"),
              (0 <= opts.debug_step_delay_s <= 60, f"--debug-step-delay {opts.debug_step_delay_s}: allowed 0..60 seconds")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def check_tp(cfg, tp: int) -> None:
    for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                        ("vocab_size", cfg.vocab_size)):
        if value % tp:
            raise UserError(f"--tp {tp} does not divide the model's {name} ({value})")


def kv_blocks(opts: ServeOptions, cfg, tp: int) -> int:
    """Blocks of the KV cache; a UserError if one longest sequence does not fit."""
    from scaletrain.serve.kv_cache import KVCache
    from scaletrain.serve.loader import DTYPES

    per_token = KVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads // tp, cfg.dim // cfg.n_heads,
                                        DTYPES[opts.dtype])
    if opts.kv_cache_tokens:
        tokens = opts.kv_cache_tokens
    elif opts.kv_cache_bytes:
        tokens = opts.kv_cache_bytes // per_token
    else:
        import psutil

        budget = int(psutil.virtual_memory().available * DEFAULT_KV_MEMORY_FRACTION) // tp
        tokens = min(opts.max_num_seqs * cfg.max_seq_len, budget // per_token)
    blocks = tokens // opts.block_size
    if blocks * opts.block_size < cfg.max_seq_len:
        raise UserError(f"the KV cache holds {blocks * opts.block_size} tokens, less than one sequence of the "
                        f"model's context ({cfg.max_seq_len}); raise --kv-cache-tokens / --kv-cache-bytes")
    return blocks


def use_rows(opts: ServeOptions, cfg, tp: int) -> bool:
    """--attention auto: a row cache where max-num-seqs full contexts fit in
    the default KV memory budget; otherwise attention gathers blocks each step."""
    if opts.attention != "auto":
        return opts.attention == "rows"
    import psutil

    from scaletrain.serve.kv_cache import RowKV
    from scaletrain.serve.loader import DTYPES

    need = RowKV.nbytes(cfg.n_layers, opts.max_num_seqs, cfg.max_seq_len, cfg.n_kv_heads // tp,
                        cfg.dim // cfg.n_heads, DTYPES[opts.dtype])
    return need <= psutil.virtual_memory().available * DEFAULT_KV_MEMORY_FRACTION / tp


def build_engine(opts: ServeOptions, loaded, execute=None, tp: int = 1, rows: bool = False):
    from scaletrain.serve.engine import Engine, EngineConfig
    from scaletrain.serve.kv_cache import KVCache, RowKV
    from scaletrain.serve.loader import DTYPES

    cfg = loaded.model.cfg
    num_blocks = kv_blocks(opts, cfg, tp)
    shape = (cfg.n_kv_heads // tp, cfg.dim // cfg.n_heads, DTYPES[opts.dtype])
    cache = KVCache(cfg.n_layers, num_blocks, opts.block_size, *shape)
    row_cache = RowKV(cfg.n_layers, opts.max_num_seqs, cfg.max_seq_len, *shape) if rows else None
    engine_cfg = EngineConfig(num_blocks, opts.block_size, opts.max_num_seqs, opts.max_batch_tokens,
                              opts.prefix_caching)
    vocab_limit = min(loaded.tokenizer.vocab_size, cfg.vocab_size)
    return Engine(loaded.model, cache, engine_cfg, loaded.eos_id, loaded.tokenizer.decode, vocab_limit, execute,
                  row_cache)


def serve(opts: ServeOptions) -> int:
    from scaletrain.serve.loader import load_model

    check_options(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.models:
        from scaletrain.serve.fleet.replica import serve_models

        return serve_models(opts)
    loaded = load_model(Path(opts.model), opts.dtype)  # a bad MODEL fails before any worker starts
    if opts.tp > 1:
        check_tp(loaded.model.cfg, opts.tp)
    kv_blocks(opts, loaded.model.cfg, opts.tp)  # a KV cache too small fails before any worker starts
    opts.attention = "rows" if use_rows(opts, loaded.model.cfg, opts.tp) else "gather"  # one choice for every rank
    workers = None
    if opts.tp > 1:
        from scaletrain.serve import tp as tp_mod

        workers = tp_mod.Workers.start(opts)
        tp_mod.shard(loaded.model, workers.mesh)
    engine = build_engine(opts, loaded, tp=opts.tp, rows=opts.attention == "rows")
    if workers is not None:
        engine.execute = workers.executor(loaded.model, engine.cache, engine.rows)
    return _run_http(opts, loaded, engine, workers)


def _fatal(workers):
    def on_fatal(exc: BaseException) -> None:
        reason = workers.failure() if workers is not None else None
        if reason is None:  # a bug, not a worker gone: keep the traceback
            traceback.print_exception(exc, file=sys.stderr)
        print(f"error: the engine stopped: {reason or exc}; shutting down", file=sys.stderr, flush=True)
        if workers is not None:
            workers.kill()
        os._exit(1)

    return on_fatal


def _run_http(opts: ServeOptions, loaded, engine, workers) -> int:
    from scaletrain.serve.api import ServerState, build_app
    from scaletrain.serve.async_engine import AsyncEngine
    from scaletrain.serve.metrics import ServeMetrics

    name = opts.served_model_name or opts.model
    metrics = ServeMetrics(name)
    on_fatal = _fatal(workers)
    async_engine = AsyncEngine(engine, metrics, on_fatal, opts.debug_step_delay_s).start()
    if workers is not None:
        workers.watch(on_fatal)
    state = ServerState(async_engine, metrics, loaded.tokenizer, loaded.chat_template, name,
                        loaded.model.cfg.max_seq_len, engine.vocab_limit, opts.api_key, opts.max_queue, int(time.time()),
                        str(loaded.checkpoint))
    cfg = loaded.model.cfg
    banner = (f"serving {name} ({loaded.checkpoint}; {cfg.n_layers} layers, dim {cfg.dim}, context {cfg.max_seq_len}, "
              f"tp {opts.tp}, KV cache {engine.cfg.num_blocks} blocks x {engine.cfg.block_size} tokens, attention "
              f"{opts.attention}) on http://{opts.host}:{opts.port}")

    def cleanup() -> None:
        async_engine.shutdown()
        if workers is not None:
            workers.stop()

    return run_app(opts, build_app(state), banner, cleanup)


def run_app(opts, app, banner: str | None, cleanup, main=None) -> int:
    """uvicorn on opts.host:port until SIGINT/SIGTERM (graceful for opts.grace_s), then ``cleanup()``.
    ``main(server)``: a coroutine that runs ``server.serve()`` with work of its own around it (the
    fleet's probes and replicas); it may set ``server.failed`` for exit code 1."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=opts.grace_s, lifespan="off")
    server = uvicorn.Server(config)
    server.failed = False
    received: list[int] = []
    # uvicorn restores these handlers and re-raises the signal after its
    # graceful shutdown: record it instead of dying by it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    if banner:
        print(banner, flush=True)
    try:
        server.run() if main is None else asyncio.run(main(server))
    except SystemExit:  # uvicorn exits when it cannot bind
        pass
    finally:
        cleanup()
    if not server.started:
        raise UserError(f"could not listen on {opts.host}:{opts.port} (in use?)")
    print(f"stopped{' by signal ' + str(received[0]) if received else ''}", flush=True)
    return 1 if server.failed else 0
