"""Communication hooks and precision negotiation, as pure functions and on a
one-rank gloo group; bad specs are one error line before anything starts.
(The multi-rank behaviour is in test_cluster.py.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from harness import run_cli

from scaletrain.config import load_config, parse_compression
from scaletrain.errors import UserError
from scaletrain.parallel.comm_hooks import CommStats, TopKState, topk_hook
from scaletrain.train.precision import choose_dtype


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


class FakeBucket:
    """The part of dist.GradBucket a hook reads."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def buffer(self) -> torch.Tensor:
        return self.tensor

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def test_topk_sends_the_largest_entries_and_keeps_the_rest(one_rank_group):
    """Error feedback loses nothing: what was sent over all steps plus the
    residual equals the sum of the gradients; each step sends k entries."""
    torch.manual_seed(0)
    state = TopKState(one_rank_group, fraction=0.25, stats=CommStats(compressing=True))
    grads = [torch.randn(64) for _ in range(5)]
    sent = [topk_hook(state, FakeBucket(g.clone())).value() for g in grads]
    assert torch.equal(sent[0], grads[0])  # the first step all-reduces in full (DDP rebuilds buckets after it)
    for out in sent[1:]:
        assert int((out != 0).sum()) == 16
    torch.testing.assert_close(sum(sent) + state.residuals[0], sum(grads))
    # The largest-magnitude entry of (gradient + residual) is always among those sent.
    g = torch.randn(64) * 10
    expected = g + state.residuals[0]
    out = topk_hook(state, FakeBucket(g.clone())).value()
    assert out[expected.abs().argmax()] == expected[expected.abs().argmax()]
    metrics = state.stats.take()
    assert metrics["compression_ratio"] == pytest.approx((64 * 4 * 6) / (64 * 4 + 5 * 16 * 8))
    assert state.stats.take() == {"grad_comm_bytes": 0}


@pytest.mark.parametrize("spec, parsed", [("none", ("none", 0)), ("bf16", ("bf16", 0)), ("powersgd:4", ("powersgd", 4)),
                                          ("topk:0.01", ("topk", 0.01)), ("topk:1", ("topk", 1.0))])
def test_compression_specs(spec, parsed):
    assert parse_compression(spec) == parsed


@pytest.mark.parametrize("spec", ["topk", "topk:0", "topk:1.5", "topk:nan", "powersgd:0", "powersgd:2.5", "bf16:2",
                                  "fp8", ""])
def test_bad_compression_specs(spec):
    with pytest.raises(UserError, match="parallel.grad_compression"):
        parse_compression(spec)


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.grad_compression=topk:2"], "parallel.grad_compression = 'topk:2'; allowed: none, bf16"),
    (["parallel.grad_compression=bf16", "parallel.zero_stage=3"], "needs plain DDP"),
    (["debug.supported_dtypes=1:fp8"], "debug.supported_dtypes = '1:fp8'"),
])
def test_bad_comm_config_is_one_error_line(tmp_path, debug_config, overrides, needle):
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "r"), "--nproc", "2",
                    *[a for o in overrides for a in ("--set", o)]], timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_comm_hook_rules_at_load():
    assert load_config(None, ["parallel.dp_allreduce=hierarchical"]).parallel.dp_allreduce == "hierarchical"
    for overrides, needle in [(["parallel.dp_allreduce=hierarchical", "parallel.grad_compression=bf16"], "choose one"),
                              (["parallel.dp_allreduce=hierarchical", "parallel.tp=2"], "is a DDP communication hook"),
                              (["parallel.dp_allreduce=ring"], "allowed: flat, hierarchical")]:
        with pytest.raises(UserError, match=needle):
            load_config(None, overrides)


@pytest.mark.parametrize("requested, supported, allow_fp16, chosen", [
    ("bf16", [("bf16", "fp16", "fp32")] * 2, True, "bf16"),
    ("bf16", [("bf16", "fp16", "fp32"), ("fp16", "fp32")], True, "fp16"),  # an A100 with a V100
    ("bf16", [("bf16", "fp16", "fp32"), ("fp16", "fp32")], False, "fp32"),  # no loss scaler under ZeRO-2/3, TP, PP
    ("bf16", [("bf16", "fp16", "fp32"), ("fp32",)], True, "fp32"),
    ("fp16", [("bf16", "fp16", "fp32")] * 2, True, "fp16"),  # never above what was asked for
    ("fp32", [("fp32",)], True, "fp32"),
])
def test_negotiated_dtype(requested, supported, allow_fp16, chosen):
    assert choose_dtype(requested, supported, allow_fp16) == chosen


def test_no_common_dtype_is_an_error():
    with pytest.raises(UserError, match="rank 1: bf16"):
        choose_dtype("fp32", [("fp32",), ("bf16",)], True)
