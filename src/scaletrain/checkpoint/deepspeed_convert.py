"""``scaletrain checkpoint import --from deepspeed`` and ``export --to deepspeed``.

Import turns a DeepSpeed ZeRO checkpoint into a full scaletrain training
checkpoint: fp32 weights, AdamW moments and step (when DeepSpeed saved them),
the sampler position and LR schedule of its step, so ``checkpoint.resume``
continues the run. Export writes a scaletrain checkpoint as a DeepSpeed ZeRO
checkpoint for a given stage and rank count, weights and moments included.

Both sides must build AdamW's parameter groups alike: scaletrain decays
matrices and not vectors (norm weights), each group in model order; a
DeepSpeed script that does the same (tests/deepspeed_worker.py) moves freely
between the two.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from scaletrain.checkpoint.deepspeed import DeepSpeedState, read_deepspeed, write_deepspeed
from scaletrain.checkpoint.manifest import seal, verify
from scaletrain.checkpoint.paths import warn
from scaletrain.checkpoint.safe_reader import SafeReader
from scaletrain.config import Config, load_config, validate
from scaletrain.errors import UserError
from scaletrain.model import Llama

FORMAT_VERSION = 1  # scaletrain's checkpoint format (CheckpointManager writes the same)


def _groups(model: Llama, weight_decay: float) -> list[tuple[list[str], float]]:
    """scaletrain's AdamW groups (parallel.compose.build_optimizer): matrices decayed, vectors not."""
    named = list(model.named_parameters())
    return [([n for n, p in named if p.ndim >= 2], weight_decay), ([n for n, p in named if p.ndim < 2], 0.0)]


