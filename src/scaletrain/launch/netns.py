"""A multi-node cluster on one machine, for tests, benchmarks and demos:
network namespaces made by scripts/netns-cluster.sh in a source checkout
(each node its own IP, the inter-node link shaped with tc, loopback inside a
node fast), or, where namespaces cannot be made, every "node" on 127.0.0.1 so
multi-agent rendezvous is still exercised.

Agents are real ``torchrun --nnodes ... --rdzv-backend c10d`` processes, one
per node, started with ``ip netns exec`` inside the namespaces."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "netns-cluster.sh"


@dataclass
class Node:
    namespace: str | None  # None: the root namespace (loopback fallback)
    ip: str
    ifname: str


@dataclass
class Cluster:
    nodes: list[Node]
    shaped_rate: str | None  # the tc rate of the inter-node link, None if unshaped
    base_env: dict[str, str]  # the environment every agent starts from
    why_not_namespaces: str = ""

    @property
    def namespaced(self) -> bool:
        return self.nodes[0].namespace is not None

    def command(self, node: int, argv: list[str]) -> list[str]:
        ns = self.nodes[node].namespace
        return (["ip", "netns", "exec", ns] if ns else []) + argv

    def env(self, node: int, **extra: str) -> dict[str, str]:
        # gloo binds the interface named here (the node's own IP), not the
        # address the machine's hostname resolves to, which no namespace reaches.
        return {**self.base_env, "GLOO_SOCKET_IFNAME": self.nodes[node].ifname, **extra}

    def agent(self, node: int, nproc: int, port: int, argv: list[str], nnodes: str = "2", run_id: str = "job",
              max_restarts: int = 0, extra_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        """One torchrun agent on ``node`` running ``argv`` (a script, or ``-m scaletrain ...``).

        Node 0 hosts the c10d store (is_host): the endpoint is its IP, which
        torchrun cannot recognise as local inside a namespace."""
        host = self.nodes[0].ip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", run_id,
               "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=60,last_call_timeout=2",
               "--local-addr", self.nodes[node].ip, "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.5", *extra_args, *argv]
        return subprocess.Popen(self.command(node, cmd), env=self.env(node, **env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def free_port(self) -> int:
        if self.namespaced:  # a fresh namespace has every port free
            return 29500
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def namespaces_unavailable() -> str:
    """Why this machine cannot make network namespaces ('' if it can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"stprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


@contextmanager
def make_cluster(n: int, rate: str | None = None, prefix: str | None = None, env: dict[str, str] | None = None):
    """``n`` namespace nodes (inter-node egress shaped to ``rate``), torn down
    on exit whatever happens; the loopback fallback where they cannot be made.
    ``env``: the agents' environment (default: this process's)."""
    env = dict(os.environ if env is None else env)
    why = namespaces_unavailable()
    if why:
        yield Cluster([Node(None, "127.0.0.1", "lo") for _ in range(n)], None, env, why)
        return
    prefix = prefix or f"s{os.getpid() % 100000}"
    # A per-process /24 so concurrent sessions' clusters do not share addresses.
    subnet = f"10.{77 + os.getpid() % 50}.{os.getpid() % 250}"
    args = [str(SCRIPT), "up", str(n), "--prefix", prefix, "--subnet", subnet] + (["--rate", rate] if rate else [])
    try:
        up = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, f"netns-cluster.sh up failed:\n{up.stderr}"
        nodes = [Node(*line.split()) for line in up.stdout.split("\n") if line.strip()]
        yield Cluster(nodes, rate, env)
    finally:
        subprocess.run([str(SCRIPT), "down", str(n), "--prefix", prefix], capture_output=True, timeout=60)


def finish(agents: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each agent's output once all have exited (killed, whole process group, at the timeout)."""
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=timeout)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
                agent.wait()
    return outputs


def tail(outputs: list[str], chars: int = 3000) -> str:
    return "\n----\n".join(o[-chars:] for o in outputs)

