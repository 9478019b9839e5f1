"""One request through the router: cache lookup, choice of a backend, the try
(connect and read timeouts on every upstream call), retries on another
backend while nothing has reached the client, and streaming passed through
event by event.

A streamed response is held back until its first token event (a chat
stream's role event comes before any work is done), so a backend that dies
during prefill is retried like a plain request. After that a broken stream
ends with an OpenAI-shaped ``error`` event (the openai client raises on it),
never a hang: the read timeout bounds every wait for the next bytes, and a
probe that finds the backend gone cancels the wait at once."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from scaletrain.serve.fleet.backend import Backend
from scaletrain.serve.fleet.cache import cache_directives, cache_key

RETRYABLE_STATUS = {429, 502, 503, 504}  # queue full, or the backend is going away
FORWARDED_HEADERS = ("authorization", "content-type", "accept")


class _Failed(Exception):
    """A try that failed before any byte reached the client: retry elsewhere."""

    def __init__(self, kind: str, detail: str, response: Response | None = None):
        super().__init__(detail)
        self.kind, self.response = kind, response


@dataclass
class _Try:
    backend: Backend
    started: float
    upstream: httpx.Response | None = None


def error_body(status: int, message: str, code: str, kind: str = "server_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def unavailable(message: str, retry_after_s: int = 1) -> JSONResponse:
    return JSONResponse(error_body(503, message, "no_healthy_backend"), status_code=503,
                        headers={"Retry-After": str(retry_after_s)})


async def handle(router, request: Request, path: str) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    body = body if isinstance(body, dict) else None  # not ours to judge: any backend answers the error
    headers = {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS}
    stream = bool(body and body.get("stream"))
    key = cache_key(path, body, router.version_of(body.get("model"))) \
        if body is not None and router.cache is not None else None
    may_read, may_store = cache_directives(request.headers.get("cache-control"))
    if router.cache is not None:
        result = "uncacheable" if key is None else ("bypass" if not may_read else None)
        if result is None:
            entry = router.cache.get(key)
            result = "hit" if entry is not None else "miss"
            if entry is not None:
                router.metrics.cache.labels(result).inc()
                return _replay(entry)
        router.metrics.cache.labels(result).inc()
    store = key if (key is not None and may_store) else None
    route = router.route_request(body or {}, request.headers)
    tried: list[Backend] = []
    last: _Failed | None = None
    for attempt in range(router.retries + 1):
        backend = router.pick(route, exclude=tried)
        if backend is None:
            break
        tried.append(backend)
        try:
            return await _try(router, backend, path, raw, headers, stream, store, route, request)
        except _Failed as failed:
            last = failed
            router.metrics.errors.labels(backend.name, failed.kind).inc()
            if attempt < router.retries:
                router.metrics.retries.labels(backend.name).inc()
    if last is not None and last.response is not None:
        return last.response  # every try answered 429/5xx: the last answer, unchanged
    router.metrics.no_backend.inc()
    reason = f"no backend answered ({last})" if last else "no healthy backend"
    return unavailable(f"{reason}; retry later")


async def _try(router, backend: Backend, path: str, raw: bytes, headers: dict, stream: bool, store, route,
               request: Request) -> Response:
    attempt = _Try(backend, time.monotonic())
    router.dispatched(backend, route)
    load = backend.in_flight
    released = False

    def release(ok: bool) -> None:
        nonlocal released
        if not released:
            released = True
            router.finished(backend, ok, time.monotonic() - attempt.started)

    try:
        upstream = await _until_down(router, backend, request, _send(router, backend, path, raw, headers))
        attempt.upstream = upstream
        if upstream.status_code != 200:
            content = await _until_down(router, backend, request, upstream.aread())
            await upstream.aclose()
            answer = Response(content, upstream.status_code, headers=_passed_headers(upstream, backend))
            if upstream.status_code in RETRYABLE_STATUS:
                release(False)
                raise _Failed("status", f"{backend.name} answered {upstream.status_code}", answer)
            release(upstream.status_code < 500)
            return answer
        if not stream:
            content = await _until_down(router, backend, request, upstream.aread())
            await upstream.aclose()
            release(True)
            if store:
                router.cache.put(store, content, upstream.headers.get("content-type", "application/json"))
            return Response(content, 200, headers=_passed_headers(upstream, backend))
        head, rest, chunks = await _until_down(router, backend, request, _first_token(upstream))
        router.metrics.ttft.labels(backend.name).observe(time.monotonic() - attempt.started)
        backend.observe_ttft(time.monotonic() - attempt.started, load)
    except _Failed:
        raise
    except _ClientGone:
        if attempt.upstream is not None:
            await attempt.upstream.aclose()
        release(True)
        return Response(status_code=499)
    except (httpx.HTTPError, _BackendDown, json.JSONDecodeError) as exc:
        if attempt.upstream is not None:
            await attempt.upstream.aclose()
        kind = _kind(exc)
        router.pool.failure(backend, fatal=kind in ("connect", "backend_down"))
        release(False)
        raise _Failed(kind, f"{backend.name}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        if attempt.upstream is not None:
            await attempt.upstream.aclose()
        release(False)
        raise
    return StreamingResponse(_relay(router, attempt, head, rest, chunks, store, release),
                             media_type="text/event-stream", headers=_passed_headers(upstream, backend))


class _BackendDown(Exception):
    pass


class _ClientGone(Exception):
    pass


def _kind(exc: BaseException) -> str:
    if isinstance(exc, _BackendDown):
        return "backend_down"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "transport"


async def _send(router, backend: Backend, path: str, raw: bytes, headers: dict) -> httpx.Response:
    req = router.client.build_request("POST", f"{backend.url}{path}", content=raw, headers=headers)
    return await router.client.send(req, stream=True)


async def _until_down(router, backend: Backend, request: Request, work):
    """Await ``work`` unless the backend is found down or the client leaves first."""
    task = asyncio.ensure_future(work)
    down = asyncio.ensure_future(router.pool.down[backend.name].wait()) if backend.name in router.pool.down \
        else asyncio.ensure_future(asyncio.sleep(1e9))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, down, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in (down, gone):
            other.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _ClientGone() if gone.done() and not gone.cancelled() else _BackendDown("the backend was found down")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each with its blank line) and the unfinished rest."""
    *events, rest = buffer.split(b"\n\n")
    return [e + b"\n\n" for e in events], rest


