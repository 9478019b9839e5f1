import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaletrain.config import DataConfig
from scaletrain.data import (ByteTokenizer, DistributedBatchSampler, HFTokenizer, Rows,
                             prepare_corpus, read_documents, resolve_files, train_bpe)
from scaletrain.data import cache as cache_module
from scaletrain.errors import UserError


def data_config(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_id]) == text


def test_bpe_trains_saves_and_loads(tmp_path, corpus_dir):
    docs = (doc for f in resolve_files(str(corpus_dir)) for doc in read_documents(f, "auto", "text"))
    path = train_bpe(docs, 512, tmp_path / "tok" / "tokenizer.json", show_progress=False)
    tok = HFTokenizer(path)
    assert tok.vocab_size == 512 and tok.eos_id is not None
    text = "import os\n\ndef main():\n    return os.getcwd()\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 1.5  # it actually merged something
    assert tok.decode(ids) == text


def test_sources_text_dir_glob_jsonl_parquet_stdlib(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    assert [p.name for p in resolve_files(str(tmp_path / "a.txt"))] == ["a.txt"]
    assert [p.name for p in resolve_files(str(tmp_path))] == ["a.txt", "b.txt"]
    assert [p.name for p in resolve_files(str(tmp_path / "**" / "*.txt"))] == ["a.txt", "b.txt"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert list(read_documents(jsonl, "auto", "body")) == ["one", "two"]
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x", "y", None], "id": [1, 2, 3]}), parquet)
    assert list(read_documents(parquet, "auto", "content")) == ["x", "y"]
    stdlib = resolve_files("stdlib")
    assert len(stdlib) > 100 and all(p.suffix == ".py" for p in stdlib)
    assert not any("site-packages" in p.parts for p in stdlib)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_files(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="glob matches no files"):
        resolve_files(str(tmp_path / "*.nothing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": "no text"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no 'text' field"):
        list(read_documents(bad, "auto", "text"))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table)
    with pytest.raises(UserError, match="no column 'text'; columns: body"):
        list(read_documents(table, "auto", "text"))


def test_empty_corpus_is_an_error_and_leaves_no_cache_entry(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = data_config(tmp_path, source=str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="the corpus is empty"):
        prepare_corpus(cfg, show_progress=False)
    assert not any((tmp_path / "cache" / "tokens").iterdir())


def test_token_cache_is_built_once_and_keyed_by_tokenizer(tmp_path, corpus_dir, monkeypatch):
    cfg = data_config(tmp_path, source=str(corpus_dir))
    first = prepare_corpus(cfg, show_progress=False)
    files = resolve_files(str(corpus_dir))
    expected = sum(len(p.read_text(encoding="utf-8", errors="replace").encode()) + 1 for p in files)
    assert first.n_tokens == expected and first.n_documents == len(files)
    tokens = first.tokens()
    assert tokens[-1] == ByteTokenizer.eos_id
    assert bytes(tokens[:20].astype(np.uint8)) == files[0].read_bytes()[:20]

    def fail(*args, **kwargs):
        raise AssertionError("the cache entry was rebuilt")

    monkeypatch.setattr(cache_module, "_build_entry", fail)
    again = prepare_corpus(cfg, show_progress=False)
    assert again.tokens_path == first.tokens_path
    monkeypatch.undo()
    bpe = prepare_corpus(data_config(tmp_path, source=str(corpus_dir), tokenizer="bpe", bpe_vocab_size=400),
                         show_progress=False)
    assert bpe.tokens_path != first.tokens_path and bpe.n_tokens < first.n_tokens


def test_dataset_windows_are_shifted_pairs():
    ds = Rows(np.arange(101, dtype=np.uint16), np.array([0, 101]), np.arange(1), 10, "stream")
    assert ds.n_sequences == 10
    batch = ds.batch([0, 9])
    assert batch.inputs.tolist()[1] == list(range(90, 100)) and batch.targets.tolist()[1] == list(range(91, 101))


def test_sampler_is_deterministic_disjoint_and_even():
    n, G, D = 103, 12, 3
    samplers = [DistributedBatchSampler(n, G, r, D, seed=5) for r in range(D)]
    single = DistributedBatchSampler(n, G, seed=5)
    assert all(s.steps_per_epoch == n // G for s in samplers)
    seen = []
    for _ in range(2 * single.steps_per_epoch + 3):  # across epoch boundaries
        parts = [s.next_batch() for s in samplers]
        assert all(len(p) == G // D for p in parts)
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == G  # disjoint across ranks
        assert union.tolist() == single.next_batch().tolist()  # same data whatever the rank count
        seen.append(union)
    first_epoch = np.concatenate(seen[: n // G])
    assert len(set(first_epoch.tolist())) == (n // G) * G  # no repeats within an epoch
    assert not np.array_equal(seen[0], seen[n // G])  # a new order each epoch
    other_seed = DistributedBatchSampler(n, G, seed=6)
    assert not np.array_equal(other_seed.next_batch(), DistributedBatchSampler(n, G, seed=5).next_batch())


def test_sampler_restores_exactly_mid_epoch_and_across_dp_sizes():
    a = DistributedBatchSampler(50, 4, seed=1)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives serialization
    expected = [a.next_batch().tolist() for _ in range(20)]
    b = DistributedBatchSampler(50, 4, seed=1)
    b.load_state_dict(state)
    assert [b.next_batch().tolist() for _ in range(20)] == expected
    halves = [DistributedBatchSampler(50, 4, r, 2, seed=1) for r in range(2)]
    for s in halves:
        s.load_state_dict(state)
    assert (halves[0].next_batch().tolist() + halves[1].next_batch().tolist()) == expected[0]
    with pytest.raises(UserError, match="seed"):
        DistributedBatchSampler(50, 4, seed=2).load_state_dict(state)


def test_sampler_needs_one_global_batch():
    with pytest.raises(UserError, match="fewer than one step needs"):
        DistributedBatchSampler(3, 4)
