"""Per-rank predictions for one layout: memory, collectives, step time.

Model states are computed tensor by tensor from the real parameter table
(the Llama module built on the meta device) through the same rules the
trainer applies: pipeline stage ownership (the trainer's own stage_layer_ranges),
DTensor's chunking for tensor parallelism, FSDP2's dim-0 sharding, and
ZeroRedundancyOptimizer's greedy partition for ZeRO-1 — so on the verified
layouts they match the measured bytes exactly.

Activations itemize what autograd saves in scaletrain's block (see
``saved_per_token``), the method of Korthikanti et al. 2022 applied to a Llama
block with SDPA (no s x s score matrix is stored).

Step time is a roofline: matmul FLOPs at the device's achieved rate, plus
elementwise and optimizer memory traffic at its memory bandwidth, plus the
pipeline bubble, plus collectives by the ring formulas on the link each
process group spans. Assumption, stated: data-parallel gradient
communication overlaps the backward pass by ``Device.overlap`` (1 on GPUs,
0 on CPUs); tensor-parallel, pipeline and parameter all-gathers of stage 3
are not overlapped on CPU and are overlapped with compute on GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from scaletrain.config import ModelConfig
from scaletrain.model.counts import train_flops_per_token
from scaletrain.planner import formulas
from scaletrain.planner.hardware import GIB, Cluster, Device

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
ADAM_STEP_BYTES = 4  # the per-parameter step counter tensor (fused AdamW)
DDP_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    zero_stage: int = 0
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    pp_microbatches: int = 1
    micro_batch: int = 1  # sequences per rank per micro-step (split into pp_microbatches under PP)
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    cpu_offload: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def fsdp(self) -> bool:
        """FSDP2 wraps the model: stages 2/3, and stage 0 with TP or PP."""
        return self.dp > 1 and (self.zero_stage >= 2 or (self.zero_stage == 0 and (self.tp > 1 or self.pp > 1)))

    def describe(self) -> str:
        parts = []
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts.append(f"hsdp {self.dp_replicate}x{self.dp_shard}")
        elif self.dp > 1:
            parts.append(f"dp {self.dp}")
        if self.dp > 1:
            parts.append(f"zero{self.zero_stage}")
        if self.tp > 1:
            parts.append(f"tp {self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.pp > 1:
            v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
            parts.append(f"pp {self.pp} {self.pp_schedule}{v} m{self.pp_microbatches}")
        return " ".join(parts) or "single"

    def config_overrides(self) -> list[str]:
        """``--set`` values that make the trainer run this layout."""
        out = [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
               f"parallel.zero_stage={self.zero_stage}", f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"training.activation_checkpointing={self.activation_checkpointing}"]
        if self.pp > 1:
            out += [f"parallel.pp_schedule={self.pp_schedule}", f"parallel.pp_virtual_stages={self.virtual_stages}",
                    f"parallel.pp_microbatches={self.pp_microbatches}"]
        return out


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq_len: int
    global_batch: int
    dtype: str = "bf16"


def accum(w: Workload, layout: Layout) -> int:
    return w.global_batch // (layout.micro_batch * layout.dp)


# ---------------------------------------------------------------- parameters

def _key(model: ModelConfig) -> tuple:
    return tuple(getattr(model, f.name) for f in _MODEL_FIELDS)


_MODEL_FIELDS = dataclasses.fields(ModelConfig)


def param_table(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of ``Llama(model)``, in module order,
    built on the meta device (no memory, no process group)."""
    return _param_table(_key(model))


