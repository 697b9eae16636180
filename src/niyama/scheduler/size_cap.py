"""Eager relegation on arrival under sustained overload: a cap on the size of new work, per importance level.

The relegation walk makes room by relegating the largest requests *queued* ahead of one that would miss.
Under sustained overload that is not the largest requests of the workload: requests served soon after
they arrive (interactive prompts) are never in a walk's queue, so the walk's victims are of ordinary
size, while large interactive prompts are served. Shedding the same work costs fewer requests when the
largest go. So, per level, the cap is the size above which the last ``WINDOW`` seconds of arrivals carry
as much prefill work as relegation has been shedding of that level per second (a smoothed rate); a new
request at or above it, due within ``WINDOW`` (an interactive one), is relegated on arrival (it still gets
leftover budget, like any relegated one). The dynamic chunk also prices a decode's pace against the cap
(``DeadlineScheduler._token_budget``).

The cap acts only at a level whose requests the walks keep relegating (at least ``MIN_WALK_SHARE`` of
that level's arriving work), so importance order holds: while relegating sheddable requests is enough,
standard and critical ones are never capped, and an odd miss near capacity does not start it. It sheds at
most what arrivals bring beyond the estimated prefill rate, and fades once the walks stop shedding.
"""

from __future__ import annotations

import math
from collections import deque

from niyama.qos import LEAST_IMPORTANT_FIRST, Importance
from niyama.request import Request


class SizeCap:
    WINDOW = 10.0  # s of arrivals a cap is computed from
    SMOOTHING = 0.2  # weight of the newest period in the shed-rate average
    DECAY = 0.02  # per update: without new shedding the rate fades, and the cap with it
    MIN_WALK_SHARE = 0.003  # of a level's arriving work that other relegation must shed for a cap

    def __init__(self) -> None:
        self._arrivals: deque[tuple[float, int, Importance]] = deque()  # (arrival, prefill tokens, level)
        self._arriving = [0] * len(Importance)  # per level, the prefill tokens of ``_arrivals``
        # Per level, prefill tokens relegated since the last update (all; not by the cap) and their smoothed
        # rates in tokens/s.
        self._shed = [0.0] * len(Importance)
        self._walk_shed = [0.0] * len(Importance)
        self._rate = [0.0] * len(Importance)
        self._walk_rate = [0.0] * len(Importance)
        self._last_update: float | None = None
        self.caps = [math.inf] * len(Importance)  # new requests with at least this much prefill are relegated

    def arrive(self, request: Request) -> bool:
        """Record a new request; True if it is to be relegated now. Only a request due within ``WINDOW`` of
        its arrival can be: one due later waits in the queue, where the walks judge it with what they know
        nearer its deadline."""
        work, level = request.prefill_remaining, request.qos.importance
        self._arrivals.append((request.arrival, work, level))
        self._arriving[level] += work
        if work < self.caps[level] or request.deadline - request.arrival > self.WINDOW:
            return False
        self._shed[level] += work
        return True

    def shed(self, request: Request) -> None:
        """Record a request relegated by other means (a walk, or a hopeless one)."""
        self._shed[request.qos.importance] += request.prefill_remaining
        self._walk_shed[request.qos.importance] += request.prefill_remaining

    def update(self, now: float, prefill_rate: float) -> None:
        """Fold the shedding since the last update into the rates and set new caps (once per walk)."""
        if self._last_update is not None and now > self._last_update:
            elapsed = now - self._last_update
            for rates, shed in ((self._rate, self._shed), (self._walk_rate, self._walk_shed)):
                for level, rate in enumerate(rates):
                    rates[level] = (1 - self.DECAY) * (rate + self.SMOOTHING * (shed[level] / elapsed - rate))
        self._last_update = now
        self._shed, self._walk_shed = [0.0] * len(Importance), [0.0] * len(Importance)
        while self._arrivals and self._arrivals[0][0] < now - self.WINDOW:
            _, work, level = self._arrivals.popleft()
            self._arriving[level] -= work
        arriving = [work / self.WINDOW for work in self._arriving]  # tokens/s per level
        excess = sum(arriving) - prefill_rate
        self.caps = [math.inf] * len(Importance)
        for level in LEAST_IMPORTANT_FIRST:
            rate = min(self._rate[level], excess)
            if rate > 0 and self._walk_rate[level] >= self.MIN_WALK_SHARE * arriving[level]:
                excess -= rate
                need = rate * self.WINDOW  # prefill tokens of this window's arrivals to shed, largest first
                for work in sorted((w for _, w, lv in self._arrivals if lv == level), reverse=True):
                    if need <= 0:
                        break
                    need -= work
                    self.caps[level] = work
                if need > 0:
                    self.caps[level] = 0
            if arriving[level] and self.caps[level]:
                break  # a more important level is capped only once all of this one is shed
