"""The process's place in the job: rank, world size, device, process group.

Under torchrun (or ``scaletrain train --nproc N``) the environment carries
RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address; otherwise the
process trains alone without a process group. The backend is chosen from the
device: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor forms of all-gather and reduce-scatter (the old
# names warn on every call); older torch only has the old names.
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_runtime(timeout_s: float = 1800.0) -> Runtime:
    if not under_launcher():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Runtime(0, 1, 0, device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    device_id = device if device.type == "cuda" else None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # The agents' own store is shared by all rendezvous rounds; with
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each round gets a fresh one and needs
    # no prefix (then a replacement node's agent, whose restart count is 0 while
    # the survivors' is 1, joins cleanly: README "Multi-node").
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    else:
        # After an elastic restart the agent's store still holds the previous
        # attempt's keys (gloo's peer addresses among them): a new worker could
        # dial a dead peer ("Connection refused"). Each attempt gets its own prefix.
        from torch.distributed.rendezvous import rendezvous

        store, rank, world_size = next(rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"scaletrain/attempt_{restart}/", store),
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=device_id)
    return Runtime(rank, world_size, local_rank, device)


def pin_cpu_worker(local_rank: int, local_world: int) -> None:
    """Bind the calling (training) thread of a local CPU worker to its own
    cores, within whatever affinity the process was given, as Intel's
    launcher does: otherwise the scheduler moves workers between cores and
    two can share one while another idles (short runs on 2 cores were
    steadier from launch to launch). Threads the caller starts later inherit
    the binding; call it once the process groups exist, so gloo's own threads
    stay free to run on any core (bound with the training thread, they freed
    collective buffers late: TP peaks ~3 MiB higher). Only when every worker
    gets a core; SCALETRAIN_CPU_AFFINITY=0 leaves placement to the OS."""
    global _given_cores
    if os.environ.get("SCALETRAIN_CPU_AFFINITY") == "0" or not hasattr(os, "sched_setaffinity"):
        return
    _given_cores = _given_cores or sorted(os.sched_getaffinity(0))  # a second call binds the same way
    if not 2 <= local_world <= len(_given_cores):
        return
    per = len(_given_cores) // local_world
    os.sched_setaffinity(0, _given_cores[local_rank * per:(local_rank + 1) * per])


_given_cores: list[int] = []


def bind_training_thread(runtime: Runtime) -> None:
    """pin_cpu_worker for this launcher worker, on CPU runs."""
    if runtime.distributed and runtime.device.type == "cpu":
        pin_cpu_worker(runtime.local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.destroy_process_group()


def run_local(nproc: int, argv: list[str], max_restarts: int = 0) -> None:
    """Run ``python -m scaletrain ARGV`` as ``nproc`` local workers through
    torchrun's own entry point (its elastic agent, standalone rendezvous).
    Raises torchrun's ChildFailedError when a worker fails."""
    from torch.distributed.run import get_args_parser, run

    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "scaletrain", *argv])
    run(args)


def max_local_processes() -> int:
    """Most local workers a tool may start: one per GPU, or 4 per CPU core."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(8, 4 * (os.cpu_count() or 1))
