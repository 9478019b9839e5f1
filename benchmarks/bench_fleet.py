"""The router's strategies side by side, the response cache, and a replica
killed under load.

Two engines serve the ``small`` preset (random weights, byte tokenizer); the
second is deliberately slower: ``--debug-step-delay`` makes its engine sleep
after every step (30 ms by default, ``--step-delay``), so each of its steps
really takes longer, as on a slower accelerator. Fewer threads is not slower
on a machine with few cores (README, serving threads; an earlier version of
this benchmark found its "1-thread" engine the faster one), so both engines
get 1 thread by default (``--threads``) and the sleep alone makes the
difference; the per-engine mean TTFT column shows it. Each engine's KV
cache (``--kv-cache-tokens``) holds the running requests and about half of
the groups' prefixes, as on a GPU where the cache is the scarce resource: a
strategy that sends a group back where its prefix is cached gains, one that
spreads every group over both engines thrashes. For each strategy a
``scaletrain router`` is started in front of them and the same kind of
workload is sent: shared-prefix groups (a 512-character "system prompt" per
group, fresh text for every strategy so that no engine's prefix cache helps
a later run) with three sessions (``user``) per group, streamed, greedy.
Throughput and p50/p99 time to first token are printed with their ratio to
round_robin, which runs first in each of ``--rounds`` rounds. Each router
first gets ``--warmup`` requests that are not counted: a fresh router knows
nothing of its backends and sends its first burst blind (half of it to the
slow engine, whatever the strategy), and in a run of ~100 requests the p99
is that burst.

Cache: a workload in which every prompt comes three times, through a router
with the response cache and one without. Kill: ``scaletrain serve
--replicas 2``, plain and streamed requests, one replica SIGKILLed after
3 s; requests sent and failed, and p99 latency before the kill and in the
10 s after it (the supervisor has the replica back within them).

    python benchmarks/bench_fleet.py [--requests 96] [--concurrency 8] [--max-tokens 16] [--step-delay 0,0.03]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bench_serve import Server, free_port, prepare_model  # noqa: E402  (same folder)
from scaletrain.serve.loadgen import _percentile, format_table, prompt_set, run_load  # noqa: E402

STRATEGIES = ["round_robin", "least_outstanding", "weighted", "latency", "power_of_two", "session", "prefix"]


def workload(requests: int, groups: int, seed: int) -> list[tuple[str, dict]]:
    """Shared-prefix groups with three sessions each, shuffled."""
    text = "".join(prompt_set(groups * 4, seed=seed, shared_prefix_chars=0, max_chars=800))
    rng = random.Random(seed)
    prefixes = [text[i * 512:(i + 1) * 512] for i in range(groups)]
    items = []
    for i in range(requests):
        g = i % groups
        question = text[-(i + 1) * 48:][:48] if i else text[-48:]
        items.append((prefixes[g] + f"\n# q{i}: " + question, {"user": f"group{g}-session{i % 3}"}))
    rng.shuffle(items)
    return items


def wait_healthy(url: str, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("healthy", 0) >= count:
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url}: not {count} healthy backends after {timeout_s} s")


def router(name: str, backends: list[str], args: list[str], work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "scaletrain", "router", *[a for b in backends for a in ("--backend", b)],
           "--port", str(port), *args]
    server = Server(name, cmd, port, 1, work)
    wait_healthy(server.url, len(backends))
    return server


def router_counts(url: str, name: str) -> dict[str, float]:
    """scaletrain:router_<name>{backend=...} per backend."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"scaletrain:router_{name}{{"):
            out[line.split('backend="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


COUNTS = ("requests_total", "time_to_first_token_seconds_sum", "time_to_first_token_seconds_count")


def strategies(args, engines: list[Server], work: Path, round_: int) -> list[dict]:
    """Each strategy behind a fresh router: ``--warmup`` requests first (their
    own prefixes; not in the numbers), so that the strategies that measure
    the backends have measured them, as in a router that has been serving,
    and the p99 of a short run is not the first burst sent blind."""
    rows = []
    urls = [e.url for e in engines]
    for i, strategy in enumerate(STRATEGIES):
        extra = ["--weights", "measured"] if strategy == "weighted" else []
        rt = router(strategy, urls, ["--strategy", strategy, "--no-cache", *extra], work)
        try:
            if args.warmup:
                asyncio.run(run_load(f"{rt.url}/v1", "fleet", workload(args.warmup, args.groups, 100 * round_ + 50 + i),
                                     args.concurrency, args.max_tokens, args.time_limit))
            before = {name: router_counts(rt.url, name) for name in COUNTS}
            items = workload(args.requests, args.groups, seed=100 * round_ + i)
            row = asyncio.run(run_load(f"{rt.url}/v1", "fleet", items, args.concurrency, args.max_tokens,
                                       args.time_limit))
            sent, ttft_s, ttft_n = ({u: v - before[name].get(u, 0) for u, v in router_counts(rt.url, name).items()}
                                    for name in COUNTS)
            rows.append({"server": strategy, **row, "share": [sent.get(u, 0) / max(1, sum(sent.values())) for u in urls],
                         "engine_ttft_ms": [1e3 * ttft_s.get(u, 0) / max(1, ttft_n.get(u, 0)) for u in urls]})
        finally:
            rt.stop()
    return rows


def cache_effect(args, engines: list[Server], work: Path) -> list[dict]:
    rows = []
    distinct = workload(args.requests // 3, args.groups, seed=999)
    repeated = [item for item in distinct for _ in range(3)]
    random.Random(0).shuffle(repeated)
    for name, flags in (("no cache", ["--no-cache"]), ("cache", [])):
        rt = router(name, [e.url for e in engines], ["--strategy", "least_outstanding", *flags], work)
        try:
            row = asyncio.run(run_load(f"{rt.url}/v1", "fleet", repeated, args.concurrency, args.max_tokens,
                                       args.time_limit))
            hits = sum(float(l.rsplit(" ", 1)[1]) for l in httpx.get(f"{rt.url}/metrics", timeout=10).text.splitlines()
                       if l.startswith('scaletrain:router_cache_total{result="hit"}'))
            rows.append({"server": f"{name} ({int(hits)} hits)", **row})
        finally:
            rt.stop()
        distinct = [(p + " ", f) for p, f in distinct]  # the second router's engines must not reuse the first's prefixes
        repeated = [item for item in distinct for _ in range(3)]
        random.Random(0).shuffle(repeated)
    return rows


async def _kill_load(url: str, kill_at_s: float, duration_s: float, pid_of_victim, concurrency: int,
                     max_tokens: int) -> tuple[list[tuple[float, float, bool, bool]], float]:
    """(start, latency, ok, streamed) per request, and when the kill happened."""
    results, killed = [], []
    body = {"model": "fleet", "max_tokens": max_tokens, "temperature": 0.7, "ignore_eos": True}
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker(w: int):
            i = 0
            while time.monotonic() - start < duration_s:
                i += 1
                streamed, t0 = w % 2 == 1, time.monotonic()
                payload = {**body, "prompt": f"def worker_{w}_{i}(x):", "stream": streamed}
                try:
                    resp = await client.post(f"{url}/v1/completions", json=payload)
                    ok = resp.status_code == 200 and (not streamed or ('"error"' not in resp.text
                                                                       and resp.text.rstrip().endswith("[DONE]")))
                except httpx.HTTPError:
                    ok = False
                results.append((t0 - start, time.monotonic() - t0, ok, streamed))

        async def killer():
            await asyncio.sleep(kill_at_s)
            os.kill(pid_of_victim(), signal.SIGKILL)
            killed.append(time.monotonic() - start)

        await asyncio.gather(killer(), *(worker(w) for w in range(concurrency)))
    return results, killed[0]


def kill_experiment(args, ckpt: Path, work: Path) -> list[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "scaletrain", "serve", str(ckpt), "--replicas", "2", "--router-port", str(port),
           "--served-model-name", "fleet", "--replica-threads", "1", "--strategy", "least_outstanding", "--no-cache"]
    fleet = Server("fleet", cmd, port, 1, work)
    try:
        wait_healthy(fleet.url, 2)
        victim = lambda: httpx.get(f"{fleet.url}/health", timeout=5).json()["backends"][0]["pid"]
        results, killed = asyncio.run(_kill_load(fleet.url, 3.0, 20.0, victim, args.concurrency, args.max_tokens))
        wait_healthy(fleet.url, 2, 60)
    finally:
        fleet.stop()
    lines = []
    for streamed in (False, True):
        mine = [r for r in results if r[3] == streamed]
        before = [r[1] for r in mine if r[0] + r[1] < killed]
        during = [r[1] for r in mine if r[0] < killed + 10 and r[0] + r[1] >= killed]
        kind = "streamed" if streamed else "plain"
        lines.append(f"| {kind} | {len(mine)} | {sum(not r[2] for r in mine)} | "
                     f"{_percentile(before, 99) * 1e3:.0f} | {_percentile(during, 99) * 1e3:.0f} |")
    return ["| requests | sent | failed | p99 latency before the kill (ms) | p99 in the 10 s after it (ms) |",
            "|---|---|---|---|---|", *lines]


def ratio_table(rows: list[dict], labels: list[str]) -> str:
    base = rows[0]
    shares = " / ".join(labels)
    lines = [f"| strategy | req/s | x RR | TTFT p50 ms | x RR | TTFT p99 ms | x RR | requests to {shares} "
             f"| mean TTFT ms at {shares} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['request_throughput']:.2f} | {r['request_throughput'] / base['request_throughput']:.2f} "
                     f"| {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p50'] / base['ttft_ms_p50']:.2f} "
                     f"| {r['ttft_ms_p99']:.0f} | {r['ttft_ms_p99'] / base['ttft_ms_p99']:.2f} "
                     f"| {' / '.join(f'{x:.0%}' for x in r['share'])} "
                     f"| {' / '.join(f'{x:.0f}' for x in r['engine_ttft_ms'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", default="1,1", help="torch threads of the two engines")
    parser.add_argument("--max-batch-tokens", default="512,512", help="step token budget of the two engines")
    parser.add_argument("--step-delay", default="0,0.03", help="--debug-step-delay of the two engines: seconds "
                        "slept after every step (the slow one last)")
    parser.add_argument("--kv-cache-tokens", type=int, default=5376, help="KV cache of each engine")
    parser.add_argument("--time-limit", type=float, default=180.0)
    parser.add_argument("--warmup", type=int, default=16, help="requests through each strategy's router before "
                        "the measured ones (0: measure from a cold router)")
    parser.add_argument("--rounds", type=int, default=2, help="every strategy once per round (the spread "
                        "between rounds is the machine's noise)")
    parser.add_argument("--skip", default="", help="comma-separated: strategies, cache, kill")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        ckpt, _ = prepare_model(None, work, export=False)
        threads = [int(t) for t in args.threads.split(",")]
        budgets = [int(b) for b in args.max_batch_tokens.split(",")]
        delays = [float(d) for d in args.step_delay.split(",")]
        engines = []
        for i, (t, budget, delay) in enumerate(zip(threads, budgets, delays)):
            port = free_port()
            engines.append(Server(f"engine{i}-threads{t}", [
                sys.executable, "-m", "scaletrain", "serve", str(ckpt), "--port", str(port), "--threads", str(t),
                "--max-batch-tokens", str(budget), "--kv-cache-tokens", str(args.kv_cache_tokens),
                "--debug-step-delay", str(delay), "--served-model-name", "fleet"], port, t, work))
        labels = [f"e{i} ({t} thr, +{d * 1e3:.0f} ms/step)" for i, (t, d) in enumerate(zip(threads, delays))]
        try:
            for round_ in range(1, args.rounds + 1) if "strategies" not in skip else ():
                rows = strategies(args, engines, work, round_)
                print(f"round {round_}: engines with threads {args.threads}, step budgets {args.max_batch_tokens}, "
                      f"debug step delays {args.step_delay} s, "
                      f"KV cache {args.kv_cache_tokens} tokens each; {args.requests} streamed requests per "
                      f"strategy after {args.warmup} warm-up ones, {args.groups} shared-prefix groups x 3 sessions, "
                      f"concurrency {args.concurrency}, "
                      f"max_tokens {args.max_tokens}\n")
                print(format_table(rows) + "\n\n" + ratio_table(rows, labels) + "\n", flush=True)
            if "cache" not in skip:
                print("response cache, every prompt three times (least_outstanding):\n")
                print(format_table(cache_effect(args, engines, work)) + "\n", flush=True)
        finally:
            for engine in engines:
                engine.stop()
        if "kill" not in skip:
            print("replica SIGKILLed at 3 s of a 20 s run (2 replicas, 1 thread each; half the workers stream):\n")
            print("\n".join(kill_experiment(args, ckpt, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