def _is_token_event(event: bytes) -> bool:
    data = event.strip()
    if not data.startswith(b"data:"):
        return False
    data = data[5:].strip()
    if data == b"[DONE]":
        return True
    payload = json.loads(data)
    if "error" in payload or not payload.get("choices"):
        return True
    return any(c.get("text") or (c.get("delta") or {}).get("content") or c.get("finish_reason")
               for c in payload["choices"])


async def _first_token(upstream: httpx.Response) -> tuple[list[bytes], bytes, object]:
    """Read until the first event carrying a token (or the end): (events so far,
    the unfinished rest, the byte iterator)."""
    chunks = upstream.aiter_raw()
    held, rest = [], b""
    async for chunk in chunks:
        events, rest = _split_events(rest + chunk)
        held += events
        if any(_is_token_event(e) for e in events):
            return held, rest, chunks
    raise httpx.RemoteProtocolError("the stream ended before its first token")


async def _relay(router, attempt: _Try, head: list[bytes], pending: bytes, chunks, store, release):
    backend, upstream = attempt.backend, attempt.upstream
    kept = list(head) if store else None
    ok = False
    try:
        for event in head:
            yield event
        while True:
            try:
                chunk = await _next(router, backend, chunks)
            except StopAsyncIteration:
                break
            events, pending = _split_events(pending + chunk)
            for event in events:
                if kept is not None:
                    kept.append(event)
                yield event
        ok = True
        if kept is not None and b"".join(kept[-2:]).rstrip().endswith(b"data: [DONE]"):
            router.cache.put(store, b"".join(kept), "text/event-stream")
    except (httpx.HTTPError, _BackendDown) as exc:
        kind = "stream_broken"
        router.metrics.errors.labels(backend.name, kind).inc()
        router.pool.failure(backend, fatal=isinstance(exc, (_BackendDown, httpx.ReadError)))
        message = f"the stream from {backend.name} broke: {type(exc).__name__}: {exc}"
        yield f"data: {json.dumps(error_body(502, message, 'upstream_stream_broken'))}\n\n".encode()
    finally:
        await upstream.aclose()
        release(ok)


async def _next(router, backend: Backend, chunks) -> bytes:
    """The next upstream bytes, unless a probe finds the backend down first."""
    task = asyncio.ensure_future(chunks.__anext__())
    down = asyncio.ensure_future(router.pool.down[backend.name].wait())
    try:
        await asyncio.wait({task, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        down.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _BackendDown("the backend was found down mid-stream")


def _passed_headers(upstream: httpx.Response, backend: Backend | None = None) -> dict:
    headers = {k: v for k, v in upstream.headers.items() if k in ("content-type", "retry-after")}
    if backend is not None:
        headers["x-scaletrain-backend"] = backend.name
    return headers


def _replay(entry) -> Response:
    headers = {"x-scaletrain-cache": "hit"}
    if entry.media_type.startswith("text/event-stream"):
        events, _ = _split_events(entry.body)

        async def replay():
            for event in events:
                yield event

        return StreamingResponse(replay(), media_type=entry.media_type, headers=headers)
    return Response(entry.body, 200, media_type=entry.media_type, headers=headers)
