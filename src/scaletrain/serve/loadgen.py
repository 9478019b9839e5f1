"""A load generator for OpenAI-compatible servers, reporting what ``vllm
bench serve`` reports: request and token throughput, TTFT, TPOT and ITL
(mean, p50, p99). Requests are streamed completions sent by ``concurrency``
asyncio workers with the official ``openai`` client; the run is bounded in
requests and in time.

TTFT = first streamed text; ITL = the gaps between streamed chunks; TPOT =
(latency - TTFT) / (output tokens - 1), output tokens from the server's
``usage`` (``stream_options.include_usage``)."""

from __future__ import annotations

import asyncio
import random
import statistics
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def prompt_set(count: int, seed: int = 0, shared_prefix_chars: int = 384, max_chars: int = 800) -> list[str]:
    """Fixed prompts of mixed lengths (64..``max_chars`` characters) cut from
    this interpreter's standard library; every other one starts with the same
    ``shared_prefix_chars``-character file header (a system prompt's role)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:30])
    rng = random.Random(seed)
    prefix = text[:shared_prefix_chars]
    prompts = []
    for i in range(count):
        length = rng.randint(64, max_chars)
        start = rng.randint(shared_prefix_chars, len(text) - length)
        body = text[start:start + length]
        prompts.append(prefix + body[:max(16, length - shared_prefix_chars)] if i % 2 else body)
    return prompts


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client, model: str, prompt: str, max_tokens: int, extra: dict) -> RequestResult:
    start = time.perf_counter()
    first, last, gaps, usage = None, None, [], None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra or None)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if usage is None:
        return RequestResult(False, error="no usage in the stream (stream_options.include_usage)")
    # No text at all (an end-of-sequence token first): the first token came with the end.
    first = end if first is None else first
    return RequestResult(True, first - start, end - start, usage.completion_tokens, usage.prompt_tokens, gaps)


async def run_load(base_url: str, model: str, prompts: list, concurrency: int, max_tokens: int,
                   time_limit_s: float = 300.0, api_key: str = "none", extra: dict | None = None) -> dict:
    """Send every prompt once (``concurrency`` at a time, stopping at
    ``time_limit_s``); the summary of the run. A prompt is a string or a
    (string, body fields of that request) pair, e.g. a session's ``user``."""
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=time_limit_s,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)))
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    deadline = time.perf_counter() + time_limit_s

    async def worker():
        while not queue.empty() and time.perf_counter() < deadline:
            item = queue.get_nowait()
            prompt, fields = item if isinstance(item, tuple) else (item, {})
            results.append(await _one(client, model, prompt, max_tokens, {**(extra or {}), **fields}))

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=time_limit_s + 60)
    duration = time.perf_counter() - start
    await client.close()
    return summarize(results, duration, concurrency)


def summarize(results: list[RequestResult], duration_s: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft_s * 1e3 for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    itl = [g * 1e3 for r in ok for g in r.itl_s]
    return {
        "concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s, "output_tok_s": out_tokens / duration_s,
        "total_tok_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s, "output_tokens": out_tokens,
        "ttft_ms_mean": statistics.fmean(ttft) if ttft else float("nan"), "ttft_ms_p50": _percentile(ttft, 50),
        "ttft_ms_p99": _percentile(ttft, 99), "tpot_ms_p50": _percentile(tpot, 50),
        "tpot_ms_p99": _percentile(tpot, 99), "itl_ms_p50": _percentile(itl, 50), "itl_ms_p99": _percentile(itl, 99),
    }


def format_table(rows: list[dict]) -> str:
    cols = [("server", "{}"), ("concurrency", "{}"), ("completed", "{}"), ("request_throughput", "{:.2f}"),
            ("output_tok_s", "{:.0f}"), ("ttft_ms_p50", "{:.1f}"), ("ttft_ms_p99", "{:.1f}"),
            ("tpot_ms_p50", "{:.2f}"), ("tpot_ms_p99", "{:.2f}"), ("itl_ms_p50", "{:.2f}"), ("itl_ms_p99", "{:.2f}")]
    names = ["server", "conc", "done", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
             "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row.get(key, "")) for key, fmt in cols) + " |")
    return "\n".join(lines)
