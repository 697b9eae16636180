"""The scheduling loop every policy shares; policies differ only in the hooks they override.

Per iteration: (1) every decode-phase request gets its one token (decodes are never dropped for
scheduling; KV exhaustion preempts the least important running request by recompute), (2) the rest of
the token budget goes to prefill chunks in the policy's priority order, (3) if budget is left, relegated
requests get it. The scheduler is pure: it reads no clock (``now`` comes in), does no I/O and imports no
torch, so the live engine and the simulator drive the same code.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import count
from operator import itemgetter
from typing import Any, ClassVar

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.request import FinishReason, Request, RequestStatus
from niyama.scheduler.batch import Batch, samples
from niyama.scheduler.decode_estimator import DecodeLengthEstimator

SortKey = Any  # a float or a tuple of floats; lower is served first

DEFAULT_CHUNK_CANDIDATES = (128, 256, 384, 512, 768, 1024, 1536, 2048, 2552)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # most requests holding KV at once
    chunk_size: int = 256  # token budget per iteration (fixed-budget policies; Niyama's fallback)
    # Niyama's three mechanisms, each switchable for ablation.
    dynamic_chunking: bool = True
    relegation: bool = True
    hybrid_alpha: float = 0.008  # s per token; 0 gives EDF ordering
    # The hybrid term is at most this many times the request's own SLO window (TTFT, or TTLT for batch
    # work): without a bound, a long interactive prompt falls behind minutes of later-due work and is lost.
    hybrid_cap: float = 4.0
    safety: float = 1.2  # predicted batch time is multiplied by this before comparing with slack
    chunk_candidates: tuple[int, ...] = DEFAULT_CHUNK_CANDIDATES
    low_memory_free: float = 0.1  # below this free KV fraction, chunks are capped at low_memory_chunk
    low_memory_chunk: int = 512
    decode_prior: int = 128  # decode-length estimate before a class has history
    decode_sigmas: float = 2.0  # the estimate is mean + this many standard deviations
    relegation_period: float = 1.0  # s between the starts of relegation walks of the queue
    # A sheddable request stays in the normal queue only if its prefill is predicted to end within
    # 1/sheddable_margin of the time left to its deadline; the rest is headroom for more important work
    # that has not arrived yet. 1 treats sheddable requests like the others.
    sheddable_margin: float = 2.0
    # While relegation walks keep shedding at an importance level, relegate that level's largest new requests
    # on arrival (scheduler/size_cap.py): the same work shed in fewer requests. Part of relegation.
    size_cap: bool = True

    def __post_init__(self) -> None:
        # Any of these at 0 schedules empty batches forever.
        if self.max_num_seqs < 1 or self.chunk_size < 1 or not self.chunk_candidates \
                or min(self.chunk_candidates) < 1 or self.low_memory_chunk < 1:
            raise ValueError("max_num_seqs, chunk_size, chunk_candidates and low_memory_chunk must be at least 1")

    @classmethod
    def within(cls, max_tokens: int, **kwargs: Any) -> SchedulerConfig:
        """A config whose iterations never exceed ``max_tokens`` (``niyama serve --max-num-batched-tokens``)."""
        candidates = tuple(c for c in DEFAULT_CHUNK_CANDIDATES if c < max_tokens) + (max_tokens,)
        chunk_size = min(kwargs.pop("chunk_size", cls.chunk_size), max_tokens)
        return cls(chunk_size=chunk_size, chunk_candidates=candidates, low_memory_chunk=min(512, max_tokens),
                   **kwargs)


class Scheduler:
    """Base scheduler: FCFS order with a fixed token budget (Sarathi-Serve). Subclasses override hooks."""

    name: ClassVar[str] = "fcfs"

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, predictor: BatchTimePredictor | None):
        self.config = config
        self.kv = kv
        self.predictor = predictor
        self.decode_lengths = DecodeLengthEstimator(config.decode_prior, config.decode_sigmas)
        # Queues of (key, arrival sequence, request), sorted: the key, then the sequence, order them.
        self.waiting: list[tuple[SortKey, int, Request]] = []  # by the policy's waiting_key
        self.relegated: list[tuple[SortKey, int, Request]] = []  # by relegated_key
        self.running: list[Request] = []  # hold KV blocks: partial prefills and decodes
        self.num_preemptions = 0
        self._seq = count()
        self._by_id: dict[str, Request] = {}

    # -- policy hooks --------------------------------------------------------------------------
    def waiting_key(self, request: Request) -> SortKey:
        """Priority of a request that has not started (lower first). Must not change while it waits."""
        return request.arrival

    def running_key(self, request: Request, now: float) -> SortKey:
        """Priority of a partly prefilled request; by default the same as when it waited."""
        return self.waiting_key(request)

    def token_budget(self, decodes: list[Request], now: float) -> int:
        """Total tokens (decodes included) for this iteration."""
        return self.config.chunk_size

    def relegate(self, candidates: Iterable[Request], now: float) -> Iterable[Request]:
        """Return the candidates that stay in the normal queue (policies without relegation keep all)."""
        return candidates

    def relegate_on_arrival(self, request: Request) -> bool:
        """Whether a new request goes straight to the relegated queue (Niyama: too large under overload)."""
        return False

    def admissible(self, request: Request, now: float) -> bool:
        """Last check before a request gets prefill tokens; False relegates it (Niyama: hopeless)."""
        return True

    def relegated_key(self, request: Request) -> tuple[int, float]:
        return (request.qos.importance, request.deadline)

    def relegated_order(self, requests: Iterator[Request], now: float) -> Iterable[Request]:
        """The order in which relegated requests (sorted by ``relegated_key``) get leftover budget."""
        return requests

    def set_predictor(self, predictor: BatchTimePredictor) -> None:
        """Use a new batch-time predictor from the next decision on (the live engine's rescaled profile)."""
        self.predictor = predictor

    # -- queue management ----------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens + request.max_tokens > self.kv.capacity_tokens:
            raise ValueError(f"prompt + max_tokens ({request.num_prompt_tokens} + {request.max_tokens}) "
                             f"exceeds the KV cache ({self.kv.capacity_tokens} tokens)")
        self._by_id[request.request_id] = request
        if self.relegate_on_arrival(request):
            request.relegated = True
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        if request.relegated:
            self._enqueue_relegated([request])
        else:
            insort(self.waiting, (self.waiting_key(request), next(self._seq), request))

    def _enqueue_relegated(self, requests: list[Request]) -> None:
        entries = [(self.relegated_key(r), next(self._seq), r) for r in requests]
        for r in requests:
            r.status = RequestStatus.RELEGATED
        size = len(self.relegated) + len(entries)
        if len(entries) * size.bit_length() > size:  # many at once (a full queue's first walk): one sort
            self.relegated += entries
            self.relegated.sort()
        else:
            for entry in entries:
                insort(self.relegated, entry)

    @staticmethod
    def _dequeue(queue: list[tuple[SortKey, int, Request]], request: Request) -> None:
        del queue[next(i for i, entry in enumerate(queue) if entry[2] is request)]

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_relegated(self) -> int:
        return len(self.relegated)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.relegated)

    def finish(self, request: Request, now: float, reason: FinishReason) -> None:
        """End a request (finished, stopped by a stop string, or aborted) and free its KV blocks."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._dequeue(self.relegated if request.status is RequestStatus.RELEGATED else self.waiting, request)
        self.kv.free(request)
        request.finish_reason = reason
        request.finish_time = now
        request.status = RequestStatus.ABORTED if reason is FinishReason.ABORT else RequestStatus.FINISHED
        del self._by_id[request.request_id]
        if reason is not FinishReason.ABORT:
            self.decode_lengths.observe(request.qos.name, request.num_output_tokens)

    def abort(self, request_id: str, now: float) -> Request | None:
        request = self._by_id.get(request_id)
        if request is not None:
            self.finish(request, now, FinishReason.ABORT)
        return request

    def preempt(self, request: Request) -> None:
        """Recompute-style preemption: free the KV blocks; the request waits again, nothing is lost."""
        self.running.remove(request)
        self.kv.free(request)
        request.reset_for_recompute()
        self.num_preemptions += 1
        self._enqueue(request)

    # -- one iteration -------------------------------------------------------------------------
    def schedule(self, now: float) -> Batch:
        batch = Batch()
        batch.decodes = self._reserve_decodes(batch)
        admit = not batch.preempted  # a request preempted now must not take its blocks straight back
        while True:
            budget = max(self.token_budget(batch.decodes, now) - len(batch.decodes), 0)
            candidates = self.relegate(self._prefill_order(now), now)
            budget = self._fill_prefills(batch, candidates, budget, now, admit)
            if budget > 0:
                started = [r for r in self.running if r.relegated and not r.is_decoding]
                pool = self.relegated
                if started:
                    pool = sorted(pool + [(self.relegated_key(r), next(self._seq), r) for r in started])
                self._fill_prefills(batch, self.relegated_order(map(itemgetter(2), pool), now), budget, now, admit)
            if batch or not self.running:
                return batch
            # Every running request is a stalled partial prefill and KV is full: free one, and let the
            # others use its blocks before anyone new is admitted (or the victim would just come back).
            victim = max(self.running, key=self._victim_key)
            self.preempt(victim)
            batch.preempted.append(victim)
            admit = False

    def _prefill_order(self, now: float) -> Iterator[Request]:
        """Partly prefilled requests (not relegated) merged into the (already sorted) waiting queue,
        lazily: under overload the queue is long and an iteration usually needs only its head."""
        partials = [r for r in self.running if not r.is_decoding and not r.relegated]
        if not partials:
            return map(itemgetter(2), self.waiting)
        return self._merged_order(partials, now)

    def _merged_order(self, partials: list[Request], now: float) -> Iterator[Request]:
        keyed = sorted(((self.running_key(r, now), r) for r in partials), key=lambda kr: kr[0])
        waiting = iter(self.waiting)
        head = next(waiting, None)  # the first waiting entry not yielded yet
        for k, r in keyed:
            while head is not None and head[0] < k:
                yield head[2]
                head = next(waiting, None)
            yield r
        if head is not None:
            yield head[2]
            yield from map(itemgetter(2), waiting)

    def _relegate(self, requests: list[Request]) -> None:
        """Move requests to the relegated queue (running ones keep their KV and stay where they are)."""
        if not requests:
            return
        for r in requests:
            r.relegated = True
        self.waiting = [w for w in self.waiting if not w[2].relegated]
        self._enqueue_relegated([r for r in requests if r.status is not RequestStatus.RUNNING])

    def _victim_key(self, request: Request) -> tuple[bool, int, float]:
        """Largest = preempted first: relegated, then least important, then latest arrival."""
        return (request.relegated, request.qos.importance, request.arrival)

    def _reserve_decodes(self, batch: Batch) -> list[Request]:
        """Make room for one more token per decode, preempting by recompute if KV is short."""
        while True:
            decodes = [r for r in self.running if r.is_decoding]
            needed = sum(1 for r in decodes if self.kv.blocks_needed(r, 1))
            if needed <= self.kv.num_free_blocks:
                break
            victim = max(self.running, key=self._victim_key)
            self.preempt(victim)
            batch.preempted.append(victim)
        for r in decodes:
            self.kv.allocate(r, 1)
        return decodes

    def _fill_prefills(self, batch: Batch, candidates: Iterable[Request], budget: int, now: float,
                       admit_new: bool) -> int:
        """Give prefill chunks to candidates in order until the budget is spent. Queue changes are
        applied after the loop, because ``candidates`` may be a live view of the waiting queue."""
        started, hopeless = [], []
        num_running = len(self.running)
        for r in candidates:
            if budget <= 0:
                break
            new = r.status is not RequestStatus.RUNNING
            if new and (not admit_new or num_running >= self.config.max_num_seqs):
                continue
            if not r.relegated and not self.admissible(r, now):
                hopeless.append(r)
                continue
            n = min(r.prefill_remaining, budget, self.kv.max_new_tokens(r, admit=new))
            if n <= 0:
                admit_new = admit_new and not new  # memory is short: admit nobody new behind it
                continue
            self.kv.allocate(r, n)
            if new:
                started.append(r)
                num_running += 1
            batch.prefills.append((r, n))
            budget -= n
        self._relegate(hopeless)
        for r in started:
            self._start(r, now)
        return budget

    def _start(self, request: Request, now: float) -> None:
        self._dequeue(self.relegated if request.status is RequestStatus.RELEGATED else self.waiting, request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        self.running.append(request)

    def update(self, batch: Batch, now: float, sampled: Mapping[str, int] | None = None) -> list[Request]:
        """Advance progress after the batch ran; ``sampled`` maps request id → new token (the
        simulator passes None: token 0). Returns the requests that finished."""
        finished = []
        for r, n in batch.chunks:
            if r.is_finished:  # aborted while the batch ran
                continue
            sampling = samples(r, n)
            r.num_computed_tokens += n
            if sampling:
                token = sampled[r.request_id] if sampled is not None else 0
                if r.append_token(token, now):
                    self.finish(r, now, r.finish_reason or FinishReason.LENGTH)
                    finished.append(r)
        return finished

