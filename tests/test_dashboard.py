"""scaletrain dashboard: the stream tail, the JSON API on real training runs,
bad input, and the page in a real headless Chromium (Debian's, driven by
Playwright): no console errors, the charts hold every logged step, a step
appended to metrics.jsonl shows up without a reload.

The runs' metrics.jsonl, summary.json and checkpoints come from real
training; ranks.jsonl, alerts.jsonl, events.jsonl and hang_report.json are
written here following the run-directory contract."""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import cli_env, run_cli
from test_cli import assert_one_line_error, run_main

from scaletrain.observe import dashboard
from scaletrain.observe.dashboard import JsonlTail, RunSet, make_app

CHROMIUM = Path("/usr/bin/chromium")
RANKS, SLOW_RANK = 4, 2


def write_jsonl(path: Path, rows: list[dict], mode: str = "w") -> None:
    with path.open(mode) as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)


def rank_rows(step: int) -> list[dict]:
    """One step's per-rank rows of a synchronous job: from step 3 on SLOW_RANK's
    forward takes 0.45 s instead of 0.15 s and the others wait 0.3 s longer in
    communication, so every rank's step time is the same (0.8 s)."""
    rows = []
    for rank in range(RANKS):
        late = step >= 3
        forward_s = 0.45 if late and rank == SLOW_RANK else 0.15
        comm_wait_s = 0.35 if late and rank != SLOW_RANK else 0.05
        rows.append({"step": step, "rank": rank, "step_time_s": 0.8 if late else 0.5, "data_s": 0.01,
                     "forward_s": forward_s, "backward_s": 0.25, "optimizer_s": 0.03, "comm_wait_s": comm_wait_s,
                     "other_s": 0.01, "rss_bytes": 370_000_000, "mem_allocated_bytes": None,
                     "mem_reserved_bytes": None, "cpu_util": 0.9, "gpu_util": None})
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, debug_config) -> list[Path]:
    """Two real 4- and 3-step runs; A has a truncated checkpoint, B a hang report."""
    root = tmp_path_factory.mktemp("dash")
    made = []
    for name, steps, lr in (("A", 4, "3e-3"), ("B", 3, "1e-3")):
        proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(root / name),
                        "--set", f"training.steps={steps}", "--set", f"training.lr={lr}",
                        "--set", "logging.sample_tokens=0", "--set", "checkpoint.interval=2"], timeout=120)
        assert proc.returncode == 0, proc.stderr
        made.append(root / name)
    a, b = made
    write_jsonl(a / "ranks.jsonl", [row for step in range(1, 5) for row in rank_rows(step)])
    write_jsonl(a / "alerts.jsonl", [
        {"time": time.time(), "step": 3, "name": "straggler", "severity": "warning", "state": "firing",
         "message": f"rank {SLOW_RANK} is 2.0x the median step time", "value": 2.0},
        {"time": time.time(), "step": 2, "name": "nonfinite_loss", "severity": "critical", "state": "resolved",
         "message": "loss is finite again", "value": float("nan")}])
    write_jsonl(a / "events.jsonl", [{"time": time.time(), "step": 2, "kind": "skipped_step", "rank": 0,
                                      "detail": "non-finite loss"}])
    shard = next(p for p in sorted((a / "checkpoints" / "step_00000002").iterdir()) if p.name != "manifest.json")
    shard.write_bytes(shard.read_bytes()[:-1])
    (b / "hang_report.json").write_text(json.dumps({
        "trigger": "no progress for 5s on rank(s) [1]", "suspect_ranks": [1], "likely_cause": "rank 1 is frozen",
        "world_size": 2, "hang_timeout_s": 5, "time": time.time(),
        "ranks": [{"rank": 0, "step": 3, "phase": "backward", "collectives": 12, "at": "trainer.py:200"},
                  {"rank": 1, "step": 3, "phase": "forward", "collectives": 11}]}))
    return made


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the stream tail ----------------------------------------------------------
@pytest.mark.parametrize("block", [5, 1 << 22])
def test_tail_serves_complete_lines_nan_as_null_and_restarts_a_replaced_file(tmp_path, monkeypatch, block):
    monkeypatch.setattr(dashboard, "_READ_BLOCK", block)  # 5 bytes: every line spans several reads
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": NaN}\n{"step": 3, "lo')
    tail = JsonlTail(path)
    got = tail.read()
    assert [r["step"] for r in got["rows"]] == [1, 2] and got["rows"][1]["loss"] is None
    assert (got["next"], got["total"]) == (2, 2)
    with path.open("a") as fh:
        fh.write('ss": 2.0}\nnot json\n{"step": 4, "loss": Infinity, "stragglers": [NaN, 1]}\n')
    got = tail.read(since=2, gen=got["gen"])
    assert not got["reset"] and [r["step"] for r in got["rows"]] == [3, 4]
    assert got["rows"][1] == {"step": 4, "loss": None, "stragglers": [None, 1]}
    assert (got["next"], got["total"]) == (5, 5)  # the corrupt line is skipped, the cursor moves past it
    assert [r["step"] for r in tail.read(since=-2)["rows"]] == [4]
    assert [r["step"] for r in tail.read(since=1, limit=2)["rows"]] == [2, 3]
    # The trainer rewrites metrics.jsonl after a resume (os.replace): the client starts over.
    old_gen = got["gen"]
    replacement = tmp_path / "new"
    replacement.write_text('{"step": 1, "loss": 9.0}\n')
    os.replace(replacement, path)
    got = tail.read(since=5, gen=old_gen)
    assert got["reset"] and got["gen"] != old_gen and got["rows"] == [{"step": 1, "loss": 9.0}]


