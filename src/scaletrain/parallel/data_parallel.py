"""Data parallelism and the ZeRO family (Rajbhandari et al. 2020).

| zero_stage | engine | per rank |
|---|---|---|
| 0 | DDP (all-reduce) | full params, grads, optimizer states |
| 1 | DDP + ZeroRedundancyOptimizer | optimizer states / dp_shard |
| 2 | FSDP2, reshard_after_forward=False | + gradients / dp_shard (reduce-scatter) |
| 3 | FSDP2, reshard_after_forward=True | + parameters / dp_shard |

HSDP is stage 2/3 on the 2-D (dp_replicate, dp_shard) mesh: sharded within a
group, replicated (all-reduced) across groups. With tensor or pipeline
parallelism, stage 0 is FSDP2 on (dp_replicate, dp_shard = 1): pure
replication that, unlike DDP, takes the DTensor parameters TP creates and the
several backward passes per step a pipeline schedule runs.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from scaletrain.config import Config
from scaletrain.errors import UserError

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def apply_ddp(model: nn.Module, dp_mesh, cfg: Config, device: torch.device) -> nn.Module:
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=dp_mesh.get_group(),
        bucket_cap_mb=cfg.parallel.ddp_bucket_cap_mb,
        gradient_as_bucket_view=True,
        **_no_buffer_sync(),
    )


def _no_buffer_sync() -> dict:
    """The RoPE tables are derived from the config, identical on every rank:
    no need to re-broadcast them before every forward."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}  # torch < 2.13


def apply_fsdp(model: nn.Module, dp_mesh, cfg: Config, device: torch.device) -> nn.Module:
    """fully_shard each transformer block, then the root (embedding, norm, head).

    Mixed precision: parameters are cast to the compute dtype for forward and
    backward; gradients are reduced in fp32 and the sharded master weights
    and optimizer states stay fp32."""
    p = cfg.parallel
    mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[cfg.training.dtype], reduce_dtype=torch.float32)
    check_offload(cfg, device.type)
    offload = CPUOffloadPolicy() if p.cpu_offload else OffloadPolicy()
    reshard = p.zero_stage == 3
    # Stage 2 keeps parameters whole from forward to backward anyway, so on
    # CPU (gloo: no compute/communication overlap to win, latency per
    # collective to lose) the whole model is one unit: one all-gather and one
    # reduce-scatter per step. On CUDA, and always for stage 3, each block is
    # its own unit so communication overlaps compute and stage 3 holds one
    # block's full parameters at a time.
    per_block = reshard or device.type == "cuda"
    for block in model.layers.values() if per_block else ():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    # The root's parameters are used last in forward, first in backward:
    # keeping them unsharded after forward saves an all-gather.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    return model


def check_offload(cfg: Config, device_type: str) -> None:
    if cfg.parallel.cpu_offload and device_type != "cuda":
        raise UserError("parallel.cpu_offload = true needs CUDA devices: FSDP2's CPUOffloadPolicy moves "
                        "parameters and optimizer states between CPU and GPU, and this run is on CPU")


def build_zero1_optimizer(params, dp_mesh, defaults: dict) -> torch.optim.Optimizer:
    """ZeRO-1: each rank keeps AdamW state for its partition of the
    parameters, steps it, and broadcasts the updated parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # parameters_as_bucket_view: one broadcast per rank's partition, not one per parameter.
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=dp_mesh.get_group(),
                                   parameters_as_bucket_view=True, **defaults)
