"""``scaletrain serve --model NAME=PATH ...``: one engine process serving
several models by name through models.ModelPool. Each loaded model is a
complete single-model server (serve/api.py over its own engine); this ASGI
app reads the request's ``model`` and hands the request to it, so every
error of the engine's contract comes out unchanged. ``/v1/models`` lists
every model with ``loaded``; ``/metrics`` merges the loaded models'
metrics with the loader's own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.responses import JSONResponse, Response

from scaletrain.errors import UserError
from scaletrain.serve.fleet.models import LoadedEntry, ModelPool
from scaletrain.serve.protocol import APIError

DISPATCHED = ("/v1/completions", "/v1/chat/completions")


def parse_model_specs(specs) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {spec!r}; expected NAME=PATH (e.g. --model chat=runs/chat)")
        if name in out:
            raise UserError(f"--model {name}: given twice")
        out[name] = path
    return out


def build_entry(opts, name: str, path: str) -> LoadedEntry:
    """Load one model, warm it up, and start its engine and API."""
    from scaletrain.serve.api import ServerState, build_app
    from scaletrain.serve.async_engine import AsyncEngine
    from scaletrain.serve.loader import load_model
    from scaletrain.serve.metrics import ServeMetrics
    from scaletrain.serve.server import _fatal, build_engine, use_rows

    loaded = load_model(Path(path), opts.dtype)
    with torch.no_grad():  # warm-up forward: first-use allocations happen before a request waits on them
        loaded.model(torch.zeros(1, 8, dtype=torch.long))
    cfg = loaded.model.cfg
    engine = build_engine(opts, loaded, rows=use_rows(opts, cfg, 1))
    metrics = ServeMetrics(name)
    async_engine = AsyncEngine(engine, metrics, _fatal(None), opts.debug_step_delay_s).start()
    state = ServerState(async_engine, metrics, loaded.tokenizer, loaded.chat_template, name, cfg.max_seq_len,
                        engine.vocab_limit, opts.api_key, opts.max_queue, int(time.time()), str(loaded.checkpoint))
    tensors = [*loaded.model.parameters(), *loaded.model.buffers(), engine.cache.k, engine.cache.v]
    if engine.rows is not None:
        tensors += [engine.rows.k, engine.rows.v]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    print(f"loaded model {name} from {loaded.checkpoint} ({nbytes / 2**20:.1f} MiB with its KV cache)", flush=True)
    return LoadedEntry(name, build_app(state), nbytes, async_engine.shutdown, metrics.registry)


class _Merged:
    """One Prometheus collector over the loaded models' registries (a family
    must appear once in the exposition, with all its samples)."""

    def __init__(self, pool: ModelPool):
        self.pool = pool

    def collect(self):
        families = {}
        for entry in list(self.pool.loaded.values()):
            for family in entry.registry.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        return iter(families.values())


class MultiModelApp:
    def __init__(self, pool: ModelPool, api_key: str | None):
        self.pool, self.api_key = pool, api_key
        self.registry = r = CollectorRegistry()
        r.register(_Merged(pool))
        self.loads = Counter("scaletrain:model_loads", "Models loaded (first use, or again after eviction).",
                             ["model_name"], registry=r)
        self.evictions = Counter("scaletrain:model_evictions", "Models evicted (least recently used past the "
                                 "budget).", ["model_name"], registry=r)
        self.loaded = Gauge("scaletrain:model_loaded", "1 if the model is in memory.", ["model_name"], registry=r)
        self.used = Gauge("scaletrain:model_memory_bytes", "Bytes of the loaded models (weights + KV cache).",
                          registry=r)
        self.budget = Gauge("scaletrain:model_memory_budget_bytes", "The loaded models' memory budget.", registry=r)
        pool.on_load = lambda name: self.loads.labels(name).inc()
        pool.on_evict = lambda name: self.evictions.labels(name).inc()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        authorized = not self.api_key or scope["path"] == "/health" or \
            dict(scope["headers"]).get(b"authorization", b"").decode() == f"Bearer {self.api_key}"
        if not authorized:
            error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                             "invalid_api_key", "authentication_error")
            return await JSONResponse(error.body(), 401)(scope, receive, send)
        if method == "POST" and path in DISPATCHED:
            return await self._dispatch(scope, receive, send)
        if method == "GET" and path == "/health":
            return await Response(status_code=200)(scope, receive, send)
        if method == "GET" and path == "/v1/models":
            return await JSONResponse({"object": "list", "data": self.listing()})(scope, receive, send)
        if method == "GET" and path == "/metrics":
            return await Response(self.render(), media_type="text/plain; version=0.0.4; charset=utf-8")(
                scope, receive, send)
        await JSONResponse(APIError(404, "Not Found", None, "not_found").body(), 404)(scope, receive, send)

    def listing(self) -> list[dict]:
        return [{"id": name, "object": "model", "owned_by": "scaletrain", "root": path,
                 "loaded": name in self.pool.loaded, "loading": name in self.pool.loading}
                for name, path in self.pool.paths.items()]

    def render(self) -> bytes:
        for name in self.pool.paths:
            self.loaded.labels(name).set(name in self.pool.loaded)
            self.loads.labels(name).inc(0)
            self.evictions.labels(name).inc(0)
        self.used.set(self.pool.used_bytes())
        self.budget.set(self.pool.budget_bytes)
        return generate_latest(self.registry)

    async def _dispatch(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            name = json.loads(body).get("model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            name = None
        if name not in self.pool.paths:
            served = ", ".join(f"`{n}`" for n in self.pool.paths)
            error = APIError(404, f"The model `{name}` does not exist; this server serves {served}.", "model",
                             "model_not_found") if isinstance(name, str) else \
                APIError(400, "the body must be a JSON object with a `model`", "model", "invalid_value")
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        try:
            entry = await self.pool.acquire(name)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load is this request's error
            error = APIError(500, f"could not load model `{name}`: {exc}", "model", "model_load_failed",
                             "server_error")
            return await JSONResponse(error.body(), 500)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await entry.app(scope, replay, send)
        finally:
            self.pool.release(entry)


def serve_models(opts) -> int:
    import psutil

    from scaletrain.debug.cli import parse_bytes
    from scaletrain.serve.loader import find_weights
    from scaletrain.serve.server import run_app

    if opts.tp > 1:
        raise UserError("--model NAME=PATH serves several models in one process; --tp is for one model")
    paths = parse_model_specs(opts.models)
    for path in paths.values():
        find_weights(Path(path))  # a bad PATH is an error line now, not at its first request
    budget = parse_bytes(opts.model_memory_budget, "--model-memory-budget") if opts.model_memory_budget \
        else psutil.virtual_memory().available // 2
    pool = ModelPool(paths, budget, lambda name, path: build_entry(opts, name, path))
    app = MultiModelApp(pool, opts.api_key)

    def cleanup() -> None:
        for entry in list(pool.loaded.values()):
            entry.close()

    banner = (f"serving {len(paths)} models ({', '.join(paths)}; loaded on first use, budget "
              f"{budget / 2**20:.1f} MiB) on http://{opts.host}:{opts.port}")
    return run_app(opts, app, banner, cleanup)
