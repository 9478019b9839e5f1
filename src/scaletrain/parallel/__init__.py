"""Parallelism applied to a plain model from outside: ``parallelize`` is the one entry.

Order (torchtitan's): tensor parallel -> activation checkpointing -> compile ->
data parallel (DDP / FSDP)."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaletrain.config import Config
from scaletrain.parallel.activation_checkpoint import apply_activation_checkpointing
from scaletrain.parallel.dims import ParallelDims

__all__ = ["ParallelDims", "parallelize", "unwrap"]


def parallelize(model: nn.Module, dims: ParallelDims, mesh, cfg: Config, device: torch.device) -> nn.Module:
    apply_activation_checkpointing(model.layers, cfg.training.activation_checkpointing)
    if cfg.training.compile:
        for key, block in list(model.layers.items()):
            model.layers[key] = torch.compile(block)
    if dims.dp_replicate > 1:
        group = mesh["dp_replicate"].get_group()
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group,
            bucket_cap_mb=cfg.parallel.ddp_bucket_cap_mb,
            **_no_buffer_sync(),
            gradient_as_bucket_view=True,
        )
    return model


def _no_buffer_sync() -> dict:
    """The RoPE tables are derived from the config, identical on every rank:
    no need to re-broadcast them before every forward."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}  # torch < 2.13


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside any data-parallel wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
