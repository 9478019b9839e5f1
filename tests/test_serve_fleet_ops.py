"""``scaletrain serve --replicas`` as operators meet it, with real replica
processes on 127.0.0.1: a replica SIGKILLed under load, the roll to a new
checkpoint of a followed run while a client keeps asking, several models
with LRU eviction and the router's preference for holders, and the
autoscaler scaling up and draining on the way down."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleet_harness import FleetProcess, backend_of, complete
from serve_harness import expected_greedy, make_tiny_run

ENGINE = ["--block-size", "8", "--max-batch-tokens", "64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, debug_config):
    return make_tiny_run(tmp_path_factory.mktemp("ops"), debug_config)


@pytest.fixture(scope="module")
def follow_fleet(run_dir):
    fleet = FleetProcess(["serve", str(run_dir), "--replicas", "2", "--follow", "--served-model-name", "tiny",
                          "--strategy", "least_outstanding", *ENGINE], healthy=2)
    yield fleet
    assert fleet.stop() == 0, fleet.output()


def keep_asking(url: str, statuses: list, stop: threading.Event, limit: int = 400, **body) -> None:
    for i in range(limit):
        if stop.is_set():
            return
        # Sampled (temperature 0.7, no seed): never answered from the router's cache.
        statuses.append(complete(url, prompt=f"def f{i % 7}", max_tokens=8, temperature=0.7, **body).status_code)


def test_replica_sigkill_under_load(follow_fleet):
    url = follow_fleet.url
    statuses: list[int] = []
    stop = threading.Event()
    stream_body = {"model": "tiny", "prompt": "def ", "max_tokens": 240, "ignore_eos": True, "temperature": 0,
                   "stream": True}
    workers = [threading.Thread(target=keep_asking, args=(url, statuses, stop, 200)) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=30) as resp:
        victim = resp.headers["x-scaletrain-backend"]
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
        pid = next(b["pid"] for b in follow_fleet.health()["backends"] if b["url"] == victim)
        os.kill(pid, signal.SIGKILL)  # 230-odd tokens before this stream would end
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert time.monotonic() - killed < 15
    assert '"error"' in rest[-1] and "upstream_stream_broken" in rest[-1], rest[-3:]
    sent_by_kill = len(statuses)
    time.sleep(3)  # plain requests go on while the replica is gone and restarting
    stop.set()
    for w in workers:
        w.join(timeout=120)
    assert len(statuses) > sent_by_kill >= 3 and set(statuses) == {200}, statuses  # no plain request failed
    report = follow_fleet.wait_healthy(2, timeout_s=60)
    restarted = next(b for b in report["backends"] if b["url"] == victim)
    assert restarted["restarts"] == 1 and restarted["pid"] != pid
    assert follow_fleet.metric("replica_restarts_total") == 1
    assert follow_fleet.metric("errors_total", backend=victim) >= 1


def served_step(url: str) -> tuple[int, list[int]]:
    entry = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    return entry["step"], entry["served_steps"]


def test_follow_rolls_replicas_while_a_client_keeps_asking(follow_fleet, run_dir, tmp_path, debug_config):
    url = follow_fleet.url
    assert served_step(url) == (4, [4])
    before = complete(url, max_tokens=8).json()["choices"][0]["text"]
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_00000012").mkdir()  # half-written (no manifest): never served
    (checkpoints / "step_00000012" / "__0_0.distcp").write_bytes(b"partial")
    newer = make_tiny_run(tmp_path, debug_config, seed=1) / "checkpoints" / "step_00000004"
    statuses: list[int] = []
    stop = threading.Event()
    client = threading.Thread(target=keep_asking, args=(url, statuses, stop))
    client.start()
    try:
        time.sleep(0.5)
        os.rename(newer, checkpoints / "step_00000008")  # appears at once, sealed
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (served_step(url) != (8, [8]) or
                                               "follow: serving step_00000008" not in follow_fleet.output()):
            time.sleep(0.3)
    finally:
        stop.set()
        client.join(timeout=60)
    assert served_step(url) == (8, [8]), follow_fleet.output()[-3000:]
    assert len(statuses) >= 10 and set(statuses) == {200}, statuses
    after = complete(url, max_tokens=8).json()["choices"][0]["text"]
    assert after == expected_greedy(checkpoints / "step_00000008", "def f", 8) != before
    assert follow_fleet.metric("rolls_total", result="done") == 1
    assert follow_fleet.metric("served_step") == 8 + 8  # the gauge of each of the two replicas
    assert "not serving step_00000012 yet" in follow_fleet.output()


def test_models_load_on_first_use_evict_lru_and_the_router_prefers_holders(tmp_path, debug_config):
    import torch

    from scaletrain.serve.kv_cache import KVCache
    from scaletrain.serve.loader import load_model

    runs = {name: make_tiny_run(tmp_path / name, debug_config, seed=i) for i, name in enumerate("abc")}
    model = load_model(runs["a"]).model
    cfg = model.cfg
    one = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()]) + \
        KVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.dim // cfg.n_heads, torch.float32) * 256
    fleet = FleetProcess(["serve", *[a for n, r in runs.items() for a in ("--model", f"{n}={r}")],
                          "--model-memory-budget", str(int(2.5 * one)), "--kv-cache-tokens", "256",
                          "--attention", "gather", "--replicas", "2", "--strategy", "round_robin", "--no-cache",
                          *ENGINE],
                         healthy=2)
    try:
        url = fleet.url
        names = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        assert names == ["a", "b", "c"]
        holder = {backend_of(complete(url, model="a")) for _ in range(4)}
        assert len(holder) == 1  # round robin, but only one replica holds `a`
        (replica,) = holder

        def loaded() -> set[str]:
            return {m["id"] for m in httpx.get(f"{replica}/v1/models", timeout=10).json()["data"] if m["loaded"]}

        for name in ("b", "a", "c"):  # straight to the replica: b is now the least recently used
            assert complete(replica, model=name).status_code == 200
        assert loaded() == {"a", "c"}
        assert complete(replica, model="b").status_code == 200  # a (used before c) goes
        assert loaded() == {"b", "c"}
        metrics = httpx.get(f"{replica}/metrics", timeout=10).text
        evicted = dict(re.findall(r'scaletrain:model_evictions_total\{model_name="(\w)"\} (\S+)', metrics))
        assert evicted == {"a": "1.0", "b": "1.0", "c": "0.0"}
        assert 'scaletrain:model_loads_total{model_name="b"} 2.0' in metrics
        time.sleep(1.5)  # a probe round: the router learns what the replica holds
        assert {backend_of(complete(url, model="c")) for _ in range(4)} == {replica}
        wrong = complete(url, model="d")
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    finally:
        assert fleet.stop() == 0, fleet.output()


def test_autoscaler_scales_up_under_load_and_drains_on_the_way_down(run_dir):
    fleet = FleetProcess(["serve", str(run_dir), "--replicas", "1", "--min-replicas", "1", "--max-replicas", "2",
                          "--target-ongoing-requests", "4", "--upscale-delay", "0.5", "--downscale-delay", "2",
                          "--look-back", "1", "--max-num-seqs", "2", "--served-model-name", "tiny",
                          "--strategy", "least_outstanding", *ENGINE], healthy=1)
    statuses: list[int] = []
    busy = threading.Event()
    busy.set()

    def worker(keep_going):
        deadline = time.monotonic() + 90
        while keep_going() and time.monotonic() < deadline:
            statuses.append(complete(fleet.url, max_tokens=200, ignore_eos=True, temperature=0.7,
                                     timeout=120).status_code)

    try:
        with ThreadPoolExecutor(9) as pool:
            burst = [pool.submit(worker, busy.is_set) for _ in range(6)]
            steady = [pool.submit(worker, lambda: "scale down" not in fleet.output()) for _ in range(3)]
            fleet.wait_healthy(2, timeout_s=90)
            busy.clear()  # 3 in flight on 2 replicas with a target of 4 each: one replica is too many
            for f in burst + steady:
                f.result(timeout=120)
        log = fleet.output()
        assert "autoscaler: scale up 1 -> 2" in log and "autoscaler: scale down 2 -> 1" in log, log
        drained = re.search(r"draining replica on port \d+ \((\d+) in flight\)", log)
        assert drained and int(drained.group(1)) >= 1, log  # it had work when the drain began
        assert statuses and set(statuses) == {200}, statuses  # nothing dropped by the scale-down
        assert fleet.metric("autoscaler_decisions_total", direction="up") == 1
        assert fleet.metric("autoscaler_decisions_total", direction="down") == 1
        deadline = time.monotonic() + 60
        while len(fleet.health()["backends"]) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the drained replica finishes its request, then stops
        assert len(fleet.health()["backends"]) == 1 and complete(fleet.url).status_code == 200
    finally:
        assert fleet.stop() == 0, fleet.output()
