"""Validation of a config: per-field bounds and choices, then the relations
between fields, and the parsers of the keys that hold small languages
(faults, compression specs, rank batches, GPU groups, dtype overrides).
Everything here is torch-free and runs before any process starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from scaletrain.config.tree import (_AUTO_KEYS, _KEY_FOR_FIELD, Config, DataConfig, ParallelConfig, _did_you_mean,
                                    _sections)
from scaletrain.errors import UserError


FAULT_KINDS = ("extra_collective", "fewer_batches", "swallow_exception", "sleep", "kill", "slow", "raise", "nan",
               "oom")


COMPRESSIONS = ("none", "bf16", "powersgd:RANK", "topk:FRACTION")
DTYPE_PREFERENCE = ("bf16", "fp16", "fp32")  # best first: bf16 needs no loss scaling, fp16 does


def parse_compression(text: str) -> tuple[str, float]:
    """parallel.grad_compression -> (kind, argument), e.g. ('powersgd', 4), ('topk', 0.01), ('none', 0)."""
    kind, _, arg = text.partition(":")
    try:
        if kind in ("none", "bf16") and not arg:
            return kind, 0
        if kind == "powersgd" and int(arg) >= 1:
            return kind, int(arg)
        if kind == "topk" and 0 < float(arg) <= 1:  # nan fails both comparisons
            return kind, float(arg)
    except ValueError:
        pass
    raise UserError(f"parallel.grad_compression = {text!r}; allowed: {', '.join(COMPRESSIONS)} with RANK an "
                    "integer >= 1 and 0 < FRACTION <= 1 (e.g. powersgd:4, topk:0.01)")


def parse_supported_dtypes(text: str) -> dict[int, tuple[str, ...]]:
    """debug.supported_dtypes = '1:fp16/fp32,2:fp32' -> {1: ('fp16', 'fp32'), 2: ('fp32',)}."""
    out: dict[int, tuple[str, ...]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        rank, _, names = item.partition(":")
        dtypes = tuple(names.split("/"))
        if not rank.isdigit() or int(rank) in out or not all(d in DTYPE_PREFERENCE for d in dtypes):
            raise UserError(f"debug.supported_dtypes = {text!r}; allowed: RANK:DTYPE[/DTYPE...] separated by "
                            f"commas, each rank once, DTYPE one of {', '.join(DTYPE_PREFERENCE)} (e.g. '1:fp16/fp32')")
        out[int(rank)] = dtypes
    return out


def parse_rank_batch(text: str) -> list[int] | str | None:
    """parallel.rank_batch -> None (even split), 'auto', or rows per rank."""
    text = text.strip()
    if text in ("", "auto"):
        return text or None
    parts = [x.strip() for x in text.strip("[]").split(",")]
    if not all(x.isdigit() and int(x) > 0 for x in parts):
        raise UserError(f"parallel.rank_batch = {text!r}; allowed: empty (even split), 'auto', or rows per "
                        "data-parallel rank as positive integers separated by commas (e.g. '6,2')")
    return [int(x) for x in parts]


def parse_slowdown(text: str) -> dict[int, float]:
    """debug.slowdown = '1:3,2:1.5' -> {1: 3.0, 2: 1.5}."""
    out: dict[int, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        rank, _, factor = item.partition(":")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not rank.isdigit() or int(rank) in out or not 1 <= value < 1000:
            raise UserError(f"debug.slowdown = {text!r}; allowed: RANK:FACTOR separated by commas, each rank "
                            "once, 1 <= FACTOR < 1000 (e.g. '1:3')")
        out[int(rank)] = value
    return out


@dataclass(frozen=True)
class GpuGroup:
    """One [[gpu_groups]] table: the ranks it holds take micro_batch x accumulation rows per step."""

    name: str
    ranks: tuple[int, int] | None  # first and last rank, or None: matched by hosts
    hosts: str  # an fnmatch pattern of host names ('' with ranks)
    micro_batch: int
    accumulation: int


_GPU_GROUP_KEYS = ("name", "ranks", "hosts", "micro_batch", "accumulation")


def parse_gpu_groups(groups: list) -> list[GpuGroup]:
    out = []
    for i, g in enumerate(groups):
        where = f"[[gpu_groups]] {g.get('name', f'#{i + 1}')}"
        if unknown := sorted(set(g) - set(_GPU_GROUP_KEYS)):
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_GPU_GROUP_KEYS)}")
        ranks, hosts = g.get("ranks"), g.get("hosts")
        if (ranks is None) == (hosts is None):
            raise UserError(f"{where}: give exactly one of ranks = 'FIRST-LAST' or hosts = 'PATTERN'")
        span = None
        if ranks is not None:
            first, _, last = str(ranks).partition("-")
            last = last or first
            if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
                raise UserError(f"{where}: ranks = {ranks!r}; allowed: 'FIRST-LAST' or 'RANK' (0-based)")
            span = (int(first), int(last))
        micro, accumulation = g.get("micro_batch"), g.get("accumulation", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (micro, accumulation)):
            raise UserError(f"{where}: micro_batch = {micro!r} and accumulation = {accumulation!r} must be "
                            "integers >= 1")
        out.append(GpuGroup(str(g.get("name", f"#{i + 1}")), span, str(hosts or ""), micro, accumulation))
    return out


def check_rank_batch_config(cfg: "Config") -> None:
    split, p, t = parse_rank_batch(cfg.parallel.rank_batch), cfg.parallel, cfg.training
    parse_slowdown(cfg.debug.slowdown)
    groups = parse_gpu_groups(cfg.gpu_groups)
    if groups and split is not None:
        raise UserError("parallel.rank_batch and [[gpu_groups]] both split the batch between ranks; use one")
    if groups and p.zero_stage >= 2 and len({g.accumulation for g in groups}) > 1:
        raise UserError("[[gpu_groups]] with different accumulation needs zero_stage 0 or 1: FSDP (2/3) runs "
                        "collectives in every forward, so every rank must run the same number of micro-steps")
    if split is None and not groups:
        return
    what = "[[gpu_groups]]" if groups else f"parallel.rank_batch = {p.rank_batch!r}"
    if p.tp != 1 or p.pp != 1:
        raise UserError(f"{what} splits rows between data-parallel ranks and "
                        f"needs tp = 1 and pp = 1 (has tp = {p.tp}, pp = {p.pp})")
    if cfg.data.batching != "fixed":
        raise UserError(f"{what} needs data.batching = 'fixed' (has "
                        f"{cfg.data.batching!r}: its micro batches are already sized per step)")
    if isinstance(split, list) and sum(split) != t.global_batch_size:
        raise UserError(f"parallel.rank_batch = {p.rank_batch!r} sums to {sum(split)}; it must sum to "
                        f"training.global_batch_size = {t.global_batch_size}")


def check_comm_hooks(p: "ParallelConfig") -> None:
    """Hierarchical all-reduce and compression are DDP communication hooks."""
    kind, _ = parse_compression(p.grad_compression)
    if kind == "none" and p.dp_allreduce == "flat":
        return
    key, value = ("grad_compression", p.grad_compression) if kind != "none" else ("dp_allreduce", p.dp_allreduce)
    if p.zero_stage != 0 or p.dp_shard not in (-1, 1) or p.tp != 1 or p.pp != 1:
        raise UserError(f"parallel.{key} = {value!r} is a DDP communication hook and needs plain DDP "
                        f"(zero_stage = 0, dp_shard = 1, tp = 1, pp = 1); this config has zero_stage = "
                        f"{p.zero_stage}, dp_shard = {p.dp_shard}, tp = {p.tp}, pp = {p.pp}")
    if kind != "none" and p.dp_allreduce != "flat":
        raise UserError(f"parallel.grad_compression = {p.grad_compression!r} with parallel.dp_allreduce = "
                        f"{p.dp_allreduce!r}: choose one of them (the hierarchical all-reduce does not compress)")


def parse_fault(text: str) -> tuple[str, int, int]:
    """debug.inject_fault = KIND:RANK:STEP -> (kind, rank, step)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in FAULT_KINDS or not parts[1].isdigit() or not parts[2].isdigit():
        raise UserError(f"debug.inject_fault = {text!r}; allowed: KIND:RANK:STEP with KIND one of "
                        f"{', '.join(FAULT_KINDS)} (e.g. sleep:1:3)")
    return parts[0], int(parts[1]), int(parts[2])


