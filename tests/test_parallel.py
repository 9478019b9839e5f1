"""Every parallel layout reproduces single-process training of the same global
batch: per-step losses and final full parameters within fp32 tolerance.

Cases of one world size share one torchrun launch (start-up dominates on 2 CPU
cores); each case is still a full Trainer run with its own mesh and run dir."""

import pytest
from harness import assert_parity, train_many

BASE = ["training.steps=4", "training.global_batch_size=8", "training.micro_batch_size=2", "model.n_layers=4"]
# Uneven shapes: 3 layers over 2 pipeline stages; vocab 259 and ffn 190 over 3 shards / 2 TP ranks.
UNEVEN = ["training.steps=4", "training.global_batch_size=12", "training.micro_batch_size=2",
          "model.n_layers=3", "model.vocab_size=259", "model.ffn_dim=190"]

CASES = {
    2: {
        "zero1": BASE + ["parallel.zero_stage=1"],
        "zero2": BASE + ["parallel.zero_stage=2"],
        "zero3": BASE + ["parallel.zero_stage=3"],
        "tp": BASE + ["parallel.tp=2"],
        "tp_sp": BASE + ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "pp_gpipe": BASE + ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
        "pp_1f1b": BASE + ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
        "pp_interleaved_1f1b": BASE + ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
        "pp_interleaved_zb": BASE + ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"],
        "pp_zbv": BASE + ["parallel.pp=2", "parallel.pp_schedule=zbv"],
        "uneven_pp": UNEVEN + ["parallel.pp=2"],
        "uneven_tp_vocab": UNEVEN + ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "zero3_bf16": BASE + ["parallel.zero_stage=3", "training.dtype=bf16"],
        # Reduce-scatter every micro-step instead of holding the unsharded gradient (2 micro-steps here).
        "zero2_fsdp_accumulate_sharded": BASE + ["parallel.zero_stage=2", "parallel.fsdp_accumulate=sharded"],
        "zero3_fsdp_accumulate_sharded": BASE + ["parallel.zero_stage=3", "parallel.fsdp_accumulate=sharded"],
        # Speed-aware stages: rank 1 three times as fast takes 3 of the 4 layers.
        "pp_rank_speeds": BASE + ["parallel.pp=2", "parallel.pp_rank_speeds=1,3"],
    },
    3: {
        "uneven_zero3": UNEVEN + ["parallel.zero_stage=3"],
        "uneven_zero1": UNEVEN + ["parallel.zero_stage=1"],
    },
    4: {
        "hsdp_2x2": BASE + ["parallel.zero_stage=3", "parallel.dp_replicate=2", "parallel.dp_shard=2"],
        "fsdp_x_tp_2x2": BASE + ["parallel.zero_stage=3", "parallel.dp_shard=2", "parallel.tp=2"],
        "pp_x_dp_2x2": BASE + ["parallel.pp=2", "parallel.dp_replicate=2"],
        "pp_x_zero2_interleaved": BASE + ["parallel.pp=2", "parallel.zero_stage=2", "parallel.dp_shard=2",
                                          "parallel.pp_schedule=interleaved_1f1b"],
        "tp_x_pp_sp": BASE + ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    },
    8: {
        "dp_x_tp_x_pp_2x2x2": BASE + ["parallel.dp_replicate=2", "parallel.tp=2", "parallel.pp=2"],
    },
}
ALL = [(n, name) for n, cases in CASES.items() for name in cases if not name.endswith("bf16")]


@pytest.fixture(scope="module")
def references(tmp_path_factory, debug_config):
    return train_many(tmp_path_factory.mktemp("refs"), debug_config, {"base": BASE, "uneven": UNEVEN}, nproc=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, debug_config):
    cache: dict = {}

    def get(nproc: int):
        if nproc not in cache:
            cache[nproc] = train_many(tmp_path_factory.mktemp(f"world{nproc}"), debug_config, CASES[nproc],
                                      nproc=nproc, timeout=600)
        return cache[nproc]

    return get


@pytest.mark.parametrize("nproc, name", ALL, ids=[f"{n}proc-{name}" for n, name in ALL])
def test_layout_matches_single_process(references, runs, nproc, name):
    result = runs(nproc)[name]
    assert result.summary["world_size"] == nproc
    reference = references["uneven" if name.startswith("uneven") else "base"]
    assert_parity(reference, result)


def test_zero_stages_shard_what_they_promise(references, runs):
    """Per-rank bytes of parameters, gradients and optimizer states, counted
    from the local tensors: stage k holds 1/dp_shard of what it shards."""
    full = references["base"].summary["state_bytes_by_rank"][0]
    n_tensors = 2 * 4 + 4 * 7 + 3  # 2 norms + 7 matrices per block, 4 blocks, embedding, final norm, head
    step_bytes = n_tensors * 4  # AdamW keeps one fp32 'step' scalar per parameter, unsharded
    adam_full = full["optimizer_bytes"] - step_bytes
    assert adam_full == 2 * full["params_bytes"]  # exp_avg + exp_avg_sq
    largest_param = 320 * 64 * 4
    runs2 = runs(2)
    for rank in runs2["zero1"].summary["state_bytes_by_rank"]:
        assert rank["params_bytes"] == full["params_bytes"] and rank["grads_bytes"] == full["grads_bytes"]
        # ZeroRedundancyOptimizer partitions whole parameters: balanced up to one parameter.
        assert abs(rank["optimizer_bytes"] - adam_full / 2) <= 2 * largest_param + step_bytes
    for stage in ("zero2", "zero3"):
        for rank in runs2[stage].summary["state_bytes_by_rank"]:
            # Every dimension is even here, so FSDP's dim-0 shards need no padding.
            assert rank["grads_bytes"] == full["grads_bytes"] / 2
            assert rank["optimizer_bytes"] == adam_full / 2 + step_bytes
            # FSDP2 reshards after backward in both stages: at rest parameters are sharded too.
            assert rank["params_bytes"] == full["params_bytes"] / 2


def test_fsdp_mixed_precision_trains_close_to_fp32(references, runs):
    """bf16 compute with fp32 master weights and fp32 gradient reduction."""
    import torch

    result = runs(2)["zero3_bf16"]
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(references["base"].losses), rtol=0.03, atol=0)
    assert all(p.dtype == torch.float32 for p in result.params.values())
