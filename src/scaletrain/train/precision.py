"""Precision negotiation: the ranks of a mixed cluster agree on one training dtype.

Every rank reports the dtypes its device trains in (``debug.supported_dtypes``
overrides that report, to test the negotiation on CPU); they are all-gathered
and the job trains in the first dtype, from training.dtype down the
preference bf16 -> fp16 (with a gradient scaler) -> fp32, that every rank
supports. A different dtype than the one asked for is printed and written to
events.jsonl, never silent (an A100 + V100 job would otherwise either fail in
the V100's first bf16 kernel or train at different precisions per rank).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.config import DTYPE_PREFERENCE, Config, parse_supported_dtypes
from scaletrain.errors import UserError
from scaletrain.observe.events import append_event
from scaletrain.parallel.runtime import Runtime


def device_dtypes(device: torch.device) -> tuple[str, ...]:
    """Training dtypes the device runs natively: bf16 needs compute capability
    8.0+ (Ampere) on NVIDIA; CPU autocast runs bf16 and fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return ("fp16", "fp32")
    return DTYPE_PREFERENCE


def fp16_allowed(cfg: Config) -> bool:
    """The gradient scaler must see whole gradients and the whole loss (config.validate's fp16 rule)."""
    p = cfg.parallel
    return p.zero_stage < 2 and p.tp == 1 and p.pp == 1


def choose_dtype(requested: str, supported: list[tuple[str, ...]], allow_fp16: bool) -> str:
    """The first of ``requested`` and the dtypes below it that every rank supports."""
    for dtype in DTYPE_PREFERENCE[DTYPE_PREFERENCE.index(requested):]:
        if dtype == "fp16" and not allow_fp16:
            continue
        if all(dtype in s for s in supported):
            return dtype
    by_rank = "; ".join(f"rank {r}: {'/'.join(s)}" for r, s in enumerate(supported))
    raise UserError(f"training.dtype = {requested!r}: no dtype at or below it is supported by every rank ({by_rank})")


def negotiate_precision(cfg: Config, runtime: Runtime, run_dir: Path) -> Config:
    """``cfg`` with training.dtype set to what every rank can train in (a collective)."""
    mine = parse_supported_dtypes(cfg.debug.supported_dtypes).get(runtime.rank, device_dtypes(runtime.device))
    supported = [mine]
    if runtime.distributed:
        supported = [()] * runtime.world_size
        dist.all_gather_object(supported, mine)
    requested = cfg.training.dtype
    chosen = choose_dtype(requested, supported, fp16_allowed(cfg))
    if runtime.is_main and (chosen != requested or len(set(supported)) > 1):
        lacking = [r for r, s in enumerate(supported) if requested not in s]
        detail = (f"training.dtype = {requested}: ranks support " + "; ".join(
            f"{r}: {'/'.join(s)}" for r, s in enumerate(supported)) + f" -> training in {chosen}"
            + (" with a gradient scaler" if chosen == "fp16" else "")
            + (f" (rank(s) {lacking} lack {requested})" if lacking else ""))
        append_event(run_dir, "precision", 0, runtime.rank, detail, requested=requested, chosen=chosen,
                     supported=[list(s) for s in supported])
        print(f"precision: {detail}", file=sys.stderr)
    if chosen == requested:
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, dtype=chosen))
