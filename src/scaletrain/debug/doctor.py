"""``scaletrain doctor``: check the environment of a (distributed) job.

Every check returns PASS / WARN / FAIL with a one-line detail and the fix.
Under torchrun (or ``--nproc N``) every rank runs the local checks, the
results are gathered on rank 0, and versions are compared across ranks.
Every remote step has a timeout, so the doctor itself never hangs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

CHECKS = ("versions", "devices", "shm", "disk", "rendezvous", "env", "gpu_health", "all_reduce", "links")

# (variable, predicate(value, context) -> problem or None)
_DEPRECATED = {
    "NCCL_ASYNC_ERROR_HANDLING": "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_BLOCKING_WAIT": "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_DESYNC_DEBUG": "TORCH_NCCL_DESYNC_DEBUG",
    "NCCL_ENABLE_TIMING": "TORCH_NCCL_ENABLE_TIMING",
}


def _result(name: str, status: str, detail: str, fix: str = "") -> dict:
    return {"name": name, "status": status, "detail": detail, "fix": fix}


def check_versions() -> dict:
    cuda = torch.version.cuda or "none"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none"
    return _result("versions", "PASS", f"torch {torch.__version__}, CUDA {cuda}, NCCL {nccl}")


def check_devices() -> dict:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        return _result("devices", "WARN", f"no CUDA device visible; {per_node} process(es) per node will use the "
                       "CPU with gloo", "install a CUDA build of torch and check CUDA_VISIBLE_DEVICES / nvidia-smi")
    n = torch.cuda.device_count()
    if n < per_node:
        return _result("devices", "FAIL", f"{n} visible GPU(s) for {per_node} processes per node",
                       "start one process per GPU (--nproc-per-node) or fix CUDA_VISIBLE_DEVICES")
    return _result("devices", "PASS", f"{n} visible GPU(s) for {per_node} process(es) per node")


def check_shm() -> dict:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return _result("shm", "WARN", "/dev/shm does not exist", "NCCL and data loader workers use shared memory")
    size = st.f_blocks * st.f_frsize / 2**30
    if size < 1:
        return _result("shm", "WARN", f"/dev/shm is {size:.2f} GiB (Docker's default is 64 MiB)",
                       "run the container with --shm-size=16g or --ipc=host")
    return _result("shm", "PASS", f"/dev/shm is {size:.1f} GiB")


def check_disk(directory: Path) -> dict:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    writable = os.access(probe, os.W_OK)
    if not writable:
        return _result("disk", "FAIL", f"{probe} is not writable", "point checkpoint.dir / --run-dir elsewhere")
    if free < 1:
        return _result("disk", "FAIL", f"{free:.2f} GiB free in {probe}", "free space or move checkpoint.dir")
    if free < 20:
        return _result("disk", "WARN", f"{free:.1f} GiB free in {probe}: a few large checkpoints will fill it",
                       "free space, lower checkpoint.keep_last or move checkpoint.dir")
    return _result("disk", "PASS", f"{free:.0f} GiB free in {probe}")


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_rendezvous(master: str | None) -> dict:
    if master:
        host, _, port = master.rpartition(":")
        ok = reachable(host, int(port))
        return _result("rendezvous", "PASS" if ok else "FAIL", f"{master} {'reachable' if ok else 'unreachable'}",
                       "" if ok else "check MASTER_ADDR/MASTER_PORT, firewalls and that rank 0 is up")
    if "MASTER_ADDR" in os.environ:
        addr = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}"
        return _result("rendezvous", "PASS", f"joined the group at {addr}")
    return _result("rendezvous", "PASS", "single process: no rendezvous (use --nproc N or torchrun to check one)")


def _interfaces() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


def lint_env(env: dict[str, str] | None = None) -> dict:
    """Known pitfalls in NCCL_* / TORCH_* / CUDA_VISIBLE_DEVICES."""
    env = dict(os.environ if env is None else env)
    problems = []
    for old, new in _DEPRECATED.items():
        if old in env:
            problems.append(f"{old} is deprecated: use {new}")
    if env.get("NCCL_DEBUG", "").upper() == "TRACE":
        problems.append("NCCL_DEBUG=TRACE logs every call and slows training: use INFO or WARN")
    if env.get("NCCL_P2P_DISABLE") == "1" and _has_nvlink():
        problems.append("NCCL_P2P_DISABLE=1 while NVLink is present: intra-node traffic falls back to host memory")
    if env.get("NCCL_IB_DISABLE") == "1" and Path("/sys/class/infiniband").exists() and any(
            Path("/sys/class/infiniband").iterdir()):
        problems.append("NCCL_IB_DISABLE=1 while InfiniBand devices exist: inter-node traffic uses TCP sockets")
    ifname = env.get("NCCL_SOCKET_IFNAME") or env.get("GLOO_SOCKET_IFNAME")
    if ifname and not ifname.startswith(("^", "=")):
        known = _interfaces()
        wanted = [i for i in ifname.split(",") if i]
        if known and not any(any(k.startswith(w) for k in known) for w in wanted):
            problems.append(f"socket interface {ifname!r} does not exist here (have: {', '.join(sorted(known))})")
    if env.get("TORCH_NCCL_BLOCKING_WAIT") == "1":
        problems.append("TORCH_NCCL_BLOCKING_WAIT=1 makes every collective block the CPU; prefer the async error "
                        "handling default")
    if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":
        problems.append("TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a failed collective hangs instead of aborting")
    if "CUDA_VISIBLE_DEVICES" in env and env["CUDA_VISIBLE_DEVICES"].strip() == "":
        problems.append("CUDA_VISIBLE_DEVICES is set but empty: no GPU is visible")
    if env.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL":
        problems.append("TORCH_DISTRIBUTED_DEBUG=DETAIL checks every collective (slow): for debugging runs only")
    if problems:
        return _result("env", "WARN", "; ".join(problems), "fix or unset the variables named")
    named = sorted(k for k in env if k.startswith(("NCCL_", "TORCH_NCCL", "TORCH_DISTRIBUTED", "GLOO_")))
    return _result("env", "PASS", f"no known pitfalls ({', '.join(named) or 'no NCCL/TORCH distributed variables set'})")


def _has_nvlink() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "nvlink", "-s"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GB/s" in out


def check_gpu_health() -> dict:
    smi = shutil.which("nvidia-smi")
    if not torch.cuda.is_available() or not smi:
        return _result("gpu_health", "PASS", "no NVIDIA GPU / nvidia-smi here: nothing to check")
    query = "index,temperature.gpu,clocks_throttle_reasons.active,ecc.errors.uncorrected.volatile.total"
    try:
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _result("gpu_health", "WARN", f"nvidia-smi did not answer: {exc}", "check the driver")
    problems = []
    for line in out.strip().splitlines():
        idx, temp, throttle, ecc = [x.strip() for x in line.split(",")]
        if temp.isdigit() and int(temp) >= 85:
            problems.append(f"GPU {idx} at {temp} C")
        if throttle not in ("0x0000000000000000", "0x0000000000000001", "[N/A]", "N/A"):
            problems.append(f"GPU {idx} throttling (reasons {throttle})")
        if ecc.isdigit() and int(ecc) > 0:
            problems.append(f"GPU {idx} has {ecc} uncorrected ECC errors")
    if problems:
        return _result("gpu_health", "WARN", "; ".join(problems), "check cooling / power; drain GPUs with ECC errors")
    return _result("gpu_health", "PASS", f"{len(out.strip().splitlines())} GPU(s): temperature, clocks and ECC ok")


def check_all_reduce(device: torch.device) -> dict:
    """sum over ranks of (rank + 1) on every rank, on the job's backend."""
    n, rank = dist.get_world_size(), dist.get_rank()
    t = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(t)
    expected = n * (n + 1) / 2
    ok = bool(torch.all(t == expected))
    return _result("all_reduce", "PASS" if ok else "FAIL",
                   f"{dist.get_backend()} all-reduce over {n} rank(s): {'correct' if ok else f'wrong {t[0].item()}'}",
                   "" if ok else "a rank computes wrong sums: bad GPU or interconnect; run scaletrain bench comm")