@functools.lru_cache(maxsize=16)
def _param_table(values: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch

    from scaletrain.model import Llama

    with torch.device("meta"):
        module = Llama(ModelConfig(*values))
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def _chunk(size: int, n: int, i: int) -> int:
    """torch.chunk's piece i of n (what DTensor Shard and FSDP2 use)."""
    c = -(-size // n)
    return max(0, min(c, size - i * c))


def _tp_dim(name: str) -> int | None:
    """The dimension tensor parallelism shards (tensor_parallel.py's plan)."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                      "lm_head.weight", "embed_tokens.weight")):
        return 0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


def _stage_ids(layout: Layout, pp_rank: int) -> list[int]:
    if layout.pp_schedule == "zbv":
        return [pp_rank, 2 * layout.pp - 1 - pp_rank]
    return [pp_rank + k * layout.pp for k in range(layout.virtual_stages)]


def stage_param_names(model: ModelConfig, layout: Layout, pp_rank: int) -> frozenset[str] | None:
    """Parameters on a pipeline rank (None = all of them)."""
    if layout.pp == 1:
        return None
    return _stage_param_names(_key(model), layout.pp, layout.virtual_stages, layout.pp_schedule,
                              pp_rank)


@functools.lru_cache(maxsize=4096)
def _stage_param_names(values: tuple, pp: int, virtual: int, schedule: str, pp_rank: int) -> frozenset[str]:
    from scaletrain.parallel.pipeline import stage_layer_ranges

    model = ModelConfig(*values)
    n_stages = pp * virtual
    ranges = stage_layer_ranges(model, n_stages)
    names = set()
    for s in _stage_ids(Layout(pp=pp, virtual_stages=virtual, pp_schedule=schedule), pp_rank):
        for name, _ in param_table(model):
            if name.startswith("layers."):
                if int(name.split(".")[1]) in ranges[s]:
                    names.add(name)
            elif name.startswith("embed_tokens") and s == 0:
                names.add(name)
            elif name.startswith(("norm.", "lm_head")) and s == n_stages - 1:
                names.add(name)
    return frozenset(names)


def stage_layers(model: ModelConfig, layout: Layout, pp_rank: int) -> int:
    if layout.pp == 1:
        return model.n_layers
    names = stage_param_names(model, layout, pp_rank)
    return len({name.split(".")[1] for name in names if name.startswith("layers.")})


@dataclass(frozen=True)
class Coord:  # noqa: D101 - a rank's place in the mesh
    pp: int = 0
    dp_replicate: int = 0
    dp_shard: int = 0
    tp: int = 0


def coord_of(layout: Layout, rank: int) -> Coord:
    """Mesh (pp, dp_replicate, dp_shard, tp), row-major like the trainer's DeviceMesh."""
    t = rank % layout.tp
    rank //= layout.tp
    s = rank % layout.dp_shard
    rank //= layout.dp_shard
    r = rank % layout.dp_replicate
    return Coord(rank // layout.dp_replicate, r, s, t)


def local_params(model: ModelConfig, layout: Layout, c: Coord) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, local numel, shape after TP) of this rank's parameters: stage,
    then the TP shard, then FSDP's dim-0 shard over dp_shard."""
    key = dataclasses.replace(layout, micro_batch=1, pp_microbatches=1, activation_checkpointing="none",
                              cpu_offload=False)
    return _local_params(_key(model), key, c)


@functools.lru_cache(maxsize=4096)
def _local_params(values: tuple, layout: Layout, c: Coord) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    model = ModelConfig(*values)
    names = stage_param_names(model, layout, c.pp)
    out = []
    for name, shape in param_table(model):
        if names is not None and name not in names:
            continue
        shape = list(shape)
        dim = _tp_dim(name) if layout.tp > 1 else None
        if dim is not None:
            shape[dim] = _chunk(shape[dim], layout.tp, c.tp)
        tp_shape = tuple(shape)
        if layout.fsdp and layout.dp_shard > 1:
            shape[0] = _chunk(shape[0], layout.dp_shard, c.dp_shard)
        out.append((name, math.prod(shape), tp_shape))
    return tuple(out)


def _zero1_partition(params: list[tuple[str, int, tuple]], n: int, index: int) -> set[str]:
    """ZeroRedundancyOptimizer's partition: per parameter group (matrices,
    then vectors), largest first, each to the rank with the fewest elements."""
    sizes = [0] * n
    mine = set()
    for group in ([p for p in params if len(p[2]) >= 2], [p for p in params if len(p[2]) < 2]):
        for name, numel, _ in sorted(group, key=lambda p: p[1], reverse=True):
            rank = sizes.index(min(sizes))
            sizes[rank] += numel
            if rank == index:
                mine.add(name)
    return mine


def model_state_bytes(model: ModelConfig, layout: Layout, c: Coord) -> dict[str, int]:
    """fp32 master parameters, fp32 gradients and AdamW states held by one rank."""
    params = local_params(model, layout, c)
    param_bytes = sum(n for _, n, _ in params) * 4
    grad_bytes = param_bytes
    if layout.tp > 1 and not layout.fsdp:
        # DTensor's vocab-parallel embedding backward leaves a replicated
        # (full-vocabulary) gradient on every TP rank (measured with torch 2.13;
        # FSDP's reduce-scatter shards it again).
        for name, numel, tp_shape in params:
            if name == "embed_tokens.weight":
                grad_bytes += (model.vocab_size * model.dim - math.prod(tp_shape)) * 4
    optimizer = params
    if layout.zero_stage == 1 and layout.dp_shard > 1:
        mine = _zero1_partition(params, layout.dp_shard, c.dp_shard)
        optimizer = [p for p in params if p[0] in mine]
    return {"params_bytes": param_bytes, "grads_bytes": grad_bytes,
            "optimizer_bytes": sum(n * ADAM_STATE_BYTES + ADAM_STEP_BYTES for _, n, _ in optimizer)}


# --------------------------------------------------------------- activations

def saved_per_token(model: ModelConfig, layout: Layout) -> dict[str, float]:
    """Elements autograd keeps per token for one block of scaletrain's Llama,
    by the method of Korthikanti et al. 2022 (count every tensor saved for
    backward), for SDPA attention (flash/memory-efficient: q, k, v, output and
    the log-sum-exp; no s x s scores):

    each RMSNorm     input, normalized, output                 3h
    attention        q and k after RoPE, v, SDPA's output (the
                     o_proj input is a view of it), lse        2h + 2·kv·d + a
                     (RoPE's multiplications keep only the
                     cos/sin tables, not q and k before it)
    SwiGLU MLP       gate, silu(gate), up, product             4f

    TP divides the head and FFN terms by t; with sequence parallelism the
    norms hold 2h/t but the all-gathered norm output feeding the column-
    parallel matmuls is saved whole (DTensor does not re-gather it in
    backward). Full recompute keeps the block input; selective keeps the
    matmul and attention outputs (activation_checkpoint.py's policy).
    """
    h, a, f, t = model.dim, model.n_heads, model.ffn_dim, layout.tp
    kvd = model.n_kv_heads * (model.dim // model.n_heads)
    norms = (2 * h / t + h) * 2 if layout.sequence_parallel and t > 1 else 6 * h
    block_input = h / t if layout.sequence_parallel and t > 1 else h
    full = {"norms": norms, "attention": (2 * h + 2 * kvd + a) / t, "mlp": 4 * f / t}
    if layout.activation_checkpointing == "full":
        return {"block_input": block_input}
    if layout.activation_checkpointing == "selective":
        return {"block_input": block_input, "matmul_outputs": (3 * h + 2 * kvd + a + 2 * f) / t + h}
    return full


def activation_bytes(w: Workload, layout: Layout, c: Coord) -> dict[str, float]:
    """Peak activation bytes of one rank: saved tensors of every layer of its
    stages for every microbatch in flight, the recompute working set, and the
    output layer (fp32 log-softmax, its gradient and the logits gradient)."""
    m = w.model
    elem = DTYPE_BYTES[w.dtype]
    mb = layout.micro_batch // (layout.pp_microbatches if layout.pp > 1 else 1)
    tokens = mb * w.seq_len
    layers = stage_layers(m, layout, c.pp)
    in_flight = _in_flight(layout, c.pp)
    per_layer = sum(saved_per_token(m, layout).values()) * tokens * elem
    recompute = 0.0
    if layout.activation_checkpointing != "none":
        recompute = sum(saved_per_token(m, Layout(tp=layout.tp, sequence_parallel=layout.sequence_parallel))
                        .values()) * tokens * elem
    out = {"layers": per_layer * layers * in_flight / (layout.virtual_stages if layout.pp > 1 else 1),
           "recompute": recompute}
    names = stage_param_names(m, layout, c.pp)
    if names is None or "lm_head.weight" in names:
        # final norm (3h) + fp32 log-softmax output, its gradient, the logits gradient (3V)
        out["output_layer"] = tokens * (3 * m.dim * elem + 3 * m.vocab_size / layout.tp * 4)
    if layout.pp > 1:
        # Stage boundaries: each in-flight microbatch's received input and sent
        # output; the schedule returns the merged output, so the last stage keeps
        # every microbatch's logits until the step ends.
        stages = _stage_ids(layout, c.pp)
        n_stages = layout.pp * layout.virtual_stages
        ends = sum((s != 0) + (s != n_stages - 1) for s in stages) / len(stages)
        out["stage_buffers"] = ends * in_flight * tokens * m.dim * elem
        if n_stages - 1 in stages:
            out["stage_buffers"] += layout.pp_microbatches * tokens * m.vocab_size / layout.tp * elem
    return out


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


# ------------------------------------------------------------ communication

@dataclass
class Collective:
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, send, recv
    group: str  # mesh dimension(s)
    bytes: float  # message bytes per step (nccl-tests' size)
    calls: int
    ranks: int

    def as_dict(self) -> dict:
        return {"kind": self.kind, "group": self.group, "bytes": self.bytes, "calls": self.calls,
                "ranks": self.ranks}


def collectives(w: Workload, layout: Layout, c: Coord, device_type: str = "cpu") -> list[Collective]:
    """Every collective one rank takes part in during one optimizer step."""
    m, out = w.model, []
    params = local_params(m, layout, c)
    n_accum = accum(w, layout)
    pmb = layout.pp_microbatches if layout.pp > 1 else 1
    elem = DTYPE_BYTES[w.dtype]
    tokens = layout.micro_batch // pmb * w.seq_len

    if layout.dp > 1 and not layout.fsdp:  # DDP (+ ZeRO-1's parameter broadcast)
        grad_bytes = sum(n for _, n, _ in params) * 4
        group = "dp_shard" if layout.zero_stage == 1 else "dp_replicate"
        out.append(Collective("all_reduce", group, grad_bytes, math.ceil(grad_bytes / DDP_BUCKET_BYTES),
                              layout.dp))
        if layout.zero_stage == 1:
            out.append(Collective("broadcast", "dp_shard", grad_bytes, layout.dp_shard, layout.dp_shard))
    if layout.fsdp:
        out += _fsdp_collectives(w, layout, c, n_accum, pmb, device_type)
    if layout.tp > 1:
        out += _tp_collectives(w, layout, c, n_accum * pmb, tokens, elem)
    if layout.pp > 1:
        stages = _stage_ids(layout, c.pp)
        n_stages = layout.pp * layout.virtual_stages
        msg = tokens * m.dim * elem / (layout.tp if layout.sequence_parallel else 1)
        sends = sum((s != n_stages - 1) + (s != 0) for s in stages) * pmb * n_accum
        out.append(Collective("send", "pp", sends * msg, sends, 2))
        out.append(Collective("recv", "pp", sends * msg, sends, 2))
    out += _grad_norm_collectives(layout, params)
    # The trainer's own: the loss (one fp32 per data-parallel dimension and
    # the pipeline), and the pipeline's squared gradient norm.
    for name, size in (("pp", layout.pp), ("dp_replicate", layout.dp_replicate), ("dp_shard", layout.dp_shard)):
        if size > 1:
            out.append(Collective("all_reduce", name, 4, 1, size))
    if layout.pp > 1:
        out.append(Collective("all_reduce", "pp", 4, 1, layout.pp))
    return out


def _grad_norm_collectives(layout: Layout, params: list[tuple[str, int, tuple]]) -> list[Collective]:
    """clip_grad_norm sums squared local gradients grouped by the mesh
    dimensions they are sharded over, then all-reduces each group's scalar
    once per sharded dimension."""
    groups = set()
    for name, _, tp_shape in params:
        dp_sharded = layout.fsdp and layout.dp_shard > 1
        replicated_grad = name == "embed_tokens.weight" and not dp_sharded  # see model_state_bytes
        tp_sharded = layout.tp > 1 and not replicated_grad and _tp_dim(name) is not None
        groups.add((dp_sharded, tp_sharded))
    out = []
    for dp_sharded, tp_sharded in groups:
        if dp_sharded:
            out.append(Collective("all_reduce", "dp_shard", 4, 1, layout.dp_shard))
        if tp_sharded:
            out.append(Collective("all_reduce", "tp", 4, 1, layout.tp))
    return out


def _fsdp_units(w: Workload, layout: Layout, c: Coord, device_type: str) -> list[list[tuple[str, tuple]]]:
    """FSDP2 units of a rank's stages: each block (stage 3, or on CUDA) and
    the root, or the whole stage as one unit (stage 2 on CPU)."""
    names = stage_param_names(w.model, layout, c.pp)
    table = [(n, s) for n, s in param_table(w.model) if names is None or n in names]
    per_block = layout.zero_stage == 3 or device_type == "cuda"
    if not per_block:
        return [table]
    blocks: dict[str, list] = {}
    root = []
    for name, shape in table:
        if name.startswith("layers."):
            blocks.setdefault(name.split(".")[1], []).append((name, shape))
        else:
            root.append((name, shape))
    return list(blocks.values()) + ([root] if root else [])


def _fsdp_collectives(w: Workload, layout: Layout, c: Coord, n_accum: int, pmb: int,
                      device_type: str = "cpu") -> list[Collective]:
    """All-gather of each unit's parameters (compute dtype) before forward
    (and again before backward under stage 3), reduce-scatter of its fp32
    gradients once per step; HSDP all-reduces the shards across replicas."""
    shard, elem = layout.dp_shard, DTYPE_BYTES[w.dtype]
    out = []
    gather_bytes = gather_calls = rs_bytes = rs_calls = 0
    passes = n_accum * pmb
    units = _fsdp_units(w, layout, c, device_type)
    for unit in units:
        padded = 0
        for name, shape in unit:
            shape = list(shape)
            dim = _tp_dim(name) if layout.tp > 1 else None
            if dim is not None:
                shape[dim] = _chunk(shape[dim], layout.tp, c.tp)
            padded += -(-shape[0] // shard) * shard * math.prod(shape[1:])
        is_block = unit[0][0].startswith("layers.") and len(units) > 1
        gathers = passes * (2 if layout.zero_stage == 3 and is_block else 1)
        if shard > 1:
            gather_bytes += gathers * padded * elem
            gather_calls += gathers
            rs_bytes += padded * 4
            rs_calls += 1
        if layout.dp_replicate > 1:
            out.append(Collective("all_reduce", "dp_replicate", padded // shard * 4, 1, layout.dp_replicate))
    if gather_calls and device_type == "cpu":
        # gloo (data_parallel.GlooAllGather / GlooReduceScatter): a broadcast
        # per rank into the gathered buffer; an all-reduce of the whole input.
        out.append(Collective("broadcast", "dp_shard", gather_bytes, gather_calls * shard, shard))
        out.append(Collective("all_reduce", "dp_shard", rs_bytes, rs_calls, shard))
    elif gather_calls:
        out.append(Collective("all_gather", "dp_shard", gather_bytes, gather_calls, shard))
        out.append(Collective("reduce_scatter", "dp_shard", rs_bytes, rs_calls, shard))
    return out


def _tp_collectives(w: Workload, layout: Layout, c: Coord, passes: int, tokens: int, elem: int) -> list[Collective]:
    """Megatron TP: per block one all-reduce after attention and one after the
    MLP in forward, the same two on the input gradients in backward; with SP
    each becomes an all-gather + reduce-scatter pair. Vocab-parallel embedding:
    one forward all-reduce; column-parallel head: one backward all-reduce of
    its input gradient; loss_parallel: three all-reduces of one value per
    token (max, sum of exponentials, target logit)."""
    m, t = w.model, layout.tp
    layers = stage_layers(m, layout, c.pp)
    names = stage_param_names(m, layout, c.pp)
    has_embed = names is None or "embed_tokens.weight" in names
    has_head = names is None or "lm_head.weight" in names
    act = tokens * m.dim * elem
    out = []
    if layout.sequence_parallel:
        n = 4 * layers * passes
        out.append(Collective("all_gather", "tp", n * act, n, t))
        out.append(Collective("reduce_scatter", "tp", n * act, n, t))
        if has_embed:  # forward reduce-scatter, backward all-gather of the output gradient
            out.append(Collective("reduce_scatter", "tp", passes * act, passes, t))
            out.append(Collective("all_gather", "tp", passes * act, passes, t))
        # sequence-parallel norms: the replicated weight's partial gradient is all-reduced
        norms = 2 * layers + has_head
        out.append(Collective("all_reduce", "tp", norms * passes * m.dim * 4, norms * passes, t))
        if has_head:
            out.append(Collective("all_gather", "tp", passes * act, passes, t))
            out.append(Collective("reduce_scatter", "tp", passes * act, passes, t))
    else:
        n = 4 * layers * passes + passes * (has_embed + has_head)
        out.append(Collective("all_reduce", "tp", n * act, n, t))
    if has_head:
        out.append(Collective("all_reduce", "tp", 3 * passes * tokens * 4, 3 * passes, t))
    return out


def merge(colls: list[Collective]) -> dict[str, dict]:
    """Per collective kind: calls and bytes (what the trainer's probe measures)."""
    out: dict[str, dict] = {}
    for col in colls:
        entry = out.setdefault(col.kind, {"calls": 0, "bytes": 0})
        entry["calls"] += col.calls
        entry["bytes"] += int(col.bytes)
    return dict(sorted(out.items()))


# ------------------------------------------------------------ the whole plan

@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)  # bytes, worst rank
    total_bytes: float = 0.0
    fits: bool = True
    why: str = ""
    comm: list[dict] = field(default_factory=list)
    comm_time_s: dict[str, float] = field(default_factory=dict)
    compute_s: float = 0.0
    bubble: float = 0.0
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    def as_dict(self) -> dict:
        return {"layout": {**self.layout.__dict__, "description": self.layout.describe()},
                "memory_gib": {k: v / GIB for k, v in self.memory.items()},
                "total_gib": self.total_bytes / GIB, "fits": self.fits, "why": self.why,
                "communication": self.comm, "comm_time_s": self.comm_time_s, "compute_s": self.compute_s,
                "bubble": self.bubble, "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu}


def memory_of_rank(w: Workload, layout: Layout, c: Coord, device: Device, device_type: str = "cuda") -> dict:
    """Bytes by kind and the peak. The peak is the larger of two moments:
    the start of backward (every activation alive, gradients only where
    they persist: DDP's buckets, accumulation) and the end of backward (activations freed,
    all gradients plus the last unit's unsharded gradient)."""
    states = model_state_bytes(w.model, layout, c)
    acts = activation_bytes(w, layout, c)
    elem = DTYPE_BYTES[w.dtype]
    unsharded_params = unsharded_grads = 0.0
    if layout.fsdp and layout.dp_shard > 1:
        units = _fsdp_units(w, layout, c, device_type)
        sizes = sorted((sum(math.prod(s) for _, s in u) / layout.tp for u in units), reverse=True)
        unsharded_params = (sum(sizes) if layout.zero_stage == 2 else sum(sizes[:2])) * elem
        unsharded_grads = sizes[0] * 4
    # Gradients alive with the activations: DDP's buckets, and under gradient
    # accumulation the earlier micro-steps' sums during the last one.
    persistent = (layout.dp > 1 and not layout.fsdp) or accum(w, layout) > 1
    persistent_grads = states["grads_bytes"] if persistent else 0
    mem = {"parameters": states["params_bytes"], "gradients": states["grads_bytes"],
           "optimizer": states["optimizer_bytes"], "activations": sum(acts.values()),
           "comm_buffers": unsharded_params + unsharded_grads,
           "overhead": device.overhead_gib * GIB if device_type == "cuda" else 0.0}
    if layout.cpu_offload:
        mem["offloaded_to_cpu"] = mem["parameters"] + mem["gradients"] + mem["optimizer"]
        mem["parameters"] = mem["gradients"] = mem["optimizer"] = 0.0
        persistent_grads = 0
    base = mem["parameters"] + mem["optimizer"] + mem["overhead"] + unsharded_params
    backward_start = base + persistent_grads + mem["activations"]
    backward_end = base + mem["gradients"] + unsharded_grads
    mem["peak"] = max(backward_start, backward_end)
    return mem


def worst_ranks(layout: Layout) -> list[Coord]:
    """The ranks with the most memory or work: the first and last pipeline
    rank, dp_shard rank 0 (FSDP's biggest chunk), tp rank 0."""
    return [Coord(pp=r) for r in sorted({0, layout.pp - 1})]


def estimate(w: Workload, layout: Layout, cluster: Cluster, device_type: str = "cuda") -> Estimate:
    dev = cluster.device
    est = Estimate(layout)
    mems = [memory_of_rank(w, layout, c, dev, device_type) for c in worst_ranks(layout)]
    est.memory = max(mems, key=lambda m: m["peak"])
    est.total_bytes = est.memory.pop("peak")
    capacity = dev.memory_gib * GIB
    if est.total_bytes > capacity:
        est.fits = False
        est.why = f"needs {est.total_bytes / GIB:.1f} GiB per GPU; {dev.memory_gib:g} GiB available"
    if w.dtype == "bf16" and dev.bf16 == 0:
        est.fits, est.why = False, f"{dev.name} has no bf16; plan with --dtype fp16"

    est.compute_s = sum(compute_parts(w, layout, dev).values())
    # Each accumulation micro-step is its own pipeline pass (fill and drain).
    est.bubble = formulas.pipeline_bubble(layout.pp, layout.pp_microbatches, layout.virtual_stages,
                                          layout.pp_schedule)
    compute_total = est.compute_s / (1 - est.bubble)

    colls = collectives(w, layout, worst_ranks(layout)[0], device_type)
    est.comm = []
    times = {"dp": 0.0, "tp": 0.0, "pp": 0.0}
    for col in colls:
        t, link = collective_time(col, cluster, layout)
        times["tp" if col.group == "tp" else "pp" if col.group == "pp" else "dp"] += t
        est.comm.append({**col.as_dict(), "link": link, "time_s": t})
    est.comm_time_s = times
    backward_s = compute_total * 2 / 3
    exposed_dp = max(0.0, times["dp"] - dev.overlap * backward_s)
    exposed_tp = times["tp"]  # on the critical path of every block
    offload_s = 0.0
    if layout.cpu_offload:  # parameters down, gradients up over PCIe, optimizer step on the host
        states = model_state_bytes(w.model, layout, worst_ranks(layout)[0])
        offload_s = states["params_bytes"] * 2 / (25e9) + states["optimizer_bytes"] * 2 / 50e9
    est.step_time_s = compute_total + exposed_dp + exposed_tp + times["pp"] + offload_s
    est.tokens_per_s = w.global_batch * w.seq_len / est.step_time_s
    peak = dev.peak_flops(w.dtype)
    est.mfu = (train_flops_per_token(w.model, w.seq_len) * est.tokens_per_s / cluster.gpus / peak) if peak else 0.0
    return est


def compute_parts(w: Workload, layout: Layout, dev: Device) -> dict[str, float]:
    """Seconds of one optimizer step's compute on the busiest rank, by part:
    matmuls (and attention) at the achieved rate, elementwise traffic, the
    optimizer's memory traffic, and DTensor's dispatch under TP."""
    flops_token = train_flops_per_token(w.model, w.seq_len)
    if layout.activation_checkpointing == "full":
        flops_token *= 4 / 3  # one more forward (selective recomputes pointwise ops only: no matmul FLOPs)
    tokens_rank = w.global_batch * w.seq_len / (layout.dp * layout.tp * layout.pp)
    if dev.matmul_curve:
        matmul_s = _matmul_time_by_shape(w, layout, dev) * flops_token / train_flops_per_token(w.model, w.seq_len)
    else:
        matmul_s = flops_token * tokens_rank / dev.achieved_flops(w.dtype)
    # Elementwise traffic: every saved activation is written in forward, read
    # in backward and its gradient written (3 passes; an assumption), a
    # recomputed forward adds one more.
    saved = sum(saved_per_token(w.model, Layout(tp=layout.tp, sequence_parallel=layout.sequence_parallel))
                .values()) * DTYPE_BYTES[w.dtype]
    passes = 4 if layout.activation_checkpointing != "none" else 3
    layers = stage_layers(w.model, layout, 0)
    elementwise_bytes = passes * saved * layers * w.global_batch * w.seq_len / layout.dp
    states = model_state_bytes(w.model, layout, worst_ranks(layout)[0])
    optimizer_bytes = 0 if layout.cpu_offload else states["optimizer_bytes"] * 1.75 + states["params_bytes"] * 2
    return {"matmul": matmul_s, "elementwise": elementwise_bytes / ((dev.elementwise_gbps or dev.hbm_gbps) * 1e9),
            "optimizer": optimizer_bytes / (dev.hbm_gbps * 1e9), "dispatch": dispatch_time(w, layout, dev)}


def dispatch_time(w: Workload, layout: Layout, dev: Device) -> float:
    """DTensor's cost beyond the local compute and the collectives under TP
    (Python dispatch, redistribute bookkeeping, the copies functional
    collectives make, ranks waiting on each other at every collective), per
    block pass and per model pass (embedding, head, loss), each linear in the
    pass's activation elements between the two calibrated sizes."""
    curve = dev.sp_dispatch_curve if layout.sequence_parallel else dev.tp_dispatch_curve
    if layout.tp == 1 or not curve:
        return 0.0
    pmb = layout.pp_microbatches if layout.pp > 1 else 1
    elems = layout.micro_batch // pmb * w.seq_len * w.model.dim
    (x0, b0, m0), (x1, b1, m1) = sorted(curve)[:2]
    per_block, per_model = (max(0.0, y0 + (y1 - y0) * (elems - x0) / (x1 - x0)) for y0, y1 in ((b0, b1), (m0, m1)))
    passes = accum(w, layout) * pmb
    return (per_block * stage_layers(w.model, layout, 0) + per_model / layout.pp) * passes


def collective_time(col: Collective, cluster: Cluster, layout: Layout) -> tuple[float, str]:
    """(seconds per step, link) of one rank's collective: the calibrated
    curves when the device has them, else the ring formulas on the link its
    group spans."""
    bw, lat, link = _link(cluster, layout, col.group)
    if col.kind == "recv":
        return 0.0, link  # the same transfers as the peer's send
    if cluster.device.allreduce_curve:
        return _measured_collective_time(col, cluster.device), link
    if col.kind == "all_reduce":
        t = formulas.ring_all_reduce_time(col.bytes, col.ranks, bw, lat)
        t += (col.calls - 1) * 2 * (col.ranks - 1) * lat  # latency is paid per call
    elif col.kind in ("all_gather", "reduce_scatter"):
        t = formulas.ring_all_gather_time(col.bytes, col.ranks, bw, lat) + (col.calls - 1) * (col.ranks - 1) * lat
    elif col.kind == "broadcast":
        t = formulas.broadcast_time(col.bytes, col.ranks, bw, lat) + (col.calls - 1) * lat
    else:  # send
        t = formulas.p2p_time(col.bytes, bw, lat * col.calls)
    return t, link


def _interp(curve: tuple, x: float) -> float:
    """Log-log interpolation in a measured [(x, y), ...] curve, clamped at the ends."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1] * (x / pts[-1][0] if pts[-1][1] < 1 else 1)  # times grow linearly past the end
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


def _matmul_time_by_shape(w: Workload, layout: Layout, dev: Device) -> float:
    """Seconds of one step's matmuls on the busiest rank, each at the rate the
    calibration measured for its (TP-sharded) weight size; the attention
    score/value products at the measured causal-SDPA rate."""
    m, t, h = w.model, layout.tp, w.model.dim
    tokens = w.global_batch * w.seq_len / layout.dp
    layers = stage_layers(m, layout, 0) if layout.pp > 1 else m.n_layers
    head = 6 * h * m.vocab_size / t / _interp(dev.matmul_curve, h * m.vocab_size / t)
    names = stage_param_names(m, layout, layout.pp - 1)
    has_head = names is None or layout.pp == 1
    return tokens * (layers * block_matmul_time(m, t, w.seq_len, dev) + (head if has_head else 0))


def block_matmul_time(m: ModelConfig, t: int, seq_len: int, dev: Device) -> float:
    """Seconds per token of one block's matmuls and attention, forward + backward."""
    h, f, kvd = m.dim, m.ffn_dim, m.n_kv_heads * (m.dim // m.n_heads)
    shapes = [(h, h / t), (h, kvd / t), (h, kvd / t), (h / t, h), (h, f / t), (h, f / t), (f / t, h)]
    per_layer = sum(6 * k * n / _interp(dev.matmul_curve, k * n) for k, n in shapes)
    head_dim = m.dim // m.n_heads
    attention_rate = dev.attention_flops or _interp(dev.matmul_curve, seq_len * head_dim)
    return per_layer + 12 * m.dim / t * seq_len / attention_rate


def _measured_collective_time(col: Collective, dev: Device) -> float:
    """Per call, the calibrated time of that collective at that message size
    (scaled to this group size by the ring bus factor); a collective without
    its own curve takes the all-reduce curve scaled by the bus factors."""
    per_call = col.bytes / max(col.calls, 1)
    n0 = max(dev.curve_ranks, 2)
    own = {"all_reduce": dev.allreduce_curve, "all_gather": dev.allgather_curve,
           "reduce_scatter": dev.reducescatter_curve, "broadcast": dev.broadcast_curve}.get(col.kind)
    measured_kind = col.kind if own else "all_reduce"
    return col.calls * _interp(own or dev.allreduce_curve, per_call) * _bus(col.kind, col.ranks) \
        / _bus(measured_kind, n0)


def _bus(kind: str, n: int) -> float:
    """nccl-tests' bus factor: bytes each rank moves per byte of the collective."""
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}.get(kind, 1.0)


def _link(cluster: Cluster, layout: Layout, group: str) -> tuple[float, float]:
    """(bytes/s, latency s) of the link a mesh dimension's groups span: a
    group stays inside a node when (its stride x size) <= GPUs per node."""
    inner = {"tp": 1, "dp_shard": layout.tp, "dp_replicate": layout.tp * layout.dp_shard,
             "pp": layout.tp * layout.dp}
    size = {"tp": layout.tp, "dp_shard": layout.dp_shard, "dp_replicate": layout.dp_replicate, "pp": layout.pp}
    d = cluster.device
    if inner[group] * size[group] <= cluster.gpus_per_node:
        return d.intra_gbps * 1e9, d.intra_latency_us * 1e-6, f"intra-node ({d.intra})"
    return d.inter_gbps * 1e9, d.inter_latency_us * 1e-6, f"inter-node ({d.inter})"
