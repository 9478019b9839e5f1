"""The planner's view of a layout: its degrees, the workload, each rank's
coordinates and parameters.

Parameters are counted tensor by tensor from the real parameter table (the
Llama module built on the meta device) through the trainer's own rules
(scaletrain.parallel.rules): pipeline stage placement, the TP plan's split
dimensions, which engine wraps the data-parallel ranks, FSDP2's dim-0
sharding, and ZeroRedundancyOptimizer's greedy partition for ZeRO-1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from scaletrain.config import ModelConfig
from scaletrain.parallel import rules

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
    fsdp_accumulate: str = "unsharded"  # parallel.fsdp_accumulate
    pp_rank_speeds: tuple[float, ...] = ()  # parallel.pp_rank_speeds (empty = equal)
    dp_allreduce: str = "flat"  # parallel.dp_allreduce (a DDP comm hook)
    grad_compression: str = "none"  # parallel.grad_compression (a DDP comm hook)
    rank_batch: tuple[int, ...] = ()  # parallel.rank_batch: rows per data-parallel rank (empty = even)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def engine(self) -> str:
        """none, ddp, zero1 or fsdp: rules.data_parallel_engine, as the trainer decides."""
        return rules.data_parallel_engine(self.dp_replicate, self.dp_shard, self.zero_stage, self.tp, self.pp)

    @property
    def fsdp(self) -> bool:
        return self.engine == "fsdp"

    @property
    def reduce_every_micro_step(self) -> bool:
        return rules.reduce_every_micro_step(self.engine, self.fsdp_accumulate)

    @property
    def dimensions(self) -> int:
        """How many kinds of parallelism it combines (HSDP's two data-parallel levels count twice)."""
        return sum((self.dp > 1, self.tp > 1, self.pp > 1, self.dp_replicate > 1 and self.dp_shard > 1))

    def describe(self) -> str:
        parts = []
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts.append(f"hsdp {self.dp_replicate}x{self.dp_shard}")
        elif self.dp > 1:
            parts.append(f"dp {self.dp}")
        if self.dp > 1:
            parts.append(f"zero{self.zero_stage}")
        if self.fsdp and self.fsdp_accumulate == "sharded":
            parts.append("rs-each-micro")
        if self.tp > 1:
            parts.append(f"tp {self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.pp > 1:
            v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
            parts.append(f"pp {self.pp} {self.pp_schedule}{v} m{self.pp_microbatches}")
        if self.dp_allreduce != "flat":
            parts.append(self.dp_allreduce)
        if self.grad_compression != "none":
            parts.append(self.grad_compression)
        if self.rank_batch:
            parts.append("rows " + ",".join(map(str, self.rank_batch)))
        return " ".join(parts) or "single"

    def config_overrides(self) -> list[str]:
        """``--set`` values that make the trainer run this layout."""
        out = [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
               f"parallel.zero_stage={self.zero_stage}", f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"training.activation_checkpointing={self.activation_checkpointing}",
               f"parallel.fsdp_accumulate={self.fsdp_accumulate}"]
        if self.pp > 1:
            out += [f"parallel.pp_schedule={self.pp_schedule}", f"parallel.pp_virtual_stages={self.virtual_stages}",
                    f"parallel.pp_microbatches={self.pp_microbatches}"]
        if self.pp_rank_speeds:
            out.append("parallel.pp_rank_speeds=" + ",".join(f"{s:g}" for s in self.pp_rank_speeds))
        # The comm hooks and the per-rank split only when the planner picked them.
        if self.dp_allreduce != "flat":
            out.append(f"parallel.dp_allreduce={self.dp_allreduce}")
        if self.grad_compression != "none":
            out.append(f"parallel.grad_compression={self.grad_compression}")
        if self.rank_batch:
            out.append("parallel.rank_batch=" + ",".join(map(str, self.rank_batch)))
        return out


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq_len: int
    global_batch: int
    dtype: str = "bf16"


def layout_from_config(cfg, dp_replicate: int, dp_shard: int) -> Layout:
    """The Layout a resolved trainer config runs (``cfg`` a scaletrain Config)."""
    from scaletrain.config import pipeline_microbatches, pipeline_virtual_stages

    p, t = cfg.parallel, cfg.training
    from scaletrain.config import parse_rank_batch

    speeds = rules.parse_rank_speeds(p.pp_rank_speeds, p.pp) or ()
    split = parse_rank_batch(p.rank_batch)
    return Layout(dp_replicate, dp_shard, p.zero_stage, p.tp, p.pp, p.pp_schedule,
                  pipeline_virtual_stages(p) if p.pp > 1 else 1, pipeline_microbatches(cfg) if p.pp > 1 else 1,
                  t.micro_batch_size, t.activation_checkpointing, p.sequence_parallel, p.cpu_offload,
                  p.fsdp_accumulate, tuple(speeds), p.dp_allreduce, p.grad_compression,
                  tuple(split) if isinstance(split, list) else ())


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


def _stage_ids(layout: Layout, pp_rank: int) -> list[int]:
    return rules.local_stage_ids(pp_rank, layout.pp, layout.virtual_stages, layout.pp_schedule)


def stage_param_names(model: ModelConfig, layout: Layout, pp_rank: int) -> frozenset[str] | None:
    """Parameters on a pipeline rank (None = all of them)."""
    if layout.pp == 1:
        return None
    return _stage_param_names(_key(model), layout.pp, layout.virtual_stages, layout.pp_schedule,
                              layout.pp_rank_speeds, pp_rank)


def stage_ranges(model: ModelConfig, layout: Layout) -> list[range]:
    """The trainer's layer ranges per stage (rules.stage_layer_ranges, speed-aware)."""
    speeds = rules.stage_speeds(layout.pp_rank_speeds or None, layout.pp, layout.virtual_stages, layout.pp_schedule)
    return rules.stage_layer_ranges(model, layout.pp * layout.virtual_stages, speeds)


@functools.lru_cache(maxsize=4096)
def _stage_param_names(values: tuple, pp: int, virtual: int, schedule: str, speeds: tuple,
                       pp_rank: int) -> frozenset[str]:
    model = ModelConfig(*values)
    layout = Layout(pp=pp, virtual_stages=virtual, pp_schedule=schedule, pp_rank_speeds=speeds)
    n_stages = pp * virtual
    ranges = stage_ranges(model, layout)
    return frozenset(name for s in _stage_ids(layout, pp_rank) for name, _ in param_table(model)
                     if rules.stage_owns(name, s, ranges[s], n_stages))


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
                              cpu_offload=False, fsdp_accumulate="unsharded",
                              dp_allreduce="flat", grad_compression="none", rank_batch=())
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
        dim = rules.tp_shard_dim(name) if layout.tp > 1 else None
        if dim is not None:
            shape[dim] = rules.chunk_size(shape[dim], layout.tp, c.tp)
        tp_shape = tuple(shape)
        if layout.fsdp and layout.dp_shard > 1:
            shape[0] = rules.chunk_size(shape[0], layout.dp_shard, c.dp_shard)
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


def fsdp_units(w: "Workload", layout: Layout, c: Coord, device_type: str) -> list[list[tuple[str, tuple]]]:
    """FSDP2 units of a rank's stages (rules.fsdp_unit_per_block): each
    block and the root, or the whole stage as one unit."""
    names = stage_param_names(w.model, layout, c.pp)
    table = [(n, s) for n, s in param_table(w.model) if names is None or n in names]
    if not rules.fsdp_unit_per_block(layout.zero_stage, device_type):
        return [table]
    blocks: dict[str, list] = {}
    root = []
    for name, shape in table:
        if name.startswith("layers."):
            blocks.setdefault(name.split(".")[1], []).append((name, shape))
        else:
            root.append((name, shape))
    return list(blocks.values()) + ([root] if root else [])
