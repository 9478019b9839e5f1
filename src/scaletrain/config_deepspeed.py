"""``scaletrain config import-deepspeed``: a DeepSpeed JSON config as a
scaletrain config.

Each DeepSpeed setting becomes ``section.key=value`` overrides on a base
config (``--config``, default the embedded one), so the result goes through
the same validation as any other config. A setting with no scaletrain
equivalent is named in one warning on stderr, with what scaletrain does
instead; nothing is dropped silently. DeepSpeed's keys and defaults are from
its config documentation (deepspeed.ai/docs/config-json).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Callable

from scaletrain.config import Config, load_config
from scaletrain.errors import UserError

Overrides = dict[str, Any]
Warn = Callable[[str], None]

# Keys with no effect on what is trained: logging, profiling and monitoring sinks.
_IGNORED_TOP = {"wall_clock_breakdown", "dump_state", "memory_breakdown", "tensorboard", "wandb", "csv_monitor",
                "comet", "flops_profiler", "comms_logger", "elasticity", "autotuning", "sparse_attention",
                "data_efficiency", "curriculum_learning", "compression_training", "checkpoint", "aio",
                "nebula", "amp", "data_types", "communication_data_type", "prescale_gradients",
                "gradient_predivide_factor", "sparse_gradients", "zero_allow_untested_optimizer",
                "zero_force_ds_cpu_optimizer", "pipeline", "seq_parallel_communication_data_type"}


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _without_auto(where: str, params: dict, warn: Warn) -> dict:
    """HF Trainer's DeepSpeed configs say "auto" where it fills values in at run time; those stay as they are."""
    for key in sorted(k for k, v in params.items() if _is_auto(v)):
        warn(f"{where}.{key} = \"auto\" (filled in by HF Trainer at run time) is not carried over")
    return {k: v for k, v in params.items() if not _is_auto(v)}


def _batch(ds: dict, world_size: int | None, out: Overrides, warn: Warn) -> None:
    """DeepSpeed: train_batch_size = micro x accumulation x data-parallel ranks."""
    micro, accum, total = (ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                               "train_batch_size"))
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", total)):
        if _is_auto(value):
            warn(f"{key} = \"auto\" (filled in by HF Trainer at run time) is not carried over")
    micro, accum, total = (None if _is_auto(v) else v for v in (micro, accum, total))
    if micro is not None:
        out["training.micro_batch_size"] = micro
    if total is not None:
        out["training.global_batch_size"] = total
    elif micro is not None and accum is not None:
        if world_size is None:
            raise UserError("the DeepSpeed config gives train_micro_batch_size_per_gpu and "
                            "gradient_accumulation_steps but no train_batch_size: pass --world-size N (the number "
                            "of data-parallel ranks) so the global batch can be computed")
        out["training.global_batch_size"] = micro * accum * world_size


def _zero(ds: dict, out: Overrides, warn: Warn) -> None:
    zero = dict(ds.get("zero_optimization") or {})
    stage = zero.pop("stage", 0)
    out["parallel.zero_stage"] = stage
    offloaded = []
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.pop(key, None) or {}).get("device", "none")
        if device == "cpu":
            offloaded.append(key)
        elif device != "none":
            warn(f"zero_optimization.{key}.device = {device!r} is not carried over: scaletrain offloads to CPU "
                 "memory only (parallel.cpu_offload, ZeRO-3)")
    if offloaded and stage == 3:
        out["parallel.cpu_offload"] = True
    elif offloaded:
        warn(f"zero_optimization.{offloaded[0]} to cpu with stage {stage} is not carried over: scaletrain "
             "offloads with ZeRO-3 only (FSDP2's CPUOffloadPolicy); use zero_stage = 3 with cpu_offload = true")
    if "reduce_bucket_size" in zero and stage == 0:
        out["parallel.ddp_bucket_cap_mb"] = zero.pop("reduce_bucket_size") / 2**20
    for key in sorted(zero):
        warn(f"zero_optimization.{key} is not carried over: FSDP2 schedules its own all-gathers and "
             "reduce-scatters (bucketing, prefetch and overlap are per layer)")


def _precision(ds: dict, out: Overrides, warn: Warn) -> None:
    bf16, fp16 = dict(ds.get("bf16") or ds.get("bfloat16") or {}), dict(ds.get("fp16") or {})
    for name, section in (("bf16", bf16), ("fp16", fp16)):
        if _is_auto(section.get("enabled")):
            warn(f"{name}.enabled = \"auto\" (filled in by HF Trainer at run time) is not carried over")
            section["enabled"] = False
    if bf16.get("enabled") and fp16.get("enabled"):
        raise UserError("the DeepSpeed config enables both bf16 and fp16; DeepSpeed refuses that too")
    if bf16.get("enabled"):
        out["training.dtype"] = "bf16"
    if fp16.pop("enabled", False):
        out["training.dtype"] = "fp16"
        if fp16.get("loss_scale", 0) != 0:
            warn(f"fp16.loss_scale = {fp16['loss_scale']} (a static scale) is not carried over: scaletrain "
                 "scales dynamically with torch.amp.GradScaler")
        fp16.pop("loss_scale", None)
        for key in sorted(fp16):
            warn(f"fp16.{key} = {fp16[key]!r} is not carried over: torch.amp.GradScaler's dynamic scaling "
                 "starts at 2^16 and doubles after 2000 overflow-free steps")


