"""The serving engine on a tiny randomly initialized model: greedy decoding
equals a plain full-sequence argmax and HF ``generate``, whatever the batch,
the prefix cache, the prefill chunking and preemption; seeded sampling is
reproducible; the block manager's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.data.tokenizer import ByteTokenizer
from scaletrain.model import Llama
from scaletrain.serve.engine import Engine, EngineConfig, run_to_completion
from scaletrain.serve.kv_cache import BlockManager, KVCache, RowKV, block_hashes
from scaletrain.serve.sampling import SamplingParams, sample

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model() -> Llama:
    cfg = load_config(None, ["model.name=debug", "model.vocab_size=320"]).model
    m = Llama(cfg)
    m.init_weights(0)
    return m.eval()


def make_engine(model, num_blocks=512, block_size=4, max_num_seqs=16, max_batch_tokens=256, prefix_caching=True,
                eos_id=None, vocab_limit=None, attention="rows") -> Engine:
    cfg = model.cfg
    shape = (cfg.n_kv_heads, cfg.dim // cfg.n_heads, torch.float32)
    cache = KVCache(cfg.n_layers, num_blocks, block_size, *shape)
    rows = RowKV(cfg.n_layers, max_num_seqs, cfg.max_seq_len, *shape) if attention == "rows" else None
    return Engine(model, cache, EngineConfig(num_blocks, block_size, max_num_seqs, max_batch_tokens, prefix_caching),
                  eos_id, ByteTokenizer().decode, vocab_limit, rows=rows)


@torch.no_grad()
def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = torch.tensor([prompt])
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)  # (1, T + 1)
    return tokens[0, len(prompt):].tolist()


def mixed_prompts(count=16, seed=1, shared_prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (count,), generator=gen).tolist()
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in lengths]
    if shared_prefix:
        prompts = [shared_prefix + p if i % 2 else p for i, p in enumerate(prompts)]
    return prompts


@pytest.fixture(scope="module")
def reference(model) -> dict:
    prompts = mixed_prompts(shared_prefix=list(range(40, 80)))
    return {"prompts": prompts, "outputs": [full_forward_greedy(model, p, MAX_TOKENS) for p in prompts]}


ATTENTION = pytest.mark.parametrize("attention", ["rows", "gather"])


@ATTENTION
def test_batch_of_16_with_chunked_prefill_and_preemption_equals_full_forward(model, reference, attention):
    # 40 blocks of 4 tokens cannot hold 16 sequences of up to 121 tokens: preemptions.
    engine = make_engine(model, num_blocks=40, max_batch_tokens=32, attention=attention)
    assert run_to_completion(engine, reference["prompts"], MAX_TOKENS) == reference["outputs"]
    assert engine.scheduler.stats.preemptions > 0
    assert max(map(len, reference["prompts"])) > 32  # some prompts were prefilled in chunks
    assert engine.blocks.usage() == 0.0 and not engine.has_work()


@ATTENTION
def test_each_request_alone_equals_the_batch(model, reference, attention):
    for prompt, expected in list(zip(reference["prompts"], reference["outputs"]))[:6]:
        assert run_to_completion(make_engine(model, attention=attention), [prompt], MAX_TOKENS) == [expected]
    batched = make_engine(model, attention=attention)
    assert run_to_completion(batched, reference["prompts"], MAX_TOKENS) == reference["outputs"]
    assert batched.scheduler.stats.preemptions == 0


@ATTENTION
def test_prefix_cache_hits_give_the_same_tokens(model, reference, attention):
    engine = make_engine(model, attention=attention)
    run_to_completion(engine, reference["prompts"][1:2], MAX_TOKENS)  # fills the shared prefix's blocks
    hits_before = engine.scheduler.stats.prefix_hits
    assert run_to_completion(engine, reference["prompts"], MAX_TOKENS) == reference["outputs"]
    # Every prompt with the 40-token prefix (8 of 16) hit at least its 10 full blocks.
    assert engine.scheduler.stats.prefix_hits - hits_before >= 8 * 40
    uncached = make_engine(model, prefix_caching=False, attention=attention)
    assert run_to_completion(uncached, reference["prompts"], MAX_TOKENS) == reference["outputs"]
    assert uncached.scheduler.stats.prefix_hits == 0


def test_greedy_equals_hf_generate(model, reference):
    transformers = pytest.importorskip("transformers")
    from scaletrain.checkpoint.hf import _to_hf_name, hf_config

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.cfg))).eval()
    hf.load_state_dict({_to_hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    engine = make_engine(model)
    prompts = reference["prompts"][:4]
    ours = run_to_completion(engine, prompts, MAX_TOKENS)
    for prompt, tokens in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == tokens


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model, reference):
    params = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    prompt = reference["prompts"][3]
    alone = run_to_completion(make_engine(model), [prompt], MAX_TOKENS, **params)[0]
    engine = make_engine(model)
    batch = run_to_completion(engine, [prompt] + reference["prompts"][:8], MAX_TOKENS, **params)
    assert batch[0] == alone
    other_seed = run_to_completion(make_engine(model), [prompt], MAX_TOKENS, **{**params, "seed": 99})[0]
    assert other_seed != alone


def test_stop_strings_eos_and_streamed_text(model):
    engine = make_engine(model, vocab_limit=257)
    prompt = list(b"def main():\n")
    free = _collect(engine, "a", prompt, SamplingParams(max_tokens=24, temperature=0.0))
    assert free["finish"] == "length" and free["tokens"] == 24
    text = ByteTokenizer().decode(free["ids"])
    assert free["text"] == text
    stop = text[5:8]
    stopped = _collect(engine, "b", prompt, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))
    assert stopped["finish"] == "stop" and stopped["text"] == text[:text.find(stop)]
    # An EOS token ends the sequence with "stop" and is not part of the text.
    eos_engine = make_engine(model, eos_id=free["ids"][3], vocab_limit=257)
    ended = _collect(eos_engine, "c", prompt, SamplingParams(max_tokens=24, temperature=0.0))
    assert ended["finish"] == "stop" and ended["tokens"] == 4 and ended["text"] == ByteTokenizer().decode(free["ids"][:3])
    assert eos_engine.blocks.usage() == 0.0


def _collect(engine, request_id, prompt, params) -> dict:
    engine.add(request_id, prompt, params)
    got = {"text": "", "ids": [], "finish": None, "tokens": 0}
    while engine.has_work():
        for out in engine.step():
            got["text"] += out.text
            got["ids"] += out.token_ids
            got["finish"], got["tokens"] = out.finish_reason, out.completion_tokens
    return got


def test_logprobs_are_the_models_and_abort_frees_blocks(model):
    engine = make_engine(model)
    prompt = list(range(10, 30))
    engine.add("a", prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=5))
    engine.add("b", prompt + [1] * 30, SamplingParams(max_tokens=50, temperature=0.0))
    out = next(o for o in engine.step() if o.request_id == "a")
    token, lp = out.logprobs[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
    assert token == int(expected.argmax()) and lp.top[0][0] == token and len(lp.top) == 5
    assert abs(lp.logprob - float(expected[token])) < 1e-5
    assert engine.blocks.usage() > 0
    engine.abort("a")
    engine.abort("b")
    assert not engine.has_work() and engine.blocks.usage() == 0.0
    # Cancelling a request some of whose choices are done (max-num-seqs 1: one at a time).
    engine = make_engine(model, max_num_seqs=1)
    engine.add("n", prompt, SamplingParams(max_tokens=2, temperature=0.0), n=3)
    while not any(o.finish_reason for o in engine.step()):
        pass
    engine.abort("n")
    assert not engine.has_work() and engine.blocks.usage() == 0.0 and not engine.choices


def test_sampler_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)], [None])[0] == [1]
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.01)):
        gen = torch.Generator().manual_seed(0)
        assert {sample(logits, [params], [gen])[0][0] for _ in range(20)} == {1}
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, [SamplingParams(temperature=1.0, top_k=2)], [gen])[0][0] for _ in range(200)}
    assert drawn == {1, 3}


def test_block_manager_prefix_cache_and_lru_eviction():
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2 and block_hashes(tokens, 4, start=1, parent=hashes[0]) == hashes[1:]
    assert block_hashes([9, 9, 9, 9] + tokens[4:8], 4)[1] != hashes[1]  # chained: the prefix matters
    manager = BlockManager(num_blocks=4, block_size=4)
    first = manager.allocate(2)
    for block, h in zip(first, hashes):
        manager.register(block, h)
    manager.release(first)
    assert manager.num_free() == 4 and manager.usage() == 0.0
    assert manager.acquire_prefix(hashes) == first and manager.usage() == 0.5
    manager.release(first)
    # Fresh blocks come from the never-cached ones first, then evict LRU: the tail block first.
    assert manager.allocate(3)[2] == first[1]
    assert manager.acquire_prefix(hashes) == [first[0]]
    assert manager.allocate(1) is None