# ---- the JSON API on real runs -------------------------------------------------
def test_api_serves_runs_streams_checkpoints_and_hang_report(runs):
    from fastapi.testclient import TestClient

    a, b = runs
    client = TestClient(make_app(RunSet([a.parent])))  # the folder of runs, like runs/
    listed = client.get("/api/runs").json()
    assert [(r["index"], r["name"]) for r in listed] == [(0, "A"), (1, "B")]
    assert [r["state"] for r in listed] == ["finished", "hung"]
    got = client.get("/api/runs/0/metrics", params={"since": 1}).json()
    assert [r["loss"] for r in got["rows"]] == [r["loss"] for r in metric_rows(a)[1:]]
    assert (got["next"], got["total"]) == (4, 4)
    alerts = client.get("/api/runs/0/alerts").json()["rows"]
    assert alerts[1]["value"] is None  # NaN in the file, null on the wire
    assert len(client.get("/api/runs/0/ranks", params={"since": -RANKS}).json()["rows"]) == RANKS
    deadline = time.time() + 30
    while True:
        checkpoints = client.get("/api/runs/0/status").json()["checkpoints"]
        if not any(c["checking"] for c in checkpoints) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert [(c["step"], c["valid"]) for c in checkpoints] == [(2, False), (4, True)]
    assert "truncated" in checkpoints[0]["problem"] and checkpoints[1]["bytes"] > 0
    status = client.get("/api/runs/1/status").json()
    assert status["hang_report"]["suspect_ranks"] == [1] and status["summary"]["steps"] == 3
    assert client.get("/api/runs/2/status").status_code == 404


