import dataclasses

import pytest

from scaletrain.config import MODEL_PRESETS, Config, load_config, parse_override
from scaletrain.errors import UserError

# The public config surface. Renaming a key breaks users' TOML files and
# command lines: update this list only as a deliberate act.
PUBLIC_KEYS = {
    "model": ["name", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len",
              "tie_embeddings", "rope_theta", "norm_eps"],
    "data": ["source", "format", "text_field", "tokenizer", "bpe_vocab_size", "seq_len", "cache_dir",
             "num_workers", "cache_timeout", "packing", "batching", "max_tokens_per_batch", "group_size",
             "val_source", "val_fraction"],
    "training": ["steps", "global_batch_size", "micro_batch_size", "lr", "warmup_steps", "min_lr",
                 "weight_decay", "beta1", "beta2", "grad_clip", "seed", "dtype", "activation_checkpointing",
                 "compile", "on_nonfinite", "max_bad_steps", "spike_zscore", "spike_window", "on_oom"],
    "parallel": ["dp_replicate", "dp_shard", "tp", "pp", "zero_stage", "sequence_parallel", "pp_schedule",
                 "pp_microbatches", "pp_virtual_stages", "cpu_offload", "ddp_bucket_cap_mb", "dp_allreduce",
                 "grad_compression", "rank_batch", "fsdp_accumulate",
                 "pp_rank_speeds"],
    "checkpoint": ["enable", "dir", "interval", "mtbf_hours", "keep_last", "async", "resume", "init_from", "on_error"],
    "debug": ["stop_at_step", "measure_step", "hang_timeout", "inject_fault", "straggler_factor",
              "supported_dtypes", "slowdown"],
    "logging": ["interval", "sample_tokens", "breakdown", "tensorboard", "wandb", "prometheus_port", "prometheus_host",
                "alert_webhook"],
    "eval": ["interval", "max_batches"],
}


def test_public_config_surface_is_frozen():
    assert {s: list(v) for s, v in Config().to_dict().items()} == PUBLIC_KEYS


def test_defaults_equal_the_small_preset():
    cfg = load_config()
    for key, value in MODEL_PRESETS["small"].items():
        assert getattr(cfg.model, key) == value


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "7b"\nn_layers = 2\n[training]\nlr = 1\n')
    cfg = load_config(path, ["model.n_layers=3", "training.compile=true", "data.seq_len=512"])
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.vocab_size) == (4096, 11008, 32000)
    assert cfg.model.n_layers == 3  # --set wins over the file, the file over the preset
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert cfg.training.compile is True and cfg.data.seq_len == 512


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(None, ["model.name=tiny", "data.source=/tmp/a \"quoted\" path", "training.lr=1e-4", "training.min_lr=0"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("item, expected", [
    ("training.steps=7", 7), ("training.lr=2e-4", 2e-4), ("training.compile=false", False),
    ("data.source=some/dir", "some/dir"), ("parallel.dp_replicate=-1", -1),
])
def test_overrides_are_typed_by_field(item, expected):
    _, _, value = parse_override(item)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("overrides, message", [
    (["training.warmup=5"], "did you mean 'training.warmup_steps'"),
    (["trainng.lr=1"], "did you mean 'training'"),
    (["training.steps=1.5"], "training.steps = '1.5' has the wrong type; expected an integer"),
    (["training.compile=maybe"], "expected true or false"),
    (["training.lr"], "expected section.key=value"),
    (["model.name=7c"], "did you mean '7b'"),
    (["training.dtype=fp8"], "training.dtype = 'fp8' is not allowed; allowed: fp32, bf16, fp16"),
    (["data.seq_len=4096"], "data.seq_len = 4096 exceeds model.max_seq_len = 1024"),
    (["training.global_batch_size=10", "training.micro_batch_size=4"], "not divisible by training.micro_batch_size"),
    (["model.n_kv_heads=3"], "model.n_kv_heads = 3 must divide model.n_heads = 8"),
    (["training.steps=0"], "training.steps = 0 must be >= 1"),
    (["parallel.tp=3"], "parallel.tp = 3 must divide model.n_heads = 8"),
    (["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
    (["training.dtype=fp16", "parallel.zero_stage=3"], "fp16 is supported with plain data parallelism only"),
    (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_virtual_stages=2"], "runs one stage per rank"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3", "model.n_layers=6"],
     "exactly 2 virtual stages"),
    (["parallel.zero_stage=4"], "parallel.zero_stage = 4 is not allowed"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3\n")
    with pytest.raises(UserError, match="malformed TOML"):
        load_config(bad)
    bad.write_text('[training]\nsteps = "ten"\n')
    with pytest.raises(UserError, match="training.steps = 'ten' has the wrong type"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_shipped_presets_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert {p.stem for p in configs} >= {"debug", "tiny", "small"}
    for path in configs:
        cfg = load_config(path)
        assert dataclasses.is_dataclass(cfg)

def test_small_preset_file_is_the_embedded_default():
    from pathlib import Path

    assert load_config(Path(__file__).resolve().parents[1] / 'configs' / 'small.toml') == load_config()

