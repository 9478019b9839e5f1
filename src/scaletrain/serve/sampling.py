"""Sampling parameters and the sampler: greedy rows in one argmax, sampled
rows each with the request's own generator, so a seeded request draws the same
numbers whatever else is in the batch.

Order of the logits processors as in HF ``generate`` and vLLM: temperature,
top-k, then top-p (nucleus sampling, Holtzman et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives to return per token (0 = only the chosen token)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


@dataclass
class TokenLogprobs:
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), best first


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) fp32 -> temperature-scaled logits with tokens outside top-k / top-p at -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest set whose probability reaches top_p (always the best token).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits (S, V) -> one token per row, and its logprobs where asked for."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = _filtered(logits[row], p).softmax(-1)
            tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        # Of the model's distribution (before temperature / top-k / top-p), as vLLM reports them.
        logp = torch.log_softmax(logits[wanted], dim=-1)  # (W, V)
        for i, row in enumerate(wanted):
            k = params[row].logprobs
            top = torch.topk(logp[i], k) if k else None
            logprobs[row] = TokenLogprobs(float(logp[i, tokens[row]]),
                                          list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
    return tokens, logprobs
