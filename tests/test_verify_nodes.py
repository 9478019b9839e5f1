"""plan --verify --nodes 2: layouts that span two network-namespace nodes
(127.0.0.1 without root) measured against the planner, rank by rank."""

from __future__ import annotations

import pytest

from scaletrain.planner.hardware import load_catalog
from scaletrain.planner.verify import verify

SETTINGS = ["model.name=debug", "data.tokenizer=byte", "data.seq_len=64", "training.global_batch_size=8",
            "training.micro_batch_size=4", "training.dtype=fp32", "logging.sample_tokens=0",
            "checkpoint.enable=false"]


@pytest.mark.timeout(400)
def test_verify_across_two_nodes_is_exact_on_states_collectives_and_hook_bytes(corpus_dir, cache_dir):
    settings = SETTINGS + [f"data.source={corpus_dir}", f"data.cache_dir={cache_dir}"]
    result = verify(load_catalog()["a100-80g"], ["ddp 2x2 hierarchical", "zero3 2x1"], steps=4,
                    settings=settings, progress=lambda _: None, nodes=2)
    assert {r["layout"] for r in result["ranks"]} == {"ddp 2x2 hierarchical", "zero3 2x1"}
    assert len(result["ranks"]) == 6  # 4 + 2 ranks
    for row in result["ranks"]:
        assert row["states_predicted"] == row["states_measured"], row
        assert row["collectives_predicted"] == row["collectives_measured"], row
        assert abs(row["peak_predicted"] / row["peak_measured"] - 1) <= 0.15, row
    (hook,) = result["hooks"]
    assert hook["what"] == "inter-node bytes" and hook["predicted"] == hook["measured"] > 0
