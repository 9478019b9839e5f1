"""Model-level checks: counts, determinism, causality, and logits parity with
HF Transformers' LlamaForCausalLM on a tiny fp32 config."""

import dataclasses

import pytest
import torch

from scaletrain.config import MODEL_PRESETS, ModelConfig, load_config
from scaletrain.model import Llama, matmul_param_count, param_count, train_flops_per_token


def model_config(**overrides) -> ModelConfig:
    return dataclasses.replace(load_config(None, ["model.name=debug"]).model, vocab_size=96, **overrides)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_the_built_model(tie):
    cfg = model_config(tie_embeddings=tie)
    model = Llama(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_named_shapes_match_published_parameter_counts():
    counts = {name: param_count(load_config(None, [f"model.name={name}"]).model) for name in ("7b", "13b", "70b")}
    # Llama 2 (Touvron et al. 2023): exact counts of the released checkpoints.
    assert counts == {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
    assert set(MODEL_PRESETS) == {"debug", "tiny", "small", "125m", "1b", "7b", "13b", "70b"}


def test_train_flops_per_token_is_6n_plus_attention():
    cfg = load_config(None, ["model.name=7b"]).model
    n = matmul_param_count(cfg)
    # 7B: all parameters minus the input embedding and the norm weights.
    assert n == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096
    assert train_flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_init_is_deterministic_from_the_seed():
    cfg = model_config()
    a, b, c = Llama(cfg), Llama(cfg), Llama(cfg)
    a.init_weights(7)
    b.init_weights(7)
    c.init_weights(8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_forward_is_causal_and_shaped():
    cfg = model_config()
    model = Llama(cfg)
    model.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    later = model(changed)
    torch.testing.assert_close(later[:, :10], logits[:, :10])
    assert not torch.allclose(later[:, 10:], logits[:, 10:])


@pytest.mark.parametrize("tie, n_kv_heads", [(False, 2), (True, 4)])
def test_logits_match_hf_llama(tie, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = model_config(tie_embeddings=tie, n_kv_heads=n_kv_heads)
    ours = Llama(cfg)
    ours.init_weights(3)
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)
