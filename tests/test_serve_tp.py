"""``scaletrain serve --tp 2``: two processes holding the model split with the
training TP plan give the greedy tokens of ``--tp 1``; a worker that dies
takes the server down with exit 1 and a line naming it; SIGTERM stops both."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from serve_harness import ServerProcess, expected_greedy, make_tiny_run

PROMPTS = ["def ", "import sys\n", "class Foo(object):\n    def __init__(self):", "x"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, debug_config):
    return make_tiny_run(tmp_path_factory.mktemp("serve-tp"), debug_config)


def complete(srv, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    resp = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_tp2_greedy_equals_tp1_and_sigterm_stops_every_rank(run_dir):
    # The gather attention path here (the API tests use the row cache).
    srv = ServerProcess(str(run_dir), ["--tp", "2", "--served-model-name", "tiny", "--block-size", "8",
                                       "--attention", "gather"])
    try:
        workers = psutil.Process(srv.proc.pid).children()
        assert len(workers) == 1
        for prompt in PROMPTS:
            assert complete(srv, prompt) == expected_greedy(run_dir, prompt, 24)
        assert srv.stop(signal.SIGTERM) == 0, srv.output()
        psutil.wait_procs(workers, timeout=20)
        assert not any(w.is_running() for w in workers)
    finally:
        srv.kill()


def test_a_dead_worker_ends_the_server_with_exit_1(run_dir):
    srv = ServerProcess(str(run_dir), ["--tp", "2", "--served-model-name", "tiny"])
    try:
        complete(srv, "def ")
        worker = psutil.Process(srv.proc.pid).children()[0]
        worker.kill()
        assert srv.proc.wait(timeout=30) == 1
        assert f"error: the engine stopped: tensor-parallel worker rank 1 (pid {worker.pid}) exited" in srv.output()
    finally:
        srv.kill()
