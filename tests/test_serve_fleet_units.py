"""The fleet's choice rules and bookkeeping as pure functions: strategies,
circuit breaker, response cache, autoscaler, LRU model pool, follow-mode
checkpoint selection, option checks."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from scaletrain.errors import UserError
from scaletrain.serve.fleet.autoscaler import AutoscaleConfig, Autoscaler
from scaletrain.serve.fleet.backend import CLOSED, HALF_OPEN, OPEN, Backend, CircuitBreaker
from scaletrain.serve.fleet.cache import ResponseCache, cache_directives, cache_key
from scaletrain.serve.fleet.models import LoadedEntry, ModelPool
from scaletrain.serve.fleet.strategies import (Latency, LeastOutstanding, PowerOfTwo, Prefix, RoundRobin,
                                               RouteRequest, Session, Weighted, make_strategy)


def backends(n: int, **kw) -> list[Backend]:
    return [Backend(f"http://b{i}", ready=True, **kw) for i in range(n)]


def picks(strategy, pool, requests) -> list[str]:
    out = []
    for req in requests:
        chosen = strategy.choose(pool, req)
        strategy.routed(chosen, req)
        out.append(chosen.name)
    return out


def test_round_robin_cycles_and_least_outstanding_takes_the_idlest():
    pool = backends(3)
    assert picks(RoundRobin(), pool, [RouteRequest()] * 6) == ["http://b0", "http://b1", "http://b2"] * 2
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 2
    assert LeastOutstanding().choose(pool, RouteRequest()).name == "http://b1"


def test_power_of_two_never_picks_the_busiest_of_its_pair():
    pool = backends(3)
    pool[2].in_flight = 10
    strategy = PowerOfTwo(seed=0)
    chosen = Counter(strategy.choose(pool, RouteRequest()).name for _ in range(300))
    # b2 only wins a pair against... nobody: it is busier than both others.
    assert chosen["http://b2"] == 0 and chosen["http://b0"] > 50 and chosen["http://b1"] > 50


def test_weighted_follows_static_and_measured_weights():
    pool = backends(2)
    pool[0].weight, pool[1].weight = 3, 1
    assert Counter(picks(Weighted(), pool, [RouteRequest()] * 8)) == {"http://b0": 6, "http://b1": 2}
    pool[0].ewma_cost_s, pool[1].ewma_cost_s = 0.1, 0.4  # capacity 10 vs 2.5: 4:1
    assert Counter(picks(Weighted(measured=True), pool, [RouteRequest()] * 10)) == {"http://b0": 8, "http://b1": 2}


def test_latency_prefers_unmeasured_then_lowest_expected_wait():
    pool = backends(3)
    pool[0].observe_ttft(0.05)
    pool[1].observe_ttft(0.8, load=4)  # timed while 4 were in flight: 0.2 per request
    assert Latency().choose(pool, RouteRequest()).name == "http://b2"  # not measured yet
    pool[2].observe_ttft(0.5)
    assert Latency().choose(pool, RouteRequest()).name == "http://b0"
    pool[0].in_flight = 5  # 0.05 x 6 = 0.3 > 0.2 x 1
    assert Latency().choose(pool, RouteRequest()).name == "http://b1"
    assert pool[1].ewma_ttft_s == 0.8 and pool[1].ewma_cost_s == 0.2
    pool[1].observe_ttft(0.1)
    assert pool[1].ewma_cost_s == pytest.approx(0.3 * 0.1 + 0.7 * 0.2)


def test_session_is_sticky_and_only_the_leaving_backends_keys_move():
    pool = backends(4)
    strategy = Session()
    users = [f"user-{i}" for i in range(200)]
    before = {u: strategy.choose(pool, RouteRequest(session=u)).name for u in users}
    assert before == {u: strategy.choose(pool, RouteRequest(session=u)).name for u in users}
    assert len(set(before.values())) == 4 and min(Counter(before.values()).values()) > 20
    after = {u: strategy.choose(pool[:3], RouteRequest(session=u)).name for u in users}
    moved = [u for u in users if before[u] != after[u]]
    assert moved and all(before[u] == "http://b3" for u in moved)
    pool[1].in_flight = 3
    assert strategy.choose(pool, RouteRequest()).name == "http://b0"  # no key: least loaded


def test_prefix_keeps_a_shared_prefix_on_one_backend_until_it_is_overloaded():
    pool = backends(3)
    strategy = Prefix(chunk_chars=16, threshold=2)
    system = "You are a helpful assistant. " * 4
    first = picks(strategy, pool, [RouteRequest(prompt=system + "question one")])[0]
    holder = next(b for b in pool if b.name == first)
    for q in ("question two", "another one"):
        holder.in_flight += 1
        assert strategy.choose(pool, RouteRequest(prompt=system + q)) is holder
    holder.in_flight += 1  # 3 > 0 + 2: the least loaded takes it
    assert strategy.choose(pool, RouteRequest(prompt=system + "x")) is not holder
    other = picks(strategy, pool, [RouteRequest(prompt="completely different text, long enough")])[0]
    assert other != first
    assert strategy.chain("a" * 40) == strategy.chain("a" * 47) and len(strategy.chain("a" * 48)) == 3


def test_prefix_counts_load_by_speed_once_backends_are_measured():
    pool = backends(2)
    strategy = Prefix(chunk_chars=16, threshold=2)
    pool[0].ewma_cost_s, pool[1].ewma_cost_s = 0.05, 0.10  # b1 takes twice as long per request
    system = "You are a helpful assistant. " * 4
    strategy.routed(pool[1], RouteRequest(prompt=system + "q"))  # b1 holds the prefix
    assert strategy.choose(pool, RouteRequest(prompt=system + "r")) is pool[1]  # idle: 1 unit, not > 0 + 2
    pool[1].in_flight = 1  # (1 + 1) x 2 - 1 = 3 units > 0 + 2: the fast one takes it
    assert strategy.choose(pool, RouteRequest(prompt=system + "s")) is pool[0]
    pool[0].in_flight = 2  # plain counts would keep it on b1 (1 <= 2 + 2); by speed 3 <= 2 + 2 too
    assert strategy.choose(pool, RouteRequest(prompt=system + "t")) is pool[1]
    pool[0].in_flight, pool[1].in_flight = 2, 0  # a new prefix goes to the least loaded by speed: b1 (1 < 2)
    assert strategy.choose(pool, RouteRequest(prompt="a brand new prompt, long enough")) is pool[1]
    pool[0].in_flight = 0  # b0 (0) < b1 (1), although both are idle
    assert strategy.choose(pool, RouteRequest(prompt="a brand new prompt, long enough")) is pool[0]


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="--strategy 'fastest'; allowed: round_robin"):
        make_strategy("fastest")


def test_circuit_breaker_closed_open_half_open_closed():
    breaker = CircuitBreaker(failure_threshold=3, open_s=2.0)
    breaker.failure(now=0.0)
    breaker.failure(now=0.0)
    assert breaker.state == CLOSED and breaker.allows(now=0.0)
    breaker.failure(now=1.0)
    assert breaker.state == OPEN and not breaker.allows(now=2.5)
    assert breaker.allows(now=3.0) and breaker.state == HALF_OPEN
    breaker.on_dispatch()
    assert not breaker.allows(now=3.1)  # one trial at a time
    breaker.failure(now=3.2)
    assert breaker.state == OPEN and not breaker.allows(now=4.0)
    assert breaker.allows(now=5.3)
    breaker.success()
    assert breaker.state == CLOSED and breaker.failures == 0
    breaker.failure(fatal=True, now=6.0)  # a refused connection: open at once
    assert breaker.state == OPEN


def test_cache_keys_only_deterministic_requests():
    greedy = {"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 4}
    assert cache_key("/v1/completions", greedy) == cache_key("/v1/completions", {**greedy, "user": "someone"})
    assert cache_key("/v1/completions", greedy) != cache_key("/v1/completions", {**greedy, "max_tokens": 5})
    assert cache_key("/v1/completions", greedy) != cache_key("/v1/chat/completions", greedy)
    assert cache_key("/v1/completions", greedy) != cache_key("/v1/completions", {**greedy, "stream": True})
    assert cache_key("/v1/completions", greedy, "ckpt/step_4") != cache_key("/v1/completions", greedy, "ckpt/step_8")
    assert cache_key("/v1/completions", {**greedy, "temperature": 0.7}) is None
    assert cache_key("/v1/completions", {"model": "m", "prompt": "hi"}) is None  # OpenAI's default temperature 1
    assert cache_key("/v1/completions", {**greedy, "temperature": 0.7, "seed": 3}) is not None
    assert cache_directives(None) == (True, True)
    assert cache_directives("no-cache") == (False, True)
    assert cache_directives("max-age=0, no-store") == (False, False)


def test_cache_ttl_and_lru_byte_budget():
    cache = ResponseCache(max_bytes=10, ttl_s=5)
    cache.put("a", b"aaaa", "application/json", now=0)
    cache.put("b", b"bbbb", "application/json", now=0)
    assert cache.get("a", now=1).body == b"aaaa"  # a is now the most recent
    cache.put("c", b"cccc", "application/json", now=1)  # 12 bytes > 10: b (least recent) goes
    assert cache.get("b", now=1) is None and cache.get("a", now=1) and cache.bytes == 8
    assert cache.get("c", now=6.5) is None and cache.bytes == 4  # expired
    cache.put("big", b"x" * 11, "application/json")
    assert cache.get("big") is None


def test_autoscaler_waits_for_the_delay_and_clamps():
    scaler = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=2,
                                        upscale_delay_s=2, downscale_delay_s=5, look_back_s=4))
    for t in range(4):
        scaler.observe(t, 9)
    assert scaler.desired() == 3  # ceil(9 / 2) = 5, clamped to 3
    assert scaler.decide(3.0, 1) is None
    decision = scaler.decide(5.0, 1)
    assert decision.direction == "up" and decision.desired == 3 and "mean in-flight 9.00" in decision.reason
    for t in range(6, 12):
        scaler.observe(t, 1)
    assert scaler.desired() == 1
    assert scaler.decide(11.0, 3) is None and scaler.decide(15.9, 3) is None
    assert scaler.decide(16.0, 3).direction == "down"
    scaler.observe(20, 4)  # a wish that changes restarts its clock
    assert scaler.decide(20.0, 1) is None


def test_model_pool_evicts_least_recently_used_idle_models():
    built = []

    def build(name, path):
        built.append(name)
        return LoadedEntry(name, None, 40, lambda: None)

    async def scenario():
        pool = ModelPool({"a": "", "b": "", "c": ""}, budget_bytes=100, build=build, estimate=lambda p: 40)
        for name in ("a", "b"):
            pool.release(await pool.acquire(name))
        pool.release(await pool.acquire("a"))  # b is now the least recently used
        busy_a = await pool.acquire("a")
        pool.release(await pool.acquire("c"))  # needs room: b goes, not a (busy and recent)
        assert list(pool.loaded) == ["a", "c"] and pool.evictions == ["b"]
        pool.release(await pool.acquire("b"))  # a is busy: c goes
        assert pool.evictions == ["b", "c"] and set(pool.loaded) == {"a", "b"}
        pool.release(busy_a)
        return pool

    pool = asyncio.run(scenario())
    assert built == ["a", "b", "c", "b"] and pool.loads == {"a": 1, "b": 2, "c": 1}


def test_follower_picks_the_newest_valid_checkpoint(tmp_path):
    from scaletrain.checkpoint.manifest import seal
    from scaletrain.serve.fleet.follow import Follower

    root = tmp_path / "checkpoints"
    for step in (4, 8):
        tmp = root / f"tmp{step}"
        tmp.mkdir(parents=True)
        (tmp / "weights.bin").write_bytes(bytes([step]) * 64)
        seal(tmp, root / f"step_{step:08d}", {"step": step})
    (root / "step_00000012").mkdir()  # being written: no manifest yet
    follower = Follower(root, root / "step_00000004")
    assert follower.newer_valid() == root / "step_00000008"
    (root / "step_00000008" / "weights.bin").write_bytes(b"\0" * 64)  # corrupted after sealing
    assert follower.newer_valid() is None
    follower.current = root / "step_00000008"
    assert follower.newer_valid() is None


def test_router_option_checks():
    from scaletrain.serve.fleet.fleet import RouterOptions, check_backend_url, check_router_options

    assert check_backend_url("http://127.0.0.1:8001/") == "http://127.0.0.1:8001"
    for bad in ("127.0.0.1:8001", "ftp://h:1", "http://h:1/v1", "http://", "http://h:99999"):
        with pytest.raises(UserError, match="--backend"):
            check_backend_url(bad)
    assert check_router_options(RouterOptions(weights="3,1")) == [3.0, 1.0]
    with pytest.raises(UserError, match="--weights"):
        check_router_options(RouterOptions(weights="3,-1"))
    assert json.dumps(RouterOptions().__dict__)  # plain data


def test_router_api_key_and_no_backend_answers():
    from fastapi.testclient import TestClient

    from scaletrain.serve.fleet.fleet import RouterOptions, make_router
    from scaletrain.serve.fleet.router import build_router_app

    router = make_router(RouterOptions(api_key="sekret"), None)
    router.open()
    client = TestClient(build_router_app(router))
    assert client.get("/health").status_code == 503  # no key needed; no backend yet
    denied = client.get("/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/metrics").status_code == 401
    auth = {"Authorization": "Bearer sekret"}
    unavailable = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=auth)
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"
    assert 'scaletrain:router_no_backend_total 1.0' in client.get("/metrics", headers=auth).text


def _timed_generation(step_delay_s: float, max_tokens: int) -> tuple[float, int, list[int]]:
    """One greedy request through an AsyncEngine on the debug model: wall
    seconds, engine steps taken, token ids."""
    import time

    import torch

    from scaletrain.config import load_config
    from scaletrain.data.tokenizer import ByteTokenizer
    from scaletrain.model import Llama
    from scaletrain.serve.async_engine import AsyncEngine
    from scaletrain.serve.engine import Engine, EngineConfig
    from scaletrain.serve.kv_cache import KVCache
    from scaletrain.serve.metrics import ServeMetrics
    from scaletrain.serve.sampling import SamplingParams

    cfg = load_config(None, ["model.name=debug", "model.vocab_size=320"]).model
    model = Llama(cfg)
    model.init_weights(0)
    cache = KVCache(cfg.n_layers, 64, 4, cfg.n_kv_heads, cfg.dim // cfg.n_heads, torch.float32)
    engine = Engine(model.eval(), cache, EngineConfig(64, 4, 4, 256, True), None, ByteTokenizer().decode, None)
    steps, step = [], engine.step
    engine.step = lambda: steps.append(1) or step()  # counts the steps the engine thread takes
    failed = []
    runner = AsyncEngine(engine, ServeMetrics("m"), failed.append, step_delay_s=step_delay_s).start()

    async def generate():
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [t for out in [o async for o in runner.generate([list(range(40, 72))], params, 1)] for t in out.token_ids]

    try:
        t0 = time.monotonic()
        tokens = asyncio.run(generate())
        return time.monotonic() - t0, len(steps), tokens
    finally:
        runner.shutdown()
        assert not failed


def test_debug_step_delay_makes_every_engine_step_longer_by_the_delay():
    """--debug-step-delay: the same tokens, and the slowed engine's time is at
    least steps x delay, where the same request without it takes far less."""
    delay, max_tokens = 0.1, 6
    plain_s, plain_steps, plain_tokens = _timed_generation(0.0, max_tokens)
    slow_s, slow_steps, slow_tokens = _timed_generation(delay, max_tokens)
    assert slow_tokens == plain_tokens and len(slow_tokens) == max_tokens
    assert slow_steps == plain_steps >= max_tokens
    assert slow_s >= slow_steps * delay
    assert plain_s < slow_steps * delay / 2, (plain_s, slow_s)


def test_debug_step_delay_options_are_checked():
    from scaletrain.serve.fleet.cli import parse_step_delays, replica_args
    from scaletrain.serve.server import ServeOptions, check_options

    assert parse_step_delays("0,0.03") == [0.0, 0.03] and parse_step_delays(None) == []
    for bad in ("0,-1", "fast", "0,,1", "nan"):
        with pytest.raises(UserError, match="--replica-debug-step-delay"):
            parse_step_delays(bad)
    with pytest.raises(UserError, match="--debug-step-delay"):
        check_options(ServeOptions("m", debug_step_delay_s=-0.5))
    args = replica_args(ServeOptions("m", debug_step_delay_s=0.02))
    assert args[args.index("--debug-step-delay") + 1] == "0.02"
    assert "--debug-step-delay" not in replica_args(ServeOptions("m"))
