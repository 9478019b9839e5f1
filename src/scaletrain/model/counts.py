"""Parameter and FLOP counts from the config alone (no model is built), shared
by the trainer's MFU and the planner."""

from __future__ import annotations

from scaletrain.config import ModelConfig


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of ``Llama(cfg)`` (tied weights counted once)."""
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q, o + k, v
    mlp = 3 * cfg.dim * cfg.ffn_dim
    block = attention + mlp + 2 * cfg.dim  # + two RMSNorm weights
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_layers * block + embedding + head + cfg.dim  # + final norm


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: everything but the
    embedding lookup and the norm weights (the head counts even when tied)."""
    head_dim = cfg.dim // cfg.n_heads
    per_block = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * per_block + cfg.vocab_size * cfg.dim


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N + 12·L·d·T.

    6N: forward (2N) plus backward (4N) for the N matmul parameters (Kaplan et
    al. 2020, eq. 2.2). 12·L·d·T: the attention score and value matmuls,
    forward and backward, counted over the full T x T square as in PaLM
    (Chowdhery et al. 2022, appendix B), so numbers compare with published MFU.
    """
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layers * cfg.dim * seq_len
