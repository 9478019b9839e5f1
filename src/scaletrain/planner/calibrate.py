"""``scaletrain plan --calibrate``: measure this machine and write a hardware
entry, so the planner predicts runs here.

One "device" is one local worker: on a CPU machine with ``nproc`` workers
each gets cores // nproc threads and its own cores, so matmul FLOP/s, memory
bandwidth and a block's elementwise rate are measured that way, all workers
at once; the collective curves come from ``scaletrain bench comm`` (gloo here,
NCCL on GPUs) with ``nproc`` ranks; what tensor parallelism costs beyond its
compute and collectives from models timed under TP on a real mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaletrain.planner.hardware import Device, user_catalog_path


@contextlib.contextmanager
def _threads(n: int):
    """Run the block with torch's intra-op thread count at ``n``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _linear_train(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor) -> None:
    """A linear layer's training matmuls: forward x @ W, input gradient
    dy @ W^T, weight gradient x^T @ dy."""
    torch.mm(x, weight)
    torch.mm(dy, weight.t())
    torch.mm(x.t(), dy)


def _model_config(shape: dict, layers: int):
    from scaletrain.config import ModelConfig

    return dataclasses.replace(ModelConfig(), **shape, n_layers=layers, vocab_size=VOCAB)


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
    with _threads(threads):
        x, weight, dy = torch.randn(n, k), torch.randn(k, m), torch.randn(n, m)
        reps = max(2, int(2e9 / (6 * n * k * m)))
        times = []
        _linear_train(x, weight, dy)
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                _linear_train(x, weight, dy)
            times.append((time.perf_counter() - start) / reps)
    return 6 * n * k * m / sorted(times)[len(times) // 2]


def matmul_curve(threads: int) -> list[list[float]]:
    """[weight elements k*n, FLOP/s] for square weights of 64..2048 (1024 rows)."""
    return [[k * k, matmul_flops(threads, 1024, k, k)] for k in (64, 128, 256, 512, 1024, 2048)]


def memory_bandwidth(threads: int, nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of an elementwise add (read two, write one)."""
    with _threads(threads):
        a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
        out = torch.empty_like(a)
        t = _best_time(lambda: torch.add(a, b, out=out))
    return 3 * nbytes / t


def attention_flops(threads: int, batch: int = 4, heads: int = 8, seq: int = 256, head_dim: int = 32) -> float:
    """Causal SDPA forward + backward in FLOP/s, counting the full T x T
    square as the trainer's MFU does (12 * T * heads * head_dim per token)."""
    import torch.nn.functional as F

    with _threads(threads):
        q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return 12 * batch * seq * seq * heads * head_dim / sorted(times)[2]


# The block whose forward + backward calibrates the elementwise rate ("small": 4 x 256 tokens).
BLOCK_SHAPE = dict(dim=256, n_heads=8, n_kv_heads=4, ffn_dim=704)
BLOCK_BATCH, BLOCK_SEQ = 4, 256
# A model so small that its time under TP is all DTensor's fixed costs.
TINY_SHAPE = dict(dim=32, n_heads=4, n_kv_heads=4, ffn_dim=64)
TINY_BATCH, TINY_SEQ = 1, 16
VOCAB = 256
# (shape, batch, seq, layers): the models timed under TP; 1 and 3 layers
# separate the per-block from the per-model cost, two sizes their growth.
TP_MODELS = [(TINY_SHAPE, TINY_BATCH, TINY_SEQ, 1), (TINY_SHAPE, TINY_BATCH, TINY_SEQ, 3),
             (BLOCK_SHAPE, BLOCK_BATCH, BLOCK_SEQ, 1), (BLOCK_SHAPE, BLOCK_BATCH, BLOCK_SEQ, 3)]


def block_rest_time(threads: int, reps: int = 10) -> float:
    """Seconds of one Llama block's forward + backward at BLOCK_SHAPE that its
    matmuls and its attention do not take: each rep times the block, then the
    same matmuls (forward and both backward products) and the same causal
    SDPA forward + backward alone, back to back, so the machine's drift hits
    both; the median of the differences."""
    import torch.nn.functional as F

    from scaletrain.model.llama import Llama, rope_tables

    with _threads(threads):
        cfg = _model_config(BLOCK_SHAPE, 1)
        block = Llama(cfg).layers["0"]
        head_dim = cfg.dim // cfg.n_heads
        cos, sin = rope_tables(head_dim, BLOCK_SEQ, cfg.rope_theta)
        tokens = BLOCK_BATCH * BLOCK_SEQ
        x = torch.randn(BLOCK_BATCH, BLOCK_SEQ, cfg.dim, requires_grad=True)
        h, kvd, f = cfg.dim, cfg.n_kv_heads * head_dim, cfg.ffn_dim
        mats = [(torch.randn(tokens, k), torch.randn(k, n), torch.randn(tokens, n))
                for k, n in [(h, h), (h, kvd), (h, kvd), (h, h), (h, f), (h, f), (f, h)]]
        q = torch.randn(BLOCK_BATCH, cfg.n_heads, BLOCK_SEQ, head_dim, requires_grad=True)
        k, v = (torch.randn(BLOCK_BATCH, cfg.n_kv_heads, BLOCK_SEQ, head_dim, requires_grad=True) for _ in range(2))

        def parts():
            for mat in mats:
                _linear_train(*mat)
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        rests = []
        for rep in range(reps + 1):
            start = time.perf_counter()
            block(x, cos, sin).sum().backward()
            middle = time.perf_counter()
            parts()
            if rep:  # rep 0 warms up
                rests.append(2 * middle - start - time.perf_counter())
    return max(sorted(rests)[len(rests) // 2], 1e-6)


def _measure_worker(index: int, nproc: int, threads: int, out: str) -> None:
    from scaletrain.parallel.runtime import pin_cpu_worker

    pin_cpu_worker(index, nproc)  # placed as the trainer places its workers
    result = matmul_curve(threads), memory_bandwidth(threads), attention_flops(threads), block_rest_time(threads)
    Path(f"{out}.{index}").write_text(json.dumps(result))


def _concurrently(nproc: int, threads: int) -> tuple[list[list[float]], float, float, float]:
    """Measure in ``nproc`` processes at once, as the workers of a run share
    the machine's caches and memory bandwidth; the mean over the workers."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.start_processes(_measure_worker, args=(nproc, threads, out), nprocs=nproc, start_method="spawn")
        results = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(nproc)]
    curve = [[size, sum(r[0][i][1] for r in results) / nproc] for i, (size, _) in enumerate(results[0][0])]
    return curve, *(sum(r[i] for r in results) / nproc for i in (1, 2, 3))


def _tp_worker(rank: int, nproc: int, threads: int, store: str, out: str, rounds: int) -> None:
    """One rank of the TP timing mesh: every TP_MODELS model under TP and
    TP + SP (forward, loss under loss_parallel, backward, as the trainer
    runs them), taken in turns for ``rounds`` rounds so drift hits all alike."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from scaletrain.model.llama import Llama, cross_entropy_loss
    from scaletrain.parallel.runtime import pin_cpu_worker
    from scaletrain.parallel.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.FileStore(store, nproc), rank=rank, world_size=nproc)
    try:
        mesh = init_device_mesh("cpu", (nproc,), mesh_dim_names=("tp",))
        steps = {}
        for sp in (False, True):
            for i, (shape, batch, seq, layers) in enumerate(TP_MODELS):
                torch.manual_seed(0)
                model = Llama(_model_config(shape, layers))
                apply_tensor_parallel(model, mesh, sequence_parallel=sp)
                tokens = torch.randint(0, VOCAB, (batch, seq))

                def step(model=model, tokens=tokens):
                    with loss_parallel():
                        cross_entropy_loss(model(tokens), tokens).backward()

                steps[("sp" if sp else "tp", i)] = step
        pin_cpu_worker(rank, nproc)  # as the trainer binds its training thread, once the groups exist
        times = {key: [] for key in steps}
        for r in range(rounds + 1):
            for key, step in steps.items():
                dist.barrier()
                start = time.perf_counter()
                step()
                if r:  # round 0 warms up
                    times[key].append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({f"{k[0]} {k[1]}": sorted(v)[len(v) // 2] for k, v in times.items()}))
    finally:
        dist.destroy_process_group()


def tp_times(nproc: int, threads: int, rounds: int = 12) -> dict[str, float]:
    """Median seconds per forward + backward of each TP_MODELS model on an
    ``nproc``-rank TP mesh ("tp i" / "sp i")."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tp.json"
        mp.start_processes(_tp_worker, args=(nproc, threads, str(Path(tmp) / "store"), str(out), rounds),
                           nprocs=nproc, start_method="spawn")
        return json.loads(out.read_text())


def dispatch_curves(device: Device, times: dict[str, float], tp: int) -> dict[str, tuple]:
    """What TP costs beyond what the estimate already counts (local matmuls,
    elementwise traffic and the TP collectives at this device's calibrated
    rates), split per block pass (3-layer minus 1-layer model, halved) and per
    model pass (the rest), at the two sizes: the device's dispatch curves."""
    from scaletrain.planner.communication import collective_time, collectives
    from scaletrain.planner.layout import Coord, Layout, Workload
    from scaletrain.planner.steptime import compute_parts
    from scaletrain.planner.hardware import Cluster

    cluster = Cluster(((device, tp),), gpus_per_node=tp)
    out = {}
    for kind in ("tp", "sp"):
        residual = []
        for i, (shape, batch, seq, layers) in enumerate(TP_MODELS):
            w = Workload(_model_config(shape, layers), seq, batch, "fp32")
            layout = Layout(tp=tp, sequence_parallel=kind == "sp", micro_batch=batch)
            parts = compute_parts(w, layout, device)
            comm = sum(collective_time(c, cluster, layout)[0] for c in collectives(w, layout, Coord())
                       if c.group == "tp" and c.bytes > 4)  # not the grad norm's scalar: no clipping here
            residual.append(times[f"{kind} {i}"] - parts["gemm"] - parts["attention"] - parts["elementwise"] - comm)
        points = []
        for one, three in ((0, 1), (2, 3)):
            shape, batch, seq, _ = TP_MODELS[one]
            per_block = max(0.0, (residual[three] - residual[one]) / 2)
            points.append((batch * seq * shape["dim"], per_block, max(0.0, residual[one] - per_block)))
        out[f"{kind}_dispatch_curve"] = tuple(points)
    return out


def elementwise_rate(rest_s: float) -> float:
    """Bytes/s at which the block moved its saved activations (3 passes, as
    the estimate counts them) in the time its matmuls and attention do not
    take (``block_rest_time``)."""
    from scaletrain.planner.layout import Layout
    from scaletrain.planner.memory import saved_bytes_per_token

    cfg = _model_config(BLOCK_SHAPE, 1)
    return 3 * sum(saved_bytes_per_token(cfg, Layout(), "fp32").values()) * BLOCK_BATCH * BLOCK_SEQ / rest_s


CURVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def monotone(curve: list[list[float]]) -> list[list[float]]:
    """A message is never slower than a bigger one: scheduling spikes at small
    sizes (gloo on a shared machine) take the next size's time."""
    out = [list(point) for point in curve]
    for i in range(len(out) - 2, -1, -1):
        out[i][1] = min(out[i][1], out[i + 1][1])
    return out


def collective_costs(nproc: int) -> tuple[float, float, dict[str, list[list[float]]]]:
    """(all-reduce bus bandwidth bytes/s, per-step latency s, {op: [[bytes, s per call], ...]})
    from one `scaletrain bench comm` sweep of each collective the trainer issues."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        cmd = [sys.executable, "-m", "scaletrain", "bench", "comm", "--nproc", str(nproc), "--ops", ",".join(CURVE_OPS),
               "--min-bytes", "4", "--max-bytes", str(16 * 2**20), "--iters", "10", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bench comm failed:\n{proc.stderr[-2000:]}")
        rows = json.loads(out.read_text())["results"]
    curves = {op: monotone([[r["bytes"], r["time_us"] * 1e-6] for r in rows if r["op"] == op]) for op in CURVE_OPS}
    n = rows[0]["ranks"]
    bandwidth = [r for r in rows if r["op"] == "all_reduce"][-1]["busbw_gbps"] * 1e9
    latency = curves["all_reduce"][0][1] / (2 * (n - 1))  # the smallest message: all latency
    return bandwidth, latency, curves


def calibrate(name: str, nproc: int, progress=print) -> Device:
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    progress(f"matmul FLOP/s and memory bandwidth: {nproc} workers at once, {threads} thread(s) each ...")
    curve, bandwidth, attention, rest_s = _concurrently(nproc, threads)
    flops = max(f for _, f in curve)
    progress(f"collective sweep over {nproc} workers (scaletrain bench comm) ...")
    link, latency, curves = collective_costs(nproc)
    tp_degree = math.gcd(nproc, BLOCK_SHAPE["n_kv_heads"])  # whole KV heads per rank
    progress(f"tensor parallelism on a {tp_degree}-rank mesh ...")
    tp = tp_times(tp_degree, threads)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / nproc
    collective_curves = {f"{op.replace('_', '')}_curve": tuple(map(tuple, c)) for op, c in curves.items()}
    device = Device(name=name, description=f"this machine: {cores} CPU cores / {nproc} workers (calibrated)",
                    memory_gib=round(memory_gib, 1), bf16=0.0, fp16=0.0, fp32=flops / 1e12,
                    hbm_gbps=bandwidth / 1e9, intra="gloo-local", intra_gbps=link / 1e9,
                    intra_latency_us=latency * 1e6, inter="gloo-local", inter_gbps=link / 1e9,
                    inter_latency_us=latency * 1e6, matmul_efficiency=1.0, overhead_gib=0.0, overlap=0.0,
                    matmul_curve=tuple(map(tuple, curve)), attention_flops=attention, curve_ranks=nproc,
                    **collective_curves)
    # TP's extra cost is what the TP models' times leave after all of the estimate's parts.
    device = dataclasses.replace(device, elementwise_gbps=elementwise_rate(rest_s) / 1e9)
    return dataclasses.replace(device, **dispatch_curves(device, tp, tp_degree))


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
