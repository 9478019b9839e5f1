"""One typed config tree: dataclass sections, loaded from TOML, overridden with
``section.key=value`` strings, validated at load.

Every field's ``help`` text is what ``scaletrain config show --help-keys`` prints;
a bad value is reported with its key, the value and what is allowed, before any
process group starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scaletrain.errors import UserError


# An integer key that also takes 'auto' (checkpoint.interval) stores it as -1.
AUTO = -1
_AUTO_KEYS = {("checkpoint", "interval")}


def _f(default, help: str, choices: tuple | None = None, minimum: float | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum})


# Named model shapes. debug/tiny/small train on a laptop CPU; the rest are
# Llama-2/3 dimensions used for planning. vocab_size 0 = taken from the tokenizer.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=0,
                  max_seq_len=256, tie_embeddings=False, rope_theta=10000.0),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=0,
                 max_seq_len=512, tie_embeddings=False, rope_theta=10000.0),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, vocab_size=0,
                  max_seq_len=1024, tie_embeddings=False, rope_theta=10000.0),
    # GPT-3 "small" width/depth with a Llama block.
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                 vocab_size=32000, max_seq_len=2048, tie_embeddings=True, rope_theta=10000.0),
    # Llama-3.2-1B.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
               vocab_size=128256, max_seq_len=8192, tie_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B / 13B / 70B.
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
               vocab_size=32000, max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                vocab_size=32000, max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                vocab_size=32000, max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0),
}


@dataclass
class ModelConfig:
    name: str = _f("small", "model preset; its shape is the base that the keys below override",
                   tuple(MODEL_PRESETS))
    dim: int = _f(256, "hidden size", minimum=1)
    n_layers: int = _f(4, "number of transformer blocks", minimum=1)
    n_heads: int = _f(8, "attention (query) heads; must divide dim", minimum=1)
    n_kv_heads: int = _f(4, "key/value heads (grouped-query attention); must divide n_heads", minimum=1)
    vocab_size: int = _f(0, "embedding rows; 0 = the tokenizer's vocabulary rounded up to 64", minimum=0)
    ffn_dim: int = _f(704, "SwiGLU hidden size", minimum=1)
    max_seq_len: int = _f(1024, "longest sequence the RoPE table covers", minimum=1)
    tie_embeddings: bool = _f(False, "share the input embedding with the output head")
    rope_theta: float = _f(10000.0, "RoPE base frequency", minimum=1.0)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", minimum=0.0)


@dataclass
class DataConfig:
    source: str = _f("stdlib", "a file, a directory, a glob, or 'stdlib' (this interpreter's standard-library .py files)")
    format: str = _f("auto", "how to read the source files; auto = by extension (.jsonl, .parquet, .arrow, else "
                             "text); chat = JSONL lines with 'messages' rendered through the tokenizer's chat "
                             "template, trained only on assistant turns",
                     ("auto", "text", "jsonl", "parquet", "arrow", "chat"))
    text_field: str = _f("text", "JSONL key / Parquet or Arrow column holding the text")
    tokenizer: str = _f("byte", "'byte', 'bpe' (trained on the corpus), or a tokenizer.json path")
    bpe_vocab_size: int = _f(4096, "vocabulary size when data.tokenizer = 'bpe'", minimum=258)
    seq_len: int = _f(256, "tokens per training sequence", minimum=1)
    cache_dir: str = _f("~/.cache/scaletrain", "where tokenized corpora and trained tokenizers are kept")
    num_workers: int = _f(0, "tokenization processes when building the cache; 0 = one per CPU core (at most 8)",
                          minimum=0)
    cache_timeout: float = _f(3600.0, "seconds ranks wait for their node's rank 0 to build the token cache",
                              minimum=1.0)
    packing: str = _f("stream", "stream = the corpus as one token stream cut into seq_len windows; packed = "
                                "whole documents packed into rows, attention masked per document, positions "
                                "restarting; padded = one document per row, padded", ("stream", "packed", "padded"))
    batching: str = _f("fixed", "fixed = micro_batch_size rows; length_grouped = rows of similar length batched "
                                "together (shuffled across groups); token_budget = rows up to "
                                "max_tokens_per_batch tokens per micro batch", ("fixed", "length_grouped",
                                                                                "token_budget"))
    max_tokens_per_batch: int = _f(0, "token_budget: tokens (rows x padded length) per micro batch at most",
                                   minimum=0)
    group_size: int = _f(50, "length_grouped / token_budget: global batches per length-sorted group", minimum=1)
    val_source: str = _f("", "held-out corpus for the validation loss (read like data.source)")
    val_fraction: float = _f(0.0, "fraction of documents held out for validation (chosen by training.seed)",
                             minimum=0.0)


@dataclass
class EvalConfig:
    interval: int = _f(0, "steps between validation losses (data.val_source or data.val_fraction); one is "
                          "always taken at the end; 0 = only at the end", minimum=0)
    max_batches: int = _f(0, "global batches per evaluation at most; 0 = the whole validation set", minimum=0)


@dataclass
class TrainingConfig:
    steps: int = _f(120, "optimizer steps", minimum=1)
    global_batch_size: int = _f(16, "sequences per optimizer step, all data-parallel ranks together", minimum=1)
    micro_batch_size: int = _f(8, "sequences per rank per micro-step; accumulation = global / (micro x dp)", minimum=1)
    lr: float = _f(3e-3, "peak learning rate", minimum=0.0)
    warmup_steps: int = _f(10, "linear warmup steps", minimum=0)
    min_lr: float = _f(3e-4, "learning rate at the end of the cosine decay", minimum=0.0)
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms)", minimum=0.0)
    beta1: float = _f(0.9, "AdamW beta1", minimum=0.0)
    beta2: float = _f(0.95, "AdamW beta2", minimum=0.0)
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 = off", minimum=0.0)
    seed: int = _f(1234, "seed for weights and data order", minimum=0)
    dtype: str = _f("fp32", "compute dtype (autocast); parameters and optimizer stay fp32", ("fp32", "bf16", "fp16"))
    activation_checkpointing: str = _f("none", "recompute activations in backward: full = all but the block input; "
                                               "selective = the pointwise ops and norms; selective_half = also every "
                                               "other matmul (torchtitan's op policy)",
                                       ("none", "full", "selective", "selective_half"))
    compile: bool = _f(False, "torch.compile each transformer block")
    on_nonfinite: str = _f("skip", "a step whose loss or gradient norm is NaN/inf (or a loss spike): 'skip' its "
                                   "update on every rank (stop after max_bad_steps in a row), 'rollback' to the "
                                   "last checkpoint after max_bad_steps in a row, or 'stop'",
                           ("skip", "rollback", "stop"))
    max_bad_steps: int = _f(3, "consecutive skipped steps before on_nonfinite stops or rolls back", minimum=1)
    spike_zscore: float = _f(0.0, "a loss more than this many standard deviations above the mean of the last "
                                  "spike_window steps is a spike, handled as on_nonfinite says; 0 = off",
                             minimum=0.0)
    spike_window: int = _f(50, "steps of loss history for spike detection", minimum=2)
    on_oom: str = _f("micro_batch", "after an out-of-memory error the job restarts from its last checkpoint "
                                    "with: 'micro_batch' halved (accumulation doubled, same global batch) and "
                                    "then activation checkpointing on; 'checkpointing' on first, then halving; "
                                    "or 'stop'", ("micro_batch", "checkpointing", "stop"))


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(-1, "replicated data-parallel degree; -1 = auto (what the world size leaves when "
                               "zero_stage is 0, else 1)")
    dp_shard: int = _f(-1, "sharded data-parallel degree (ZeRO / FSDP); -1 = auto (what the world size "
                           "leaves when zero_stage > 0, else 1)")
    tp: int = _f(1, "tensor-parallel degree (Megatron-style, DTensor)", minimum=1)
    pp: int = _f(1, "pipeline-parallel degree", minimum=1)
    zero_stage: int = _f(0, "0 = DDP; 1 = + optimizer states sharded; 2 = + gradients; 3 = + parameters "
                            "(FSDP2); HSDP = dp_replicate x dp_shard with stage 2 or 3", (0, 1, 2, 3))
    sequence_parallel: bool = _f(False, "with tp > 1: shard norms and the residual stream along the sequence")
    pp_schedule: str = _f("1f1b", "pipeline schedule", PP_SCHEDULES)
    pp_microbatches: int = _f(-1, "microbatches per pipeline step (must divide training.micro_batch_size); "
                                  "-1 = one sequence each")
    pp_virtual_stages: int = _f(-1, "pipeline stages per rank; -1 = 2 for interleaved_1f1b / interleaved_zb "
                                    "/ zbv, else 1")
    cpu_offload: bool = _f(False, "ZeRO-3: keep sharded parameters and optimizer states in CPU memory (CUDA only)")
    ddp_bucket_cap_mb: float = _f(25.0, "DDP gradient bucket size in MiB", minimum=0.0)
    dp_allreduce: str = _f("flat", "DDP's gradient all-reduce: 'flat' over all data-parallel ranks, or "
                                   "'hierarchical': reduce-scatter inside each node, all-reduce of the shard "
                                   "across nodes, all-gather inside the node (plain DDP only)",
                           ("flat", "hierarchical"))
    grad_compression: str = _f("none", "compress DDP's gradients: none, bf16, powersgd:RANK (PowerSGD with "
                                       "rank-RANK factors) or topk:FRACTION (the largest entries; both with error "
                                       "feedback); plain DDP only")
    rank_batch: str = _f("", "rows of each global batch per data-parallel rank: empty = an even split, 'auto' = "
                             "proportional to each rank's throughput measured at start-up, or a list such as "
                             "'6,2' (one entry per rank, summing to training.global_batch_size; tp = pp = 1)")
    fsdp_accumulate: str = _f("unsharded", "FSDP under gradient accumulation: 'unsharded' reduce-scatters once per "
                                           "step (every rank holds the full fp32 gradient between micro-steps); "
                                           "'sharded' reduce-scatters every micro-step (1/dp_shard of the "
                                           "gradient memory, accumulation x the traffic)", ("unsharded", "sharded"))
    pp_rank_speeds: str = _f("", "relative speed of each pipeline rank, comma-separated (e.g. '1,1,2,2' for "
                                 "pp = 4): layers are split so stage times balance; 'auto' = measured on each "
                                 "rank at start-up; empty = equal speeds")


@dataclass
class CheckpointConfig:
    enable: bool = _f(True, "write checkpoints (and resume from them)")
    dir: str = _f("", "where checkpoints go; empty = <run dir>/checkpoints")
    interval: int = _f(0, "save every N steps (0 = only at the end and on SIGTERM/SIGINT; 'auto' = Young/Daly "
                          "from the measured save cost and the run's failure history)", minimum=AUTO)
    mtbf_hours: float = _f(24.0, "mean time between failures assumed by interval = 'auto' while the run's "
                                 "history holds no failure", minimum=1e-6)
    keep_last: int = _f(3, "keep the newest N complete checkpoints (0 = keep all)", minimum=0)
    async_save: bool = _f(False, "write in the background; only the copy to CPU memory blocks training")
    resume: str = _f("auto", "'auto' = the newest valid checkpoint in checkpoint.dir if any, 'none', or a "
                             "checkpoint directory")
    init_from: str = _f("", "start from these weights (a scaletrain checkpoint or an imported HF model), "
                            "with a fresh optimizer and step 0")
    on_error: str = _f("stop", "when a save fails: 'stop' training (exit 1) or 'continue' without it",
                       ("stop", "continue"))


@dataclass
class DebugConfig:
    stop_at_step: int = _f(0, "fault injection: after this step, act as if SIGTERM arrived (save, exit 0)",
                           minimum=0)
    measure_step: int = _f(0, "profile this step: peak tensor memory and bytes per collective per rank, "
                              "written to summary.json as measured_by_rank (scaletrain plan --verify); 0 = off",
                           minimum=0)
    hang_timeout: float = _f(300.0, "seconds without progress on any rank before the watchdog writes "
                                    "hang_report.json and stops the job with exit code 3; 0 = watchdog off",
                             minimum=0.0)
    inject_fault: str = _f("", "fault injection for testing the hang diagnosis: KIND:RANK:STEP with KIND one of "
                              "extra_collective, fewer_batches, swallow_exception, sleep, kill, slow, raise (an uncaught error), "
                              "nan (a NaN loss), oom (an out-of-memory error while the micro batch is > 1); several separated "
                              "by commas; empty = none")
    straggler_factor: float = _f(1.5, "a rank whose step time exceeds the median by this factor is reported "
                                      "as a straggler (checked every logging.interval steps); 0 = off",
                                 minimum=0.0)
    supported_dtypes: str = _f("", "testing precision negotiation: the dtypes ranks claim their device supports, "
                                   "RANK:DTYPE/DTYPE,... (e.g. '1:fp16/fp32'); other ranks report their device")
    slowdown: str = _f("", "make ranks slower, to try parallel.rank_batch on identical devices: RANK:FACTOR,... "
                           "(e.g. '1:3': rank 1 sleeps 2x its work time after every micro-step)")


@dataclass
class LoggingConfig:
    interval: int = _f(1, "log metrics every N steps", minimum=1)
    sample_tokens: int = _f(160, "tokens of text to sample from the trained model at the end; 0 = none", minimum=0)
    breakdown: bool = _f(True, "time each step's phases and sample memory/CPU/GPU use per rank (ranks.jsonl)")
    tensorboard: bool = _f(False, "write TensorBoard event files to <run dir>/tensorboard (pip install tensorboard)")
    wandb: bool = _f(False, "log to Weights & Biases in offline mode under <run dir>/wandb (pip install wandb)")
    prometheus_port: int = _f(-1, "serve Prometheus metrics from rank 0 on this port; 0 = a free port, -1 = off",
                              minimum=-1)
    prometheus_host: str = _f("127.0.0.1", "address the Prometheus endpoint binds")
    alert_webhook: str = _f("", "POST alert events (firing/resolved, Slack-compatible JSON) to this URL; "
                                "empty = none")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # [[alerts]] tables: name, expr, severity, ... (scaletrain.observe.alerts)
    alerts: list = field(default_factory=list)
    # [[gpu_groups]] tables: name, ranks or hosts, micro_batch, accumulation (parse_gpu_groups)
    gpu_groups: list = field(default_factory=list)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections of {config key: value}, as written in TOML."""
        return {section: {_KEY_FOR_FIELD.get(k, k): v for k, v in dataclasses.asdict(getattr(self, section)).items()}
                for section in _sections()}

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value('auto' if (section, key) in _AUTO_KEYS and value == AUTO else value)}"
                      for key, value in values.items()]
            lines.append("")
        for table, rows in (("alerts", self.alerts), ("gpu_groups", self.gpu_groups)):
            for row in rows:
                lines.append(f"[[{table}]]")
                lines += [f"{key} = {_toml_value(value)}" for key, value in row.items()]
                lines.append("")
        return "\n".join(lines)


