"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP, optional tied embeddings.

Plain PyTorch, no parallelism: data, tensor and pipeline parallelism are applied
from outside (scaletrain.parallel). Layers live in a ModuleDict keyed by index
and the top-level modules may be None, so parameter names stay the same however
the model is split across pipeline stages. Parameter names and the rotary
convention (rotate-half) match HF ``LlamaForCausalLM`` so export is a renaming.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim) for rotate-half RoPE (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos/sin: (T, head_dim), or (B, T, head_dim)
    when every row has its own positions (packed documents)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, head_dim)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B or 1, T, 1, head_dim)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin: (>= T, head_dim) or (B, T, head_dim); mask: None (causal) or
        (B, 1, T, T) bool, True where a query may attend to a key."""
        B, T, _ = x.shape
        if cos.dim() == 2:
            cos, sin = cos[:T], sin[:T]  # (T, head_dim)
        # view(..., -1, head_dim) infers the head count, so a tensor-parallel
        # shard with fewer local heads needs no change here.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # mask travels as a keyword: tensor parallel's input plan covers the positional (x, cos, sin).
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init: each parameter draws from its own generator,
        seeded by (seed, parameter name), so any part of the model (a pipeline
        stage, a shard's source) gets the same values as the whole model.

        Normal(0, 0.02); residual output projections scaled by
        1/sqrt(2 * n_layers) as in GPT-2 (Radford et al. 2019); norms 1."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab) (or hidden states on a
        pipeline stage without a head). Packed rows pass positions (B, T),
        restarting at 0 for each document, and doc_ids (B, T): a token attends
        only to earlier tokens of its own document (padding has its own id)."""
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens  # (B, T, dim)
        if positions is None:
            # The whole table: attention slices it to its own length (under
            # sequence parallelism a stage's input holds a shard of T).
            cos, sin = self.rope_cos, self.rope_sin  # (max_seq_len, head_dim)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim)
        mask = None if doc_ids is None else document_mask(doc_ids)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask=mask)
        h = self.norm(h) if self.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, 1, T, T) bool: causal and block-diagonal by document,
    so packed documents never see each other (as if each ran alone)."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


IGNORE_INDEX = -100  # a target that carries no loss: padding, or a prompt turn of a chat


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32 (mean, or sum over the targets that count).
    logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, max_seq_len: int | None = None) -> torch.Tensor:
    """Sample continuations of prompt (B, T) -> (B, T + max_new_tokens)."""
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    tokens = prompt
    for _ in range(max_new_tokens):
        context = tokens if max_seq_len is None else tokens[:, -max_seq_len:]
        logits = model(context)[:, -1, :].float() / temperature  # (B, V)
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        next_token = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (B, 1)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens
