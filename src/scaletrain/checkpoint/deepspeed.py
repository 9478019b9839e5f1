"""DeepSpeed checkpoints: read ZeRO-1/2/3 (and ZeRO-0 weights), write ZeRO-1/2/3.

A DeepSpeed checkpoint folder holds ``latest`` (the tag) and ``<tag>/`` with
``mp_rank_00_model_states.pt`` (ZeRO-0/1/2) or one
``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank (ZeRO-3): the module,
``param_shapes`` (one ordered name -> shape map per optimizer group),
``global_steps``, ``dp_world_size``; and per data-parallel rank R
``zero_pp_rank_R_mp_rank_00_optim_states.pt`` with that rank's fp32 master
weights and Adam moments as flat partitions:

- ZeRO-1/2: each group's parameters are concatenated, padded to a multiple of
  the rank count, and split into equal contiguous partitions
  (``single_partition_of_fp32_groups``; moments in ``base_optimizer_state``).
- ZeRO-3: every parameter is split on its own into ceil(numel / ranks)
  pieces; a rank's flat group is its piece of each parameter in order
  (``fp32_flat_groups``).

Reading consolidates the fp32 masters as DeepSpeed's ``zero_to_fp32`` does
(and the moments the same way). Files are loaded with
``torch.load(weights_only=True)``: the three DeepSpeed classes its pickles
name (the ZeRO stage enum, the loss scaler, a fragment address) resolve to
inert stand-ins here, so nothing else can be unpickled and DeepSpeed need not
be installed.
"""

from __future__ import annotations

import enum
import math
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scaletrain.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