def check_links(device: torch.device) -> dict:
    """Intra- vs inter-node point-to-point bandwidth; names a slow link (debug.links)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _result("links", "PASS", "single process: no links to measure")
    from scaletrain.debug.links import measure_links, summarize_links

    rows = measure_links(device)
    return {**_result("links", *summarize_links(rows)), "links": rows}


def run_checks(names: list[str], directory: Path, master: str | None, device: torch.device) -> list[dict]:
    checks = {"versions": check_versions, "devices": check_devices, "shm": check_shm,
              "disk": lambda: check_disk(directory), "rendezvous": lambda: check_rendezvous(master),
              "env": lint_env, "gpu_health": check_gpu_health, "all_reduce": lambda: check_all_reduce(device),
              "links": lambda: check_links(device)}
    return [checks[name]() for name in names]


def single_process_group(timeout_s: float = 30) -> None:
    """A one-rank gloo group, so the collective check runs without torchrun."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One row per check: the worst status over the ranks, naming the ranks that differ."""
    order = {"PASS": 0, "WARN": 1, "FAIL": 2}
    merged = []
    for i, first in enumerate(per_rank[0]):
        rows = [ranks[i] for ranks in per_rank]
        worst = max(rows, key=lambda r: order[r["status"]])
        row = dict(worst)
        if first["name"] == "versions":
            versions = {r["detail"] for r in rows}
            if len(versions) > 1:
                by = {v: [k for k, r in enumerate(rows) if r["detail"] == v] for v in versions}
                row = _result("versions", "FAIL", "ranks differ: " + "; ".join(f"ranks {v}: {k}" for k, v in by.items()),
                              "install the same torch/CUDA/NCCL on every node")
            else:
                row["detail"] = f"identical on all {len(rows)} rank(s): {first['detail']}"
        elif len(per_rank) > 1 and worst["status"] != "PASS":
            bad = [k for k, r in enumerate(rows) if r["status"] == worst["status"]]
            row["detail"] = f"ranks {bad}: {worst['detail']}"
        merged.append(row)
    return merged
