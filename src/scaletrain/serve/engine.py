"""The engine: requests in, one scheduled forward per ``step()``, tokens and
text out. Single-threaded; serve/async_engine.py runs it in a thread for the
HTTP server.

A request with ``n`` choices is ``n`` sequences sharing a prompt (and, once
the first has filled a block, its cached blocks). Text is detokenized here,
because a stop string ends a sequence and frees its blocks: text that might
be the start of a stop string (or half of a UTF-8 character) is held back
until it is known not to be.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from scaletrain.serve.kv_cache import BlockManager, KVCache, RowKV
from scaletrain.serve.runner import SeqWork, StepBatch, build_batch, forward
from scaletrain.serve.sampling import SamplingParams, TokenLogprobs, make_generator, sample
from scaletrain.serve.scheduler import Scheduler, Sequence


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_batch_tokens: int = 512
    prefix_caching: bool = True


@dataclass
class ChoiceOutput:
    """What one step produced for one choice of a request."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # new text, safe to show
    logprobs: list[tuple[int, TokenLogprobs]]
    finish_reason: str | None  # stop, length, abort; None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    arrival_s: float
    scheduled_s: float | None


@dataclass(eq=False)
class _Choice:
    request_id: str
    index: int
    seq: Sequence
    text: str = ""
    emitted: int = 0  # characters of ``text`` already returned
    finish_reason: str | None = None
    pending_logprobs: list = field(default_factory=list)


class Engine:
    def __init__(self, model, cache: KVCache, cfg: EngineConfig, eos_id: int | None, decode: Callable,
                 vocab_limit: int | None = None, execute: Callable[[StepBatch], torch.Tensor] | None = None,
                 rows: RowKV | None = None):
        """decode: token ids -> text. vocab_limit: logits at or past it (embedding
        rows the tokenizer never produces) are never sampled. execute: runs
        one forward (TP: on every rank); default the local model. rows: a
        row cache with max_num_seqs rows (attention without a per-step gather)."""
        self.model, self.cache, self.cfg, self.eos_id, self.decode = model, cache, cfg, eos_id, decode
        self.vocab_limit, self.rows = vocab_limit, rows
        self.execute = execute or (lambda batch: forward(model, cache, batch, rows))
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_batch_tokens, rows is not None)
        self.choices: dict[Sequence, _Choice] = {}
        self.by_request: dict[str, list[_Choice]] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- requests ---------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, n: int = 1,
            arrival_s: float | None = None) -> None:
        if request_id in self.by_request:
            raise ValueError(f"request {request_id!r} is already running")
        choices = []
        for index in range(n):
            # Choice i of a seeded request draws from seed + i: reproducible, yet distinct.
            p = params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)
            seq = Sequence(next(self._ids), list(prompt), len(prompt), p, make_generator(p))
            seq.arrival_s = arrival_s or seq.arrival_s
            choice = _Choice(request_id, index, seq)
            self.choices[seq] = choice
            choices.append(choice)
            self.scheduler.add(seq)
        self.by_request[request_id] = choices
        self.prompt_tokens_total += len(prompt)

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone): its sequences leave and free their blocks."""
        for choice in self.by_request.pop(request_id, []):
            if choice.finish_reason is None:  # its finished siblings are gone already
                self.scheduler.finish(choice.seq)
                del self.choices[choice.seq]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ---------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[ChoiceOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        work = []
        for seq, n in scheduled:
            start = seq.num_computed
            fill = start if seq.row is not None and not seq.row_filled else 0
            seq.row_filled = True
            work.append(SeqWork(seq.tokens[start:start + n], start, seq.blocks, start + n == len(seq.tokens),
                                seq.row, fill))
        logits = self.execute(build_batch(work, self.cfg.block_size))  # (S, vocab)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        for seq, n in scheduled:
            self.scheduler.computed(seq, n)
        sampled = [seq for (seq, _), w in zip(scheduled, work) if w.sample]
        if not sampled:
            return []
        tokens, logprobs = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        outputs = []
        for seq, token, lp in zip(sampled, tokens, logprobs):
            seq.tokens.append(token)
            self.generation_tokens_total += 1
            outputs.append(self._advance(self.choices[seq], token, lp))
        return outputs

    def _advance(self, choice: _Choice, token: int, lp: TokenLogprobs | None) -> ChoiceOutput:
        seq, params = choice.seq, choice.seq.params
        if lp is not None:
            choice.pending_logprobs.append((token, lp))
        is_eos = token == self.eos_id and not params.ignore_eos
        output_ids = seq.tokens[seq.prompt_len:len(seq.tokens) - (1 if is_eos else 0)]
        choice.text = self.decode(output_ids)
        if is_eos:
            choice.finish_reason = "stop"
        cut = _find_stop(choice.text, params.stop)
        if cut is not None:
            choice.text, choice.finish_reason = choice.text[:cut], "stop"
        elif choice.finish_reason is None and (seq.num_output >= params.max_tokens
                                               or len(seq.tokens) >= self.model.cfg.max_seq_len):
            choice.finish_reason = "length"
        safe = len(choice.text)
        if choice.finish_reason is None:
            safe -= max((len(s) - 1 for s in params.stop), default=0)
            while safe > choice.emitted and choice.text[safe - 1] == "\ufffd":  # half a character
                safe -= 1
        new_text = choice.text[choice.emitted:max(safe, choice.emitted)]
        choice.emitted = max(safe, choice.emitted)
        new_logprobs, choice.pending_logprobs = choice.pending_logprobs, []
        if choice.finish_reason is not None:
            self._finish(choice)
        return ChoiceOutput(choice.request_id, choice.index, [token], new_text, new_logprobs,
                            choice.finish_reason, seq.prompt_len, seq.num_output, seq.cached_tokens,
                            seq.arrival_s, seq.scheduled_s)

    def _finish(self, choice: _Choice) -> None:
        self.scheduler.finish(choice.seq)
        del self.choices[choice.seq]
        siblings = self.by_request.get(choice.request_id, [])
        if all(c.finish_reason is not None for c in siblings):
            self.by_request.pop(choice.request_id, None)

    # -- state for metrics ----------------------------------------------------------

    def running_requests(self) -> set[str]:
        """Requests with a sequence in the running batch."""
        return {self.choices[s].request_id for s in self.scheduler.running if s in self.choices}

    def num_running(self) -> int:
        return len(self.running_requests())

    def num_waiting(self) -> int:
        waiting = {self.choices[s].request_id for s in self.scheduler.waiting if s in self.choices}
        return len(waiting - self.running_requests())


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def run_to_completion(engine: Engine, prompts: list[list[int]], max_tokens: int, **params) -> list[list[int]]:
    """Run ``prompts`` to completion together (greedy unless told); their output token ids."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0), **params)
    for i, prompt in enumerate(prompts):
        engine.add(f"r{i}", prompt, sp)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    deadline = time.monotonic() + 300
    while engine.has_work():
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not finish within 300 s")
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    return [outputs[f"r{i}"] for i in range(len(prompts))]
