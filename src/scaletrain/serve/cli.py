"""Typer commands of serving: ``scaletrain serve`` and ``scaletrain bench
serve``. Only typer at import time; the work loads when a command runs."""

from __future__ import annotations

from typing import Optional

import typer


def serve(
    model: str = typer.Argument(..., help="A scaletrain checkpoint directory, a run directory (its newest valid "
                                "checkpoint) or a HF Llama folder."),
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
) -> None:
    """Serve a model with an OpenAI-compatible API (continuous batching, paged KV cache, prefix caching)."""
    from scaletrain.serve.server import ServeOptions, serve as run

    opts = ServeOptions(model, host, port, tp, dtype, max_num_seqs, max_batch_tokens, kv_cache_tokens,
                        kv_cache_bytes, block_size, api_key, served_model_name, max_queue, not no_prefix_caching,
                        grace, threads)
    raise typer.Exit(run(opts))
