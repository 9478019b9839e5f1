"""Tensor-parallel serving: ``--tp N`` runs N processes, each holding its
Megatron-style shard of the model (the training plan,
parallel/tensor_parallel.py, applied with DTensor over a gloo/NCCL mesh) and
of the KV cache (its own KV heads). Rank 0 runs the HTTP server and the
scheduler; every step it broadcasts the step's batch, and all ranks run the
same forward, whose collectives come from the DTensor-parallel layers.

Failure: rank 0 watches its workers; one that exits takes the server down
with exit 1 and a line naming it. Workers die with rank 0 (PR_SET_PDEATHSIG),
so no worker outlives the server.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

IDLE_TIMEOUT = timedelta(days=30)  # workers wait in a broadcast while the server is idle
STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(model, mesh) -> None:
    from scaletrain.parallel.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(model, mesh, sequence_parallel=False)


def _init(rank: int, world: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))


class Workers:
    """Rank 0's handle on ranks 1..N-1."""

    def __init__(self, procs: list[subprocess.Popen], mesh):
        self.procs, self.mesh = procs, mesh
        self._stopping = False

    @classmethod
    def start(cls, opts) -> "Workers":
        port = _free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if opts.threads:
            env["OMP_NUM_THREADS"] = str(opts.threads)
        spec = json.dumps({**asdict(opts), "port": port})
        procs = [subprocess.Popen([sys.executable, "-m", "scaletrain.serve.tp", str(rank), str(opts.tp), spec],
                                  env=env) for rank in range(1, opts.tp)]
        workers = cls(procs, None)
        try:
            workers.mesh = _init(0, opts.tp, port)
        except Exception:
            workers.kill()
            raise
        return workers

    def executor(self, model, cache, rows):
        from scaletrain.serve.runner import forward

        def execute(batch):
            dist.broadcast_object_list([batch], src=0)
            return forward(model, cache, batch, rows)

        return execute

    def failure(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.returncode}"
        return None

    def watch(self, on_fatal) -> None:
        def loop():
            while not self._stopping:
                if (reason := self.failure()) is not None and not self._stopping:
                    on_fatal(RuntimeError(reason))
                time.sleep(0.2)

        threading.Thread(target=loop, name="scaletrain-tp-watch", daemon=True).start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        try:
            dist.broadcast_object_list([None], src=0)
        except Exception:  # noqa: BLE001 - a worker already gone; kill below
            pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        dist.destroy_process_group()

    def kill(self) -> None:
        self._stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the failed collective ends the worker instead
        pass


def worker_main(rank: int, world: int, spec: dict) -> int:
    """Ranks 1..N-1: load, shard, then run every forward rank 0 broadcasts until it sends None."""
    from pathlib import Path

    from scaletrain.serve.loader import load_model
    from scaletrain.serve.runner import forward
    from scaletrain.serve.server import ServeOptions, build_engine

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; rank 0 decides
    port = spec.pop("port")
    opts = ServeOptions(**spec)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    mesh = _init(rank, world, port)
    loaded = load_model(Path(opts.model), opts.dtype)
    shard(loaded.model, mesh)
    engine = build_engine(opts, loaded, tp=world, rows=opts.attention == "rows")
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        forward(loaded.model, engine.cache, message[0], engine.rows)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])))
