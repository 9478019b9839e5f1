"""Which layouts exist for a model on a cluster, which fit, and which is fastest."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from scaletrain.config import MODEL_PRESETS, Config, ModelConfig, ParallelConfig, TrainingConfig, load_config
from scaletrain.errors import UserError
from scaletrain.planner.estimate import Estimate, estimate
from scaletrain.planner.layout import Layout, Workload
from scaletrain.planner.hardware import GIB, Cluster
from scaletrain.planner.rank_plan import plan_rank_batch

DEFAULT_VOCAB = 32000  # for presets whose vocabulary comes from the tokenizer
_BASE_PRESET = next(iter(MODEL_PRESETS))  # what a model that is no preset starts from in a printed command


def resolve_model(spec: str) -> tuple[ModelConfig, dict]:
    """A preset name, a scaletrain TOML config, or a HF ``config.json``.
    Returns the model and whatever else the file says (seq_len, batch)."""
    path = Path(spec).expanduser()
    if spec in MODEL_PRESETS:
        model = ModelConfig(name=spec, **MODEL_PRESETS[spec])
        if model.vocab_size == 0:
            model = dataclasses.replace(model, vocab_size=DEFAULT_VOCAB)
        return model, {}
    if path.suffix == ".toml" and path.exists():
        cfg = load_config(str(path))
        model = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=DEFAULT_VOCAB)
        return model, {"seq_len": cfg.data.seq_len, "global_batch": cfg.training.global_batch_size,
                       "dtype": cfg.training.dtype}
    if path.suffix == ".json" and path.exists():
        return hf_model(path), {}
    if path.suffix in (".toml", ".json"):
        raise UserError(f"--model {spec}: no such file")
    import difflib

    close = difflib.get_close_matches(spec, MODEL_PRESETS, n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"--model {spec!r} is not a preset{hint} (presets: {', '.join(MODEL_PRESETS)}; or give a "
                    "scaletrain .toml config or a HF config.json)")


def hf_model(path: Path) -> ModelConfig:
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise UserError(f"{path}: a HF Llama config.json needs {', '.join(missing)}")
    return ModelConfig(
        name=hf.get("model_type", "hf"), dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096), tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=hf.get("rms_norm_eps", 1e-5))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _accepted(w: Workload, layout: Layout) -> bool:
    """The trainer's own validation (config.validate and the layout check,
    the same errors it raises) accepts the config ``train_overrides`` prints."""
    from scaletrain.config import DataConfig, validate
    from scaletrain.parallel.dims import ParallelDims

    p = ParallelConfig(dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp, pp=layout.pp,
                       zero_stage=layout.zero_stage, pp_schedule=layout.pp_schedule,
                       pp_virtual_stages=layout.virtual_stages, pp_microbatches=layout.pp_microbatches,
                       sequence_parallel=layout.sequence_parallel, cpu_offload=layout.cpu_offload,
                       fsdp_accumulate=layout.fsdp_accumulate,
                       pp_rank_speeds=",".join(f"{s:g}" for s in layout.pp_rank_speeds),
                       dp_allreduce=layout.dp_allreduce, grad_compression=layout.grad_compression,
                       rank_batch=",".join(map(str, layout.rank_batch)))
    model = w.model if w.model.name in MODEL_PRESETS else dataclasses.replace(w.model, name=_BASE_PRESET)
    cfg = Config(model=model, data=DataConfig(seq_len=w.seq_len), parallel=p,
                 training=TrainingConfig(micro_batch_size=layout.micro_batch, global_batch_size=w.global_batch,
                                         dtype=w.dtype, activation_checkpointing=layout.activation_checkpointing))
    try:
        ParallelDims.from_config(p, layout.world)
        validate(cfg)
    except UserError:
        return False
    return True


def candidates(w: Workload, cluster: Cluster, offload: bool = True, micro_batch: int | None = None) -> list[Layout]:
    """Every layout the trainer accepts: tp inside a node, pp dividing the
    rest, the data-parallel ranks as DDP, ZeRO-1/2/3 or HSDP (sharded within
    a node's share, replicated across), power-of-two micro-batches, three
    recomputation modes, 1F1B or interleaved 1F1B, and ZeRO-3 CPU offload."""
    n, per_node, m = cluster.gpus, cluster.gpus_per_node, w.model
    out = []
    for tp in [d for d in _divisors(per_node) if d <= 8]:
        for pp in [d for d in _divisors(n // tp) if d <= m.n_layers]:
            dp = n // (tp * pp)
            dp_options = [(dp, 1, 0), (1, dp, 1), (1, dp, 2), (1, dp, 3)] if dp > 1 else [(1, 1, 0)]
            shard_in_node = max(1, per_node // tp)
            if dp > shard_in_node and dp % shard_in_node == 0 and shard_in_node > 1:
                dp_options += [(dp // shard_in_node, shard_in_node, 2), (dp // shard_in_node, shard_in_node, 3)]
            for rep, shard, stage in dp_options:
                if w.global_batch % dp:
                    continue
                per_rank = w.global_batch // dp
                micro = [b for b in (1, 2, 4, 8, 16, 32) if per_rank % b == 0] if micro_batch is None else (
                    [micro_batch] if per_rank % micro_batch == 0 else [])
                for b in micro:
                    schedules = [("1f1b", 1, b)] if pp > 1 else [("1f1b", 1, 1)]
                    if pp > 1 and m.n_layers >= 2 * pp:
                        schedules.append(("interleaved_1f1b", 2, b))
                    # A mixed cluster's pipeline: stages balanced for each rank's device (as the trainer
                    # does with parallel.pp_rank_speeds), next to the even split.
                    speeds = cluster.pipeline_rank_speeds(pp, w.dtype)
                    for schedule, v, mb in schedules:
                        for ac in ("none", "selective", "selective_half", "full"):
                            offloads = (False, True) if offload and stage == 3 else (False,)
                            # FSDP under accumulation: hold the full gradient, or reduce-scatter each micro-step.
                            accumulate = ("unsharded", "sharded") if (stage >= 2 and shard > 1 and pp == 1
                                                                      and per_rank > b) else ("unsharded",)
                            for off, acc, sp in itertools.product(offloads, accumulate, {(), speeds}):
                                layout = Layout(rep, shard, stage, tp, pp, schedule, v, mb if pp > 1 else 1, b,
                                                ac, tp > 1, off, acc, sp)
                                out += [v for v in _variants(w, layout, cluster) if _accepted(w, v)]
    return out


def _variants(w: Workload, layout: Layout, cluster: Cluster) -> list[Layout]:
    """The layout, plain DDP's comm hooks the search ranks (hierarchical
    across nodes, bf16 compression; estimate.ddp_options costs the lossy
    ones), and on a mixed cluster each of them with rows per rank by speed."""
    out = [layout]
    if layout.engine == "ddp" and layout.dp > 1:
        if layout.dp > cluster.gpus_per_node:
            out.append(dataclasses.replace(layout, dp_allreduce="hierarchical"))
        if cluster.device.bf16:  # bf16_compress_hook needs bf16 on every rank
            out.append(dataclasses.replace(layout, grad_compression="bf16"))
    split = plan_rank_batch(w, layout, cluster)
    return out + [dataclasses.replace(v, rank_batch=split) for v in out] if split else out


def search(w: Workload, cluster: Cluster, device_type: str = "cuda", micro_batch: int | None = None) -> list[Estimate]:
    """All candidates, estimated; fitting ones first, fastest first."""
    estimates = [estimate(w, layout, cluster, device_type) for layout in candidates(w, cluster, micro_batch=micro_batch)]
    # Fastest first; within 0.1% of each other, the one with more memory to spare.
    return sorted(estimates, key=lambda e: (not e.fits, -round(e.tokens_per_s, -int(f"{e.tokens_per_s:e}"[-3:]) + 3)
                                            if e.fits else 0, e.total_bytes))


def nearest_miss(estimates: list[Estimate], cluster: Cluster) -> str:
    if not estimates:
        return "no layout of this model divides the cluster (check --gpus, --gpus-per-node, heads and layers)"
    best = min(estimates, key=lambda e: e.total_bytes)
    lay = best.layout
    extra = []
    if lay.activation_checkpointing == "full":
        extra.append("full recompute")
    if lay.cpu_offload:
        extra.append("CPU offload")
    how = f"{lay.describe()}, micro-batch {lay.micro_batch}" + (f" with {' and '.join(extra)}" if extra else "")
    return (f"no layout fits: the smallest needs {best.total_bytes / GIB:.1f} GiB per GPU ({how}); "
            f"{cluster.device.memory_gib:g} GiB available")


def train_overrides(w: Workload, layout: Layout) -> list[str]:
    """Every ``--set`` the trainer needs to run this layout on this workload:
    the layout, its micro batch and offload, the batch, sequence length,
    dtype and the model (a preset by name, any other shape key by key)."""
    out = layout.config_overrides() + [
        f"training.micro_batch_size={layout.micro_batch}", f"training.global_batch_size={w.global_batch}",
        f"data.seq_len={w.seq_len}", f"training.dtype={w.dtype}",
        f"parallel.cpu_offload={str(layout.cpu_offload).lower()}"]
    # A model that is no preset (a HF config.json, a custom shape) starts from
    # one and sets every shape key: the trainer accepts preset names only.
    name = w.model.name if w.model.name in MODEL_PRESETS else _BASE_PRESET
    out.append(f"model.name={name}")
    preset = MODEL_PRESETS[name] if w.model.name in MODEL_PRESETS else {}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(w.model, f.name)
        # A preset's vocabulary of 0 comes from the tokenizer: left to the trainer.
        same = preset and (preset.get(f.name, value) == value or (f.name == "vocab_size" and preset.get(f.name) == 0))
        if f.name != "name" and not same:
            out.append(f"model.{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return out
