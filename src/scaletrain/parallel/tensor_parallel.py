"""Megatron-style tensor parallelism (Shoeybi et al. 2019) with DTensor's
``parallelize_module``, and sequence parallelism (Korthikanti et al. 2022).

Per block: q/k/v and gate/up are split column-wise (each rank owns whole
heads / a slice of the FFN), o and down row-wise, so each block does one
all-reduce in forward and one in backward per sub-layer. The embedding is
split along the vocabulary (row-wise) and the head column-wise with its logits
left vocab-sharded: the loss is computed under ``loss_parallel`` without ever
gathering the full logits.

With sequence parallelism the norms and the residual stream are sharded along
the sequence; the all-reduces become reduce-scatter + all-gather pairs.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from scaletrain.parallel.rules import TP_BLOCK_PLAN, TP_TOP_PLAN

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    residual = Shard(1) if sequence_parallel else Replicate()
    # The styles come from rules.TP_*_PLAN (what the planner counts); the
    # layouts around them here: the head's logits stay vocab-sharded for loss_parallel.
    layouts = {"embed_tokens": {"input_layouts": Replicate(), "output_layouts": residual},
               "lm_head": {"input_layouts": residual, "output_layouts": Shard(-1), "use_local_output": False}}
    top = {name: _STYLES[style](**layouts[name]) for name, style in TP_TOP_PLAN.items()
           if getattr(model, name) is not None}
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan = {
            # (x, rope_cos, rope_sin): only x is distributed.
            "self_attn": PrepareModuleInput(input_layouts=(residual, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            # Row-wise layers end a sub-layer: their output returns to the residual layout.
            **{name: ColwiseParallel() if style == "colwise" else RowwiseParallel(output_layouts=residual)
               for name, style in TP_BLOCK_PLAN.items()},
        }
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
