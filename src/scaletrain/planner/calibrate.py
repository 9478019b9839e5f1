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
    """Achieved fp32 FLOP/s of a (n x k) @ (k x m) matmul, the shape of a
    small model's projections (tokens x dim @ dim x ffn)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, k), torch.randn(k, m)
        t = _best_time(lambda: [torch.mm(a, b) for _ in range(20)]) / 20
    finally:
        torch.set_num_threads(previous)
    return 2 * n * k * m / t


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


def collective_costs(nproc: int) -> tuple[float, float]:
    """(bus bandwidth bytes/s, per-step latency s) from an all-reduce sweep."""
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
    return bandwidth, latency


def calibrate(name: str, nproc: int, progress=print) -> Device:
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    progress(f"matmul FLOP/s with {threads} thread(s) per worker ...")
    flops = matmul_flops(threads)
    progress(f"memory bandwidth with {threads} thread(s) ...")
    bandwidth = memory_bandwidth(threads)
    progress(f"all-reduce sweep over {nproc} workers (scaletrain bench comm) ...")
    link, latency = collective_costs(nproc)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / nproc
    return Device(name=name, description=f"this machine: {cores} CPU cores / {nproc} workers (calibrated)",
                  memory_gib=round(memory_gib, 1), bf16=0.0, fp16=0.0, fp32=flops / 1e12,
                  hbm_gbps=bandwidth / 1e9, intra="gloo-local", intra_gbps=link / 1e9,
                  intra_latency_us=latency * 1e6, inter="gloo-local", inter_gbps=link / 1e9,
                  inter_latency_us=latency * 1e6, matmul_efficiency=1.0, overhead_gib=0.0, overlap=0.0)


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
                lines.append(f"{key} = {json.dumps(list(value))}")
            else:
                lines.append(f"{key} = {value:.6g}" if isinstance(value, float) else f"{key} = {value}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
