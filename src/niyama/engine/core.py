"""The live engine core: one scheduler, one model runner, one iteration per ``step()``.

This is the live half of the one-scheduler-two-clocks rule: the same pure scheduler the simulator
drives is driven here with ``time.monotonic()`` as ``now`` and the real model as the executor. Each
step schedules a batch, executes it, advances the requests, applies stop strings, and reports the new
text of every request that produced a token. ``EngineCore`` is not thread-safe: one thread drives it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TextIO

from niyama.engine.model_runner import ModelRunner
from niyama.engine.sampler import SamplingParams
from niyama.engine.served_scale import ServedScale
from niyama.engine.tokenizer import Tokenizer
from niyama.memory import KVBlockManager
from niyama.predictor import BatchShape, BatchTimePredictor
from niyama.request import FinishReason, Request
from niyama.scheduler import SchedulerConfig, make_scheduler
from niyama.scheduler.base import Scheduler


@dataclass(slots=True)
class StepOutput:
    """What one request produced in one iteration (one new token)."""

    request: Request
    text: str  # new text since the last output (held back while it may be a stop-string prefix)
    finished: bool


@dataclass(slots=True)
class IterationStats:
    """Shape and duration of the last executed iteration (for metrics)."""

    num_prefill_tokens: int
    num_decode_tokens: int
    seconds: float
    batch_time_scale: float | None  # measured / profiled batch time (None: no predictor)


@dataclass(slots=True)
class _Detokenizer:
    """Incremental text of one request, with stop strings applied.

    Each token decodes only a short window: the tokens from ``prefix`` on, minus the text the window's
    already-read part (``prefix:read``) gave. The token before the new ones stays in the window because
    tokenizers render a word's leading space only after another token. A window whose text ends in an
    unfinished UTF-8 character is not read until a later token completes it (or the request ends)."""

    params: SamplingParams
    text: str = ""
    sent: int = 0  # characters already reported
    prefix: int = 0  # first output token of the decoding window
    read: int = 0  # output tokens whose text is in ``text``
    holdback: int = field(init=False)  # characters a stop string may still complete: the longest one's, less 1

    def __post_init__(self) -> None:
        self.holdback = max((len(s) for s in self.params.stop), default=1) - 1

    def update(self, tokenizer: Tokenizer, request: Request, final: bool) -> bool:
        """Append the new tokens' text; True when a stop string was found (the text is cut before it).
        ``final``: the request ends with this token, so a partial character is read as it is."""
        ids = request.output_token_ids
        window = tokenizer.decode(ids[self.prefix:])
        if window.endswith("\ufffd") and not final:
            return False
        before = len(self.text)
        self.text += window[len(tokenizer.decode(ids[self.prefix:self.read])):]
        self.prefix, self.read = self.read, len(ids)
        # A stop string not found before can only end in the new text.
        start = max(before - self.holdback, 0)
        cuts = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            return True
        return False

    def delta(self, finished: bool) -> str:
        """Text not reported yet; unfinished requests hold back a possible stop-string prefix."""
        end = len(self.text)
        if not finished:
            end -= self.holdback
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, scheduler: str = "niyama",
                 config: SchedulerConfig | None = None, predictor: BatchTimePredictor | None = None,
                 online_calibration: bool = True, iteration_log: TextIO | None = None):
        """``online_calibration``: rescale the predictor to the batch times measured while serving.
        ``iteration_log``: where to write one JSON line per iteration (its shape, execution time and
        queue lengths), the rows ``niyama profile --from-log`` fits a predictor from."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.kv = KVBlockManager(runner.num_blocks, runner.block_size)
        self.scheduler: Scheduler = make_scheduler(scheduler, config or SchedulerConfig(), self.kv, predictor)
        self.served_scale = ServedScale(predictor) if predictor is not None and online_calibration else None
        self.eos_token_ids = tokenizer.eos_token_ids | set(runner.config.eos_token_ids)
        self.last_iteration: IterationStats | None = None
        self.iteration_log = iteration_log
        self._detok: dict[str, _Detokenizer] = {}
        self._params: dict[str, SamplingParams] = {}

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + output) one request may hold."""
        return min(self.runner.config.context_length, self.kv.capacity_tokens)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def add(self, request: Request, params: SamplingParams) -> None:
        """Queue a request; its stop tokens are set from ``params`` (and EOS unless ``ignore_eos``).
        ``ValueError`` for what would fail the whole batch it runs in: prompt token ids missing or outside
        the vocabulary, prompt + max_tokens beyond the context."""
        if not request.prompt_token_ids:  # (a simulator's request holds lengths only)
            raise ValueError(f"request {request.request_id} has no prompt token ids")
        if request.num_prompt_tokens + request.max_tokens > self.max_model_len:
            raise ValueError(f"prompt + max_tokens ({request.num_prompt_tokens} + {request.max_tokens}) exceeds the "
                             f"context of {self.max_model_len} tokens (model and KV cache)")
        vocab = self.runner.config.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request.request_id}: prompt token id {bad[0]} is outside the vocabulary "
                             f"[0, {vocab})")
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        request.stop_token_ids = frozenset(params.stop_token_ids) | eos
        self.scheduler.add(request)
        self._params[request.request_id] = params
        self._detok[request.request_id] = _Detokenizer(params)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now and free its KV blocks; None if it is unknown or already done."""
        request = self.scheduler.abort(request_id, time.monotonic())
        if request is not None:
            self._forget(request_id)
        return request

    def step(self) -> list[StepOutput]:
        """Run one iteration: schedule → execute → update → stop strings → release finished."""
        start = time.monotonic()
        batch = self.scheduler.schedule(start)
        if not batch:
            self.last_iteration = None
            return []
        executed = time.monotonic()
        sampled = self.runner.execute(batch.chunks, self._params)
        now = time.monotonic()
        scale = None
        # A sum over decodes, so only when needed (Niyama's scheduler has computed it already).
        shape = batch.shape() if self.served_scale is not None or self.iteration_log is not None else None
        if self.served_scale is not None:
            rescaled = self.served_scale.observe(shape, now - executed)
            if rescaled is not None:
                self.scheduler.set_predictor(rescaled)
            scale = self.served_scale.scale
        if self.iteration_log is not None:
            self._log_iteration(shape, start, executed, now)
        self.last_iteration = IterationStats(batch.num_prefill_tokens, len(batch.decodes), now - start, scale)
        finished = {r.request_id for r in self.scheduler.update(batch, now, sampled)}
        outputs = []
        for request, _ in batch.chunks:
            rid = request.request_id
            if rid not in sampled or rid not in self._detok:
                continue
            detok = self._detok[rid]
            if detok.update(self.tokenizer, request, rid in finished):  # a stop string ends the request
                if rid in finished:  # it also reached max_tokens, but the text was cut at the stop string
                    request.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(request, now, FinishReason.STOP)
                    finished.add(rid)
            done = rid in finished
            outputs.append(StepOutput(request, detok.delta(done), done))
            if done:
                self._forget(rid)
        return outputs

    def _log_iteration(self, shape: BatchShape, start: float, executed: float, end: float) -> None:
        s = self.scheduler
        row = {"time": start, **asdict(shape), "seconds": end - executed, "schedule_seconds": executed - start,
               "waiting": s.num_waiting, "running": s.num_running, "relegated": s.num_relegated}
        self.iteration_log.write(json.dumps(row) + "\n")

    def _forget(self, request_id: str) -> None:
        self._params.pop(request_id, None)
        self._detok.pop(request_id, None)
        self.runner.release(request_id)
