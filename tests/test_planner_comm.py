"""Planner: DDP's gradient exchange options (tree vs ring, hierarchical,
compression) and per-rank batch plans for mixed clusters (issue 16, item 8).
Pure functions only; no process is launched."""

from __future__ import annotations

import dataclasses
import math

import pytest

from scaletrain.config import MODEL_PRESETS, Config, ModelConfig, apply_overrides
from scaletrain.planner import formulas
from scaletrain.planner.communication import all_reduce_time, collectives, ddp_hook_collectives
from scaletrain.planner.estimate import estimate, explain
from scaletrain.planner.hardware import load_catalog, parse_cluster
from scaletrain.planner.layout import Coord, Layout, Workload, layout_from_config, local_params
from scaletrain.planner.rank_plan import compute_factor, plan_rank_batch, rank_speeds
from scaletrain.planner.search import search, train_overrides
from scaletrain.train.rank_batch import split_proportional

MODEL = ModelConfig(name="125m", **{**MODEL_PRESETS["125m"], "vocab_size": 32000})
W = Workload(MODEL, 1024, 64, "bf16")


def test_tree_for_small_messages_ring_for_large():
    bw, lat = 10e9, 5e-6
    t_small, algo_small = all_reduce_time(4, 16, bw, lat)
    assert algo_small == "tree" and t_small == pytest.approx(2 * 4 * (lat + 4 / bw))  # 2 ceil(log2 16) steps
    t_big, algo_big = all_reduce_time(1e9, 16, bw, lat)
    assert algo_big == "ring" and t_big == pytest.approx(2 * 15 / 16 * 1e9 / bw + 2 * 15 * lat)
    # Two ranks: the same latency terms, the ring moves half the bytes per step.
    assert all_reduce_time(1e6, 2, bw, lat)[1] == "ring"
    # The crossover moves with the rank count: at 1 MB, 64 ranks pay 126 ring latencies.
    assert all_reduce_time(1e6, 64, bw, 50e-6)[1] == "tree"
    assert formulas.tree_all_reduce_time(1e6, 1, bw, lat) == 0.0


def _params(layout):
    return local_params(MODEL, layout, Coord())


def test_hierarchical_collectives_follow_the_hook():
    lay = Layout(dp_replicate=16, micro_batch=1, dp_allreduce="hierarchical")
    grad = sum(n for _, n, _ in _params(lay)) * 4
    cuda = ddp_hook_collectives(lay, _params(lay), 8, "cuda")
    assert [(c.kind, c.group, c.ranks) for c in cuda] == [("reduce_scatter", "dp_node", 8),
                                                          ("all_reduce", "dp_nodes", 2), ("all_gather", "dp_node", 8)]
    assert cuda[1].bytes == pytest.approx(grad / 8)  # only the 1/local shard crosses nodes
    gloo = ddp_hook_collectives(lay, _params(lay), 8, "cpu")  # in-node all-reduce + a broadcast per slot
    assert [c.kind for c in gloo] == ["all_reduce", "all_reduce", "broadcast"] and gloo[2].calls == 8 * gloo[0].calls
    one_node = ddp_hook_collectives(lay, _params(lay), 16, "cuda")  # the trainer falls back to flat
    assert [(c.kind, c.bytes) for c in one_node] == [("all_reduce", grad)]


def test_hierarchical_wins_on_a_slow_inter_node_link_and_loses_on_a_fast_one():
    catalog = load_catalog()
    flat = Layout(dp_replicate=16, micro_batch=1)
    hier = dataclasses.replace(flat, dp_allreduce="hierarchical")
    slow = parse_cluster(catalog, "rtx-4090", 16, 8)  # 10 GbE between nodes
    assert estimate(W, hier, slow).comm_time_s["dp"] < 0.8 * estimate(W, flat, slow).comm_time_s["dp"]
    # Inter-node as fast as intra-node, on gloo (the hook's in-node all-reduce + one broadcast per slot moves
    # ~2.9 S against the flat ring's ~1.9 S): hierarchical loses. (With NCCL's reduce-scatter/all-gather the
    # alpha-beta model never has it lose: 1.875 S/B either way, fewer latency terms.)
    a100 = catalog["a100-80g"]
    fast_device = dataclasses.replace(a100, inter_gbps=a100.intra_gbps, inter_latency_us=0, intra_latency_us=0)
    fast = dataclasses.replace(slow, kinds=((fast_device, 16),))
    assert estimate(W, hier, fast, "cpu").comm_time_s["dp"] > 1.3 * estimate(W, flat, fast, "cpu").comm_time_s["dp"]
    assert estimate(W, hier, fast).comm_time_s["dp"] <= estimate(W, flat, fast).comm_time_s["dp"]


def test_compressed_bytes():
    lay = Layout(dp_replicate=4)
    params = [("w", 64 * 64, (64, 64)), ("tiny", 8 * 8, (8, 8)), ("b", 64, (64,))]
    flat = 4 * (64 * 64 + 64 + 64)
    bf16 = ddp_hook_collectives(dataclasses.replace(lay, grad_compression="bf16"), params, 0, "cuda")
    assert bf16[0].bytes * 2 == flat
    # PowerSGD rank 4: the 64x64 matrix sends P and Q, (64+64)x4 fp32; the 8x8 one would send (8+8)x4 x 2 >= 64
    # (min_compression_rate 2), so it goes uncompressed with the vector.
    dense, low = ddp_hook_collectives(dataclasses.replace(lay, grad_compression="powersgd:4"), params, 0, "cuda")
    assert low.bytes == (64 + 64) * 4 * 4 and dense.bytes == (64 + 64) * 4 and low.calls == 2 * dense.calls
    # top-k: each rank's values + int32 indices, all-gathered: bytes grow with the world size.
    for dp in (4, 8):
        (gather,) = ddp_hook_collectives(Layout(dp_replicate=dp, grad_compression="topk:0.1"), params, 0, "cuda")
        assert gather.kind == "all_gather" and gather.bytes == dp * int(0.1 * (64 * 64 + 128)) * 8


