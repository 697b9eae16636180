"""One request: its tokens, progress through prefill and decode, timestamps and SLO outcome.

Progress follows one rule for prefill and decode alike: a request has ``num_tokens`` tokens (prompt +
generated output) of which ``num_computed_tokens`` are in the KV cache. A batch computes some of the
rest; when a chunk reaches the end of the known tokens, the model samples the next token. A decode is
therefore just a chunk of one token, and preemption by recompute only resets ``num_computed_tokens``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from niyama.qos import QoS


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    PREEMPTED = "preempted"  # waiting again after its KV was freed; recomputes from scratch
    RELEGATED = "relegated"  # cannot meet its deadline; served only when nothing else fits
    RUNNING = "running"  # holds KV blocks (a partly prefilled prompt or a decode)
    FINISHED = "finished"
    ABORTED = "aborted"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token (EOS) or stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # client went away or the server gave up on it


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    arrival: float
    qos: QoS
    num_prompt_tokens: int
    max_tokens: int
    prompt_token_ids: Sequence[int] = ()  # empty in the simulator, which only counts tokens
    priority: int = 0  # vLLM-style: lower value is served first by the `priority` scheduler
    stop_token_ids: frozenset[int] = frozenset()

    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # KV block table, owned by memory.KVBlockManager
    relegated: bool = False
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    max_lateness: float = float("-inf")  # worst (emit time - cumulative deadline) over all tokens
    num_late_tokens: int = 0
    max_token_gap: float = 0.0
    # The deadline prefill must meet: TTFT for interactive, TTLT for batch work. Fixed at arrival, and
    # stored because the scheduler reads it for every queued request.
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError("a request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.prompt_token_ids and len(self.prompt_token_ids) != self.num_prompt_tokens:
            raise ValueError("num_prompt_tokens does not match prompt_token_ids")
        self.deadline = self.qos.first_token_deadline(self.arrival)

    # -- progress ------------------------------------------------------------------------------
    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Prefill is done and the next step is one decode token."""
        return bool(self.output_token_ids) and self.num_uncomputed_tokens == 1

    @property
    def prefill_remaining(self) -> int:
        """Tokens still to prefill (after a preemption this includes regenerated context)."""
        return 0 if self.is_decoding else self.num_uncomputed_tokens

    @property
    def decode_remaining_max(self) -> int:
        return self.max_tokens - len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids of positions [start, end) over prompt + output."""
        n = self.num_prompt_tokens
        head = list(self.prompt_token_ids[start:min(end, n)]) if start < n else []
        return head + self.output_token_ids[max(start - n, 0):max(end - n, 0)]

    # -- deadlines -----------------------------------------------------------------------------
    @property
    def next_token_deadline(self) -> float:
        return self.qos.token_deadline(self.arrival, len(self.output_token_ids) + 1)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def ttlt(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival

    @property
    def slo_met(self) -> bool | None:
        """Interactive: first token by its TTFT deadline; batch: last token by its TTLT deadline.

        Token-pace (TBT) misses are reported separately through ``tbt_met``. None while unknown.
        """
        if self.qos.interactive:
            if self.first_token_time is None:
                return None if not self.is_finished else False
            return self.first_token_time <= self.deadline
        if self.finish_time is None or self.status is RequestStatus.ABORTED:
            return None if not self.is_finished else False
        return self.finish_time <= self.deadline

    @property
    def tbt_met(self) -> bool | None:
        """Every token by its cumulative deadline (interactive only)."""
        if not self.qos.interactive or not self.output_token_ids:
            return None
        return self.num_late_tokens == 0

    # -- events --------------------------------------------------------------------------------
    def append_token(self, token_id: int, now: float) -> bool:
        """Record one sampled token; returns True when the request is now complete."""
        self.output_token_ids.append(token_id)
        n = len(self.output_token_ids)
        lateness = now - self.qos.token_deadline(self.arrival, n)
        if lateness > self.max_lateness:
            self.max_lateness = lateness
        if lateness > 0:
            self.num_late_tokens += 1
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.max_token_gap = max(self.max_token_gap, now - self.last_token_time)  # type: ignore[operator]
        self.last_token_time = now
        if token_id in self.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        elif n >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None

    def reset_for_recompute(self) -> None:
        """Preemption: forget the KV cache; prompt and generated tokens are prefilled again."""
        self.num_computed_tokens = 0
        self.block_ids = []
        self.num_preemptions += 1
        self.status = RequestStatus.PREEMPTED
