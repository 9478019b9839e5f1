"""Step time of one layout on the busiest rank, by term, each assumption
stated next to its formula.

    device time   = GEMMs + attention + memory-bound work (per rank)
    compute       = max(device time, host dispatch)       host-bound small steps
    pipeline      = compute / (1 - bubble)
    step          = pipeline + exposed communication + offload's host work

Communication overlaps compute only where the trainer's engine overlaps it
on a GPU (``Device.overlap``: 1 on GPUs, where NCCL runs on its own
streams; 0 on CPUs, where gloo competes for the same cores):
  - FSDP2 all-gathers the next unit while the current one computes
    (implicit prefetch, depth 1) and reduce-scatters a unit while the one
    before it runs backward: exposed = max(0, comm - compute) + one unit's
    comm (the first gather and the last reduction have nothing to hide behind);
  - DDP all-reduces a bucket as soon as backward fills it: exposed =
    max(0, all-reduce - backward) + the last bucket's all-reduce;
  - ZeRO-1's parameter broadcast follows the optimizer step, TP's
    collectives sit between the matmuls that need them, pipeline sends
    between stages: exposed in full.
CPU offload copies each shard to the device before each all-gather and each
gradient shard back after each reduce-scatter (communication.py, on the
FSDP streams), and steps AdamW on the host: exposed in full.
"""

from __future__ import annotations

import functools

from scaletrain.config import ModelConfig
from scaletrain.model.counts import matmul_param_count
from scaletrain.parallel import rules
from scaletrain.planner.communication import DDP_BUCKET_BYTES, Collective, _interp, collective_time
from scaletrain.planner.hardware import Cluster, Device
from scaletrain.planner.layout import (Layout, Workload, accum, fsdp_units, local_params, stage_layers,
                                       stage_param_names)
from scaletrain.planner.memory import model_state_bytes, saved_bytes_per_token, worst_ranks


def compute_parts(w: Workload, layout: Layout, dev: Device) -> dict[str, float]:
    """Seconds of one optimizer step's compute on the busiest rank, by term
    (the first or the last pipeline rank: the embedding and the head sit
    at the ends)."""
    speeds = layout.pp_rank_speeds or (1.0,) * layout.pp
    slowest = min(speeds)
    # Speed-aware stages on a mixed cluster: each pipeline rank's work at the
    # weakest device's rates, scaled by how much faster its own device is.
    return max(({k: v * slowest / speeds[c.pp] for k, v in _rank_parts(w, layout, dev, c.pp).items()}
                for c in worst_ranks(layout)), key=lambda p: sum(p.values()))


def _rank_parts(w: Workload, layout: Layout, dev: Device, pp_rank: int) -> dict[str, float]:
    m = w.model
    layers = stage_layers(m, layout, pp_rank)
    names = stage_param_names(m, layout, pp_rank)
    has_head = names is None or "lm_head.weight" in names
    tokens_rank = w.global_batch * w.seq_len / layout.dp  # tokens through this rank's stages per step
    recompute = recompute_factor(m, layout.activation_checkpointing)
    if dev.matmul_curve:
        gemm_s = _gemm_time_by_shape(w, layout, dev, layers, has_head) * recompute
    else:
        # 6 FLOPs per matmul parameter per token (Kaplan et al. 2020), at
        # peak x matmul_efficiency.
        block = (matmul_param_count(m) - m.vocab_size * m.dim) / m.n_layers
        params = (block * layers * recompute + (m.vocab_size * m.dim if has_head else 0)) / layout.tp
        gemm_s = 6 * params * tokens_rank / dev.achieved_flops(w.dtype)
    return {"gemm": gemm_s, "attention": attention_time(w, layout, dev) * tokens_rank * layers,
            **memory_bound_time(w, layout, dev, layers, tokens_rank),
            "dispatch": dispatch_time(w, layout, dev, layers)}


