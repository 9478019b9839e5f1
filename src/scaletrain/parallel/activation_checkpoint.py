"""Activation checkpointing of transformer blocks: recompute in backward
instead of storing (Chen et al. 2016)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Selective: keep the outputs of the matmuls and attention (expensive to
# recompute), recompute the pointwise ops and norms (cheap, memory-heavy), as
# in Korthikanti et al. 2022, sec. 5.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _every_other_matmul_context():
    """selective_half: as selective, but only every other matmul's output is
    kept (q, v, gate, down of a block; k, o, up are recomputed), torchtitan's
    op-level policy (torchtitan/models/llama3/infra/parallelize.py, ``mm_count
    % 2``). A fresh count per block pass, and the recompute pass counts apart
    so it makes the same choices as the forward."""
    counts: dict[bool, int] = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op == torch.ops.aten.mm.default:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == 1
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        return _selective_policy(ctx, op, *args, **kwargs)

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(layers: nn.ModuleDict, mode: str) -> None:
    """Wrap every block in ``layers`` in place. The wrapper's state-dict hooks
    keep parameter names in checkpoints unchanged."""
    if mode == "none":
        return
    kwargs = {"preserve_rng_state": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    if mode == "selective_half":
        kwargs["context_fn"] = _every_other_matmul_context
    for key, block in list(layers.items()):
        layers[key] = checkpoint_wrapper(block, **kwargs)
