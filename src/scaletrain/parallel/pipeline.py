"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model is cut into ``pp x virtual_stages`` stages of contiguous layers,
balanced by time (rules.stage_layer_ranges: each block costs its parameter
count, the embedding is charged to the first stage and the final norm + head
to the last, each stage's cost divided by its rank's speed when
``parallel.pp_rank_speeds`` gives them). A stage is
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

from scaletrain.parallel.rules import stage_owns

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}


def split_stage(model: nn.Module, stage_id: int, layers: range, n_stages: int) -> nn.Module:
    """A copy of ``model`` holding what stage ``stage_id`` owns
    (rules.stage_owns, the rule the planner counts with)."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers.keys()):
        if not stage_owns(f"layers.{key}.", stage_id, layers, n_stages):
            del stage.layers[key]
    if not stage_owns("embed_tokens.weight", stage_id, layers, n_stages):
        stage.embed_tokens = None
    if not stage_owns("lm_head.weight", stage_id, layers, n_stages):
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
