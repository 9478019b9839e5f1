"""Bad input: one line on stderr starting 'error:', exit code 2, no traceback,
nothing written. Also the command surface."""

import json

import pytest
from harness import run_cli

from scaletrain.cli import app, main


def run_main(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_command_surface_is_frozen():
    import typer

    command = typer.main.get_command(app)
    assert set(command.commands) == {"train", "config", "checkpoint", "plan", "doctor", "bench", "launch", "serve",
                                     "runs", "allocate", "dashboard", "router"}
    assert set(command.commands["launch"].commands) == {"slurm", "k8s"}
    assert set(command.commands["bench"].commands) == {"comm", "serve"}
    assert set(command.commands["config"].commands) == {"show", "keys", "import-deepspeed"}
    assert set(command.commands["checkpoint"].commands) == {"inspect", "export", "import"}
    assert {p.name for p in command.commands["train"].params} == {"config", "set_", "nproc", "run_dir",
                                                                   "max_restarts", "force"}


@pytest.mark.parametrize("make_args, needle", [
    (lambda d: ["--set", "data.source=" + str(d / "missing")], "no such file or directory"),
    (lambda d: ["--set", f"data.source={d / 'empty.txt'}"], "the corpus is empty"),
    (lambda d: ["--set", f"data.source={d / 'bad.jsonl'}"], "bad.jsonl:2: no 'text' field"),
    (lambda d: ["--set", "data.seq_len=2048"], "data.seq_len = 2048 exceeds model.max_seq_len = 1024"),
    (lambda d: ["--set", "training.global_batch_size=12", "--set", "training.micro_batch_size=4",
                "--nproc", "2"], "not divisible by micro_batch_size x data-parallel size = 4 x 2"),
    (lambda d: ["--set", "training.stesp=3"], "did you mean 'training.steps'"),
    (lambda d: ["--set", "training.steps=many"], "expected an integer"),
    (lambda d: ["--config", str(d / "broken.toml")], "malformed TOML"),
    (lambda d: ["--nproc", "0"], "--nproc = 0"),
    (lambda d: ["--set", "parallel.dp_replicate=3", "--nproc", "2"], "product 3 that does not divide the world size 2"),
    (lambda d: ["--set", "parallel.dp_replicate=3", "--set", "parallel.dp_shard=1", "--nproc", "2"],
     "= 3 x 1 x 1 x 1 = 3, but the world size is 2"),
    (lambda d: ["--set", "data.tokenizer=" + str(d / "nope.json")], "data.tokenizer"),
    (lambda d: ["--bogus"], "No such option"),
])
def test_bad_train_input(capsys, workdir, make_args, needle):
    (workdir / "empty.txt").write_text("")
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    (workdir / "broken.toml").write_text("[training\n")
    cache = workdir / "cache"
    before = {p for p in workdir.rglob("*") if cache not in p.parents and p != cache}
    code, _, err = run_main(capsys, ["train", "--set", f"data.cache_dir={cache}", *make_args(workdir)])
    assert_one_line_error(code, err, needle)
    after = {p for p in workdir.rglob("*") if cache not in p.parents and p != cache}
    assert after == before  # no run directory, nothing written
    assert not list(cache.rglob("*.bin")) if cache.exists() else True


def test_config_show_prints_resolved_toml(capsys):
    code, out, _ = run_main(capsys, ["config", "show", "--set", "model.name=7b", "--set", "training.steps=3"])
    assert code == 0
    assert 'name = "7b"' in out and "dim = 4096" in out and "steps = 3" in out


def test_config_keys_lists_help(capsys):
    code, out, _ = run_main(capsys, ["config", "keys"])
    assert code == 0 and "training.global_batch_size (int, default 16)" in out


def test_error_path_through_a_real_process(tmp_path):
    proc = run_cli(["train", "--set", "training.dtype=fp64"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: training.dtype = 'fp64' is not allowed; allowed: fp32, bf16, fp16 "
                                   "(did you mean 'fp16'?)")
    assert not (tmp_path / "runs").exists()


def test_train_writes_the_contract_files(tmp_path, debug_config):
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "run"),
                    "--set", "logging.interval=2"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors",
                                               "checkpoints", ".scaletrain.lock", "ranks.jsonl"}
    assert (run / ".scaletrain.lock").read_text() == ""  # released: no holder named
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000008"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "mem_peak_bytes"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 64 and r["tokens_per_s"] > 0 and r["mem_peak_bytes"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss_last"] < summary["loss_first"]
    assert len(summary["samples"]) == 3 and "training done" in proc.stdout
    assert 'vocab_size = 320' in (run / "config.toml").read_text()  # resolved from the byte tokenizer
    # The same command again resumes from the final checkpoint: nothing left to do.
    again = run_cli(["train", "--config", str(debug_config), "--run-dir", str(run)], timeout=60)
    assert again.returncode == 0 and "nothing to do: resumed at step 8" in again.stderr
    fresh = run_cli(["train", "--config", str(debug_config), "--run-dir", str(run), "--set", "checkpoint.resume=none"],
                    timeout=60)
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr


@pytest.mark.parametrize("args, needle", [
    (["--nproc", "4", "--set", "parallel.tp=3"], "parallel.tp = 3 must divide model.n_heads = 8"),
    (["--nproc", "4", "--set", "parallel.tp=2", "--set", "parallel.pp=3"], "does not divide the world size 4"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "model.n_layers=1"], "exceeds model.n_layers = 1"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=interleaved_1f1b",
      "--set", "model.n_layers=3"], "parallel.pp x virtual stages = 2 x 2 = 4 exceeds model.n_layers = 3"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=interleaved_1f1b",
      "--set", "parallel.pp_microbatches=5", "--set", "training.micro_batch_size=10",
      "--set", "training.global_batch_size=20"], "multiple of its rounds"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=1f1b",
      "--set", "parallel.pp_microbatches=1"], "needs pp_microbatches >= pp"),
    (["--set", "parallel.zero_stage=5"], "parallel.zero_stage = 5 is not allowed; allowed: 0, 1, 2, 3"),
    (["--nproc", "2", "--set", "parallel.zero_stage=1", "--set", "parallel.tp=2"], "zero_stage = 1 with parallel.tp"),
    (["--nproc", "2", "--set", "parallel.dp_shard=2"], "needs parallel.zero_stage 1-3"),
    (["--nproc", "2", "--set", "parallel.zero_stage=3", "--set", "parallel.cpu_offload=true"], "needs CUDA"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "model.tie_embeddings=true"], "tie_embeddings"),
])
def test_bad_layouts_fail_before_any_worker_starts(capsys, workdir, args, needle):
    code, _, err = run_main(capsys, ["train", "--set", f"data.cache_dir={workdir / 'cache'}", *args])
    assert_one_line_error(code, err, needle)
    assert not (workdir / "runs").exists()
