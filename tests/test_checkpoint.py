"""Checkpoints never lose work: exact resume, resume under another layout,
fallback past a damaged checkpoint, clear errors, HF interop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from harness import assert_parity, cli_env, read_run, run_cli, train_many, train_run

BASE = ["training.steps=6", "training.global_batch_size=8", "training.micro_batch_size=2", "model.n_layers=4"]


def ckpt_steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_stop_and_resume_is_bitwise_identical(tmp_path, debug_config):
    whole = train_run(tmp_path / "whole", debug_config, BASE)
    run = tmp_path / "split"
    stopped = train_run(run, debug_config, BASE + ["debug.stop_at_step=4", "checkpoint.interval=3"])
    assert stopped.summary["stopped_early"] and len(stopped.losses) == 4
    assert ckpt_steps(run) == ["step_00000003", "step_00000004"]
    resumed = train_run(run, debug_config, BASE + ["checkpoint.interval=3"])
    assert resumed.summary["resumed_from"].endswith("step_00000004")
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4, 5, 6]  # every step exactly once
    assert resumed.losses == whole.losses  # bitwise
    for name, value in whole.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, debug_config):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scaletrain", "train", "--config", str(debug_config), "--run-dir", str(run),
           "--nproc", "2", "--set", "training.steps=100000", "--set", "logging.sample_tokens=0"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the launcher; torchrun forwards it to the workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    done = read_run(run)
    last = done.metrics[-1]["step"]
    assert done.summary["stopped_early"] and ckpt_steps(run) == [f"step_{last:08d}"]


def test_resume_under_other_layouts(tmp_path, debug_config):
    """ZeRO-3 on 2 ranks -> 1 process, ZeRO-3 on 4, FSDP x TP 2x2; PP 2 -> no PP.
    Parameters, optimizer state and data position must all carry over for the
    losses of the remaining steps to match an uninterrupted run."""
    stop = ["debug.stop_at_step=3"]
    sources = train_many(tmp_path / "src", debug_config, {
        "zero3": BASE + stop + ["parallel.zero_stage=3"],
        "pp": BASE + stop + ["parallel.pp=2"],
    }, nproc=2)
    reference = train_many(tmp_path / "ref", debug_config, {"whole": BASE}, nproc=1)["whole"]
    z3 = sources["zero3"].run_dir / "checkpoints" / "step_00000003"
    pp = sources["pp"].run_dir / "checkpoints" / "step_00000003"
    single = train_many(tmp_path / "to1", debug_config, {
        "zero3_to_single": BASE + [f"checkpoint.resume={z3}"],
        "pp_to_single": BASE + [f"checkpoint.resume={pp}"],
    }, nproc=1)
    four = train_many(tmp_path / "to4", debug_config, {
        "zero3_to_zero3x4": BASE + [f"checkpoint.resume={z3}", "parallel.zero_stage=3"],
        "zero3_to_tp2_dp2": BASE + [f"checkpoint.resume={z3}", "parallel.zero_stage=3", "parallel.tp=2"],
    }, nproc=4)
    for result in [*single.values(), *four.values()]:
        assert [m["step"] for m in result.metrics] == [4, 5, 6]
        reference_tail = type(reference)(reference.run_dir, reference.losses[3:], reference.params,
                                         reference.summary, reference.metrics[3:])
        assert_parity(reference_tail, result)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, debug_config):
    run = tmp_path / "run"
    train_run(run, debug_config, BASE + ["checkpoint.interval=2", "debug.stop_at_step=4"])
    newest = run / "checkpoints" / "step_00000004"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (run / "checkpoints" / "step_00000005").mkdir()  # no manifest: an interrupted save
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(run),
                    *[a for o in BASE + ["checkpoint.interval=2"] for a in ("--set", o)]])
    assert proc.returncode == 0, proc.stderr
    assert "step_00000005/manifest.json is missing" in proc.stderr
    assert f"{shard} has 100 bytes" in proc.stderr
    result = read_run(run)
    assert result.summary["resumed_from"].endswith("step_00000002")
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4, 5, 6]




def test_failed_save_stops_or_continues_as_configured(tmp_path, debug_config):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint directory should be")
    common = BASE + [f"checkpoint.dir={blocker}/ckpts"]
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "stop"),
                    *[a for o in common for a in ("--set", o)]])
    assert proc.returncode == 2  # found before any worker starts: nothing written
    assert "cannot create it (Not a directory)" in proc.stderr and not (tmp_path / "stop").exists()
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "go"),
                    *[a for o in common + ["checkpoint.on_error=continue"] for a in ("--set", o)]])
    assert proc.returncode == 0, proc.stderr
    assert "training continues without this checkpoint" in proc.stderr
    assert len(read_run(tmp_path / "go").losses) == 6


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path, debug_config):
    run = tmp_path / "run"
    train_run(run, debug_config, BASE + ["checkpoint.interval=1", "checkpoint.keep_last=2"])
    assert ckpt_steps(run) == ["step_00000005", "step_00000006"]


def test_async_save_resumes_exactly(tmp_path, debug_config):
    whole = train_run(tmp_path / "whole", debug_config, BASE)
    run = tmp_path / "run"
    train_run(run, debug_config, BASE + ["checkpoint.async=true", "checkpoint.interval=2", "debug.stop_at_step=5"],
              nproc=2)
    assert ckpt_steps(run)[-1] == "step_00000005"
    resumed = train_run(run, debug_config, BASE, nproc=2)
    assert_parity(whole, resumed)


def test_inspect_export_to_hf_and_import(tmp_path, debug_config):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    trained = train_run(run, debug_config, BASE)
    ckpt = run / "checkpoints" / "step_00000006"
    proc = run_cli(["checkpoint", "inspect", str(ckpt), "--json"], timeout=60)
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert info["valid"] and info["step"] == 6 and info["tensors"]["model.embed_tokens.weight"] == [320, 64]
    hf_dir = tmp_path / "hf"
    assert run_cli(["checkpoint", "export", str(ckpt), "--to", "hf", str(hf_dir)], timeout=60).returncode == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    from scaletrain.checkpoint.hf import load_checkpoint_model

    _, ours = load_checkpoint_model(ckpt)
    tokens = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.eval()(tokens), rtol=1e-4, atol=1e-5)
    imported = tmp_path / "imported"
    proc = run_cli(["checkpoint", "import", str(hf_dir), str(imported), "--config", str(debug_config)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Fine-tune from it with a zero learning rate: the weights must be the exported ones.
    tuned = train_run(tmp_path / "tuned", imported / "config.toml",
                      ["training.steps=1", "training.lr=0", "training.min_lr=0", f"checkpoint.init_from={imported}"])
    for name, value in trained.params.items():
        torch.testing.assert_close(tuned.params[name], value, rtol=0, atol=0)


def test_bad_resume_path_is_a_user_error(tmp_path, debug_config):
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "r"),
                    "--set", f"checkpoint.resume={tmp_path / 'nothing'}"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint.resume")
    assert not (tmp_path / "r").exists()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_worker_is_restarted_and_resumes(tmp_path, debug_config):
    """SIGKILL one worker mid-run: torchrun's elastic agent restarts the group,
    which resumes from the newest checkpoint and ends where an uninterrupted
    run ends, with every step in metrics.jsonl exactly once."""
    steps = ["training.steps=60", "checkpoint.interval=10", "logging.sample_tokens=0"]
    whole = train_run(tmp_path / "whole", debug_config, BASE + steps, nproc=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scaletrain", "train", "--config", str(debug_config), "--run-dir", str(run),
           "--nproc", "2", "--max-restarts", "1", *[a for o in BASE + steps for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 25):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-5000:]
    result = read_run(run)
    assert result.summary["resumed_from"] is not None  # it really restarted from a checkpoint
    assert [m["step"] for m in result.metrics] == list(range(1, 61))
    assert result.losses == whole.losses
    for name, value in whole.params.items():
        assert torch.equal(result.params[name], value), name


def test_dcp_metadata_is_never_unpickled_blindly(tmp_path):
    """A real DCP checkpoint reads through SafeReader; a .metadata that names
    a callable (here os.system) is refused before anything runs."""
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from scaletrain.checkpoint.safe_reader import SafeReader, UnsafeCheckpoint

    good = tmp_path / "good"
    dcp.save({"w": torch.ones(3, dtype=torch.bfloat16), "b": torch.zeros(2, 2)}, checkpoint_id=str(good),
             no_dist=True)
    assert set(SafeReader(str(good)).read_metadata().state_dict_metadata) == {"w", "b"}
    loaded = {"w": torch.zeros(3, dtype=torch.bfloat16), "b": torch.ones(2, 2)}
    dcp.load(loaded, storage_reader=SafeReader(str(good)), no_dist=True)
    assert torch.equal(loaded["w"], torch.ones(3, dtype=torch.bfloat16))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpoint, match="refusing to unpickle"):
        SafeReader(str(bad)).read_metadata()
    assert not marker.exists()