def test_a_run_that_appears_in_a_watched_folder_is_appended(tmp_path):
    from fastapi.testclient import TestClient

    (tmp_path / "r1").mkdir()
    write_jsonl(tmp_path / "r1" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (tmp_path / "notes").mkdir()  # not a run: ignored
    client = TestClient(make_app(RunSet([tmp_path])))
    assert [r["name"] for r in client.get("/api/runs").json()] == ["r1"]
    (tmp_path / "r0").mkdir()
    (tmp_path / "r0" / ".scaletrain.lock").write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    (tmp_path / "r0" / "hang_report.json").write_text("{}")  # an earlier attempt's: the live job is resuming
    listed = client.get("/api/runs").json()
    assert [(r["name"], r["state"]) for r in listed] == [("r1", "incomplete"), ("r0", "running")]


def test_an_empty_folder_is_watched_until_a_run_fills_it(tmp_path):
    from fastapi.testclient import TestClient

    client = TestClient(make_app(RunSet([tmp_path])))
    assert client.get("/api/runs").json() == []
    (tmp_path / "config.toml").write_text("[training]\nsteps = 2\n")
    assert [r["name"] for r in client.get("/api/runs").json()] == [tmp_path.name]
    assert "steps = 2" in client.get("/api/runs/0/status").json()["config"]


# ---- bad input -----------------------------------------------------------------
@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("make_args, needle", [
    (lambda d, p: [str(d / "missing")], "does not exist"),
    (lambda d, p: [str(d / "file.txt")], "is a file, not a run directory"),
    (lambda d, p: [str(d / "stuff")], "is not a scaletrain run directory"),
    (lambda d, p: [], "no RUN_DIR given and there is no ./runs directory"),
    (lambda d, p: [str(d / "run"), "--port", "70000"], "--port 70000 is not a port number"),
    (lambda d, p: [str(d / "run"), "--port", "web"], "Invalid value for '--port'"),
    (lambda d, p: [str(d / "run"), "--port", str(p)], "cannot listen on 127.0.0.1:"),
    (lambda d, p: [str(d / "run"), "--host", "no-such-host.invalid"], "cannot be resolved"),
])
def test_bad_dashboard_input(capsys, tmp_path, monkeypatch, busy_port, make_args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.md").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    code, _, err = run_main(capsys, ["dashboard", *make_args(tmp_path, busy_port)])
    assert_one_line_error(code, err, needle)


# ---- the page in a real browser --------------------------------------------------
def start_dashboard(run_dirs: list[Path], timeout_s: float = 30) -> tuple[subprocess.Popen, str]:
    """``scaletrain dashboard --port 0`` as a real process; its URL from its first line."""
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "dashboard", *map(str, run_dirs), "--port", "0"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"no URL within {timeout_s}s: {line!r} {proc.communicate(timeout=10)[1]}")
    return proc, re.search(r"http://\S+", line).group(0)


def test_sigterm_stops_the_server_with_exit_0(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    proc, url = start_dashboard([tmp_path])
    proc.send_signal(signal.SIGTERM)  # at once: possibly before uvicorn has its own handlers
    try:
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        proc.kill()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), timeout=30_000, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


@pytest.mark.timeout(180)
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install chromium; .ci/run installs it)")
def test_page_shows_the_runs_and_a_new_step_without_a_reload(runs):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    a, b = runs
    proc, url = start_dashboard(runs)
    problems, foreign = [], []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: r.url.startswith(url) or r.url.startswith("data:") or foreign.append(r.url))
            page.goto(url)
            page.wait_for_function("window.dashboard && window.dashboard.ticks >= 1")
            loss = page.evaluate("window.dashboard.points('loss')")
            assert loss == {"A · loss": 4, "B · loss": 3}
            assert page.evaluate("window.dashboard.points('lr')") == {"A · lr": 4, "B · lr": 3}
            assert page.locator("#chart-memory").get_attribute("data-points") == "7"
            assert page.evaluate("window.dashboard.heatmapCells()") == RANKS * 4
            # The straggler stands out in its own work (0.5 s vs the median 0.2 s), not in step time.
            hottest = page.evaluate("window.dashboard.heatmapHottest()")
            assert (hottest["rank"], hottest["step"]) == (SLOW_RANK, 3) and hottest["ratio"] == pytest.approx(2.5)
            page.select_option("#heat-field", "step_time_s")
            assert page.evaluate("window.dashboard.heatmapHottest()")["ratio"] == pytest.approx(1.0)
            page.select_option("#heat-field", "own_work_s")
            assert "straggler (warning) since step 3" in page.locator("#firing").inner_text()
            assert "nonfinite_loss" not in page.locator("#firing").inner_text()  # resolved
            # Validity comes from a background check: "checking…" first, the verdict a poll later.
            page.wait_for_function("!document.querySelector('#checkpoints').innerText.includes('checking')")
            checkpoints = page.locator("#checkpoints").inner_text()
            assert "invalid:" in checkpoints and "truncated" in checkpoints and "\tvalid" in checkpoints
            assert "skipped_step" in page.locator("#events").inner_text()
            assert page.locator("#hang").is_hidden()

            # A user's zoom survives new steps.
            page.evaluate("window.dashboard.charts.loss.plot.setScale('x', {min: 1, max: 3})")

            # Half a line first: nothing changes, nothing breaks; the finished line appears.
            logged = metric_rows(a)
            step5 = {**logged[-1], "step": 5, "tokens": logged[-1]["tokens"] + logged[0]["tokens"], "val_loss": 5.0,
                     "stragglers": [{"rank": SLOW_RANK, "forward_s": 0.3, "ratio": 2.0}]}
            text = json.dumps(step5) + "\n"
            with (a / "metrics.jsonl").open("a") as fh:
                fh.write(text[:20])
            ticks = page.evaluate("window.dashboard.ticks")
            page.wait_for_function(f"window.dashboard.ticks >= {ticks + 2}")
            assert page.evaluate("window.dashboard.points('loss')")["A · loss"] == 4
            with (a / "metrics.jsonl").open("a") as fh:
                fh.write(text[20:])
            write_jsonl(a / "ranks.jsonl", rank_rows(5), mode="a")
            page.wait_for_function("window.dashboard.points('loss')['A · loss'] === 5")
            page.wait_for_function(f"window.dashboard.heatmapCells() === {RANKS * 5}")
            loss = page.evaluate("window.dashboard.points('loss')")
            assert loss == {"A · loss": 5, "A · val_loss": 1, "B · loss": 3}
            assert f"step 5: rank {SLOW_RANK} (2x)" in page.locator("#stragglers").inner_text()
            zoom = page.evaluate("(({min, max}) => [min, max])(window.dashboard.charts.loss.plot.scales.x)")
            assert zoom == [1, 3]
            assert page.evaluate("window.dashboard.charts.lr.plot.scales.x.max") == 5

            page.select_option("#x-field", "tokens")  # runs compared by tokens seen
            assert page.evaluate("window.dashboard.points('lr')") == {"A · lr": 5, "B · lr": 3}
            assert page.evaluate("window.dashboard.charts.lr.plot.scales.x.max") == step5["tokens"]

            page.select_option("#focus", "1")
            assert page.locator("#hang").is_visible()
            assert "suspect rank(s): 1" in page.locator("#hang-body").inner_text()
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert problems == [] and foreign == []