def recompute_factor(m: ModelConfig, mode: str) -> float:
    """Matmul FLOPs with recomputation over those without: full runs the
    forward again (2 of 6 FLOPs per parameter: 4/3); selective_half reruns
    the k, o and up projections of each block (2 FLOPs per parameter of
    theirs); selective reruns no matmul."""
    if mode == "full":
        return 4 / 3
    if mode == "selective_half":
        h, kvd = m.dim, m.n_kv_heads * (m.dim // m.n_heads)
        block = rules.block_cost(m)
        return 1 + 2 * (h * kvd + h * h + h * m.ffn_dim) / (6 * block)
    return 1.0


def attention_time(w: Workload, layout: Layout, dev: Device) -> float:
    """Seconds per token per layer of causal flash attention. Executed FLOPs
    (Dao 2022): the forward's QK^T and PV over the causal half, 2sh; the
    backward recomputes QK^T and runs four more products, 2.5x the forward;
    full recompute adds a forward: (7 or 9)·s·h/t at peak x
    attention_efficiency. A calibrated device measured SDPA in PaLM's count
    (12·s·h per token) and keeps that convention."""
    h, s, t = w.model.dim, w.seq_len, layout.tp
    if dev.attention_flops:
        return 12 * h / t * s / dev.attention_flops
    executed = (9 if layout.activation_checkpointing == "full" else 7) * s * h / t
    return executed / dev.attention_rate(w.dtype)


def memory_bound_time(w: Workload, layout: Layout, dev: Device, layers: int, tokens_rank: float) -> dict[str, float]:
    """Norms, RoPE, SiLU, residual adds and the optimizer, at the device's
    memory bandwidth x membound_efficiency. Assumption: every saved
    activation byte is written in forward, read in backward and its gradient
    written (3 passes; a recompute adds a 4th); AdamW reads parameter,
    gradient and both moments and writes parameter and moments (7 fp32 words
    per parameter, 1.75 x the optimizer-state bytes)."""
    plain = Layout(tp=layout.tp, sequence_parallel=layout.sequence_parallel, dp_shard=layout.dp_shard,
                   zero_stage=layout.zero_stage, pp=layout.pp)
    saved = sum(saved_bytes_per_token(w.model, plain, w.dtype).values())
    passes = 4 if layout.activation_checkpointing != "none" else 3
    elementwise = passes * saved * layers * tokens_rank
    states = model_state_bytes(w.model, layout, worst_ranks(layout)[0])
    optimizer = 0 if layout.cpu_offload else states["optimizer_bytes"] * 1.75
    rate = (dev.elementwise_gbps or dev.hbm_gbps * dev.membound_efficiency) * 1e9
    return {"elementwise": elementwise / rate, "optimizer": optimizer / (dev.hbm_gbps * dev.membound_efficiency * 1e9)}


@functools.lru_cache(maxsize=4)
def ops_per_block(dtype: str) -> int:
    """aten ops one block dispatches in forward + backward, counted on the
    real block (meta tensors, a TorchDispatchMode): what the host issues."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from scaletrain.config import ModelConfig
    from scaletrain.model.llama import Block, rope_tables

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    cfg = ModelConfig(name="count", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=128,
                      max_seq_len=16)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    with torch.device("meta"):
        block = Block(cfg).to(torch_dtype)
        x = torch.randn(2, 16, 64, dtype=torch_dtype, requires_grad=True)
    cos, sin = (t.to("meta") for t in rope_tables(16, 16, 1e4))
    with Count():
        block(x, cos, sin).sum().backward()
    return Count.n


def host_time(w: Workload, layout: Layout, dev: Device) -> float:
    """Seconds the host spends issuing one step's block ops: ops per block x
    layers x forward/backward passes x host_op_us (eager PyTorch; an op
    is a kernel launch or a view)."""
    if not dev.host_op_us:
        return 0.0
    pmb = layout.pp_microbatches if layout.pp > 1 else 1
    passes = accum(w, layout) * pmb * (4 / 3 if layout.activation_checkpointing != "none" else 1)
    return ops_per_block(w.dtype) * stage_layers(w.model, layout, 0) * passes * dev.host_op_us * 1e-6


def dispatch_time(w: Workload, layout: Layout, dev: Device, layers: int) -> float:
    """DTensor's cost beyond the local compute and the collectives under TP
    (Python dispatch, redistribute bookkeeping, the copies functional
    collectives make), calibrated per block pass and per model pass on this
    machine (``--calibrate``), linear in the pass's activation elements."""
    curve = dev.sp_dispatch_curve if layout.sequence_parallel else dev.tp_dispatch_curve
    if layout.tp == 1 or not curve:
        return 0.0
    pmb = layout.pp_microbatches if layout.pp > 1 else 1
    elems = layout.micro_batch // pmb * w.seq_len * w.model.dim
    (x0, b0, m0), (x1, b1, m1) = sorted(curve)[:2]
    per_block, per_model = (max(0.0, y0 + (y1 - y0) * (elems - x0) / (x1 - x0)) for y0, y1 in ((b0, b1), (m0, m1)))
    passes = accum(w, layout) * pmb
    return (per_block * layers + per_model / layout.pp) * passes


def _gemm_time_by_shape(w: Workload, layout: Layout, dev: Device, layers: int, has_head: bool) -> float:
    """A calibrated device: each matmul at the rate measured for its
    (TP-sharded) weight size."""
    m, t, h = w.model, layout.tp, w.model.dim
    tokens = w.global_batch * w.seq_len / layout.dp
    f, kvd = m.ffn_dim, m.n_kv_heads * (m.dim // m.n_heads)
    shapes = [(h, h / t), (h, kvd / t), (h, kvd / t), (h / t, h), (h, f / t), (h, f / t), (f / t, h)]
    per_layer = sum(6 * k * n / _interp(dev.matmul_curve, k * n) for k, n in shapes)
    head = 6 * h * m.vocab_size / t / _interp(dev.matmul_curve, h * m.vocab_size / t)
    return tokens * (layers * per_layer + (head if has_head else 0))


def exposed_communication(colls: list[Collective], cluster: Cluster, layout: Layout, w: Workload,
                          compute_s: float) -> tuple[dict[str, float], dict[str, float], list[dict]]:
    """(time by group, exposed time by group, per-collective rows)."""
    dev = cluster.device
    times = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "host": 0.0}
    rows = []
    ddp_bytes = 0.0
    for col in colls:
        t, link = collective_time(col, cluster, layout)
        group = col.group if col.group in ("tp", "pp", "host") else "dp"
        times[group] += t
        if (not layout.fsdp and col.group.startswith("dp") and col.bytes > 4
                and (col.kind != "broadcast" or layout.zero_stage == 0)):  # DDP's buckets, comm hooks included
            ddp_bytes += col.bytes
        rows.append({**col.as_dict(), "link": link, "time_s": t})
    backward_s = compute_s * 2 / 3  # backward is 4 of a step's 6 FLOPs per parameter
    dp = times["dp"] + times["host"]
    if layout.fsdp:
        units = max(1, len(fsdp_units(w, layout, worst_ranks(layout)[0], "cuda")))
        exposed_dp = max(0.0, dp - dev.overlap * compute_s) + dev.overlap * dp / units
    elif ddp_bytes:
        # The last bucket's share: of the fp32 gradient (a comm hook's buckets are DDP's, whatever they send).
        grads = sum(n for _, n, _ in local_params(w.model, layout, worst_ranks(layout)[0])) * rules.MASTER_BYTES
        last_bucket = min(1.0, DDP_BUCKET_BYTES / grads)
        # ZeRO-1's parameter broadcast follows the step (a hierarchical hook's broadcasts are in the buckets).
        broadcast = sum(r["time_s"] for r in rows if r["kind"] == "broadcast") if layout.zero_stage == 1 else 0.0
        ar = dp - broadcast
        exposed_dp = max(0.0, ar - dev.overlap * backward_s) + dev.overlap * ar * last_bucket + broadcast
    else:
        exposed_dp = dp
    return times, {"dp": exposed_dp, "tp": times["tp"], "pp": times["pp"]}, rows


def offload_host_time(w: Workload, layout: Layout, cluster: Cluster) -> float:
    """AdamW on the host over the offloaded states (FSDP2's CPUOffloadPolicy):
    the same 1.75 x optimizer-state bytes, at host_adam_gbps shared by the
    node's GPUs (one host's memory bandwidth serves all of their processes)."""
    if not layout.cpu_offload:
        return 0.0
    states = model_state_bytes(w.model, layout, worst_ranks(layout)[0])
    per_process = cluster.device.host_adam_gbps / cluster.gpus_per_node
    return states["optimizer_bytes"] * 1.75 / (per_process * 1e9)
