"""Serving: ``scaletrain serve``.

engine.py (requests -> steps -> tokens and text) over scheduler.py
(continuous batching, chunked prefill, preemption), kv_cache.py (paged
blocks, prefix cache, row cache), runner.py (one forward per step with the
model's own modules) and sampling.py; async_engine.py runs the engine in a
thread for api.py (FastAPI, OpenAI protocol in protocol.py, metrics.py);
server.py starts it all, tp.py the tensor-parallel workers, loader.py reads
MODEL; loadgen.py is the load generator of ``scaletrain bench serve``."""
