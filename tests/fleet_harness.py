"""Real ``scaletrain serve --replicas`` / ``scaletrain router`` processes for
the fleet tests and benchmark: started on 127.0.0.1 and a free port with a
hard start-up deadline, asked through HTTP, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_harness import free_port, serve_env


class FleetProcess:
    """``python -m scaletrain <args> --port/--router-port P``; ready when ``/health`` lists ``healthy`` backends."""

    def __init__(self, args: list[str], healthy: int, startup_s: float = 120, router: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fleet-", suffix=".log", delete=False)
        port_flag = "--port" if router else "--router-port"
        cmd = [sys.executable, "-m", "scaletrain", *args, port_flag, str(self.port)]
        self.proc = subprocess.Popen(cmd, env=serve_env(1), stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy(healthy, startup_s)

    def wait_healthy(self, count: int, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            report = self.health()
            if report and report["healthy"] >= count:
                return report
            time.sleep(0.2)
        raise AssertionError(f"not {count} healthy backends after {timeout_s}s: {self.health()}\n{self.output()}")

    def health(self) -> dict | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except (httpx.TransportError, ValueError):
            return None

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``scaletrain:router_<name>`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(f"scaletrain:router_{name}") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                head = line.rsplit(" ", 1)[0]
                if head.split("{")[0] == f"scaletrain:router_{name}":
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"ignored SIGTERM for {timeout_s}s:\n{self.output()}") from None


def complete(url: str, prompt: str = "def f", max_tokens: int = 4, timeout: float = 60, headers: dict | None = None,
             model: str = "tiny", **extra) -> httpx.Response:
    """A greedy /v1/completions request (``extra`` goes into the body)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout)


def backend_of(response: httpx.Response) -> str:
    return response.headers["x-scaletrain-backend"]
