"""Offline generation: a model runner, its KV block manager and a small FCFS step loop.

The loop follows the same contract as the QoS schedulers (decodes first, then prefill chunks within a
token budget; requests are advanced only after the runner returns) and preempts by recompute when the
KV cache is full, so it never fails for lack of memory while a request could still fit on its own.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from niyama.engine.config import EngineConfig
from niyama.engine.model_runner import Chunk, ModelRunner
from niyama.engine.sampler import SamplingParams
from niyama.engine.tokenizer import Tokenizer
from niyama.memory import KVBlockManager
from niyama.qos import QoS
from niyama.request import FinishReason, Request, RequestStatus

OFFLINE_QOS = QoS(name="offline", ttlt=365 * 24 * 3600.0)
DEFAULT_PARAMS = SamplingParams()


@dataclass(slots=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    num_preemptions: int = 0
    arrival: float = 0.0  # time.monotonic() when submitted
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass(slots=True)
class _Sequence:
    """Engine-side state of one request: its sampling parameters and text so far."""

    request: Request
    params: SamplingParams
    text: str = ""
    logprobs: list[float] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, tokenizer: Tokenizer | None = None,
                 runner: ModelRunner | None = None):
        self.config = config or EngineConfig()
        self.runner = runner or ModelRunner.from_config(self.config)
        self.tokenizer = tokenizer or Tokenizer(self.config.model)
        self.kv = KVBlockManager(self.runner.num_blocks, self.runner.block_size)
        self.eos_token_ids = self.tokenizer.eos_token_ids | set(self.runner.config.eos_token_ids)
        self._ids = itertools.count()
        self.num_preemptions = 0

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS) -> list[Completion]:
        """Complete each prompt (text or token ids); results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        seqs = [self._make_sequence(p if not isinstance(p, str) else self.tokenizer.encode(p), sp)
                for p, sp in zip(prompts, params, strict=True)]
        self._run(seqs)
        return [self._completion(s) for s in seqs]

    def chat(self, conversations: Sequence[Sequence[Mapping[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS) -> list[Completion]:
        """Reply to each conversation (a list of ``{"role", "content"}`` messages)."""
        return self.generate([self.tokenizer.chat(c) for c in conversations], params)

    # -- the step loop -------------------------------------------------------------------------
    def _make_sequence(self, prompt_ids: Sequence[int], params: SamplingParams) -> _Sequence:
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request = Request(f"gen-{next(self._ids)}", time.monotonic(), OFFLINE_QOS, len(prompt_ids),
                          params.max_tokens, list(prompt_ids), stop_token_ids=stops)
        if request.num_prompt_tokens + request.max_tokens > self.kv.capacity_tokens:
            raise ValueError(f"prompt + max_tokens ({request.num_prompt_tokens} + {request.max_tokens}) "
                             f"exceeds the KV cache ({self.kv.capacity_tokens} tokens)")
        return _Sequence(request, params)

    def _run(self, seqs: list[_Sequence]) -> None:
        by_id = {s.request.request_id: s for s in seqs}
        sampling = {rid: s.params for rid, s in by_id.items()}
        waiting: deque[Request] = deque(s.request for s in seqs)
        running: list[Request] = []
        while waiting or running:
            chunks = self._schedule(waiting, running)
            sampled = self.runner.execute(chunks, sampling)
            now = time.monotonic()
            for r, n in chunks:
                r.num_computed_tokens += n
            for rid, token in sampled.items():
                seq = by_id[rid]
                if self._append(seq, token, now):
                    r = seq.request
                    r.status, r.finish_time = RequestStatus.FINISHED, now
                    running.remove(r)
                    self.kv.free(r)
                    self.runner.release(rid)

    def _schedule(self, waiting: deque[Request], running: list[Request]) -> list[Chunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        for r in [r for r in running if r.is_decoding]:
            if r.status is not RequestStatus.RUNNING:
                continue  # preempted below, while making room for an earlier decode
            while not self.kv.can_allocate(r, 1):
                victim = running[-1]
                self._preempt(victim, running, waiting)
                if victim is r:
                    break
            if r.status is RequestStatus.RUNNING:
                self.kv.allocate(r, 1)
                chunks.append((r, 1))
                budget -= 1
        partial = [r for r in running if not r.is_decoding]
        for r in partial:
            budget -= self._add_prefill(r, budget, chunks, admit=False)
        while waiting and budget > 0 and len(running) < self.config.max_num_seqs:
            r = waiting[0]
            n = self._add_prefill(r, budget, chunks, admit=True)
            if n == 0:
                break
            waiting.popleft()
            r.status = RequestStatus.RUNNING
            running.append(r)
            budget -= n
        if not chunks:
            raise RuntimeError("no request fits in the KV cache")  # unreachable: capacity checked up front
        return chunks

    def _add_prefill(self, r: Request, budget: int, chunks: list[Chunk], *, admit: bool) -> int:
        n = min(r.num_uncomputed_tokens, budget, self.kv.max_new_tokens(r, admit=admit))
        if n > 0:
            self.kv.allocate(r, n)
            chunks.append((r, n))
        return max(n, 0)

    def _preempt(self, victim: Request, running: list[Request], waiting: deque[Request]) -> None:
        running.remove(victim)
        self.kv.free(victim)
        victim.reset_for_recompute()
        waiting.appendleft(victim)
        self.num_preemptions += 1

    def _append(self, seq: _Sequence, token: int, now: float) -> bool:
        """Record a sampled token; True when the sequence is complete (EOS, stop string or length)."""
        r = seq.request
        done = r.append_token(token, now)
        if seq.params.logprobs:
            seq.logprobs.append(self.runner.last_logprobs[r.request_id])
        if seq.params.stop:
            text = self.tokenizer.decode(r.output_token_ids)
            cut = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                r.finish_reason = FinishReason.STOP
                return True
        if done:
            seq.text = self.tokenizer.decode(r.output_token_ids)
        return done

    def _completion(self, seq: _Sequence) -> Completion:
        r = seq.request
        return Completion(r.request_id, list(r.prompt_token_ids), list(r.output_token_ids), seq.text,
                          r.finish_reason.value if r.finish_reason else "length",
                          seq.logprobs if seq.params.logprobs else None, r.num_preemptions,
                          r.arrival, r.first_token_time, r.finish_time)