def test_ddp_options_in_search_explain_and_printed_commands():
    cluster = parse_cluster(load_catalog(), "rtx-4090", 16, 8)
    estimates = search(W, cluster, micro_batch=1)
    ddp = {(e.layout.dp_allreduce, e.layout.grad_compression): e for e in estimates
           if e.layout.engine == "ddp" and e.layout.activation_checkpointing == "none"}
    assert set(ddp) == {("flat", "none"), ("hierarchical", "none"), ("flat", "bf16")}
    flat = ddp["flat", "none"]
    assert ddp["hierarchical", "none"].step_time_s < flat.step_time_s
    text = "\n".join(explain(W, flat, cluster))
    assert "DDP gradient exchange" in text and "powersgd:4" in text and "topk:0.01" in text
    for e in ddp.values():
        overrides = train_overrides(W, e.layout)
        assert (any("dp_allreduce" in o or "grad_compression" in o for o in overrides)
                == (e.layout != flat.layout))
        cfg = apply_overrides(Config(), overrides)  # the trainer's validation
        assert layout_from_config(cfg, 16, 1) == e.layout
    # No bf16 on the device: no bf16 compression offered.
    v100 = parse_cluster(load_catalog(), "v100-32g", 16, 8)
    assert not any(e.layout.grad_compression != "none" for e in search(dataclasses.replace(W, dtype="fp16"), v100,
                                                                          micro_batch=1))


def test_rank_batch_plan_for_a_mixed_cluster():
    cluster = parse_cluster(load_catalog(), "a100-80g:4,h100-sxm:4", 8, 4)
    # 64 / (4 x 8) = 2 micro-steps: at least 2 rows each (the trainer's minimum), 48 rows to share by speed.
    lay = Layout(dp_replicate=8, micro_batch=4)
    rows = plan_rank_batch(W, lay, cluster)
    speeds = rank_speeds(cluster, "bf16")
    assert list(rows) == split_proportional(64, speeds, 2) and sum(rows) == 64
    assert rows[:4] == (rows[0],) * 4 and rows[4] > rows[0]  # the H100s take more
    split = dataclasses.replace(lay, rank_batch=rows)
    factor = compute_factor(W, split, cluster)
    assert factor == pytest.approx(max(r / s for r, s in zip(rows, speeds)) / (64 / 8 / min(speeds)))
    assert factor < 0.9
    even, uneven = estimate(W, lay, cluster), estimate(W, split, cluster)
    assert uneven.step_time_s < even.step_time_s and uneven.compute_s == pytest.approx(even.compute_s * factor)
    assert "per-rank rows" in "\n".join(explain(W, uneven, cluster))
    # Not split: one kind of device, or TP (the trainer splits data-parallel rows only).
    assert plan_rank_batch(W, lay, parse_cluster(load_catalog(), "a100-80g", 8, 4)) == ()
    assert plan_rank_batch(W, Layout(dp_replicate=4, tp=2, micro_batch=2), cluster) == ()


def test_mixed_cluster_search_prints_a_rank_batch_the_trainer_accepts():
    cluster = parse_cluster(load_catalog(), "a100-80g:4,h100-sxm:4", 8, 4)
    estimates = [e for e in search(W, cluster, micro_batch=2) if e.fits]
    best_split = next(e for e in estimates if e.layout.rank_batch)
    best_even = next(e for e in estimates if not e.layout.rank_batch and e.layout.tp == 1 and e.layout.pp == 1)
    assert best_split.step_time_s < best_even.step_time_s
    for e in (best_split, next(e for e in estimates if e.layout.rank_batch and e.layout.zero_stage == 3)):
        cfg = apply_overrides(Config(), train_overrides(W, e.layout))
        assert cfg.parallel.rank_batch == ",".join(map(str, e.layout.rank_batch))
        # a rank's largest share is checked against its own memory at its larger micro batch
        assert e.total_bytes > 0 and math.isfinite(e.step_time_s)


def test_a_rank_batch_split_keeps_the_held_gradient_of_its_accumulation():
    """A faster rank's larger micro batch is planned at the job's accumulation
    count, so FSDP's held full gradient stays (it went to 0 when the larger
    micro batch was divided into the global batch as if it were everyone's)."""
    from scaletrain.planner.layout import accum
    from scaletrain.planner.memory import held_gradient_bytes, worst_ranks
    from scaletrain.planner.rank_plan import rank_micro_batches

    cluster = parse_cluster(load_catalog(), "a100-80g:8,h100-sxm:8", 16, 8)
    w = dataclasses.replace(W, global_batch=256)
    lay = Layout(dp_shard=16, zero_stage=2, micro_batch=8, rank_batch=(11,) * 8 + (21,) * 8)
    assert accum(w, lay) == 2
    rows = rank_micro_batches(w, lay, cluster)
    assert rows and all(accum(w_rank, l) == 2 for w_rank, l, _ in rows)
    assert all(held_gradient_bytes(w_rank, l, worst_ranks(l)[0]) > 0 for w_rank, l, _ in rows)
