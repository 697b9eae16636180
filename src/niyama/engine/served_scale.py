"""Online calibration: the profiled batch-time predictor, scaled to the batch times measured while serving.

A profile is measured with the engine alone. Serving adds the HTTP server, tokenization and, on a small
machine, often the clients themselves on the same cores, so every iteration can run tens of percent slower
than profiled. Niyama's decisions (dynamic chunk size, relegation) rest on predicted batch times, so the
engine compares measured and predicted time over recent iterations and hands the scheduler the profile
scaled by their ratio whenever it moves. The ratio is of sums (a time-weighted mean), not a median:
interference is bursty, and a few iterations that take several times their prediction cost as much
throughput as many that are slightly slow.
"""

from __future__ import annotations

from collections import deque

from niyama.predictor import BatchShape, BatchTimePredictor


class ServedScale:
    def __init__(self, profile: BatchTimePredictor, window: int = 500, every: int = 100, min_change: float = 0.05):
        self.profile = profile
        self.scale = 1.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)  # (measured, predicted) seconds
        self._every = every
        self._min_change = min_change
        self._since_update = 0

    def observe(self, shape: BatchShape, seconds: float) -> BatchTimePredictor | None:
        """Record one executed batch; every ``every`` batches, return the rescaled profile if the ratio
        moved by more than ``min_change`` (else None)."""
        self._recent.append((seconds, self.profile.predict_shape(shape)))
        self._since_update += 1
        if self._since_update < self._every:
            return None
        self._since_update = 0
        scale = sum(m for m, _ in self._recent) / sum(p for _, p in self._recent)
        if abs(scale / self.scale - 1) <= self._min_change:
            return None
        self.scale = scale
        return self.profile.scaled(scale)
