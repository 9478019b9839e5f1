"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model is cut into ``pp x virtual_stages`` stages of contiguous layers,
balanced by cost (each block costs its parameter count; the embedding is
charged to the first stage and the final norm + head to the last). A stage is
the same Llama module with the other layers removed and, away from the ends,
no embedding or head, so parameter names stay those of the whole model.

Placement: stage s runs on pipeline rank s % pp (looped: GPipe, 1F1B,
interleaved 1F1B, interleaved zero bubble), or in a V for ZB-V (rank r holds
stages r and 2pp-1-r). Bubble fractions: (p-1)/(m+p-1) for GPipe/1F1B,
(p-1)/(v·m) for interleaved 1F1B (Narayanan et al. 2021); ZB schedules fill
the bubble with weight-gradient work (Qi et al. 2024).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

from scaletrain.config import ModelConfig

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}


def stage_layer_ranges(cfg: ModelConfig, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, minimizing the most expensive
    stage (dynamic programming over cut points); every stage gets >= 1 layer."""
    head_dim = cfg.dim // cfg.n_heads
    block = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim
    embed, head = cfg.vocab_size * cfg.dim, cfg.vocab_size * cfg.dim
    L = cfg.n_layers

    def cost(stage: int, first: int, end: int) -> int:
        return (end - first) * block + (embed if stage == 0 else 0) + (head if stage == n_stages - 1 else 0)

    # best[s][i]: minimal max-cost of placing layers [0, i) on stages [0, s).
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, L - (n_stages - s) + 1):
            for j in range(s - 1, i):
                candidate = max(best[s - 1][j], cost(s - 1, j, i))
                if candidate < best[s][i]:
                    best[s][i], cut[s][i] = candidate, j
    ranges, end = [], L
    for s in range(n_stages, 0, -1):
        ranges.append(range(cut[s][end], end))
        end = cut[s][end]
    return ranges[::-1]


def local_stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def split_stage(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of ``model`` holding only ``layers`` (and the ends it owns)."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers.keys()):
        if int(key) not in layers:
            del stage.layers[key]
    if not first:
        stage.embed_tokens = None
    if not last:
        stage.norm, stage.lm_head = None, None
    return stage


@dataclass
class Pipeline:
    stages: list[PipelineStage]
    schedule: object
    has_first: bool
    has_last: bool
    n_microbatches: int

    def step(self, batch) -> list[torch.Tensor]:
        """One pipeline pass (forward + backward) over ``n_microbatches`` of a
        data.rows.Batch; returns the per-microbatch losses on the rank holding
        the last stage (their sum is this pass's share of the step's loss)."""
        return self._run(self.schedule.step, batch)

    def eval(self, batch) -> list[torch.Tensor]:
        """The same pass, forward only (the validation loss)."""
        return self._run(self.schedule.eval, batch)

    def _run(self, run, batch) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        # Document positions and masks go to every stage as keyword arguments.
        kwargs = batch.model_kwargs()
        if self.has_last:
            kwargs.update(target=batch.targets, losses=losses)
        if self.has_first:
            run(batch.inputs, **kwargs)
        else:
            run(**kwargs)
        return losses


def build_pipeline(stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int, schedule: str,
                   n_microbatches: int, loss_fn, pp_group, device: torch.device) -> Pipeline:
    """``loss_fn`` must already divide by ``n_microbatches`` (and by any
    accumulation count): the schedule's own ``scale_grads`` would rescale the
    gradients accumulated by earlier steps too."""
    stages = [PipelineStage(module, stage_id, n_stages, device, group=pp_group)
              for module, stage_id in zip(stage_modules, stage_ids)]
    cls = SCHEDULES[schedule]
    if schedule in ("gpipe", "1f1b"):
        sched = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        sched = cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(stages, sched, 0 in stage_ids, n_stages - 1 in stage_ids, n_microbatches)
