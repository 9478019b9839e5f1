"""Per-rank memory of one layout: model states, activations itemized from
the real block in each precision mode, and what the engines hold around
them (FSDP's unsharded buffers, gradients held across micro-steps and
pipeline microbatches, autocast's weight casts).

Every activation term counts a tensor autograd saves in scaletrain's block
(the method of Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models": count what backward needs), checked byte for
byte against ``torch.autograd.graph.saved_tensors_hooks`` on the real block
in tests/test_planner_memory.py.
"""

from __future__ import annotations

import math

from scaletrain.config import ModelConfig
from scaletrain.parallel.rules import (ADAM_STATE_BYTES, ADAM_STEP_BYTES, DTYPE_BYTES, MASTER_BYTES,
                                       fsdp_reshard_after_forward)
from scaletrain.planner.hardware import GIB, Device
from scaletrain.planner.layout import (Coord, Layout, Workload, _stage_ids, _zero1_partition, accum, fsdp_units,
                                       local_params, stage_layers, stage_param_names)


def model_state_bytes(model: ModelConfig, layout: Layout, c: Coord) -> dict[str, int]:
    """fp32 master parameters, fp32 gradients and AdamW states held by one rank."""
    params = local_params(model, layout, c)
    param_bytes = sum(n for _, n, _ in params) * MASTER_BYTES
    grad_bytes = param_bytes
    if layout.tp > 1 and not layout.fsdp:
        # DTensor's vocab-parallel embedding backward leaves a replicated
        # (full-vocabulary) gradient on every TP rank (measured with torch 2.13;
        # FSDP's reduce-scatter shards it again).
        for name, numel, tp_shape in params:
            if name == "embed_tokens.weight":
                grad_bytes += (model.vocab_size * model.dim - math.prod(tp_shape)) * MASTER_BYTES
    optimizer = params
    if layout.zero_stage == 1 and layout.dp_shard > 1:
        mine = _zero1_partition(params, layout.dp_shard, c.dp_shard)
        optimizer = [p for p in params if p[0] in mine]
    return {"params_bytes": param_bytes, "grads_bytes": grad_bytes,
            "optimizer_bytes": sum(n * ADAM_STATE_BYTES + ADAM_STEP_BYTES for _, n, _ in optimizer)}


def precision(dtype: str, layout: Layout) -> tuple[int, int, bool]:
    """(compute bytes, residual-stream bytes, autocast casts the weights).

    fp32: everything fp32. bf16/fp16 under FSDP2: MixedPrecisionPolicy casts
    the parameters, so the embedding output and with it the residual stream
    are 16-bit and autocast has nothing to cast. Otherwise (DDP, ZeRO-1, one
    rank) the parameters stay fp32 and the trainer's autocast casts each
    matmul's weight and input: the residual stream stays fp32."""
    c = DTYPE_BYTES[dtype]
    if dtype == "fp32":
        return 4, 4, False
    if layout.fsdp:
        return c, c, False
    return c, 4, True


