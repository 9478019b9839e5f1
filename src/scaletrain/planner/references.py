"""Published runs as a regression table (references.toml): the planner's
predictions set against them, and the fit of the per-device efficiency
parameters on the entries marked ``fit`` (the rest are held out).

Honesty rules: no constant per entry; two parameters per device, each
fitted by a grid search on the fit entries only: ``matmul_efficiency``
(which attention shares unless a device sets its own) minimizing the
squared log error of tokens/s per GPU, and ``allocator_fragmentation``
minimizing that of peak memory; the held-out entries report how far that
carries. Published memory is PyTorch's max reserved (torchtitan logs it),
which holds no CUDA context or NCCL buffers: it is compared with the
prediction less ``overhead_gib``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import ModelConfig
from scaletrain.parallel import rules
from scaletrain.planner.estimate import estimate
from scaletrain.planner.hardware import GIB, Cluster, Device, load_catalog
from scaletrain.planner.layout import Layout, Workload

REFERENCES = Path(__file__).with_name("references.toml")
LAYOUT_KEYS = ("dp_replicate", "dp_shard", "zero_stage", "tp", "pp", "pp_schedule", "virtual_stages",
               "pp_microbatches", "micro_batch", "activation_checkpointing", "sequence_parallel", "cpu_offload")
EFFICIENCY_GRID = [round(0.20 + 0.005 * i, 3) for i in range(141)]  # 0.20 .. 0.90
FRAGMENTATION_GRID = [round(0.01 * i, 2) for i in range(31)]  # 0 .. 0.30


@dataclass(frozen=True)
class Run:
    id: str
    source: str
    workload: Workload
    layout: Layout
    gpu: str
    gpus: int
    gpus_per_node: int
    tokens_per_s_per_gpu: float
    memory_gib: float | None
    fit: bool


@functools.lru_cache(maxsize=2)
def load_references(path: Path = REFERENCES) -> tuple[tuple[Run, ...], tuple[dict, ...]]:
    data = tomllib.loads(path.read_text())
    models = {name: ModelConfig(name=name, **shape) for name, shape in data["models"].items()}
    runs = []
    for r in data["runs"]:
        layout = Layout(**{k: r[k] for k in LAYOUT_KEYS if k in r})
        workload = Workload(models[r["model"]], r["seq_len"], r["global_batch"], r.get("dtype", "bf16"))
        runs.append(Run(r["id"], r["source"], workload, layout, r["gpu"], r["gpus"], r.get("gpus_per_node", 8),
                        r["tokens_per_s_per_gpu"], r.get("memory_gib"), r.get("fit", False)))
    return tuple(runs), tuple(data.get("zero", ()))


def predict(run: Run, device: Device) -> tuple[float, float]:
    """(tokens/s per GPU, peak GiB per GPU) the planner predicts for a run."""
    cluster = Cluster(((device, run.gpus),), min(run.gpus_per_node, run.gpus))
    est = estimate(run.workload, run.layout, cluster)
    return est.tokens_per_s / run.gpus, (est.total_bytes - est.memory["overhead"]) / GIB


def fit_parameter(runs: list[Run], device: Device, name: str, grid: list[float], index: int) -> float:
    """The value of Device.``name`` on ``grid`` minimizing the squared log
    error of prediction ``index`` (0 tokens/s per GPU, 1 memory) over ``runs``."""
    def loss(value: float) -> float:
        dev = dataclasses.replace(device, **{name: value})
        published = ("tokens_per_s_per_gpu", "memory_gib")[index]
        return sum(math.log(predict(r, dev)[index] / getattr(r, published)) ** 2 for r in runs)

    return min(grid, key=loss)


def fitted(catalog: dict[str, Device] | None = None) -> dict[str, dict[str, float]]:
    """Per device with fit entries: the parameters the fit finds."""
    catalog = catalog or load_catalog()
    runs, _ = load_references()
    out = {}
    for gpu in sorted({r.gpu for r in runs if r.fit}):
        mine = [r for r in runs if r.fit and r.gpu == gpu]
        out[gpu] = {"matmul_efficiency": fit_parameter(mine, catalog[gpu], "matmul_efficiency", EFFICIENCY_GRID, 0)}
        with_memory = [r for r in mine if r.memory_gib]
        if with_memory:
            out[gpu]["allocator_fragmentation"] = fit_parameter(with_memory, catalog[gpu], "allocator_fragmentation",
                                                                FRAGMENTATION_GRID, 1)
    return out


def report(catalog: dict[str, Device] | None = None) -> list[dict]:
    """Every run: published vs predicted with the catalog's parameters."""
    catalog = catalog or load_catalog()
    runs, _ = load_references()
    rows = []
    for r in runs:
        tps, mem = predict(r, catalog[r.gpu])
        rows.append({"id": r.id, "source": r.source, "gpu": r.gpu, "gpus": r.gpus, "layout": r.layout.describe(),
                     "micro_batch": r.layout.micro_batch, "ac": r.layout.activation_checkpointing,
                     "seq_len": r.workload.seq_len, "held_out": not r.fit,
                     "published_tokens_per_s_per_gpu": r.tokens_per_s_per_gpu,
                     "predicted_tokens_per_s_per_gpu": tps, "throughput_error": tps / r.tokens_per_s_per_gpu - 1,
                     "published_memory_gib": r.memory_gib, "predicted_memory_gib": mem,
                     "memory_error": mem / r.memory_gib - 1 if r.memory_gib else None})
    return rows


def zero_rows(zero: tuple[dict, ...]) -> list[dict]:
    """The ZeRO paper's model-state figure against the planner's own
    per-parameter bytes: 16 per parameter (fp32 master weights 4, fp32
    gradients 4, Adam moments 8) as the paper's 2 + 2 + K = 12, sharded as
    each stage shards them."""
    per_param = rules.MASTER_BYTES * 2 + rules.ADAM_STATE_BYTES  # = 2 + 2 + 12 of the paper
    rows = []
    for z in zero:
        psi, n = z["psi"], z["gpus"]
        for stage, published in enumerate(z["gb_per_gpu"]):
            # The paper's split: 16-bit parameters and gradients (2 + 2) and K = 12 of optimizer states.
            p, g, o = 2 * psi, 2 * psi, (per_param - 4) * psi
            held = {0: p + g + o, 1: p + g + o / n, 2: p + (g + o) / n, 3: (p + g + o) / n}[stage]
            rows.append({"stage": stage, "published_gb": published, "predicted_gb": held / 1e9,
                         "error": held / 1e9 / published - 1})
    return rows


def held_out_error() -> float:
    """The largest held-out throughput error: the prediction's stated uncertainty."""
    return max(abs(r["throughput_error"]) for r in report() if r["held_out"])
