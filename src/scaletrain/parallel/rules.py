"""The layout rules, torch-free: one definition that the trainer applies
(pipeline.py, tensor_parallel.py, data_parallel.py, compose.py) and the
planner counts with (planner/layout.py, memory.py, communication.py).

Nothing here imports torch, so the planner can evaluate thousands of
layouts and the launcher can check one before any worker starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from scaletrain.config import ModelConfig

# Bytes per element of each training dtype.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# FSDP2's MixedPrecisionPolicy.param_dtype per training dtype (None = keep
# fp32); DDP always keeps fp32 parameters and runs under autocast instead.
FSDP_PARAM_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": None}
MASTER_BYTES = 4  # master weights and gradients stay fp32 in every layout
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
ADAM_STEP_BYTES = 4  # the per-parameter step counter tensor (fused AdamW)

# ------------------------------------------------------------- tensor parallel
# Megatron's plan (Shoeybi et al. 2019) as data: module path inside a block,
# or at the top of the model -> DTensor style. tensor_parallel.py turns it
# into ColwiseParallel / RowwiseParallel; the planner reads which dimension
# each parameter is split along from it.
TP_BLOCK_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}
TP_TOP_PLAN = {"embed_tokens": "rowwise", "lm_head": "colwise"}


def tp_style(param_name: str) -> str | None:
    """The TP style of the module owning ``param_name`` (None = replicated)."""
    module = param_name.rpartition(".")[0]
    if module.startswith("layers."):
        return TP_BLOCK_PLAN.get(module.split(".", 2)[2])
    return TP_TOP_PLAN.get(module)


def tp_shard_dim(param_name: str) -> int | None:
    """The dimension DTensor shards a parameter along under TP: an
    nn.Linear weight is (out, in), so colwise splits dim 0 and rowwise dim 1;
    RowwiseParallel on an nn.Embedding splits the vocabulary, dim 0."""
    style = tp_style(param_name)
    if style is None:
        return None
    if style == "colwise" or param_name.startswith("embed_tokens."):
        return 0
    return 1


def chunk_size(size: int, n: int, i: int) -> int:
    """torch.chunk's piece i of n: what DTensor's Shard and FSDP2's dim-0
    sharding give each rank (the last pieces may be short or empty)."""
    c = -(-size // n)
    return max(0, min(c, size - i * c))


# ----------------------------------------------------------------- pipeline

def block_cost(model: ModelConfig) -> int:
    """A block's cost in parameters (the balancing unit)."""
    head_dim = model.dim // model.n_heads
    return model.dim * head_dim * (2 * model.n_heads + 2 * model.n_kv_heads) + 3 * model.dim * model.ffn_dim


def stage_layer_ranges(model: ModelConfig, n_stages: int,
                       stage_speeds: Sequence[float] | None = None) -> list[range]:
    """Contiguous layer ranges, one per stage, minimizing the slowest stage's
    time: cost / speed, where a block costs its parameters, the embedding is
    charged to the first stage and the head to the last (dynamic programming
    over cut points; every stage gets >= 1 layer). ``stage_speeds`` (relative,
    one per stage; None = equal) lets a faster device take more layers."""
    speeds = list(stage_speeds) if stage_speeds is not None else [1.0] * n_stages
    if len(speeds) != n_stages or min(speeds) <= 0:
        raise ValueError(f"stage_speeds needs {n_stages} positive values, got {speeds}")
    block, ends = block_cost(model), model.vocab_size * model.dim
    L = model.n_layers

    def time(stage: int, first: int, end: int) -> float:
        cost = (end - first) * block + (ends if stage == 0 else 0) + (ends if stage == n_stages - 1 else 0)
        return cost / speeds[stage]

    # best[s][i]: minimal max-time of placing layers [0, i) on stages [0, s).
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, L - (n_stages - s) + 1):
            for j in range(s - 1, i):
                candidate = max(best[s - 1][j], time(s - 1, j, i))
                if candidate < best[s][i]:
                    best[s][i], cut[s][i] = candidate, j
    ranges, end = [], L
    for s in range(n_stages, 0, -1):
        ranges.append(range(cut[s][end], end))
        end = cut[s][end]
    return ranges[::-1]


