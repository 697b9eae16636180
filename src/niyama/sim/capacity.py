"""Capacity: the highest arrival rate at which every QoS class has at most 1% SLO violations.

Like the reference, the search brackets the threshold (doubling the rate until a run fails), bisects the
bracket, and reports the rate interpolated linearly between the last passing and first failing point.
The same search drives the simulator and, through a different ``evaluate``, a live server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Evaluate = Callable[[float], float]  # rate → worst class violation %


@dataclass
class CapacityResult:
    capacity: float
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate, worst violation %)
    threshold: float = 1.0
    at_least: bool = False  # the search reached its highest rate without a failing point: a lower bound

    def __str__(self) -> str:
        return f"{'≥ ' if self.at_least else ''}{self.capacity:.3f} req/s"


def interpolate(lo: tuple[float, float], hi: tuple[float, float], threshold: float) -> float:
    """The rate where the violation line between a passing and a failing point crosses ``threshold``."""
    (r0, v0), (r1, v1) = lo, hi
    if v1 <= v0:
        return r0
    return r0 + (threshold - v0) * (r1 - r0) / (v1 - v0)


def find_capacity(evaluate: Evaluate, start: float = 1.0, threshold: float = 1.0, rel_tol: float = 0.03,
                  max_rate: float = 1e4, growth: float = 1.5, on_point: Callable[[float, float], None] | None = None
                  ) -> CapacityResult:
    points: list[tuple[float, float]] = []

    def probe(rate: float) -> float:
        v = evaluate(rate)
        points.append((rate, v))
        if on_point:
            on_point(rate, v)
        return v

    lo: tuple[float, float] | None = None
    hi: tuple[float, float] | None = None
    rate = start
    while lo is None or hi is None:  # bracket: grow from a pass, shrink from a fail
        v = probe(rate)
        if v <= threshold:
            lo = (rate, v)
            if rate >= max_rate:
                return CapacityResult(rate, points, threshold, at_least=True)
            rate *= growth
        else:
            hi = (rate, v)
            if rate <= start / 64:
                return CapacityResult(0.0, points, threshold)
            rate /= growth
    while hi[0] - lo[0] > rel_tol * lo[0]:
        mid = (lo[0] + hi[0]) / 2
        if mid in (lo[0], hi[0]):  # as close as floats get (a tiny rel_tol)
            break
        v = probe(mid)
        if v <= threshold:
            lo = (mid, v)
        else:
            hi = (mid, v)
    return CapacityResult(interpolate(lo, hi, threshold), sorted(points), threshold)
