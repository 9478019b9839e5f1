"""What a checkpoint holds, as flat dicts of tensors keyed by layout-free names.

Model parameters are keyed ``model.<name>`` and AdamW states
``optim.<name>.<exp_avg|exp_avg_sq|step>``, with the single-model parameter
names, whatever wraps or shards them. DCP stores each DTensor as its global
tensor's pieces, so a checkpoint written under one layout (ZeRO-3 on 2 ranks,
TP x PP, ...) loads under any other: each rank asks for the pieces its own
shards need. ZeRO-1 ranks save and load the full states of the parameters
they own. Nothing is pickled: tensors go through DCP, the rest is JSON.
"""

from __future__ import annotations

import torch

from scaletrain.parallel import ParallelModel, canonical_name


def _named_parameters(model: ParallelModel):
    for part in model.parts:
        for name, param in part.named_parameters():
            yield canonical_name(name), param


def model_state(model: ParallelModel) -> dict[str, torch.Tensor]:
    """Views of this rank's parameters (loading into them is in place)."""
    return {f"model.{name}": param.detach() for name, param in _named_parameters(model)}


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the rank's AdamW


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's lazily-built state (zeros) so a checkpoint can load into it."""
    inner = _inner(optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            if not inner.state.get(param):
                inner.state[param] = {
                    # fused/capturable AdamW keep 'step' on the parameter's device
                    "step": torch.zeros((), dtype=torch.float32, device=param.device),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def optimizer_state(model: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(param): name for name, param in _named_parameters(model)}
    inner = _inner(optimizer)
    return {f"optim.{names[id(param)]}.{key}": value
            for param, state in inner.state.items() for key, value in state.items() if torch.is_tensor(value)}


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    state = {f"rng.cpu.rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"rng.cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], rank: int) -> None:
    if (cpu := state.get(f"rng.cpu.rank{rank}")) is not None:
        torch.set_rng_state(cpu)
    if (cuda := state.get(f"rng.cuda.rank{rank}")) is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