def local_stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Stages a pipeline rank runs: looped (stage s on rank s % pp) for
    GPipe, 1F1B and the interleaved schedules; a V for ZB-V (rank r holds
    stages r and 2pp-1-r)."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def stage_speeds(rank_speeds: Sequence[float] | None, pp: int, virtual: int, schedule: str) -> list[float] | None:
    """Per-stage speeds from per-pipeline-rank speeds (a stage runs at the
    speed of the rank that holds it)."""
    if not rank_speeds:
        return None
    if len(rank_speeds) != pp:
        raise ValueError(f"{len(rank_speeds)} pipeline rank speeds for pp = {pp}")
    speeds = [0.0] * (pp * virtual)
    for r in range(pp):
        for s in local_stage_ids(r, pp, virtual, schedule):
            speeds[s] = float(rank_speeds[r])
    return speeds


def parse_rank_speeds(spec: str, pp: int) -> list[float] | None:
    """``parallel.pp_rank_speeds``: '' (equal), 'auto' (measured at start-up:
    equal until then) or PP comma-separated positive numbers. Raises
    ValueError with what is wrong."""
    if spec.strip() in ("", "auto"):
        return None
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r} is not a comma-separated list of numbers") from None
    if len(values) != pp:
        raise ValueError(f"{spec!r} lists {len(values)} speeds; parallel.pp = {pp} needs one per pipeline rank")
    if min(values) <= 0 or not all(v < float("inf") for v in values):
        raise ValueError(f"{spec!r}: every speed must be a positive finite number")
    return values


def stage_owns(param_name: str, stage: int, layers: range, n_stages: int) -> bool:
    """Whether a stage keeps a parameter (pipeline.split_stage's rule):
    its blocks, the embedding on the first stage, the final norm and head
    on the last."""
    if param_name.startswith("layers."):
        return int(param_name.split(".")[1]) in layers
    if param_name.startswith("embed_tokens"):
        return stage == 0
    if param_name.startswith(("norm.", "lm_head")):
        return stage == n_stages - 1
    return False


# ------------------------------------------------------------ data parallel

def data_parallel_engine(dp_replicate: int, dp_shard: int, zero_stage: int, tp: int, pp: int) -> str:
    """Which engine wraps each part (data_parallel.py's table):

    none   one data-parallel rank
    ddp    zero_stage 0 without TP or PP (all-reduce in buckets)
    zero1  zero_stage 1: DDP + ZeroRedundancyOptimizer over dp_shard
    fsdp   zero_stage 2/3, and stage 0 with TP or PP: FSDP2 over
           (dp_replicate, dp_shard); with dp_shard = 1 that is pure
           replication which, unlike DDP, takes TP's DTensor parameters and
           a pipeline schedule's several backward passes per step."""
    if dp_replicate * dp_shard == 1:
        return "none"
    if zero_stage == 0 and tp == 1 and pp == 1:
        return "ddp"
    if zero_stage == 1:
        return "zero1"
    return "fsdp"


def fsdp_unit_per_block(zero_stage: int, device_type: str) -> bool:
    """Each block its own FSDP2 unit (plus the root), or the whole part one
    unit: stage 3 always (it holds one block's full parameters at a time),
    and on CUDA (communication overlaps the next block's compute). Stage 2 on
    CPU (gloo: nothing to overlap, latency per collective to lose) is one unit."""
    return zero_stage == 3 or device_type == "cuda"


def fsdp_reshard_after_forward(zero_stage: int) -> bool:
    """Stage 3 frees gathered parameters after forward and gathers again in
    backward; stage 2 (and replication) keeps them."""
    return zero_stage == 3


FSDP_ACCUMULATE = ("unsharded", "sharded")


def reduce_every_micro_step(engine: str, fsdp_accumulate: str) -> bool:
    """Under gradient accumulation: does the engine reduce gradients on every
    micro-step? DDP and FSDP 'unsharded' skip the reduction until the last
    micro-step (FSDP2 then holds the full unsharded fp32 gradient on every
    rank); FSDP 'sharded' reduce-scatters every micro-step into the sharded
    gradient (1/N of the memory, N x the reduce-scatter traffic)."""
    return engine == "fsdp" and fsdp_accumulate == "sharded"


# ------------------------------------------------------------ communication

def bus_factor(kind: str, n: int) -> float:
    """nccl-tests' bus factor (PERFORMANCE.md of NVIDIA/nccl-tests): bytes
    each rank moves per byte of the collective's buffer, ring algorithms."""
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}.get(kind, 1.0)
