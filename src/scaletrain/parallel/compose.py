"""Parallelism applied to a plain model from outside; ``parallelize`` is the one entry.

Order (torchtitan's): pipeline split -> tensor parallel -> activation
checkpointing -> compile -> data parallel (DDP / ZeRO / FSDP / HSDP), each
part on its named slice of the one DeviceMesh (pp, dp_replicate, dp_shard, tp).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from scaletrain.config import Config, pipeline_microbatches, pipeline_virtual_stages
from scaletrain.parallel.activation_checkpoint import apply_activation_checkpointing
from scaletrain.parallel.data_parallel import apply_ddp, apply_fsdp, build_zero1_optimizer
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.pipeline import Pipeline, build_pipeline, split_stage
from scaletrain.parallel.rules import (data_parallel_engine, local_stage_ids, parse_rank_speeds,
                                      reduce_every_micro_step, stage_layer_ranges, stage_speeds)
from scaletrain.parallel.tensor_parallel import apply_tensor_parallel

# Name components that wrappers add to parameter names (DDP, checkpoint_wrapper, torch.compile).
_WRAPPER_NAMES = {"module", "_checkpoint_wrapped_module", "_orig_mod"}


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a vocab-sharded loss under TP), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def canonical_name(name: str) -> str:
    """A parameter's name in the plain single model, without wrapper components."""
    return ".".join(piece for piece in name.split(".") if piece not in _WRAPPER_NAMES)


@dataclass
class ParallelModel:
    """What this rank trains: one part, or its pipeline stages."""

    parts: list[nn.Module]
    pipeline: Pipeline | None
    dims: ParallelDims
    mesh: object
    reduce_every_micro_step: bool = False  # parallel.fsdp_accumulate = sharded (rules.reduce_every_micro_step)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """kwargs: the document positions and ids of packed rows (Llama.forward)."""
        assert self.pipeline is None, "a pipelined model runs through its schedule"
        return self.parts[0](tokens, **kwargs)

    def parameters(self):
        return chain.from_iterable(part.parameters() for part in self.parts)

    def gradient_sync(self, enabled: bool):
        """Skip the gradient reduction on accumulation micro-steps but the
        last, unless FSDP reduce-scatters every micro-step (fsdp_accumulate =
        sharded). Under a pipeline the schedule reduces at the end of every
        pass itself (PipelineStage.perform_reduce_grad)."""
        part = self.parts[0]
        if isinstance(part, DistributedDataParallel) and not enabled:
            return part.no_sync()
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled or self.reduce_every_micro_step)
        return contextlib.nullcontext()

    def comm_metrics(self) -> dict:
        """Gradient bytes sent since the last call, where a DDP comm hook counts them (comm_hooks.CommStats)."""
        stats = getattr(self.parts[0], "comm_stats", None)
        return stats.take() if stats is not None else {}

    def group(self, name: str):
        """The process group of one mesh dimension, or None if it has one rank."""
        if self.mesh is None or getattr(self.dims, name) == 1:
            return None
        return self.mesh[name].get_group()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 parameters by their single-model names, on pipeline rank 0
        of each (dp, tp) coordinate (global rank 0 among them); a collective."""
        state = {}
        for part in self.parts:
            for name, param in part.named_parameters():
                name = canonical_name(name)
                full = param.full_tensor() if isinstance(param, DTensor) else param
                state[name] = full.detach().float().cpu().contiguous()
        pp_group = self.group("pp")
        if pp_group is not None:
            pieces = [None] * self.dims.pp if self.mesh["pp"].get_local_rank() == 0 else None
            dist.gather_object(state, pieces, dst=dist.get_global_rank(pp_group, 0), group=pp_group)
            if pieces is not None:
                state = {k: v for piece in pieces for k, v in piece.items()}
        return state


def parallelize(model: nn.Module, dims: ParallelDims, mesh, cfg: Config, device: torch.device,
                loss_fn) -> ParallelModel:
    p = cfg.parallel
    stage_ids: list[int] = [0]
    parts = [model]
    if dims.pp > 1:
        virtual = pipeline_virtual_stages(p)
        n_stages = dims.pp * virtual
        speeds = stage_speeds(parse_rank_speeds(p.pp_rank_speeds, dims.pp), dims.pp, virtual, p.pp_schedule)
        ranges = stage_layer_ranges(cfg.model, n_stages, speeds)
        stage_ids = local_stage_ids(mesh["pp"].get_local_rank(), dims.pp, virtual, p.pp_schedule)
        parts = [split_stage(model, i, ranges[i], n_stages) for i in stage_ids]
    parts = [_parallelize_part(part, dims, mesh, cfg, device) for part in parts]
    pipeline = None
    if dims.pp > 1:
        pipeline = build_pipeline(parts, stage_ids, n_stages, p.pp_schedule, pipeline_microbatches(cfg),
                                  loss_fn, mesh["pp"].get_group(), device)
    engine = data_parallel_engine(dims.dp_replicate, dims.dp_shard, p.zero_stage, dims.tp, dims.pp)
    return ParallelModel(parts, pipeline, dims, mesh, reduce_every_micro_step(engine, p.fsdp_accumulate))


def _parallelize_part(part: nn.Module, dims: ParallelDims, mesh, cfg: Config, device: torch.device) -> nn.Module:
    if dims.tp > 1:
        apply_tensor_parallel(part, mesh["tp"], cfg.parallel.sequence_parallel)
    apply_activation_checkpointing(part.layers, cfg.training.activation_checkpointing)
    if cfg.training.compile:
        for key, block in list(part.layers.items()):
            part.layers[key] = torch.compile(block)
    engine = data_parallel_engine(dims.dp_replicate, dims.dp_shard, cfg.parallel.zero_stage, dims.tp, dims.pp)
    if engine == "none":
        return part
    if engine == "ddp":
        return apply_ddp(part, mesh["dp_replicate"], cfg, device)
    if engine == "zero1":
        return apply_ddp(part, mesh["dp_shard"], cfg, device)
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    return apply_fsdp(part, dp_mesh, cfg, device)


def build_optimizer(model: ParallelModel, cfg: Config) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): matrices decayed, norm weights not.
    ZeRO-1 wraps it in ZeroRedundancyOptimizer over the dp_shard ranks."""
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is the fastest on CPU and GPU, DTensor parameters included.
    defaults = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": 1e-8,
                "fused": True}
    if cfg.parallel.zero_stage == 1 and model.dims.dp_shard > 1:
        return build_zero1_optimizer(groups, model.mesh["dp_shard"], defaults)
    return torch.optim.AdamW(groups, **defaults)