def saved_bytes_per_token(model: ModelConfig, layout: Layout, dtype: str) -> dict[str, float]:
    """Bytes autograd keeps per token for one block, by item:

    norms_fp32     each RMSNorm computes in fp32 and saves its fp32 input
                   (a copy unless the residual is fp32), the fp32 normalized
                   value and one fp32 rsqrt per token: 2 x (8h + 4)
    matmul_inputs  the normed input of the q/k/v and gate/up matmuls, in
                   the compute dtype: saved once per sub-layer when the
                   residual is already in it, else autocast casts it once per
                   matmul (3 + 2 copies); whole h on every TP rank (with SP it
                   is the all-gathered input)
    attention      q and k after RoPE, v, SDPA's output (o_proj's input is a
                   view of it) and its fp32 log-sum-exp per head; RoPE's
                   multiplications save only the cos/sin tables (views of a
                   buffer): c(2h + 2kv·d) + 4a, over t
    mlp            gate, silu(gate), up, their product: 4cf, over t

    Full recompute keeps the block input; selective keeps it and the
    outputs of the matmuls and of SDPA (activation_checkpoint.py's policy),
    the row-parallel outputs whole (partial sums before the all-reduce);
    selective_half keeps every other matmul output (q, v, gate, down).
    """
    h, a, f, t = model.dim, model.n_heads, model.ffn_dim, layout.tp
    kvd = model.n_kv_heads * (model.dim // model.n_heads)
    c, r, _ = precision(dtype, layout)
    sp = layout.sequence_parallel and t > 1
    block_input = r * h / (t if sp else 1)
    if layout.activation_checkpointing == "full":
        return {"block_input": block_input}
    if layout.activation_checkpointing == "selective":
        return {"block_input": block_input,
                "matmul_outputs": (c * (2 * h + 2 * kvd + 2 * f) + 4 * a) / t + 2 * c * h}
    if layout.activation_checkpointing == "selective_half":
        return {"block_input": block_input, "matmul_outputs": (c * (2 * h + kvd + f) + 4 * a) / t + c * h}
    return {"norms_fp32": 2 * (8 * h + 4) / (t if sp else 1),
            "matmul_inputs": (2 if r == c else 5) * c * h,
            "attention": (c * (2 * h + 2 * kvd) + 4 * a) / t,
            "mlp": 4 * c * f / t}


def activation_bytes(w: Workload, layout: Layout, c: Coord) -> dict[str, float]:
    """Peak activation bytes of one rank: saved tensors of every layer of its
    stages for every microbatch in flight, the recompute working set, the
    output layer, autocast's weight casts, and the pipeline's stage buffers."""
    m = w.model
    comp, _, casts_weights = precision(w.dtype, layout)
    mb = layout.micro_batch // (layout.pp_microbatches if layout.pp > 1 else 1)
    tokens = mb * w.seq_len
    layers = stage_layers(m, layout, c.pp)
    in_flight = _in_flight(layout, c.pp)
    per_layer = sum(saved_bytes_per_token(m, layout, w.dtype).values()) * tokens
    out = {"layers": per_layer * layers * in_flight / (layout.virtual_stages if layout.pp > 1 else 1),
           "recompute": 0.0}
    if layout.activation_checkpointing != "none":
        plain = Layout(tp=layout.tp, sequence_parallel=layout.sequence_parallel, dp_shard=layout.dp_shard,
                       zero_stage=layout.zero_stage, pp=layout.pp)
        out["recompute"] = sum(saved_bytes_per_token(m, plain, w.dtype).values()) * tokens
    names = stage_param_names(m, layout, c.pp)
    if names is None or "lm_head.weight" in names:
        # final norm (8h + 4) and the head's input (ch); the loss at its
        # peak, in log-softmax's backward: its fp32 output, the incoming
        # gradient and the outgoing one, 3 x 4V (the 16-bit logits and their
        # fp32 copy are gone by then: allocation events of cross_entropy_loss,
        # tests/test_planner_memory.py).
        out["output_layer"] = tokens * (8 * m.dim + 4 + comp * m.dim + 12 * m.vocab_size / layout.tp)
    if casts_weights:
        # autocast's cast of every matmul weight (all but the embedding and
        # the norms), saved for backward: alive from forward to backward.
        out["autocast_weights"] = comp * sum(n for name, n, _ in local_params(m, layout, c)
                                             if not name.startswith("embed_tokens") and "norm" not in name)
    if layout.pp > 1:
        # Stage boundaries: each in-flight microbatch's received input and sent
        # output; the schedule returns the merged output, so the last stage keeps
        # every microbatch's logits until the step ends.
        stages = _stage_ids(layout, c.pp)
        n_stages = layout.pp * layout.virtual_stages
        ends = sum((s != 0) + (s != n_stages - 1) for s in stages) / len(stages)
        out["stage_buffers"] = ends * in_flight * tokens * m.dim * comp
        if n_stages - 1 in stages:
            out["stage_buffers"] += layout.pp_microbatches * tokens * m.vocab_size / layout.tp * comp
    return out


def saved_activation_bytes(w: Workload, layout: Layout, c: Coord) -> float | None:
    """The part of activation_bytes that autograd saves (what the trainer's
    measure_step probe sees): the blocks, autocast's weight casts, and the
    output layer's final norm, head input and log-softmax output; None under
    recomputation or a pipeline (their buffers are not saved tensors)."""
    if layout.activation_checkpointing != "none" or layout.pp > 1:
        return None
    acts = activation_bytes(w, layout, c)
    m = w.model
    comp = precision(w.dtype, layout)[0]
    tokens = layout.micro_batch * w.seq_len
    head = tokens * (8 * m.dim + 4 + comp * m.dim + 4 * m.vocab_size / layout.tp)
    return acts["layers"] + acts.get("autocast_weights", 0.0) + head


def _in_flight(layout: Layout, pp_rank: int) -> int:
    """Microbatches whose activations a pipeline rank holds at its peak:
    GPipe all m; 1F1B p - r (Narayanan et al. 2021); interleaved schedules
    the warm-up depth 2(p - r - 1) + (v - 1)p + 1 of Megatron's schedule,
    in units of one virtual stage (hence the division by v in the caller)."""
    p, m, v = layout.pp, layout.pp_microbatches, layout.virtual_stages
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m * v
    if layout.pp_schedule == "1f1b":
        return min(p - pp_rank, m)
    return min(v * m, 2 * (p - pp_rank - 1) + (v - 1) * p + 1)


def held_gradient_bytes(w: Workload, layout: Layout, c: Coord) -> float:
    """Full (TP-local, not dp-sharded) fp32 gradients FSDP2 holds on every
    rank on top of the sharded ones: across a pipeline pass's microbatches
    (the schedule turns gradient sync off until its last backward:
    PipelineStage.backward_maybe_with_nosync), and between accumulation
    micro-steps under fsdp_accumulate = unsharded (FSDP2 accumulates the
    unsharded gradient in the reduce dtype, fp32, until the micro-step that
    syncs)."""
    if not layout.fsdp or layout.dp_shard == 1:
        return 0.0
    if layout.pp == 1 and (accum(w, layout) == 1 or layout.reduce_every_micro_step):
        return 0.0
    return sum(math.prod(tp_shape) for _, _, tp_shape in local_params(w.model, layout, c)) * MASTER_BYTES


def memory_of_rank(w: Workload, layout: Layout, c: Coord, device: Device, device_type: str = "cuda") -> dict:
    """Bytes by kind and the peak. The peak is the larger of two moments:
    the start of backward (every activation alive, gradients only where
    they persist: DDP's buckets, accumulation, FSDP's held full gradient)
    and the end of backward (activations freed, all gradients plus the last
    unit's unsharded gradient)."""
    states = model_state_bytes(w.model, layout, c)
    acts = activation_bytes(w, layout, c)
    elem = DTYPE_BYTES[w.dtype]
    unsharded_params = unsharded_grads = 0.0
    if layout.fsdp and layout.dp_shard > 1:
        units = fsdp_units(w, layout, c, device_type)
        sizes = sorted((sum(math.prod(s) for _, s in u) / layout.tp for u in units), reverse=True)
        # Stage 3 holds the running unit and the prefetched next one; stage 2
        # (and any stage under a pipeline, which keeps units unsharded across
        # its microbatches) holds them all.
        every_unit = not fsdp_reshard_after_forward(layout.zero_stage) or layout.pp > 1
        unsharded_params = (sum(sizes) if every_unit else sum(sizes[:2])) * elem
        unsharded_grads = sizes[0] * MASTER_BYTES
    held = held_gradient_bytes(w, layout, c)
    if unsharded_grads and not held:
        # A unit's reduction holds its unsharded gradient and FSDP's copy of
        # it into the reduce-scatter input at once (foreach_reduce); when the
        # full gradient is held anyway, only the copy is extra.
        unsharded_grads *= 2
    persistent = (layout.dp > 1 and not layout.fsdp) or accum(w, layout) > 1
    persistent_grads = states["grads_bytes"] if persistent else 0
    mem = {"parameters": states["params_bytes"], "gradients": states["grads_bytes"],
           "optimizer": states["optimizer_bytes"], "held_full_grads": held, "activations": sum(acts.values()),
           "comm_buffers": unsharded_params + unsharded_grads,
           "overhead": device.overhead_gib * GIB if device_type == "cuda" else 0.0}
    if layout.cpu_offload:
        mem["offloaded_to_cpu"] = mem["parameters"] + mem["gradients"] + mem["optimizer"]
        mem["parameters"] = mem["gradients"] = mem["optimizer"] = 0.0
        persistent_grads = 0
    base = mem["parameters"] + mem["optimizer"] + mem["overhead"] + unsharded_params + held
    backward_start = base + persistent_grads + mem["activations"]
    backward_end = base + mem["gradients"] + unsharded_grads
    allocated = max(backward_start, backward_end) - mem["overhead"]
    # The caching allocator holds more than the live tensors (blocks split
    # by differently sized requests): Device.allocator_fragmentation of the
    # peak, fitted on published max-reserved readings (references.toml).
    mem["allocator_reserve"] = allocated * device.allocator_fragmentation if device_type == "cuda" else 0.0
    mem["peak"] = allocated + mem["allocator_reserve"] + mem["overhead"]
    return mem


def worst_ranks(layout: Layout) -> list[Coord]:
    """The ranks with the most memory or work: the first and last pipeline
    rank (every one when speed-aware stages make them uneven), dp_shard
    rank 0 (FSDP's biggest chunk), tp rank 0."""
    if layout.pp_rank_speeds:
        return [Coord(pp=r) for r in range(layout.pp)]
    return [Coord(pp=r) for r in sorted({0, layout.pp - 1})]