def _optimizer(ds: dict, out: Overrides, warn: Warn) -> None:
    optimizer = ds.get("optimizer")
    if not optimizer:
        return
    kind, params = str(optimizer.get("type", "")), dict(optimizer.get("params") or {})
    if kind.lower() not in ("adam", "adamw", "fusedadam", "cpuadam"):
        warn(f"optimizer.type = {kind!r} is not carried over: scaletrain trains with AdamW")
        return
    if kind.lower() == "adam" and params.pop("adam_w_mode", True) is False:
        warn("optimizer.params.adam_w_mode = false (L2-regularized Adam) is not carried over: scaletrain "
             "uses AdamW's decoupled weight decay")
    for key, target in (("lr", "training.lr"), ("weight_decay", "training.weight_decay")):
        if key in params:
            value = params.pop(key)
            if _is_auto(value):
                warn(f"optimizer.params.{key} = \"auto\" is not carried over")
            else:
                out[target] = value
    if "betas" in params and not _is_auto(params["betas"]):
        out["training.beta1"], out["training.beta2"] = params.pop("betas")
    if params.get("eps", 1e-8) == 1e-8:
        params.pop("eps", None)
    for key in sorted(params):
        warn(f"optimizer.params.{key} = {params[key]!r} is not carried over (scaletrain: AdamW with eps 1e-8)")


def _scheduler(ds: dict, out: Overrides, warn: Warn, base_lr: float) -> None:
    """scaletrain: linear warmup to training.lr, cosine decay to training.min_lr."""
    scheduler = ds.get("scheduler")
    if not scheduler:
        return
    kind, params = scheduler.get("type"), _without_auto("scheduler.params", scheduler.get("params") or {}, warn)
    if "warmup_num_steps" in params:
        out["training.warmup_steps"] = params["warmup_num_steps"]
    if kind == "WarmupLR":
        if "warmup_max_lr" in params:
            out["training.lr"] = params["warmup_max_lr"]
        out["training.min_lr"] = out.get("training.lr", base_lr)  # constant after warmup
    elif kind == "WarmupCosineLR":
        out["training.steps"] = params.get("total_num_steps", out.get("training.steps"))
        out["training.min_lr"] = out.get("training.lr", base_lr) * params.get("cos_min_ratio", 0.0001)
    elif kind == "WarmupDecayLR":
        out["training.steps"] = params.get("total_num_steps", out.get("training.steps"))
        if "warmup_max_lr" in params:
            out["training.lr"] = params["warmup_max_lr"]
        out["training.min_lr"] = 0.0
        warn("scheduler WarmupDecayLR decays linearly to 0; scaletrain decays with a cosine to training.min_lr "
             "= 0 over the same steps")
    else:
        warn(f"scheduler.type = {kind!r} is not carried over: scaletrain uses linear warmup then cosine decay")
    if out.get("training.steps") is None:
        out.pop("training.steps", None)
    for key in ("warmup_min_lr", "warmup_min_ratio", "warmup_type"):
        if key in params and params[key] not in (0, 0.0, "linear"):
            warn(f"scheduler.params.{key} = {params[key]!r} is not carried over: scaletrain warms up linearly "
                 "from 0")


def _rest(ds: dict, out: Overrides, warn: Warn) -> None:
    for key, target in (("gradient_clipping", "training.grad_clip"), ("steps_per_print", "logging.interval")):
        if key in ds and _is_auto(ds[key]):
            warn(f"{key} = \"auto\" (filled in by HF Trainer at run time) is not carried over")
        elif key in ds:
            out[target] = ds[key]
    if tp := (ds.get("tensor_parallel") or {}).get("autotp_size"):
        out["parallel.tp"] = tp
    if ds.get("activation_checkpointing"):
        out["training.activation_checkpointing"] = "full"
        warn("activation_checkpointing's options (partition_activations, cpu_checkpointing, ...) are not "
             "carried over: scaletrain recomputes every block (training.activation_checkpointing = full)")
    handled = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "zero_optimization", "bf16", "bfloat16", "fp16", "optimizer", "scheduler", "gradient_clipping",
               "steps_per_print", "tensor_parallel", "activation_checkpointing"}
    for key in sorted(set(ds) - handled):
        if key in _IGNORED_TOP:
            warn(f"{key} is not carried over: no scaletrain equivalent (see `scaletrain config keys`)")
        else:
            close = difflib.get_close_matches(key, sorted(handled | _IGNORED_TOP), n=1, cutoff=0.8)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            warn(f"{key} is not a DeepSpeed setting scaletrain knows{hint}; not carried over")


def deepspeed_overrides(ds: dict, world_size: int | None, warn: Warn, base_lr: float) -> list[str]:
    """``section.key=value`` strings for a DeepSpeed config dict."""
    out: Overrides = {}
    _batch(ds, world_size, out, warn)
    _zero(ds, out, warn)
    _precision(ds, out, warn)
    _optimizer(ds, out, warn)
    _scheduler(ds, out, warn, base_lr)
    _rest(ds, out, warn)
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in out.items()]


def import_deepspeed(path: Path, base: str | None, overrides: list[str], world_size: int | None,
                     warn: Warn) -> Config:
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    if world_size is not None and world_size < 1:
        raise UserError(f"--world-size = {world_size}; allowed: 1 or more")
    try:
        base_lr = load_config(base, overrides).training.lr
        return load_config(base, deepspeed_overrides(ds, world_size, warn, base_lr) + list(overrides))
    except UserError as exc:
        raise UserError(f"{exc} (from {path})") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: a setting has the wrong shape: {exc}") from None