# Config keys that are Python keywords live under another field name.
_FIELD_FOR_KEY = {"async": "async_save"}
_KEY_FOR_FIELD = {v: k for k, v in _FIELD_FOR_KEY.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config) if f.name not in ("alerts", "gpu_groups")}  # type: ignore[misc]


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field(section: str, key: str) -> dataclasses.Field:
    sections = _sections()
    if section not in sections:
        raise UserError(f"unknown config section '{section}'{_did_you_mean(section, sections)}; "
                        f"sections: {', '.join(sections)}")
    by_name = {_KEY_FOR_FIELD.get(f.name, f.name): f for f in fields(sections[section])}
    if key not in by_name:
        dotted = [f"{section}.{k}" for k in by_name]
        raise UserError(f"unknown config key '{section}.{key}'{_did_you_mean(f'{section}.{key}', dotted)}")
    return by_name[key]


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def _check_type(key: str, f: dataclasses.Field, value: Any) -> Any:
    tp = _field_type(f)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"{key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    return value


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"training.lr=3e-4"`` -> ("training", "lr", 3e-4), typed by the field."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise UserError(f"--set {item!r}: the key must be section.key, e.g. training.lr=3e-4")
    section, key = dotted.split(".")
    f = _field(section, key)
    tp = _field_type(f)
    text = text.strip()
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value: Any = text.lower() in ("true", "1", "yes")
        elif tp is int and (section, key) in _AUTO_KEYS and text == "auto":
            value = AUTO
        elif tp is int:
            value = int(text)
        elif tp is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        raise UserError(f"{dotted} = {text!r} has the wrong type; expected {_type_name(tp)}") from None
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- model preset <- TOML file <- ``--set`` overrides, then validate."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"--config {path} is a directory; give a .toml file (e.g. configs/tiny.toml)")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: malformed TOML: {exc}") from None
    alerts = raw.pop("alerts", [])
    if not isinstance(alerts, list) or not all(isinstance(rule, dict) for rule in alerts):
        raise UserError(f"{path}: 'alerts' must be a list of [[alerts]] tables")
    gpu_groups = raw.pop("gpu_groups", [])
    if not isinstance(gpu_groups, list) or not all(isinstance(group, dict) for group in gpu_groups):
        raise UserError(f"{path}: 'gpu_groups' must be a list of [[gpu_groups]] tables")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise UserError(f"{path}: '{section}' must be a [section] table")
        for key, value in values.items():
            if (section, key) in _AUTO_KEYS and value == "auto":
                value = values[key] = AUTO
            values[key] = _check_type(f"{section}.{key}", _field(section, key), value)
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value

    model_raw = raw.get("model", {})
    name = model_raw.get("name", ModelConfig.name)
    if name not in MODEL_PRESETS:
        raise UserError(f"model.name = {name!r} is not a preset{_did_you_mean(name, MODEL_PRESETS)}; "
                        f"allowed: {', '.join(MODEL_PRESETS)}")
    raw["model"] = {**MODEL_PRESETS[name], **model_raw, "name": name}

    cfg = Config(**{section: cls(**{_FIELD_FOR_KEY.get(k, k): v for k, v in raw.get(section, {}).items()})
                    for section, cls in _sections().items()}, alerts=alerts, gpu_groups=gpu_groups)
    from scaletrain.config.checks import validate  # checks needs the tree's classes

    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``section.key=value`` overrides applied (typed and validated as --set's)."""
    for item in overrides:
        section, key, value = parse_override(item)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                       **{_FIELD_FOR_KEY.get(key, key): value})})
    from scaletrain.config.checks import validate  # checks needs the tree's classes

    validate(cfg)
    return cfg


def config_help() -> str:
    """Every key with its type, default and help text."""
    lines = []
    for section, cls in _sections().items():
        for f in fields(cls):
            choices = f.metadata["choices"]
            allowed = f" [{', '.join(map(str, choices))}]" if choices else ""
            key = _KEY_FOR_FIELD.get(f.name, f.name)
            lines.append(f"{section}.{key} ({f.type}, default {f.default!r}){allowed}: {f.metadata['help']}")
    return "\n".join(lines)
