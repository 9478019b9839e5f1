"""``scaletrain plan --calibrate``: measure this machine and write a hardware
entry, so the planner predicts runs here.

One "device" is one local worker: on a CPU machine with ``nproc`` workers
each gets cores // nproc threads, so matmul FLOP/s and memory bandwidth are
measured with that many threads; the collective bandwidth and latency come
from ``scaletrain bench comm`` (gloo here, NCCL on GPUs) with ``nproc`` ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaletrain.planner.hardware import Device, user_catalog_path


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(threads: int, n: int = 1024, k: int = 256, m: int = 704) -> float:
    """Achieved fp32 FLOP/s of a linear layer's training matmuls on n tokens:
    forward x @ W (n x k @ k x m), input gradient dy @ W^T and weight
    gradient x^T @ dy, as training runs them (the median of repeats)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weight, dy = torch.randn(n, k), torch.randn(k, m), torch.randn(n, m)

        def linear_train():
            torch.mm(x, weight)
            torch.mm(dy, weight.t())
            torch.mm(x.t(), dy)

        reps = max(2, int(2e9 / (6 * n * k * m)))
        times = []
        linear_train()
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                linear_train()
            times.append((time.perf_counter() - start) / reps)
    finally:
        torch.set_num_threads(previous)
    return 6 * n * k * m / sorted(times)[len(times) // 2]


def matmul_curve(threads: int) -> list[list[float]]:
    """[weight elements k*n, FLOP/s] for square weights of 64..2048 (1024 rows)."""
    return [[k * k, matmul_flops(threads, 1024, k, k)] for k in (64, 128, 256, 512, 1024, 2048)]


def memory_bandwidth(threads: int, nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of an elementwise add (read two, write one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
        out = torch.empty_like(a)
        t = _best_time(lambda: torch.add(a, b, out=out))
    finally:
        torch.set_num_threads(previous)
    return 3 * nbytes / t


def attention_flops(threads: int, batch: int = 4, heads: int = 8, seq: int = 256, head_dim: int = 32) -> float:
    """Causal SDPA forward + backward in FLOP/s, counting the full T x T
    square as the trainer's MFU does (12 * T * heads * head_dim per token)."""
    import torch.nn.functional as F

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 12 * batch * seq * seq * heads * head_dim / sorted(times)[2]


def _measure_worker(threads: int) -> tuple[list[list[float]], float, float]:
    return matmul_curve(threads), memory_bandwidth(threads), attention_flops(threads)


def _concurrently(nproc: int, threads: int) -> tuple[list[list[float]], float, float]:
    """Measure in ``nproc`` processes at once, as the workers of a run share
    the machine's caches and memory bandwidth; the mean over the workers."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(nproc) as pool:
        results = pool.map(_measure_worker, [threads] * nproc)
    curve = [[size, sum(r[0][i][1] for r in results) / nproc] for i, (size, _) in enumerate(results[0][0])]
    return curve, sum(r[1] for r in results) / nproc, sum(r[2] for r in results) / nproc


def collective_costs(nproc: int) -> tuple[float, float, list[list[float]]]:
    """(bus bandwidth bytes/s, per-step latency s, [bytes, s per call]) from an all-reduce sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        cmd = [sys.executable, "-m", "scaletrain", "bench", "comm", "--nproc", str(nproc), "--ops", "all_reduce",
               "--min-bytes", "4", "--max-bytes", str(16 * 2**20), "--iters", "10", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bench comm failed:\n{proc.stderr[-2000:]}")
        rows = json.loads(out.read_text())["results"]
    n = rows[0]["ranks"]
    latency = rows[0]["time_us"] * 1e-6 / (2 * (n - 1))  # the smallest message: all latency
    bandwidth = rows[-1]["busbw_gbps"] * 1e9
    return bandwidth, latency, [[r["bytes"], r["time_us"] * 1e-6] for r in rows]


def calibrate(name: str, nproc: int, progress=print) -> Device:
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    progress(f"matmul FLOP/s and memory bandwidth: {nproc} workers at once, {threads} thread(s) each ...")
    curve, bandwidth, attention = _concurrently(nproc, threads)
    flops = max(f for _, f in curve)
    progress(f"all-reduce sweep over {nproc} workers (scaletrain bench comm) ...")
    link, latency, allreduce = collective_costs(nproc)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / nproc
    return Device(name=name, description=f"this machine: {cores} CPU cores / {nproc} workers (calibrated)",
                  memory_gib=round(memory_gib, 1), bf16=0.0, fp16=0.0, fp32=flops / 1e12,
                  hbm_gbps=bandwidth / 1e9, intra="gloo-local", intra_gbps=link / 1e9,
                  intra_latency_us=latency * 1e6, inter="gloo-local", inter_gbps=link / 1e9,
                  inter_latency_us=latency * 1e6, matmul_efficiency=1.0, overhead_gib=0.0, overlap=0.0,
                  matmul_curve=tuple(tuple(x) for x in curve), attention_flops=attention, allreduce_curve=tuple(tuple(x) for x in allreduce),
                  curve_ranks=nproc)


def write_entry(device: Device, path: Path | None = None) -> Path:
    """Add (or replace) ``device``'s table in the user's catalog file."""
    import tomllib

    path = (path or user_catalog_path()).expanduser()
    entries = tomllib.loads(path.read_text()) if path.exists() else {}
    entries[device.name] = {k: v for k, v in device.__dict__.items() if k not in ("name", "match")}
    lines = []
    for name, values in entries.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, str):
                lines.append(f"{key} = {json.dumps(value)}")
            elif isinstance(value, (list, tuple)):
                lines.append(f"{key} = {json.dumps([list(v) if isinstance(v, tuple) else v for v in value])}")
            else:
                lines.append(f"{key} = {value:.6g}" if isinstance(value, float) else f"{key} = {value}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