def infer_model_shape(params: dict[str, torch.Tensor], cfg: Config) -> dict:
    """The [model] keys a checkpoint's tensors fix; attention heads come from the config."""
    try:
        vocab, dim = params["embed_tokens.weight"].shape
        n_layers = 1 + max(int(n.split(".")[1]) for n in params if n.startswith("layers."))
        ffn_dim = params["layers.0.mlp.gate_proj.weight"].shape[0]
        kv_rows = params["layers.0.self_attn.k_proj.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise UserError(f"the DeepSpeed checkpoint is not a Llama model scaletrain knows (missing {exc})") from None
    head_dim = dim // cfg.model.n_heads
    return {"dim": dim, "vocab_size": vocab, "n_layers": n_layers, "ffn_dim": ffn_dim,
            "n_kv_heads": max(1, kv_rows // head_dim), "tie_embeddings": "lm_head.weight" not in params}


def _batch_from_deepspeed(ds_config: dict) -> dict:
    out = {}
    for ds_key, key in (("train_batch_size", "global_batch_size"), ("train_micro_batch_size_per_gpu",
                                                                    "micro_batch_size")):
        if isinstance(ds_config.get(ds_key), int):
            out[key] = ds_config[ds_key]
    return out


def _check_tensors(model: Llama, params: dict[str, torch.Tensor], source: Path) -> None:
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    wrong = [n for n in expected if n in params and tuple(params[n].shape) != expected[n]]
    if missing or unexpected or wrong:
        raise UserError(f"{source}: tensors do not match the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shape {wrong[:3]}); check --config's model.n_heads")


def _train_state(cfg: Config, step: int, world_size: int, source: Path) -> dict:
    """Sampler position and LR schedule after ``step`` optimizer steps, as the trainer saves them."""
    from scaletrain.train.checks import build_sampler, check_data, prepare_data
    from scaletrain.train.optim import build_scheduler

    rows, _ = check_data(cfg, *prepare_data(cfg, show_progress=False))
    sampler = build_sampler(cfg, rows)
    for _ in range(step):
        sampler.next_step()
    # The trainer's AdamW has two groups (decayed, not decayed); so does this stand-in.
    dummy = torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(2)],
                              lr=cfg.training.lr)
    scheduler = build_scheduler(dummy, cfg.training)
    for _ in range(step):
        dummy.step()
        scheduler.step()
    return {"step": step, "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
            "layout": {"pp": 1, "dp_replicate": 1, "dp_shard": world_size, "tp": 1}, "config": cfg.to_dict(),
            "imported_from": str(source)}


def import_deepspeed(ds_dir: Path, out_dir: Path, base: Config) -> tuple[Path, bool]:
    """Returns the checkpoint and whether it resumes training (weights and optimizer) or only starts it."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory")
    state = read_deepspeed(ds_dir)
    batch = _batch_from_deepspeed(state.ds_config)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, **infer_model_shape(state.params, base)),
                              training=dataclasses.replace(base.training, **batch))
    validate(cfg)
    model = Llama(cfg.model)
    _check_tensors(model, state.params, ds_dir)
    tensors = {f"model.{n}": state.params[n] for n, _ in model.named_parameters()}
    has_moments = all(n in state.moments for n, _ in model.named_parameters())
    if has_moments:
        for n, _ in model.named_parameters():
            tensors.update({f"optim.{n}.{k}": state.moments[n][k] for k in ("exp_avg", "exp_avg_sq")})
            tensors[f"optim.{n}.step"] = torch.tensor(state.optimizer_step[n], dtype=torch.float32)
    else:
        warn(f"{ds_dir} holds no Adam moments (ZeRO-0, or another optimizer): the checkpoint has weights only; "
             "start from it with checkpoint.init_from")
    train_state = (_train_state(cfg, state.step, state.world_size, ds_dir) if has_moments
                   else {"step": 0, "model_only": True, "config": cfg.to_dict(), "imported_from": str(ds_dir)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=True)
    (tmp / "config.toml").write_text(cfg.to_toml())
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
    info = {"format": FORMAT_VERSION, "step": train_state["step"], "zero_stage": state.zero_stage}
    if out_dir.exists():
        out_dir.rmdir()
    seal(tmp, out_dir, {**info, "layout": train_state.get("layout"), "model_only": not has_moments})
    return out_dir, has_moments


def _load_scaletrain(ckpt_dir: Path) -> tuple[Config, Llama, dict[str, torch.Tensor], dict]:
    """Model, every stored tensor (optimizer states included when saved), train state."""
    if (problem := verify(ckpt_dir)) is not None:
        raise UserError(f"{ckpt_dir} is not a valid checkpoint: {problem}")
    cfg = load_config(ckpt_dir / "config.toml")
    info = json.loads((ckpt_dir / "train_state.json").read_text())
    model = Llama(cfg.model)
    stored = SafeReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if f"optim.{n}.exp_avg" in stored:
            tensors.update({f"optim.{n}.exp_avg": torch.zeros_like(p), f"optim.{n}.exp_avg_sq": torch.zeros_like(p),
                            f"optim.{n}.step": torch.zeros((), dtype=torch.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=SafeReader(str(ckpt_dir)), no_dist=True)
    return cfg, model, tensors, info


def export_deepspeed(ckpt_dir: Path, out_dir: Path, zero_stage: int, world_size: int, force: bool = False,
                     bf16: bool | None = None) -> Path:
    """``bf16``: whether the DeepSpeed run trains in bf16 (it then reads ``bf16_``-named optimizer
    files); default: as the scaletrain run did."""
    if zero_stage not in (1, 2, 3):
        raise UserError(f"--zero-stage {zero_stage}; allowed: 1, 2, 3")
    if world_size < 1:
        raise UserError(f"--world-size {world_size}; allowed: 1 or more (the DeepSpeed run's data-parallel ranks)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory (or --force)")
    cfg, model, tensors, info = _load_scaletrain(ckpt_dir)
    names = [n for n, _ in model.named_parameters()]
    if info.get("model_only") or f"optim.{names[0]}.exp_avg" not in tensors:
        raise UserError(f"{ckpt_dir} holds weights only (no optimizer states); export it with --to hf instead")
    t = cfg.training
    # For the record (DeepSpeed runs with its own config): the batch this checkpoint was trained with.
    bf16 = t.dtype == "bf16" if bf16 is None else bf16
    ds_config = {"train_batch_size": t.global_batch_size, "gradient_clipping": t.grad_clip,
                 "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16}}
    state = DeepSpeedState(
        step=int(info["step"]), zero_stage=zero_stage, world_size=world_size,
        params={n: tensors[f"model.{n}"] for n in names},
        moments={n: {k: tensors[f"optim.{n}.{k}"] for k in ("exp_avg", "exp_avg_sq")} for n in names},
        optimizer_step={n: float(tensors[f"optim.{n}.step"]) for n in names}, ds_config=ds_config)
    # The LR the DeepSpeed side resumes with is its own scheduler's; record scaletrain's current one.
    from scaletrain.train.optim import lr_at

    hyper = {"lr": lr_at(state.step, t), "betas": (t.beta1, t.beta2), "eps": 1e-8}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_deepspeed(out_dir, state, _groups(model, t.weight_decay), hyper, shapes, bf16)
    return out_dir
