"""``scaletrain router`` in front of two real engine processes on 127.0.0.1:
how each strategy distributes requests, streaming passed through, the
response cache, the engine's error contract, and what happens when
backends are dead."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleet_harness import FleetProcess, backend_of, complete
from harness import run_cli
from serve_harness import ServerProcess, free_port, make_tiny_run

ENGINE_ARGS = ["--served-model-name", "tiny", "--block-size", "8", "--max-batch-tokens", "64"]
SYSTEM = "You are a careful assistant who answers in Python. " * 3  # 156 characters: a shared prefix


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, debug_config):
    return make_tiny_run(tmp_path_factory.mktemp("fleet"), debug_config)


@pytest.fixture(scope="module")
def engines(run_dir):
    started = [ServerProcess(str(run_dir), ENGINE_ARGS) for _ in range(2)]
    yield started
    for engine in started:
        assert engine.stop() == 0, engine.output()


def router(engines, *args: str, backends=None) -> FleetProcess:
    urls = backends or [e.url for e in engines]
    flags = [a for url in urls for a in ("--backend", url)]
    return FleetProcess(["router", *flags, *args],
                        healthy=sum(u in {e.url for e in engines} for u in urls), router=True)


def concurrent(url: str, bodies: list[dict], workers: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: complete(url, **body), bodies))


LONG = {"max_tokens": 48, "ignore_eos": True}


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_outstanding", "power_of_two", "latency",
                                      "session", "prefix"])
def test_strategy_distribution(engines, strategy):
    extra = ["--weights", "3,1"] if strategy == "weighted" else []
    rt = router(engines, "--strategy", strategy, "--no-cache", *extra)
    a, b = engines[0].url, engines[1].url
    try:
        if strategy == "round_robin":
            assert Counter(backend_of(complete(rt.url)) for _ in range(8)) == {a: 4, b: 4}
        elif strategy == "weighted":
            assert Counter(backend_of(complete(rt.url)) for _ in range(8)) == {a: 6, b: 2}
        elif strategy in ("least_outstanding", "power_of_two"):
            served = Counter(backend_of(r) for r in concurrent(rt.url, [LONG] * 6, 6))
            assert set(served) == {a, b}, served
            if strategy == "least_outstanding":
                assert abs(served[a] - served[b]) <= 2, served
        elif strategy == "latency":
            for _ in range(4):
                with httpx.stream("POST", f"{rt.url}/v1/completions", json={"model": "tiny", "prompt": "x",
                                  "max_tokens": 4, "temperature": 0, "stream": True}, timeout=60) as resp:
                    resp.read()
            measured = {b["url"]: b["ewma_ttft_s"] for b in rt.health()["backends"]}
            assert all(v is not None and 0 < v < 10 for v in measured.values()), measured
            assert rt.metric("time_to_first_token_seconds_count") == 4
        elif strategy == "session":
            users = [f"user-{i}" for i in range(12)]
            homes = {}
            for _ in range(2):
                for user in users:
                    homes.setdefault(user, set()).add(backend_of(complete(rt.url, user=user)))
            assert all(len(h) == 1 for h in homes.values()), homes
            assert {next(iter(h)) for h in homes.values()} == {a, b}
            by_header = {backend_of(complete(rt.url, headers={"x-session-id": "s1"}, user=u)) for u in users[:4]}
            assert len(by_header) == 1  # the header wins over `user`
        else:  # prefix: each group stays on one engine, whose prefix cache then hits
            groups = {g: f"# group {g}\n" + SYSTEM for g in range(3)}
            where = {g: {backend_of(complete(rt.url, prompt=p + f" q{i}")) for i in range(3)} for g, p in groups.items()}
            assert all(len(w) == 1 for w in where.values()), where
        assert rt.metric("strategy_info", strategy=strategy) == 1
    finally:
        assert rt.stop() == 0, rt.output()


def sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.startswith("data: ")]


def test_streaming_cache_and_error_contract_through_the_router(engines):
    rt = router(engines, "--strategy", "round_robin")
    try:
        body = {"model": "tiny", "prompt": "import os\n", "max_tokens": 24, "temperature": 0, "stream": True}
        direct = httpx.post(f"{engines[0].url}/v1/completions", json=body, timeout=60).text
        chunks = []
        with httpx.stream("POST", f"{rt.url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = [c for c in resp.iter_raw()]
        routed = b"".join(chunks).decode()
        text = lambda s: "".join(json.loads(e[6:])["choices"][0]["text"] for e in sse_events(s) if "[DONE]" not in e)
        assert text(routed) == text(direct) and routed.rstrip().endswith("data: [DONE]")
        assert len(chunks) > 3  # passed through as it came, not as one buffered body
        # Cache: the same stream again is a replayed hit with the same events.
        with httpx.stream("POST", f"{rt.url}/v1/completions", json=body, timeout=60) as resp:
            replay = resp.read().decode()
            assert resp.headers.get("x-scaletrain-cache") == "hit"
        assert sse_events(replay) == sse_events(routed)
        plain = {k: v for k, v in body.items() if k != "stream"}
        first = httpx.post(f"{rt.url}/v1/completions", json=plain, timeout=60)
        second = httpx.post(f"{rt.url}/v1/completions", json=plain, timeout=60)
        assert "x-scaletrain-cache" not in first.headers and second.headers["x-scaletrain-cache"] == "hit"
        assert second.json() == first.json()
        fresh = httpx.post(f"{rt.url}/v1/completions", json=plain, headers={"Cache-Control": "no-cache"}, timeout=60)
        assert "x-scaletrain-cache" not in fresh.headers and fresh.json()["id"] != first.json()["id"]
        sampled = {**plain, "temperature": 0.9}
        assert all("x-scaletrain-cache" not in httpx.post(f"{rt.url}/v1/completions", json=sampled,
                                                          timeout=60).headers for _ in range(2))
        assert (rt.metric("cache_total", result="hit"), rt.metric("cache_total", result="miss"),
                rt.metric("cache_total", result="bypass"), rt.metric("cache_total", result="uncacheable")) == (2, 2, 1, 2)
        # The engine's error contract comes through unchanged.
        for bad in ({"model": "tiny", "prompt": "a", "max_tokens": 0}, {"model": "nope", "prompt": "a"}):
            ours = httpx.post(f"{rt.url}/v1/completions", json=bad, timeout=30)
            theirs = httpx.post(f"{engines[1].url}/v1/completions", json=bad, timeout=30)
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
        assert rt.metric("errors_total") == 0 and rt.metric("retries_total") == 0
        bench = run_cli(["bench", "serve", "--url", rt.url, "--concurrency", "2", "--num-prompts", "4",
                         "--max-tokens", "4", "--json"], timeout=120)
        assert bench.returncode == 0 and json.loads(bench.stdout)[0]["completed"] == 4, bench.stderr
    finally:
        assert rt.stop() == 0, rt.output()


def test_dead_backends_fail_over_and_no_backend_is_503_at_once(engines):
    dead = f"http://127.0.0.1:{free_port()}"
    rt = router(engines, "--strategy", "round_robin", "--no-cache", backends=[dead, engines[0].url])
    try:
        assert all(complete(rt.url).status_code == 200 for _ in range(6))
        health = {b["url"]: b for b in rt.health()["backends"]}
        assert not health[dead]["usable"] and health[engines[0].url]["usable"]
    finally:
        assert rt.stop() == 0, rt.output()
    rt = FleetProcess(["router", "--backend", dead], healthy=0, router=True)
    try:
        started = time.monotonic()
        resp = complete(rt.url)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1", resp.text
        assert resp.json()["error"]["code"] == "no_healthy_backend" and time.monotonic() - started < 3
        assert httpx.get(f"{rt.url}/health", timeout=5).status_code == 503
    finally:
        assert rt.stop() == 0, rt.output()


def test_a_hung_backend_is_taken_out_and_its_requests_fail_over(engines):
    """vLLM production-stack #749: one stuck backend must not hang the router's requests."""
    rt = router(engines, "--strategy", "round_robin", "--no-cache", "--probe-interval", "0.3", "--probe-timeout", "0.5")
    hung = engines[1]
    try:
        os.kill(hung.proc.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
        try:
            started = time.monotonic()
            answers = [complete(rt.url, timeout=60) for _ in range(4)]
            elapsed = time.monotonic() - started
            states = {b["url"]: b["state"] for b in rt.health()["backends"]}
        finally:
            os.kill(hung.proc.pid, signal.SIGCONT)
        assert [a.status_code for a in answers] == [200] * 4 and {backend_of(a) for a in answers} == {engines[0].url}
        assert elapsed < 10 and states[hung.url] == "open"  # three late probes, not the 120 s read timeout
        assert rt.metric("errors_total", backend=hung.url, kind="backend_down") == 1
        assert rt.metric("retries_total", backend=hung.url) == 1
        rt.wait_healthy(2, timeout_s=30)  # answers again: probed back in
    finally:
        assert rt.stop() == 0, rt.output()


@pytest.mark.parametrize("args, needle", [
    (["router", "--backend", "http://127.0.0.1:8001", "--strategy", "fastest"], "--strategy 'fastest'; allowed:"),
    (["router", "--backend", "127.0.0.1:8001"], "--backend '127.0.0.1:8001': expected http://HOST:PORT"),
    (["router"], "give at least one --backend URL"),
    (["serve", "somewhere", "--replicas", "2", "--strategy", "nope"], "--strategy 'nope'"),
])
def test_bad_router_options_are_one_error_line(args, needle):
    result = run_cli(args, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
