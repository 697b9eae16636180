"""Deadline-driven scheduling: EDF, and Niyama's three mechanisms on top of it (DESIGN.md §2).

1. Dynamic chunking: the token budget is the largest candidate whose predicted batch time (× safety)
   fits in the smallest decode slack, instead of a fixed chunk.
2. Hybrid prioritization: prompt priority = deadline + α × remaining work (α = 0 is EDF), the second
   term at most ``hybrid_cap`` × the request's SLO window.
3. Eager relegation: walking the queue in priority order with the estimated prefill rate, a request
   that would finish its prefill after its deadline makes room by relegation: less important requests
   ahead of it go first (sheddable, then standard), then the largest of its own level (itself
   included). Before that, a request at risk (or within ``relegation_period`` of it) is promoted to
   its deadline as priority if that saves it without making anyone it overtakes late. Sheddable
   requests must fit with a margin, which keeps headroom for more important work still to come. While
   walks keep relegating at a level, the largest new requests of that level are relegated on arrival
   (``size_cap``), and a decode whose pace keeps the chunk small is relegated once the prefill that has
   cost reaches the size of the requests its level sheds (rent or buy; it still gets a token every
   iteration). Relegated requests are served only with budget nobody else can use, those that can still
   make their deadline first.
"""

from __future__ import annotations

import heapq
import math
from bisect import insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from operator import itemgetter

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.qos import LEAST_IMPORTANT_FIRST, Importance
from niyama.request import FinishReason, Request, RequestStatus
from niyama.scheduler.base import Scheduler, SchedulerConfig, SortKey
from niyama.scheduler.batch import Batch
from niyama.scheduler.size_cap import SizeCap

SHEDDABLE = Importance.SHEDDABLE
QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
RUNNING = RequestStatus.RUNNING


@dataclass(slots=True)
class _Walk:
    """A relegation walk in progress over a snapshot of the queue in priority order."""

    queue: list[Request]
    inv_rate: float  # s per prefill token, fixed for the walk
    t: float  # when the prefill of the last kept request is estimated to end
    position: int = 0  # requests visited so far
    kept: list[int] = field(default_factory=list)  # positions of the kept requests, in serving order
    ends: dict[int, float] = field(default_factory=dict)  # by position, the latest a kept request's prefill ends
    dropped: set[int] = field(default_factory=set)  # positions relegated as victims during the walk
    # Per importance level, the kept requests as max-heaps by prefill work, later position first on
    # ties. An entry is one int, -(work × len(queue) + position): ints compare much faster than tuples.
    ahead: list[list[int]] = field(default_factory=lambda: [[] for _ in Importance])


