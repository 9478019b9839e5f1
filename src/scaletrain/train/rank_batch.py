"""Per-rank batch sizes for mixed clusters (``parallel.rank_batch``).

A faster rank takes more rows of each global batch instead of every rank
waiting for the slowest (Poplar, Whale, Cephalo; PyTorch issue #67253). The
sampler still draws the same global batches in the same order, only the cut
between ranks moves (data.sampler: ``set_rank_rows``), so resuming stays
exact across a change of split; every rank runs the same number of
micro-steps (its rows cut as evenly as possible), so FSDP's per-forward
collectives line up. The loss is the sum over a rank's tokens divided by the
global batch's token count (the trainer's token normalization), which makes
the averaged gradient exactly the mean over the global batch however the
rows are split.

``auto`` times forward + backward of the plain model on one micro batch on
every rank at start-up (before any wrapper, so no collective is timed) and
splits proportionally to the measured rows/s. ``debug.slowdown = RANK:FACTOR``
makes a rank FACTOR x slower by sleeping after each of its micro-steps, to
try this on identical CPUs.
"""

from __future__ import annotations

import socket
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.config import Config, GpuGroup, parse_gpu_groups, parse_rank_batch, parse_slowdown
from scaletrain.errors import UserError
from scaletrain.observe.events import append_event


class Slowdown:
    """Sleep (FACTOR - 1) x the work time after each micro-step of this rank.

    Work time is the training thread's CPU time, not wall time: a wall clock
    would count the wait for slower ranks inside DDP's all-reduce as work and
    sleep it off again."""

    def __init__(self, spec: str, rank: int):
        self.factor = parse_slowdown(spec).get(rank, 1.0)

    @staticmethod
    def start() -> float:
        return time.thread_time()

    def pace(self, started: float) -> None:
        if self.factor > 1:
            time.sleep((self.factor - 1) * (time.thread_time() - started))


def check_rank_batch(cfg: Config, dp_size: int, accum: int) -> None:
    """An explicit list has one entry per data-parallel rank, each >= one row
    per micro-step; [[gpu_groups]] by rank ranges are resolved (host patterns
    can only be matched once the workers know their hosts)."""
    group_split(cfg, None, dp_size, accum)
    split = parse_rank_batch(cfg.parallel.rank_batch)
    if not isinstance(split, list):
        return
    if len(split) != dp_size:
        raise UserError(f"parallel.rank_batch = {cfg.parallel.rank_batch!r} has {len(split)} entries; the "
                        f"data-parallel size is {dp_size}: give one row count per data-parallel rank")
    if min(split) < accum:
        raise UserError(f"parallel.rank_batch = {cfg.parallel.rank_batch!r}: every rank runs {accum} micro-steps "
                        f"(global / (micro x dp)), so each needs >= {accum} rows")


def group_split(cfg: Config, hosts: list[str] | None, world: int, accum: int) -> tuple[list[int], list[int]] | None:
    """[[gpu_groups]] -> (rows, micro-steps) per rank: the first group whose
    rank range or host pattern matches a rank gives it micro_batch x
    accumulation rows; a rank in no group takes training.micro_batch_size x
    the job's accumulation. None without groups, or with host patterns while
    ``hosts`` is not known yet (only the rank ranges are checked then)."""
    groups = parse_gpu_groups(cfg.gpu_groups)
    if not groups:
        return None
    for g in groups:
        if g.ranks is not None and g.ranks[0] >= world:
            raise UserError(f"[[gpu_groups]] {g.name}: ranks {g.ranks[0]}-{g.ranks[1]} match no rank of this job "
                            f"(ranks 0-{world - 1})")
    if hosts is None and any(g.ranks is None for g in groups):
        return None

    def matches(g: GpuGroup, rank: int) -> bool:
        return g.ranks[0] <= rank <= g.ranks[1] if g.ranks is not None else fnmatch(hosts[rank], g.hosts)

    chosen = [next((g for g in groups if matches(g, r)), None) for r in range(world)]
    for g in groups:
        if g not in chosen:
            known = f"; hosts: {', '.join(sorted(set(hosts)))}" if hosts else ""
            raise UserError(f"[[gpu_groups]] {g.name}: {f'hosts = {g.hosts!r}' if g.ranks is None else 'its ranks'} "
                            f"match no rank of this job (ranks 0-{world - 1}{known}; the first matching group wins)")
    rows = [g.micro_batch * g.accumulation if g else cfg.training.micro_batch_size * accum for g in chosen]
    micro = [g.accumulation if g else accum for g in chosen]
    if sum(rows) != cfg.training.global_batch_size:
        raise UserError(f"[[gpu_groups]] give the ranks {rows} rows per step (micro_batch x accumulation; a rank in "
                        f"no group: training.micro_batch_size x {accum}), {sum(rows)} in all; "
                        f"training.global_batch_size is {cfg.training.global_batch_size}")
    if cfg.parallel.zero_stage >= 2 and len(set(micro)) > 1:
        raise UserError(f"[[gpu_groups]] give the ranks {micro} micro-steps; zero_stage {cfg.parallel.zero_stage} "
                        "(FSDP) needs the same number on every rank")
    return rows, micro