def validate(cfg: Config) -> None:
    """Per-field bounds and choices, then the relations between fields."""
    for section, cls in _sections().items():
        obj = getattr(cfg, section)
        for f in fields(cls):
            value = getattr(obj, f.name)
            choices, minimum = f.metadata["choices"], f.metadata["min"]
            name = _KEY_FOR_FIELD.get(f.name, f.name)
            if choices is not None and value not in choices:
                raise UserError(f"{section}.{name} = {value!r} is not allowed; allowed: "
                                f"{', '.join(map(str, choices))}{_did_you_mean(str(value), map(str, choices))}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{section}.{name} = {value!r} is not a finite number")
            if minimum is not None and value < minimum:
                allowed = " (0 or more, or 'auto')" if (section, name) in _AUTO_KEYS else ""
                raise UserError(f"{section}.{name} = {value!r} must be >= {max(minimum, 0) if allowed else minimum}"
                                f"{allowed}")
    m, d, t, p = cfg.model, cfg.data, cfg.training, cfg.parallel
    if m.dim % m.n_heads:
        raise UserError(f"model.n_heads = {m.n_heads} must divide model.dim = {m.dim}")
    if (m.dim // m.n_heads) % 2:
        raise UserError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}")
    if d.seq_len > m.max_seq_len:
        raise UserError(f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {m.max_seq_len}")
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(f"training.global_batch_size = {t.global_batch_size} is not divisible by "
                        f"training.micro_batch_size = {t.micro_batch_size}")
    for key in ("beta1", "beta2"):
        if not getattr(t, key) < 1:
            raise UserError(f"training.{key} = {getattr(t, key)!r} must be < 1 (AdamW's moment decay; allowed: 0 <= beta < 1)")
    _check_data(d, p)
    if t.min_lr > t.lr:
        raise UserError(f"training.min_lr = {t.min_lr} exceeds training.lr = {t.lr}")
    for fault in filter(None, cfg.debug.inject_fault.split(",")):
        parse_fault(fault)
    from scaletrain.observe.alerts import parse_rules  # torch-free

    parse_rules(cfg.alerts)
    for key in ("dp_replicate", "dp_shard", "pp_microbatches", "pp_virtual_stages"):
        value = getattr(p, key)
        if value != -1 and value < 1:
            raise UserError(f"parallel.{key} = {value} must be >= 1, or -1 for auto")
    if m.n_heads % p.tp or m.n_kv_heads % p.tp:
        raise UserError(f"parallel.tp = {p.tp} must divide model.n_heads = {m.n_heads} and "
                        f"model.n_kv_heads = {m.n_kv_heads}")
    if m.ffn_dim % p.tp:
        raise UserError(f"parallel.tp = {p.tp} must divide model.ffn_dim = {m.ffn_dim} (the MLP is split "
                        "column-wise, then row-wise)")
    if p.sequence_parallel and p.tp == 1:
        raise UserError("parallel.sequence_parallel = true needs parallel.tp > 1")
    if p.sequence_parallel and d.seq_len % p.tp:
        raise UserError(f"parallel.sequence_parallel = true needs parallel.tp = {p.tp} to divide "
                        f"data.seq_len = {d.seq_len}")
    if p.zero_stage == 1 and (p.tp > 1 or p.pp > 1):
        raise UserError("parallel.zero_stage = 1 with parallel.tp or parallel.pp > 1 is not supported "
                        "(ZeroRedundancyOptimizer needs DDP and plain tensors); use zero_stage 0, 2 or 3")
    if t.dtype == "fp16" and (p.zero_stage >= 2 or p.tp > 1 or p.pp > 1):
        raise UserError("training.dtype = fp16 is supported with plain data parallelism only (its loss "
                        "scaler must see whole gradients and the whole loss); use bf16 with "
                        "zero_stage 2/3, tp or pp")
    if p.cpu_offload and p.zero_stage != 3:
        raise UserError(f"parallel.cpu_offload = true needs parallel.zero_stage = 3 (is {p.zero_stage})")
    check_comm_hooks(p)
    check_rank_batch_config(cfg)
    parse_supported_dtypes(cfg.debug.supported_dtypes)
    if p.pp > 1:
        check_pipeline(cfg)
    if p.pp_rank_speeds.strip():
        from scaletrain.parallel.rules import parse_rank_speeds  # torch-free

        try:
            parse_rank_speeds(p.pp_rank_speeds, p.pp)
        except ValueError as exc:
            raise UserError(f"parallel.pp_rank_speeds = {exc}") from None


def _check_data(d: "DataConfig", p: "ParallelConfig") -> None:
    if d.batching == "token_budget" and d.max_tokens_per_batch == 0:
        raise UserError("data.batching = token_budget needs data.max_tokens_per_batch (tokens per micro batch, "
                        ">= data.seq_len to fit every row)")
    if d.batching == "token_budget" and p.pp > 1:
        raise UserError("data.batching = token_budget with parallel.pp > 1 is not supported (pipeline "
                        "microbatches need a fixed row count); use fixed or length_grouped")
    if d.val_fraction >= 1:
        raise UserError(f"data.val_fraction = {d.val_fraction} must be < 1 (a fraction of the documents)")
    if d.val_source and d.val_fraction:
        raise UserError("data.val_source and data.val_fraction are both set; choose one validation split")


def pipeline_virtual_stages(p: "ParallelConfig") -> int:
    if p.pp_virtual_stages != -1:
        return p.pp_virtual_stages
    return 2 if p.pp_schedule in ("interleaved_1f1b", "interleaved_zb", "zbv") else 1


def pipeline_microbatches(cfg: "Config") -> int:
    mb = cfg.parallel.pp_microbatches
    return cfg.training.micro_batch_size if mb == -1 else mb


def check_pipeline(cfg: "Config") -> None:
    """What torch.distributed.pipelining's schedules accept, checked up front."""
    m, p = cfg.model, cfg.parallel
    v, n_mb = pipeline_virtual_stages(p), pipeline_microbatches(cfg)
    stages = p.pp * v
    if stages > m.n_layers:
        raise UserError(f"parallel.pp x virtual stages = {p.pp} x {v} = {stages} exceeds model.n_layers = "
                        f"{m.n_layers}: every pipeline stage needs a layer")
    if m.tie_embeddings:
        raise UserError("model.tie_embeddings = true with parallel.pp > 1 is not supported: the embedding "
                        "and the head live on different pipeline stages")
    if cfg.training.micro_batch_size % n_mb:
        raise UserError(f"parallel.pp_microbatches = {n_mb} must divide training.micro_batch_size = "
                        f"{cfg.training.micro_batch_size}")
    single = p.pp_schedule in ("gpipe", "1f1b")
    if single and v != 1:
        raise UserError(f"parallel.pp_schedule = {p.pp_schedule!r} runs one stage per rank; "
                        f"parallel.pp_virtual_stages = {v} needs interleaved_1f1b, interleaved_zb or zbv")
    if not single and v < 2:
        raise UserError(f"parallel.pp_schedule = {p.pp_schedule!r} needs parallel.pp_virtual_stages >= 2")
    if p.pp_schedule == "zbv" and v != 2:
        raise UserError(f"parallel.pp_schedule = 'zbv' needs exactly 2 virtual stages per rank (is {v})")
    if p.pp_schedule == "1f1b" and n_mb < p.pp:
        raise UserError(f"parallel.pp_schedule = '1f1b' needs pp_microbatches >= pp ({n_mb} < {p.pp})")
    if p.pp_schedule in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, n_mb // p.pp)
        if n_mb % rounds:
            raise UserError(f"parallel.pp_schedule = {p.pp_schedule!r} needs pp_microbatches = {n_mb} to be a "
                            f"multiple of its rounds max(1, pp_microbatches // pp) = {rounds}")
