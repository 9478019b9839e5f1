"""What a run reports about itself: the state bytes each rank holds, the
summary, text sampled from the trained weights, and the final files
(``model.safetensors``, ``summary.json``), each written whole or not at all."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from scaletrain.model import Llama, generate, param_count


def nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    optimizer = getattr(optimizer, "optim", optimizer)  # ZeRO-1 wraps the local AdamW
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def state_bytes(model, optimizer, count_grads: bool) -> dict:
    """Bytes of this rank's local parameters, gradients or optimizer states,
    counted from the tensors themselves (a DTensor counts its local shard)."""
    if count_grads:
        return {"grads_bytes": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)}
    return {"params_bytes": sum(nbytes(p) for p in model.parameters()),
            "optimizer_bytes": sum(nbytes(v) for v in optimizer_tensors(optimizer))}


def live_state_bytes(model, optimizer) -> int:
    """Bytes of the tensors alive between steps: parameters, gradients,
    buffers and optimizer states of this rank."""
    tensors = {id(t): t for part in model.parts for t in (*part.parameters(), *part.buffers())}
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    tensors.update({id(v): v for v in optimizer_tensors(optimizer)})
    total = sum(nbytes(t) for t in tensors.values())
    for part in model.parts:  # DDP's gradient buckets outlive zero_grad(set_to_none=True)
        if isinstance(part, DistributedDataParallel) and not any(p.grad is not None for p in part.parameters()):
            sizes = str(part._get_ddp_logging_data().get("bucket_sizes", ""))
            total += sum(int(size) for size in sizes.split(",") if size.strip())
    return total


def summarize(trainer, records: list[dict], elapsed: float) -> dict:
    """The run's summary from its step records (steady state: the first step
    pays for warm-up: allocations, DDP buckets)."""
    cfg = trainer.cfg
    steady = records[1:] or records
    steady_tokens = records[-1]["tokens"] - (records[0]["tokens"] if len(records) > 1 else 0)
    tokens_per_s = steady_tokens / sum(r["step_time_s"] for r in steady)
    window = min(10, len(records))
    flops_per_s_per_device = trainer.flops_per_token * tokens_per_s / trainer.runtime.world_size
    finite = [r["loss"] for r in records[-window:] if r["loss"] == r["loss"]]
    return {
        "run_dir": str(trainer.run_dir),
        "model": cfg.model.name,
        "params": param_count(cfg.model),
        "layout": {**trainer.dims.degrees(), "zero_stage": cfg.parallel.zero_stage},
        "world_size": trainer.runtime.world_size,
        "device": trainer.runtime.device.type,
        "grad_accum_steps": trainer.accum,
        "steps": trainer.step,
        "tokens": trainer.sampler.tokens_seen,
        "loss_first": records[0]["loss"],
        "loss_last": sum(finite) / len(finite) if finite else float("nan"),
        "loss_last_window": window,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens_per_s,
        "flops_per_s_per_device": flops_per_s_per_device,
        "mfu": flops_per_s_per_device / trainer.peak_flops if trainer.peak_flops else None,
        "mem_peak_bytes": max(r["mem_peak_bytes"] for r in records),
        "mem_peak_source": "cuda_allocator" if trainer.runtime.device.type == "cuda" else "process_rss",
        **validation_summary(trainer.val_history),
    }


def validation_summary(history: list[tuple[int, float]]) -> dict:
    """The last and the best validation loss, with the step of the best."""
    if not history:
        return {}
    best_step, best = min(history, key=lambda item: item[1])
    return {"val_loss": history[-1][1], "best_val_loss": best, "best_val_step": best_step}


def sample_text(trainer, state: dict[str, torch.Tensor], n_samples: int = 3, prompt_tokens: int = 24) -> list[str]:
    """Continue the openings of a few corpus sequences with the trained
    weights, loaded into a plain single-device model."""
    cfg, device = trainer.cfg, trainer.runtime.device
    n_new = cfg.logging.sample_tokens
    if n_new == 0:
        return []
    if not all(torch.isfinite(t).all() for t in state.values()):
        print("warning: the trained weights hold NaN/inf: no text sampled", file=sys.stderr)
        return []
    model = Llama(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.to(device).eval()
    step = max(1, trainer.rows.n_sequences // n_samples)
    chosen = [i * step for i in range(n_samples)]
    prompt_tokens = max(1, min(prompt_tokens, int(trainer.rows.lengths[chosen].min())))  # no padding in a prompt
    prompts = trainer.rows.batch(chosen, pad_to=trainer.cfg.data.seq_len).inputs[:, :prompt_tokens]
    out = generate(model, prompts.to(device), n_new, seed=cfg.training.seed, max_seq_len=cfg.data.seq_len)
    return [trainer.corpus.tokenizer.decode(row.tolist()) for row in out.cpu()]


def write_outputs(run_dir: Path, step: int, summary: dict, state: dict[str, torch.Tensor]) -> None:
    """model.safetensors and summary.json: each file whole or not at all (a
    failure, e.g. a full disk, leaves no half-written file)."""
    outputs = {"model.safetensors": lambda path: save_file(state, str(path), metadata={"step": str(step)}),
               "summary.json": lambda path: path.write_text(json.dumps(summary, indent=1))}
    for name, write in outputs.items():
        tmp = run_dir / f"{name}.tmp"
        try:
            write(tmp)
            os.replace(tmp, run_dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
