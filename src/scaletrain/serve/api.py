"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events ending ``data: [DONE]``),
/health and /metrics.

Bodies are parsed by hand (protocol.parse) so that every error, a schema
mismatch included, has OpenAI's shape. A client that goes away cancels its
request: a stream's generator is closed by Starlette, a plain request is
watched for ``http.disconnect``; either way the engine frees its blocks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaletrain.data.chat import render_chat
from scaletrain.serve.async_engine import AsyncEngine
from scaletrain.serve.engine import ChoiceOutput
from scaletrain.serve.metrics import ServeMetrics
from scaletrain.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_context, parse,
                                       sampling_params)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: ServeMetrics
    tokenizer: object
    chat_template: str | None
    model_name: str
    max_model_len: int
    vocab_limit: int
    api_key: str | None = None
    max_queue: int = 256
    created: int = 0
    root: str | None = None  # the checkpoint or folder the weights came from (vLLM's `root`)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="scaletrain serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                                 "invalid_api_key", "authentication_error")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.engine.alive() else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "scaletrain", "max_model_len": state.max_model_len,
                                            "root": state.root}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        _check_model(state, req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported")
        prompts = _prompt_tokens(state, req.prompt)
        max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        for prompt in prompts:
            check_context(len(prompt), max_tokens, state.max_model_len)
        params = sampling_params(req, max_tokens, req.logprobs)
        return await _respond(state, request, "cmpl", req, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await request.body())
        _check_model(state, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(messages, state.chat_template)
        except Exception as exc:  # a Jinja template that raises on these messages
            raise APIError(400, f"the chat template failed on these messages: {exc}", "messages") from None
        prompt = state.tokenizer.encode(text)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = check_context(len(prompt), requested, state.max_model_len)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, logprobs)
        return await _respond(state, request, "chatcmpl", req, [prompt], params, chat=True)

    return app


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
                       "model", "model_not_found")


def _prompt_tokens(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
    tokens = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for ids in tokens:
        if any(not 0 <= t < state.vocab_limit for t in ids):
            raise APIError(400, f"prompt token ids must be in 0..{state.vocab_limit - 1}", "prompt", "invalid_value")
    return tokens


async def _respond(state: ServerState, request: Request, prefix: str, req, prompts, params, chat: bool):
    if state.engine.queue_length() >= state.max_queue:
        raise APIError(429, f"the server has {state.max_queue} requests queued; retry later", None,
                       "rate_limit_exceeded", "rate_limit_error")
    if not state.engine.alive():
        raise APIError(503, "the engine has stopped", None, "engine_dead", "server_error")
    builder = _Builder(state, f"{prefix}-{uuid.uuid4().hex}", req.model, chat, sum(map(len, prompts)))
    outputs = state.engine.generate(prompts, params, req.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(builder, outputs, len(prompts) * req.n, include_usage),
                                 media_type="text/event-stream")
    collect = asyncio.ensure_future(builder.collect(outputs, len(prompts) * req.n))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not collect.done():  # the client left: cancelling closes the generator, which aborts the request
        collect.cancel()
        await asyncio.gather(collect, return_exceptions=True)
        return Response(status_code=499)
    gone.cancel()
    return collect.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(builder: "_Builder", outputs: AsyncIterator[ChoiceOutput], n_choices: int,
               include_usage: bool) -> AsyncIterator[str]:
    try:
        if builder.chat:
            for index in range(n_choices):
                yield _event(builder.chunk(index, None, None, [], role=True, with_usage=include_usage))
        async for out in outputs:
            builder.count(out)
            if out.text or out.finish_reason or out.logprobs:
                yield _event(builder.chunk(out.index, out.text, out.finish_reason, out.logprobs,
                                           with_usage=include_usage))
        if include_usage:
            yield _event({**builder.header("chunk"), "choices": [], "usage": builder.usage()})
        yield "data: [DONE]\n\n"
    finally:
        await outputs.aclose()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Builder:
    """OpenAI response and chunk bodies for one request."""

    def __init__(self, state: ServerState, request_id: str, model: str, chat: bool, prompt_tokens: int):
        self.state, self.id, self.model, self.chat = state, request_id, model, chat
        self.created = int(time.time())
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = prompt_tokens, {}, {}

    def header(self, kind: str) -> dict:
        obj = ("chat.completion" if kind == "full" else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def count(self, out: ChoiceOutput) -> None:
        self.completion_tokens[out.index] = out.completion_tokens
        self.cached_tokens[out.request_id] = out.cached_tokens

    def usage(self) -> dict:
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}

    def _token(self, token: int) -> str:
        return self.state.tokenizer.decode([token])

    def logprobs(self, entries: list) -> dict | None:
        if self.chat:
            return {"content": [{"token": self._token(t), "logprob": lp.logprob,
                                 "bytes": list(self._token(t).encode()),
                                 "top_logprobs": [{"token": self._token(a), "logprob": v,
                                                   "bytes": list(self._token(a).encode())} for a, v in lp.top]}
                                for t, lp in entries]}
        return {"tokens": [self._token(t) for t, _ in entries],
                "token_logprobs": [lp.logprob for _, lp in entries],
                # Worst first, so that of two ids with the same text the better one stays.
                "top_logprobs": [{self._token(a): v for a, v in reversed(lp.top)} for _, lp in entries],
                "text_offset": []}

    def chunk(self, index: int, text, finish_reason, logprobs, role: bool = False, with_usage: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": self.logprobs(logprobs) if logprobs else None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason,
                      "logprobs": self.logprobs(logprobs) if logprobs else None}
        return {**self.header("chunk"), "choices": [choice], **({"usage": None} if with_usage else {})}

    async def collect(self, outputs: AsyncIterator[ChoiceOutput], n_choices: int) -> dict:
        texts, finish, logprobs = [""] * n_choices, [None] * n_choices, [[] for _ in range(n_choices)]
        wants_logprobs = False
        async for out in outputs:
            self.count(out)
            texts[out.index] += out.text
            logprobs[out.index] += out.logprobs
            wants_logprobs |= bool(out.logprobs)
            if out.finish_reason:
                finish[out.index] = out.finish_reason
        choices = []
        for i in range(n_choices):
            lp = self.logprobs(logprobs[i]) if wants_logprobs else None
            if lp is not None and not self.chat:
                lp["text_offset"] = _offsets(lp["tokens"])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "finish_reason": finish[i], "logprobs": lp})
            else:
                choices.append({"index": i, "text": texts[i], "finish_reason": finish[i], "logprobs": lp})
        return {**self.header("full"), "choices": choices, "usage": self.usage()}


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return offsets