def split_proportional(total: int, speeds: list[float], minimum: int) -> list[int]:
    """``total`` rows in proportion to ``speeds``, at least ``minimum`` each,
    rounded by largest remainder (Hamilton's method), so the sum is exact."""
    n = len(speeds)
    spare = total - minimum * n
    if spare < 0:
        raise UserError(f"training.global_batch_size = {total} is below {minimum} rows x {n} ranks")
    quota = [spare * s / sum(speeds) for s in speeds]
    shares = [int(q) for q in quota]
    by_remainder = sorted(range(n), key=lambda i: quota[i] - shares[i], reverse=True)
    for i in by_remainder[:spare - sum(shares)]:
        shares[i] += 1
    return [minimum + s for s in shares]


def probe_rows_per_s(forward_backward, rows: int, device: torch.device, model: torch.nn.Module,
                     slowdown: Slowdown, repeats: int = 3) -> float:
    """Rows/s of ``forward_backward()`` on ``rows`` rows (median of ``repeats``
    after one warm-up), then the model's gradients are dropped."""
    times = []
    for i in range(repeats + 1):
        start, work = time.perf_counter(), slowdown.start()
        forward_backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        slowdown.pace(work)
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return rows / sorted(times)[len(times) // 2]


def resolve_rank_rows(cfg: Config, rank: int, world: int, accum: int, probe,
                      run_dir: Path) -> tuple[list[int], list[int] | None] | None:
    """(rows of the global batch, micro-steps) per data-parallel rank (tp = pp
    = 1: the world; micro-steps None = the job's accumulation on every rank),
    or None for the even split. ``probe()`` -> this rank's rows/s (auto only)."""
    if cfg.gpu_groups:
        hosts = [socket.gethostname()]
        if world > 1:
            hosts = [""] * world
            dist.all_gather_object(hosts, socket.gethostname())
        rows, micro = group_split(cfg, hosts, world, accum)
        if rank == 0:
            append_event(run_dir, "rank_batch", 0, rank, f"[[gpu_groups]]: rows per rank {rows}, micro-steps {micro}",
                         rank_rows=rows, micro_steps=micro)
        return rows, micro
    split = parse_rank_batch(cfg.parallel.rank_batch)
    if split is None:
        return None
    check_rank_batch(cfg, world, accum)
    if split == "auto":
        mine = probe()
        speeds = [mine]
        if world > 1:
            speeds = [0.0] * world
            dist.all_gather_object(speeds, mine)
        split = split_proportional(cfg.training.global_batch_size, speeds, accum)
        if rank == 0:
            detail = ("parallel.rank_batch = auto: measured rows/s " + ", ".join(f"{s:.1f}" for s in speeds)
                      + f" -> rows per rank {split}")
            append_event(run_dir, "rank_batch", 0, rank, detail, rows_per_s=speeds, rank_rows=split)
            print(detail, file=sys.stderr)
    return split, None


def model_rows_per_s(trainer, model: torch.nn.Module) -> float:
    """This rank's rows/s through the plain (not yet wrapped) ``model``:
    forward + backward of one micro batch, in the training dtype."""
    import numpy as np

    from scaletrain.model import cross_entropy_loss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.cfg.training.dtype)
    batch = trainer.make_batch(trainer.rows, np.arange(trainer.cfg.training.micro_batch_size))
    with torch.autocast(batch.inputs.device.type, dtype=dtype, enabled=dtype is not None):
        return probe_rows_per_s(lambda: cross_entropy_loss(model(batch.inputs, **batch.model_kwargs()),
                                                           batch.targets).backward(),
                                len(batch.inputs), batch.inputs.device, model, trainer.slowdown)


def trainer_rank_rows(trainer, model: torch.nn.Module) -> tuple[list[int], list[int] | None] | None:
    """(rows, micro-steps) per data-parallel rank for ``trainer`` (before its model is
    wrapped: ``auto`` times the plain ``model`` on one micro batch)."""
    runtime = trainer.runtime
    return resolve_rank_rows(trainer.cfg, runtime.rank, runtime.world_size, trainer.accum,
                             lambda: model_rows_per_s(trainer, model), trainer.run_dir)


def measured_pp_speeds(trainer, model: torch.nn.Module) -> Config:
    """``parallel.pp_rank_speeds = auto``: every rank times the whole model
    (model_rows_per_s, the probe ``rank_batch = auto`` uses); a pipeline
    rank's speed is its slowest replica's (a stage waits for it), and the
    config then carries the measured speeds, so the one stage rule
    (parallel.rules.stage_layer_ranges) splits the layers."""
    cfg, runtime = trainer.cfg, trainer.runtime
    if cfg.parallel.pp_rank_speeds.strip() != "auto":
        return cfg
    import dataclasses

    measured = [(0, 0.0)] * runtime.world_size  # (pipeline rank, rows/s) of every rank
    dist.all_gather_object(measured, (trainer.mesh["pp"].get_local_rank(), model_rows_per_s(trainer, model)))
    per_stage = [min(s for r, s in measured if r == k) for k in range(trainer.dims.pp)]
    spec = ",".join(f"{s / max(per_stage):.4g}" for s in per_stage)
    if runtime.is_main:
        detail = (f"parallel.pp_rank_speeds = auto: measured rows/s per pipeline rank "
                  f"{', '.join(f'{s:.1f}' for s in per_stage)} -> pp_rank_speeds = {spec}")
        append_event(trainer.run_dir, "pp_rank_speeds", 0, runtime.rank, detail, rows_per_s=per_stage, speeds=spec)
        print(detail, file=sys.stderr)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp_rank_speeds=spec))