class DeadlineScheduler(Scheduler):
    name = "niyama"

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, predictor: BatchTimePredictor | None):
        if predictor is None and (config.dynamic_chunking or config.relegation):
            raise ValueError("dynamic chunking and relegation need a batch-time predictor")
        super().__init__(config, kv, predictor)
        # Time of one iteration as this scheduler runs them, used to turn an estimated decode length into
        # seconds: a moving average of the predicted time of the batches it schedules (on a CPU, a decode
        # iteration can take a tenth of a prefill chunk's, so a fixed chunk-sized guess overprices decodes).
        self.iteration_time = predictor.predict(config.chunk_size, 0) if predictor else 0.05
        # (prefill tokens, prefill deadline, importance) of each waiting request, fixed while it waits:
        # the relegation walk visits the whole queue, so it must not recompute these.
        self._plan: dict[Request, tuple[int, float, Importance]] = {}
        # Requests at risk that the relegation walk promoted to their deadline as priority (``_promote``).
        self._keys: dict[Request, float] = {}
        # Prefill tokens each decode's pace has cost so far while its level was shedding (``_token_budget``).
        self._rent: dict[Request, float] = {}
        # Estimated prefill throughput (tokens/s): a moving average over iterations that had more
        # prefill work than budget, priced by the predictor (so it stays pure and deterministic).
        self.prefill_rate = config.chunk_size / self.iteration_time
        self._budget = config.chunk_size
        self._next_walk = float("-inf")
        self._walk: _Walk | None = None
        self.size_cap = SizeCap() if config.relegation and config.size_cap else None

    def set_predictor(self, predictor: BatchTimePredictor) -> None:
        old, chunk = self.predictor, self.config.chunk_size
        super().set_predictor(predictor)
        if old is not None:  # the same hardware change, applied at once to both estimates
            change = predictor.predict(chunk, 0) / old.predict(chunk, 0)
            self.iteration_time *= change
            self.prefill_rate /= change

    # -- ordering ------------------------------------------------------------------------------
    def decode_estimate(self, request: Request) -> float:
        """Estimated output tokens still to come (the true length is unknown)."""
        return self._tokens_left(request, self.decode_lengths.estimate(request.qos.name))

    @staticmethod
    def _tokens_left(request: Request, length: float) -> float:
        """Output tokens still to come if the answer is ``length`` long: at least one, at most max_tokens allows."""
        return min(max(length - request.num_output_tokens, 1.0), request.decode_remaining_max)

    def prefill_deadline(self, request: Request) -> float:
        """When prefill must be done: the TTFT deadline, or for batch work the TTLT deadline less the
        predicted decode time."""
        if request.qos.interactive:
            return request.deadline
        return request.deadline - self.decode_estimate(request) * self.iteration_time

    def _priority(self, request: Request) -> float:
        alpha = self.config.hybrid_alpha
        if alpha == 0:
            return self.prefill_deadline(request)
        work = request.prefill_remaining
        if not request.qos.interactive:
            work += self.decode_estimate(request)
        return request.deadline + min(alpha * work, self.config.hybrid_cap * (request.deadline - request.arrival))

    def _key(self, request: Request) -> float:
        key = self._keys.get(request)
        return self._priority(request) if key is None else key

    def waiting_key(self, request: Request) -> SortKey:
        self._plan[request] = self._plan_entry(request)
        return self._key(request)

    def relegate_on_arrival(self, request: Request) -> bool:
        return self.size_cap is not None and self.size_cap.arrive(request)

    def _relegate(self, requests: list[Request]) -> None:
        if self.size_cap is not None:
            for r in requests:
                if not r.relegated:
                    self.size_cap.shed(r)
        super()._relegate(requests)

    def _plan_entry(self, request: Request) -> tuple[int, float, Importance]:
        return request.prefill_remaining, self.prefill_deadline(request), request.qos.importance

    def running_key(self, request: Request, now: float) -> SortKey:
        return self._key(request)

    def _start(self, request: Request, now: float) -> None:
        self._plan.pop(request, None)
        super()._start(request, now)

    def finish(self, request: Request, now: float, reason: FinishReason) -> None:
        self._plan.pop(request, None)
        self._keys.pop(request, None)
        self._rent.pop(request, None)
        super().finish(request, now, reason)

    # -- dynamic chunking ----------------------------------------------------------------------
    def decode_slack(self, request: Request, now: float) -> float:
        """Interactive: time until the next token is due. Batch work has no pace, only its TTLT: the time
        this iteration may take while the tokens it is expected to have left (its class's mean length, not
        the over-estimate that plans its prefill) still fit at the running iteration time. One that has run
        past the over-estimate is held to the pace of going on as long again, while that pace is possible.
        A batch request past its deadline no longer limits anyone: smaller chunks cannot save it."""
        if request.qos.interactive:
            return request.next_token_deadline - now
        left = request.deadline - now
        if left <= 0:
            return math.inf
        n = request.num_output_tokens
        if n > self.decode_lengths.estimate(request.qos.name):
            longer = left - (self._tokens_left(request, 2 * n) - 1) * self.iteration_time
            if longer > 0:
                return longer
        rest = self._tokens_left(request, self.decode_lengths.mean(request.qos.name)) - 1  # after this one
        return left - max(rest, 0.0) * self.iteration_time

    def token_budget(self, decodes: list[Request], now: float) -> int:
        self._budget = self._token_budget(decodes, now)
        return self._budget

    def _token_budget(self, decodes: list[Request], now: float) -> int:
        cfg = self.config
        if not cfg.dynamic_chunking:
            return cfg.chunk_size
        candidates = cfg.chunk_candidates
        if self.kv.num_free_blocks < cfg.low_memory_free * self.kv.num_blocks:
            candidates = tuple(c for c in candidates if c <= cfg.low_memory_chunk) or candidates[:1]
        slacks = [(self.decode_slack(r, now), r) for r in decodes if not r.relegated]
        if not slacks:
            return candidates[-1]
        slack, pacer = min(slacks, key=itemgetter(0))
        budget, seconds = self._fit(candidates, decodes, slack)
        price = self.size_cap.caps[pacer.qos.importance] if self.size_cap is not None else math.inf
        if budget == candidates[-1] or price == math.inf:
            return budget
        # Its level is shedding new work of ``price`` prefill tokens and more. Rent or buy: keep this decode's
        # pace while the prefill it has cost (against the budget without it) is less than that, then relegate it.
        other, other_seconds = self._fit(candidates, decodes, min((s for s, r in slacks if r is not pacer),
                                                                  default=math.inf))
        d = len(decodes)
        rent = self._rent.get(pacer, 0.0) + seconds * (max(other - d, 0) / other_seconds) - max(budget - d, 0)
        if rent < price:
            self._rent[pacer] = rent
            return budget
        self._rent.pop(pacer, None)
        self._relegate([pacer])
        return self._token_budget(decodes, now)

    def _fit(self, candidates: tuple[int, ...], decodes: list[Request], slack: float) -> tuple[int, float]:
        """The largest candidate budget whose predicted time (× safety) fits in ``slack``, and that time."""
        d = len(decodes)
        decode_ctx = sum(r.num_computed_tokens for r in decodes)
        best: tuple[int, float] | None = None  # the smallest candidate even if nothing fits
        for c in candidates:
            prefill = max(c - d, 0)
            seconds = self.predictor.predict(prefill, d, decode_ctx, prefill)  # type: ignore[union-attr]
            if best is not None and seconds * self.config.safety > slack:
                break
            best = c, seconds
        assert best is not None  # SchedulerConfig has at least one candidate
        return best

    # -- eager relegation ----------------------------------------------------------------------
    RATE_SMOOTHING = 0.05  # weight of the newest iteration in the prefill-rate and iteration-time averages

    def schedule(self, now: float) -> Batch:
        batch = super().schedule(now)
        if not batch or self.predictor is None:
            return batch
        seconds = self.predictor.predict_shape(batch.shape())
        self.iteration_time += self.RATE_SMOOTHING * (seconds - self.iteration_time)
        if self.config.relegation and batch.prefills and batch.num_tokens >= self._budget:
            self.prefill_rate += self.RATE_SMOOTHING * (batch.num_prefill_tokens / seconds - self.prefill_rate)
        return batch

    @property
    def walking(self) -> bool:
        """Whether a relegation walk is in progress (see ``relegate``)."""
        return self._walk is not None

    def walk_due(self, now: float) -> bool:
        """Whether a decision at ``now`` starts a relegation walk or continues one."""
        return self.config.relegation and (self.walking or now >= self._next_walk)

    def relegate(self, candidates: Iterable[Request], now: float) -> Iterable[Request]:
        """Walk the queue in priority order, accumulating estimated prefill time. When a request would
        miss its deadline, relegate until it fits: first less important requests ahead of it (sheddable,
        then standard), then among its own level, the one with the most remaining work (itself
        included), so that overload costs as few requests as possible. A sheddable request counts as
        missing when it would use more than 1/``sheddable_margin`` of the time left to its deadline.

        Under overload the queue holds thousands of batch requests, so a walk starts at most every
        ``relegation_period`` seconds and each decision takes it ``WALK_STEP`` requests further: the
        head of the queue, which is served first, is judged first. In between, ``admissible`` still
        relegates a request that could not make its deadline even if served right now.
        """
        if not self.walk_due(now):
            return candidates
        walk = self._walk
        if walk is None:
            if self.size_cap is not None:
                self.size_cap.update(now, self.prefill_rate)
            self._next_walk = now + self.config.relegation_period
            walk = self._walk = _Walk(list(candidates), 1.0 / self.prefill_rate, now)
        self._relegate(self._walk_step(walk, now))
        if walk.position == len(walk.queue):
            self._walk = None
        return self._prefill_order(now)  # the queue as the step left it: some relegated, some reordered

    WALK_STEP = 128  # requests a decision takes the relegation walk through

    def _walk_step(self, walk: _Walk, now: float) -> list[Request]:
        """The next ``WALK_STEP`` requests of ``walk``; returns those to relegate. Requests that started,
        finished or were relegated since the walk began count with the prefill work they have left."""
        queue, n, inv_rate, ahead = walk.queue, len(walk.queue), walk.inv_rate, walk.ahead
        least_important_first = [(level, ahead[level]) for level in LEAST_IMPORTANT_FIRST]
        demoted: list[Request] = []
        guard = self.config.relegation_period
        shed_share = 1.0 / self.config.sheddable_margin
        t = walk.t
        stop = min(walk.position + self.WALK_STEP, n)
        for i in range(walk.position, stop):
            r = queue[i]
            entry = self._walk_entry(r)
            if entry is None:  # relegated, finished or aborted since the walk began
                continue
            work, deadline, importance = entry
            if importance is SHEDDABLE:
                deadline = now + (deadline - now) * shed_share
            dt = work * inv_rate
            if now + dt > deadline:  # cannot make it even alone
                demoted.append(r)
                continue
            t += dt
            heapq.heappush(ahead[importance], -(work * n + i))
            walk.kept.append(i)
            walk.ends[i] = t
            if t + guard <= deadline:
                continue
            if importance is not SHEDDABLE and self._promote(walk, t, deadline, dt):  # at risk, or soon
                continue
            if t <= deadline:
                continue
            # Make room: relegate kept requests, least important level first and the largest first
            # within a level, until this one meets its deadline.
            for level, heap in least_important_first:
                if level < importance or t <= deadline:
                    break
                while heap and t > deadline:
                    victim_work, victim = divmod(-heapq.heappop(heap), n)
                    victim_request = queue[victim]
                    status = victim_request.status
                    if status is RUNNING:  # started since: only its remaining prefill can be saved
                        if victim_request.relegated or not victim_request.prefill_remaining:
                            continue
                        victim_work = min(victim_work, victim_request.prefill_remaining)
                    elif status not in QUEUED:
                        continue
                    demoted.append(victim_request)
                    walk.dropped.add(victim)
                    t -= victim_work * inv_rate
        walk.t, walk.position = t, stop
        return demoted

    def _walk_entry(self, request: Request) -> tuple[int, float, Importance] | None:
        """(prefill work, prefill deadline, importance) of a request the walk keeps, or None if it is gone
        (relegated, finished or aborted)."""
        if request.status in QUEUED:
            return self._plan[request]
        if request.status is RUNNING and not request.relegated:
            return self._plan_entry(request)
        return None

    PROMOTE_DEPTH = 8  # kept requests a request at risk may be moved ahead of

    def _promote(self, walk: _Walk, t: float, deadline: float, dt: float) -> bool:
        """Hybrid order lets requests due later go first, and new arrivals keep doing so. The last request
        kept (``dt`` s of prefill, estimated to end at ``t``, close to or past its ``deadline``) gets its
        deadline as priority (EDF) if it then ends in time and every request it moves ahead of (at most
        ``PROMOTE_DEPTH``), ``dt`` later than before, still ends by its own deadline (a sheddable one's
        margin is for work like this): nobody is relegated, and new arrivals, due later, cannot go first
        any more. Returns whether it was promoted."""
        queue, kept, dropped = walk.queue, walk.kept, walk.dropped
        position = kept[-1]
        request = queue[position]
        if deadline >= self._key(request):  # promoted already, or EDF order
            return False
        passed = []  # kept requests it moves ahead of: kept is in priority order, so the last ones
        ahead = 0
        first = max(len(kept) - 1 - 4 * self.PROMOTE_DEPTH, 0)  # scan at most this far back
        boundary = -1  # index in kept after which the request goes
        for j in range(len(kept) - 2, first - 1, -1):
            other = kept[j]
            entry = None if other in dropped else self._walk_entry(queue[other])
            if entry is None:
                continue
            if self._key(queue[other]) <= deadline:
                boundary = j
                break
            if walk.ends[other] + dt > entry[1] or len(passed) == self.PROMOTE_DEPTH:
                return False
            passed.append(other)
            ahead += entry[0]
        else:
            if first > 0:  # scanned as far as allowed without finding where it goes
                return False
        if t - ahead * walk.inv_rate > deadline:
            return False
        self._keys[request] = deadline
        if request.status in QUEUED:
            self._dequeue(self.waiting, request)
            insort(self.waiting, (deadline, next(self._seq), request))
        del kept[boundary + 1:]
        kept.append(position)
        kept.extend(reversed(passed))
        walk.ends[position] = t - ahead * walk.inv_rate
        for other in passed:
            walk.ends[other] += dt
        return True

    def relegated_order(self, requests: Iterator[Request], now: float) -> Iterator[Request]:
        """Those that can still meet their deadline first: leftover budget spent on a request that is
        late already cannot save it, but could save one behind it. Lazy, as the pool can be long."""
        late = []
        for r in requests:
            if self.admissible(r, now):
                yield r
            else:
                late.append(r)
        yield from late

    def admissible(self, request: Request, now: float) -> bool:
        if not self.config.relegation:
            return True
        work, deadline, _ = self._plan.get(request) or self._plan_entry(request)
        return now + work / self.prefill_rate <= deadline


class EDFScheduler(DeadlineScheduler):
    """Earliest deadline first with a fixed budget: the deadline scheduler with Niyama's mechanisms off."""

    name = "edf"

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, predictor: BatchTimePredictor | None):
        off = replace(config, dynamic_chunking=False, relegation=False, hybrid_alpha=0.0)
        super().__init__(off, kv, predictor)