@torch.no_grad()
def clip_grad_norm(model: ParallelModel, max_norm: float) -> torch.Tensor:
    """Global gradient 2-norm over all shards and stages, then clip to ``max_norm``.

    Each rank sums the squares of its local gradient pieces, grouped by the
    mesh dimensions they are sharded over; each group is then summed with one
    all-reduce of a scalar per sharded dimension (replicated dimensions hold
    copies and are not summed), and pipeline stages add theirs. Working on the
    local tensors keeps DTensor dispatch out of this per-step path; gradients
    with a Partial placement (none in the layouts built here) take DTensor's
    own reduction."""
    plain, partial, by_dims, local = [], [], defaultdict(list), []
    for param in model.parameters():
        g = param.grad
        if g is None:
            continue
        piece = g.to_local() if isinstance(g, DTensor) else g
        local.append(piece)
        if piece is g:
            plain.append(g)
        elif any(p.is_partial() for p in g.placements):
            partial.append(g)
        else:  # Shard and FSDP x TP's _StridedShard: disjoint pieces to sum over
            dims = tuple(d for d, p in enumerate(g.placements) if not p.is_replicate())
            by_dims[(g.device_mesh, dims)].append(piece)
    device = next(model.parameters()).device
    total_sq = torch.zeros((), device=device)
    if partial:
        total_sq += torch.nn.utils.get_total_norm(partial, 2.0).full_tensor().float() ** 2
    for (mesh, dims), grads in [((None, ()), plain), *by_dims.items()]:
        if not grads:
            continue
        sq = torch.nn.utils.get_total_norm(grads, 2.0).float() ** 2
        for dim in dims:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq += sq
    if (pp_group := model.group("pp")) is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total
