"""The validation loss: the first ``eval.max_batches`` global batches of the
validation rows (in order, complete global batches only), split across the
data-parallel ranks like a training step, forward only. Every rank sums its
tokens' losses and counts them; one all-reduce makes the mean over the whole
set, the same number under every layout (it does not depend on how the rows
are split)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from scaletrain.data import Rows
from scaletrain.parallel.compose import full_value


def eval_rows(val: Rows, global_batch_size: int, max_batches: int, dp_rank: int, dp_size: int) -> list[int]:
    """This rank's share of the evaluated rows."""
    n_batches = val.n_sequences // global_batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    per_rank = global_batch_size // dp_size
    return [b * global_batch_size + dp_rank * per_rank + i for b in range(n_batches) for i in range(per_rank)]


@torch.no_grad()
def validation_loss(trainer) -> dict:
    """-> {"val_loss", "val_ppl", "val_tokens"} (collective over every rank)."""
    cfg, model, device = trainer.cfg, trainer.model, trainer.runtime.device
    rows = eval_rows(trainer.val_rows, cfg.training.global_batch_size, cfg.eval.max_batches, trainer.dp_rank,
                     trainer.dims.dp_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    previous, trainer.loss_divisor = trainer.loss_divisor, 1.0  # the loss function returns sums
    try:
        m = cfg.training.micro_batch_size
        for start in range(0, len(rows), m):
            batch = trainer.make_batch(trainer.val_rows, rows[start:start + m])
            with trainer.loss_context(), trainer.autocast():
                if model.pipeline is not None:
                    losses = model.pipeline.eval(batch)
                    if losses:
                        loss_sum += sum(full_value(l).double() for l in losses)
                else:
                    loss_sum += full_value(trainer.loss_fn(model(batch.inputs, **batch.model_kwargs()),
                                                       batch.targets)).double()
    finally:
        trainer.loss_divisor = previous
        _reshard(model)
    count = torch.tensor(float(trainer.val_rows.target_count(rows)), dtype=torch.float64, device=device)
    totals = torch.stack([loss_sum, count])
    if trainer.runtime.distributed:
        # The last pipeline stage holds the sums; counts come from every pp rank alike.
        if (group := model.group("pp")) is not None:
            totals[0:1] = _sum_over(totals[0:1], group)
        for name in ("dp_replicate", "dp_shard"):
            if (group := model.group(name)) is not None:
                totals = _sum_over(totals, group)
    val_loss = (totals[0] / totals[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": int(totals[1].item())}


def _reshard(model) -> None:
    """FSDP2 reshards a module after its backward; a forward without one
    leaves the unsharded parameters registered (and the optimizer's sharded
    ones unnamed), so put the shards back."""
    for part in model.parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t
