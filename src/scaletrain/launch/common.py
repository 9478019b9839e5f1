"""What the Slurm and Kubernetes launchers share: checking the job against
its config before anything is written, the worker environment, placements."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import Config, load_config
from scaletrain.errors import UserError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Set for GPU jobs. A failed or stuck NCCL collective raises (and torchrun
# restarts the group from the newest checkpoint) instead of hanging until the
# time limit; on a timeout each rank dumps NCCL's flight recorder, which
# `torchfrtrace` reads.
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "NCCL_DEBUG": "WARN",
}
# Logs reach the per-node files line by line, and a crash prints every thread's stack.
PYTHON_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


@dataclass
class Job:
    """The checked shape of a multi-node job."""
    cfg: Config
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    env: dict[str, str]
    hosts: list[tuple[str, list[int]]] | None  # from --placement

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise UserError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def read_placement(path: Path) -> list[tuple[str, list[int]]]:
    """Hosts and GPU ids from one job's JSON written by ``scaletrain allocate --out``."""
    try:
        data = json.loads(path.read_text())
        hosts = [(str(h), [int(g) for g in data["gpus"][h]]) for h in data["hosts"]]
    except FileNotFoundError:
        raise UserError(f"--placement {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--placement {path}: not a placement from `scaletrain allocate --out` ({exc})") from None
    if not hosts:
        raise UserError(f"--placement {path} lists no hosts")
    return hosts


def check_job(config: Path, overrides: list[str], nodes: int | None, gpus_per_node: int,
              nproc_per_node: int | None, env: list[str], max_restarts: int,
              placement: Path | None) -> Job:
    """Everything the launcher can check here, so a bad job fails before it queues."""
    from scaletrain.parallel.dims import ParallelDims
    from scaletrain.train.checks import grad_accum_steps

    cfg = load_config(config, overrides)
    hosts = read_placement(placement) if placement is not None else None
    if hosts is not None:
        if nodes is not None and nodes != len(hosts):
            raise UserError(f"--nodes {nodes} disagrees with --placement {placement} ({len(hosts)} hosts)")
        nodes = len(hosts)
        widest = max(len(g) for _, g in hosts)
        if widest > gpus_per_node:
            raise UserError(f"--placement puts {widest} GPUs on one host; --gpus-per-node is {gpus_per_node}")
    nodes = 1 if nodes is None else nodes
    if nodes < 1:
        raise UserError(f"--nodes = {nodes}; allowed: 1 or more")
    if gpus_per_node < 0:
        raise UserError(f"--gpus-per-node = {gpus_per_node}; allowed: 0 (CPU) or more")
    if max_restarts < 0:
        raise UserError(f"--max-restarts = {max_restarts}; allowed: 0 or more")
    nproc = nproc_per_node if nproc_per_node is not None else (gpus_per_node or 1)
    if nproc < 1 or (gpus_per_node and nproc > gpus_per_node):
        raise UserError(f"--nproc-per-node = {nproc}; allowed: 1 to --gpus-per-node ({gpus_per_node}), "
                        "or any number >= 1 with 0 GPUs")
    world = sum(len(g) for _, g in hosts) if hosts else nodes * nproc
    dims = ParallelDims.from_config(cfg.parallel, world)
    grad_accum_steps(cfg, dims)
    return Job(cfg, nodes, gpus_per_node, nproc, parse_env(env), hosts)


def worker_env(job: Job) -> dict[str, str]:
    base = dict(PYTHON_ENV)
    if job.gpus_per_node:
        base.update(NCCL_ENV)
    return {**base, **job.env}


def train_args(config: Path, overrides: list[str], run_dir: str) -> list[str]:
    """``scaletrain train`` arguments as every node runs them."""
    args = ["-m", "scaletrain", "train", "--config", str(config), "--run-dir", run_dir]
    for item in overrides:
        args += ["--set", item]
    return args
