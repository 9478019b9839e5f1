"""Documents: packing with document masks, padded rows, length-grouped and
token-budget batches, per-token loss normalization, validation; each rule
tested directly, then the whole path against single-process training."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import assert_parity, train_many
from scaletrain.config import ModelConfig, load_config
from scaletrain.data import DistributedBatchSampler, Rows, split_documents
from scaletrain.data.rows import _pieces, best_fit_decreasing
from scaletrain.errors import UserError
from scaletrain.model.llama import IGNORE_INDEX, Llama, cross_entropy_loss


def make_docs(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens, offsets of documents of the given token counts (values 1..99)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 100, size=sum(lengths)).astype(np.uint16)
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# --- the document mask: a packed row trains like each document alone -------------------------

def test_packed_row_gives_each_documents_own_losses_and_gradients():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=100, max_seq_len=64)
    model = Llama(cfg)
    model.init_weights(3)
    tokens, offsets = make_docs([9, 21, 6, 17])
    rows = Rows(tokens, offsets, np.arange(4), seq_len=64, packing="packed")
    assert rows.n_sequences == 1  # 8 + 20 + 5 + 16 pairs fit one row of 64
    batch = rows.batch([0], pad_to=64)
    packed_losses = torch.nn.functional.cross_entropy(
        model(batch.inputs, batch.positions, batch.doc_ids).flatten(0, 1), batch.targets.flatten(0, 1),
        ignore_index=IGNORE_INDEX, reduction="none").view(1, -1)
    packed_losses.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_total = 0.0
    for d in range(4):
        doc = torch.from_numpy(tokens[offsets[d]:offsets[d + 1]].astype(np.int64))[None]
        losses = torch.nn.functional.cross_entropy(model(doc[:, :-1]).flatten(0, 1), doc[0, 1:], reduction="none")
        columns = (batch.doc_ids[0] == int(batch.doc_ids[0][batch.targets[0] != IGNORE_INDEX][0]) + d)
        torch.testing.assert_close(packed_losses[0, columns], losses, rtol=1e-5, atol=1e-6)
        losses.sum().backward()
        alone_total += losses.sum().item()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (batch.targets[0][batch.doc_ids[0] == -1] == IGNORE_INDEX).all()  # no loss on padding
    assert batch.positions[0, :8].tolist() == list(range(8))  # positions restart per document


def test_padded_rows_one_document_each_and_no_loss_on_padding():
    tokens, offsets = make_docs([5, 40, 12])
    rows = Rows(tokens, offsets, np.arange(3), seq_len=16, packing="padded")
    assert rows.lengths.tolist() == [4, 16, 16, 7, 11]  # 39 pairs split 16 + 16 + 7
    assert rows.n_truncated == 1
    batch = rows.batch([0, 4])
    assert batch.inputs.shape == (2, 16)  # the longest row (11) rounded up to 8
    assert (batch.targets[0, 4:] == IGNORE_INDEX).all() and (batch.targets[0, :4] != IGNORE_INDEX).all()
    assert rows.target_count(np.array([0, 4])) == 15


def test_pieces_cover_every_pair_once():
    _, offsets = make_docs([150, 2, 65])
    start, pairs = _pieces(offsets, np.arange(3), 64)
    assert pairs.tolist() == [64, 64, 21, 1, 64]
    assert start.tolist() == [0, 64, 128, 150, 152]


def test_best_fit_decreasing_fills_rows_within_capacity():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 65, size=500)
    rows = best_fit_decreasing(sizes, 64)
    load = np.bincount(rows, weights=sizes)
    assert load.max() <= 64
    assert len(load) <= int(np.ceil(sizes.sum() / 64) * 11 / 9) + 1  # Johnson's bound
    assert (best_fit_decreasing(sizes, 64) == rows).all()  # deterministic


def test_stream_rows_are_the_old_windows():
    tokens, offsets = make_docs([30, 50, 45])
    rows = Rows(tokens, offsets, np.arange(3), seq_len=16, packing="stream")
    assert rows.seg_start.tolist() == [i * 16 for i in range((125 - 1) // 16)]
    batch = rows.batch([2])
    assert batch.positions is None and batch.inputs[0].tolist() == tokens[32:48].tolist()


def test_validation_split_is_by_document_and_fixed_by_the_seed():
    train, val = split_documents(100, 0.1, seed=5)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert (split_documents(100, 0.1, seed=5)[1] == val).all()
    assert not (split_documents(100, 0.1, seed=6)[1] == val).all()
    with pytest.raises(UserError, match="empty validation split"):
        split_documents(5, 0.01, seed=0)


# --- batching ----------------------------------------------------------------------------------

def _padding(sampler: DistributedBatchSampler, lengths: np.ndarray, steps: int) -> float:
    real = computed = 0
    for _ in range(steps):
        for micro in sampler.next_step().micro:
            real += lengths[micro].sum()
            computed += len(micro) * lengths[micro].max()
    return 1 - real / computed


def test_length_grouping_and_token_budget_cut_padding():
    lengths = np.random.default_rng(0).integers(4, 257, size=2000)
    fixed = _padding(DistributedBatchSampler(lengths, 32, seed=1, micro_batch_size=8), lengths, 50)
    grouped = _padding(DistributedBatchSampler(lengths, 32, seed=1, micro_batch_size=8, batching="length_grouped"),
                       lengths, 50)
    assert grouped < fixed / 3
    budget = DistributedBatchSampler(lengths, 32, seed=1, micro_batch_size=8, batching="token_budget", max_tokens=512)
    for _ in range(20):
        for micro in budget.next_step().micro:
            assert len(micro) * lengths[micro].max() <= 512


@pytest.mark.parametrize("batching", ["length_grouped", "token_budget"])
def test_batching_is_deterministic_even_and_resumes_under_another_dp_size(batching):
    lengths = np.random.default_rng(2).integers(4, 65, size=700)
    kwargs = dict(seed=3, micro_batch_size=2, batching=batching, max_tokens=256, group_size=4)
    single = DistributedBatchSampler(lengths, 8, **kwargs)
    ranks = [DistributedBatchSampler(lengths, 8, r, 2, **kwargs) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    seen = []
    for _ in range(single.steps_per_epoch):
        step = single.next_step()
        parts = [r.next_step() for r in ranks]
        assert [m.tolist() for p in parts for m in p.micro] == [m.tolist() for m in step.micro]
        assert len(parts[0].micro) == len(parts[1].micro)  # every rank runs the same micro-steps
        seen += step.rows.tolist()
    assert len(seen) == len(set(seen))  # no row twice in an epoch
    for _ in range(3):
        single.next_step()
    state = json.loads(json.dumps(single.state_dict()))
    expected = [single.next_step().rows.tolist() for _ in range(5)]
    resumed = [DistributedBatchSampler(lengths, 8, r, 4, **{**kwargs, "micro_batch_size": 1}) for r in range(4)]
    if batching == "token_budget":  # the step is micro batches: its count must stay
        with pytest.raises(UserError, match="micro_per_step"):
            resumed[0].load_state_dict(state)
        return
    for r in resumed:
        r.load_state_dict(state)
    for rows in expected:
        assert sorted(np.concatenate([m for r in resumed for m in r.next_step().micro]).tolist()) == sorted(rows)


def test_token_budget_below_the_longest_row_is_refused():
    with pytest.raises(UserError, match="max_tokens_per_batch = 32 is below the longest row"):
        DistributedBatchSampler(np.array([10, 64, 5]), 2, micro_batch_size=1, batching="token_budget",
                                max_tokens=32)


# --- the whole path, against one process -------------------------------------------------------

@pytest.fixture(scope="module")
def doc_config(tmp_path_factory, cache_dir) -> Path:
    """A JSONL corpus of 600 paragraphs of real text (10 to 300 characters) and a debug config on it."""
    root = tmp_path_factory.mktemp("docs")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paragraphs = []
    for path in sorted(stdlib.glob("*.py"))[:30]:
        paragraphs += [p.strip()[:300] for p in path.read_text(errors="replace").split("\n\n") if len(p.strip()) >= 10]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:600]))
    config = root / "docs.toml"
    config.write_text(f'[model]\nname = "debug"\n[data]\nsource = "{corpus}"\ncache_dir = "{cache_dir}"\n'
                      'seq_len = 64\nval_fraction = 0.1\n[training]\nsteps = 4\nglobal_batch_size = 8\n'
                      'micro_batch_size = 2\nwarmup_steps = 1\n[eval]\ninterval = 2\n[logging]\nsample_tokens = 0\n')
    return config


CASES_1 = {
    "packed_budget": ["data.packing=packed", "data.batching=token_budget", "data.max_tokens_per_batch=128"],
    "padded_grouped": ["data.packing=padded", "data.batching=length_grouped", "data.group_size=2"],
    "packed": ["data.packing=packed"],
}
CASES_2 = {  # (name, reference, overrides on 2 ranks)
    "ddp_packed_budget": ("packed_budget", CASES_1["packed_budget"]),
    "zero3_accum_padded_grouped": ("padded_grouped", CASES_1["padded_grouped"] + [
        "parallel.zero_stage=3", "training.micro_batch_size=1"]),
    "tp_sp_packed": ("packed", CASES_1["packed"] + ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp_packed": ("packed", CASES_1["packed"] + ["parallel.pp=2", "parallel.pp_microbatches=2"]),
    "stopped_budget": ("packed_budget", CASES_1["packed_budget"] + ["debug.stop_at_step=2"]),
}


def test_documents_train_alike_under_every_layout(tmp_path, doc_config):
    refs = train_many(tmp_path / "one", doc_config, CASES_1, nproc=1)
    runs = train_many(tmp_path / "two", doc_config, {name: overrides for name, (_, overrides) in CASES_2.items()},
                      nproc=2, timeout=400)
    # Resumed mid-epoch on one rank (was two): the same rows, nothing repeated or skipped.
    runs["stopped_budget"] = train_many(tmp_path / "two", doc_config, {"stopped_budget": CASES_1["packed_budget"]},
                                        nproc=1)["stopped_budget"]
    assert [m["step"] for m in runs["stopped_budget"].metrics] == [1, 2, 3, 4]
    for name, (ref, _) in CASES_2.items():
        assert_parity(refs[ref], runs[name], rtol=1e-4, atol=1e-5, param_atol=1e-4)
        val = [m["val_loss"] for m in runs[name].metrics if "val_loss" in m]
        expected = [m["val_loss"] for m in refs[ref].metrics if "val_loss" in m]
        assert len(val) == 2 and np.allclose(val, expected, rtol=1e-5), (name, val, expected)
    summary = refs["packed"].summary
    best = min((m["val_loss"], m["step"]) for m in refs["packed"].metrics if "val_loss" in m)
    assert (summary["best_val_loss"], summary["best_val_step"]) == best
    assert all(0 <= m["pad_fraction"] < 0.2 for m in refs["packed"].metrics)
    assert refs["packed_budget"].metrics[-1]["tokens"] > 0


# --- the cache: offsets, chat masks, checksums, parallel builders, more sources ----------------

def data_cfg(tmp_path: Path, **overrides):
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer=byte"])
    import dataclasses

    return dataclasses.replace(cfg.data, **overrides)


def test_cache_keeps_document_offsets_and_parallel_builders_write_the_same_files(tmp_path):
    from scaletrain.data import prepare_corpus

    texts = [f"document {i} " * (i % 7 + 1) for i in range(700)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    one = prepare_corpus(data_cfg(tmp_path, source=str(tmp_path / "c.jsonl"), num_workers=1), show_progress=False)
    offsets = one.offsets()
    assert len(offsets) == 701 and offsets[-1] == one.n_tokens
    assert bytes(one.tokens()[offsets[5]:offsets[6] - 1].astype(np.uint8)).decode() == texts[5]
    two = prepare_corpus(data_cfg(tmp_path / "b", source=str(tmp_path / "c.jsonl"), num_workers=2),
                         show_progress=False)
    for name in ("tokens.bin", "offsets.bin"):
        assert (one.tokens_path.parent / name).read_bytes() == (two.tokens_path.parent / name).read_bytes()


def test_a_corrupted_cache_is_detected_and_rebuilt(tmp_path, capsys):
    from scaletrain.data import prepare_corpus

    (tmp_path / "a.txt").write_text("hello documents " * 50)
    cfg = data_cfg(tmp_path, source=str(tmp_path / "a.txt"))
    corpus = prepare_corpus(cfg, show_progress=False)
    good = corpus.tokens_path.read_bytes()
    corpus.tokens_path.write_bytes(good[:10] + b"\xff" + good[11:])
    again = prepare_corpus(cfg, show_progress=False)
    assert "corrupted (checksum mismatch); rebuilding it" in capsys.readouterr().err
    assert again.tokens_path.read_bytes() == good


def test_chat_lines_train_only_on_assistant_turns(tmp_path):
    from scaletrain.data import prepare_corpus

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    corpus = prepare_corpus(data_cfg(tmp_path, source=str(tmp_path / "chat.jsonl"), format="chat"),
                            show_progress=False)
    tokens, mask = corpus.tokens(), corpus.loss_mask()
    trained = bytes(t for t, m in zip(tokens.tolist(), mask.tolist()) if m and t < 256).decode()
    assert trained == "Hello.\nBye.\n" and mask[-1] == 1  # and the final EOS
    full = bytes(t for t in tokens.tolist() if t < 256).decode()
    assert full.startswith("<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello.\n")
    rows = Rows(tokens, corpus.offsets(), np.arange(1), 256, "padded", mask)
    batch = rows.batch([0])
    assert rows.target_count(np.array([0])) == int(mask[1:].sum()) == int((batch.targets != IGNORE_INDEX).sum())


def test_a_datasets_save_to_disk_directory_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    from scaletrain.data import prepare_corpus

    datasets.Dataset.from_dict({"text": ["alpha beta", "", "gamma"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    corpus = prepare_corpus(data_cfg(tmp_path, source=str(tmp_path / "ds")), show_progress=False)
    assert corpus.n_documents == 2  # the empty row is skipped (and counted in a warning)
    assert bytes(corpus.tokens()[:10].astype(np.uint8)).decode() == "alpha beta"


@pytest.mark.parametrize("line, fmt, message", [
    ('{"text": 5}', "jsonl", "field 'text' is a int, not a string"),
    ('{"prompt": "hi"}', "chat", "no 'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "chat", r"messages\[0\] needs a 'role'"),
])
def test_bad_documents_are_one_line_errors(tmp_path, line, fmt, message):
    from scaletrain.data import prepare_corpus

    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        prepare_corpus(data_cfg(tmp_path, source=str(tmp_path / "bad.jsonl"), format=fmt), show_progress=False)
    assert not any(p.name == "meta.json" for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("overrides, needle", [
    (["data.packing=packed", "data.batching=token_budget", "data.max_tokens_per_batch=32"],
     "data.max_tokens_per_batch = 32 is below the longest row (64 tokens"),
    (["data.batching=token_budget"], "data.batching = token_budget needs data.max_tokens_per_batch"),
    (["data.val_fraction=0.0001"], "leaves an empty validation split"),
    (["data.val_fraction=0.5", "data.val_source=x"], "choose one validation split"),
])
def test_bad_data_settings_are_refused_before_anything_is_written(tmp_path, capsys, doc_config, overrides, needle):
    from test_cli import assert_one_line_error, run_main

    args = ["train", "--config", str(doc_config), "--run-dir", str(tmp_path / "run")]
    code, _, err = run_main(capsys, args + [a for o in overrides for a in ("--set", o)])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_a_text_file_larger_than_a_block_streams_as_paragraph_documents(tmp_path, monkeypatch):
    from scaletrain.data import sources

    paragraphs = [f"paragraph {i} " + "é" * (i % 13) for i in range(40)]
    text = "\n\n".join(paragraphs)
    (tmp_path / "big.txt").write_text(text)
    whole = list(sources.read_documents(tmp_path / "big.txt", "text", "text"))
    assert whole == [text]  # under the block size: one document, as always
    monkeypatch.setattr(sources, "TEXT_BLOCK_BYTES", 64)
    docs = list(sources.read_documents(tmp_path / "big.txt", "text", "text"))
    assert len(docs) > 5 and "".join(docs) == text  # nothing lost, multi-byte characters intact
    assert all(d.endswith("\n\n") for d in docs[:-1])


def test_ranks_waiting_for_the_cache_builder_give_up_with_a_clear_error():
    from datetime import timedelta
    from types import SimpleNamespace

    from torch.distributed import TCPStore

    from scaletrain.train.checks import wait_for_data

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5))
    waiting = SimpleNamespace(distributed=True, local_rank=1)
    with pytest.raises(RuntimeError, match="local rank 0 did not finish building the token cache within "
                                           "data.cache_timeout = 0.3 s"):
        wait_for_data(waiting, 0.3, store)
    wait_for_data(SimpleNamespace(distributed=True, local_rank=0), 0.3, store)  # the builder says it is done
    wait_for_data(waiting, 0.3, store)  # and then nobody waits
