"""The models of the literature, as formulas. The planner's own predictions
(estimate.py) itemize scaletrain's implementation on top of these; these are
kept in their published form so the published figures can be checked.
"""

from __future__ import annotations

import math


def zero_model_state_bytes(psi: float, stage: int, n: int, k: float = 12, param_bytes: float = 2,
                           grad_bytes: float = 2) -> float:
    """Model-state bytes per GPU for mixed-precision Adam under ZeRO
    (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
    Trillion Parameter Models", sec. 5 and fig. 1): fp16 parameters (2Ψ),
    fp16 gradients (2Ψ) and K·Ψ of optimizer states (K = 12: fp32 master
    weights, momentum and variance). Stage 1 partitions the optimizer states
    over the n data-parallel GPUs, stage 2 also the gradients, stage 3 also
    the parameters.

    >>> round(zero_model_state_bytes(7.5e9, 0, 64) / 1e9, 1)   # baseline data parallel
    120.0
    """
    p, g, o = param_bytes * psi, grad_bytes * psi, k * psi
    if stage == 0:
        return p + g + o
    if stage == 1:
        return p + g + o / n
    if stage == 2:
        return p + (g + o) / n
    if stage == 3:
        return (p + g + o) / n
    raise ValueError(f"ZeRO stage {stage}; allowed 0-3")


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                                 recompute: str = "none") -> float:
    """Activation bytes per transformer layer of a GPT block with 16-bit
    activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in
    Large Transformer Models", table 2): s sequence, b micro-batch, h hidden,
    a heads, t tensor-parallel size.

    none:                  sbh(10 + 24/t + 5as/(ht))
    sequence parallel:     sbh/t (34 + 5as/h)
    selective recompute:   sbh(10 + 24/t) without SP, 34 sbh/t with SP
    full recompute:        2sbh (only the layer input is kept)
    """
    if recompute == "full":
        return 2 * s * b * h
    attention_scores = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return s * b * h / t * (34 + attention_scores)
    return s * b * h * (10 + 24 / t + attention_scores / t)


def pipeline_bubble(p: int, m: int, v: int = 1, schedule: str = "1f1b") -> float:
    """Idle fraction of a pipeline step (Narayanan et al. 2021, "Efficient
    Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
    sec. 2.2): bubble time / ideal time = (p-1)/m for GPipe and 1F1B and
    (p-1)/(v·m) for the interleaved schedule; as a fraction of the whole step,
    (p-1)/(m+p-1). Zero-bubble schedules (Qi et al. 2024, "Zero Bubble
    Pipeline Parallelism") fill the bubble with weight-gradient work; ZB-H1
    leaves about a third of 1F1B's, which is what is assumed for
    interleaved_zb and zbv."""
    if p <= 1:
        return 0.0
    ratio = (p - 1) / (v * m)
    if schedule in ("interleaved_zb", "zbv"):
        ratio /= 3
    return ratio / (1 + ratio)


def ring_all_reduce_time(size: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce (Patarasuk & Yuan 2009; nccl-tests' bus bandwidth
    convention): 2(n-1) steps each moving size/n bytes: 2(n-1)/n · S/B + 2(n-1)·α."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * latency


def tree_all_reduce_time(size: float, n: int, bandwidth: float, latency: float) -> float:
    """Binomial-tree all-reduce, a reduce to the root then a broadcast back
    (Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective
    Communication Operations in MPICH", sec. 4.5): 2·ceil(log2 n) steps, each
    moving the whole message: 2·ceil(log2 n)·(α + S/B). Fewer latency terms
    than the ring's 2(n-1)·α, a larger bandwidth term than its 2(n-1)/n·S/B,
    so it wins for small messages and many ranks (MPICH picks by size too).
    NCCL's double binary tree ("Massively Scale Your Deep Learning Training
    with NCCL 2.4", NVIDIA blog 2019) claims the ring's bandwidth with
    log-depth latency; without a measured per-algorithm curve the binomial
    tree is the conservative choice."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * (latency + size / bandwidth)


def ring_all_gather_time(size: float, n: int, bandwidth: float, latency: float) -> float:
    """All-gather or reduce-scatter of a size-S (gathered) buffer: (n-1)/n · S/B + (n-1)·α."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * size / bandwidth + (n - 1) * latency


def broadcast_time(size: float, n: int, bandwidth: float, latency: float) -> float:
    """Pipelined broadcast: about S/B (nccl-tests: bus bandwidth = algorithm bandwidth)."""
    if n <= 1:
        return 0.0
    return size / bandwidth + latency


def p2p_time(size: float, bandwidth: float, latency: float) -> float:
    return size / bandwidth + latency
