"""HF Transformers interop: a checkpoint's weights as a ``LlamaForCausalLM``
folder (config.json + model.safetensors), and back.

scaletrain's parameter names are HF's without the ``model.`` prefix and its
rotary convention is HF's rotate-half, so the conversion is a renaming.
Loading uses safetensors (no pickle)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from scaletrain.checkpoint.manifest import seal, verify
from scaletrain.checkpoint.safe_reader import SafeReader
from scaletrain.config import Config, ModelConfig, load_config, validate
from scaletrain.errors import UserError
from scaletrain.model import Llama


def _to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
    }


def model_config_from_hf(config: dict) -> dict:
    """The [model] keys of a scaletrain config from a HF Llama config.json."""
    if config.get("model_type") != "llama":
        raise UserError(f"config.json: model_type {config.get('model_type')!r} is not supported; allowed: llama")
    rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    return {"dim": config["hidden_size"], "ffn_dim": config["intermediate_size"],
            "n_layers": config["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads, "vocab_size": config["vocab_size"],
            "max_seq_len": config["max_position_embeddings"], "norm_eps": config["rms_norm_eps"],
            "rope_theta": float(rope_theta), "tie_embeddings": bool(config.get("tie_word_embeddings", False))}


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file; a UserError if it is not one (truncated, corrupted)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def load_checkpoint_model(ckpt_dir: Path) -> tuple[Config, Llama]:
    """A plain single-process model holding a checkpoint's weights (any layout)."""
    if (problem := verify(ckpt_dir)) is not None:
        raise UserError(f"{ckpt_dir} is not a valid checkpoint: {problem}")
    cfg = load_config(ckpt_dir / "config.toml")
    model = Llama(cfg.model)
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    dcp.load(params, storage_reader=SafeReader(str(ckpt_dir)), no_dist=True)
    return cfg, model


def _check_export_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; export writes a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} is not empty; choose a new folder or pass --force to overwrite its files")


def export_hf(ckpt_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Weights, config.json, generation_config.json and the tokenizer (with
    the EOS token and a chat template) as a folder ``transformers`` loads."""
    from scaletrain.checkpoint.hf_tokenizer import checkpoint_tokenizer, write_hf_tokenizer

    _check_export_target(out_dir, force)
    cfg, model = load_checkpoint_model(ckpt_dir)
    tokenizer = checkpoint_tokenizer(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {_to_hf_name(name): p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    special = {"eos_token_id": tokenizer.eos_id, "bos_token_id": None, "pad_token_id": tokenizer.eos_id}
    (out_dir / "config.json").write_text(json.dumps({**hf_config(cfg.model), **special}, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps(special, indent=1))
    write_hf_tokenizer(tokenizer, out_dir, cfg.model.max_seq_len)
    return out_dir


def load_hf_model(hf_dir: Path, base_config: Config | None = None) -> tuple[Config, Llama, dict]:
    """A HF Llama folder's model: the scaletrain config with its shape, the
    model holding its weights (safetensors), and config.json as read."""
    config_path, weights_path = hf_dir / "config.json", hf_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path} does not exist (expected a HF folder with config.json and model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
        shape = model_config_from_hf(config)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: not a Llama config ({exc})") from None
    cfg = base_config or load_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **shape))
    validate(cfg)
    model = Llama(cfg.model)
    weights = {_from_hf_name(k): v for k, v in read_safetensors(weights_path).items()}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that do not match the config
        problem = str(exc).split("\n\t", 1)[-1].split("\n")[0]
        raise UserError(f"{weights_path}: tensors do not match {config_path}: {problem}") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{weights_path}: tensors do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return cfg, model, config


def import_hf(hf_dir: Path, out_dir: Path, base_config: Config | None = None) -> Path:
    """A HF Llama folder -> a model-only scaletrain checkpoint (use it with
    ``checkpoint.init_from``); its config.toml carries the model shape."""
    cfg, model, _ = load_hf_model(hf_dir, base_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    dcp.save(params, checkpoint_id=str(tmp), no_dist=True)
    (tmp / "config.toml").write_text(cfg.to_toml())
    (tmp / "train_state.json").write_text(json.dumps({"step": 0, "model_only": True, "config": cfg.to_dict(),
                                                       "imported_from": str(hf_dir)}, indent=1))
    seal(tmp, out_dir, {"format": 1, "step": 0, "model_only": True})
    return out_dir
