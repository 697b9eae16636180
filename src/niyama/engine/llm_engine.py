"""Offline generation: ``generate`` and ``chat`` on top of the live ``EngineCore``.

Offline work runs through the same scheduler code as the server (FCFS here, with the engine config's
token budget), so batching, chunking and preemption by recompute behave exactly as they do live.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from niyama.engine.config import EngineConfig
from niyama.engine.core import EngineCore
from niyama.engine.model_runner import ModelRunner
from niyama.engine.sampler import SamplingParams
from niyama.engine.tokenizer import Tokenizer
from niyama.memory import KVBlockManager
from niyama.qos import QoS
from niyama.request import Request
from niyama.scheduler import SchedulerConfig

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


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, tokenizer: Tokenizer | None = None,
                 runner: ModelRunner | None = None):
        self.config = config or EngineConfig()
        self.runner = runner or ModelRunner.from_config(self.config)
        self.tokenizer = tokenizer or Tokenizer(self.config.model)
        scheduling = SchedulerConfig(chunk_size=self.config.max_num_batched_tokens,
                                     max_num_seqs=self.config.max_num_seqs)
        self.core = EngineCore(self.runner, self.tokenizer, "fcfs", scheduling)
        self._ids = itertools.count()

    @property
    def kv(self) -> KVBlockManager:
        return self.core.kv

    @property
    def num_preemptions(self) -> int:
        return self.core.scheduler.num_preemptions

    def generate(self, prompts: str | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS) -> list[Completion]:
        """Complete each prompt (text or token ids; a lone string is one prompt); results in prompt order.
        If the call fails or is interrupted, its requests are aborted: the engine stays usable."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if any(isinstance(p, int) for p in prompts):
            raise TypeError("prompts must be strings or lists of token ids (one prompt of ids: [ids])")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        requests = []
        for prompt, sp in zip(prompts, params, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            requests.append((Request(f"gen-{next(self._ids)}", time.monotonic(), OFFLINE_QOS, len(ids),
                                     sp.max_tokens, ids), sp))
        texts = {r.request_id: "" for r, _ in requests}
        logprobs: dict[str, list[float]] = {r.request_id: [] for r, sp in requests if sp.logprobs}
        try:
            for request, sp in requests:
                self.core.add(request, sp)
            while self.core.has_work():
                for out in self.core.step():
                    rid = out.request.request_id
                    texts[rid] += out.text
                    if rid in logprobs:
                        logprobs[rid].append(self.runner.last_logprobs[rid])
        except BaseException:  # a refused prompt, an error, Ctrl-C: none of this call's requests stays queued
            for request, _ in requests:
                self.core.abort(request.request_id)
            raise
        return [self._completion(r, texts[r.request_id], logprobs.get(r.request_id)) for r, _ in requests]

    def chat(self, conversations: Sequence[Sequence[Mapping[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS) -> list[Completion]:
        """Reply to each conversation (a list of ``{"role", "content"}`` messages)."""
        return self.generate([self.tokenizer.chat(c) for c in conversations], params)

    @staticmethod
    def _completion(r: Request, text: str, logprobs: list[float] | None) -> Completion:
        return Completion(r.request_id, list(r.prompt_token_ids), list(r.output_token_ids), text,
                          r.finish_reason.value if r.finish_reason else "length", logprobs, r.num_preemptions,
                          r.arrival, r.first_token_time, r.finish_time)
