"""Failures are never silent and never leave workers behind: one error line
naming the rank, a job that ends promptly when one rank fails, workers that
die with their launcher, one job per run directory, refusals that touch
nothing, finite config values, a memory pre-flight, honest endings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from harness import cli_env, run_cli
from test_cli import assert_one_line_error, run_main

from scaletrain.checkpoint.manifest import verify
from scaletrain.config import load_config
from scaletrain.errors import UserError, describe_error
from scaletrain.train.failures import is_communication_error
from scaletrain.train.rundir import RunDirLock, check_run_dir

SMALL = ["--set", "data.seq_len=32", "--set", "training.global_batch_size=4", "--set",
         "training.micro_batch_size=2", "--set", "logging.sample_tokens=0"]


def train_args(config: Path, run_dir: Path, *extra: str, nproc: int = 2) -> list[str]:
    return ["train", "--config", str(config), "--nproc", str(nproc), "--run-dir", str(run_dir), *SMALL, *extra]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scaletrain", *args], env=cli_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- pure checks

@pytest.mark.parametrize("key", ["training.lr", "training.weight_decay", "training.grad_clip", "model.rope_theta",
                                 "model.norm_eps", "debug.hang_timeout", "training.beta1"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_values_are_refused(key, value):
    with pytest.raises(UserError, match=f"{key} = {value} is not a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("key", ["beta1", "beta2"])
def test_betas_must_be_below_one(key):
    with pytest.raises(UserError, match=f"training.{key} = 1.5 must be < 1"):
        load_config(None, [f"training.{key}=1.5"])


def test_a_manifest_without_files_or_a_file_is_not_a_checkpoint(tmp_path):
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"step": 1, "files": {}}))
    assert "lists no files" in verify(ckpt)
    (tmp_path / "file").write_text("x")
    assert "is a file" in verify(tmp_path / "file")


def test_error_descriptions_and_communication_errors():
    from torch.distributed.checkpoint.api import CheckpointException

    exc = CheckpointException("x", {1: (OSError(28, "No space left on device"), None)})
    assert describe_error(exc) == "on rank(s) 1: OSError: [Errno 28] No space left on device"
    assert is_communication_error(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert not is_communication_error(RuntimeError("probability tensor contains either `inf`, `nan`"))


def test_run_dir_checks(tmp_path):
    check_run_dir(tmp_path / "new")  # a new directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_run_dir(tmp_path / "file")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a scaletrain run directory"):
        check_run_dir(user)
    (user / "config.toml").write_text("x = 1")
    with pytest.raises(UserError, match="holds a config.toml but no scaletrain run"):
        check_run_dir(user)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_run_dir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write"):
            check_run_dir(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_run_dir_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path, capsys):
    lock = RunDirLock(tmp_path).acquire()
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on "):
        RunDirLock(tmp_path).acquire()  # another open file description: flock refuses it
    with pytest.raises(UserError, match="in use by pid"):
        RunDirLock(tmp_path).check_free()
    lock.release()
    RunDirLock(tmp_path).acquire().release()
    assert "taking over" not in capsys.readouterr().err  # a clean release leaves no stale holder
    (tmp_path / ".scaletrain.lock").write_text("pid 999999 on elsewhere\n")  # a job that died
    RunDirLock(tmp_path).acquire().release()
    assert "taking over the lock of pid 999999 on elsewhere" in capsys.readouterr().err


def test_memory_preflight(monkeypatch):
    from scaletrain.parallel.dims import ParallelDims
    from scaletrain.train import preflight

    monkeypatch.setattr(preflight, "available_bytes", lambda device_type: 8 * 2**30)
    big = load_config(None, ["model.name=7b"])
    with pytest.raises(UserError, match=r"needs at least 100\.4 GiB per rank .* 8\.0 GiB available per rank"):
        preflight.check_memory(big, ParallelDims.from_config(big.parallel, 1), 1, "cpu")
    small = load_config(None, ["model.name=debug", "model.vocab_size=320"])
    dims = ParallelDims.from_config(small.parallel, 2)
    preflight.check_memory(small, dims, 2, "cpu")
    needs = preflight.rank_need_bytes(small, dims)
    assert len(needs) == 2 and all(n > 0 for n in needs)
    monkeypatch.setattr(preflight, "available_bytes", lambda device_type: needs[0])  # two ranks need twice
    with pytest.raises(UserError, match="2 local ranks share this machine's memory"):
        preflight.check_memory(small, dims, 2, "cpu")


def test_binary_and_invalid_utf8_files_are_counted(tmp_path, capsys):
    from scaletrain.data.sources import ReadStats, read_documents

    (tmp_path / "prog").write_bytes(b"\x7fELF\x00\x00binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    stats = ReadStats()
    assert list(read_documents(tmp_path / "prog", "text", "text", stats)) == []
    assert list(read_documents(tmp_path / "latin1.txt", "text", "text", stats)) == ["caf\ufffd ol\ufffd"]
    message = stats.warning(2)
    assert "skipped 1 of 2 file(s) as binary" in message and "replaced 2 invalid UTF-8" in message


def test_bad_data_inputs_are_user_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scaletrain.data.sources import read_documents
    from scaletrain.data.tokenizer import HFTokenizer

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(UserError, match="column 'text' holds int64, not text"):
        list(read_documents(tmp_path / "ints.parquet", "auto", "text"))
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1}))  # no unknown token
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="cannot encode the corpus"):
        HFTokenizer(tmp_path / "tokenizer.json").encode_batch(["a b zebra"])


# ------------------------------------------------------- refusals touch nothing

def test_refusals_write_nothing(tmp_path, debug_config, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.toml").write_text("mine = 1\n")
    (tmp_path / "afile").write_text("x")
    base = ["train", "--config", str(debug_config)]
    cases = [(["--run-dir", ""], "--run-dir is empty"),
             (["--run-dir", str(user)], "holds a config.toml but no scaletrain run"),
             (["--run-dir", str(tmp_path / "afile")], "is a file, not a directory"),
             (["--run-dir", str(tmp_path / "r"), "--set", f"checkpoint.resume={tmp_path / 'afile'}"], "is a file"),
             (["--run-dir", str(tmp_path / "r"), "--set", "model.name=7b", "--set", "model.vocab_size=32000"],
              "needs at least"),
             (["--config", str(tmp_path)], "is a directory")]
    for args, needle in cases:
        code, _, err = run_main(capsys, base + args)
        assert_one_line_error(code, err, needle)
    assert (user / "config.toml").read_text() == "mine = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "user"]
    code, _, err = run_main(capsys, ["bench", "comm", "--out", str(tmp_path / "missing" / "x.json")])
    assert_one_line_error(code, err, "does not exist")


def test_refused_resume_leaves_the_run_untouched(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=2", nproc=1))
    assert proc.returncode == 0, proc.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=4", "--set", "model.ffn_dim=128",
                              nproc=1))
    assert_one_line_error(proc.returncode, proc.stderr, "model.ffn_dim: checkpoint 192, this run 128")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # Every checkpoint corrupt: said in a warning and recorded, then a fresh start.
    for path in (run_dir / "checkpoints").glob("step_*/*.distcp"):
        path.write_bytes(b"garbage")
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=3", nproc=1))
    assert proc.returncode == 0, proc.stderr
    assert "none of the 1 checkpoint(s)" in proc.stderr and "starts from step 0" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is None and "(truncated?)" in summary["skipped_checkpoints"][0]


# ------------------------------------------------------------- worker failures

def test_one_ranks_error_ends_the_job_promptly(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    started = time.time()
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=8",
                              "--set", "debug.inject_fault=raise:1:3"), timeout=120)
    assert proc.returncode == 1
    assert time.time() - started < 60  # debug.hang_timeout is 300 s: nobody waited for it
    assert "error: rank 1 failed at step 3 (data): RuntimeError: injected failure on rank 1" in proc.stderr
    assert "error: stopping rank 0: rank 1 failed at step 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "injected failure" in (run_dir / "logs" / "rank_1.log").read_text()
    assert not (run_dir / "hang_report.json").exists()


def test_nan_loss_is_reported_and_never_crashes(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=4", "--set",
                              "debug.inject_fault=nan:0:2", "--set", "logging.sample_tokens=8"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning: step 2: loss nan" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nonfinite_steps"] == [2] and summary["skipped_steps"] == [2] and len(summary["samples"]) == 3


@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a 3 MB tmpfs: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_stops_with_one_line_or_continues(full_disk, debug_config):
    run_dir = full_disk / "stop"
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=6", "--set",
                              "checkpoint.interval=2", "--set", "model.name=tiny"), timeout=120)
    assert proc.returncode == 1
    assert "error: rank 0 failed at step " in proc.stderr and "(checkpoint)" in proc.stderr
    assert "MiB free in" in proc.stderr and "earlier checkpoints are intact" in proc.stderr
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # nothing half-written fills the disk
    assert all(verify(p) is None for p in (run_dir / "checkpoints").glob("step_*"))
    subprocess.run(["rm", "-rf", str(run_dir)])
    run_dir = full_disk / "continue"
    proc = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=6", "--set", "checkpoint.interval=2",
                              "--set", "model.name=tiny", "--set", "checkpoint.on_error=continue",
                              "--set", "checkpoint.async=true"), timeout=120)
    assert "training continues without this checkpoint" in proc.stderr
    assert metric_steps(run_dir)[:3] == [1, 2, 3]  # trained on past the failed save at step 2
    if proc.returncode:  # a background save can fill the disk under the records or outputs: one line, exit 1
        assert proc.returncode == 1 and "error: rank 0 failed at step " in proc.stderr, proc.stderr
        assert "No space left on device" in proc.stderr
    else:
        assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_one_job_per_run_dir_signals_and_a_killed_launcher(tmp_path, debug_config):
    """A running job's directory is refused to a second job; three quick
    SIGINTs still end in a saved, honest exit 0; a SIGKILLed launcher takes
    its workers with it; the next job takes the stale lock over and resumes."""
    run_dir = tmp_path / "run"
    args = train_args(debug_config, run_dir, "--set", "training.steps=100000", "--set", "checkpoint.interval=5")
    first = start(args, tmp_path / "first.log")
    try:
        wait_for(lambda: len(metric_steps(run_dir)) >= 3, 90, "the first job's steps")
        second = run_cli(args, timeout=60)
        assert_one_line_error(second.returncode, second.stderr,
                              f"run directory {run_dir} is in use by pid {first.pid} on ")
        for _ in range(3):
            first.send_signal(signal.SIGINT)
            time.sleep(0.2)
        assert first.wait(timeout=90) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert json.loads((run_dir / "summary.json").read_text())["stopped_early"]
    assert "checkpoint and summary written" in (tmp_path / "first.log").read_text()

    third = start(args, tmp_path / "third.log")
    try:
        done = len(metric_steps(run_dir))
        wait_for(lambda: len(metric_steps(run_dir)) >= done + 6, 90, "the third job's steps")
        workers = psutil.Process(third.pid).children(recursive=True)
        assert workers
        third.kill()
        third.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their launcher: {[p.pid for p in alive]}"
    finally:
        third.kill()
    fourth = run_cli(train_args(debug_config, run_dir, "--set", "training.steps=3", "--set", "debug.stop_at_step=1"),
                     timeout=90)
    assert fourth.returncode == 0, fourth.stderr
    assert "taking over the lock of pid" in fourth.stderr and "which is gone" in fourth.stderr


def test_a_failed_final_write_leaves_no_partial_file_and_names_the_phase(tmp_path, monkeypatch):
    from scaletrain.train import report
    from scaletrain.train.failures import failure_line

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        report.write_outputs(tmp_path, 6, {"loss_last": 1.0}, {})
    assert list(tmp_path.iterdir()) == []  # neither model.safetensors(.tmp) nor summary.json
    line = failure_line(0, "at step 6 (writing outputs)", info.value, None)
    assert line == "rank 0 failed at step 6 (writing outputs): OSError: [Errno 28] No space left on device"
