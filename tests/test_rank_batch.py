"""Per-rank batch sizes (parallel.rank_batch, [[gpu_groups]]): uneven splits
of the global batch train exactly like one process under DDP, ZeRO-1 and
ZeRO-3, also with different micro-step counts per rank (DDP); auto
gives a rank slowed by debug.slowdown fewer rows; resuming under another
split keeps the data position; bad lists are one error line."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from harness import assert_parity, run_cli, train_many, train_run

from scaletrain.config import load_config, parse_gpu_groups, parse_rank_batch
from scaletrain.data.sampler import DistributedBatchSampler
from scaletrain.errors import UserError
from scaletrain.train.rank_batch import group_split, split_proportional

GROUPS = """
[[gpu_groups]]
name = "fast"
ranks = "0"
micro_batch = 3
accumulation = 2

[[gpu_groups]]
name = "slow"
hosts = "*"
micro_batch = 2
"""
BASE = ["training.steps=4", "training.micro_batch_size=2", "logging.sample_tokens=0", "logging.breakdown=false"]


def test_uneven_splits_match_one_process(tmp_path, debug_config):
    stop = ["debug.stop_at_step=2", "checkpoint.interval=1"]
    runs = train_many(tmp_path, debug_config, {
        "ddp": BASE + ["parallel.rank_batch=6,2"],
        "zero1": BASE + ["parallel.rank_batch=2,6", "parallel.zero_stage=1"],
        "zero3": BASE + ["parallel.rank_batch=6,2", "parallel.zero_stage=3"],
        "auto": BASE + ["parallel.rank_batch=auto", "debug.slowdown=1:4"],
        # steps 1-2 split 6,2, then resumed from the step-2 checkpoint split 2,6
        "first": BASE + stop + ["parallel.rank_batch=6,2"],
        "resumed": BASE + ["parallel.rank_batch=2,6", f"checkpoint.dir={tmp_path / 'first' / 'checkpoints'}"],
    }, nproc=2)
    single = train_run(tmp_path / "single", debug_config, BASE)
    # [[gpu_groups]]: rank 0 takes 2 micro-steps of 3 rows, rank 1 (by host pattern) one of 2
    groups = tmp_path / "groups.toml"
    groups.write_text(debug_config.read_text() + GROUPS)
    runs["groups"] = train_run(tmp_path / "groups", groups, BASE, nproc=2)
    for name in ("ddp", "zero1", "zero3", "auto", "groups"):
        assert_parity(single, runs[name])
    first, resumed = runs["first"], runs["resumed"]
    assert resumed.summary["resumed_from"].endswith("step_00000002")
    assert [m["step"] for m in first.metrics + resumed.metrics] == [1, 2, 3, 4]
    np.testing.assert_allclose(first.losses + resumed.losses, single.losses, rtol=1e-5)
    assert_parity(single, dataclasses.replace(resumed, losses=single.losses))  # the final parameters
    events = [json.loads(line) for line in (tmp_path / "auto" / "events.jsonl").read_text().splitlines()]
    (probe,) = [e for e in events if e["kind"] == "rank_batch"]
    # rank 1 sleeps 3x its work time: it measures slower and gets fewer rows (at least 2, one per micro-step)
    assert probe["rows_per_s"][0] > 2 * probe["rows_per_s"][1]
    assert probe["rank_rows"][0] > probe["rank_rows"][1] >= 2 and sum(probe["rank_rows"]) == 8


def test_sampler_cuts_the_same_global_batch_by_rank_rows():
    def take(rank, rank_rows):
        s = DistributedBatchSampler(100, 8, rank, 2, seed=3, micro_batch_size=2)
        s.set_rank_rows(rank_rows)
        steps = [s.next_step() for _ in range(3)]
        return steps, s.state_dict()

    even = [take(r, None) for r in range(2)]
    split = [take(r, [6, 2]) for r in range(2)]
    for k in range(3):
        rows = even[0][0][k].rows
        assert np.array_equal(split[0][0][k].rows, rows)  # the same global batch
        mine = [np.concatenate(split[r][0][k].micro) for r in range(2)]
        assert [len(m) for m in mine] == [6, 2] and np.array_equal(np.concatenate(mine), rows)
        assert [len(m) for m in split[0][0][k].micro] == [3, 3]  # 2 micro-steps on every rank
    assert split[0][1] == even[0][1]  # the position does not depend on the split
    with pytest.raises(UserError, match="do not split"):
        DistributedBatchSampler(100, 8, 0, 2, micro_batch_size=2).set_rank_rows([4, 3])


@pytest.mark.parametrize("total, speeds, minimum, shares", [
    (8, [3.0, 1.0], 1, [6, 2]), (8, [1.0, 1.0], 1, [4, 4]), (8, [3.4, 1.0], 2, [5, 3]),
    (10, [1.0, 1.0, 1.0], 1, [4, 3, 3]), (16, [100.0, 1.0], 4, [12, 4]),
])
def test_split_proportional(total, speeds, minimum, shares):
    assert split_proportional(total, speeds, minimum) == shares


def test_rank_batch_specs():
    assert parse_rank_batch("") is None and parse_rank_batch("auto") == "auto"
    assert parse_rank_batch("6,2") == [6, 2] == parse_rank_batch("[6, 2]")
    for bad, needle in [("6,x", "positive integers"), ("0,8", "positive integers")]:
        with pytest.raises(UserError, match=needle):
            parse_rank_batch(bad)
    for overrides, needle in [(["parallel.rank_batch=6,1"], "sums to 7; it must sum to"),
                              (["parallel.rank_batch=auto", "parallel.tp=2"], "needs tp = 1 and pp = 1"),
                              (["parallel.rank_batch=auto", "data.batching=token_budget",
                                "data.max_tokens_per_batch=512"], "needs data.batching = 'fixed'"),
                              (["debug.slowdown=1:0.5"], "debug.slowdown")]:
        with pytest.raises(UserError, match=needle):
            load_config(None, ["training.global_batch_size=8", "training.micro_batch_size=2", *overrides])


def test_wrong_length_is_one_error_line_before_workers_start(tmp_path, debug_config):
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "r"), "--nproc", "2",
                    "--set", "parallel.rank_batch=4,2,2", "--set", "training.micro_batch_size=2"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: parallel.rank_batch = '4,2,2' has 3 entries")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_gpu_groups_resolve_and_refuse():
    cfg = load_config(None, ["training.global_batch_size=8", "training.micro_batch_size=2"])
    fast = {"name": "fast", "hosts": "a100-*", "micro_batch": 3, "accumulation": 1}
    slow = {"name": "slow", "ranks": "2-3", "micro_batch": 1, "accumulation": 1}
    cfg = dataclasses.replace(cfg, gpu_groups=[fast, slow])
    hosts = ["a100-1", "a100-1", "v100-1", "v100-1"]
    assert group_split(cfg, None, 4, 1) is None  # host patterns wait for the workers
    assert group_split(cfg, hosts, 4, 1) == ([3, 3, 1, 1], [1, 1, 1, 1])
    for groups, world, host_list, needle in [
        ([fast, slow], 4, ["v100-1"] * 4, "fast: hosts = 'a100-*' match no rank"),
        ([{**slow, "ranks": "4-5"}], 4, None, "ranks 4-5 match no rank of this job (ranks 0-3)"),
        ([fast, {**slow, "micro_batch": 2}], 4, hosts, "10 in all; training.global_batch_size is 8"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            group_split(dataclasses.replace(cfg, gpu_groups=groups), host_list, world, 1)
    for group, needle in [({"name": "x", "micro_batch": 2}, "exactly one of ranks"),
                          ({"name": "x", "ranks": "3-1", "micro_batch": 2}, "ranks = '3-1'"),
                          ({"name": "x", "ranks": "0", "micro_batch": 0}, "must be integers >= 1"),
                          ({"name": "x", "ranks": "0", "micro_batch": 2, "gpus": 8}, "unknown key(s) gpus")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            parse_gpu_groups([group])


def test_measured_pipeline_speeds_give_the_slow_rank_fewer_layers(tmp_path, debug_config):
    """parallel.pp_rank_speeds = auto: rank 1, slowed 3x, measures slower and
    its stage gets fewer layers; training still matches one process."""
    from scaletrain.observe.events import read_events

    shape = BASE + ["model.n_layers=6"]
    ref = train_many(tmp_path / "one", debug_config, {"ref": shape}, nproc=1)["ref"]
    run = train_many(tmp_path / "two", debug_config, {"pp_auto": shape + [
        "parallel.pp=2", "parallel.pp_rank_speeds=auto", "debug.slowdown=1:3"]}, nproc=2)["pp_auto"]
    assert_parity(ref, run, rtol=1e-5, atol=1e-6, param_atol=1e-5)
    event = next(e for e in read_events(run.run_dir) if e["kind"] == "pp_rank_speeds")
    speeds = [float(s) for s in event["speeds"].split(",")]
    assert speeds[0] == 1.0 and speeds[1] < 0.6, event
    params = {r["rank"]: r["params_bytes"] for r in run.summary["state_bytes_by_rank"]}
    assert params[0] > 1.5 * params[1]  # the fast rank holds more layers (and the embedding)
