"""MODEL -> a model, its tokenizer and chat template. MODEL is a scaletrain
checkpoint directory (any training layout: DCP reshards on load), a run
directory (its newest valid checkpoint), or a HF Llama folder (config.json,
model.safetensors, tokenizer.json). Nothing is unpickled: DCP metadata goes
through the safe reader, weights through safetensors."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from scaletrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a scaletrain Llama, eval mode
    tokenizer: object  # ByteTokenizer | HFTokenizer
    eos_id: int | None
    chat_template: str | None  # Jinja; None = scaletrain's default template
    checkpoint: Path  # the directory the weights came from


def find_weights(path: Path) -> tuple[str, Path]:
    """("checkpoint" | "hf", directory) for MODEL, or a UserError saying what MODEL must be."""
    from scaletrain.checkpoint.manifest import STEP_DIR, step_dirs

    if not path.exists():
        raise UserError(f"MODEL {path}: no such file or directory")
    if not path.is_dir():
        raise UserError(f"MODEL {path} is a file; expected a checkpoint directory, a run directory or a HF folder")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "manifest.json").is_file() or STEP_DIR.match(path.name):
        return "checkpoint", path
    if (path / "config.toml").is_file():
        from scaletrain.checkpoint.paths import find_resume_dir
        from scaletrain.config import load_config

        cfg = load_config(path / "config.toml")
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
        found = find_resume_dir(cfg, path)
        if found is None:
            raise UserError(f"MODEL {path}: run directory without a valid checkpoint")
        return "checkpoint", found
    if step_dirs(path):
        return "checkpoint", step_dirs(path)[-1][1]
    raise UserError(f"MODEL {path}: not a scaletrain checkpoint (manifest.json), a run directory (config.toml) "
                    "or a HF Llama folder (config.json + model.safetensors + tokenizer.json)")


def load_model(path: Path, dtype: str = "fp32") -> LoadedModel:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    kind, where = find_weights(path)
    loaded = _load_hf(where) if kind == "hf" else _load_checkpoint(where)
    loaded.model.to(DTYPES[dtype]).eval().requires_grad_(False)
    return loaded


def _load_checkpoint(ckpt_dir: Path) -> LoadedModel:
    from scaletrain.checkpoint.hf import load_checkpoint_model
    from scaletrain.checkpoint.hf_tokenizer import checkpoint_tokenizer

    with warnings.catch_warnings():  # DCP's "assuming ... a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        cfg, model = load_checkpoint_model(ckpt_dir)
    tokenizer = checkpoint_tokenizer(cfg)
    return LoadedModel(model, tokenizer, tokenizer.eos_id, None, ckpt_dir)


def _load_hf(folder: Path) -> LoadedModel:
    from scaletrain.checkpoint.hf import load_hf_model
    from scaletrain.data.tokenizer import HFTokenizer

    weights_path, tokenizer_path = folder / "model.safetensors", folder / "tokenizer.json"
    for needed in (weights_path, tokenizer_path):
        if not needed.is_file():
            raise UserError(f"MODEL {folder}: {needed.name} is missing (a HF Llama folder needs config.json, "
                            "model.safetensors and tokenizer.json)")
    _, model, config = load_hf_model(folder)
    tokenizer = HFTokenizer(tokenizer_path)
    tok_config = _read_json(folder / "tokenizer_config.json")
    eos_id = _eos_id(tokenizer, tok_config, config)
    return LoadedModel(model, tokenizer, eos_id, tok_config.get("chat_template"), folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _eos_id(tokenizer, tok_config: dict, config: dict) -> int | None:
    """tokenizer_config.json's eos_token, else config.json's eos_token_id, else a known EOS name."""
    eos = tok_config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and tokenizer.tokenizer.token_to_id(eos) is not None:
        return tokenizer.tokenizer.token_to_id(eos)
    eos_id = config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    return eos_id if isinstance(eos_id, int) else tokenizer.eos_id
