"""The router: one OpenAI-compatible endpoint in front of many engines.

``/v1/completions`` and ``/v1/chat/completions`` go through proxy.py;
``/v1/models`` merges what the healthy backends serve (with the training
step of the checkpoint behind each model); ``/health`` lists the backends
and answers 503 + Retry-After when none can take a request; ``/metrics`` is
Prometheus text. Backends holding the requested model are preferred (a
multi-model replica loads a model on first use)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaletrain.serve.fleet import proxy
from scaletrain.serve.fleet.backend import Backend, step_of
from scaletrain.serve.fleet.cache import ResponseCache
from scaletrain.serve.fleet.metrics import RouterMetrics
from scaletrain.serve.fleet.pool import Pool
from scaletrain.serve.fleet.strategies import RouteRequest, Strategy


@dataclass
class Timeouts:
    connect_s: float = 2.0
    read_s: float = 120.0  # between two reads: a whole plain (non-streamed) generation must fit
    write_s: float = 10.0


@dataclass
class Router:
    pool: Pool
    strategy: Strategy
    metrics: RouterMetrics
    cache: ResponseCache | None = None
    retries: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    session_header: str = "x-session-id"
    describe: Callable[[Backend], dict] = lambda backend: {}  # extra /health fields (the supervisor's pid, ...)
    client: httpx.AsyncClient | None = None
    api_key: str | None = None  # checked here for /v1/models and /metrics; the engines check the rest

    def open(self) -> None:
        t = self.timeouts
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(connect=t.connect_s, read=t.read_s, write=t.write_s,
                                                               pool=t.connect_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    def route_request(self, body: dict, headers) -> RouteRequest:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], (str, list)) else prompt
            prompt = prompt if isinstance(prompt, str) else ",".join(map(str, prompt))
        if "messages" in body and isinstance(body["messages"], list):
            prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in body["messages"] if isinstance(m, dict))
        session = headers.get(self.session_header) or body.get("user")
        return RouteRequest(str(body.get("model", "")), str(prompt), str(session) if session else None)

    def pick(self, route: RouteRequest, exclude: list[Backend]) -> Backend | None:
        usable = [b for b in self.pool.backends if b not in exclude and b.usable()]
        if not usable:
            return None
        if route.model:
            holders = [b for b in usable if route.model in b.models]
            knowers = [b for b in usable if route.model in b.served]
            usable = holders or knowers or usable
        backend = self.strategy.choose(usable, route)
        backend.breaker.allows()
        backend.breaker.on_dispatch()
        return backend

    def version_of(self, model) -> str:
        """The checkpoints (vLLM's `root`) behind ``model`` on the usable backends, for the cache key."""
        roots = {str(b.served.get(model, {}).get("root")) for b in self.pool.backends if b.usable()}
        return "|".join(sorted(roots))

    def dispatched(self, backend: Backend, route: RouteRequest) -> None:
        backend.in_flight += 1
        self.metrics.requests.labels(backend.name).inc()
        self.strategy.routed(backend, route)
        if route.model and route.model in backend.served:
            backend.models.add(route.model)  # it loads on first use; the next probes confirm
            backend.sent[route.model] = time.monotonic()

    def finished(self, backend: Backend, ok: bool, latency_s: float) -> None:
        backend.in_flight -= 1
        self.metrics.latency.labels(backend.name).observe(latency_s)
        if ok:
            backend.breaker.success()

    def health(self) -> dict:
        return {"backends": [{"url": b.url, "ready": b.ready, "usable": b.usable(), "state": b.breaker.state,
                              "draining": b.draining, "in_flight": b.in_flight, "models": sorted(b.models),
                              "ewma_ttft_s": b.ewma_ttft_s, **self.describe(b)} for b in self.pool.backends],
                "healthy": sum(b.usable() for b in self.pool.backends), "strategy": self.strategy.name}

    def models(self) -> list[dict]:
        merged: dict[str, dict] = {}
        for b in self.pool.backends:
            if not b.usable():
                continue
            for name, entry in b.served.items():
                out = merged.setdefault(name, {**{k: v for k, v in entry.items() if k != "loaded"},
                                               "replicas": 0, "loaded_on": 0, "served_steps": []})
                out["replicas"] += 1
                out["loaded_on"] += name in b.models
                step = step_of(entry.get("root"))
                if step is not None and step not in out["served_steps"]:
                    out["served_steps"] = sorted(out["served_steps"] + [step])
        for out in merged.values():
            out["step"] = out["served_steps"][-1] if out["served_steps"] else None
        return list(merged.values())


def build_router_app(router: Router) -> FastAPI:
    app = FastAPI(title="scaletrain router", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(proxy.error_body(exc.status_code, str(exc.detail), "not_found", "invalid_request_error"),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if router.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {router.api_key}":
                body = proxy.error_body(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                        "invalid_api_key", "authentication_error")
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        report = router.health()
        if report["healthy"]:
            return report
        return JSONResponse(report, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(router.pool.backends, router.cache),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        data = router.models()
        if not data and not any(b.usable() for b in router.pool.backends):
            return proxy.unavailable("no healthy backend; retry later")
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await proxy.handle(router, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await proxy.handle(router, request, "/v1/chat/completions")

    return app
