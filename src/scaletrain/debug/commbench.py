"""``scaletrain bench comm``: collective benchmark with nccl-tests' conventions.

For each operation and message size S (bytes of the full buffer: the reduced
tensor of an all-reduce, the gathered output of an all-gather, the input of a
reduce-scatter, the broadcast or sent tensor), the time t is the mean over
``iters`` timed calls after warm-up, the slowest rank's (every rank measures;
the maximum is reported). Algorithm bandwidth = S / t. Bus bandwidth =
algbw x 2(n-1)/n for all-reduce, x (n-1)/n for all-gather and reduce-scatter,
x 1 for broadcast and send/recv (nccl-tests' PERFORMANCE.md). Every result is
checked against the value it must have; a wrong result is reported, not timed.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from scaletrain.parallel.runtime import all_gather_single, reduce_scatter_single

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv")
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "send_recv": lambda n: 1.0,
}


def sizes_between(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two (times 4-byte elements) from min to max bytes."""
    out, size = [], max(4, min_bytes)
    while size <= max_bytes:
        out.append(size)
        size *= 2
    return out


def _run_once(op: str, nbytes: int, device: torch.device, check: bool) -> bool:
    """One call of ``op`` on a buffer of ``nbytes``; returns whether its result is right."""
    rank, n = dist.get_rank(), dist.get_world_size()
    numel = max(1, nbytes // 4)
    if op == "all_reduce":
        t = torch.full((numel,), float(rank + 1), device=device)
        dist.all_reduce(t)
        return not check or bool(torch.all(t == n * (n + 1) / 2))
    if op == "all_gather":
        piece = max(1, numel // n)
        out = torch.empty(piece * n, device=device)
        all_gather_single(out, torch.full((piece,), float(rank), device=device))
        expected = torch.arange(n, device=device, dtype=torch.float32).repeat_interleave(piece)
        return not check or bool(torch.equal(out, expected))
    if op == "reduce_scatter":
        piece = max(1, numel // n)
        out = torch.empty(piece, device=device)
        reduce_scatter_single(out, torch.full((piece * n,), float(rank + 1), device=device))
        return not check or bool(torch.all(out == n * (n + 1) / 2))
    if op == "broadcast":
        t = torch.full((numel,), float(rank + 7), device=device)
        dist.broadcast(t, src=0)
        return not check or bool(torch.all(t == 7.0))
    if op == "send_recv":  # ring: send to the next rank, receive from the previous
        send = torch.full((numel,), float(rank), device=device)
        recv = torch.empty(numel, device=device)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (rank + 1) % n),
                                       dist.P2POp(dist.irecv, recv, (rank - 1) % n)])
        for r in reqs:
            r.wait()
        return not check or bool(torch.all(recv == float((rank - 1) % n)))
    raise ValueError(op)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(op: str, nbytes: int, device: torch.device, iters: int, warmup: int = 2) -> dict:
    """Time one (op, size) on every rank; the result row (same on all ranks)."""
    n = dist.get_world_size()
    ok = all(_run_once(op, nbytes, device, check=True) for _ in range(warmup))
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        _run_once(op, nbytes, device, check=False)
    _sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters, 0.0 if ok else 1.0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # gloo/NCCL both support MAX on CPU float64
    t, wrong = elapsed[0].item(), elapsed[1].item() > 0
    algbw = nbytes / t
    return {"op": op, "bytes": nbytes, "time_us": t * 1e6, "algbw_gbps": algbw / 1e9,
            "busbw_gbps": algbw * BUS_FACTOR[op](n) / 1e9, "correct": not wrong, "ranks": n}


def run_bench(ops: list[str], sizes: list[int], iters: int, device: torch.device) -> list[dict]:
    return [measure(op, size, device, iters) for op in ops for size in sizes]