class _ZeroStage(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _Opaque:
    """Stands in for a DeepSpeed class whose instances only carry attributes."""


_SAFE_GLOBALS = [(_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
                 (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
                 (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
                 (_Opaque, "deepspeed.utils.tensor_fragment.fragment_address")]


@dataclass
class DeepSpeedState:
    """A DeepSpeed checkpoint in layout-free form (scaletrain parameter names)."""
    step: int
    zero_stage: int
    world_size: int
    params: dict[str, torch.Tensor]                       # fp32 masters
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> exp_avg, exp_avg_sq
    optimizer_step: dict[str, float] = field(default_factory=dict)             # name -> Adam step
    ds_config: dict = field(default_factory=dict)


def load_pt(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing (incomplete DeepSpeed checkpoint)")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} cannot be read (truncated or corrupted?): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # the restricted unpickler refusing a global names it
        raise UserError(f"{path} holds objects scaletrain does not load: {str(exc).splitlines()[0][:200]}") from None


def checkpoint_folder(ds_dir: Path) -> Path:
    """``DIR/<tag from DIR/latest>``, or DIR itself when it holds the model states."""
    if not ds_dir.is_dir():
        raise UserError(f"{ds_dir} is not a directory")
    if (ds_dir / MODEL_STATES).is_file() or (ds_dir / ZERO3_MODEL_STATES.format(0)).is_file():
        return ds_dir
    latest = ds_dir / "latest"
    if not latest.is_file():
        raise UserError(f"{ds_dir} is not a DeepSpeed checkpoint: no 'latest' file and no {MODEL_STATES}")
    folder = ds_dir / latest.read_text().strip()
    if not folder.is_dir():
        raise UserError(f"{latest} names {folder.name!r}, which does not exist")
    return folder


def canonical(name: str) -> str:
    """DeepSpeed module names -> scaletrain's (HF Llama names lose ``model.``)."""
    name = name.removeprefix("module.")
    return name if name == "lm_head.weight" else name.removeprefix("model.")


def read_deepspeed(ds_dir: Path) -> DeepSpeedState:
    folder = checkpoint_folder(ds_dir)
    if any(folder.glob("layer_*-model_states.pt")) or any(folder.glob("mp_rank_0[1-9]*")):
        raise UserError(f"{folder}: pipeline- or tensor-parallel DeepSpeed checkpoints are not supported; "
                        "convert it with DeepSpeed's ds_to_universal first")
    zero3 = (folder / ZERO3_MODEL_STATES.format(0)).is_file()
    model_states = load_pt(folder / (ZERO3_MODEL_STATES.format(0) if zero3 else MODEL_STATES))
    world = int(model_states.get("dp_world_size", 1))
    shapes = model_states.get("param_shapes")
    # With bf16, DeepSpeed names the files bf16_zero_pp_rank_*.
    prefix = "bf16_" if (folder / ("bf16_" + OPTIM_STATES.format(0))).is_file() else ""
    optim_files = [folder / (prefix + OPTIM_STATES.format(r)) for r in range(world)]
    if not zero3 and not optim_files[0].is_file():
        return _zero0(model_states)
    if not shapes:
        raise UserError(f"{folder}: the model states lack param_shapes; not a ZeRO checkpoint scaletrain reads")
    ranks = [load_pt(path).get("optimizer_state_dict") or {} for path in optim_files]
    ds_config = dict(model_states.get("ds_config") or {})
    # DeepSpeed's bf16 optimizer (ZeRO-1 with bf16) does not record the stage; its layout is ZeRO-1's.
    stage = int(ranks[0].get("zero_stage", 3 if "fp32_flat_groups" in ranks[0] else
                             (ds_config.get("zero_optimization") or {}).get("stage", 1)))
    state = DeepSpeedState(step=int(model_states.get("global_steps", 0)), zero_stage=stage, world_size=world,
                           params={}, ds_config=ds_config)
    groups = shapes if isinstance(shapes, list) else [shapes]
    try:
        (_read_zero3 if stage == 3 else _read_zero12)(folder, groups, ranks, state)
    except (KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{folder}: not a ZeRO-{stage} layout scaletrain reads (no {exc} in the optimizer "
                        "states)") from None
    return state


def _zero0(model_states: dict) -> DeepSpeedState:
    params = {canonical(k): v.float() for k, v in model_states["module"].items() if torch.is_tensor(v)}
    return DeepSpeedState(step=int(model_states.get("global_steps", 0)), zero_stage=0,
                          world_size=int(model_states.get("dp_world_size", 1)), params=params,
                          ds_config=dict(model_states.get("ds_config") or {}))


def _split(flat: torch.Tensor, shapes: "OrderedDict[str, torch.Size]", where: str) -> dict[str, torch.Tensor]:
    total = sum(math.prod(s) for s in shapes.values())
    if flat.numel() < total:
        raise UserError(f"{where}: the partitions hold {flat.numel()} values, the parameters need {total} "
                        "(truncated or from another model)")
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        out[canonical(name)] = flat[offset:offset + numel].view(shape).clone()
        offset += numel
    return out


def _read_zero12(folder: Path, groups: list, ranks: list[dict], state: DeepSpeedState) -> None:
    """Concatenate the ranks' contiguous partitions of each group, then cut it into parameters."""
    for g, shapes in enumerate(groups):
        where = f"{folder} group {g}"
        flat = torch.cat([r["single_partition_of_fp32_groups"][g] for r in ranks])
        state.params.update(_split(flat, shapes, where))
        group_state = [r["base_optimizer_state"]["state"].get(g, {}) for r in ranks]
        if all(key in group_state[0] for key in MOMENTS):
            for key in MOMENTS:
                for name, tensor in _split(torch.cat([s[key] for s in group_state]), shapes, where).items():
                    state.moments.setdefault(name, {})[key] = tensor
            for name in shapes:
                state.optimizer_step[canonical(name)] = float(group_state[0]["step"])


def _read_zero3(folder: Path, groups: list, ranks: list[dict], state: DeepSpeedState) -> None:
    """Every parameter is split across the ranks on its own: gather its pieces."""
    world = len(ranks)
    shapes = OrderedDict((name, shape) for group in groups for name, shape in group.items())
    sub_groups = sorted(ranks[0]["optimizer_state_dict"]["state"])
    flats = {"param": [torch.cat(list(r["fp32_flat_groups"])) for r in ranks]}
    if sub_groups and all(key in ranks[0]["optimizer_state_dict"]["state"][sub_groups[0]] for key in MOMENTS):
        for key in MOMENTS:
            flats[key] = [torch.cat([r["optimizer_state_dict"]["state"][i][key] for i in sub_groups]) for r in ranks]
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / world)
        if offset + piece > flats["param"][0].numel():
            raise UserError(f"{folder}: the ZeRO-3 partitions end before {name} (truncated or another model)")
        for kind, per_rank in flats.items():
            whole = torch.cat([flat[offset:offset + piece] for flat in per_rank])[:numel].view(shape).clone()
            if kind == "param":
                state.params[canonical(name)] = whole
            else:
                state.moments.setdefault(canonical(name), {})[kind] = whole
        offset += piece
    if "exp_avg" in flats:
        step = float(ranks[0]["optimizer_state_dict"]["state"][sub_groups[0]]["step"])
        state.optimizer_step = {canonical(name): step for name in shapes}



# -- writing ---------------------------------------------------------------------

# The on-disk layout written below is DeepSpeed 0.19's (checked by loading it with DeepSpeed).
DS_FORMAT_VERSION = "0.19.8"


def _adam_group(hyper: dict, weight_decay: float, index: int) -> dict:
    return {"lr": hyper["lr"], "betas": tuple(hyper["betas"]), "eps": hyper["eps"], "weight_decay": weight_decay,
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": None, "decoupled_weight_decay": True, "params": [index]}


def _flat(names: list[str], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].detach().reshape(-1).float() for n in names])


def _zero12_partitions(flat: torch.Tensor, world: int) -> tuple[list[torch.Tensor], list[int]]:
    """DeepSpeed pads a group to a multiple of 2 x ranks, then cuts equal contiguous pieces."""
    numel, alignment = flat.numel(), 2 * world
    padded = math.ceil(numel / alignment) * alignment
    flat = torch.cat([flat, flat.new_zeros(padded - numel)])
    size = padded // world
    pieces = [flat[r * size:(r + 1) * size].clone() for r in range(world)]
    paddings = [max(0, (r + 1) * size - max(numel, r * size)) for r in range(world)]  # zeros in rank r's piece
    return pieces, paddings


def _zero3_partitions(names: list[str], tensors: dict[str, torch.Tensor], world: int) -> list[torch.Tensor]:
    """Each parameter cut into ceil(numel / ranks) pieces (the last padded); rank r's flat is its pieces."""
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for name in names:
        values = tensors[name].detach().reshape(-1).float()
        piece = math.ceil(values.numel() / world)
        values = torch.cat([values, values.new_zeros(piece * world - values.numel())])
        for r in range(world):
            per_rank[r].append(values[r * piece:(r + 1) * piece])
    return [torch.cat(pieces).clone() for pieces in per_rank]


def write_deepspeed(out_dir: Path, state: DeepSpeedState, groups: list[tuple[list[str], float]], hyper: dict,
                    shapes: dict[str, torch.Size], bf16: bool = False) -> Path:
    """A ZeRO-``state.zero_stage`` checkpoint for ``state.world_size`` ranks under
    ``out_dir/global_step<step>``. ``groups``: (parameter names, weight decay)
    in the order the DeepSpeed run builds its optimizer groups; ``hyper``: lr, betas, eps."""
    tag = f"global_step{state.step}"
    folder = out_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    world, stage = state.world_size, state.zero_stage
    param_shapes = [OrderedDict((n, torch.Size(shapes[n])) for n in names) for names, _ in groups]
    common = {"buffer_names": [], "optimizer": None, "param_shapes": param_shapes,
              "frozen_param_shapes": OrderedDict(), "shared_params": {}, "frozen_param_fragments": OrderedDict(),
              "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
              "global_steps": state.step, "global_samples": state.step * int(state.ds_config["train_batch_size"]),
              "dp_world_size": world, "mp_world_size": 1,
              "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
              "ds_config": state.ds_config, "ds_version": DS_FORMAT_VERSION}
    order = [n for names, _ in groups for n in names]
    if stage == 3:
        # The module holds empty placeholders: ZeRO-3 parameters live in the partitions.
        module = OrderedDict((n, torch.empty(0)) for n in order)
        for r in range(world):
            torch.save({"module": module, **common}, folder / ZERO3_MODEL_STATES.format(r))
    else:
        module = OrderedDict((n, state.params[n].detach().clone()) for n in order)
        torch.save({"module": module, **common}, folder / MODEL_STATES)
    prefix = "bf16_" if bf16 else ""  # the name a bf16 DeepSpeed run looks for
    for r, rank_state in enumerate(_optim_states(state, groups, hyper)):
        torch.save({"optimizer_state_dict": rank_state, "ds_config": state.ds_config,
                    "ds_version": DS_FORMAT_VERSION}, folder / (prefix + OPTIM_STATES.format(r)))
    (out_dir / "latest").write_text(tag)
    return folder


def _optim_states(state: DeepSpeedState, groups: list[tuple[list[str], float]], hyper: dict) -> list[dict]:
    world = state.world_size
    kinds = {"param": state.params, **{k: {n: m[k] for n, m in state.moments.items()} for k in MOMENTS}}
    parts: dict[str, list[list[torch.Tensor]]] = {k: [] for k in kinds}  # kind -> group -> rank piece
    paddings = []
    for names, _ in groups:
        for kind, tensors in kinds.items():
            if state.zero_stage == 3:
                parts[kind].append(_zero3_partitions(names, tensors, world))
            else:
                pieces, pads = _zero12_partitions(_flat(names, tensors), world)
                parts[kind].append(pieces)
                if kind == "param":
                    paddings.append(pads)
    out = []
    for r in range(world):
        base = {"state": {g: {"step": torch.tensor(state.optimizer_step[names[0]]),
                              **{k: parts[k][g][r] for k in MOMENTS}} for g, (names, _) in enumerate(groups)},
                "param_groups": [_adam_group(hyper, wd, g) for g, (_, wd) in enumerate(groups)]}
        common = {"zero_stage": state.zero_stage, "dynamic_loss_scale": False, "overflow": False,
                  "partition_count": world if state.zero_stage == 3 else [world] * len(groups)}
        if state.zero_stage == 3:
            out.append({**common, "loss_scaler": _static_loss_scaler(), "optimizer_state_dict": base,
                        "fp32_flat_groups": [parts["param"][g][r] for g in range(len(groups))]})
        else:
            out.append({**common, "clip_grad": float(state.ds_config.get("gradient_clipping", 0.0)),
                        "base_optimizer_state": base,
                        "single_partition_of_fp32_groups": [parts["param"][g][r] for g in range(len(groups))],
                        "group_paddings": [paddings[g][r] for g in range(len(groups))],
                        "param_alignment_paddings": [[0] * len(names) for names, _ in groups],
                        "ds_version": DS_FORMAT_VERSION})
    return out


def _static_loss_scaler():
    """ZeRO-3's loader takes its loss scaler object from the checkpoint (ZeRO-1/2 keep their own), so
    writing one needs DeepSpeed's class: a static scale of 1, right for fp32 and bf16 training."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
    except ImportError:
        raise UserError("--zero-stage 3 needs DeepSpeed installed here (its checkpoint holds a DeepSpeed "
                        "LossScaler object); ZeRO-1/2 checkpoints are written without it") from None
    return LossScaler(scale=1.0)
