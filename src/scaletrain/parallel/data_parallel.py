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
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.nn.parallel import DistributedDataParallel

from scaletrain.config import Config
from scaletrain.parallel.comm_hooks import register_comm_hook
from scaletrain.parallel.dims import check_offload
from scaletrain.parallel.rules import FSDP_PARAM_DTYPE, fsdp_reshard_after_forward, fsdp_unit_per_block

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def apply_ddp(model: nn.Module, dp_mesh, cfg: Config, device: torch.device) -> nn.Module:
    """DDP, with the communication hook parallel.dp_allreduce / grad_compression asks for."""
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=dp_mesh.get_group(),
        bucket_cap_mb=cfg.parallel.ddp_bucket_cap_mb,
        gradient_as_bucket_view=True,
        **_no_buffer_sync(),
    )
    ddp.comm_stats = register_comm_hook(ddp, dp_mesh.get_group(), cfg.parallel, device.type)
    return ddp


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
    mp = MixedPrecisionPolicy(param_dtype=_TORCH_DTYPES[FSDP_PARAM_DTYPE[cfg.training.dtype]],
                              reduce_dtype=torch.float32)
    check_offload(cfg, device.type)
    offload = CPUOffloadPolicy() if p.cpu_offload else OffloadPolicy()
    reshard = fsdp_reshard_after_forward(p.zero_stage)
    # Units per block or one for the whole part: rules.fsdp_unit_per_block says why.
    blocks = list(model.layers.values()) if fsdp_unit_per_block(p.zero_stage, device.type) else []
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    # The root's parameters are used last in forward, first in backward:
    # keeping them unsharded after forward saves an all-gather.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    if device.type == "cpu":  # gloo
        for unit in [*blocks, model]:
            unit.set_custom_all_gather(GlooAllGather())
            unit.set_custom_reduce_scatter(GlooReduceScatter())
    return model


class _PlainBuffers:
    """FSDP's communication buffers from the ordinary allocator."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class GlooAllGather(_PlainBuffers, AllGather):
    """FSDP2's all-gather on gloo as one in-place broadcast per rank.

    FSDP copies each rank's shard into its slot of the output buffer first.
    gloo's all_gather_into_tensor gathers into a temporary and copies out;
    broadcasting every slot in place moves the same bytes without that copy:
    measured on 2 ranks, 3.5 ms instead of 6.5 ms for 4 MiB, 9 instead of 16
    for 16 MiB (4 ranks: on par). Synchronous, which is what FSDP does on CPU."""

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False) -> None:
        for src, chunk in enumerate(output_tensor.view(group.size(), -1)):
            dist.broadcast(chunk, group=group, group_src=src)


class GlooReduceScatter(_PlainBuffers, ReduceScatter):
    """FSDP2's reduce-scatter on gloo as an in-place all-reduce of FSDP's own
    staging buffer, keeping this rank's slot.

    gloo has no reduce-scatter of its own: torch's gloo backend all-reduces a
    copy of the input and keeps a slot, so in place is the same algorithm
    without the copy: on 4 ranks 17 ms instead of 23 for 4 MiB, 50 instead of 97 for 16 MiB."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False) -> None:
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])


def build_zero1_optimizer(params, dp_mesh, defaults: dict) -> torch.optim.Optimizer:
    """ZeRO-1: each rank keeps AdamW state for its partition of the
    parameters, steps it, and broadcasts the updated parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # parameters_as_bucket_view: one broadcast per rank's partition, not one per parameter.
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=dp_mesh.get_group(),
                                   parameters_as_bucket_view=True, **defaults)
