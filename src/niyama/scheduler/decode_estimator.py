"""Per-class decode-length estimate from history (output length is unknown when a request arrives).

Like the paper, it over-estimates on purpose: mean + k standard deviations of the lengths seen so far.
The plain mean is there too, for what needs an expectation rather than a bound (a batch decode's slack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Stats:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # Welford's running sum of squared deviations


class DecodeLengthEstimator:
    def __init__(self, prior: int, sigmas: float = 2.0, min_samples: int = 8):
        self.prior = prior
        self.sigmas = sigmas
        self.min_samples = min_samples
        self._stats: dict[str, _Stats] = {}
        self._cache: dict[str, float] = {}

    def observe(self, qos_class: str, length: int) -> None:
        s = self._stats.setdefault(qos_class, _Stats())
        s.n += 1
        delta = length - s.mean
        s.mean += delta / s.n
        s.m2 += delta * (length - s.mean)
        if s.n >= self.min_samples:
            self._cache[qos_class] = s.mean + self.sigmas * math.sqrt(s.m2 / (s.n - 1))

    def estimate(self, qos_class: str) -> float:
        return self._cache.get(qos_class, self.prior)

    def mean(self, qos_class: str) -> float:
        """The mean length seen so far (the prior until ``min_samples``): an expectation, not a bound."""
        s = self._stats.get(qos_class)
        return s.mean if s is not None and s.n >= self.min_samples else self.prior
